//! Leads: lookup by a field, and Sync Leads (results without `seq`).

use super::*;

pub(super) fn lead_matches<'a>(g: &'a Inner, field: &str, value: &str) -> Vec<&'a SimLead> {
    g.data
        .lead_index
        .get(&Data::index_key(field, value))
        .into_iter()
        .flatten()
        .filter_map(|id| g.data.leads.get(id))
        .collect()
}

/// Get Leads by Filter Type (leads page, "Query"): up to 300 `filterValues`; no match is
/// `success: true` with an empty result; no `seq`.
pub(super) fn lead_query(g: &Inner, params: &HashMap<String, String>) -> Result<Vec<Value>, Refusal> {
    let field = params.get("filterType").cloned().unwrap_or_default();
    if field != "email" && field != "id" && !g.config.custom_lead_fields.contains(&field) {
        return Err(refusal("1003", &format!("Invalid filterType '{field}'")));
    }
    let values: Vec<&str> = params
        .get("filterValues")
        .map(|v| v.split(',').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    if values.len() > g.config.max_batch {
        return Err(refusal("1003", "Too many filterValues"));
    }
    let mut found: Vec<&SimLead> = Vec::new();
    for value in values {
        if field == "id" {
            found.extend(value.parse::<i64>().ok().and_then(|id| g.data.leads.get(&id)));
        } else {
            found.extend(lead_matches(g, &field, value));
        }
    }
    // Leads page: "If the number of leads matching the lead filter is greater than 1,000 an
    // error is returned: 1003, Too many results match the filter".
    if found.len() > 1000 {
        return Err(refusal("1003", "Too many results match the filter"));
    }
    // Leads page: without `fields`, id, email, updatedAt, createdAt, firstName and lastName;
    // with it, those fields, a field with no value left out ("implied to be null").
    let default_fields = "email,updatedAt,createdAt,firstName,lastName";
    let wanted: Vec<&str> = params
        .get("fields")
        .map_or(default_fields, String::as_str)
        .split(',')
        .map(str::trim)
        .collect();
    Ok(found
        .into_iter()
        .map(|lead| {
            let mut out = Map::new();
            out.insert("id".into(), json!(lead.id));
            for f in &wanted {
                if let Some(v) = lead.fields.get(*f).filter(|v| !v.is_null()) {
                    out.insert((*f).to_owned(), v.clone());
                }
            }
            Value::Object(out)
        })
        .collect())
}

/// Sync Leads (leads page, "Create and Update"): `action` createOrUpdate by default,
/// `lookupField` email by default; 1007 when the key matches several leads, 1005/1004 for
/// createOnly/updateOnly (error-codes page).
///
/// A key in `raced` was carried by another call in flight at the same time: this call creates a
/// new lead for it, whatever exists (Adobe's leads page warns that concurrent upserts with one
/// key value can create duplicate leads; the strictest reading is that they do).
pub(super) fn lead_sync(g: &mut Inner, body: &Value, raced: &HashSet<String>) -> Result<Vec<Value>, Refusal> {
    let input = inputs(g, body)?.clone();
    let action = body.get("action").and_then(Value::as_str).unwrap_or("createOrUpdate");
    let lookup = body
        .get("lookupField")
        .and_then(Value::as_str)
        .unwrap_or("email")
        .to_owned();
    let mut results = Vec::with_capacity(input.len());
    // Results in input order, without `seq` (leads page, "Create and Update"; error-codes page).
    for record in &input {
        let Some(record) = record.as_object() else {
            results.push(lead_skipped("1003", "Invalid record"));
            continue;
        };
        if let Some(field) = unknown_field(record, LEAD_FIELDS, &g.config.custom_lead_fields) {
            results.push(lead_skipped("1006", &format!("Field '{field}' not found")));
            continue;
        }
        if record.contains_key("id") && action != "updateOnly" {
            // Leads page: "The id field can only be included ... when using the updateOnly action".
            results.push(lead_skipped("1003", "Invalid data"));
            continue;
        }
        let Some(key) = record.get(&lookup).and_then(Value::as_str).map(str::to_owned) else {
            results.push(lead_skipped(
                "1003",
                &format!("Value for lookup field '{lookup}' not specified"),
            ));
            continue;
        };
        if let Some(code) = record_fault(g, &key) {
            results.push(lead_skipped(code, "Injected record fault"));
            continue;
        }
        let matches: Vec<i64> = if raced.contains(&super::server::lead_key(&lookup, &key)) && action != "updateOnly" {
            Vec::new()
        } else {
            lead_matches(g, &lookup, &key).iter().map(|l| l.id).collect()
        };
        match (action, matches.as_slice()) {
            (_, [_, _, ..]) => results.push(lead_skipped("1007", "Multiple lead match lookup criteria")),
            ("createOnly", [_]) => results.push(lead_skipped("1005", "Lead already exists")),
            ("updateOnly", []) => results.push(lead_skipped("1004", "Lead not found")),
            (_, [id]) => {
                let id = *id;
                if let Some(mut lead) = g.data.leads.get(&id).cloned() {
                    lead.fields.extend(record.clone());
                    g.data.put_lead(lead);
                }
                results.push(json!({"id": id, "status": "updated"}));
            }
            (_, []) => {
                g.data.next_id += 1;
                let id = g.data.next_id;
                g.data.put_lead(SimLead {
                    id,
                    fields: record.clone(),
                });
                results.push(json!({"id": id, "status": "created"}));
            }
        }
    }
    Ok(results)
}
