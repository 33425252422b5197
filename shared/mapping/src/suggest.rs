//! `oppsync fields`: the Dataverse opportunity columns and the Marketo opportunity fields side
//! by side, with a suggested mapping (the native default pairs, the fields the rules set, the
//! standard pairs, then matching names of compatible types), and that suggestion as a ready,
//! commented `[mapping]` configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;

use crate::config::{
    EXTERNAL_COMPANY_ID, EXTERNAL_OPPORTUNITY_ID, EXTERNAL_SALES_PERSON_ID, FieldConfig, MappingConfig, default_fields,
};

/// A Dataverse column, as its definition describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Column {
    pub name: String,
    /// AttributeType: String, Memo, Integer, Money, Picklist, Lookup, …
    pub kind: String,
    pub display: Option<String>,
    pub custom: bool,
    /// Option values and labels (Picklist, State, Status).
    pub options: BTreeMap<i64, String>,
}

/// A Marketo opportunity field, as describe shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Field {
    pub name: String,
    /// dataType: string, text, integer, float, currency, boolean, date, datetime, …
    pub kind: String,
    pub display: Option<String>,
    pub length: Option<i64>,
    pub updateable: bool,
}

/// Why a pair is suggested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Why {
    /// Marketo's native default mapping (`[mapping] defaults = true`).
    Default,
    /// Set by the customer or owner rule, not by field selection.
    Rule,
    /// A standard Marketo field with a standard Dynamics column.
    Standard,
    /// The names match (a custom column's publisher prefix aside), or the display names do.
    Name,
}

/// One suggested Marketo field and where its value would come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pair {
    pub marketo: String,
    pub marketo_kind: String,
    /// `None` for a field the rules set, and for `closeDate` (read from three columns).
    pub dataverse: Option<String>,
    pub dataverse_kind: Option<String>,
    /// The oppsync conversion (`type` in the configuration), or `rule`.
    pub conversion: String,
    pub why: Why,
    /// The Marketo field or the Dataverse column is custom.
    pub custom: bool,
    #[serde(skip)]
    entry: Option<FieldConfig>,
}

/// A Marketo field and a Dataverse column whose names match but whose types cannot be converted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub marketo: String,
    pub marketo_kind: String,
    pub dataverse: String,
    pub dataverse_kind: String,
}

/// The whole suggestion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Suggestion {
    pub pairs: Vec<Pair>,
    /// Default fields the Marketo instance does not have (excluded in the configuration).
    pub excluded_defaults: Vec<String>,
    pub mismatches: Vec<Mismatch>,
    /// Updateable Marketo fields nothing was found for.
    pub unmatched_marketo: Vec<String>,
    /// Custom Dataverse columns no field uses.
    pub unmatched_dataverse: Vec<String>,
    /// A custom Two Options column that looks like the native sync's filter (`…synctomkto`).
    pub sync_filter: Option<String>,
}

