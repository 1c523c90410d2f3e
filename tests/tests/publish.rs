//! `cargo xtask publish` against moto, AWS's emulator, on 127.0.0.1,
//! through the project's fault-injecting proxy.
//!
//! `cargo xtask test` installs moto and names its `moto_server` in
//! `LAYERS_MOTO_SERVER`. The zips are small ones made here (moto checks
//! nothing about their content), except one over Lambda's 50 MB inline
//! limit, which goes through S3.

use std::env;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use layer_tests::fault_proxy::{Fault, FaultProxy, Match, Record, Rule};
use layer_tests::manifest::xtask;
use layer_tests::moto::{aim_at_emulator, without_aws_configuration, Moto};

/// The secret key the task is given: it must never appear in its output.
const SECRET_KEY: &str = "tEsTsEcReT0123456789abcdefNeverPrinted";
const ACCESS_KEY: &str = "AKIATESTNEVERPRINTED";

/// Starts the moto_server that `cargo xtask test` names.
fn start_moto() -> Moto {
    let program = env::var_os("LAYERS_MOTO_SERVER").expect("LAYERS_MOTO_SERVER is not set: run `cargo xtask test`");
    Moto::start(Path::new(&program)).unwrap()
}

/// Publishes a version of `layer` in `region` straight to moto, as another
/// tool would, and returns its number.
fn publish_directly(moto: &Moto, region: &str, layer: &str, zip: &[u8], description: &str) -> i64 {
    let body = json!({
        "Content": {"ZipFile": base64::engine::general_purpose::STANDARD.encode(zip)},
        "Description": description,
    })
    .to_string();
    let (status, version) = moto
        .request(region, "POST", &format!("/2018-10-31/layers/{layer}/versions"), &body)
        .unwrap();
    assert_eq!(status, 201, "{version}");
    version["Version"].as_i64().unwrap_or_else(|| panic!("{version}"))
}

