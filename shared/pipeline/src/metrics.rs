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

    /// Marketo calls counted (every `MarketoCalls.<operation>`).
    pub fn marketo_calls(&self) -> u64 {
        self.counts
            .iter()
            .filter(|(name, _)| name.starts_with("MarketoCalls."))
            .map(|(_, n)| n)
            .sum()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_emf_document_declares_every_metric_under_the_namespace_with_its_value_at_the_root() {
        let mut m = Metrics::default();
        m.count("OpportunitiesSynced", 3);
        m.count("OpportunitiesSynced", 2);
        m.count("MarketoCalls.opportunities", 1);
        m.observe_ms("SyncLag", 1500.0);
        m.observe_ms("SyncLag", 250.0);
        let doc = m.emf("writer", 1_764_532_800_000);
        let directive = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(doc["_aws"]["Timestamp"], 1_764_532_800_000i64);
        assert_eq!(directive["Namespace"], NAMESPACE);
        assert_eq!(directive["Dimensions"], json!([["function"]]));
        assert_eq!(doc["function"], "writer");
        let declared: Vec<(&str, &str)> = directive["Metrics"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| (d["Name"].as_str().unwrap_or(""), d["Unit"].as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            declared,
            vec![
                ("MarketoCalls.opportunities", "Count"),
                ("OpportunitiesSynced", "Count"),
                ("SyncLag", "Milliseconds")
            ]
        );
        assert_eq!(doc["OpportunitiesSynced"], 5);
        assert_eq!(doc["SyncLag"], json!([1500.0, 250.0]));
    }

    #[test]
    fn emf_caps_a_metric_at_100_values_per_document() {
        let mut m = Metrics::default();
        for i in 0..150 {
            m.observe_ms("SyncLag", f64::from(i));
        }
        assert_eq!(m.emf("writer", 0)["SyncLag"].as_array().map(Vec::len), Some(100));
    }
}
