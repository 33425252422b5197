//! Companies: sync by externalCompanyId.

use super::*;

/// Sync Companies (companies page, "Create and Update"): keyed by externalCompanyId; results
/// with `seq` and the integer `id`; 1036 for a key repeated in one input (error-codes page).
pub(super) fn company_sync(g: &mut Inner, body: &Value) -> Result<Vec<Value>, Refusal> {
    let input = inputs(g, body)?.clone();
    let mut seen = std::collections::HashSet::new();
    let mut results = Vec::with_capacity(input.len());
    for (seq, record) in input.iter().enumerate() {
        let Some(record) = record.as_object() else {
            results.push(skipped(seq, "1003", "Invalid record"));
            continue;
        };
        if g.config.crm_enabled {
            results.push(skipped(seq, "1018", "CRM Enabled"));
            continue;
        }
        let Some(key) = record
            .get("externalCompanyId")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            results.push(skipped(
                seq,
                "1003",
                "Value for required field 'externalCompanyId' not specified",
            ));
            continue;
        };
        if !seen.insert(key.clone()) {
            results.push(skipped(seq, "1036", "Duplicate externalCompanyId in input"));
            continue;
        }
        if let Some(field) = unknown_field(record, COMPANY_FIELDS, &[]) {
            results.push(skipped(seq, "1006", &format!("Field '{field}' not found")));
            continue;
        }
        if let Some(code) = record_fault(g, &key) {
            results.push(skipped(seq, code, "Injected record fault"));
            continue;
        }
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