/// Returns the versions of `layer` in `region`, with their CodeSha256.
fn versions(moto: &Moto, region: &str, layer: &str) -> Vec<(i64, String)> {
    let (status, list) = moto
        .get(region, &format!("/2018-10-31/layers/{layer}/versions"))
        .unwrap();
    assert_eq!(status, 200, "{list}");
    list["LayerVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|version| {
            (
                version["Version"].as_i64().unwrap(),
                version["Content"]["CodeSha256"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

/// Whether version `version` of `layer` has the public read statement.
fn is_public(moto: &Moto, region: &str, layer: &str, version: i64) -> bool {
    let (status, policy) = moto
        .get(region, &format!("/2018-10-31/layers/{layer}/versions/{version}/policy"))
        .unwrap();
    let statement = policy["Policy"].as_str().unwrap_or_default();
    status == 200 && statement.contains("lambda:GetLayerVersion") && statement.contains("\"*\"")
}

/// A layer of the test output directory.
struct TestLayer {
    name: &'static str,
    architecture: &'static str,
    bytes: Vec<u8>,
}

impl TestLayer {
    fn small(name: &'static str, architecture: &'static str, content: &str) -> TestLayer {
        TestLayer {
            name,
            architecture,
            bytes: format!("{content} {name}").into_bytes(),
        }
    }

    fn code_sha256(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&self.bytes))
    }
}

/// Returns the two small layers most tests publish.
fn two_layers(content: &str) -> Vec<TestLayer> {
    vec![
        TestLayer::small("php-82", "x86_64", content),
        TestLayer::small("arm-php-82", "arm64", content),
    ]
}

/// Writes the zips and their manifest. `tested` records a passed
/// acceptance test for each, as `cargo xtask test` does.
fn write_dist(dir: &Path, layers: &[TestLayer], tested: bool) {
    let mut entries = Vec::new();
    for layer in layers {
        let zip = format!("{}.zip", layer.name);
        fs::write(dir.join(&zip), &layer.bytes).unwrap();
        let sha256: String = Sha256::digest(&layer.bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut entry = json!({
            "name": layer.name, "kind": "function", "architecture": layer.architecture, "php_version": "8.2.32",
            "description": "PHP 8.2.32 for event-driven Lambda functions",
            "compatible_runtimes": ["provided.al2023"], "compatible_architectures": [layer.architecture],
            "glibc_max": "2.34", "ld_library_path": "", "loader": "", "zip": zip,
            "sha256": sha256, "code_sha256": layer.code_sha256(),
            "zip_bytes": layer.bytes.len(), "unzipped_bytes": layer.bytes.len(),
            "modules": {"php": [], "zend": []}, "disabled_extensions": {}, "libraries": [],
        });
        if tested {
            entry["acceptance"] = json!({"zip_sha256": sha256, "passed_at": "2026-12-05T00:00:00Z"});
        }
        entries.push(entry);
    }
    fs::write(dir.join("manifest.json"), json!({ "layers": entries }).to_string()).unwrap();
}

/// The test credentials, which must never appear in the task's output.
fn test_credentials() -> [(&'static str, &'static str); 2] {
    [("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY)]
}

/// Runs `cargo xtask publish` against `endpoint` with test credentials and
/// none of the user's AWS configuration, and checks that the credentials
/// appear nowhere in its output.
fn publish(endpoint: &str, dist: &Path, extra: &[&str]) -> Output {
    let mut command = xtask("publish");
    aim_at_emulator(&mut command, endpoint, dist);
    let output = command
        .args(extra)
        .envs(test_credentials())
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let all = text(&output);
    assert!(!all.contains(SECRET_KEY), "the secret key was printed:\n{all}");
    assert!(!all.contains(ACCESS_KEY), "the access key id was printed:\n{all}");
    output
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn table(dist: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(dist.join("layers.json")).unwrap()).unwrap()
}

/// Returns an error response with `status` and the AWS error type.
fn injected(status: u16, error_type: &str, retry_after: Option<u32>) -> Fault {
    Fault::Status {
        status,
        error_type: error_type.to_string(),
        message: format!("injected {status}"),
        retry_after,
    }
}

/// Returns the result line of `layer` in `region` in the summary table.
fn summary_line(output: &Output, layer: &str, region: &str) -> String {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| {
            let mut words = line.split_whitespace();
            words.next() == Some(layer) && words.next() == Some(region)
        })
        .unwrap_or_else(|| panic!("no summary line for {layer} in {region}:\n{}", text(output)))
        .to_string()
}

fn writes(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .filter(|record| !record.is_read())
        .map(|record| format!("{} {}", record.method, record.path))
        .collect()
}

#[test]
#[ignore = "needs moto: run `cargo xtask test`"]
fn publish_is_idempotent_across_regions() {
    let moto = start_moto();
    let proxy = FaultProxy::start(moto.address(), Duration::ZERO).unwrap();
    let dist = tempfile::tempdir().unwrap();
    write_dist(dist.path(), &two_layers("first"), true);
    let regions = ["--regions", "us-east-1,eu-west-3"];

    // A dry run makes read requests only, and writes no table.
    let dry = publish(&proxy.endpoint(), dist.path(), &[regions[0], regions[1], "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert_eq!(
        String::from_utf8_lossy(&dry.stdout)
            .matches("would publish (first version)")
            .count(),
        4,
        "{}",
        text(&dry)
    );
    assert_eq!(writes(&proxy.requests()), Vec::<String>::new(), "the dry run wrote");
    assert!(!proxy.requests().is_empty(), "the dry run made no request at all");
    assert!(!dist.path().join("layers.json").exists(), "a dry run wrote layers.json");

    let first = publish(&proxy.endpoint(), dist.path(), &regions);
    assert!(first.status.success(), "{}", text(&first));
    assert_eq!(
        table(dist.path()),
        json!({"php-82": {"us-east-1": 1, "eu-west-3": 1}, "arm-php-82": {"us-east-1": 1, "eu-west-3": 1}})
    );
    for region in ["us-east-1", "eu-west-3"] {
        for layer in two_layers("first") {
            assert_eq!(versions(&moto, region, layer.name), [(1, layer.code_sha256())]);
            assert!(is_public(&moto, region, layer.name, 1), "{} in {region}", layer.name);
        }
    }

    // Nothing changed: one read per layer and region, no write.
    proxy.clear_requests();
    let second = publish(&proxy.endpoint(), dist.path(), &regions);
    assert!(second.status.success(), "{}", text(&second));
    assert_eq!(
        String::from_utf8_lossy(&second.stdout)
            .matches("up to date (version 1)")
            .count(),
        4,
        "{}",
        text(&second)
    );
    let requests = proxy.requests();
    assert_eq!(writes(&requests), Vec::<String>::new());
    assert_eq!(requests.len(), 4, "{requests:?}");

    // New content: version 2 where asked, and the table follows.
    write_dist(dist.path(), &two_layers("second"), true);
    let third = publish(
        &proxy.endpoint(),
        dist.path(),
        &["--regions", "us-east-1", "--arch", "x86_64"],
    );
    assert!(third.status.success(), "{}", text(&third));
    let table = table(dist.path());
    assert_eq!(table["php-82"]["us-east-1"], 2);
    assert_eq!(table["php-82"]["eu-west-3"], 1, "a region not touched keeps its entry");
    assert_eq!(
        table["arm-php-82"]["us-east-1"], 1,
        "a layer not selected keeps its entry"
    );
    assert!(is_public(&moto, "us-east-1", "php-82", 2));
}

#[test]
#[ignore = "needs moto: run `cargo xtask test`"]
fn publish_survives_injected_faults() {
    let moto = start_moto();
    let proxy = FaultProxy::start(moto.address(), Duration::ZERO).unwrap();
    let dist = tempfile::tempdir().unwrap();
    let layers = two_layers("faults");
    write_dist(dist.path(), &layers, true);
    let rule = |method: &str, path: &str, region: &str, fault: Fault, times: usize| Rule {
        matcher: Match {
            method: Some(method.to_string()),
            path_contains: Some(path.to_string()),
            region: Some(region.to_string()),
            service: Some("lambda".to_string()),
        },
        fault,
        times,
    };
    // Throttled reads, asking for a one-second wait.
    proxy.add_rule(rule(
        "GET",
        "/layers/php-82/versions",
        "us-east-1",
        injected(429, "TooManyRequestsException", Some(1)),
        2,
    ));
    // Server errors on publishing.
    proxy.add_rule(rule(
        "POST",
        "/layers/arm-php-82/versions",
        "us-east-1",
        injected(503, "ServiceException", None),
        1,
    ));
    proxy.add_rule(rule(
        "POST",
        "/layers/php-82/versions",
        "eu-west-3",
        injected(500, "ServiceException", None),
        1,
    ));
    // A connection reset before moto receives the upload.
    proxy.add_rule(rule("POST", "/layers/php-82/versions", "us-east-1", Fault::Reset, 1));
    // Moto publishes, and the response is lost: a retry must not publish again.
    proxy.add_rule(rule(
        "POST",
        "/layers/arm-php-82/versions",
        "eu-west-3",
        Fault::DropResponse,
        1,
    ));
    proxy.add_rule(rule(
        "POST",
        "/layers/php-82/versions",
        "ap-south-1",
        Fault::DropResponse,
        1,
    ));
    // A body that stops halfway, until the attempt times out.
    proxy.add_rule(rule(
        "GET",
        "/layers/arm-php-82/versions",
        "ap-south-1",
        Fault::StallBody,
        1,
    ));
    // The permission fails on every attempt: the pair fails, and the next
    // run must still make the version public.
    proxy.add_rule(rule(
        "POST",
        "/layers/arm-php-82/versions/1/policy",
        "ap-south-1",
        injected(500, "ServiceException", None),
        100,
    ));
    // An opt-in region the account has not enabled.
    proxy.add_rule(Rule {
        matcher: Match {
            region: Some("ap-east-1".to_string()),
            ..Match::default()
        },
        fault: injected(403, "UnrecognizedClientException", None),
        times: 1000,
    });

    let regions = "us-east-1,eu-west-3,ap-south-1,ap-east-1,moon-1";
    let first = publish(
        &proxy.endpoint(),
        dist.path(),
        &["--regions", regions, "--timeout", "3"],
    );
    assert!(!first.status.success(), "{}", text(&first));
    let good = ["us-east-1", "eu-west-3", "ap-south-1"];
    for region in good {
        for layer in &layers {
            assert_eq!(
                versions(&moto, region, layer.name),
                [(1, layer.code_sha256())],
                "{} in {region}:\n{}",
                layer.name,
                text(&first)
            );
        }
    }
    for layer in ["php-82", "arm-php-82"] {
        let line = summary_line(&first, layer, "us-east-1");
        assert!(line.contains("published (version 1)"), "{line}");
        let line = summary_line(&first, layer, "ap-east-1");
        assert!(line.contains("opt-in region"), "{line}");
        assert!(line.contains("not enabled"), "{line}");
        let line = summary_line(&first, layer, "moon-1");
        assert!(line.contains("unknown region \"moon-1\""), "{line}");
    }
    let line = summary_line(&first, "arm-php-82", "ap-south-1");
    assert!(line.contains("failed"), "{line}");
    assert!(line.contains("ServiceException"), "{line}");
    // Retries are counted in the summary: 2 throttles + 1 reset.
    let line = summary_line(&first, "php-82", "us-east-1");
    assert_eq!(line.split_whitespace().nth(2), Some("3"), "{line}");

    // The throttled read waited for its Retry-After.
    let requests = proxy.requests();
    let throttled: Vec<&Record> = requests
        .iter()
        .filter(|record| {
            record.method == "GET"
                && record.path.contains("/layers/php-82/versions")
                && record.region.as_deref() == Some("us-east-1")
        })
        .collect();
    assert!(throttled.len() >= 3, "{throttled:?}");
    assert_eq!(throttled[0].status, Some(429));
    assert!(
        throttled[1].received.duration_since(throttled[0].received) >= Duration::from_secs(1),
        "{throttled:?}"
    );
    let faults: Vec<&str> = requests.iter().filter_map(|record| record.fault.as_deref()).collect();
    for expected in ["reset", "drop_response", "stall_body"] {
        assert!(faults.iter().any(|fault| fault.contains(expected)), "{faults:?}");
    }

    let table = self::table(dist.path());
    assert_eq!(table["php-82"].as_object().unwrap().len(), 3, "{table}");
    assert!(table["arm-php-82"].get("ap-south-1").is_none(), "{table}");
    assert!(!is_public(&moto, "ap-south-1", "arm-php-82", 1));

    // Without faults, a second run publishes nothing new and finishes the
    // permission the first run could not add.
    let proxy_again = FaultProxy::start(moto.address(), Duration::ZERO).unwrap();
    let second = publish(
        &proxy_again.endpoint(),
        dist.path(),
        &["--regions", "us-east-1,eu-west-3,ap-south-1", "--json"],
    );
    assert!(second.status.success(), "{}", text(&second));
    let summary: Value =
        serde_json::from_slice(&second.stdout).unwrap_or_else(|error| panic!("{error}\n{}", text(&second)));
    assert_eq!(summary["failed"], 0);
    assert_eq!(summary["up_to_date"], 5);
    assert_eq!(summary["made_public"], 1);
    let pairs = summary["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 6, "{summary}");
    for pair in pairs {
        let expected = if pair["layer"] == "arm-php-82" && pair["region"] == "ap-south-1" {
            "made-public"
        } else {
            "up-to-date"
        };
        assert_eq!(pair["result"], expected, "{summary}");
        assert_eq!(pair["version"], 1, "{summary}");
    }
    assert_eq!(
        writes(&proxy_again.requests()),
        ["POST /2018-10-31/layers/arm-php-82/versions/1/policy"]
    );
    assert!(is_public(&moto, "ap-south-1", "arm-php-82", 1));
    for region in good {
        for layer in &layers {
            assert_eq!(versions(&moto, region, layer.name).len(), 1);
        }
    }
}

#[test]
#[ignore = "needs moto: run `cargo xtask test`"]
fn publish_rejects_untested_zips() {
    let moto = start_moto();
    let proxy = FaultProxy::start(moto.address(), Duration::ZERO).unwrap();
    let dist = tempfile::tempdir().unwrap();
    write_dist(dist.path(), &two_layers("untested"), false);
    let output = publish(&proxy.endpoint(), dist.path(), &["--regions", "us-east-1"]);
    assert!(!output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no acceptance test has passed") && stderr.contains("--skip-tests-check"),
        "{}",
        text(&output)
    );
    assert!(proxy.requests().is_empty(), "requests before the check");

    let skipped = publish(
        &proxy.endpoint(),
        dist.path(),
        &[
            "--regions",
            "us-east-1",
            "--skip-tests-check",
            "--private",
            "--layer-prefix",
            "acme-",
        ],
    );
    assert!(skipped.status.success(), "{}", text(&skipped));
    assert_eq!(versions(&moto, "us-east-1", "acme-php-82").len(), 1);
    assert!(
        !is_public(&moto, "us-east-1", "acme-php-82", 1),
        "--private made it public"
    );
    assert!(
        !dist.path().join("layers.json").exists(),
        "a private run wrote the table"
    );

    // A dry run reports that the public run would make it public, and
    // makes no write.
    proxy.clear_requests();
    let acme = [
        "--regions",
        "us-east-1",
        "--skip-tests-check",
        "--layer-prefix",
        "acme-",
    ];
    let dry = publish(&proxy.endpoint(), dist.path(), &[&acme[..], &["--dry-run"]].concat());
    assert!(dry.status.success(), "{}", text(&dry));
    let line = summary_line(&dry, "acme-php-82", "us-east-1");
    assert!(line.contains("up to date (version 1), would make public"), "{line}");
    assert_eq!(writes(&proxy.requests()), Vec::<String>::new());

    // A public run makes the private version public without a new one.
    let public = publish(&proxy.endpoint(), dist.path(), &acme);
    assert!(public.status.success(), "{}", text(&public));
    assert!(summary_line(&public, "acme-php-82", "us-east-1").contains("up to date (version 1)"));
    assert!(is_public(&moto, "us-east-1", "acme-php-82", 1));
}

#[test]
#[ignore = "needs moto: run `cargo xtask test`"]
fn publish_checks_content_of_unrecorded_versions() {
    let moto = start_moto();
    let proxy = FaultProxy::start(moto.address(), Duration::ZERO).unwrap();
    let dist = tempfile::tempdir().unwrap();
    let layers = two_layers("checked");
    write_dist(dist.path(), &layers, true);

    // A version whose description names the zip's digest, with other bytes.
    let description = format!(
        "PHP 8.2.32 for event-driven Lambda functions, sha256 {}",
        layers[0].code_sha256()
    );
    assert_eq!(
        publish_directly(&moto, "us-east-1", "php-82", b"other bytes", &description),
        1
    );
    // The first publish fails. The task then finds version 1, with the
    // digest in its description, but it existed before this run, so the
    // task publishes again.
    proxy.add_rule(Rule::new(
        Match::any()
            .with_method("POST")
            .with_path_contains("/layers/php-82/versions"),
        injected(500, "ServiceException", None),
        1,
    ));
    let output = publish(
        &proxy.endpoint(),
        dist.path(),
        &["--regions", "us-east-1", "--arch", "x86_64"],
    );
    assert!(output.status.success(), "{}", text(&output));
    let line = summary_line(&output, "php-82", "us-east-1");
    assert!(line.contains("published (version 2)"), "{line}");
    assert_eq!(line.split_whitespace().nth(2), Some("1"), "{line}");
    let found = versions(&moto, "us-east-1", "php-82");
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0], (2, layers[0].code_sha256()));
    assert!(
        !is_public(&moto, "us-east-1", "php-82", 1),
        "the wrong version was made public"
    );
}

#[test]
#[ignore = "needs the xtask binary: run `cargo xtask test`"]
fn publish_stops_before_any_request() {
    // Nothing listens upstream: the proxy records any request that the
    // task would make.
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], 9)), Duration::ZERO).unwrap();
    let dist = tempfile::tempdir().unwrap();
    write_dist(dist.path(), &two_layers("stops"), true);
    let run = |extra: &[&str], credentials: bool| {
        let mut command = xtask("publish");
        aim_at_emulator(&mut command, &proxy.endpoint(), dist.path());
        if credentials {
            command.envs(test_credentials());
        }
        command.args(extra).output().unwrap()
    };

    // No credentials: one message.
    let output = run(&["--regions", "us-east-1"], false);
    assert!(!output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.matches("no usable AWS credentials").count(),
        1,
        "{}",
        text(&output)
    );

    // A named profile wins over the keys in the environment.
    let output = run(&["--regions", "us-east-1", "--profile", "nosuch"], true);
    assert!(!output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("AWS profile \"nosuch\""), "{}", text(&output));

    // No known region.
    let output = run(&["--regions", "moon-1, ,"], true);
    assert!(!output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unknown region \"moon-1\": not found"),
        "{}",
        text(&output)
    );
    let output = run(&["--regions", ","], true);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--regions is empty"),
        "{}",
        text(&output)
    );

    assert!(proxy.requests().is_empty(), "{:?}", proxy.requests());
}

