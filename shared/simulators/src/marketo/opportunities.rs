//! Opportunities: sync, delete (roles share it), query, describe.

use super::roles::role_key;
use super::*;

const OPPORTUNITY_CHECKS: RecordChecks<'static, String> = RecordChecks {
    read_only_with_crm: true,
    key: |r| {
        r.get("externalOpportunityId")
            .and_then(Value::as_str)
            .map(str::to_owned)
    },
    missing_key: "Value for required field 'externalOpportunityId' not specified",
    duplicate: "Duplicate externalOpportunityId in input",
    fields: STANDARD_OPPORTUNITY_FIELDS,
    custom_fields: |c| &c.custom_opportunity_fields,
    fault_key: |k| k.clone(),
};

/// Sync Opportunities (opportunities page, "Create and Update"): `action` createOrUpdate by
/// default, `externalOpportunityId` required, every `externalSalesPersonId` known (718),, `name` not null on create; results with `seq` and
/// `marketoGUID`. Read-only with native CRM sync: each record skipped with 1018.
pub(super) fn opportunity_sync(g: &mut Inner, body: &Value) -> Result<Vec<Value>, Refusal> {
    let input = inputs(g, body)?.clone();
    // Error-codes page, 718 "ExternalSalesPersonID not found": "A Sync Opportunities call was
    // made with a non-existent ExternalSalesPersonID value" — the whole call fails.
    let unknown_sales_person = input.iter().any(|r| {
        r.get("externalSalesPersonId")
            .and_then(Value::as_str)
            .is_some_and(|id| !g.data.sales_persons.contains_key(id))
    });
    if unknown_sales_person && !g.config.crm_enabled {
        return Err(refusal("718", "ExternalSalesPersonID not found"));
    }
    let action = body.get("action").and_then(Value::as_str).unwrap_or("createOrUpdate");
    let mut seen = std::collections::HashSet::new();
    let mut results = Vec::with_capacity(input.len());
    for (seq, record) in input.iter().enumerate() {
        let (record, key) = match check_record(g, seq, record, &mut seen, &OPPORTUNITY_CHECKS) {
            Ok(checked) => checked,
            Err(skip) => {
                results.push(skip);
                continue;
            }
        };
        if key.chars().count() > 50 {
            results.push(skipped(seq, "1003", "externalOpportunityId longer than 50"));
            continue;
        }
        // Opportunities page: "The 'name' field must not be null" (on an update too: the page
        // does not limit it to creates, so the strict reading).
        if record.get("name").is_some_and(Value::is_null) {
            results.push(skipped(seq, "1003", "Value for required field 'name' not specified"));
            continue;
        }
        let exists = g.data.opportunities.contains_key(&key);
        match (action, exists) {
            ("createOnly", true) => results.push(skipped(seq, "1005", "Opportunity already exists")),
            ("updateOnly", false) => results.push(skipped(seq, "1013", "Opportunity not found")),
            (_, true) => {
                let stored = g.data.opportunities.get_mut(&key).map(|o| {
                    o.extend(record.clone());
                    o.get("marketoGUID").cloned().unwrap_or(Value::Null)
                });
                results.push(json!({"seq": seq, "status": "updated", "marketoGUID": stored}));
            }
            (_, false) => {
                if record.get("name").is_none_or(Value::is_null) {
                    results.push(skipped(seq, "1003", "Value for required field 'name' not specified"));
                    continue;
                }
                let guid = new_guid(g, "opp");
                let mut stored = record.clone();
                stored.insert("marketoGUID".into(), json!(guid));
                g.data.opportunities.insert(key, stored);
                results.push(json!({"seq": seq, "status": "created", "marketoGUID": guid}));
            }
        }
    }
    Ok(results)
}

