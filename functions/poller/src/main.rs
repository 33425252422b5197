//! The poller: an EventBridge Scheduler event (every minute by default) → what changed in
//! Dynamics since the cursors, recorded as pending. Stops a minute before the invocation's
//! deadline with the cursors checkpointed; the next run continues.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    oppsync_lambda::serve(
        "poller",
        |pipeline: std::sync::Arc<oppsync_lambda::PollerPipeline>, event| async move {
            let deadline = oppsync_lambda::deadline_of(event.context.deadline());
            oppsync_lambda::poll(&pipeline, event.payload, deadline).await
        },
    )
    .await
}
