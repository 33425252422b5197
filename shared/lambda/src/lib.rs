//! What the four Lambda functions share. Each function's `main` builds the pipeline once
//! ([`coldstart::from_process_env`]) and hands every event to one handler here; the handlers
//! are plain async functions that tests call with event JSON.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lambda_runtime::{LambdaEvent, service_fn};

use oppsync_dynamics::DataverseClient;
use oppsync_mapping::OpportunityId;
use oppsync_marketo::MarketoClient;
use oppsync_pipeline::{
    DataversePort, MarketoPort, Metrics, NoAccess, Pipeline, PipelineError, PollReport, ResyncReport, ResyncRequest,
    RunTimes,
};
use oppsync_state::{DynamoStore, StateStore, Status};
use serde::Serialize;
use serde_json::Value;

pub mod coldstart;

pub use coldstart::{ColdStartError, Env};

/// Why an invocation failed. `retryable` tells Lambda's error type (and the operator) whether
/// running it again may help.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("the event is not {expected}: {problem}")]
    BadEvent { expected: &'static str, problem: String },
    #[error("{0}")]
    Pipeline(#[from] PipelineError),
}

impl HandlerError {
    pub fn is_retryable(&self) -> bool {
        match self {
            HandlerError::BadEvent { .. } => false,
            HandlerError::Pipeline(e) => e.is_retryable(),
        }
    }

    /// The Lambda error type: `Retryable` or `NonRetryable`, so alarms and the operator can
    /// tell a blip from a fault.
    pub fn error_type(&self) -> &'static str {
        if self.is_retryable() {
            "Retryable"
        } else {
            "NonRetryable"
        }
    }
}

impl From<HandlerError> for lambda_runtime::Diagnostic {
    fn from(e: HandlerError) -> Self {
        lambda_runtime::Diagnostic {
            error_type: e.error_type().into(),
            error_message: e.to_string(),
        }
    }
}

// ------------------------------------------------------------------ events

/// A DynamoDB stream event as Lambda delivers it (`aws_lambda_events`' type).
pub type StreamEvent = aws_lambda_events::event::dynamodb::Event;
/// Lambda's partial-batch response for stream consumers (`aws_lambda_events`' type).
pub type BatchResponse = aws_lambda_events::streams::DynamoDbEventResponse;

/// An opportunity a stream record asks to work on, with the record's sequence number (the
/// identifier Lambda takes back in `batchItemFailures`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamItem {
    pub id: OpportunityId,
    pub sequence_number: String,
}

/// Parses a stream event at the edge, naming what was wrong.
pub fn parse_stream_event(payload: Value) -> Result<StreamEvent, HandlerError> {
    let bad = |problem: String| HandlerError::BadEvent {
        expected: "a DynamoDB stream event ({\"Records\": [{\"dynamodb\": {...}}]})",
        problem,
    };
    // What oppsync cannot work without, named before the typed parse: a record's `dynamodb`
    // and its SequenceNumber, by which a failed record is handed back to Lambda.
    if let Some(records) = payload.get("Records").and_then(Value::as_array) {
        for (i, record) in records.iter().enumerate() {
            match record.get("dynamodb") {
                Some(Value::Object(change)) if change.get("SequenceNumber").is_some_and(Value::is_string) => {}
                Some(Value::Object(_)) => {
                    return Err(bad(format!("record {i} has no dynamodb.SequenceNumber")));
                }
                _ => return Err(bad(format!("record {i} has no `dynamodb` object"))),
            }
        }
    }
    serde_json::from_value(payload).map_err(|e| bad(e.to_string()))
}

