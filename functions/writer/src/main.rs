//! The writer: the state table's stream, filtered to `status = ready`, batched so that a call
//! fills up to 300 records → Marketo. Records that failed retryably go back in
//! `batchItemFailures`; permanent failures are in the error ledger.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    oppsync_lambda::serve("writer", |pipeline, event| async move {
        oppsync_lambda::write(&pipeline, event.payload).await
    })
    .await
}
