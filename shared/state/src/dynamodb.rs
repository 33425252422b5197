//! The DynamoDB store: one table, every guard a conditional write.
//!
//! Items (partition key `pk` only):
//! - `opp#<id>`: one opportunity. `status` is what the Lambda stream filters match. `q` (the
//!   status, present only while pending, ready or failed) and `since` key the sparse index
//!   `open`, so the pending and failed views never scan the table.
//! - `cursor#<source>`, `lease#<name>`, `calls#<day>` (Marketo calls, atomic ADD),
//!   `done#<minute>` (completions, for throughput).
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
    AttributeDefinition, AttributeValue, BillingMode, ConditionCheck, GlobalSecondaryIndex, KeySchemaElement, KeyType,
    KeysAndAttributes, Projection, ProjectionType, Put, PutRequest, ReturnValue, ScalarAttributeType, Select,
    StreamSpecification, StreamViewType, TransactWriteItem, WriteRequest,
};
use oppsync_mapping::OpportunityId;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::{
    Claim, Completion, Counts, Cursor, Lease, MarkOutcome, Millis, OpportunityState, Page, PendingChange, Source,
    StateError, StateStore, Status, SyncError, TransformResult, WriteResult, Written, minute_of, new_token,
};

type Item = HashMap<String, AttributeValue>;

/// The sparse index over open items.
pub const OPEN_INDEX: &str = "open";
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
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}
fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}
fn opp_key(id: OpportunityId) -> AttributeValue {
    s(format!("opp#{id}"))
}

fn dynamo_err<E, R>(operation: &'static str, e: SdkError<E, R>) -> StateError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = e.code().unwrap_or_default().to_owned();
    let retryable = matches!(
        e,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
    ) || matches!(
        code.as_str(),
        "ProvisionedThroughputExceededException"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "InternalServerError"
            | "ServiceUnavailable"
            | "TransactionConflictException"
    );
    // A service error says its code and message; the raw response adds nothing a user needs.
    let message = match (e.code(), e.message()) {
        (Some("ResourceNotFoundException"), _) => {
            "ResourceNotFoundException: the table does not exist here. Fix: check the table's name \
             (the stack's SyncStateTableName output) and the AWS region"
                .to_owned()
        }
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(&e).to_string(),
    };
    StateError::Dynamo {
        operation,
        message,
        retryable,
    }
}

fn is_condition_failed<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.code() == Some("ConditionalCheckFailedException")
}

fn get_s<'a>(item: &'a Item, key: &str) -> Option<&'a str> {
    item.get(key).and_then(|v| v.as_s().ok()).map(String::as_str)
}
fn get_n(item: &Item, key: &str) -> Option<i64> {
    item.get(key).and_then(|v| v.as_n().ok()).and_then(|t| t.parse().ok())
}

/// Encodes a JSON blob as `<name>_json` (String) or `<name>_z` (deflated Binary). (Plain `plan`
/// is a DynamoDB reserved word.)
fn encode_blob(name: &str, json: String, what: &str) -> Result<(String, AttributeValue), StateError> {
    if json.len() <= COMPRESS_ABOVE {
        return Ok((format!("{name}_json"), AttributeValue::S(json)));
    }
    let packed = miniz_oxide::deflate::compress_to_vec(json.as_bytes(), 6);
    if packed.len() > MAX_BLOB {
        return Err(StateError::TooLarge {
            what: format!("{what} ({} bytes of JSON, deflated)", json.len()),
            size: packed.len(),
            limit: MAX_BLOB,
        });
    }
    Ok((format!("{name}_z"), AttributeValue::B(Blob::new(packed))))
}

fn decode_blob<T: serde::de::DeserializeOwned>(item: &Item, name: &str, key: &str) -> Result<Option<T>, StateError> {
    let corrupt = |reason: String| StateError::Corrupt {
        key: key.to_owned(),
        reason,
    };
    if let Some(text) = get_s(item, &format!("{name}_json")) {
        return serde_json::from_str(text).map(Some).map_err(|e| corrupt(e.to_string()));
    }
    match item.get(&format!("{name}_z")).and_then(|v| v.as_b().ok()) {
        None => Ok(None),
        Some(blob) => {
            let bytes = miniz_oxide::inflate::decompress_to_vec_with_limit(blob.as_ref(), 64 << 20)
                .map_err(|e| corrupt(format!("{name}_z does not inflate: {e:?}")))?;
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| corrupt(e.to_string()))
        }
    }
}

