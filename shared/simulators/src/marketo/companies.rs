//! Companies: sync by externalCompanyId.

use super::*;

const COMPANY_CHECKS: RecordChecks<'static, String> = RecordChecks {
    read_only_with_crm: true,
    key: |r| r.get("externalCompanyId").and_then(Value::as_str).map(str::to_owned),
    missing_key: "Value for required field 'externalCompanyId' not specified",
    duplicate: "Duplicate externalCompanyId in input",
    fields: COMPANY_FIELDS,
    custom_fields: |_| &[],
    fault_key: |k| k.clone(),
};

/// Sync Companies (companies page, "Create and Update"): keyed by externalCompanyId; results
/// with `seq` and the integer `id`; 1036 for a key repeated in one input (error-codes page).
pub(super) fn company_sync(g: &mut Inner, body: &Value) -> Result<Vec<Value>, Refusal> {
    upsert_with_id(g, body, &COMPANY_CHECKS, |_| None, |d| &mut d.companies)
}

/// A keyed upsert whose results carry `seq`, `status` and an integer `id` (the companies and
/// sales-persons pages): each record checked, then `invalid` (a skip's code and message), then
/// created or updated in the table `table` picks.
pub(super) fn upsert_with_id(
    g: &mut Inner,
    body: &Value,
    checks: &RecordChecks<'_, String>,
    invalid: impl Fn(&Map<String, Value>) -> Option<(&'static str, String)>,
    table: impl Fn(&mut Data) -> &mut BTreeMap<String, Map<String, Value>>,
) -> Result<Vec<Value>, Refusal> {
    let input = inputs(g, body)?.clone();
    let mut seen = std::collections::HashSet::new();
    let mut results = Vec::with_capacity(input.len());
    for (seq, record) in input.iter().enumerate() {
        let (record, key) = match check_record(g, seq, record, &mut seen, checks) {
            Ok(checked) => checked,
            Err(skip) => {
                results.push(skip);
                continue;
            }
        };
        if let Some((code, message)) = invalid(record) {
            results.push(skipped(seq, code, &message));
            continue;
        }
        let next = g.data.next_id + 1;
        match table(&mut g.data).get_mut(&key) {
            Some(existing) => {
                existing.extend(record.clone());
                let id = existing.get("id").cloned();
                results.push(json!({"seq": seq, "status": "updated", "id": id}));
            }
            None => {
                let mut stored = record.clone();
                stored.insert("id".into(), json!(next));
                table(&mut g.data).insert(key, stored);
                g.data.next_id = next;
                results.push(json!({"seq": seq, "status": "created", "id": next}));
            }
        }
    }
    Ok(results)
}