/// The opportunities in `status`. Records of other statuses, other item kinds (cursors,
/// counters, links) and removals are passed over: the event-source filter should already have
/// dropped them, and they are not work for this function.
pub fn stream_items(event: &StreamEvent, status: Status) -> Vec<StreamItem> {
    use serde_dynamo::AttributeValue;
    let text = |item: &serde_dynamo::Item, key: &str| match item.get(key) {
        Some(AttributeValue::S(s)) => Some(s.clone()),
        _ => None,
    };
    let mut out = Vec::new();
    for record in &event.records {
        let change = &record.change;
        if record.event_name == "REMOVE" || change.new_image.is_empty() {
            continue;
        }
        if text(&change.new_image, "status").as_deref() != Some(status.as_str()) {
            continue;
        }
        let key = text(&change.keys, "pk").or_else(|| text(&change.new_image, "pk"));
        match key
            .as_deref()
            .and_then(|k| k.strip_prefix("opp#"))
            .map(OpportunityId::parse)
        {
            Some(Ok(id)) => out.push(StreamItem {
                id,
                sequence_number: change.sequence_number.clone().unwrap_or_default(),
            }),
            Some(Err(_)) => tracing::error!(key = ?key, "a stream record whose key is not an opportunity id; skipped"),
            None => {}
        }
    }
    out
}

/// Fails the records of the given opportunities (all deliveries of each).
fn failing(items: &[StreamItem], ids: &[OpportunityId]) -> BatchResponse {
    let mut response = BatchResponse::default();
    response.batch_item_failures = items
        .iter()
        .filter(|i| ids.contains(&i.id))
        .map(|i| {
            let mut failure = aws_lambda_events::streams::DynamoDbBatchItemFailure::default();
            failure.item_identifier = Some(i.sequence_number.clone());
            failure
        })
        .collect();
    response
}

// ------------------------------------------------------------------ handlers

/// What a handler gives back: the response for Lambda, and the metrics the invocation
/// publishes (as one embedded-metric-format line, by [`serve`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Handled<T> {
    pub response: T,
    pub metrics: Metrics,
}

