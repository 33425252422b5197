//! Field selection: one configured Marketo field, where its value comes from, and how the value
//! is converted. A value that cannot be converted becomes a warning and the field is left out
//! of the plan, so Marketo keeps what it had rather than receiving garbage.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Number, Value};

use crate::dataverse::{Opportunity, json_type};
use crate::ids::Guid;

/// Where a field's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An opportunity attribute, by logical name (`_x_value` for lookups).
    Attribute(Arc<str>),
    /// Computed from several attributes by the conversion itself (close_date).
    Derived,
}

/// What to do when Dataverse has no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NullPolicy {
    /// Send null, clearing Marketo's value.
    Write,
    /// Leave the field out, keeping Marketo's value ("don't overwrite with null").
    Skip,
}

/// How a Dataverse value becomes a Marketo value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conversion {
    /// A GUID, written lowercase.
    Guid,
    /// Text, truncated to the Marketo field's length in characters.
    String {
        max_chars: usize,
    },
    Integer,
    /// Decimal and Money (JSON numbers).
    Decimal,
    Boolean,
    /// `YYYY-MM-DD`; the date part of a date-time is accepted.
    Date,
    /// ISO 8601 date-time, passed through once checked.
    DateTime,
    /// An option set's raw number.
    OptionValue,
    /// An option set's label: from `labels` when configured, else the FormattedValue annotation.
    OptionLabel {
        labels: BTreeMap<i64, Arc<str>>,
    },
    /// True when the option value is one of `values` (isClosed, isWon).
    OptionIn {
        values: Vec<i64>,
    },
    /// A lookup's GUID, or its name (FormattedValue) when `name`.
    Lookup {
        name: bool,
    },
    /// actualclosedate when the opportunity is closed (statecode ≠ 0), else estimatedclosedate.
    CloseDate,
}

/// One validated field rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRule {
    pub marketo: Arc<str>,
    pub source: Source,
    pub conversion: Conversion,
    pub null: NullPolicy,
}

/// The result of applying one rule to one opportunity.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldOutcome {
    /// Write this value (possibly null).
    Set(Value),
    /// Leave the field out, quietly (null with the skip policy).
    Omit,
    /// Leave the field out and tell the operator why.
    Warn(String),
    /// Write this value and tell the operator something about it (truncation).
    SetWithWarning(Value, String),
}

impl FieldRule {
    /// Applies the rule to an opportunity.
    pub fn apply(&self, opportunity: &Opportunity) -> FieldOutcome {
        let value = match &self.source {
            Source::Derived => close_date(opportunity),
            Source::Attribute(name) => match opportunity.attribute(name) {
                // Absent is not null: the attribute was not read, so nothing is known about it.
                None => {
                    return FieldOutcome::Warn(format!("`{name}` is not in the Dataverse record; is it in $select?"));
                }
                Some(Value::Null) => Ok(None),
                Some(v) => self.convert(name, v, opportunity),
            },
        };
        match value {
            Ok(Some(Converted { value, warning: None })) => FieldOutcome::Set(value),
            Ok(Some(Converted {
                value,
                warning: Some(w),
            })) => FieldOutcome::SetWithWarning(value, w),
            Ok(None) => match self.null {
                NullPolicy::Write => FieldOutcome::Set(Value::Null),
                NullPolicy::Skip => FieldOutcome::Omit,
            },
            Err(message) => FieldOutcome::Warn(message),
        }
    }

