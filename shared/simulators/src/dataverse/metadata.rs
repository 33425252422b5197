//! Column definitions, as "Query table definitions using the Web API" shows them:
//! `EntityDefinitions(LogicalName='…')/Attributes` with the common properties, and the typed
//! casts (`/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata`, …) that alone can
//! `$expand` `OptionSet` and `GlobalOptionSet` (the page: "you can't include the OptionSet or
//! GlobalOptionSet … within the $select filter of this query", so the common query refuses it).

use super::*;

/// (logical name, AttributeType, display name, custom, AttributeOf, options).
type Column = (
    &'static str,
    &'static str,
    &'static str,
    bool,
    Option<&'static str>,
    &'static [(i64, &'static str)],
);

const STATE: &[(i64, &str)] = &[(0, "Open"), (1, "Won"), (2, "Lost")];
const STATUS: &[(i64, &str)] = &[
    (1, "In Progress"),
    (2, "On Hold"),
    (3, "Won"),
    (4, "Canceled"),
    (5, "Out-Sold"),
];
const SALES_STAGE: &[(i64, &str)] = &[(0, "Qualify"), (1, "Develop"), (2, "Propose"), (3, "Close")];

/// The opportunity's columns (../shared/docs/dataverse.md, "Opportunity"), a helper column
/// (`owneridname`, AttributeOf ownerid) and the two custom columns the seed and the demo use.
const OPPORTUNITY: &[Column] = &[
    ("opportunityid", "Uniqueidentifier", "Opportunity", false, None, &[]),
    ("name", "String", "Topic", false, None, &[]),
    ("description", "Memo", "Description", false, None, &[]),
    ("estimatedvalue", "Money", "Est. Revenue", false, None, &[]),
    ("estimatedvalue_base", "Money", "Est. Revenue (Base)", false, None, &[]),
    ("actualvalue", "Money", "Actual Revenue", false, None, &[]),
    ("estimatedclosedate", "DateTime", "Est. Close Date", false, None, &[]),
    ("actualclosedate", "DateTime", "Actual Close Date", false, None, &[]),
    ("closeprobability", "Integer", "Probability", false, None, &[]),
    ("stepname", "String", "Pipeline Phase", false, None, &[]),
    ("salesstage", "Picklist", "Sales Stage", false, None, SALES_STAGE),
    ("statecode", "State", "Status", false, None, STATE),
    ("statuscode", "Status", "Status Reason", false, None, STATUS),
    ("ownerid", "Owner", "Owner", false, None, &[]),
    ("owneridname", "String", "", false, Some("ownerid"), &[]),
    ("customerid", "Customer", "Potential Customer", false, None, &[]),
    ("parentaccountid", "Lookup", "Account", false, None, &[]),
    ("parentcontactid", "Lookup", "Contact", false, None, &[]),
    ("transactioncurrencyid", "Lookup", "Currency", false, None, &[]),
    ("modifiedon", "DateTime", "Modified On", false, None, &[]),
    ("versionnumber", "BigInt", "Version Number", false, None, &[]),
    ("new_region", "String", "Region", true, None, &[]),
    ("new_synctomkto", "Boolean", "Sync to Marketo", true, None, &[]),
];

fn label(text: &str) -> Value {
    let one = json!({"Label": text, "LanguageCode": 1033, "IsManaged": true, "MetadataId": null, "HasChanged": null});
    if text.is_empty() {
        json!({"LocalizedLabels": [], "UserLocalizedLabel": null})
    } else {
        json!({"LocalizedLabels": [one.clone()], "UserLocalizedLabel": one})
    }
}

fn metadata_type(attribute_type: &str) -> String {
    let name = match attribute_type {
        "Uniqueidentifier" => "UniqueIdentifier",
        "Customer" | "Owner" => "Lookup",
        other => other,
    };
    format!("#Microsoft.Dynamics.CRM.{name}AttributeMetadata")
}

/// `EntityDefinitions(LogicalName='{logical}')/Attributes[/{cast}]`.
pub(super) fn attributes(
    logical: &str,
    cast: Option<&str>,
    select: Option<String>,
    expand: Option<String>,
) -> Response {
    let columns: &[Column] = match logical {
        "opportunity" => OPPORTUNITY,
        _ if super::odata::table_of_logical(logical).is_some() => &[],
        _ => {
            return odata_error(
                StatusCode::NOT_FOUND,
                "0x80040217",
                &format!("Could not find an entity with LogicalName = {logical}"),
            );
        }
    };
    let wanted_type = match cast {
        None => None,
        Some("Microsoft.Dynamics.CRM.PicklistAttributeMetadata") => Some("Picklist"),
        Some("Microsoft.Dynamics.CRM.StateAttributeMetadata") => Some("State"),
        Some("Microsoft.Dynamics.CRM.StatusAttributeMetadata") => Some("Status"),
        Some(other) => {
            return odata_error(
                StatusCode::BAD_REQUEST,
                "0x80060888",
                &format!("Resource not found for the segment '{other}'."),
            );
        }
    };
    let expand = expand.unwrap_or_default();
    if wanted_type.is_none() && expand.contains("OptionSet") {
        return odata_error(
            StatusCode::BAD_REQUEST,
            "0x80060888",
            "Could not find a property named 'OptionSet' on type 'Microsoft.Dynamics.CRM.AttributeMetadata'.",
        );
    }
    let select: Option<Vec<String>> = select.map(|s| s.split(',').map(str::to_owned).collect());
    let shown = |name: &str| select.as_ref().is_none_or(|s| s.iter().any(|x| x == name));
    let value: Vec<Value> = columns
        .iter()
        .filter(|c| wanted_type.is_none_or(|t| t == c.1))
        .map(|&(name, kind, display, custom, of, options)| {
            let mut row = Map::new();
            row.insert("@odata.type".into(), json!(metadata_type(kind)));
            row.insert(
                "MetadataId".into(),
                json!(format!("{:08x}-0000-4000-8000-000000000000", name.len())),
            );
            let all = [
                ("LogicalName", json!(name)),
                ("AttributeType", json!(kind)),
                ("AttributeOf", json!(of)),
                ("IsCustomAttribute", json!(custom)),
                ("IsValidForRead", json!(true)),
                ("DisplayName", label(display)),
            ];
            for (key, v) in all {
                if shown(key) {
                    row.insert(key.into(), v);
                }
            }
            if expand.contains("OptionSet") {
                let options: Vec<Value> = options
                    .iter()
                    .map(|(v, text)| json!({"Value": v, "Label": label(text), "Color": null, "IsManaged": true}))
                    .collect();
                row.insert("OptionSet".into(), json!({"Options": options, "MetadataId": null}));
                row.insert("GlobalOptionSet".into(), Value::Null);
            }
            Value::Object(row)
        })
        .collect();
    axum::Json(json!({
        "@odata.context": format!("{API}$metadata#EntityDefinitions('{logical}')/Attributes"),
        "value": value,
    }))
    .into_response()
}
