//! One `[[mapping.fields]]` entry validated into a [`FieldRule`]: the names on both sides, the
//! conversion and its options, lengths, the null policy; every problem collected with its key.

use super::*;

pub(crate) fn is_marketo_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 100
}

pub(crate) fn is_logical_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

pub(super) struct Errors(pub(super) Vec<ConfigError>);

impl Errors {
    pub(super) fn push(&mut self, key: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) {
        self.0.push(ConfigError {
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
        });
    }
}

/// A two-way choice with the first as the default; true means the first.
pub(super) fn choice(value: &Option<String>, key: &str, first: &str, second: &str, errors: &mut Errors) -> bool {
    match value.as_deref() {
        None => true,
        Some(v) if v == first => true,
        Some(v) if v == second => false,
        Some(v) => {
            errors.push(
                key,
                format!("unknown value `{v}`"),
                format!("use \"{first}\" or \"{second}\""),
            );
            true
        }
    }
}

pub(super) const CONVERSIONS: &str =
    "guid, string, integer, decimal, money, boolean, date, datetime, option, option_in, lookup, close_date";

/// Validates one field entry into a rule; problems go to `errors`.
pub(super) fn field_rule(field: &FieldConfig, key: &str, errors: &mut Errors) -> Option<FieldRule> {
    let before = errors.0.len();
    let marketo = field.marketo.trim();
    if marketo == EXTERNAL_COMPANY_ID {
        errors.push(
            format!("{key}.marketo"),
            "externalCompanyId is set by the Potential Customer rules",
            "remove this entry; the customer's account becomes the company",
        );
    } else if !is_marketo_name(marketo) {
        errors.push(
            format!("{key}.marketo"),
            format!("`{marketo}` is not a Marketo field name"),
            "use the field's REST API name from Marketo's opportunity describe, like amount or myCustomField",
        );
    }

    let unexpected = |errors: &mut Errors, option: &str, present: bool| {
        if present {
            errors.push(
                format!("{key}.{option}"),
                format!("`{option}` does not apply to type \"{}\"", field.kind),
                format!("remove `{option}` or change the type"),
            );
        }
    };
    let kind = field.kind.as_str();
    unexpected(errors, "max_length", field.max_length.is_some() && kind != "string");
    unexpected(errors, "label", field.label.is_some() && kind != "option");
    unexpected(errors, "labels", field.labels.is_some() && kind != "option");
    unexpected(errors, "values", field.values.is_some() && kind != "option_in");
    unexpected(errors, "lookup", field.lookup.is_some() && kind != "lookup");

    let conversion = match kind {
        "guid" => Conversion::Guid,
        "string" => {
            let max = match field.max_length {
                None => marketo_string_length(marketo),
                Some(n) if (1..=65_535).contains(&n) => n as usize,
                Some(n) => {
                    errors.push(
                        format!("{key}.max_length"),
                        format!("{n} is not a usable length"),
                        "use the Marketo field's length, 1 to 65535 (255 for a string field)",
                    );
                    255
                }
            };
            Conversion::String { max_chars: max }
        }
        "integer" => Conversion::Integer,
        "decimal" | "money" => Conversion::Decimal,
        "boolean" => Conversion::Boolean,
        "date" => Conversion::Date,
        "datetime" => Conversion::DateTime,
        "option" => {
            let mut labels = BTreeMap::new();
            for (value, label) in field.labels.iter().flatten() {
                match value.trim().parse::<i64>() {
                    Ok(v) => {
                        labels.insert(v, Arc::<str>::from(label.as_str()));
                    }
                    Err(_) => errors.push(
                        format!("{key}.labels"),
                        format!("`{value}` is not an option value"),
                        "key each label by its option set value, like labels = { \"0\" = \"Open\" }",
                    ),
                }
            }
            if field.label == Some(false) && !labels.is_empty() {
                errors.push(
                    format!("{key}.labels"),
                    "labels are given but label = false sends the raw value",
                    "remove label = false or remove labels",
                );
            }
            if field.label == Some(false) {
                Conversion::OptionValue
            } else {
                Conversion::OptionLabel { labels }
            }
        }
        "option_in" => match &field.values {
            Some(values) if !values.is_empty() => Conversion::OptionIn { values: values.clone() },
            _ => {
                errors.push(
                    format!("{key}.values"),
                    "option_in needs the option values that mean true",
                    "add values = [1] (for example, statecode 1 = Won)",
                );
                Conversion::OptionIn { values: Vec::new() }
            }
        },
        "lookup" => match field.lookup.as_deref() {
            None | Some("guid") => Conversion::Lookup { name: false },
            Some("name") => Conversion::Lookup { name: true },
            Some(other) => {
                errors.push(
                    format!("{key}.lookup"),
                    format!("unknown lookup output `{other}`"),
                    "use \"guid\" or \"name\"",
                );
                Conversion::Lookup { name: false }
            }
        },
        "close_date" => Conversion::CloseDate,
        other => {
            errors.push(
                format!("{key}.type"),
                format!("unknown conversion `{other}`"),
                format!("use one of: {CONVERSIONS}"),
            );
            Conversion::Guid
        }
    };

    let source = match (&conversion, field.dataverse.as_deref().map(str::trim)) {
        (Conversion::CloseDate, None) => Source::Derived,
        (Conversion::CloseDate, Some(_)) => {
            errors.push(
                format!("{key}.dataverse"),
                "close_date reads actualclosedate, estimatedclosedate and statecode itself",
                "remove `dataverse` from this entry",
            );
            Source::Derived
        }
        (_, None) => {
            errors.push(
                format!("{key}.dataverse"),
                "missing: which Dataverse attribute feeds this field?",
                "add dataverse = \"<logical name>\", like estimatedvalue",
            );
            Source::Derived
        }
        (_, Some(attr)) if !is_logical_name(attr) => {
            errors.push(
                format!("{key}.dataverse"),
                format!("`{attr}` is not a Dataverse logical name"),
                "use the attribute's logical name in lowercase, like estimatedvalue or new_region",
            );
            Source::Derived
        }
        (Conversion::Lookup { .. }, Some(attr)) => {
            // Accept `ownerid` as well as the Web API's `_ownerid_value`.
            let normalized = if attr.starts_with('_') && attr.ends_with("_value") {
                attr.to_owned()
            } else {
                format!("_{attr}_value")
            };
            Source::Attribute(Arc::from(normalized))
        }
        (_, Some(attr)) => Source::Attribute(Arc::from(attr)),
    };

    if marketo == EXTERNAL_OPPORTUNITY_ID
        && !(matches!(conversion, Conversion::Guid)
            && matches!(&source, Source::Attribute(a) if &**a == "opportunityid"))
    {
        errors.push(
            key.to_string(),
            "externalOpportunityId must come from opportunityid as a guid: a deleted opportunity is known by its id alone",
            "use { marketo = \"externalOpportunityId\", dataverse = \"opportunityid\", type = \"guid\" }",
        );
    }

    let null = match field.null.as_deref() {
        None | Some("write") => NullPolicy::Write,
        Some("skip") => NullPolicy::Skip,
        Some(other) => {
            errors.push(
                format!("{key}.null"),
                format!("unknown null policy `{other}`"),
                "use \"write\" (send null) or \"skip\" (don't overwrite Marketo's value with null)",
            );
            NullPolicy::Write
        }
    };

    (errors.0.len() == before).then(|| FieldRule {
        marketo: Arc::from(marketo),
        source,
        conversion,
        null,
    })
}
