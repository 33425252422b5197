//! Sales persons: sync by externalSalesPersonId, describe (Adobe's sales-persons page).

use super::*;

const SALES_PERSON_CHECKS: RecordChecks<'static, String> = RecordChecks {
    // "Sales Person APIs are read-only access for subscriptions which have SFDC Sync or
    // Microsoft Dynamics Sync enabled."
    read_only_with_crm: true,
    key: |r| {
        r.get("externalSalesPersonId")
            .and_then(Value::as_str)
            .map(str::to_owned)
    },
    missing_key: "Value for required field 'externalSalesPersonId' not specified",
    duplicate: "Duplicate externalSalesPersonId in input",
    fields: SALES_PERSON_FIELDS,
    custom_fields: |_| &[],
    fault_key: |k| k.clone(),
};

/// Sync Sales Persons (sales-persons page, "Create and Update"): `dedupeBy` dedupeFields, keyed
/// by externalSalesPersonId; results with `seq`, `status` and the integer `id`. The describe
/// example gives externalSalesPersonId and email a length of 255: longer is skipped (1003).
pub(super) fn sales_person_sync(g: &mut Inner, body: &Value) -> Result<Vec<Value>, Refusal> {
    let too_long = |record: &Map<String, Value>| {
        ["externalSalesPersonId", "email"]
            .into_iter()
            .find(|f| {
                record
                    .get(*f)
                    .and_then(Value::as_str)
                    .is_some_and(|v| v.chars().count() > 255)
            })
            .map(|field| ("1003", format!("{field} longer than 255")))
    };
    super::companies::upsert_with_id(g, body, &SALES_PERSON_CHECKS, too_long, |d| &mut d.sales_persons)
}

/// Describe Sales Persons (sales-persons page, "Describe"): the page's example.
pub(super) fn sales_person_describe() -> Vec<Value> {
    let field = |name: &str, display: &str, kind: &str| {
        let mut f = json!({"name": name, "displayName": display, "dataType": kind, "updateable": false});
        if kind == "string" {
            f["length"] = json!(255);
        }
        f
    };
    vec![json!({
        "name": "SalesPerson",
        "idField": "id",
        "dedupeFields": ["externalSalesPersonId"],
        "searchableFields": [["email"], ["id"], ["externalSalesPersonId"]],
        "fields": [
            field("id", "Marketo Id", "integer"),
            field("createdAt", "Created At", "datetime"),
            field("updatedAt", "Updated At", "datetime"),
            field("email", "Email", "string"),
            field("externalSalesPersonId", "External Sales Person Id", "string"),
        ],
    })]
}
