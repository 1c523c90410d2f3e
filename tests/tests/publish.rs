//! `cargo xtask publish` against moto, AWS's emulator, on 127.0.0.1.
//!
//! `cargo xtask test` installs moto and names its `moto_server` in
//! `LAYERS_MOTO_SERVER`. The zips are small ones made here: moto checks
//! nothing about their content.

use std::env;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use layer_tests::manifest::xtask;

/// moto_server on a free port of 127.0.0.1, stopped on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        let program = env::var("LAYERS_MOTO_SERVER").expect("LAYERS_MOTO_SERVER is not set: run `cargo xtask test`");
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start moto_server");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not listen on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, port }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// GETs a path of the Lambda API. moto does not check signatures, but
    /// reads the region from the Authorization header.
    fn get(&self, region: &str, path: &str) -> (u16, Value) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=test/20261204/{region}/lambda/aws4_request, SignedHeaders=host, Signature=0\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a dist directory with two small layers and their manifest.
fn write_dist(dir: &Path, content: &str) {
    let mut layers = Vec::new();
    for (name, architecture) in [("php-82", "x86_64"), ("arm-php-82", "arm64")] {
        let zip = format!("{name}.zip");
        let bytes = format!("{content} {name}").into_bytes();
        fs::write(dir.join(&zip), &bytes).unwrap();
        let digest = Sha256::digest(&bytes);
        layers.push(json!({
            "name": name, "kind": "function", "architecture": architecture, "php_version": "8.2.32",
            "description": "PHP 8.2.32 for event-driven Lambda functions",
            "compatible_runtimes": ["provided.al2023"], "compatible_architectures": [architecture],
            "glibc_max": "2.34", "ld_library_path": "", "loader": "", "zip": zip,
            "sha256": digest.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "code_sha256": base64::engine::general_purpose::STANDARD.encode(digest),
            "zip_bytes": bytes.len(), "unzipped_bytes": 0,
            "modules": {"php": [], "zend": []}, "disabled_extensions": {}, "libraries": [],
        }));
    }
    fs::write(dir.join("manifest.json"), json!({ "layers": layers }).to_string()).unwrap();
}

fn publish(moto: &Moto, dist: &Path, extra: &[&str]) -> Output {
    let output = xtask("publish")
        .arg("--endpoint-url")
        .arg(moto.endpoint())
        .arg("--out-dir")
        .arg(dist)
        .arg("--table")
        .arg(dist.join("layers.json"))
        .args(extra)
        // Test credentials only, and none of the user's AWS configuration.
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
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

#[test]
#[ignore = "needs moto: run `cargo xtask test`"]
fn publish_is_idempotent_across_regions() {
    let moto = Moto::start();
    let dist = tempfile::tempdir().unwrap();
    write_dist(dist.path(), "first");
    let regions = ["--regions", "us-east-1,eu-west-3"];

    // A dry run publishes nothing: the real run then starts at version 1.
    let dry = publish(&moto, dist.path(), &[regions[0], regions[1], "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert_eq!(
        String::from_utf8_lossy(&dry.stdout).matches("would publish").count(),
        4,
        "{}",
        text(&dry)
    );
    assert!(!dist.path().join("layers.json").exists(), "a dry run wrote layers.json");

    let first = publish(&moto, dist.path(), &regions);
    assert!(first.status.success(), "{}", text(&first));
    let table: Value = serde_json::from_str(&fs::read_to_string(dist.path().join("layers.json")).unwrap()).unwrap();
    assert_eq!(
        table,
        json!({"php-82": {"us-east-1": 1, "eu-west-3": 1}, "arm-php-82": {"us-east-1": 1, "eu-west-3": 1}})
    );
    let (status, policy) = moto.get("eu-west-3", "/2018-10-31/layers/php-82/versions/1/policy");
    assert_eq!(status, 200, "{policy}");
    let statement = policy["Policy"].as_str().unwrap_or_default();
    assert!(
        statement.contains("lambda:GetLayerVersion") && statement.contains("\"*\""),
        "{policy}"
    );

    // Nothing changed: nothing is published again.
    let second = publish(&moto, dist.path(), &regions);
    assert!(second.status.success(), "{}", text(&second));
    assert_eq!(
        String::from_utf8_lossy(&second.stdout).matches("up to date").count(),
        4,
        "{}",
        text(&second)
    );
    let (_, versions) = moto.get("us-east-1", "/2018-10-31/layers/php-82/versions");
    assert_eq!(
        versions["LayerVersions"].as_array().map(Vec::len),
        Some(1),
        "{versions}"
    );

    // New content: version 2 in each region, and the table follows.
    write_dist(dist.path(), "second");
    let third = publish(&moto, dist.path(), &["--regions", "us-east-1"]);
    assert!(third.status.success(), "{}", text(&third));
    let table: Value = serde_json::from_str(&fs::read_to_string(dist.path().join("layers.json")).unwrap()).unwrap();
    assert_eq!(table["php-82"]["us-east-1"], 2);
    assert_eq!(table["php-82"]["eu-west-3"], 1, "a region not touched keeps its entry");
}

#[test]
#[ignore = "needs moto: run `cargo xtask test`"]
fn publish_rejects_unknown_region() {
    let moto = Moto::start();
    let dist = tempfile::tempdir().unwrap();
    write_dist(dist.path(), "first");
    let output = publish(&moto, dist.path(), &["--regions", "us-east-1,moon-1"]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("unknown region moon-1"),
        "{}",
        text(&output)
    );
}
