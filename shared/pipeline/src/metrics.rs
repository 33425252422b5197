//! CloudWatch embedded metric format: one JSON line per report, written to stdout by the
//! Lambda functions, where CloudWatch turns it into metrics without an API call.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// The namespace every oppsync metric is published under.
pub const NAMESPACE: &str = "oppsync";

/// A set of metrics from one step, published together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// Counts, in CloudWatch's `Count` unit.
    pub counts: BTreeMap<String, u64>,
    /// Durations in milliseconds (sync lag), each a list of observations.
    pub millis: BTreeMap<String, Vec<f64>>,
}

impl Metrics {
    pub fn count(&mut self, name: impl Into<String>, n: u64) {
        *self.counts.entry(name.into()).or_default() += n;
    }

    pub fn observe_ms(&mut self, name: impl Into<String>, ms: f64) {
        self.millis.entry(name.into()).or_default().push(ms);
    }

    pub fn merge(&mut self, other: Metrics) {
        for (k, v) in other.counts {
            self.count(k, v);
        }
        for (k, v) in other.millis {
            self.millis.entry(k).or_default().extend(v);
        }
    }

    /// The EMF document for these metrics, with the function name as the one dimension.
    pub fn emf(&self, function: &str, timestamp_ms: i64) -> Value {
        let mut definitions = Vec::new();
        let mut root = serde_json::Map::new();
        for (name, n) in &self.counts {
            definitions.push(json!({"Name": name, "Unit": "Count"}));
            root.insert(name.clone(), json!(n));
        }
        for (name, values) in &self.millis {
            if values.is_empty() {
                continue;
            }
            definitions.push(json!({"Name": name, "Unit": "Milliseconds"}));
            // EMF takes an array of values for one metric in one document (at most 100).
            let values: Vec<f64> = values.iter().copied().take(100).collect();
            root.insert(name.clone(), json!(values));
        }
        root.insert("function".into(), json!(function));
        root.insert(
            "_aws".into(),
            json!({
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": NAMESPACE,
                    "Dimensions": [["function"]],
                    "Metrics": definitions,
                }],
            }),
        );
        Value::Object(root)
    }
}
