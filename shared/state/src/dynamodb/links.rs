//! Small keyed values beside the records: connection → opportunity links (a deleted connection
//! arrives as an id alone, so the link recorded when it was seen says which opportunity lost a
//! stakeholder) and lead key → Marketo lead id. None carries a `status`, so the stream filters
//! never pass them to a function.

use super::*;

impl DynamoStore {
    /// Stores connection → opportunity links.
    pub(super) async fn put_links(&self, links: &[(String, OpportunityId)]) -> Result<(), StateError> {
        let mut unique: HashMap<String, OpportunityId> = HashMap::new();
        for (connection, opportunity) in links {
            unique.insert(connection.to_ascii_lowercase(), *opportunity);
        }
        let values = unique
            .into_iter()
            .map(|(connection, opportunity)| (format!("conn#{connection}"), s(opportunity.to_string())));
        self.put_values("BatchWriteItem (links)", "opp", values).await
    }

    /// The opportunities these connections were linked to.
    pub(super) async fn get_links(&self, connections: &[String]) -> Result<Vec<OpportunityId>, StateError> {
        let keys: Vec<String> = connections
            .iter()
            .map(|c| format!("conn#{}", c.to_ascii_lowercase()))
            .collect();
        let mut out = std::collections::BTreeSet::new();
        for (key, value) in self.get_values("BatchGetItem (links)", "opp", &keys).await? {
            let text = value.as_s().map(String::as_str).unwrap_or_default();
            let id = OpportunityId::parse(text).map_err(|e| StateError::Corrupt {
                key,
                reason: e.to_string(),
            })?;
            out.insert(id);
        }
        Ok(out.into_iter().collect())
    }

    /// Stores lead key → Marketo lead id.
    pub(super) async fn put_leads(&self, leads: &[(String, i64)]) -> Result<(), StateError> {
        let unique: HashMap<String, i64> = leads.iter().map(|(k, id)| (format!("leadid#{k}"), *id)).collect();
        let values = unique.into_iter().map(|(key, id)| (key, n(id)));
        self.put_values("BatchWriteItem (leads)", "lead", values).await
    }

    /// The remembered lead ids of these lead keys.
    pub(super) async fn get_leads(&self, keys: &[String]) -> Result<HashMap<String, i64>, StateError> {
        let wanted: Vec<String> = keys.iter().map(|k| format!("leadid#{k}")).collect();
        let mut out = HashMap::new();
        for (key, value) in self.get_values("BatchGetItem (leads)", "lead", &wanted).await? {
            let id = value.as_n().ok().and_then(|t| t.parse::<i64>().ok());
            let Some(id) = id else {
                return Err(StateError::Corrupt {
                    key,
                    reason: "a remembered lead id that is not a number".into(),
                });
            };
            out.insert(key.trim_start_matches("leadid#").to_owned(), id);
        }
        Ok(out)
    }

    /// Forgets the remembered lead ids of these lead keys.
    pub(super) async fn delete_leads(&self, keys: &[String]) -> Result<(), StateError> {
        let requests: Vec<WriteRequest> = keys
            .iter()
            .map(|k| {
                let delete = DeleteRequest::builder()
                    .key("pk", s(format!("leadid#{k}")))
                    .build()
                    .map_err(|e| build_error("BatchWriteItem (leads)", e))?;
                Ok(WriteRequest::builder().delete_request(delete).build())
            })
            .collect::<Result<_, StateError>>()?;
        self.batch_write("BatchWriteItem (leads)", requests).await
    }

    /// Puts `pk` → one attribute, 25 items a request.
    async fn put_values(
        &self,
        operation: &'static str,
        attribute: &str,
        values: impl Iterator<Item = (String, AttributeValue)>,
    ) -> Result<(), StateError> {
        let requests: Vec<WriteRequest> = values
            .map(|(key, value)| {
                let put = PutRequest::builder()
                    .item("pk", s(key))
                    .item(attribute, value)
                    .build()
                    .map_err(|e| build_error(operation, e))?;
                Ok(WriteRequest::builder().put_request(put).build())
            })
            .collect::<Result<_, StateError>>()?;
        self.batch_write(operation, requests).await
    }

    async fn batch_write(&self, operation: &'static str, requests: Vec<WriteRequest>) -> Result<(), StateError> {
        for chunk in requests.chunks(25) {
            let mut request = HashMap::from([(self.table.to_string(), chunk.to_vec())]);
            // BatchWriteItem may leave some items unprocessed; send those again.
            while !request.is_empty() {
                self.count_write();
                let out = self
                    .client
                    .batch_write_item()
                    .set_request_items(Some(request))
                    .send()
                    .await
                    .map_err(|e| dynamo_err(operation, e))?;
                request = out.unprocessed_items.unwrap_or_default();
                request.retain(|_, v| !v.is_empty());
            }
        }
        Ok(())
    }

    /// Reads one attribute of the items with these `pk`s (missing ones left out), 100 keys a
    /// request; each `pk` once.
    async fn get_values(
        &self,
        operation: &'static str,
        attribute: &str,
        keys: &[String],
    ) -> Result<Vec<(String, AttributeValue)>, StateError> {
        let mut wanted: Vec<&String> = keys.iter().collect();
        wanted.sort();
        wanted.dedup();
        let mut out = Vec::new();
        for chunk in wanted.chunks(100) {
            let mut keys = KeysAndAttributes::builder();
            for key in chunk {
                keys = keys.keys(HashMap::from([("pk".to_owned(), s(key.as_str()))]));
            }
            let mut request: HashMap<String, KeysAndAttributes> = HashMap::from([(
                self.table.to_string(),
                keys.build().map_err(|e| build_error(operation, e))?,
            )]);
            while !request.is_empty() {
                let page = self
                    .client
                    .batch_get_item()
                    .set_request_items(Some(request))
                    .send()
                    .await
                    .map_err(|e| dynamo_err(operation, e))?;
                for items in page.responses.unwrap_or_default().into_values() {
                    for mut item in items {
                        let key = get_s(&item, "pk").unwrap_or_default().to_owned();
                        if let Some(value) = item.remove(attribute) {
                            out.push((key, value));
                        }
                    }
                }
                request = page.unprocessed_keys.unwrap_or_default();
            }
        }
        Ok(out)
    }
}

fn build_error(operation: &'static str, e: aws_sdk_dynamodb::error::BuildError) -> StateError {
    StateError::Dynamo {
        operation,
        message: e.to_string(),
        retryable: false,
    }
}
