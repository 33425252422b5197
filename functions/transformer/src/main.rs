//! The transformer: the state table's stream, filtered to `status = pending` → a plan per
//! opportunity (or synced at once when the plan is what Marketo already holds).

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
        async move { oppsync_lambda::transform(&pipeline, event.payload).await }
    }))
    .await
}
