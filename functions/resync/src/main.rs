//! The ad hoc resync: invoked directly with `{"opportunityIds": [...], "dryRun": false}`,
//! `{"all": true}`, `{"failed": true}` (a replay of every failed record) or
//! `{"modifiedSince": "2026-11-01"}`; transforms and writes those records now, whatever their cursor or hash,
//! and returns a per-record report (the plan, what was written before, Marketo's answers).

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    oppsync_lambda::serve(
        "resync",
        |pipeline: std::sync::Arc<oppsync_lambda::ResyncPipeline>, event| async move {
            oppsync_lambda::resync(&pipeline, event.payload).await
        },
    )
    .await
}
