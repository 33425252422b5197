//! The real `resync` binary under a Lambda Runtime API of our own (the protocol Lambda speaks
//! to `provided.al2023` functions: GET the next invocation, POST its response or error): the
//! cold start reads the environment and both secrets (moto's Secrets Manager), invocations get
//! their reports back, a malformed one gets a NonRetryable error, and a cold start that cannot
//! read its secret reports an init error naming it.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::VecDeque;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use oppsync_simulators::dataverse::Mix;
use oppsync_tests::harness::{dynamics_secret, dynamo, marketo_secret, moto_endpoint, secret, sims};
use serde_json::{Value, json};

/// What the fake runtime holds: invocations to hand out, and what came back.
#[derive(Default)]
struct Runtime {
    queue: VecDeque<(String, Value)>,
    responses: Vec<(String, Value)>,
    errors: Vec<(String, Value)>,
    init_errors: Vec<Value>,
}

type Shared = Arc<Mutex<Runtime>>;

async fn api(State(rt): State<Shared>, method: Method, uri: Uri, body: Bytes) -> Response {
    let path = uri.path().trim_start_matches("/2018-06-01/runtime/");
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match (method, path) {
        (Method::GET, "invocation/next") => loop {
            // Long-poll, as Lambda does, until there is an invocation.
            let next = rt.lock().unwrap().queue.pop_front();
            if let Some((id, event)) = next {
                let deadline = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis()
                    + 900_000;
                let mut headers = HeaderMap::new();
                headers.insert("Lambda-Runtime-Aws-Request-Id", HeaderValue::from_str(&id).unwrap());
                headers.insert(
                    "Lambda-Runtime-Deadline-Ms",
                    HeaderValue::from_str(&deadline.to_string()).unwrap(),
                );
                headers.insert(
                    "Lambda-Runtime-Invoked-Function-Arn",
                    HeaderValue::from_static("arn:aws:lambda:us-east-1:123456789012:function:oppsync-resync"),
                );
                return (StatusCode::OK, headers, event.to_string()).into_response();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        },
        (Method::POST, "init/error") => {
            rt.lock().unwrap().init_errors.push(body);
            StatusCode::ACCEPTED.into_response()
        }
        (Method::POST, p) => {
            let mut parts = p.split('/');
            let (Some("invocation"), Some(id), Some(kind)) = (parts.next(), parts.next(), parts.next()) else {
                return StatusCode::NOT_FOUND.into_response();
            };
            let mut g = rt.lock().unwrap();
            match kind {
                "response" => g.responses.push((id.to_owned(), body)),
                _ => g.errors.push((id.to_owned(), body)),
            }
            StatusCode::ACCEPTED.into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn start_runtime(rt: Shared) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, Router::new().fallback(api).with_state(rt))
            .await
            .unwrap();
    });
    addr.to_string()
}

