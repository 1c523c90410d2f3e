//! The runtimes shipped in the layers, run from each built layer's own PHP
//! against the Runtime API test server: the function runtime with the
//! handlers of `tests/php/runtime/`, and the FPM runtime with the HTTP
//! events of `tests/events/` through a real php-fpm.
//!
//! Like the other acceptance tests they need `cargo xtask test`.

use std::fs;
use std::time::Duration;

use layer_tests::manifest::workspace_root;
use layer_tests::runtime_api::{Invocation, Outcome, Recorded, RuntimeApi};
use layer_tests::sandbox::{Options, Spawned};
use layer_tests::{Layer, LayerRoot, Manifest};
use serde_json::{json, Value};

/// Long enough for PHP under qemu on a busy two-core machine.
const WAIT: Duration = Duration::from_secs(60);

fn layers(kind: &str) -> Vec<Layer> {
    let layers: Vec<Layer> = Manifest::load()
        .layers
        .into_iter()
        .filter(|layer| layer.kind == kind)
        .collect();
    assert!(!layers.is_empty(), "the manifest lists no {kind} layer");
    layers
}

/// Builds a layer's root with the test scripts in `/var/task`.
fn task_root(layer: &Layer) -> LayerRoot {
    let root =
        LayerRoot::new(layer).unwrap_or_else(|error| panic!("cannot build the test root of {}: {error:#}", layer.name));
    let scripts = workspace_root().join("tests/php/runtime");
    for entry in fs::read_dir(&scripts).unwrap() {
        let entry = entry.unwrap();
        root.add_task_file(&entry.file_name().to_string_lossy(), &fs::read(entry.path()).unwrap());
    }
    root
}

/// Starts /opt/bootstrap as Lambda would, with `handler` as `_HANDLER`.
fn start(root: &LayerRoot, api: &RuntimeApi, handler: Option<&str>) -> Spawned {
    let mut options = Options::network()
        .env("AWS_LAMBDA_RUNTIME_API", &api.address())
        .env("AWS_LAMBDA_FUNCTION_NAME", "php-test")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/php-test")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "2026/12/04/[$LATEST]0123456789abcdef");
    if let Some(handler) = handler {
        options = options.env("_HANDLER", handler);
    }
    root.spawn("/opt/bootstrap", &[], &options)
        .expect("cannot start the runtime")
}

/// Starts a Runtime API server and the layer's bootstrap serving it, in the layer's root.
fn serve(layer: &Layer, handler: &str) -> (LayerRoot, RuntimeApi, Spawned) {
    let root = task_root(layer);
    let api = RuntimeApi::start().unwrap();
    let runtime = start(&root, &api, Some(handler));
    (root, api, runtime)
}

fn response(outcome: Outcome, what: &str, runtime: &Spawned) -> Recorded {
    match outcome {
        Outcome::Response(recorded) => recorded,
        other => panic!(
            "{what}: expected a response, got {other:?}\n--- log ---\n{}",
            runtime.log()
        ),
    }
}

fn error(outcome: Outcome, what: &str, runtime: &Spawned) -> Recorded {
    match outcome {
        Outcome::Error(recorded) => recorded,
        other => panic!(
            "{what}: expected an error, got {other:?}\n--- log ---\n{}",
            runtime.log()
        ),
    }
}

fn invoke(api: &RuntimeApi, runtime: &Spawned, event: Value) -> Outcome {
    api.invoke(Invocation::json(&event), WAIT).unwrap_or_else(|error| {
        panic!(
            "invocation of {event} failed: {error:#}\n--- log ---\n{}",
            runtime.log()
        )
    })
}

