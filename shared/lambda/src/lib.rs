//! What the four Lambda functions share. Each function's `main` builds the pipeline once
//! ([`coldstart::from_process_env`]) and hands every event to one handler here; the handlers
//! are plain async functions that tests call with event JSON.

use std::time::{Duration, Instant};

use oppsync_mapping::OpportunityId;
use oppsync_pipeline::{Metrics, Pipeline, PipelineError, PollReport, ResyncReport, ResyncRequest};
use oppsync_state::{StateStore, Status};
use serde::{Deserialize, Serialize};
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

/// A DynamoDB stream event as Lambda delivers it (only the parts oppsync reads).
#[derive(Debug, Clone, Deserialize)]
pub struct StreamEvent {
    #[serde(rename = "Records")]
    pub records: Vec<StreamRecord>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StreamRecord {
    #[serde(rename = "eventName", default)]
    pub event_name: Option<String>,
    pub dynamodb: StreamData,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StreamData {
    #[serde(rename = "Keys", default)]
    pub keys: serde_json::Map<String, Value>,
    #[serde(rename = "NewImage", default)]
    pub new_image: Option<serde_json::Map<String, Value>>,
    #[serde(rename = "SequenceNumber")]
    pub sequence_number: String,
}

/// An opportunity a stream record asks to work on, with the record's sequence number (the
/// identifier Lambda takes back in `batchItemFailures`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamItem {
    pub id: OpportunityId,
    pub sequence_number: String,
}

impl StreamEvent {
    pub fn parse(payload: Value) -> Result<StreamEvent, HandlerError> {
        serde_json::from_value(payload).map_err(|e| HandlerError::BadEvent {
            expected: "a DynamoDB stream event ({\"Records\": [{\"dynamodb\": {...}}]})",
            problem: e.to_string(),
        })
    }

