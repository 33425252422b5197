//! A table's column definitions (`EntityDefinitions(LogicalName='…')/Attributes`), with the
//! options of its choice columns: what `oppsync fields` offers for mapping. (Query table
//! definitions using the Web API: the attributes' common properties, then one request per
//! attribute type cast for the option sets, which the common query cannot expand.)

use std::collections::BTreeMap;

use serde_json::Value;

use crate::{DataverseClient, DataverseError, EntitySet};

/// One column of a table, as its definition describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeDefinition {
    pub logical_name: String,
    /// `AttributeType` (AttributeTypeCode): String, Memo, Integer, BigInt, Decimal, Double,
    /// Money, Boolean, DateTime, Picklist, State, Status, Lookup, Customer, Owner,
    /// Uniqueidentifier, Virtual, …
    pub attribute_type: String,
    /// The user's label (`DisplayName.UserLocalizedLabel.Label`), when there is one.
    pub display_name: Option<String>,
    pub is_custom: bool,
    /// Option values and their labels, for Picklist, State and Status columns.
    pub options: BTreeMap<i64, String>,
}

/// The casts whose `OptionSet` holds the options (Boolean's has TrueOption/FalseOption instead).
const OPTION_CASTS: [&str; 3] = [
    "Microsoft.Dynamics.CRM.PicklistAttributeMetadata",
    "Microsoft.Dynamics.CRM.StateAttributeMetadata",
    "Microsoft.Dynamics.CRM.StatusAttributeMetadata",
];

fn label(value: &Value) -> Option<String> {
    value["UserLocalizedLabel"]["Label"]
        .as_str()
        .or_else(|| value["LocalizedLabels"][0]["Label"].as_str())
        .map(str::to_owned)
}

impl DataverseClient {
    /// The readable columns of `set`'s table that hold data of their own (helper columns with
    /// `AttributeOf`, like `owneridname`, left out), by logical name, with their options.
    pub async fn attribute_definitions(&self, set: EntitySet) -> Result<Vec<AttributeDefinition>, DataverseError> {
        let base = format!("EntityDefinitions(LogicalName='{}')/Attributes", set.logical());
        let url = |path: &str, pairs: &[(&str, &str)]| {
            let mut url = self.api_url(path)?;
            for (k, v) in pairs {
                url.query_pairs_mut().append_pair(k, v);
            }
            Ok::<_, DataverseError>(url)
        };
        let common = self
            .get(
                url(
                    &base,
                    &[(
                        "$select",
                        "LogicalName,AttributeType,AttributeOf,IsCustomAttribute,IsValidForRead,DisplayName",
                    )],
                )?,
                &[],
            )
            .await?;
        let rows = common["value"]
            .as_array()
            .ok_or_else(|| DataverseError::Decode(format!("{base} answered without a value array")))?;
        let mut found: BTreeMap<String, AttributeDefinition> = BTreeMap::new();
        for row in rows {
            let Some(name) = row["LogicalName"].as_str() else {
                continue;
            };
            if !row["AttributeOf"].is_null() || row["IsValidForRead"] == Value::Bool(false) {
                continue;
            }
            found.insert(
                name.to_owned(),
                AttributeDefinition {
                    logical_name: name.to_owned(),
                    attribute_type: row["AttributeType"].as_str().unwrap_or("Virtual").to_owned(),
                    display_name: label(&row["DisplayName"]),
                    is_custom: row["IsCustomAttribute"].as_bool().unwrap_or(false),
                    options: BTreeMap::new(),
                },
            );
        }
        for cast in OPTION_CASTS {
            let typed = self
                .get(
                    url(
                        &format!("{base}/{cast}"),
                        &[
                            ("$select", "LogicalName"),
                            ("$expand", "OptionSet($select=Options),GlobalOptionSet($select=Options)"),
                        ],
                    )?,
                    &[],
                )
                .await?;
            for row in typed["value"].as_array().into_iter().flatten() {
                let Some(attribute) = row["LogicalName"].as_str().and_then(|n| found.get_mut(n)) else {
                    continue;
                };
                // A column on a global choice has its options there; a local one in OptionSet.
                let set = if row["OptionSet"]["Options"].is_array() {
                    &row["OptionSet"]
                } else {
                    &row["GlobalOptionSet"]
                };
                for option in set["Options"].as_array().into_iter().flatten() {
                    if let (Some(value), Some(text)) = (option["Value"].as_i64(), label(&option["Label"])) {
                        attribute.options.insert(value, text);
                    }
                }
            }
        }
        Ok(found.into_values().collect())
    }
}