    fn convert(&self, name: &str, value: &Value, opportunity: &Opportunity) -> Result<Option<Converted>, String> {
        let wrong = |expected: &str| {
            format!(
                "`{name}` holds {} ({}), expected {expected}",
                json_type(value),
                preview(value)
            )
        };
        let plain = |v: Value| {
            Ok(Some(Converted {
                value: v,
                warning: None,
            }))
        };
        match &self.conversion {
            Conversion::Guid | Conversion::Lookup { name: false } => match value {
                Value::String(s) => match Guid::parse(s) {
                    Ok(g) => plain(Value::String(g.to_string())),
                    Err(e) => Err(format!("`{name}`: {e}")),
                },
                _ => Err(wrong("a GUID string")),
            },
            Conversion::Lookup { name: true } => match opportunity.formatted(name) {
                Some(label) => plain(Value::String(label.to_owned())),
                None => Err(format!(
                    "`{name}` has no FormattedValue annotation; request odata.include-annotations"
                )),
            },
            Conversion::String { max_chars } => {
                let text = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return Err(wrong("text")),
                };
                Ok(Some(truncate(text, *max_chars, name)))
            }
            Conversion::Integer | Conversion::OptionValue => match as_integer(value) {
                Some(i) => plain(Value::Number(i.into())),
                None => Err(wrong("a whole number")),
            },
            Conversion::Decimal => match value {
                Value::Number(n) if n.as_f64().is_some_and(f64::is_finite) => plain(Value::Number(n.clone())),
                // Decimal and Money may arrive as strings with IEEE754Compatible=true.
                Value::String(s) => match s.trim().parse::<f64>().ok().and_then(Number::from_f64) {
                    Some(n) => plain(Value::Number(n)),
                    None => Err(wrong("a number")),
                },
                _ => Err(wrong("a number")),
            },
            Conversion::Boolean => match value {
                Value::Bool(b) => plain(Value::Bool(*b)),
                Value::Number(n) if n.as_i64() == Some(0) || n.as_i64() == Some(1) => {
                    plain(Value::Bool(n.as_i64() == Some(1)))
                }
                _ => Err(wrong("true or false")),
            },
            Conversion::Date => match value.as_str().and_then(date_part) {
                Some(d) => plain(Value::String(d.to_owned())),
                None => Err(wrong("a date (YYYY-MM-DD)")),
            },
            Conversion::DateTime => match value.as_str() {
                Some(s) if is_datetime(s) => plain(Value::String(s.to_owned())),
                _ => Err(wrong("an ISO 8601 date-time (YYYY-MM-DDThh:mm:ssZ)")),
            },
            Conversion::OptionLabel { labels } => {
                let Some(number) = as_integer(value) else {
                    return Err(wrong("an option set value"));
                };
                if !labels.is_empty() {
                    return match labels.get(&number) {
                        Some(label) => plain(Value::String(label.to_string())),
                        None => Err(format!(
                            "`{name}` has the unknown option value {number}; add it to labels"
                        )),
                    };
                }
                match opportunity.formatted(name) {
                    Some(label) => plain(Value::String(label.to_owned())),
                    None => Err(format!(
                        "`{name}` = {number} has no FormattedValue label; request odata.include-annotations or configure labels"
                    )),
                }
            }
            Conversion::OptionIn { values } => match as_integer(value) {
                Some(n) => plain(Value::Bool(values.contains(&n))),
                None => Err(wrong("an option set value")),
            },
            Conversion::CloseDate => Err("close_date reads its own attributes".to_owned()),
        }
    }
}

struct Converted {
    value: Value,
    warning: Option<String>,
}

/// closeDate: actualclosedate when the opportunity is closed (statecode ≠ 0), else
/// estimatedclosedate. A closed opportunity without an actual close date falls back to the
/// estimate rather than clearing Marketo's date.
fn close_date(opportunity: &Opportunity) -> Result<Option<Converted>, String> {
    let closed = match opportunity.state {
        Some(0) => false,
        Some(_) => true,
        None => return Err("`statecode` is missing, so open or closed is unknown".to_owned()),
    };
    let read = |attr: &str| -> Result<Option<String>, String> {
        match opportunity.attribute(attr) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_str().and_then(date_part) {
                Some(d) => Ok(Some(d.to_owned())),
                None => Err(format!("`{attr}` is not a date ({})", preview(v))),
            },
        }
    };
    let date = if closed {
        match read("actualclosedate")? {
            Some(d) => Some(d),
            None => read("estimatedclosedate")?,
        }
    } else {
        read("estimatedclosedate")?
    };
    Ok(date.map(|d| Converted {
        value: Value::String(d),
        warning: None,
    }))
}