    /// The opportunities in `status`. Records of other statuses, other item kinds (cursors,
    /// counters, links) and removals are passed over: the event-source filter should already
    /// have dropped them, and they are not work for this function.
    pub fn items(&self, status: Status) -> Vec<StreamItem> {
        let mut out = Vec::new();
        for record in &self.records {
            if record.event_name.as_deref() == Some("REMOVE") {
                continue;
            }
            let Some(image) = &record.dynamodb.new_image else {
                continue;
            };
            let s = |v: Option<&Value>| v.and_then(|v| v.get("S")).and_then(Value::as_str).map(str::to_owned);
            if s(image.get("status")).as_deref() != Some(status.as_str()) {
                continue;
            }
            let key = s(record.dynamodb.keys.get("pk")).or_else(|| s(image.get("pk")));
            match key
                .as_deref()
                .and_then(|k| k.strip_prefix("opp#"))
                .map(OpportunityId::parse)
            {
                Some(Ok(id)) => out.push(StreamItem {
                    id,
                    sequence_number: record.dynamodb.sequence_number.clone(),
                }),
                Some(Err(_)) => {
                    tracing::error!(key = ?key, "a stream record whose key is not an opportunity id; skipped")
                }
                None => {}
            }
        }
        out
    }
}

/// Lambda's partial-batch response for stream consumers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BatchResponse {
    #[serde(rename = "batchItemFailures")]
    pub batch_item_failures: Vec<ItemFailure>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ItemFailure {
    #[serde(rename = "itemIdentifier")]
    pub item_identifier: String,
}

impl BatchResponse {
    /// Fails the records of the given opportunities (all deliveries of each).
    fn failing(items: &[StreamItem], ids: &[OpportunityId]) -> BatchResponse {
        BatchResponse {
            batch_item_failures: items
                .iter()
                .filter(|i| ids.contains(&i.id))
                .map(|i| ItemFailure {
                    item_identifier: i.sequence_number.clone(),
                })
                .collect(),
        }
    }
}

// ------------------------------------------------------------------ handlers

/// The transformer: a stream batch of pending records → plans.
pub async fn transform<S: StateStore>(pipeline: &Pipeline<S>, payload: Value) -> Result<BatchResponse, HandlerError> {
    let event = StreamEvent::parse(payload)?;
    let items = event.items(Status::Pending);
    let ids: Vec<OpportunityId> = items.iter().map(|i| i.id).collect();
    if ids.is_empty() {
        return Ok(BatchResponse::default());
    }
    let requests_before = pipeline.dataverse.requests();
    match pipeline.transform(&ids, false).await {
        Ok(report) => {
            let mut metrics = report.metrics;
            metrics.count("DataverseCalls", pipeline.dataverse.requests() - requests_before);
            emit(&metrics, "transformer", (pipeline.clock)());
            Ok(BatchResponse::default())
        }
        // Dataverse or the store failed for the whole batch: hand every record back.
        Err(e) if e.is_retryable() => {
            tracing::warn!(error = %e, records = ids.len(), "transform failed; the batch is handed back for retry");
            Ok(BatchResponse::failing(&items, &ids))
        }
        Err(e) => Err(e.into()),
    }
}

/// The writer: a stream batch of ready records → Marketo.
pub async fn write<S: StateStore>(pipeline: &Pipeline<S>, payload: Value) -> Result<BatchResponse, HandlerError> {
    let event = StreamEvent::parse(payload)?;
    let items = event.items(Status::Ready);
    let ids: Vec<OpportunityId> = items.iter().map(|i| i.id).collect();
    if ids.is_empty() {
        return Ok(BatchResponse::default());
    }
    match pipeline.write(&ids).await {
        Ok(report) => {
            emit(&report.metrics, "writer", (pipeline.clock)());
            let retry = report.retry();
            if let Some(stop) = &report.stopped {
                tracing::warn!(reason = %stop, "Marketo writes stopped; unfinished records stay ready");
            }
            Ok(BatchResponse::failing(&items, &retry))
        }
        Err(e) if e.is_retryable() => {
            tracing::warn!(error = %e, records = ids.len(), "write failed; the batch is handed back for retry");
            Ok(BatchResponse::failing(&items, &ids))
        }
        Err(e) => Err(e.into()),
    }
}

/// The poller: an EventBridge Scheduler event (its content is not needed) → pending records.
/// Stops `margin` before `deadline`, checkpointed, so a long backfill continues next run.
pub async fn poll<S: StateStore>(
    pipeline: &Pipeline<S>,
    payload: Value,
    deadline: Instant,
) -> Result<PollReport, HandlerError> {
    if !payload.is_object() {
        return Err(HandlerError::BadEvent {
            expected: "an EventBridge Scheduler event (a JSON object)",
            problem: format!("got {}", kind_of(&payload)),
        });
    }
    let margin = Duration::from_secs(60);
    let stop_at = deadline.checked_sub(margin).unwrap_or(deadline);
    let report = pipeline.poll(Some(stop_at)).await?;
    let mut metrics = Metrics::default();
    metrics.count("OpportunityChanges", report.opportunity_changes);
    metrics.count("ConnectionChanges", report.connection_changes);
    metrics.count("OpportunitiesMarkedPending", report.marked);
    metrics.count("OpportunitiesRequeued", report.requeued);
    metrics.count("DataverseCalls", report.dataverse_requests);
    emit(&metrics, "poller", (pipeline.clock)());
    tracing::info!(
        marked = report.marked,
        caught_up = report.caught_up,
        busy = report.busy,
        "poll finished"
    );
    Ok(report)
}

/// The resync function: `{"opportunityIds": [...], "dryRun": false}` or `{"all": true}`.
pub async fn resync<S: StateStore>(pipeline: &Pipeline<S>, payload: Value) -> Result<ResyncReport, HandlerError> {
    let bad = |problem: String| HandlerError::BadEvent {
        expected: r#"a resync request ({"opportunityIds": ["<guid>", ...], "dryRun": false} or {"all": true})"#,
        problem,
    };
    let request: ResyncRequest = serde_json::from_value(payload).map_err(|e| bad(e.to_string()))?;
    let target = request.target().map_err(bad)?;
    Ok(pipeline.resync(target, request.dry_run).await?)
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
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .without_time()
        .try_init();
}

/// Writes one embedded-metric-format line.
pub fn emit(metrics: &Metrics, function: &str, now_ms: i64) {
    if metrics.counts.is_empty() && metrics.millis.is_empty() {
        return;
    }
    println!("{}", metrics.emf(function, now_ms));
}
