//! Each function cold-started as its own process against a local Lambda Runtime API: init
//! reaches the first request for an invocation, logging its secret fetch apart (the figures
//! are `cargo run -p oppsync-tests --bin coldstart`'s, in docs/PERFORMANCE.md).

use oppsync_tests::coldstart::{self, FUNCTIONS};
use oppsync_tests::harness::moto_endpoint;

/// cargo's output directory for this build (the suite runs from `target/<profile>/deps`).
fn binaries() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(|deps| deps.parent()).unwrap().to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_function_cold_starts_against_a_runtime_api_and_logs_its_secret_fetch_apart() {
    let env = coldstart::environment(&moto_endpoint()).await;
    for function in FUNCTIONS {
        let binary = coldstart::binary(&binaries(), function);
        assert!(
            binary.is_file(),
            "{} is not built: scripts/test builds the functions' binaries (`cargo build --workspace --bins`) before the tests",
            binary.display()
        );
        let measured = coldstart::measure(&binary, &env).await.unwrap();
        assert!(!measured.secrets.is_zero(), "{function}: {measured:?}");
        assert!(measured.init > measured.secrets, "{function}: {measured:?}");
    }
    // A function whose secret cannot be read reports an init error to the Runtime API.
    let mut broken = env.clone();
    broken.retain(|(k, _)| k != "MARKETO_SECRET_ARN");
    broken.push((
        "MARKETO_SECRET_ARN".into(),
        "arn:aws:secretsmanager:us-east-1:123456789012:secret:nope-AbCdEf".into(),
    ));
    let err = coldstart::measure(&coldstart::binary(&binaries(), "writer"), &broken)
        .await
        .unwrap_err();
    assert!(err.contains("init failed") && err.contains("Marketo"), "{err}");
}