fn truncate(text: String, max_chars: usize, name: &str) -> Converted {
    match text.char_indices().nth(max_chars) {
        None => Converted {
            value: Value::String(text),
            warning: None,
        },
        Some((cut, _)) => {
            let total = text.chars().count();
            Converted {
                value: Value::String(text[..cut].to_owned()),
                warning: Some(format!(
                    "`{name}` truncated from {total} to {max_chars} characters (the Marketo field's length)"
                )),
            }
        }
    }
}

fn as_integer(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        _ => None,
    }
}

/// A short, safe rendering of a bad value for a warning.
fn preview(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 40 {
        format!("{}…", text.chars().take(40).collect::<String>())
    } else {
        text
    }
}

/// The `YYYY-MM-DD` part of a DateOnly or DateAndTime value, if it is a real calendar date.
pub(crate) fn date_part(text: &str) -> Option<&str> {
    let date = text.get(..10)?;
    let rest = &text[10..];
    if !(rest.is_empty() || rest.starts_with('T')) {
        return None;
    }
    let b = date.as_bytes();
    if b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| date.get(r)?.parse::<u32>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    (y >= 1
        && (1..=days).contains(&d)
        && date
            .bytes()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit()))
    .then_some(date)
}

/// `YYYY-MM-DDThh:mm:ss[.fff](Z|±hh:mm)`.
fn is_datetime(text: &str) -> bool {
    let Some(_) = date_part(text) else { return false };
    let Some(time) = text.get(11..) else { return false };
    let tb = time.as_bytes();
    if text.as_bytes().get(10) != Some(&b'T') || tb.len() < 9 || tb[2] != b':' || tb[5] != b':' {
        return false;
    }
    let two =
        |s: &str, max: u32| s.parse::<u32>().ok().is_some_and(|v| v <= max) && s.bytes().all(|c| c.is_ascii_digit());
    if !(two(&time[0..2], 23) && two(&time[3..5], 59) && two(&time[6..8], 59)) {
        return false;
    }
    let mut rest = &time[8..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &frac[digits..];
    }
    match rest.as_bytes() {
        [b'Z'] => true,
        [b'+' | b'-', _, _, b':', _, _] => two(&rest[1..3], 23) && two(&rest[4..6], 59),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opp(attrs: Value) -> Opportunity {
        let mut v = json!({"opportunityid": "6f3b2c1a-0e4d-4b7a-9c1d-00aa11bb22cc"});
        if let (Value::Object(base), Value::Object(extra)) = (&mut v, attrs) {
            base.extend(extra);
        }
        Opportunity::from_json(v).unwrap()
    }

    fn rule(attr: &str, conversion: Conversion) -> FieldRule {
        FieldRule {
            marketo: Arc::from("f"),
            source: Source::Attribute(Arc::from(attr)),
            conversion,
            null: NullPolicy::Write,
        }
    }

    #[test]
    fn string_is_truncated_to_the_marketo_length_with_a_warning() {
        let o = opp(json!({"name": "é".repeat(300)}));
        match rule("name", Conversion::String { max_chars: 255 }).apply(&o) {
            FieldOutcome::SetWithWarning(Value::String(s), w) => {
                assert_eq!(s.chars().count(), 255);
                assert!(w.contains("truncated from 300 to 255"), "{w}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn string_within_the_length_is_unchanged() {
        let o = opp(json!({"name": "Big deal"}));
        assert_eq!(
            rule("name", Conversion::String { max_chars: 255 }).apply(&o),
            FieldOutcome::Set(json!("Big deal"))
        );
    }

    #[test]
    fn integer_accepts_whole_floats_and_rejects_fractions() {
        let r = rule("closeprobability", Conversion::Integer);
        assert_eq!(
            r.apply(&opp(json!({"closeprobability": 40}))),
            FieldOutcome::Set(json!(40))
        );
        assert_eq!(
            r.apply(&opp(json!({"closeprobability": 40.0}))),
            FieldOutcome::Set(json!(40))
        );
        assert!(matches!(
            r.apply(&opp(json!({"closeprobability": 40.5}))),
            FieldOutcome::Warn(_)
        ));
        assert!(matches!(
            r.apply(&opp(json!({"closeprobability": "forty"}))),
            FieldOutcome::Warn(_)
        ));
    }

    #[test]
    fn decimal_keeps_money_and_parses_ieee754_compatible_strings() {
        let r = rule("estimatedvalue", Conversion::Decimal);
        assert_eq!(
            r.apply(&opp(json!({"estimatedvalue": 12000.5}))),
            FieldOutcome::Set(json!(12000.5))
        );
        assert_eq!(
            r.apply(&opp(json!({"estimatedvalue": "99.25"}))),
            FieldOutcome::Set(json!(99.25))
        );
        assert!(matches!(
            r.apply(&opp(json!({"estimatedvalue": "NaN"}))),
            FieldOutcome::Warn(_)
        ));
        assert!(matches!(
            r.apply(&opp(json!({"estimatedvalue": true}))),
            FieldOutcome::Warn(_)
        ));
    }

    #[test]
    fn boolean_accepts_two_options_as_bool_or_zero_one() {
        let r = rule("new_flag", Conversion::Boolean);
        assert_eq!(r.apply(&opp(json!({"new_flag": true}))), FieldOutcome::Set(json!(true)));
        assert_eq!(r.apply(&opp(json!({"new_flag": 0}))), FieldOutcome::Set(json!(false)));
        assert!(matches!(r.apply(&opp(json!({"new_flag": 2}))), FieldOutcome::Warn(_)));
    }

    #[test]
    fn date_accepts_date_only_and_the_date_of_a_datetime_and_rejects_impossible_dates() {
        let r = rule("d", Conversion::Date);
        assert_eq!(
            r.apply(&opp(json!({"d": "2026-12-31"}))),
            FieldOutcome::Set(json!("2026-12-31"))
        );
        assert_eq!(
            r.apply(&opp(json!({"d": "2026-02-28T10:00:00Z"}))),
            FieldOutcome::Set(json!("2026-02-28"))
        );
        for bad in ["2026-02-30", "2026-13-01", "31/12/2026", "2026-1-01", "", "2026-12-31X"] {
            assert!(
                matches!(r.apply(&opp(json!({"d": bad}))), FieldOutcome::Warn(_)),
                "{bad}"
            );
        }
        assert_eq!(
            r.apply(&opp(json!({"d": "2024-02-29"}))),
            FieldOutcome::Set(json!("2024-02-29"))
        );
    }

    #[test]
    fn datetime_checks_the_iso_shape() {
        let r = rule("modifiedon", Conversion::DateTime);
        for good in [
            "2026-11-20T10:00:00Z",
            "2026-11-20T10:00:00.123Z",
            "2026-11-20T10:00:00+01:00",
        ] {
            assert_eq!(
                r.apply(&opp(json!({"modifiedon": good}))),
                FieldOutcome::Set(json!(good))
            );
        }
        for bad in [
            "2026-11-20",
            "2026-11-20T25:00:00Z",
            "2026-11-20T10:00:00",
            "2026-11-20T10:00:00.Z",
        ] {
            assert!(
                matches!(r.apply(&opp(json!({"modifiedon": bad}))), FieldOutcome::Warn(_)),
                "{bad}"
            );
        }
    }

    #[test]
    fn option_label_prefers_configured_labels_then_the_formatted_value() {
        let labels: BTreeMap<i64, Arc<str>> = [(0, Arc::from("Open"))].into_iter().collect();
        let configured = rule("statecode", Conversion::OptionLabel { labels });
        assert_eq!(
            configured.apply(&opp(json!({"statecode": 0}))),
            FieldOutcome::Set(json!("Open"))
        );
        match configured.apply(&opp(json!({"statecode": 7}))) {
            FieldOutcome::Warn(w) => assert!(w.contains("unknown option value 7"), "{w}"),
            other => panic!("{other:?}"),
        }
        let annotated = rule(
            "salesstage",
            Conversion::OptionLabel {
                labels: BTreeMap::new(),
            },
        );
        let o = opp(json!({"salesstage": 2, "salesstage@OData.Community.Display.V1.FormattedValue": "Propose"}));
        assert_eq!(annotated.apply(&o), FieldOutcome::Set(json!("Propose")));
        assert!(matches!(
            annotated.apply(&opp(json!({"salesstage": 2}))),
            FieldOutcome::Warn(_)
        ));
    }

    #[test]
    fn option_value_and_option_in() {
        assert_eq!(
            rule("salesstage", Conversion::OptionValue).apply(&opp(json!({"salesstage": 3}))),
            FieldOutcome::Set(json!(3))
        );
        let won = rule("statecode", Conversion::OptionIn { values: vec![1] });
        assert_eq!(won.apply(&opp(json!({"statecode": 1}))), FieldOutcome::Set(json!(true)));
        assert_eq!(
            won.apply(&opp(json!({"statecode": 2}))),
            FieldOutcome::Set(json!(false))
        );
    }

    #[test]
    fn lookup_as_guid_or_name() {
        let o = opp(json!({
            "_ownerid_value": "AAAAAAAA-0000-0000-0000-000000000001",
            "_ownerid_value@OData.Community.Display.V1.FormattedValue": "Dana Seller",
        }));
        assert_eq!(
            rule("_ownerid_value", Conversion::Lookup { name: false }).apply(&o),
            FieldOutcome::Set(json!("aaaaaaaa-0000-0000-0000-000000000001"))
        );
        assert_eq!(
            rule("_ownerid_value", Conversion::Lookup { name: true }).apply(&o),
            FieldOutcome::Set(json!("Dana Seller"))
        );
        let bad = opp(json!({"_ownerid_value": "not-a-guid"}));
        assert!(matches!(
            rule("_ownerid_value", Conversion::Lookup { name: false }).apply(&bad),
            FieldOutcome::Warn(_)
        ));
    }

    #[test]
    fn null_policy_write_sends_null_and_skip_leaves_marketo_alone() {
        let mut r = rule("description", Conversion::String { max_chars: 2000 });
        let o = opp(json!({"description": null}));
        assert_eq!(r.apply(&o), FieldOutcome::Set(Value::Null));
        r.null = NullPolicy::Skip;
        assert_eq!(r.apply(&o), FieldOutcome::Omit);
    }

    #[test]
    fn an_attribute_that_was_not_read_is_never_written_as_null() {
        let r = rule("description", Conversion::String { max_chars: 2000 });
        assert!(matches!(r.apply(&opp(json!({}))), FieldOutcome::Warn(w) if w.contains("$select")));
    }

    #[test]
    fn close_date_is_actual_when_closed_and_estimated_when_open() {
        let r = FieldRule {
            marketo: Arc::from("closeDate"),
            source: Source::Derived,
            conversion: Conversion::CloseDate,
            null: NullPolicy::Write,
        };
        let both = json!({"actualclosedate": "2026-10-01", "estimatedclosedate": "2026-12-31"});
        let mut open = both.clone();
        open["statecode"] = json!(0);
        let mut won = both.clone();
        won["statecode"] = json!(1);
        assert_eq!(r.apply(&opp(open)), FieldOutcome::Set(json!("2026-12-31")));
        assert_eq!(r.apply(&opp(won)), FieldOutcome::Set(json!("2026-10-01")));
        let lost_without_actual = json!({"statecode": 2, "actualclosedate": null, "estimatedclosedate": "2026-12-31"});
        assert_eq!(
            r.apply(&opp(lost_without_actual)),
            FieldOutcome::Set(json!("2026-12-31"))
        );
        assert!(matches!(
            r.apply(&opp(json!({"estimatedclosedate": "2026-12-31"}))),
            FieldOutcome::Warn(_)
        ));
    }
}
