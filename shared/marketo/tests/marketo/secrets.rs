//! The client secret and the access token never appear in logs, errors or Debug output.

use std::io::Write;
use std::sync::{Arc, Mutex};

use oppsync_marketo::Operation as E;
use oppsync_simulators::MarketoFault;

use crate::common::*;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_secret_or_token_reaches_the_logs_errors_or_debug_output() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let sim = sim(fast_config()).await;
    let client = client(&sim);
    // A run with every path that logs: a call, re-authentication, retries, a final error.
    client.sync_opportunities(&opportunities(2)).await.unwrap();
    sim.expire_tokens();
    sim.inject(E::OpportunitySync, 3, MarketoFault::Code("606"));
    client.sync_opportunities(&opportunities(2)).await.unwrap();
    for nth in 5..=10 {
        sim.inject(E::OpportunitySync, nth, MarketoFault::Code("611"));
    }
    let err = client.sync_opportunities(&opportunities(1)).await.unwrap_err();

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("retrying"), "the run must have logged something: {logs}");
    assert!(logs.contains("re-authenticating"));
    let secret = sim.client_secret();
    let outputs = [logs, err.to_string(), format!("{err:?}"), format!("{client:?}")];
    for text in &outputs {
        assert!(!text.contains(&secret), "the client secret leaked: {text}");
        assert!(!text.contains("sim-token"), "an access token leaked: {text}");
    }
}
