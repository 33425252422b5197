//! Connection → opportunity links: a deleted connection arrives as an id alone, so the link
//! recorded when it was seen says which opportunity lost a stakeholder.

use super::*;

impl DynamoStore {
    /// Stores connection → opportunity links (a deleted connection names no opportunity).
    pub(super) async fn put_links(&self, links: &[(String, OpportunityId)]) -> Result<(), StateError> {
        // Link items carry no `status`, so the stream filters never pass them to a function.
        let mut unique: HashMap<String, OpportunityId> = HashMap::new();
        for (connection, opportunity) in links {
            unique.insert(connection.to_ascii_lowercase(), *opportunity);
        }
        let requests: Vec<WriteRequest> = unique
            .into_iter()
            .map(|(connection, opportunity)| {
                let put = PutRequest::builder()
                    .item("pk", s(format!("conn#{connection}")))
                    .item("opp", s(opportunity.to_string()))
                    .build()
                    .map_err(|e| StateError::Dynamo {
                        operation: "BatchWriteItem (links)",
                        message: e.to_string(),
                        retryable: false,
                    })?;
                Ok(WriteRequest::builder().put_request(put).build())
            })
            .collect::<Result<_, StateError>>()?;
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
                    .map_err(|e| dynamo_err("BatchWriteItem (links)", e))?;
                request = out.unprocessed_items.unwrap_or_default();
                request.retain(|_, v| !v.is_empty());
            }
        }
        Ok(())
    }

    /// The opportunities these connections were linked to.
    pub(super) async fn get_links(&self, connections: &[String]) -> Result<Vec<OpportunityId>, StateError> {
        let mut wanted: Vec<String> = connections.iter().map(|c| c.to_ascii_lowercase()).collect();
        wanted.sort();
        wanted.dedup();
        let mut out = std::collections::BTreeSet::new();
        for chunk in wanted.chunks(100) {
            let mut keys = KeysAndAttributes::builder();
            for connection in chunk {
                keys = keys.keys(HashMap::from([("pk".to_owned(), s(format!("conn#{connection}")))]));
            }
            let mut request: HashMap<String, KeysAndAttributes> = HashMap::from([(
                self.table.to_string(),
                keys.build().map_err(|e| StateError::Dynamo {
                    operation: "BatchGetItem (links)",
                    message: e.to_string(),
                    retryable: false,
                })?,
            )]);
            while !request.is_empty() {
                let out_page = self
                    .client
                    .batch_get_item()
                    .set_request_items(Some(request))
                    .send()
                    .await
                    .map_err(|e| dynamo_err("BatchGetItem (links)", e))?;
                for items in out_page.responses.unwrap_or_default().into_values() {
                    for item in items {
                        let text = get_s(&item, "opp").unwrap_or_default();
                        let id = OpportunityId::parse(text).map_err(|e| StateError::Corrupt {
                            key: get_s(&item, "pk").unwrap_or_default().to_owned(),
                            reason: e.to_string(),
                        })?;
                        out.insert(id);
                    }
                }
                request = out_page.unprocessed_keys.unwrap_or_default();
            }
        }
        Ok(out.into_iter().collect())
    }
}
