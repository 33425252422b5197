//! The poller: an EventBridge Scheduler event (every minute by default) → what changed in
//! Dynamics since the cursors, recorded as pending. Stops a minute before the invocation's
//! deadline with the cursors checkpointed; the next run continues.

use std::time::{Duration, Instant, SystemTime};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    oppsync_lambda::serve("poller", |pipeline, event| async move {
        let deadline = instant_of(event.context.deadline());
        oppsync_lambda::poll(&pipeline, event.payload, deadline).await
    })
    .await
}

/// The invocation's deadline (wall clock) as a monotonic instant.
fn instant_of(deadline: SystemTime) -> Instant {
    let left = deadline.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
    Instant::now() + left
}
