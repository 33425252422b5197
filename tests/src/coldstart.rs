//! A cold start measured the way Lambda makes one: the function's binary started as a new
//! process against a local Lambda Runtime API, timed from the start to its first request for an
//! invocation (`GET …/invocation/next`: the end of init), with the secret fetch it logs (moto's
//! Secrets Manager) taken apart.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// The functions, by binary name.
pub const FUNCTIONS: [&str; 4] = ["poller", "transformer", "writer", "resync"];

/// One cold start.
#[derive(Debug, Clone, Copy)]
pub struct ColdStart {
    /// Process start to the first request for an invocation.
    pub init: Duration,
    /// The secret reads within it, as the function logged them.
    pub secrets: Duration,
}

impl ColdStart {
    /// Init without the secret fetch (the figure the budget of 100 ms is about).
    pub fn own(&self) -> Duration {
        self.init.saturating_sub(self.secrets)
    }
}

type Signal = Arc<Mutex<Option<oneshot::Sender<Result<(), String>>>>>;

fn fire(signal: &Signal, outcome: Result<(), String>) {
    if let Some(tx) = signal.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = tx.send(outcome);
    }
}

/// A Runtime API on loopback that tells when the function first asks for an invocation (and
/// then keeps it waiting), or reports an init error.
async fn runtime_api() -> (String, oneshot::Receiver<Result<(), String>>) {
    let (tx, rx) = oneshot::channel();
    let signal: Signal = Arc::new(Mutex::new(Some(tx)));
    let (next, error) = (signal.clone(), signal);
    let app = Router::new()
        .route(
            "/2018-06-01/runtime/invocation/next",
            get(move || {
                fire(&next, Ok(()));
                std::future::pending::<String>()
            }),
        )
        .route(
            "/2018-06-01/runtime/init/error",
            post(move |body: String| {
                fire(&error, Err(body));
                async { "" }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the runtime API");
    let address = listener.local_addr().expect("the runtime API's address").to_string();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (address, rx)
}

/// The environment a deployed function has (template.yaml), pointed at moto.
pub async fn environment(moto: &str) -> Vec<(String, String)> {
    let dynamics = crate::harness::secret(
        &json!({"url": "http://127.0.0.1:9", "tenantId": "00000000-0000-4000-8000-000000000000",
                "clientId": "00000000-0000-4000-8000-000000000001", "clientSecret": "s",
                "tokenUrl": "http://127.0.0.1:9/token"})
        .to_string(),
    )
    .await;
    let marketo =
        crate::harness::secret(&json!({"url": "http://127.0.0.1:9", "clientId": "c", "clientSecret": "s"}).to_string())
            .await;
    [
        ("STATE_TABLE", "oppsync-coldstart".to_owned()),
        ("DYNAMICS_SECRET_ARN", dynamics),
        ("MARKETO_SECRET_ARN", marketo),
        ("AWS_ENDPOINT_URL", moto.to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256".to_owned()),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".to_owned()),
        ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/oppsync".to_owned()),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "coldstart".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Starts `binary` once with `env` and measures its cold start.
pub async fn measure(binary: &Path, env: &[(String, String)]) -> Result<ColdStart, String> {
    let (address, ready) = runtime_api().await;
    let name = binary
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("function")
        .to_owned();
    let started = Instant::now();
    let mut child = Command::new(binary)
        .env_clear()
        .envs(env.iter().cloned())
        .env("AWS_LAMBDA_RUNTIME_API", &address)
        .env("AWS_LAMBDA_FUNCTION_NAME", &name)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let outcome = tokio::time::timeout(Duration::from_secs(30), ready).await;
    let init = started.elapsed();
    let _ = child.kill();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let logs = String::from_utf8_lossy(&output.stdout).into_owned();
    match outcome {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => return Err(format!("{name}: init failed: {error}\n{logs}")),
        _ => return Err(format!("{name}: no request for an invocation within 30 s\n{logs}")),
    }
    let logged = |message: &str, field: &str| {
        logs.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["fields"]["message"] == message)
            .and_then(|l| l["fields"][field].as_f64())
    };
    let secrets =
        logged("secrets read", "secrets_ms").ok_or_else(|| format!("{name}: no `secrets read` log line\n{logs}"))?;
    logged("cold start done", "init_ms").ok_or_else(|| format!("{name}: no `cold start done` log line\n{logs}"))?;
    Ok(ColdStart {
        init,
        secrets: Duration::from_secs_f64(secrets / 1000.0),
    })
}

/// Where a function's binary is: `DIR/<function>/bootstrap` (cargo lambda's layout) or
/// `DIR/<function>` (cargo's).
pub fn binary(dir: &Path, function: &str) -> PathBuf {
    let lambda = dir.join(function).join("bootstrap");
    if lambda.is_file() { lambda } else { dir.join(function) }
}
