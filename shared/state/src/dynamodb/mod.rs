//! The DynamoDB store: one table, every guard a conditional write.
//!
//! Items (partition key `pk` only):
//! - `opp#<id>`: one opportunity. `status` is what the Lambda stream filters match. `q` (the
//!   status, present only while pending, ready or failed) and `since` key the sparse index
//!   `open`, so the pending and failed views never scan the table.
//! - `cursor#<source>`, `lease#<name>`, `calls#<day>` (Marketo calls, atomic ADD),
//!   `done#<minute>` (completions, for throughput), `lock#<key>` (short-lived locks, removed by
//!   the table's TTL on `expire_at_s`), `run#<started>#<token>` (the run history, in the `open`
//!   index under `q = run`, removed by the TTL after `[sync] run_history_days`).
//!
//! Plans and written-role sets over 64 KB are stored deflated as Binary (`plan_z`, `written_z`; small ones as `plan_json`, `written_json`) to
//! stay well under the 400 KB item limit; one that is still over 350 KB compressed is refused
//! with [`StateError::TooLarge`] and the item is left as it was.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, ConditionCheck, DeleteRequest, GlobalSecondaryIndex,
    KeySchemaElement, KeyType, KeysAndAttributes, Projection, ProjectionType, Put, PutRequest, ReturnValue,
    ScalarAttributeType, Select, StreamSpecification, StreamViewType, TransactWriteItem, WriteRequest,
};
use oppsync_mapping::{OpportunityId, WrittenRole};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::{
    Claim, Completion, Counts, Cursor, Lease, MarkOutcome, Millis, OpportunityState, Page, PendingChange, Run, Source,
    StateError, StateStore, Status, SyncError, TransformResult, WriteResult, Written, minute_of, new_token,
};

type Item = HashMap<String, AttributeValue>;

mod codec;
mod lease;
mod ledger;
mod links;
mod store;
mod update;

use codec::*;
use update::Update;

/// The values of `awaits`, as the template's stream filters spell them.
pub const AWAITS_TRANSFORM: &str = "transform";
pub const AWAITS_WRITE: &str = "write";

/// The sparse index over open items.
pub const OPEN_INDEX: &str = "open";
/// The index partition of the run history (`q` of `run#…` items).
const RUN_QUEUE: &str = "run";
/// Blobs above this are stored deflated.
const COMPRESS_ABOVE: usize = 64 * 1024;
/// The most a stored blob may take, leaving room for the rest of the item under 400 KB.
pub const MAX_BLOB: usize = 350 * 1024;
/// Concurrent writes when recording many changes.
const MARK_CONCURRENCY: usize = 32;

/// The DynamoDB store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DynamoStore {
    client: Client,
    table: Arc<str>,
    /// Write requests sent (each billed, whether its condition held or not), for the
    /// performance report.
    writes: Arc<std::sync::atomic::AtomicU64>,
}

/// A request that hangs (a stalled connection, a server that stopped answering) is abandoned
/// and retried by the SDK after this long; a store call gives up after [`CALL_TIMEOUT`]. Without
/// them a batch's overlapped calls could wait forever on one stalled connection.
const ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

