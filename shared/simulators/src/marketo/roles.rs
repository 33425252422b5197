//! Opportunity roles: keyed by (externalOpportunityId, leadId, role); sync and query.

use super::*;

pub(super) fn role_key(record: &Map<String, Value>) -> Option<(String, i64, String)> {
    Some((
        record.get("externalOpportunityId")?.as_str()?.to_owned(),
        record.get("leadId")?.as_i64()?,
        record.get("role")?.as_str()?.to_owned(),
    ))
}

const ROLE_CHECKS: RecordChecks<'static, (String, i64, String)> = RecordChecks {
    read_only_with_crm: false,
    key: role_key,
    missing_key: "externalOpportunityId, leadId and role are required",
    duplicate: "Duplicate role in input",
    fields: ROLE_FIELDS,
    custom_fields: |_| &[],
    fault_key: |k| format!("{}|{}|{}", k.0, k.1, k.2),
};

/// Sync Opportunity Roles (opportunity-roles page, "Create and Update"): keyed by
/// (externalOpportunityId, leadId, role); the opportunity and the lead must exist (the codes for
/// a missing one are unconfirmed: 1013, 1004); results with `seq` and `marketoGUID`.
pub(super) fn role_sync(g: &mut Inner, body: &Value) -> Result<Vec<Value>, Refusal> {
    let input = inputs(g, body)?.clone();
    let mut seen = std::collections::HashSet::new();
    let mut results = Vec::with_capacity(input.len());
    for (seq, record) in input.iter().enumerate() {
        let (record, key) = match check_record(g, seq, record, &mut seen, &ROLE_CHECKS) {
            Ok(checked) => checked,
            Err(skip) => {
                results.push(skip);
                continue;
            }
        };
        if key.2.chars().count() > 50 {
            results.push(skipped(seq, "1003", "role longer than 50"));
            continue;
        }
        // Unconfirmed: the codes for a role whose opportunity or lead does not exist.
        if !g.data.opportunities.contains_key(&key.0) {
            results.push(skipped(seq, "1013", "Opportunity not found"));
            continue;
        }
        if !g.data.leads.contains_key(&key.1) {
            results.push(skipped(seq, "1004", "Lead not found"));
            continue;
        }
        let is_primary = record.get("isPrimary").and_then(Value::as_bool).unwrap_or(false);
        match g.data.roles.get_mut(&key) {
            Some(existing) => {
                existing.is_primary = is_primary;
                let guid = existing.marketo_guid.clone();
                results.push(json!({"seq": seq, "status": "updated", "marketoGUID": guid}));
            }
            None => {
                let guid = new_guid(g, "role");
                g.data.roles.insert(
                    key.clone(),
                    SimRole {
                        external_opportunity_id: key.0,
                        lead_id: key.1,
                        role: key.2,
                        is_primary,
                        marketo_guid: guid.clone(),
                    },
                );
                results.push(json!({"seq": seq, "status": "created", "marketoGUID": guid}));
            }
        }
    }
    Ok(results)
}

/// Query roles by compound key, `POST roles.json?_method=GET` with a JSON body
/// (opportunity-roles page, "Query"): "the same type of response as a standard GET query".
pub(super) fn role_query(g: &Inner, body: &Value) -> Result<Vec<Value>, Refusal> {
    let keys = body.get("input").and_then(Value::as_array).cloned().unwrap_or_default();
    if keys.len() > g.config.max_batch {
        return Err(refusal("1003", "Too many keys"));
    }
    Ok(keys
        .iter()
        .filter_map(|k| role_key(k.as_object()?))
        .filter_map(|k| g.data.roles.get(&k))
        .map(|r| {
            json!({"externalOpportunityId": r.external_opportunity_id, "leadId": r.lead_id, "role": r.role,
                   "isPrimary": r.is_primary, "marketoGUID": r.marketo_guid})
        })
        .collect())
}
