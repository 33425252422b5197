//! The writer: the state table's stream, filtered to `status = ready`, batched so that a call
//! fills up to 300 records → Marketo. Records that failed retryably go back in
//! `batchItemFailures`; permanent failures are in the error ledger.

use std::sync::Arc;

use lambda_runtime::{Error, LambdaEvent, service_fn};
use oppsync_lambda::coldstart;
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    oppsync_lambda::init_logging();
    let pipeline = Arc::new(coldstart::from_process_env().await?);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let pipeline = pipeline.clone();
        async move { oppsync_lambda::write(&pipeline, event.payload).await }
    }))
    .await
}