#[test]
#[ignore = "needs moto: run `cargo xtask test`"]
fn publish_gives_up_after_five_attempts() {
    let moto = start_moto();
    let proxy = FaultProxy::start(moto.address(), Duration::ZERO).unwrap();
    let dist = tempfile::tempdir().unwrap();
    write_dist(dist.path(), &two_layers("exhausted"), true);
    proxy.add_rule(Rule::new(
        Match::any()
            .with_method("POST")
            .with_path_contains("/layers/php-82/versions"),
        injected(500, "ServiceException", None),
        100,
    ));

    let output = publish(
        &proxy.endpoint(),
        dist.path(),
        &["--regions", "us-east-1", "--arch", "x86_64"],
    );
    assert!(!output.status.success(), "{}", text(&output));
    let line = summary_line(&output, "php-82", "us-east-1");
    assert!(line.contains("(after 5 attempts)"), "{line}");
    // Four retries follow the first attempt, with no wait after the last.
    assert_eq!(line.split_whitespace().nth(2), Some("4"), "{line}");

    let requests = proxy.requests();
    let posts: Vec<&Record> = requests.iter().filter(|record| record.method == "POST").collect();
    assert_eq!(posts.len(), 5, "{requests:?}");

    // After the last attempt, the task looks for a version it may have
    // made without a backoff, which would be 4 to 8 s.
    let last = requests.last().unwrap();
    assert_eq!(last.method, "GET", "{requests:?}");
    assert!(
        last.received.duration_since(posts[4].received) < Duration::from_secs(2),
        "{requests:?}"
    );
    assert!(versions(&moto, "us-east-1", "php-82").is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("1 of 1 layer and region pair failed. Run the task again"),
        "{stderr}"
    );
    assert!(
        !dist.path().join("layers.json").exists(),
        "a run where every pair failed wrote a table"
    );

    // Access denied is not retried, and the advice points at the policy.
    proxy.add_rule(Rule::new(
        Match::any()
            .with_method("POST")
            .with_path_contains("/layers/arm-php-82/versions"),
        injected(403, "AccessDeniedException", None),
        1,
    ));
    let denied = publish(
        &proxy.endpoint(),
        dist.path(),
        &["--regions", "us-east-1", "--arch", "arm64"],
    );
    assert!(!denied.status.success(), "{}", text(&denied));
    let line = summary_line(&denied, "arm-php-82", "us-east-1");
    assert_eq!(line.split_whitespace().nth(2), Some("0"), "{line}");
    assert!(line.contains("AccessDeniedException"), "{line}");
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("README.md lists the IAM policy"), "{stderr}");
}