/// The transformer: a stream batch of pending records → plans.
pub async fn transform<S: StateStore, D: DataversePort, M: MarketoPort>(
    pipeline: &Pipeline<S, D, M>,
    payload: Value,
) -> Result<Handled<BatchResponse>, HandlerError> {
    let event = parse_stream_event(payload)?;
    let items = stream_items(&event, Status::Pending);
    let ids: Vec<OpportunityId> = items.iter().map(|i| i.id).collect();
    let mut metrics = Metrics::default();
    if ids.is_empty() {
        return Ok(Handled {
            response: BatchResponse::default(),
            metrics,
        });
    }
    let requests_before = pipeline.dataverse().requests();
    let started = pipeline.now();
    let result = pipeline.transform(&ids, false).await;
    metrics.count("DataverseCalls", pipeline.dataverse().requests() - requests_before);
    pipeline
        .record_outcome("transformer", started, &result, RunTimes::transform)
        .await;
    let response = match result {
        Ok(report) => {
            metrics.merge(report.metrics);
            BatchResponse::default()
        }
        // Dataverse or the store failed for the whole batch: hand every record back.
        Err(e) if e.is_retryable() => {
            tracing::warn!(error = %e, records = ids.len(), "transform failed; the batch is handed back for retry");
            failing(&items, &ids)
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Handled { response, metrics })
}

/// What each function reaches: the poller and the transformer read Dynamics only, the writer
/// writes Marketo only, resync does both. Each is given (and its role may read) only the
/// secrets of what it reaches.
pub type PollerPipeline = Pipeline<DynamoStore, DataverseClient, NoAccess>;
pub type TransformerPipeline = Pipeline<DynamoStore, DataverseClient, NoAccess>;
pub type WriterPipeline = Pipeline<DynamoStore, NoAccess, MarketoClient>;
pub type ResyncPipeline = Pipeline<DynamoStore, DataverseClient, MarketoClient>;

/// The writer: a stream batch of ready records → Marketo. Stops `margin` before `deadline`:
/// records not yet written wait for the next run. A record whose write failed retryably is not
/// handed back to Lambda (an immediate redelivery would retry it at once): it carries its
/// backoff in the state, and the poller's sweep hands it back when the wait ends.
pub async fn write<S: StateStore, D: DataversePort, M: MarketoPort>(
    pipeline: &Pipeline<S, D, M>,
    payload: Value,
    deadline: Instant,
) -> Result<Handled<BatchResponse>, HandlerError> {
    let event = parse_stream_event(payload)?;
    let items = stream_items(&event, Status::Ready);
    let ids: Vec<OpportunityId> = items.iter().map(|i| i.id).collect();
    if ids.is_empty() {
        return Ok(Handled {
            response: BatchResponse::default(),
            metrics: Metrics::default(),
        });
    }
    let stop_at = deadline.checked_sub(Duration::from_secs(60)).unwrap_or(deadline);
    let started = pipeline.now();
    let result = pipeline.write_until(&ids, Some(stop_at)).await;
    pipeline
        .record_outcome("writer", started, &result, RunTimes::write)
        .await;
    match result {
        Ok(report) => {
            if let Some(stop) = &report.stopped {
                tracing::warn!(reason = %stop, "Marketo writes stopped; unfinished records wait in the state");
            }
            Ok(Handled {
                response: BatchResponse::default(),
                metrics: report.metrics,
            })
        }
        // The store failed mid-batch (the claims were released): hand every record back.
        Err(e) if e.is_retryable() => {
            tracing::warn!(error = %e, records = ids.len(), "write failed; the batch is handed back for retry");
            Ok(Handled {
                response: failing(&items, &ids),
                metrics: Metrics::default(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// An invocation's deadline (wall clock, as the runtime gives it) as a monotonic instant.
pub fn deadline_of(deadline: std::time::SystemTime) -> Instant {
    let left = deadline
        .duration_since(std::time::SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Instant::now() + left
}

/// The poller: an EventBridge Scheduler event (its content is not needed) → pending records.
/// Stops `margin` before `deadline`, checkpointed, so a long backfill continues next run.
pub async fn poll<S: StateStore, D: DataversePort, M: MarketoPort>(
    pipeline: &Pipeline<S, D, M>,
    payload: Value,
    deadline: Instant,
) -> Result<Handled<PollReport>, HandlerError> {
    if !payload.is_object() {
        return Err(HandlerError::BadEvent {
            expected: "an EventBridge Scheduler event (a JSON object)",
            problem: format!("got {}", kind_of(&payload)),
        });
    }
    let margin = Duration::from_secs(60);
    let stop_at = deadline.checked_sub(margin).unwrap_or(deadline);
    let started = pipeline.now();
    let result = pipeline.poll(Some(stop_at)).await;
    // A poll another poller's lease turned away did nothing: not a run.
    if !result.as_ref().is_ok_and(|r| r.busy) {
        pipeline
            .record_outcome("poller", started, &result, RunTimes::poll)
            .await;
    }
    let report = result?;
    let mut metrics = Metrics::default();
    metrics.count("OpportunityChanges", report.opportunity_changes);
    metrics.count("ConnectionChanges", report.connection_changes);
    metrics.count("OpportunitiesMarkedPending", report.marked);
    metrics.count("OpportunitiesRequeued", report.requeued);
    metrics.count("DataverseCalls", report.dataverse_requests);
    tracing::info!(
        marked = report.marked,
        caught_up = report.caught_up,
        busy = report.busy,
        "poll finished"
    );
    Ok(Handled {
        response: report,
        metrics,
    })
}

/// The resync function: `{"opportunityIds": [...], "dryRun": false}`, `{"all": true}`,
/// `{"failed": true}` or `{"modifiedSince": "2026-11-01"}`.
pub async fn resync<S: StateStore, D: DataversePort, M: MarketoPort>(
    pipeline: &Pipeline<S, D, M>,
    payload: Value,
) -> Result<Handled<ResyncReport>, HandlerError> {
    let bad = |problem: String| HandlerError::BadEvent {
        expected: r#"a resync request ({"opportunityIds": ["<guid>", ...], "dryRun": false}, {"all": true}, {"failed": true} or {"modifiedSince": "YYYY-MM-DD"})"#,
        problem,
    };
    let request: ResyncRequest = serde_json::from_value(payload).map_err(|e| bad(e.to_string()))?;
    let target = request.target().map_err(bad)?;
    let started = pipeline.now();
    let result = pipeline.resync(target, request.dry_run).await;
    // A dry run changes nothing, so it is not a run of the sync.
    if !request.dry_run {
        pipeline
            .record_outcome("resync-function", started, &result, RunTimes::resync)
            .await;
    }
    let report = result?;
    let mut metrics = Metrics::default();
    metrics.count("OpportunitiesResynced", report.records.len() as u64);
    Ok(Handled {
        response: report,
        metrics,
    })
}

/// Tells the Lambda Runtime API why initialization failed, so the invocation's error names it
/// (instead of a bare "Runtime.ExitError"). Best effort: the process exits either way.
async fn report_init_error(e: &coldstart::ColdStartError) {
    let Ok(api) = std::env::var("AWS_LAMBDA_RUNTIME_API") else {
        return;
    };
    let body = serde_json::json!({"errorType": "NonRetryable", "errorMessage": e.to_string()});
    let sent = reqwest::Client::new()
        .post(format!("http://{api}/2018-06-01/runtime/init/error"))
        .header("Lambda-Runtime-Function-Error-Type", "Runtime.InitError")
        .json(&body)
        .send()
        .await;
    if let Err(e) = sent {
        tracing::warn!(error = %e, "could not report the init error to the runtime API");
    }
}

/// Runs a function: builds the pipeline once (cold start), then hands every event to
/// `handler` and publishes its metrics. What each `main` calls.
pub async fn serve<D, M, T, F, Fut>(function: &'static str, handler: F) -> Result<(), lambda_runtime::Error>
where
    D: coldstart::Access,
    M: coldstart::Access,
    T: Serialize,
    F: Fn(Arc<Pipeline<DynamoStore, D, M>>, LambdaEvent<Value>) -> Fut,
    Fut: Future<Output = Result<Handled<T>, HandlerError>>,
{
    let started = std::time::Instant::now();
    init_logging();
    let pipeline = match coldstart::from_process_env::<D, M>().await {
        Ok(p) => {
            tracing::info!(
                function,
                init_ms = started.elapsed().as_secs_f64() * 1000.0,
                "cold start done"
            );
            Arc::new(p)
        }
        Err(e) => {
            tracing::error!(error = %e, "cold start failed");
            report_init_error(&e).await;
            return Err(e.into());
        }
    };
    let handler = &handler;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let pipeline = pipeline.clone();
        async move {
            let now = pipeline.now();
            let handled = handler(pipeline, event).await?;
            emit(&handled.metrics, function, now);
            Ok::<T, HandlerError>(handled.response)
        }
    }))
    .await
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// ------------------------------------------------------------------ logs and metrics

/// JSON logs to stdout (CloudWatch), level from `RUST_LOG` (default info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing::subscriber::set_global_default(log_subscriber(filter, std::io::stdout));
}

/// The functions' log format: one JSON object a line, with the fields of the current span
/// (the step and, on record-level lines, `opportunity`). Tests capture it with their own writer.
pub fn log_subscriber<W>(filter: tracing_subscriber::EnvFilter, writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .without_time()
        .finish()
}

/// Writes one embedded-metric-format line.
pub fn emit(metrics: &Metrics, function: &str, now_ms: i64) {
    if metrics.counts.is_empty() && metrics.millis.is_empty() {
        return;
    }
    println!("{}", metrics.emf(function, now_ms));
}
