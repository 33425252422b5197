//! The transformer: the state table's stream, filtered to `status = pending` → a plan per
//! opportunity (or synced at once when the plan is what Marketo already holds). Answers with
//! `batchItemFailures` for the records to deliver again.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    oppsync_lambda::serve(
        "transformer",
        |pipeline: std::sync::Arc<oppsync_lambda::TransformerPipeline>, event| async move {
            oppsync_lambda::transform(&pipeline, event.payload).await
        },
    )
    .await
}