#[test]
#[ignore = "needs moto: run `cargo xtask test`"]
fn publish_uploads_large_zips_through_s3() {
    let moto = start_moto();
    let proxy = FaultProxy::start(moto.address(), Duration::ZERO).unwrap();
    let dist = tempfile::tempdir().unwrap();
    // Over 50 MB, and not all one byte.
    let bytes: Vec<u8> = (0..51 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let layer = TestLayer {
        name: "php-82-fpm",
        architecture: "x86_64",
        bytes,
    };
    write_dist(dist.path(), std::slice::from_ref(&layer), true);

    let without_prefix = publish(&proxy.endpoint(), dist.path(), &["--regions", "eu-west-3"]);
    assert!(!without_prefix.status.success(), "{}", text(&without_prefix));
    assert!(
        String::from_utf8_lossy(&without_prefix.stderr).contains("--s3-bucket-prefix"),
        "{}",
        text(&without_prefix)
    );

    // A 503 on the first upload is retried.
    proxy.add_rule(Rule {
        matcher: Match {
            method: Some("PUT".to_string()),
            service: Some("s3".to_string()),
            path_contains: Some(".zip".to_string()),
            ..Match::default()
        },
        fault: injected(503, "SlowDown", None),
        times: 1,
    });
    let args = ["--regions", "eu-west-3,us-east-1", "--s3-bucket-prefix", "acme-layers"];
    let output = publish(&proxy.endpoint(), dist.path(), &args);
    assert!(output.status.success(), "{}", text(&output));
    for region in ["eu-west-3", "us-east-1"] {
        assert_eq!(versions(&moto, region, "php-82-fpm"), [(1, layer.code_sha256())]);
    }
    let requests = proxy.requests();
    let created: Vec<&Record> = requests
        .iter()
        .filter(|record| {
            let path = record.path.split('?').next().unwrap_or_default();
            record.method == "PUT" && path.trim_end_matches('/') == "/acme-layers-eu-west-3"
        })
        .collect();
    assert_eq!(created.len(), 1, "{requests:?}");
    let uploads = |requests: &[Record]| {
        requests
            .iter()
            .filter(|record| record.method == "PUT" && record.path.contains(".zip"))
            .map(|record| (record.fault.clone(), record.status))
            .collect::<Vec<_>>()
    };
    // The injected 503, then one upload per region.
    let mut seen = uploads(&requests);
    seen.sort();
    assert_eq!(
        seen,
        [
            (None, Some(200)),
            (None, Some(200)),
            (Some("status".to_string()), Some(503))
        ],
        "{requests:?}"
    );

    // Run again: the versions are up to date, so nothing is written.
    proxy.clear_requests();
    let again = publish(&proxy.endpoint(), dist.path(), &args);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(writes(&proxy.requests()), Vec::<String>::new());

    // With the version gone from Lambda, the task publishes again from
    // the object already in S3, without uploading it again.
    let (status, body) = moto
        .request("eu-west-3", "DELETE", "/2018-10-31/layers/php-82-fpm/versions/1", "")
        .unwrap();
    // Lambda returns 204 (its API reference for DeleteLayerVersion), and
    // moto returns 200.
    assert!(matches!(status, 200 | 204), "{status} {body}");
    assert_eq!(versions(&moto, "eu-west-3", "php-82-fpm"), []);
    proxy.clear_requests();
    let republished = publish(&proxy.endpoint(), dist.path(), &args);
    assert!(republished.status.success(), "{}", text(&republished));
    assert!(summary_line(&republished, "php-82-fpm", "eu-west-3").contains("published (version 2)"));
    assert!(
        String::from_utf8_lossy(&republished.stderr).contains("s3://acme-layers-eu-west-3/php-82-fpm/"),
        "{}",
        text(&republished)
    );
    assert_eq!(uploads(&proxy.requests()), [], "{:?}", proxy.requests());
}

#[test]
#[ignore = "needs moto: run `cargo xtask test`"]
fn publish_draws_bars_on_a_terminal() {
    let moto = start_moto();
    let proxy = FaultProxy::start(moto.address(), Duration::ZERO).unwrap();
    let dist = tempfile::tempdir().unwrap();
    write_dist(dist.path(), &two_layers("terminal"), true);
    let program = env::var(layer_tests::manifest::XTASK_VAR).expect("LAYERS_XTASK is not set: run `cargo xtask test`");
    let command_line = format!(
        "'{program}' publish --regions us-east-1,eu-west-3 --dry-run --endpoint-url {} --out-dir '{dir}' \
         --table '{dir}/layers.json'",
        proxy.endpoint(),
        dir = dist.path().display()
    );
    // script(1) runs the task on a pseudo-terminal, as a user's shell would.
    let mut command = Command::new("script");
    without_aws_configuration(&mut command);
    let output = command
        .args(["--quiet", "--return", "--command", &command_line, "/dev/null"])
        .env_remove("CI")
        .envs(test_credentials())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let terminal = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", text(&output));
    assert!(terminal.contains("2/2 regions"), "no finished bar:\n{terminal}");
    assert!(terminal.contains("2 would publish"), "no bar message:\n{terminal}");
    assert!(
        !terminal.contains("publish: php-82 in us-east-1"),
        "plain lines on a terminal:\n{terminal}"
    );
}