/// Lowercase letters and digits only: `dealRegion`, `deal_region` and "Deal Region" compare equal.
fn norm(text: &str) -> String {
    text.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// A custom column's name without its publisher prefix (`new_region` → `region`).
fn unprefixed(column: &Column) -> &str {
    match column.name.split_once('_') {
        Some((_, rest)) if column.custom && !rest.is_empty() => rest,
        _ => &column.name,
    }
}

fn entry(marketo: &str, dataverse: &str, kind: &str) -> FieldConfig {
    FieldConfig::new(marketo, Some(dataverse), kind)
}

/// The configuration entry that converts `column` into `field`, if their types allow one (and
/// both names are ones a configuration can hold).
fn convert(field: &Field, column: &Column) -> Option<FieldConfig> {
    if !crate::config::is_marketo_name(&field.name) || !crate::config::is_logical_name(&column.name) {
        return None;
    }
    let numeric = matches!(
        column.kind.as_str(),
        "Integer" | "BigInt" | "Decimal" | "Double" | "Money"
    );
    let choice = matches!(column.kind.as_str(), "Picklist" | "State" | "Status");
    let lookup = matches!(column.kind.as_str(), "Lookup" | "Customer" | "Owner");
    let labels = || {
        Some(
            column
                .options
                .iter()
                .map(|(v, l)| (v.to_string(), l.clone()))
                .collect::<BTreeMap<_, _>>(),
        )
        .filter(|l| !l.is_empty())
    };
    let name = &column.name;
    let e = match (field.kind.as_str(), column.kind.as_str()) {
        ("string" | "text", "String" | "Memo") => FieldConfig {
            max_length: field.length.filter(|_| field.kind == "string"),
            ..entry(&field.name, name, "string")
        },
        ("string" | "text", _) if choice => FieldConfig {
            // Fixed labels: the FormattedValue is localized to the Dynamics application user.
            labels: labels(),
            ..entry(&field.name, name, "option")
        },
        ("string" | "text", _) if lookup => entry(&field.name, name, "lookup"),
        ("string" | "text", "Uniqueidentifier") => entry(&field.name, name, "guid"),
        ("string" | "text", "DateTime") => entry(&field.name, name, "datetime"),
        ("integer", "Integer" | "BigInt") => entry(&field.name, name, "integer"),
        ("integer", _) if choice => FieldConfig {
            label: Some(false),
            ..entry(&field.name, name, "option")
        },
        ("float" | "currency", _) if numeric => entry(&field.name, name, "decimal"),
        ("boolean", "Boolean") => entry(&field.name, name, "boolean"),
        ("date", "DateTime") => entry(&field.name, name, "date"),
        ("datetime", "DateTime") => entry(&field.name, name, "datetime"),
        _ => return None,
    };
    Some(e)
}

/// Standard Marketo fields with a standard Dynamics column, beyond the native defaults.
const STANDARD_PAIRS: [(&str, &str); 1] = [("nextStep", "stepname")];

/// Builds the suggestion. `sales_persons`: the owner rule sets `externalSalesPersonId`.
pub fn suggest(columns: &[Column], fields: &[Field], sales_persons: bool) -> Suggestion {
    let by_name: BTreeMap<&str, &Column> = columns.iter().map(|c| (c.name.as_str(), c)).collect();
    let field_named = |name: &str| fields.iter().find(|f| f.name == name);
    let mut pairs = Vec::new();
    let mut excluded_defaults = Vec::new();
    let mut used_fields: BTreeSet<String> = BTreeSet::new();
    let mut used_columns: BTreeSet<String> = BTreeSet::new();

    for default in default_fields() {
        used_fields.insert(default.marketo.clone());
        let Some(field) = field_named(&default.marketo) else {
            if default.marketo != EXTERNAL_OPPORTUNITY_ID {
                excluded_defaults.push(default.marketo.clone());
            }
            continue;
        };
        let column = default.dataverse.as_deref().and_then(|d| by_name.get(d));
        used_columns.extend(default.dataverse.clone());
        pairs.push(Pair {
            marketo: field.name.clone(),
            marketo_kind: field.kind.clone(),
            dataverse: default.dataverse.clone(),
            dataverse_kind: column.map(|c| c.kind.clone()),
            conversion: default.kind.clone(),
            why: Why::Default,
            custom: false,
            entry: None,
        });
    }
    let mut rule_fields = vec![EXTERNAL_COMPANY_ID];
    if sales_persons {
        rule_fields.push(EXTERNAL_SALES_PERSON_ID);
    }
    for name in rule_fields {
        used_fields.insert(name.to_owned());
        if let Some(field) = field_named(name) {
            pairs.push(Pair {
                marketo: field.name.clone(),
                marketo_kind: field.kind.clone(),
                dataverse: None,
                dataverse_kind: None,
                conversion: "rule".into(),
                why: Why::Rule,
                custom: false,
                entry: None,
            });
        }
    }
    let mut mismatches = Vec::new();
    let mut add = |field: &Field, column: &Column, why: Why, pairs: &mut Vec<Pair>| match convert(field, column) {
        Some(e) => {
            used_columns.insert(column.name.clone());
            pairs.push(Pair {
                marketo: field.name.clone(),
                marketo_kind: field.kind.clone(),
                dataverse: Some(column.name.clone()),
                dataverse_kind: Some(column.kind.clone()),
                conversion: e.kind.clone(),
                why,
                custom: column.custom,
                entry: Some(e),
            });
            true
        }
        None => {
            mismatches.push(Mismatch {
                marketo: field.name.clone(),
                marketo_kind: field.kind.clone(),
                dataverse: column.name.clone(),
                dataverse_kind: column.kind.clone(),
            });
            false
        }
    };
    for (marketo, dataverse) in STANDARD_PAIRS {
        if let (Some(field), Some(column)) = (field_named(marketo), by_name.get(dataverse))
            && !used_fields.contains(marketo)
            && field.updateable
        {
            used_fields.insert(marketo.to_owned());
            add(field, column, Why::Standard, &mut pairs);
        }
    }
    let mut unmatched_marketo = Vec::new();
    for field in fields.iter().filter(|f| f.updateable && !used_fields.contains(&f.name)) {
        let wanted = norm(&field.name);
        let display = field.display.as_deref().map(norm).filter(|d| !d.is_empty());
        let found = columns
            .iter()
            .find(|c| norm(&c.name) == wanted || norm(unprefixed(c)) == wanted)
            .or_else(|| {
                display.as_ref().and_then(|d| {
                    columns
                        .iter()
                        .find(|c| c.display.as_deref().map(norm).as_ref() == Some(d))
                })
            });
        match found {
            Some(column) if add(field, column, Why::Name, &mut pairs) => {
                if let Some(last) = pairs.last_mut() {
                    last.custom |= !crate::config::is_standard_marketo_field(&field.name);
                }
            }
            Some(_) => {}
            None => unmatched_marketo.push(field.name.clone()),
        }
    }
    let sync_filter = columns
        .iter()
        .find(|c| c.custom && c.kind == "Boolean" && norm(&c.name).ends_with("synctomkto"))
        .map(|c| c.name.clone());
    let unmatched_dataverse = columns
        .iter()
        .filter(|c| c.custom && !used_columns.contains(&c.name) && Some(&c.name) != sync_filter.as_ref())
        .map(|c| c.name.clone())
        .collect();
    Suggestion {
        pairs,
        excluded_defaults,
        mismatches,
        unmatched_marketo,
        unmatched_dataverse,
        sync_filter,
    }
}

/// A TOML string, quoted and escaped.
fn quoted(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// A comment's text on one line.
fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

impl Suggestion {
    /// The suggestion as a commented `[mapping]` section that `oppsync validate` accepts.
    pub fn to_toml(&self, sales_persons: bool, columns: &[Column]) -> String {
        let display = |name: &str| {
            columns
                .iter()
                .find(|c| c.name == name)
                .and_then(|c| c.display.clone())
                .map(|d| format!(" \"{}\"", one_line(&d)))
                .unwrap_or_default()
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Written by `oppsync fields`: the Dynamics opportunity columns matched to this Marketo\n\
             # instance's opportunity fields. Review it, then check it with\n\
             # `oppsync validate --config <this file>`. README.md, \"Configuration\", has every key.\n"
        );
        let _ = writeln!(out, "[mapping]");
        let _ = writeln!(
            out,
            "defaults = true          # Marketo's native default mapping: {}",
            self.pairs
                .iter()
                .filter(|p| p.why == Why::Default)
                .map(|p| p.marketo.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if !self.excluded_defaults.is_empty() {
            let names: Vec<String> = self.excluded_defaults.iter().map(|n| quoted(n)).collect();
            let _ = writeln!(
                out,
                "exclude = [{}]   # default fields this Marketo instance does not have",
                names.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "sales_persons = {sales_persons}     # owners become Marketo sales persons (externalSalesPersonId)"
        );
        if let Some(filter) = &self.sync_filter {
            let _ = writeln!(
                out,
                "# sync_filter = {}   # a Two Options column: only an explicit No keeps a record out",
                quoted(filter)
            );
        }
        for pair in self.pairs.iter().filter(|p| p.entry.is_some()) {
            let Some(e) = &pair.entry else { continue };
            let source = e.dataverse.as_deref().unwrap_or_default();
            let _ = writeln!(
                out,
                "\n# {} ({}) <- {}{} ({}{}): {}",
                pair.marketo,
                pair.marketo_kind,
                source,
                display(source),
                pair.dataverse_kind.as_deref().unwrap_or("?"),
                if pair.custom { ", custom" } else { "" },
                match pair.why {
                    Why::Standard => "standard pair",
                    Why::Name => "matching names",
                    Why::Default | Why::Rule => "",
                }
            );
            let _ = writeln!(out, "[[mapping.fields]]");
            let _ = writeln!(out, "marketo = {}", quoted(&e.marketo));
            let _ = writeln!(out, "dataverse = {}", quoted(source));
            let _ = writeln!(out, "type = {}", quoted(&e.kind));
            if let Some(n) = e.max_length {
                let _ = writeln!(out, "max_length = {n}");
            }
            if e.label == Some(false) {
                let _ = writeln!(out, "label = false");
            }
            if let Some(labels) = &e.labels {
                let items: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{} = {}", quoted(k), quoted(v)))
                    .collect();
                let _ = writeln!(out, "labels = {{ {} }}", items.join(", "));
            }
        }
        if !self.unmatched_marketo.is_empty() {
            let _ = writeln!(
                out,
                "\n# Marketo fields no Dynamics column was found for; to map one, add an entry like:\n\
                 # [[mapping.fields]]\n# marketo = \"<field>\"\n# dataverse = \"<column>\"\n# type = \"string\"\n#\n# {}",
                one_line(&self.unmatched_marketo.join(", "))
            );
        }
        for m in &self.mismatches {
            let _ = writeln!(
                out,
                "# {}",
                one_line(&format!(
                    "{} ({}) and {} ({}) match by name, but no conversion turns one into the other",
                    m.marketo, m.marketo_kind, m.dataverse, m.dataverse_kind
                ))
            );
        }
        if !self.unmatched_dataverse.is_empty() {
            let _ = writeln!(
                out,
                "\n# Custom Dynamics columns no Marketo field matches (create the field in Marketo to sync one):\n# {}",
                one_line(&self.unmatched_dataverse.join(", "))
            );
        }
        out
    }

    /// Parses and validates what [`Suggestion::to_toml`] wrote: a suggestion is only offered
    /// if oppsync would accept it.
    pub fn check(text: &str) -> Result<(), crate::ConfigErrors> {
        MappingConfig::from_toml(text)?.validate().map(|_| ())
    }
}
