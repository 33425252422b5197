//! The one item codec: attribute values in and out, the opportunity item read back into an
//! [`OpportunityState`], blobs stored plain or deflated, page tokens, and DynamoDB's errors
//! turned into [`StateError`]s with the code, the message and whether a retry may help.

use super::*;

/// The opportunity item's attribute names, as the codec reads them. The update expressions in
/// `store` and `update` write the same names.
pub(super) mod attr {
    pub const PK: &str = "pk";
    pub const STATUS: &str = "status";
    pub const VERSION: &str = "ver";
    pub const DELETED: &str = "deleted";
    pub const MODIFIED_ON: &str = "modon";
    /// Stored as `plan_json` or `plan_z` (plain `plan` is a DynamoDB reserved word).
    pub const PLAN: &str = "plan";
    pub const WRITTEN: &str = "written";
    pub const ATTEMPTS: &str = "attempts";
    pub const ERR_OP: &str = "err_op";
    pub const ERR_CODE: &str = "err_code";
    pub const ERR_MSG: &str = "err_msg";
    pub const CLAIM_UNTIL: &str = "claim_until";
    pub const CREATED: &str = "created";
    pub const UPDATED: &str = "updated";
    pub const SINCE: &str = "since";
    /// Present while a retried write waits; the writer's stream filter requires its absence.
    pub const RETRY_AT: &str = "retry_at";
    pub const REWRITE: &str = "needs_rewrite";
    /// Stored as `planned_json` or `planned_z`.
    pub const PLANNED: &str = "planned";
    /// The step an unclaimed item awaits (`transform`, `write`): what the stream filters match.
    pub const AWAITS: &str = "awaits";
    /// The table's TTL attribute (seconds since the epoch), carried by lock items only.
    pub const EXPIRE_AT: &str = "expire_at_s";
}

pub(super) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}
pub(super) fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}
pub(super) fn opp_key(id: OpportunityId) -> AttributeValue {
    s(format!("opp#{id}"))
}

pub(super) fn dynamo_err<E>(
    operation: &'static str,
    e: SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
) -> StateError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let code = e.code().unwrap_or_default().to_owned();
    // A 5xx without a code (an HTML page from a proxy or an overloaded endpoint) is the
    // service's trouble like InternalServerError: the next attempt may succeed.
    let server_error = e
        .raw_response()
        .map(|r| r.status().as_u16())
        .filter(|s| (500..600).contains(s));
    let retryable = matches!(
        e,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
    ) || server_error.is_some()
        || matches!(
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
        (None, _) if let Some(status) = server_error => {
            format!("HTTP {status} without DynamoDB's error body; the service or something in front of it failed")
        }
        _ => DisplayErrorContext(&e).to_string(),
    };
    StateError::Dynamo {
        operation,
        message,
        retryable,
    }
}

pub(super) fn is_condition_failed<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.code() == Some("ConditionalCheckFailedException")
}

pub(super) fn get_s<'a>(item: &'a Item, key: &str) -> Option<&'a str> {
    item.get(key).and_then(|v| v.as_s().ok()).map(String::as_str)
}
pub(super) fn get_n(item: &Item, key: &str) -> Option<i64> {
    item.get(key).and_then(|v| v.as_n().ok()).and_then(|t| t.parse().ok())
}

/// Encodes a JSON blob as `<name>_json` (String) or `<name>_z` (deflated Binary). (Plain `plan`
/// is a DynamoDB reserved word.)
pub(super) fn encode_blob(name: &str, json: String, what: &str) -> Result<(String, AttributeValue), StateError> {
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

/// One stored part, as `<name>_json` text or a deflated `<name>_z` blob; why it cannot be
/// decoded, if it cannot.
pub(super) fn decode_blob<T: serde::de::DeserializeOwned>(item: &Item, name: &str) -> Result<Option<T>, String> {
    if let Some(text) = get_s(item, &format!("{name}_json")) {
        return serde_json::from_str(text).map(Some).map_err(|e| crate::json_fault(&e));
    }
    match item.get(&format!("{name}_z")).and_then(|v| v.as_b().ok()) {
        None => Ok(None),
        Some(blob) => {
            let bytes = miniz_oxide::inflate::decompress_to_vec_with_limit(blob.as_ref(), 64 << 20)
                .map_err(|e| format!("{name}_z does not inflate: {:?}", e.status))?;
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| crate::json_fault(&e))
        }
    }
}

pub(super) fn read_state(item: &Item) -> Result<OpportunityState, StateError> {
    let key = get_s(item, attr::PK).unwrap_or("?").to_owned();
    let corrupt = |reason: &str| StateError::Corrupt {
        key: key.clone(),
        reason: reason.to_owned(),
    };
    let id = key
        .strip_prefix("opp#")
        .and_then(|g| OpportunityId::parse(g).ok())
        .ok_or_else(|| corrupt("not an opportunity key"))?;
    let status = get_s(item, attr::STATUS)
        .and_then(Status::parse)
        .ok_or_else(|| corrupt("missing or unknown status"))?;
    let mut unreadable = None;
    let plan = crate::lenient("plan", decode_blob(item, attr::PLAN), &mut unreadable);
    let written = crate::lenient(
        "record of what was written",
        decode_blob(item, attr::WRITTEN),
        &mut unreadable,
    );
    let planned = crate::lenient("planned roles", decode_blob(item, attr::PLANNED), &mut unreadable);
    Ok(OpportunityState {
        id,
        status,
        version: get_n(item, attr::VERSION).ok_or_else(|| corrupt("missing ver"))?,
        deleted: item
            .get(attr::DELETED)
            .and_then(|v| v.as_bool().ok())
            .copied()
            .unwrap_or(false),
        modified_on: get_s(item, attr::MODIFIED_ON).map(str::to_owned),
        plan,
        written,
        attempts: get_n(item, attr::ATTEMPTS).unwrap_or(0).try_into().unwrap_or(u32::MAX),
        last_error: get_s(item, attr::ERR_CODE).map(|code| SyncError {
            operation: get_s(item, attr::ERR_OP).unwrap_or_default().to_owned(),
            code: code.to_owned(),
            message: get_s(item, attr::ERR_MSG).unwrap_or_default().to_owned(),
        }),
        claim_until: get_n(item, attr::CLAIM_UNTIL),
        created_at: get_n(item, attr::CREATED).unwrap_or(0),
        updated_at: get_n(item, attr::UPDATED).unwrap_or(0),
        status_since: get_n(item, attr::SINCE).unwrap_or(0),
        retry_at: get_n(item, attr::RETRY_AT),
        rewrite: item
            .get(attr::REWRITE)
            .and_then(|v| v.as_bool().ok())
            .copied()
            .unwrap_or(false),
        planned: planned.unwrap_or_default(),
        unreadable,
    })
}

pub(super) fn json<T: serde::Serialize>(value: &T) -> Result<String, StateError> {
    serde_json::to_string(value).map_err(|e| StateError::Corrupt {
        key: "a value to store".to_owned(),
        reason: e.to_string(),
    })
}

/// Page tokens are the index's LastEvaluatedKey, as JSON of its string and number parts.
pub(super) fn encode_page(key: &Item) -> String {
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

pub(super) fn decode_page(token: &str) -> Result<Item, StateError> {
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
