//! What a write answers, record by record: the outcome types, how a result is read (`reason` or
//! `reasons`), how results are matched to records (by `seq`, else by position), and how records
//! are cut into calls.

use super::*;

/// What happened to one record of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordStatus {
    Created,
    Updated,
    Deleted,
    Skipped,
}

/// One record's result, matched back to its input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordOutcome {
    pub status: RecordStatus,
    /// `marketoGUID` (opportunities, roles) or `id` (companies, leads), as text.
    pub marketo_id: Option<String>,
    pub reasons: Vec<Reason>,
}

impl RecordOutcome {
    pub fn is_skipped(&self) -> bool {
        self.status == RecordStatus::Skipped
    }
    /// The first reason's code, if skipped.
    pub fn code(&self) -> Option<&str> {
        self.reasons.first().map(|r| r.code.as_str())
    }
    /// What a skip means for the record: see [`crate::Disposition`] (`None` when not skipped).
    pub fn disposition(&self) -> Option<crate::Disposition> {
        self.class().map(Into::into)
    }
    /// How to treat a skip: retry (a transient record code), or record it.
    pub fn class(&self) -> Option<ErrorClass> {
        self.is_skipped()
            .then(|| self.code().map_or(ErrorClass::Permanent, classify))
    }
}

/// An opportunity role: Marketo's key is (externalOpportunityId, leadId, role).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RoleKey {
    #[serde(rename = "externalOpportunityId")]
    pub external_opportunity_id: String,
    #[serde(rename = "leadId")]
    pub lead_id: i64,
    pub role: String,
}

/// A role to create or update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRecord {
    #[serde(flatten)]
    pub key: RoleKey,
    /// A role read back without it (or with null) is not primary.
    #[serde(rename = "isPrimary", default, deserialize_with = "null_is_false")]
    pub is_primary: bool,
}

fn null_is_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// A lead as queried: its id and the fields asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeadRecord {
    pub id: i64,
    pub fields: Map<String, Value>,
}

/// A Marketo object's description: its fields.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ObjectDescription {
    pub name: String,
    #[serde(rename = "dedupeFields", default)]
    pub dedupe_fields: Vec<String>,
    #[serde(default)]
    pub fields: Vec<FieldDescription>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FieldDescription {
    pub name: String,
    #[serde(rename = "displayName", default)]
    pub display_name: Option<String>,
    /// string, text, integer, float, currency, boolean, date, datetime, …
    #[serde(rename = "dataType", default)]
    pub data_type: Option<String>,
    #[serde(default)]
    pub length: Option<i64>,
    /// False for what Marketo sets itself (marketoGUID, createdAt, updatedAt).
    #[serde(default)]
    pub updateable: Option<bool>,
}

/// What the preflight found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    /// `None` when the instance takes opportunity writes; else why not.
    pub blocked: Option<String>,
    /// Configured opportunity fields the instance does not have.
    pub missing_fields: Vec<String>,
}

impl Preflight {
    pub fn ok(&self) -> bool {
        self.blocked.is_none() && self.missing_fields.is_empty()
    }
}

pub(super) fn parse_outcome(result: &Value) -> Option<RecordOutcome> {
    let status = match result.get("status")?.as_str()? {
        "created" => RecordStatus::Created,
        "updated" => RecordStatus::Updated,
        "deleted" => RecordStatus::Deleted,
        "skipped" => RecordStatus::Skipped,
        _ => return None,
    };
    let marketo_id = result
        .get("marketoGUID")
        .or_else(|| result.get("id"))
        .and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
    // The pages show `reasons: [{code, message}]`; the OpenAPI lead result has
    // `reason: {code, message}`. Either, as one object or a list, is read.
    let reasons = ["reasons", "reason"]
        .iter()
        .filter_map(|key| result.get(*key))
        .flat_map(|r| match r {
            Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        })
        .filter_map(|r| serde_json::from_value::<Reason>(r).ok())
        .collect();
    Some(RecordOutcome {
        status,
        marketo_id,
        reasons,
    })
}

/// Matches a write's results to the `sent` records of its call: by `seq` where every result
/// carries one (opportunities, roles, companies), else by position (Sync Leads results have no
/// `seq`; the error-codes page: results are "ordered in the same way as the input array").
pub(super) fn match_results(
    endpoint: &'static str,
    sent: usize,
    results: Vec<Value>,
) -> Result<Vec<RecordOutcome>, MarketoError> {
    let got = results.len();
    let mismatch = |detail| MarketoError::ResultMismatch {
        endpoint,
        sent,
        got,
        detail,
    };
    if got != sent {
        return Err(mismatch(""));
    }
    let by_seq = results.iter().all(|r| r.get("seq").is_some());
    let mut matched: Vec<Option<RecordOutcome>> = vec![None; sent];
    for (position, result) in results.iter().enumerate() {
        let outcome = parse_outcome(result).ok_or_else(|| mismatch(" (a result without a known status)"))?;
        let index = if by_seq {
            match &result["seq"] {
                Value::Number(n) => n.as_u64().map(|n| n as usize),
                Value::String(s) => s.parse().ok(),
                _ => None,
            }
            .ok_or_else(|| mismatch(" (a seq that is not a number)"))?
        } else {
            position
        };
        match matched.get_mut(index) {
            Some(slot @ None) => *slot = Some(outcome),
            _ => return Err(mismatch(" (a seq out of range or repeated)")),
        }
    }
    matched
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| mismatch(" (a record without a result)"))
}

/// Splits records into runs of at most 300 records and about 1 MB of JSON.
pub(super) fn batches(records: &[&Value]) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, record) in records.iter().enumerate() {
        let size = serde_json::to_vec(record).map_or(0, |v| v.len()) + 1;
        if i > start && (i - start == MAX_BATCH || bytes + size > MAX_BODY) {
            ranges.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < records.len() {
        ranges.push(start..records.len());
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_at_most_300_records_and_about_a_megabyte() {
        let small: Vec<Value> = (0..1000).map(|i| json!({"externalOpportunityId": i})).collect();
        let refs: Vec<&Value> = small.iter().collect();
        let sizes: Vec<usize> = batches(&refs).iter().map(|r| r.len()).collect();
        assert_eq!(sizes, [300, 300, 300, 100]);
        let big: Vec<Value> = (0..10)
            .map(|i| json!({"id": i, "description": "x".repeat(300_000)}))
            .collect();
        let refs: Vec<&Value> = big.iter().collect();
        for range in batches(&refs) {
            let bytes: usize = big[range].iter().map(|v| v.to_string().len()).sum();
            assert!(bytes < MAX_BODY, "{bytes}");
        }
        assert!(batches(&[]).is_empty());
    }
}