/// Delete Opportunities / Opportunity Roles (their pages, "Delete"): `deleteBy` dedupeFields;
/// results with `seq`, `marketoGUID` and `status: deleted`; a record not found is skipped with
/// 1013 (companies page, "Delete").
pub(super) fn delete(g: &mut Inner, body: &Value, kind: Kind) -> Result<Vec<Value>, Refusal> {
    let input = inputs(g, body)?.clone();
    let mut results = Vec::with_capacity(input.len());
    for (seq, record) in input.iter().enumerate() {
        let record = record.as_object().cloned().unwrap_or_default();
        if g.config.crm_enabled {
            results.push(skipped(seq, "1018", "CRM Enabled"));
            continue;
        }
        let found = match kind {
            Kind::Opportunity => record
                .get("externalOpportunityId")
                .and_then(Value::as_str)
                .and_then(|k| g.data.opportunities.remove(k))
                .and_then(|o| o.get("marketoGUID").cloned()),
            Kind::Role => role_key(&record)
                .and_then(|k| g.data.roles.remove(&k))
                .map(|r| json!(r.marketo_guid)),
            Kind::Company | Kind::SalesPerson => None,
        };
        match found {
            Some(guid) => results.push(json!({"seq": seq, "status": "deleted", "marketoGUID": guid})),
            None => results.push(skipped(seq, "1013", "Record not found")),
        }
    }
    Ok(results)
}

pub(super) fn query_by(g: &Inner, params: &HashMap<String, String>, kind: Kind) -> Result<Vec<Value>, Refusal> {
    let values: Vec<&str> = params
        .get("filterValues")
        .map(|v| v.split(',').collect())
        .unwrap_or_default();
    if values.len() > g.config.max_batch {
        return Err(refusal("1003", "Too many filterValues"));
    }
    let table = match kind {
        Kind::Opportunity => &g.data.opportunities,
        Kind::SalesPerson => &g.data.sales_persons,
        _ => &g.data.companies,
    };
    // The opportunities, companies and sales-persons pages show query results with `seq`.
    Ok(values
        .into_iter()
        .filter_map(|v| table.get(v).cloned())
        .enumerate()
        .map(|(seq, mut record)| {
            record.insert("seq".into(), json!(seq));
            Value::Object(record)
        })
        .collect())
}

/// The data type the simulator describes a standard opportunity field with. The opportunities
/// page's describe example shows four fields (marketoGUID, createdAt, updatedAt,
/// externalOpportunityId); the other types are inferred from the fields' meaning
/// (docs/API-FIDELITY.md).
fn opportunity_field_type(name: &str) -> (&'static str, Option<u32>) {
    match name {
        "externalOpportunityId" => ("string", Some(50)),
        "description" => ("text", None),
        "amount" | "expectedRevenue" => ("currency", None),
        "probability" | "quantity" | "fiscalYear" | "fiscalQuarter" => ("integer", None),
        "closeDate" | "lastActivityDate" => ("date", None),
        "isClosed" | "isWon" => ("boolean", None),
        _ => ("string", Some(255)),
    }
}

/// Describe Opportunity / Opportunity Role (their pages, "Describe"): name, idField,
/// dedupeFields and the fields with `dataType`, `length` and `updateable`.
pub(super) fn describe(g: &Inner, kind: Kind) -> Result<Vec<Value>, Refusal> {
    let field = |name: &str, display: &str, kind: &str, length: Option<u32>, updateable: bool| {
        let mut f = json!({"name": name, "displayName": display, "dataType": kind, "updateable": updateable});
        if let Some(length) = length {
            f["length"] = json!(length);
        }
        f
    };
    let (name, id_field, dedupe, fields): (&str, &str, Vec<&str>, Vec<Value>) = match kind {
        Kind::Opportunity => {
            // The page's example: the id, the timestamps and the key, none updateable.
            let mut fields = vec![
                field("marketoGUID", "Marketo GUID", "string", Some(36), false),
                field("createdAt", "Created At", "datetime", None, false),
                field("updatedAt", "Updated At", "datetime", None, false),
            ];
            for f in STANDARD_OPPORTUNITY_FIELDS {
                let (kind, length) = opportunity_field_type(f);
                fields.push(field(f, f, kind, length, *f != "externalOpportunityId"));
            }
            for f in &g.config.custom_opportunity_fields {
                fields.push(field(f, f, "string", Some(255), true));
            }
            ("opportunity", "marketoGUID", vec!["externalOpportunityId"], fields)
        }
        _ => (
            "opportunityRole",
            "marketoGUID",
            vec!["externalOpportunityId", "leadId", "role"],
            ROLE_FIELDS
                .iter()
                .map(|f| field(f, f, if *f == "leadId" { "integer" } else { "string" }, None, true))
                .collect(),
        ),
    };
    Ok(vec![json!({
        "name": name,
        "idField": id_field,
        "dedupeFields": dedupe,
        "fields": fields,
    })])
}