fn function(runtime: &str, env: &[(&str, String)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_resync"))
        .env_clear()
        .env("AWS_LAMBDA_RUNTIME_API", runtime)
        .env("AWS_LAMBDA_FUNCTION_NAME", "oppsync-resync")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "2026/11/30/[$LATEST]test")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/oppsync-resync")
        .env("AWS_ENDPOINT_URL", moto_endpoint())
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn wait_for(rt: &Shared, done: impl Fn(&Runtime) -> bool) {
    let start = Instant::now();
    while !done(&rt.lock().unwrap()) {
        assert!(start.elapsed() < Duration::from_secs(60), "the function did not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_function_serves_invocations_over_the_runtime_api() {
    let sims = sims().await;
    let seeded = sims.dv.seed(5, 3, Mix::Uniform);
    let store = dynamo().await;
    let rt: Shared = Arc::default();
    let id = seeded.opportunities[1].clone();
    // One Marketo refuses for good: its failure is a record-level log line.
    let refused = seeded.opportunities[2].clone();
    sims.mk.skip_record(&refused, "1003", 10);
    rt.lock().unwrap().queue.extend([
        ("req-1".to_owned(), json!({"opportunityIds": [id], "dryRun": true})),
        ("req-2".to_owned(), json!({"opportunityIds": ["x') or true or ('"]})),
        ("req-3".to_owned(), json!({"opportunityIds": [id]})),
        ("req-4".to_owned(), json!({"opportunityIds": [refused]})),
    ]);
    let runtime = start_runtime(rt.clone()).await;
    let env = [
        ("STATE_TABLE", store.table().to_owned()),
        ("DYNAMICS_SECRET_ARN", secret(&dynamics_secret(&sims)).await),
        ("MARKETO_SECRET_ARN", secret(&marketo_secret(&sims)).await),
    ];
    let mut child = function(&runtime, &env);
    wait_for(&rt, |r| r.responses.len() + r.errors.len() == 4).await;
    child.kill().unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);

    let g = rt.lock().unwrap();
    assert!(g.init_errors.is_empty(), "{:?}", g.init_errors);
    let dry = &g.responses.iter().find(|(r, _)| r == "req-1").unwrap().1;
    assert_eq!(dry["dry_run"], json!(true));
    assert_eq!(dry["records"][0]["id"], json!(id));
    let (_, error) = g.errors.iter().find(|(r, _)| r == "req-2").unwrap();
    assert_eq!(error["errorType"], "NonRetryable", "{error}");
    assert!(
        error["errorMessage"].as_str().unwrap().contains("not opportunity ids"),
        "{error}"
    );
    let written = &g.responses.iter().find(|(r, _)| r == "req-3").unwrap().1;
    assert_eq!(written["records"][0]["write"]["outcome"], "synced", "{written}");
    assert!(sims.mk.snapshot().opportunities.contains_key(&id), "written to Marketo");
    // Logs are JSON lines; each invocation also printed an embedded-metric line.
    let emf: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("_aws").is_some())
        .collect();
    assert!(!emf.is_empty(), "no EMF line in: {stdout}");
    assert_eq!(emf[0]["_aws"]["CloudWatchMetrics"][0]["Namespace"], "oppsync");
    assert_eq!(emf[0]["function"], "resync");
    let failed = &g.responses.iter().find(|(r, _)| r == "req-4").unwrap().1;
    assert_eq!(failed["records"][0]["write"]["outcome"], "failed", "{failed}");
    // Every log line is JSON; every line about one record names it in `opportunity`.
    let mut about_refused = 0;
    for line in stdout.lines() {
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for opportunity in [&id, &refused] {
            if value.get("_aws").is_none() && line.contains(opportunity.as_str()) {
                let named = value["fields"]["opportunity"]
                    .as_str()
                    .or(value["span"]["opportunity"].as_str());
                assert_eq!(
                    named,
                    Some(opportunity.as_str()),
                    "a record-level line without `opportunity`: {line}"
                );
                about_refused += usize::from(opportunity == &refused);
            }
        }
    }
    assert!(about_refused > 0, "the refused record was logged: {stdout}");
    let (_, _, dynamics_secret) = sims.dv.credentials();
    assert!(!stdout.contains(&dynamics_secret), "the Dynamics secret in the logs");
    assert!(
        !stdout.contains(&sims.mk.client_secret()),
        "the Marketo secret in the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_that_cannot_read_its_secret_reports_an_init_error_naming_it() {
    let sims = sims().await;
    let rt: Shared = Arc::default();
    let runtime = start_runtime(rt.clone()).await;
    let env = [
        ("STATE_TABLE", "oppsync-state".to_owned()),
        (
            "DYNAMICS_SECRET_ARN",
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:oppsync/missing-AbCdEf".to_owned(),
        ),
        ("MARKETO_SECRET_ARN", secret(&marketo_secret(&sims)).await),
    ];
    let child = function(&runtime, &env);
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(!output.status.success(), "the function must exit");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("Dynamics") && stdout.contains("oppsync/missing"),
        "{stdout}"
    );
    let g = rt.lock().unwrap();
    assert_eq!(g.init_errors.len(), 1, "{stdout}");
    assert!(g.init_errors[0].to_string().contains("Dynamics"), "{:?}", g.init_errors);
}
