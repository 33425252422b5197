//! `template.yaml`, read as CloudFormation reads it: short-form tags (`!Ref X`, `!GetAtt A.B`,
//! `!Sub ...`) become their long forms (`{"Ref": "X"}`, `{"Fn::GetAtt": ["A", "B"]}`, ...), and
//! the whole document becomes JSON that tests can walk.

use serde_json::{Map, Value, json};
use serde_norway::value::TaggedValue;

use crate::repo_root;

/// The template as JSON.
pub fn load() -> Value {
    let text = std::fs::read_to_string(repo_root().join("template.yaml")).unwrap();
    let yaml: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    to_json(yaml)
}

fn to_json(v: serde_norway::Value) -> Value {
    use serde_norway::Value as Y;
    match v {
        Y::Null => Value::Null,
        Y::Bool(b) => json!(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                json!(i)
            } else {
                json!(n.as_f64())
            }
        }
        Y::String(s) => json!(s),
        Y::Sequence(items) => Value::Array(items.into_iter().map(to_json).collect()),
        Y::Mapping(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let key = match k {
                    Y::String(s) => s,
                    other => serde_norway::to_string(&other).unwrap().trim().to_owned(),
                };
                out.insert(key, to_json(v));
            }
            Value::Object(out)
        }
        Y::Tagged(tagged) => long_form(*tagged),
    }
}

fn long_form(TaggedValue { tag, value }: TaggedValue) -> Value {
    let name = tag.to_string();
    let name = name.trim_start_matches('!');
    let inner = to_json(value);
    match name {
        "Ref" => json!({ "Ref": inner }),
        // `!GetAtt A.B` is `{"Fn::GetAtt": ["A", "B"]}`.
        "GetAtt" => match inner {
            Value::String(s) => {
                let (resource, attribute) = s.split_once('.').unwrap_or((&s, ""));
                json!({ "Fn::GetAtt": [resource, attribute] })
            }
            other => json!({ "Fn::GetAtt": other }),
        },
        other => json!({ format!("Fn::{other}"): inner }),
    }
}

/// The resources of a type, by logical id.
pub fn resources<'t>(template: &'t Value, kind: &str) -> Vec<(&'t str, &'t Value)> {
    template["Resources"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, r)| r["Type"] == kind)
        .map(|(k, r)| (k.as_str(), r))
        .collect()
}

/// A function's stream event source: its filter pattern (parsed) and batch size.
pub fn stream_source(template: &Value, function: &str, event: &str) -> (Value, usize) {
    let props = &template["Resources"][function]["Properties"]["Events"][event]["Properties"];
    let pattern = props["FilterCriteria"]["Filters"][0]["Pattern"]
        .as_str()
        .unwrap_or_else(|| panic!("{function}.{event} has no filter pattern"));
    let batch = props["BatchSize"].as_u64().unwrap_or(100) as usize;
    (serde_json::from_str(pattern).unwrap(), batch)
}