/// Checks an error document and its header, and returns the document.
fn error_document(recorded: &Recorded, error_type: &str) -> Value {
    let document = recorded.json();
    assert_eq!(document["errorType"], error_type, "{document}");
    assert_eq!(
        recorded.header("lambda-runtime-function-error-type"),
        Some(error_type),
        "{document}"
    );
    assert!(document["errorMessage"].is_string(), "{document}");
    assert!(document["stackTrace"].is_array(), "{document}");
    document
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn function_runtime_passes_event_and_context() {
    for layer in layers("function") {
        let root = task_root(&layer);
        root.add_task_file("vendor/autoload.php", b"<?php define('TEST_AUTOLOADED', true);\n");
        let api = RuntimeApi::start().unwrap();
        let runtime = start(&root, &api, Some("handler.php"));

        let trace = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
        let invocation = Invocation::json(&json!({"action": "echo", "list": [1, 2.0, "three"]}))
            .with_timeout(Duration::from_secs(120))
            .with_trace_id(trace)
            .with_client_context(r#"{"client":{"installation_id":"abc"},"custom":{"k":"v"}}"#)
            .with_cognito_identity(
                r#"{"cognitoIdentityId":"us-east-1:1234","cognitoIdentityPoolId":"us-east-1:pool"}"#,
            );
        let request_id = invocation.request_id.clone();
        let recorded = response(api.invoke(invocation, WAIT).unwrap(), &layer.name, &runtime);
        let result = recorded.json();
        assert_eq!(
            result["event"],
            json!({"action": "echo", "list": [1, 2.0, "three"]}),
            "{}",
            layer.name
        );
        let context = &result["context"];
        assert_eq!(context["awsRequestId"], request_id.as_str());
        assert_eq!(
            context["invokedFunctionArn"],
            "arn:aws:lambda:us-east-1:123456789012:function:test"
        );
        assert_eq!(context["traceId"], trace);
        assert_eq!(context["clientContext"]["custom"]["k"], "v");
        assert_eq!(context["identity"]["cognitoIdentityId"], "us-east-1:1234");
        assert_eq!(context["functionName"], "php-test");
        assert_eq!(context["functionVersion"], "$LATEST");
        assert_eq!(context["memoryLimitInMb"], 1024);
        assert_eq!(context["logGroupName"], "/aws/lambda/php-test");
        let remaining = result["remainingTimeInMillis"].as_i64().unwrap();
        assert!(
            remaining > 60_000 && remaining <= 120_000,
            "remaining time {remaining} ms"
        );
        assert!(context["deadlineMs"].as_i64().unwrap() > 1_700_000_000_000);
        assert_eq!(result["traceEnv"], trace, "_X_AMZN_TRACE_ID");
        assert_eq!(result["autoloaded"], true, "vendor/autoload.php was not loaded");

        // What the handler prints goes to the log, not into the response.
        assert!(!recorded.text().contains("goes to the log"), "{}", recorded.text());
        assert!(
            runtime.wait_for_log("handler output goes to the log", WAIT),
            "{}",
            runtime.log()
        );
        assert!(
            runtime.wait_for_log("handler stderr goes to the log", WAIT),
            "{}",
            runtime.log()
        );

        // Without a trace id the previous one is not kept.
        let second = response(invoke(&api, &runtime, json!({"action": "echo"})), &layer.name, &runtime).json();
        assert_eq!(second["traceEnv"], false);
        assert_eq!(second["context"]["clientContext"], Value::Null);
        assert_eq!(
            second["pid"], result["pid"],
            "{}: one process serves both invocations",
            layer.name
        );
        api.assert_no_violations();
    }
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn function_runtime_reports_handler_errors() {
    for layer in layers("function") {
        let (_root, api, runtime) = serve(&layer, "handler.php");
        let first_pid = response(invoke(&api, &runtime, json!({"action": "pid"})), &layer.name, &runtime).json();

        // An exception: reported with its class, message and stack, and logged.
        let recorded = error(
            invoke(&api, &runtime, json!({"action": "throw"})),
            &layer.name,
            &runtime,
        );
        let document = error_document(&recorded, "DomainException");
        assert_eq!(document["errorMessage"], "the handler failed on purpose");
        let stack = document["stackTrace"].to_string();
        assert!(stack.contains("/var/task/handler.php"), "{stack}");
        assert!(
            runtime.wait_for_log("the handler failed on purpose", WAIT),
            "{}",
            runtime.log()
        );
        let pid = response(invoke(&api, &runtime, json!({"action": "pid"})), &layer.name, &runtime).json();
        assert_eq!(pid, first_pid, "{}: an exception must not restart PHP", layer.name);

        // An event that is not JSON.
        let outcome = api.invoke(Invocation::new("not json"), WAIT).unwrap();
        let recorded = error(outcome, &layer.name, &runtime);
        error_document(&recorded, "Runtime.InvalidEvent");

        // Results that cannot be sent.
        let cases = [
            ("large", "Function.ResponseSizeTooLarge", "6291456"),
            ("invalid-utf8", "Runtime.MarshalError", "$.items[1]"),
            ("nan", "Runtime.MarshalError", "Inf and NaN"),
        ];
        for (action, error_type, fragment) in cases {
            let recorded = error(invoke(&api, &runtime, json!({ "action": action })), action, &runtime);
            let document = error_document(&recorded, error_type);
            let message = document["errorMessage"].as_str().unwrap();
            assert!(message.contains(fragment), "{}: {action}: {message}", layer.name);
        }

        // Fatal errors end the process, so the next event gets a fresh one.
        let mut previous = first_pid;
        for (action, error_type, fragment) in [
            ("memory", "Runtime.PhpFatalError", "Allowed memory size"),
            ("exit", "Runtime.ExitError", "exit()"),
        ] {
            let recorded = error(invoke(&api, &runtime, json!({ "action": action })), action, &runtime);
            let document = error_document(&recorded, error_type);
            let message = document["errorMessage"].as_str().unwrap();
            assert!(message.contains(fragment), "{}: {action}: {message}", layer.name);
            let pid = response(invoke(&api, &runtime, json!({"action": "pid"})), action, &runtime).json();
            assert_ne!(pid, previous, "{}: {action}: PHP was not restarted", layer.name);
            previous = pid;
        }
        assert!(runtime.log().contains("Allowed memory size"), "{}", runtime.log());
        api.assert_no_violations();
    }
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn function_runtime_accepts_handler_object() {
    for layer in layers("function") {
        let (_root, api, runtime) = serve(&layer, "object-handler.php");
        let invocation = Invocation::json(&json!({"name": "object"}));
        let request_id = invocation.request_id.clone();
        let result = response(api.invoke(invocation, WAIT).unwrap(), &layer.name, &runtime).json();
        assert_eq!(result["handled"], json!({"name": "object"}), "{}", layer.name);
        assert_eq!(result["requestId"], request_id.as_str(), "{}", layer.name);
        api.assert_no_violations();
    }
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn function_runtime_reports_init_errors() {
    let cases = [
        (None, "Runtime.NoHandler", "_HANDLER is not set"),
        (
            Some("missing.php"),
            "Runtime.NoHandler",
            "/var/task/missing.php does not exist",
        ),
        (
            Some("not-callable.php"),
            "Runtime.InvalidHandler",
            "returns int, not a callable",
        ),
        (Some("syntax-error.php"), "ParseError", "syntax error"),
        (Some("redeclare.php"), "Runtime.PhpFatalError", "Cannot redeclare"),
    ];
    for layer in layers("function") {
        let root = task_root(&layer);
        for (handler, error_type, fragment) in cases {
            let what = format!("{} with _HANDLER={handler:?}", layer.name);
            let api = RuntimeApi::start().unwrap();
            let mut runtime = start(&root, &api, handler);
            let recorded = api
                .wait_init_error(WAIT)
                .unwrap_or_else(|error| panic!("{what}: {error:#}\n--- log ---\n{}", runtime.log()));
            let document = error_document(&recorded, error_type);
            let message = document["errorMessage"].as_str().unwrap();
            assert!(message.contains(fragment), "{what}: {message}");
            let code = runtime
                .wait_exit(WAIT)
                .unwrap_or_else(|| panic!("{what}: the runtime still runs"));
            assert_ne!(code, Some(0), "{what}: exit status");
            assert_eq!(api.polls(), 0, "{what}: asked for an event after an init error");
            assert!(
                runtime.log().contains(fragment),
                "{what}: not logged\n{}",
                runtime.log()
            );
            api.assert_no_violations();
        }
    }
}

/// Reads an HTTP event from `tests/events/`.
fn event(name: &str) -> Value {
    let path = workspace_root().join("tests/events").join(name);
    serde_json::from_slice(&fs::read(&path).unwrap()).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// Replaces the query string of an event, in the fields its format uses.
fn with_action(mut event: Value, action: &str) -> Value {
    if event.get("rawQueryString").is_some() {
        event["rawQueryString"] = json!(action);
        event.as_object_mut().unwrap().remove("queryStringParameters");
        return event;
    }
    let pairs: Vec<(&str, &str)> = action.split('&').filter_map(|pair| pair.split_once('=')).collect();
    if event.get("multiValueQueryStringParameters").is_some() {
        let map: serde_json::Map<String, Value> = pairs.iter().map(|(k, v)| (k.to_string(), json!([v]))).collect();
        event["multiValueQueryStringParameters"] = Value::Object(map);
    }
    if event.get("queryStringParameters").is_some() {
        let map: serde_json::Map<String, Value> = pairs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        event["queryStringParameters"] = Value::Object(map);
    }
    event
}

/// Returns the response headers as name → values, whatever the format.
fn response_headers(result: &Value) -> Vec<(String, Vec<String>)> {
    let mut headers = Vec::new();
    if let Some(map) = result["multiValueHeaders"].as_object() {
        for (name, values) in map {
            let values = values
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string());
            headers.push((name.clone(), values.collect()));
        }
    }
    if let Some(map) = result["headers"].as_object() {
        for (name, value) in map {
            headers.push((name.clone(), vec![value.as_str().unwrap().to_string()]));
        }
    }
    headers
}

fn header_values(result: &Value, name: &str) -> Vec<String> {
    response_headers(result)
        .into_iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case(name))
        .flat_map(|(_, values)| values)
        .collect()
}

/// One HTTP event format, what the script must see and what it returns.
struct HttpCase {
    file: &'static str,
    multi_value: bool,
    https: bool,
    port: &'static str,
    server_name: &'static str,
    /// The query string PHP receives.
    query: &'static str,
    /// `tag` values in $_GET: a repeated key keeps its last value in PHP.
    tag: &'static str,
    custom_header: &'static str,
}

const HTTP_CASES: &[HttpCase] = &[
    HttpCase {
        file: "api-gateway-rest.json",
        multi_value: true,
        https: true,
        port: "443",
        server_name: "abcdef1234.execute-api.us-east-1.amazonaws.com",
        query: "action=dump&tag=a&tag=b&filter.name=a%20b",
        tag: "b",
        custom_header: "first, second",
    },
    HttpCase {
        file: "http-api-v1.json",
        multi_value: true,
        https: true,
        port: "443",
        server_name: "abcdef1234.execute-api.us-east-1.amazonaws.com",
        query: "action=dump&tag=a&tag=b&filter.name=a%20b",
        tag: "b",
        custom_header: "first, second",
    },
    HttpCase {
        file: "http-api.json",
        multi_value: false,
        https: true,
        port: "443",
        server_name: "abcdef1234.execute-api.us-east-1.amazonaws.com",
        query: "action=dump&tag=a&tag=b&filter.name=a%20b",
        tag: "b",
        custom_header: "first,second",
    },
    HttpCase {
        file: "function-url.json",
        multi_value: false,
        https: true,
        port: "443",
        server_name: "k3gmvbx4xbrxqknpbx6mt3xrpa0oqdgq.lambda-url.us-east-1.on.aws",
        query: "action=dump&tag=a&tag=b&filter.name=a%20b",
        tag: "b",
        custom_header: "first,second",
    },
    HttpCase {
        file: "alb.json",
        multi_value: false,
        https: false,
        port: "80",
        server_name: "php-lambda-1234567890.us-east-1.elb.amazonaws.com",
        query: "action=dump&tag=b&filter.name=a%20b",
        tag: "b",
        custom_header: "second",
    },
    HttpCase {
        file: "alb-multi-value.json",
        multi_value: true,
        https: false,
        port: "80",
        server_name: "php-lambda-1234567890.us-east-1.elb.amazonaws.com",
        query: "action=dump&tag=a&tag=b&filter.name=a%20b",
        tag: "b",
        custom_header: "first, second",
    },
];

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn fpm_runtime_translates_http_events() {
    for layer in layers("fpm") {
        let (_root, api, runtime) = serve(&layer, "http.php");
        for case in HTTP_CASES {
            let what = format!("{}: {}", layer.name, case.file);
            let result = response(invoke(&api, &runtime, event(case.file)), &what, &runtime).json();

            // The response, in the event's format.
            assert_eq!(result["statusCode"], 200, "{what}: {result}");
            assert_eq!(result["isBase64Encoded"], false, "{what}");
            let v2 = matches!(case.file, "http-api.json" | "function-url.json");
            if v2 {
                assert_eq!(result["cookies"], json!(["first=1", "second=2"]), "{what}: {result}");
                assert_eq!(header_values(&result, "x-multi"), ["one, two"], "{what}");
            } else if case.multi_value {
                assert!(result.get("headers").is_none(), "{what}: {result}");
                assert_eq!(header_values(&result, "set-cookie"), ["first=1", "second=2"], "{what}");
                assert_eq!(header_values(&result, "x-multi"), ["one", "two"], "{what}");
            } else {
                assert!(result.get("multiValueHeaders").is_none(), "{what}: {result}");
                assert_eq!(header_values(&result, "x-multi"), ["two"], "{what}");
            }
            if case.file.starts_with("alb") {
                assert_eq!(result["statusDescription"], "200 OK", "{what}");
            } else {
                assert!(result.get("statusDescription").is_none(), "{what}");
            }
            assert_eq!(header_values(&result, "content-type"), ["application/json"], "{what}");

            // What the script saw.
            let seen: Value = serde_json::from_str(result["body"].as_str().unwrap())
                .unwrap_or_else(|error| panic!("{what}: {error}: {result}"));
            let server = &seen["server"];
            assert_eq!(server["REQUEST_METHOD"], "POST", "{what}");
            assert_eq!(server["QUERY_STRING"], case.query, "{what}");
            assert_eq!(server["REQUEST_URI"], format!("/hello/world?{}", case.query), "{what}");
            assert_eq!(server["PATH_INFO"], "/hello/world", "{what}");
            assert_eq!(server["SCRIPT_FILENAME"], "/var/task/http.php", "{what}");
            assert_eq!(server["SCRIPT_NAME"], "/http.php", "{what}");
            assert_eq!(server["REMOTE_ADDR"], "203.0.113.7", "{what}");
            assert_eq!(server["SERVER_NAME"], case.server_name, "{what}");
            assert_eq!(server["SERVER_PORT"], case.port, "{what}");
            assert_eq!(
                server["HTTPS"],
                if case.https { json!("on") } else { Value::Null },
                "{what}"
            );
            assert_eq!(server["CONTENT_TYPE"], "application/x-www-form-urlencoded", "{what}");
            assert_eq!(server["CONTENT_LENGTH"], "30", "{what}");
            assert_eq!(server["HTTP_X_CUSTOM"], case.custom_header, "{what}");
            assert_eq!(server["HTTP_ACCEPT"], "application/json", "{what}");
            // http-api.json also sends `proxy` and `x_custom`: neither may
            // reach PHP.
            assert_eq!(server["HTTP_PROXY"], Value::Null, "{what}");
            assert_eq!(seen["get"]["tag"], case.tag, "{what}");
            // PHP itself turns the dot of a key into an underscore.
            assert_eq!(seen["get"]["filter_name"], "a b", "{what}");
            assert_eq!(
                seen["post"],
                json!({"name": "Ada Lovelace", "language": "PHP"}),
                "{what}"
            );
            assert_eq!(seen["input"], "name=Ada+Lovelace&language=PHP", "{what}");
            assert_eq!(seen["cookies"], json!({"theme": "dark", "session": "abc123"}), "{what}");
            assert!(seen["context"]["awsRequestId"].is_string(), "{what}: {seen}");
            assert!(seen["requestContext"].is_object(), "{what}: {seen}");
        }
        api.assert_no_violations();
    }
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn fpm_runtime_answers_status_types_and_bodies() {
    for layer in layers("fpm") {
        let (_root, api, runtime) = serve(&layer, "http.php");
        for file in [
            "api-gateway-rest.json",
            "http-api-v1.json",
            "http-api.json",
            "function-url.json",
            "alb.json",
            "alb-multi-value.json",
        ] {
            let what = format!("{}: {file}", layer.name);
            let call = |action: &str| {
                response(
                    invoke(&api, &runtime, with_action(event(file), action)),
                    &what,
                    &runtime,
                )
                .json()
            };

            let result = call("action=status&code=404");
            assert_eq!(result["statusCode"], 404, "{what}");
            assert_eq!(result["body"], "status set", "{what}");
            if file.starts_with("alb") {
                assert_eq!(result["statusDescription"], "404 Not Found", "{what}");
            }

            let result = call("action=plain");
            assert_eq!(result["body"], "hello from php-fpm", "{what}");
            assert_eq!(
                header_values(&result, "content-type"),
                ["text/html; charset=UTF-8"],
                "{what}"
            );

            let result = call("action=binary");
            assert_eq!(result["isBase64Encoded"], true, "{what}: {result}");
            assert_eq!(result["body"], "iVBORw0KGgoAAf8=", "{what}");
            assert_eq!(header_values(&result, "content-type"), ["image/png"], "{what}");

            let result = call("action=latin1-header");
            assert_eq!(result["statusCode"], 200, "{what}: {result}");
            let disposition = header_values(&result, "content-disposition");
            assert_eq!(disposition, ["attachment; filename=\"caf\u{FFFD}.txt\""], "{what}");

            let result = call("action=empty");
            assert_eq!(result["statusCode"], 204, "{what}");
            assert_eq!(result["body"], "", "{what}");
        }
        api.assert_no_violations();
    }
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn fpm_runtime_recovers_from_failures() {
    for layer in layers("fpm") {
        let (_root, api, runtime) = serve(&layer, "http.php");
        let what = layer.name.as_str();
        let http = |action: &str| with_action(event("http-api.json"), action);
        let pid = |runtime: &Spawned| -> String {
            let result = response(invoke(&api, runtime, http("action=pid")), what, runtime).json();
            result["body"].as_str().unwrap().to_string()
        };
        let first_worker = pid(&runtime);

        // A fatal error in the script gives a 500 response and a log line.
        let result = response(invoke(&api, &runtime, http("action=fatal")), what, &runtime).json();
        assert_eq!(result["statusCode"], 500, "{what}: {result}");
        assert!(runtime.wait_for_log("Allowed memory size", WAIT), "{}", runtime.log());

        // A script running into the deadline fails its invocation, and
        // php-fpm is restarted.
        let invocation = Invocation::json(&http("action=sleep")).with_timeout(Duration::from_secs(4));
        let recorded = error(api.invoke(invocation, WAIT).unwrap(), what, &runtime);
        error_document(&recorded, "Runtime.FpmTimeout");
        let worker = pid(&runtime);
        assert_ne!(
            worker, first_worker,
            "{what}: php-fpm was not restarted after the timeout"
        );

        // A worker that dies fails its invocation. php-fpm's own log, which
        // reports the signal, reaches the function's log.
        let recorded = error(invoke(&api, &runtime, http("action=kill-worker")), what, &runtime);
        let document = error_document(&recorded, "Runtime.FpmUnavailable");
        assert!(
            document["errorMessage"]
                .as_str()
                .unwrap()
                .contains("closed the connection"),
            "{document}"
        );
        // The restart after the timeout killed a worker too: only this
        // worker's line proves the report.
        let report = format!("child {worker} exited on signal 9");
        assert!(runtime.wait_for_log(&report, WAIT), "{}", runtime.log());
        assert!(runtime.stdout().contains(&report), "{}", runtime.stdout());
        pid(&runtime);

        // php-fpm's master dies between two invocations: the next one
        // starts it again.
        let killed = response(invoke(&api, &runtime, http("action=kill-master")), what, &runtime).json();
        assert!(
            killed["body"].as_str().unwrap().starts_with("killed"),
            "{what}: {killed}"
        );
        pid(&runtime);
        let restarted = "php-fpm exited between two invocations";
        assert!(runtime.wait_for_log(restarted, WAIT), "{}", runtime.log());
        pid(&runtime);
        let log = runtime.log();
        assert_eq!(log.matches(restarted).count(), 1, "{log}");
        assert!(!log.contains("FPM initialization failed"), "{log}");

        // Results that cannot be sent, and events that are not HTTP.
        let recorded = error(invoke(&api, &runtime, http("action=large")), what, &runtime);
        error_document(&recorded, "Function.ResponseSizeTooLarge");
        let recorded = error(invoke(&api, &runtime, json!({"source": "aws.events"})), what, &runtime);
        let document = error_document(&recorded, "Runtime.InvalidEvent");
        assert!(
            document["errorMessage"].as_str().unwrap().contains("source"),
            "{document}"
        );
        pid(&runtime);
        api.assert_no_violations();
    }
}

#[test]
#[ignore = "needs built layers: run `cargo xtask test`"]
fn fpm_runtime_reports_init_errors() {
    for layer in layers("fpm") {
        let root = task_root(&layer);
        for (handler, fragment) in [(None, "_HANDLER is not set"), (Some("missing.php"), "does not exist")] {
            let what = format!("{} with _HANDLER={handler:?}", layer.name);
            let api = RuntimeApi::start().unwrap();
            let mut runtime = start(&root, &api, handler);
            let recorded = api
                .wait_init_error(WAIT)
                .unwrap_or_else(|error| panic!("{what}: {error:#}\n--- log ---\n{}", runtime.log()));
            let document = error_document(&recorded, "Runtime.NoHandler");
            assert!(
                document["errorMessage"].as_str().unwrap().contains(fragment),
                "{what}: {document}"
            );
            let code = runtime
                .wait_exit(WAIT)
                .unwrap_or_else(|| panic!("{what}: the runtime still runs"));
            assert_ne!(code, Some(0), "{what}");
            api.assert_no_violations();
        }
    }
}