fn read_state(item: &Item) -> Result<OpportunityState, StateError> {
    let key = get_s(item, "pk").unwrap_or("?").to_owned();
    let corrupt = |reason: &str| StateError::Corrupt {
        key: key.clone(),
        reason: reason.to_owned(),
    };
    let id = key
        .strip_prefix("opp#")
        .and_then(|g| OpportunityId::parse(g).ok())
        .ok_or_else(|| corrupt("not an opportunity key"))?;
    let status = get_s(item, "status")
        .and_then(Status::parse)
        .ok_or_else(|| corrupt("missing or unknown status"))?;
    Ok(OpportunityState {
        id,
        status,
        version: get_n(item, "ver").ok_or_else(|| corrupt("missing ver"))?,
        deleted: item
            .get("deleted")
            .and_then(|v| v.as_bool().ok())
            .copied()
            .unwrap_or(false),
        modified_on: get_s(item, "modon").map(str::to_owned),
        plan: decode_blob(item, "plan", &key)?,
        written: decode_blob(item, "written", &key)?,
        attempts: get_n(item, "attempts").unwrap_or(0).try_into().unwrap_or(u32::MAX),
        last_error: get_s(item, "err_code").map(|code| SyncError {
            operation: get_s(item, "err_op").unwrap_or_default().to_owned(),
            code: code.to_owned(),
            message: get_s(item, "err_msg").unwrap_or_default().to_owned(),
        }),
        claim_until: get_n(item, "claim_until"),
        created_at: get_n(item, "created").unwrap_or(0),
        updated_at: get_n(item, "updated").unwrap_or(0),
        status_since: get_n(item, "since").unwrap_or(0),
    })
}

/// An update expression under construction: SET and REMOVE clauses with their values.
#[derive(Default)]
struct Update {
    set: Vec<String>,
    remove: Vec<&'static str>,
    values: HashMap<String, AttributeValue>,
}

impl Update {
    fn set(&mut self, clause: impl Into<String>) -> &mut Self {
        self.set.push(clause.into());
        self
    }
    fn value(&mut self, name: &str, v: AttributeValue) -> &mut Self {
        self.values.insert(name.to_owned(), v);
        self
    }
    fn remove(&mut self, attr: &'static str) -> &mut Self {
        self.remove.push(attr);
        self
    }
    /// Sets or removes the error attributes.
    fn error(&mut self, error: Option<&SyncError>) -> &mut Self {
        match error {
            Some(e) => self
                .set("err_op = :err_op, err_code = :err_code, err_msg = :err_msg")
                .value(":err_op", s(&e.operation))
                .value(":err_code", s(&e.code))
                .value(":err_msg", s(&e.message)),
            None => self.remove("err_op").remove("err_code").remove("err_msg"),
        }
    }
    /// Sets a blob under one of its two names and removes the other.
    fn blob(&mut self, (attr, value): (String, AttributeValue), base: &'static str, packed: &'static str) -> &mut Self {
        let placeholder = format!(":{attr}");
        self.set(format!("{attr} = {placeholder}")).value(&placeholder, value);
        self.remove(if attr == base { packed } else { base })
    }
    /// The status, and the sparse index key that follows it.
    fn status(&mut self, status: Status) -> &mut Self {
        self.set("#s = :status").value(":status", s(status.as_str()));
        if status.is_open() {
            self.set("q = :status")
        } else {
            self.remove("q")
        }
    }
    fn expression(&self) -> String {
        let mut e = String::new();
        if !self.set.is_empty() {
            e.push_str("SET ");
            e.push_str(&self.set.join(", "));
        }
        if !self.remove.is_empty() {
            e.push_str(" REMOVE ");
            e.push_str(&self.remove.join(", "));
        }
        e
    }
}

