//! The ad hoc resync: invoked directly with `{"opportunityIds": [...], "dryRun": false}` or
//! `{"all": true}`; transforms and writes those records now, whatever their cursor or hash,
//! and returns a per-record report (the plan, what was written before, Marketo's answers).

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
        async move { oppsync_lambda::resync(&pipeline, event.payload).await }
    }))
    .await
}
