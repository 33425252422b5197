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
    let input = inputs(g, body)?.clone();
    let mut seen = std::collections::HashSet::new();
    let mut results = Vec::with_capacity(input.len());
    for (seq, record) in input.iter().enumerate() {
        let (record, key) = match check_record(g, seq, record, &mut seen, &COMPANY_CHECKS) {
            Ok(checked) => checked,
            Err(skip) => {
                results.push(skip);
                continue;
            }
        };
        match g.data.companies.get_mut(&key) {
            Some(existing) => {
                existing.extend(record.clone());
                let id = existing.get("id").cloned();
                results.push(json!({"seq": seq, "status": "updated", "id": id}));
            }
            None => {
                g.data.next_id += 1;
                let id = g.data.next_id;
                let mut stored = record.clone();
                stored.insert("id".into(), json!(id));
                g.data.companies.insert(key, stored);
                results.push(json!({"seq": seq, "status": "created", "id": id}));
            }
        }
    }
    Ok(results)
}