impl DynamoStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        let unbounded = client
            .config()
            .timeout_config()
            .is_none_or(|t| t.operation_attempt_timeout().is_none());
        let mut config = client.config().to_builder();
        // A client handed in without retries (a service config built by hand) gets the SDK's
        // standard ones: throttling and 5xx answers are retried with backoff before a store
        // call fails. An explicit choice, retries disabled included, is kept.
        if client.config().retry_config().is_none() {
            config = config.retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::standard());
        }
        if unbounded {
            config = config.timeout_config(
                aws_sdk_dynamodb::config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(CALL_TIMEOUT)
                    .build(),
            );
        }
        DynamoStore {
            client: Client::from_conf(config.build()),
            table: Arc::from(table.into()),
            writes: Arc::default(),
        }
    }

    /// Write requests this store (and its clones) has sent so far; a batch write counts once.
    pub fn write_requests(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_write(&self) {
        self.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A store using the default AWS configuration chain, optionally at another endpoint (a
    /// local DynamoDB-compatible server).
    pub async fn connect(table: &str, endpoint: Option<&str>) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(url) = endpoint {
            loader = loader.endpoint_url(url);
        }
        let config = loader.load().await;
        DynamoStore::new(Client::new(&config), table)
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table as `template.yaml` declares it (for tests and local servers); an
    /// existing table is left as it is.
    pub async fn create_table(&self) -> Result<(), StateError> {
        let attr = |name: &str, t: ScalarAttributeType| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(t)
                .build()
                .map_err(|e| StateError::Dynamo {
                    operation: "CreateTable",
                    message: e.to_string(),
                    retryable: false,
                })
        };
        let key = |name: &str, t: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(t)
                .build()
                .map_err(|e| StateError::Dynamo {
                    operation: "CreateTable",
                    message: e.to_string(),
                    retryable: false,
                })
        };
        let index = GlobalSecondaryIndex::builder()
            .index_name(OPEN_INDEX)
            .key_schema(key("q", KeyType::Hash)?)
            .key_schema(key("since", KeyType::Range)?)
            .projection(Projection::builder().projection_type(ProjectionType::All).build())
            .build()
            .map_err(|e| StateError::Dynamo {
                operation: "CreateTable",
                message: e.to_string(),
                retryable: false,
            })?;
        let result = self
            .client
            .create_table()
            .table_name(&*self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr("pk", ScalarAttributeType::S)?)
            .attribute_definitions(attr("q", ScalarAttributeType::S)?)
            .attribute_definitions(attr("since", ScalarAttributeType::N)?)
            .key_schema(key("pk", KeyType::Hash)?)
            .global_secondary_indexes(index)
            .stream_specification(
                StreamSpecification::builder()
                    .stream_enabled(true)
                    .stream_view_type(StreamViewType::NewImage)
                    .build()
                    .map_err(|e| StateError::Dynamo {
                        operation: "CreateTable",
                        message: e.to_string(),
                        retryable: false,
                    })?,
            )
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("ResourceInUseException") => Ok(()),
            Err(e) => Err(dynamo_err("CreateTable", e)),
        }
    }

    async fn update(
        &self,
        operation: &'static str,
        key: AttributeValue,
        update: &Update,
        condition: Option<&str>,
        returns: ReturnValue,
    ) -> Result<Option<Item>, StateError> {
        self.count_write();
        let mut request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", key)
            .update_expression(update.expression())
            .set_expression_attribute_values((!update.values.is_empty()).then(|| update.values.clone()))
            .return_values(returns);
        if let Some(c) = condition {
            request = request.condition_expression(c);
        }
        if update.expression().contains("#s") || condition.is_some_and(|c| c.contains("#s")) {
            request = request.expression_attribute_names("#s", "status");
        }
        match request.send().await {
            Ok(out) => Ok(Some(out.attributes.unwrap_or_default())),
            Err(e) if is_condition_failed(&e) => Ok(None),
            Err(e) => Err(dynamo_err(operation, e)),
        }
    }

    async fn mark_one(&self, change: &PendingChange, now: Millis) -> Result<MarkOutcome, StateError> {
        let mut u = Update::default();
        // A change applies when its version is newer; a deletion (a flag, its version kept) when
        // the record is not already deleted.
        let (version, condition) = if change.deleted {
            (
                "ver = if_not_exists(ver, :zero)",
                "attribute_not_exists(ver) OR attribute_not_exists(deleted) OR deleted = :no",
            )
        } else {
            ("ver = :v", "attribute_not_exists(ver) OR ver < :v")
        };
        u.status(Status::Pending)
            .set(version)
            .set("deleted = :d, attempts = :zero, updated = :now")
            .set("created = if_not_exists(created, :now)")
            // `psince` exists only while pending: a newer version of a pending item keeps its age.
            .set("psince = if_not_exists(psince, :now), since = if_not_exists(psince, :now)")
            .value(":d", AttributeValue::Bool(change.deleted))
            .value(":zero", n(0))
            .value(":now", n(now))
            .error(None)
            .remove("claim")
            .remove("claim_until")
            .remove("retry_at")
            .awaits(Some(AWAITS_TRANSFORM));
        if change.deleted {
            u.value(":no", AttributeValue::Bool(false));
        } else {
            u.value(":v", n(change.version));
        }
        match &change.modified_on {
            Some(m) => u.set("modon = :m").value(":m", s(m)),
            None => u.remove("modon"),
        };
        let done = self
            .update(
                "UpdateItem (mark pending)",
                opp_key(change.id),
                &u,
                Some(condition),
                ReturnValue::None,
            )
            .await?;
        Ok(if done.is_some() {
            MarkOutcome::Recorded
        } else {
            MarkOutcome::Stale
        })
    }

    async fn count_completion(&self, now: Millis) -> Result<(), StateError> {
        let mut u = Update::default();
        u.set("n = if_not_exists(n, :zero) + :one")
            .value(":zero", n(0))
            .value(":one", n(1));
        self.update(
            "UpdateItem (completions)",
            s(format!("done#{}", minute_of(now))),
            &u,
            None,
            ReturnValue::None,
        )
        .await?;
        Ok(())
    }

    /// Records `written` unless a newer write is recorded (used when a write claim was lost).
    async fn record_written(&self, id: OpportunityId, written: &Written) -> Result<(), StateError> {
        let mut u = Update::default();
        u.blob(
            encode_blob("written", json(written)?, "the written role set")?,
            "written_json",
            "written_z",
        )
        .set("wver = :wv")
        .value(":wv", n(written.version));
        self.update(
            "UpdateItem (record written)",
            opp_key(id),
            &u,
            Some("attribute_exists(pk) AND (attribute_not_exists(wver) OR wver <= :wv)"),
            ReturnValue::None,
        )
        .await?;
        Ok(())
    }

    async fn query_open(
        &self,
        status: Status,
        limit: i32,
        start: Option<Item>,
        count_only: bool,
    ) -> Result<(Vec<Item>, i64, Option<Item>), StateError> {
        let mut request = self
            .client
            .query()
            .table_name(&*self.table)
            .index_name(OPEN_INDEX)
            .key_condition_expression("q = :q")
            .expression_attribute_values(":q", s(status.as_str()))
            .scan_index_forward(true)
            .set_exclusive_start_key(start);
        if count_only {
            request = request.select(Select::Count);
        } else {
            request = request.limit(limit);
        }
        let out = request.send().await.map_err(|e| dynamo_err("Query (open index)", e))?;
        Ok((
            out.items.unwrap_or_default(),
            i64::from(out.count),
            out.last_evaluated_key,
        ))
    }
}
