//! The poller: an EventBridge Scheduler event (every minute by default) → what changed in
//! Dynamics since the cursors, recorded as pending. Stops a minute before the invocation's
//! deadline with the cursors checkpointed; the next run continues.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use lambda_runtime::{Error, LambdaEvent, service_fn};
use oppsync_lambda::coldstart;
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    oppsync_lambda::init_logging();
    let pipeline = Arc::new(coldstart::from_process_env().await?);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let pipeline = pipeline.clone();
        async move {
            let deadline = instant_of(event.context.deadline());
            oppsync_lambda::poll(&pipeline, event.payload, deadline).await
        }
    }))
    .await
}

/// The invocation's deadline (wall clock) as a monotonic instant.
fn instant_of(deadline: SystemTime) -> Instant {
    let left = deadline.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
    Instant::now() + left
}
