//! The writer: the state table's stream, filtered to `status = ready` without a pending retry
//! wait, batched so that a call fills up to 300 records → Marketo. Stops a minute before the
//! invocation's deadline. A retryable failure waits in the state (backoff) until the poller's
//! sweep hands it back; permanent failures are in the error ledger.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    oppsync_lambda::serve(
        "writer",
        |pipeline: std::sync::Arc<oppsync_lambda::WriterPipeline>, event| async move {
            let deadline = oppsync_lambda::deadline_of(event.context.deadline());
            oppsync_lambda::write(&pipeline, event.payload, deadline).await
        },
    )
    .await
}
