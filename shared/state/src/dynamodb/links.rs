//! Small keyed values beside the records: connection → opportunity links (a deleted connection
//! arrives as an id alone, so the link recorded when it was seen says which opportunity lost a
//! stakeholder), lead key → Marketo lead id, lead-creation locks, and the processes sharing the
//! Marketo budget. None
//! carries a `status`, so the stream filters never pass them to a function.

use super::*;
use crate::overlapped;

impl DynamoStore {
    pub(super) async fn take_locks(&self, keys: &[String], ttl_ms: i64, now: Millis) -> Result<Vec<bool>, StateError> {
        let expires = now + ttl_ms;
        // A key named twice in one call is taken once, by its first mention: sent twice at once,
        // which of the two requests won would be a race.
        let mut seen = std::collections::HashSet::new();
        let first: Vec<bool> = keys.iter().map(|key| seen.insert(key.as_str())).collect();
        let takes: Vec<_> = keys
            .iter()
            .zip(first)
            .map(|(key, first)| {
                if first {
                    // An update creates the item when it is missing: the writer's role needs no PutItem.
                    self.count_write();
                }
                let request = self
                    .client
                    .update_item()
                    .table_name(&*self.table)
                    .key("pk", s(format!("lock#{key}")))
                    // DynamoDB's TTL removes the item some time after `expire_at_s` (seconds since the
                    // epoch); the condition reads `expires`, so a late removal changes nothing.
                    .update_expression(format!("SET expires = :e, {} = :x", attr::EXPIRE_AT))
                    .condition_expression("attribute_not_exists(pk) OR expires <= :now")
                    .expression_attribute_values(":e", n(expires))
                    .expression_attribute_values(":x", n(expires / 1000 + 3600))
                    .expression_attribute_values(":now", n(now));
                async move {
                    if !first {
                        return Ok(false);
                    }
                    match request.send().await {
                        Ok(_) => Ok(true),
                        Err(e) if is_condition_failed(&e) => Ok(false),
                        Err(e) => Err(dynamo_err("UpdateItem (lock)", e)),
                    }
                }
            })
            .collect();
        // A bounded number in flight: a batch's hundreds of new leads are not hundreds of
        // requests at once.
        overlapped(takes).await.into_iter().collect()
    }
    pub(super) async fn free_locks(&self, keys: &[String], ttl_ms: i64, now: Millis) -> Result<(), StateError> {
        let unique: std::collections::BTreeSet<&String> = keys.iter().collect();
        let frees: Vec<_> = unique
            .into_iter()
            .map(|key| {
                self.count_write();
                let request = self
                    .client
                    .update_item()
                    .table_name(&*self.table)
                    .key("pk", s(format!("lock#{key}")))
                    .update_expression("SET expires = :zero")
                    .condition_expression("expires = :e")
                    .expression_attribute_values(":zero", n(0))
                    .expression_attribute_values(":e", n(now + ttl_ms));
                async move {
                    match request.send().await {
                        Ok(_) => Ok(()),
                        Err(e) if is_condition_failed(&e) => Ok(()),
                        Err(e) => Err(dynamo_err("UpdateItem (unlock)", e)),
                    }
                }
            })
            .collect();
        overlapped(frees).await.into_iter().collect()
    }

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

    /// Registers `member` until `until` in the one item that lists the processes sharing the
    /// budget (a map: member → until); returns the live members and drops the expired ones.
    pub(super) async fn join_members(&self, member: &str, until: Millis, now: Millis) -> Result<u32, StateError> {
        const OPERATION: &str = "UpdateItem (budget members)";
        let set = || {
            self.count_write();
            self.client
                .update_item()
                .table_name(&*self.table)
                .key("pk", s(BUDGET_MEMBERS))
                .update_expression("SET m.#member = :until")
                .expression_attribute_names("#member", member)
                .expression_attribute_values(":until", n(until))
                .return_values(ReturnValue::AllNew)
                .send()
        };
        let out = match set().await {
            Ok(out) => out,
            // The first member: the map does not exist yet, and a path into it is invalid.
            Err(e) if e.code() == Some("ValidationException") => {
                self.count_write();
                self.client
                    .update_item()
                    .table_name(&*self.table)
                    .key("pk", s(BUDGET_MEMBERS))
                    .update_expression("SET m = if_not_exists(m, :empty)")
                    .expression_attribute_values(":empty", AttributeValue::M(HashMap::new()))
                    .send()
                    .await
                    .map_err(|e| dynamo_err(OPERATION, e))?;
                set().await.map_err(|e| dynamo_err(OPERATION, e))?
            }
            Err(e) => return Err(dynamo_err(OPERATION, e)),
        };
        let members = out
            .attributes
            .as_ref()
            .and_then(|a| a.get("m"))
            .and_then(|m| m.as_m().ok())
            .cloned()
            .unwrap_or_default();
        let mut live = 0u32;
        let mut expired = Vec::new();
        for (name, until) in &members {
            match until.as_n().ok().and_then(|t| t.parse::<i64>().ok()) {
                Some(t) if t > now => live += 1,
                _ => expired.push(name.clone()),
            }
        }
        if !expired.is_empty() {
            // Best effort: an expired member is not counted whether or not it is removed.
            let _ = self.remove_members(&expired).await;
        }
        Ok(live.max(1))
    }

    /// Withdraws `member` from the budget's members.
    pub(super) async fn leave_members(&self, member: &str) -> Result<(), StateError> {
        self.remove_members(&[member.to_owned()]).await
    }

    async fn remove_members(&self, members: &[String]) -> Result<(), StateError> {
        let mut request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", s(BUDGET_MEMBERS))
            .condition_expression("attribute_exists(m)");
        let mut paths = Vec::new();
        for (i, member) in members.iter().enumerate() {
            request = request.expression_attribute_names(format!("#m{i}"), member);
            paths.push(format!("m.#m{i}"));
        }
        self.count_write();
        match request
            .update_expression(format!("REMOVE {}", paths.join(", ")))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(()),
            Err(e) => Err(dynamo_err("UpdateItem (budget members)", e)),
        }
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

/// The item listing the processes that share the Marketo budget.
const BUDGET_MEMBERS: &str = "budget#members";

fn build_error(operation: &'static str, e: aws_sdk_dynamodb::error::BuildError) -> StateError {
    StateError::Dynamo {
        operation,
        message: e.to_string(),
        retryable: false,
    }
}