impl DynamoStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoStore {
            client,
            table: Arc::from(table.into()),
        }
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
        u.status(Status::Pending)
            .set("ver = :v, deleted = :d, attempts = :zero, updated = :now")
            .set("created = if_not_exists(created, :now)")
            // `psince` exists only while pending: a newer version of a pending item keeps its age.
            .set("psince = if_not_exists(psince, :now), since = if_not_exists(psince, :now)")
            .value(":v", n(change.version))
            .value(":d", AttributeValue::Bool(change.deleted))
            .value(":zero", n(0))
            .value(":now", n(now))
            .error(None)
            .remove("claim")
            .remove("claim_until");
        match &change.modified_on {
            Some(m) => u.set("modon = :m").value(":m", s(m)),
            None => u.remove("modon"),
        };
        let done = self
            .update(
                "UpdateItem (mark pending)",
                opp_key(change.id),
                &u,
                Some("attribute_not_exists(ver) OR ver < :v"),
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

fn json<T: serde::Serialize>(value: &T) -> Result<String, StateError> {
    serde_json::to_string(value).map_err(|e| StateError::Corrupt {
        key: "a value to store".to_owned(),
        reason: e.to_string(),
    })
}

/// Page tokens are the index's LastEvaluatedKey, as JSON of its string and number parts.
fn encode_page(key: &Item) -> String {
    let map: serde_json::Map<String, serde_json::Value> = key
        .iter()
        .map(|(k, v)| {
            let v = match v {
                AttributeValue::S(t) => serde_json::json!({ "S": t }),
                AttributeValue::N(t) => serde_json::json!({ "N": t }),
                _ => serde_json::Value::Null,
            };
            (k.clone(), v)
        })
        .collect();
    serde_json::Value::Object(map).to_string()
}

fn decode_page(token: &str) -> Result<Item, StateError> {
    let bad = || StateError::BadPageToken(token.chars().take(80).collect());
    let value: serde_json::Value = serde_json::from_str(token).map_err(|_| bad())?;
    let object = value.as_object().ok_or_else(bad)?;
    object
        .iter()
        .map(|(k, v)| {
            let attr = if let Some(t) = v.get("S").and_then(|t| t.as_str()) {
                s(t)
            } else if let Some(t) = v.get("N").and_then(|t| t.as_str()) {
                AttributeValue::N(t.to_owned())
            } else {
                return Err(bad());
            };
            Ok((k.clone(), attr))
        })
        .collect()
}

impl StateStore for DynamoStore {
    async fn cursor(&self, source: Source) -> Result<Option<Cursor>, StateError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .key("pk", s(format!("cursor#{}", source.as_str())))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| dynamo_err("GetItem (cursor)", e))?;
        Ok(out.item.and_then(|item| {
            Some(Cursor {
                value: get_s(&item, "value")?.to_owned(),
                updated_at: get_n(&item, "updated").unwrap_or(0),
            })
        }))
    }

    async fn advance_cursor(&self, lease: &Lease, source: Source, value: &str, now: Millis) -> Result<(), StateError> {
        let build = |e: aws_sdk_dynamodb::error::BuildError| StateError::Dynamo {
            operation: "TransactWriteItems (cursor)",
            message: e.to_string(),
            retryable: false,
        };
        let check = ConditionCheck::builder()
            .table_name(&*self.table)
            .key("pk", s(format!("lease#{}", lease.name)))
            .condition_expression("#t = :t AND expires > :now")
            .expression_attribute_names("#t", "token")
            .expression_attribute_values(":t", n(lease.token))
            .expression_attribute_values(":now", n(now))
            .build()
            .map_err(build)?;
        let put = Put::builder()
            .table_name(&*self.table)
            .item("pk", s(format!("cursor#{}", source.as_str())))
            .item("value", s(value))
            .item("updated", n(now))
            .build()
            .map_err(build)?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().condition_check(check).build())
            .transact_items(TransactWriteItem::builder().put(put).build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("TransactionCanceledException") => {
                let reasons = e
                    .as_service_error()
                    .and_then(|se| match se {
                        aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(tc) => Some(tc),
                        _ => None,
                    })
                    .map(|tc| tc.cancellation_reasons().iter().filter_map(|r| r.code()).collect::<Vec<_>>())
                    .unwrap_or_default();
                if reasons.contains(&"ConditionalCheckFailed") || reasons.is_empty() {
                    Err(StateError::LeaseLost(lease.name.clone()))
                } else {
                    Err(dynamo_err("TransactWriteItems (cursor)", e))
                }
            }
            Err(e) => Err(dynamo_err("TransactWriteItems (cursor)", e)),
        }
    }

    async fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<Lease>, StateError> {
        let mut u = Update::default();
        u.set("#o = :o, expires = :e, #t = if_not_exists(#t, :zero) + :one")
            .value(":o", s(owner))
            .value(":e", n(now + ttl_ms))
            .value(":zero", n(0))
            .value(":one", n(1))
            .value(":now", n(now));
        let request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", s(format!("lease#{name}")))
            .update_expression(u.expression())
            .condition_expression("attribute_not_exists(pk) OR expires <= :now")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_names("#t", "token")
            .set_expression_attribute_values(Some(u.values))
            .return_values(ReturnValue::AllNew);
        match request.send().await {
            Ok(out) => {
                let item = out.attributes.unwrap_or_default();
                Ok(Some(Lease {
                    name: name.to_owned(),
                    owner: owner.to_owned(),
                    token: get_n(&item, "token").unwrap_or(0),
                    expires_at: now + ttl_ms,
                }))
            }
            Err(e) if is_condition_failed(&e) => Ok(None),
            Err(e) => Err(dynamo_err("UpdateItem (acquire lease)", e)),
        }
    }

    async fn renew_lease(&self, lease: &Lease, ttl_ms: i64, now: Millis) -> Result<Option<Lease>, StateError> {
        let request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", s(format!("lease#{}", lease.name)))
            .update_expression("SET expires = :e")
            .condition_expression("#t = :t AND expires > :now")
            .expression_attribute_names("#t", "token")
            .expression_attribute_values(":e", n(now + ttl_ms))
            .expression_attribute_values(":t", n(lease.token))
            .expression_attribute_values(":now", n(now));
        match request.send().await {
            Ok(_) => Ok(Some(Lease {
                expires_at: now + ttl_ms,
                ..lease.clone()
            })),
            Err(e) if is_condition_failed(&e) => Ok(None),
            Err(e) => Err(dynamo_err("UpdateItem (renew lease)", e)),
        }
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), StateError> {
        let request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", s(format!("lease#{}", lease.name)))
            .update_expression("SET expires = :zero")
            .condition_expression("#t = :t")
            .expression_attribute_names("#t", "token")
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":t", n(lease.token));
        match request.send().await {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failed(&e) => Ok(()),
            Err(e) => Err(dynamo_err("UpdateItem (release lease)", e)),
        }
    }

    async fn mark_pending(&self, changes: &[PendingChange], now: Millis) -> Result<Vec<MarkOutcome>, StateError> {
        // Concurrent across opportunities, in order within one: two changes to the same record in
        // one batch must resolve as if applied one after the other.
        let mut by_id: HashMap<OpportunityId, Vec<(usize, PendingChange)>> = HashMap::new();
        for (i, change) in changes.iter().enumerate() {
            by_id.entry(change.id).or_default().push((i, change.clone()));
        }
        let permits = Arc::new(Semaphore::new(MARK_CONCURRENCY));
        let mut tasks = JoinSet::new();
        for group in by_id.into_values() {
            let (store, permits) = (self.clone(), Arc::clone(&permits));
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let mut results = Vec::with_capacity(group.len());
                for (i, change) in group {
                    results.push((i, store.mark_one(&change, now).await));
                }
                results
            });
        }
        let mut outcomes = vec![MarkOutcome::Stale; changes.len()];
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(results) => {
                    for (i, result) in results {
                        match result {
                            Ok(outcome) => outcomes[i] = outcome,
                            Err(e) => {
                                first_error.get_or_insert(e);
                            }
                        }
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(StateError::Dynamo {
                        operation: "UpdateItem (mark pending)",
                        message: format!("the task stopped: {e}"),
                        retryable: true,
                    });
                }
            }
        }
        // Each recorded change is durable on its own; on error the caller retries the whole
        // batch, and the version guard makes the repeats no-ops.
        match first_error {
            Some(e) => Err(e),
            None => Ok(outcomes),
        }
    }

    async fn requeue(&self, id: OpportunityId, now: Millis) -> Result<bool, StateError> {
        let mut u = Update::default();
        u.status(Status::Pending)
            .set("attempts = :zero, updated = :now, since = :now, psince = :now")
            .value(":zero", n(0))
            .value(":now", n(now))
            .remove("claim")
            .remove("claim_until");
        let done = self
            .update(
                "UpdateItem (requeue)",
                opp_key(id),
                &u,
                Some("attribute_exists(pk)"),
                ReturnValue::None,
            )
            .await?;
        Ok(done.is_some())
    }

    async fn claim(
        &self,
        id: OpportunityId,
        from: Status,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<(Claim, OpportunityState)>, StateError> {
        let token = new_token();
        let mut u = Update::default();
        u.set("claim = :t, claim_until = :until, updated = :now")
            .value(":t", n(token))
            .value(":until", n(now + ttl_ms))
            .value(":now", n(now))
            .value(":from", s(from.as_str()));
        let item = self
            .update(
                "UpdateItem (claim)",
                opp_key(id),
                &u,
                Some("#s = :from AND (attribute_not_exists(claim_until) OR claim_until <= :now)"),
                ReturnValue::AllNew,
            )
            .await?;
        match item {
            None => Ok(None),
            Some(item) => {
                let state = read_state(&item)?;
                Ok(Some((
                    Claim {
                        id,
                        version: state.version,
                        token,
                        until: now + ttl_ms,
                    },
                    state,
                )))
            }
        }
    }

    async fn complete_transform(
        &self,
        claim: &Claim,
        result: TransformResult,
        now: Millis,
    ) -> Result<Completion, StateError> {
        let (status, plan, error) = result.parts();
        let mut u = Update::default();
        u.status(status)
            .set("updated = :now, since = :now, attempts = attempts + :inc")
            .value(":now", n(now))
            .value(":inc", n(i64::from(error.is_some())))
            .value(":t", n(claim.token))
            .value(":v", n(claim.version))
            .error(error)
            .remove("claim")
            .remove("claim_until")
            .remove("psince");
        if let Some(plan) = plan {
            u.blob(encode_blob("plan", json(plan)?, "the plan")?, "plan_json", "plan_z");
        }
        let done = self
            .update(
                "UpdateItem (complete transform)",
                opp_key(claim.id),
                &u,
                Some("claim = :t AND ver = :v"),
                ReturnValue::None,
            )
            .await?;
        if done.is_none() {
            return Ok(Completion::Superseded);
        }
        if !status.is_open() {
            self.count_completion(now).await?;
        }
        Ok(Completion::Completed)
    }

    async fn complete_write(&self, claim: &Claim, result: WriteResult, now: Millis) -> Result<Completion, StateError> {
        let (status, written, error) = result.parts();
        let mut u = Update::default();
        u.status(status)
            .set("updated = :now")
            .value(":now", n(now))
            .value(":t", n(claim.token))
            .value(":v", n(claim.version))
            .error(error)
            .remove("claim")
            .remove("claim_until");
        if status != Status::Ready {
            u.set("since = :now");
        }
        if error.is_some() {
            u.set("attempts = attempts + :one").value(":one", n(1));
        } else {
            u.set("attempts = :zero").value(":zero", n(0));
        }
        let mut condition = "claim = :t AND ver = :v".to_owned();
        if let Some(w) = written {
            u.blob(
                encode_blob("written", json(w)?, "the written role set")?,
                "written_json",
                "written_z",
            )
            .set("wver = :wv")
            .value(":wv", n(w.version));
            condition.push_str(" AND (attribute_not_exists(wver) OR wver <= :wv)");
        }
        let done = self
            .update(
                "UpdateItem (complete write)",
                opp_key(claim.id),
                &u,
                Some(&condition),
                ReturnValue::None,
            )
            .await?;
        if done.is_none() {
            if let Some(w) = written {
                self.record_written(claim.id, w).await?;
            }
            return Ok(Completion::Superseded);
        }
        if matches!(status, Status::Synced | Status::Deleted) {
            self.count_completion(now).await?;
        }
        Ok(Completion::Completed)
    }

    async fn get(&self, id: OpportunityId) -> Result<Option<OpportunityState>, StateError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .key("pk", opp_key(id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| dynamo_err("GetItem", e))?;
        out.item.as_ref().map(read_state).transpose()
    }

    async fn list(
        &self,
        status: Status,
        limit: usize,
        page: Option<&str>,
    ) -> Result<Page<OpportunityState>, StateError> {
        let limit = limit.clamp(1, 10_000);
        let mut start = page.map(decode_page).transpose()?;
        let mut items = Vec::new();
        loop {
            let want = (limit - items.len()) as i32;
            let (batch, last) = if status.is_open() {
                let (batch, _, last) = self.query_open(status, want, start.take(), false).await?;
                (batch, last)
            } else {
                // Closed statuses are not indexed (that would put every synced item in one index
                // partition); listing them scans, which only the operator views do.
                let out = self
                    .client
                    .scan()
                    .table_name(&*self.table)
                    .filter_expression("#s = :s AND begins_with(pk, :p)")
                    .expression_attribute_names("#s", "status")
                    .expression_attribute_values(":s", s(status.as_str()))
                    .expression_attribute_values(":p", s("opp#"))
                    .limit(want.max(25))
                    .set_exclusive_start_key(start.take())
                    .send()
                    .await
                    .map_err(|e| dynamo_err("Scan", e))?;
                (out.items.unwrap_or_default(), out.last_evaluated_key)
            };
            for item in &batch {
                items.push(read_state(item)?);
            }
            match last {
                Some(key) if items.len() < limit => start = Some(key),
                Some(key) => {
                    return Ok(Page {
                        items: items.into_iter().take(limit).collect(),
                        next: Some(encode_page(&key)),
                    });
                }
                None => return Ok(Page { items, next: None }),
            }
        }
    }

    async fn counts(&self) -> Result<Counts, StateError> {
        let mut counts = Counts::default();
        // Open statuses: count queries on the sparse index.
        for status in Status::ALL.into_iter().filter(|s| s.is_open()) {
            let mut start = None;
            let mut total = 0;
            loop {
                let (_, count, last) = self.query_open(status, 0, start, true).await?;
                total += count;
                match last {
                    Some(k) => start = Some(k),
                    None => break,
                }
            }
            if total > 0 {
                counts.0.insert(status, total as u64);
            }
        }
        // Closed statuses: a scan, projecting only the status.
        let mut start = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&*self.table)
                .filter_expression("begins_with(pk, :p) AND attribute_not_exists(q)")
                .projection_expression("#s")
                .expression_attribute_names("#s", "status")
                .expression_attribute_values(":p", s("opp#"))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| dynamo_err("Scan (counts)", e))?;
            for item in out.items() {
                if let Some(status) = get_s(item, "status").and_then(Status::parse) {
                    *counts.0.entry(status).or_default() += 1;
                }
            }
            match out.last_evaluated_key {
                Some(k) => start = Some(k),
                None => break,
            }
        }
        Ok(counts)
    }

    async fn oldest_pending(&self) -> Result<Option<(OpportunityId, Millis)>, StateError> {
        let (items, _, _) = self.query_open(Status::Pending, 1, None, false).await?;
        items
            .first()
            .map(|item| read_state(item).map(|st| (st.id, st.status_since)))
            .transpose()
    }

    async fn completions(&self, since: Millis, until: Millis) -> Result<u64, StateError> {
        let minutes: Vec<i64> = (minute_of(since)..=minute_of(until)).collect();
        let mut total = 0u64;
        for chunk in minutes.chunks(100) {
            let mut keys = KeysAndAttributes::builder();
            for m in chunk {
                keys = keys.keys(HashMap::from([("pk".to_owned(), s(format!("done#{m}")))]));
            }
            let mut request: HashMap<String, KeysAndAttributes> = HashMap::from([(
                self.table.to_string(),
                keys.build().map_err(|e| StateError::Dynamo {
                    operation: "BatchGetItem (completions)",
                    message: e.to_string(),
                    retryable: false,
                })?,
            )]);
            // BatchGetItem may return some keys unprocessed; ask again for those.
            while !request.is_empty() {
                let out = self
                    .client
                    .batch_get_item()
                    .set_request_items(Some(request))
                    .send()
                    .await
                    .map_err(|e| dynamo_err("BatchGetItem (completions)", e))?;
                for items in out.responses.unwrap_or_default().into_values() {
                    total += items.iter().filter_map(|i| get_n(i, "n")).sum::<i64>() as u64;
                }
                request = out.unprocessed_keys.unwrap_or_default();
            }
        }
        Ok(total)
    }

    async fn add_marketo_calls(&self, day: &str, calls: u64) -> Result<u64, StateError> {
        let out = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", s(format!("calls#{day}")))
            .update_expression("ADD n :c")
            .expression_attribute_values(":c", n(calls))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(|e| dynamo_err("UpdateItem (Marketo calls)", e))?;
        Ok(out.attributes.as_ref().and_then(|a| get_n(a, "n")).unwrap_or(0) as u64)
    }

    async fn marketo_calls(&self, day: &str) -> Result<u64, StateError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .key("pk", s(format!("calls#{day}")))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| dynamo_err("GetItem (Marketo calls)", e))?;
        Ok(out.item.as_ref().and_then(|i| get_n(i, "n")).unwrap_or(0) as u64)
    }

    async fn remember_links(&self, links: &[(String, OpportunityId)]) -> Result<(), StateError> {
        // Link items carry no `status`, so the stream filters never pass them to a function.
        let mut unique: HashMap<String, OpportunityId> = HashMap::new();
        for (connection, opportunity) in links {
            unique.insert(connection.to_ascii_lowercase(), *opportunity);
        }
        let requests: Vec<WriteRequest> = unique
            .into_iter()
            .map(|(connection, opportunity)| {
                let put = PutRequest::builder()
                    .item("pk", s(format!("conn#{connection}")))
                    .item("opp", s(opportunity.to_string()))
                    .build()
                    .map_err(|e| StateError::Dynamo {
                        operation: "BatchWriteItem (links)",
                        message: e.to_string(),
                        retryable: false,
                    })?;
                Ok(WriteRequest::builder().put_request(put).build())
            })
            .collect::<Result<_, StateError>>()?;
        for chunk in requests.chunks(25) {
            let mut request = HashMap::from([(self.table.to_string(), chunk.to_vec())]);
            // BatchWriteItem may leave some items unprocessed; send those again.
            while !request.is_empty() {
                let out = self
                    .client
                    .batch_write_item()
                    .set_request_items(Some(request))
                    .send()
                    .await
                    .map_err(|e| dynamo_err("BatchWriteItem (links)", e))?;
                request = out.unprocessed_items.unwrap_or_default();
                request.retain(|_, v| !v.is_empty());
            }
        }
        Ok(())
    }

    async fn linked_opportunities(&self, connections: &[String]) -> Result<Vec<OpportunityId>, StateError> {
        let mut wanted: Vec<String> = connections.iter().map(|c| c.to_ascii_lowercase()).collect();
        wanted.sort();
        wanted.dedup();
        let mut out = std::collections::BTreeSet::new();
        for chunk in wanted.chunks(100) {
            let mut keys = KeysAndAttributes::builder();
            for connection in chunk {
                keys = keys.keys(HashMap::from([("pk".to_owned(), s(format!("conn#{connection}")))]));
            }
            let mut request: HashMap<String, KeysAndAttributes> = HashMap::from([(
                self.table.to_string(),
                keys.build().map_err(|e| StateError::Dynamo {
                    operation: "BatchGetItem (links)",
                    message: e.to_string(),
                    retryable: false,
                })?,
            )]);
            while !request.is_empty() {
                let out_page = self
                    .client
                    .batch_get_item()
                    .set_request_items(Some(request))
                    .send()
                    .await
                    .map_err(|e| dynamo_err("BatchGetItem (links)", e))?;
                for items in out_page.responses.unwrap_or_default().into_values() {
                    for item in items {
                        let text = get_s(&item, "opp").unwrap_or_default();
                        let id = OpportunityId::parse(text).map_err(|e| StateError::Corrupt {
                            key: get_s(&item, "pk").unwrap_or_default().to_owned(),
                            reason: e.to_string(),
                        })?;
                        out.insert(id);
                    }
                }
                request = out_page.unprocessed_keys.unwrap_or_default();
            }
        }
        Ok(out.into_iter().collect())
    }
}
