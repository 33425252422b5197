//! The state table's stream as Lambda delivers it: records read from moto's DynamoDB Streams
//! API (the real record shape), kept or dropped by an event source's filter pattern, and cut
//! into batches of the mapping's size.

use serde_json::{Value, json};

/// Reads a table's stream from the start, shard by shard, over moto's JSON API.
pub struct StreamReader {
    http: reqwest::Client,
    endpoint: String,
    arn: String,
    /// Each open shard's next iterator.
    iterators: Vec<String>,
    /// Each shard's last sequence number read: a page that brings nothing newer ends the read,
    /// so an iterator that does not advance cannot loop forever.
    last: Vec<u128>,
}

impl StreamReader {
    /// Opens the table's latest stream at its oldest record (TRIM_HORIZON, as the template's
    /// event sources start).
    pub async fn open(client: &aws_sdk_dynamodb::Client, endpoint: &str, table: &str) -> StreamReader {
        let described = client.describe_table().table_name(table).send().await.unwrap();
        let arn = described
            .table()
            .and_then(|t| t.latest_stream_arn())
            .unwrap_or_else(|| panic!("table {table} has no stream"))
            .to_owned();
        let mut reader = StreamReader {
            http: reqwest::Client::new(),
            endpoint: endpoint.to_owned(),
            arn,
            iterators: Vec::new(),
            last: Vec::new(),
        };
        let stream = reader.call("DescribeStream", json!({"StreamArn": reader.arn})).await;
        let shards = stream["StreamDescription"]["Shards"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(!shards.is_empty(), "the stream has no shard: {stream}");
        for shard in shards {
            let it = reader
                .call(
                    "GetShardIterator",
                    json!({"StreamArn": reader.arn, "ShardId": shard["ShardId"], "ShardIteratorType": "TRIM_HORIZON"}),
                )
                .await;
            reader.iterators.push(it["ShardIterator"].as_str().unwrap().to_owned());
            reader.last.push(0);
        }
        reader
    }

    pub fn arn(&self) -> &str {
        &self.arn
    }

    /// Every record written since the last read, in stream order, each with the
    /// `eventSourceARN` Lambda adds.
    pub async fn read(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        for i in 0..self.iterators.len() {
            loop {
                let page = self
                    .call("GetRecords", json!({"ShardIterator": self.iterators[i], "Limit": 1000}))
                    .await;
                if let Some(next) = page["NextShardIterator"].as_str() {
                    self.iterators[i] = next.to_owned();
                }
                let records = page["Records"].as_array().cloned().unwrap_or_default();
                let sequence = |r: &Value| {
                    r["dynamodb"]["SequenceNumber"]
                        .as_str()
                        .and_then(|n| n.parse::<u128>().ok())
                        .unwrap_or(0)
                };
                let fresh: Vec<Value> = records.into_iter().filter(|r| sequence(r) > self.last[i]).collect();
                if fresh.is_empty() {
                    break;
                }
                for mut r in fresh {
                    self.last[i] = self.last[i].max(sequence(&r));
                    r["eventSourceARN"] = json!(self.arn);
                    out.push(r);
                }
            }
        }
        out
    }

    async fn call(&self, action: &str, body: Value) -> Value {
        let response = self
            .http
            .post(&self.endpoint)
            .header("Content-Type", "application/x-amz-json-1.0")
            .header("X-Amz-Target", format!("DynamoDBStreams_20120810.{action}"))
            // moto routes by the credential scope's service name; it does not check signatures.
            .header(
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=0",
            )
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "{action}: HTTP {status}: {text}");
        serde_json::from_str(&text).unwrap()
    }
}

/// Whether `record` passes a Lambda filter pattern of the form the template uses: objects
/// nest, an array lists what a leaf may be (a value, or `{"exists": bool}`, which the Lambda
/// filtering page allows on leaf nodes only and which matches a missing field when false).
pub fn matches(pattern: &Value, record: &Value) -> bool {
    matches_at(pattern, Some(record))
}

fn matches_at(pattern: &Value, value: Option<&Value>) -> bool {
    match pattern {
        Value::Object(fields) => fields.iter().all(|(k, p)| matches_at(p, value.and_then(|v| v.get(k)))),
        Value::Array(allowed) => allowed.iter().any(|a| match a.get("exists").and_then(Value::as_bool) {
            Some(exists) => exists == value.is_some_and(|v| !v.is_object() && !v.is_array()),
            None => value == Some(a),
        }),
        other => value == Some(other),
    }
}

/// The records an event source with `pattern` delivers, in batches of at most `batch_size`,
/// as the event JSON its function receives.
pub fn events(records: &[Value], pattern: &Value, batch_size: usize) -> Vec<Value> {
    let kept: Vec<&Value> = records.iter().filter(|r| matches(pattern, r)).collect();
    kept.chunks(batch_size.max(1))
        .map(|chunk| json!({ "Records": chunk }))
        .collect()
}
