//! The poller's lease and the cursors it fences: a cursor moves only under the lease, in one
//! transaction with the lease's check. The [`StateStore`] methods of the same capabilities call
//! these.

use super::*;

impl DynamoStore {
    pub(super) async fn read_cursor(&self, source: Source) -> Result<Option<Cursor>, StateError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .key("pk", s(format!("cursor#{}", source.as_str())))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| dynamo_err("GetItem (cursor)", e))?;
        Ok(out.item.and_then(|item| {
            Some(Cursor {
                value: get_s(&item, "value")?.to_owned(),
                updated_at: get_n(&item, "updated").unwrap_or(0),
            })
        }))
    }
    pub(super) async fn move_cursor(
        &self,
        lease: &Lease,
        source: Source,
        value: &str,
        now: Millis,
    ) -> Result<(), StateError> {
        let build = |e: aws_sdk_dynamodb::error::BuildError| StateError::Dynamo {
            operation: "TransactWriteItems (cursor)",
            message: e.to_string(),
            retryable: false,
        };
        let check = ConditionCheck::builder()
            .table_name(&*self.table)
            .key("pk", s(format!("lease#{}", lease.name)))
            .condition_expression("#t = :t AND expires > :now")
            .expression_attribute_names("#t", "token")
            .expression_attribute_values(":t", n(lease.token))
            .expression_attribute_values(":now", n(now))
            .build()
            .map_err(build)?;
        let put = Put::builder()
            .table_name(&*self.table)
            .item("pk", s(format!("cursor#{}", source.as_str())))
            .item("value", s(value))
            .item("updated", n(now))
            .build()
            .map_err(build)?;
        self.count_write();
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().condition_check(check).build())
            .transact_items(TransactWriteItem::builder().put(put).build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("TransactionCanceledException") => {
                let reasons = e
                    .as_service_error()
                    .and_then(|se| match se {
                        aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(tc) => Some(tc),
                        _ => None,
                    })
                    .map(|tc| tc.cancellation_reasons().iter().filter_map(|r| r.code()).collect::<Vec<_>>())
                    .unwrap_or_default();
                if reasons.contains(&"ConditionalCheckFailed") || reasons.is_empty() {
                    Err(StateError::LeaseLost(lease.name.clone()))
                } else {
                    Err(dynamo_err("TransactWriteItems (cursor)", e))
                }
            }
            Err(e) => Err(dynamo_err("TransactWriteItems (cursor)", e)),
        }
    }
    pub(super) async fn take_lease(
        &self,
        name: &str,
        owner: &str,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<Lease>, StateError> {
        let mut u = Update::default();
        u.set("#o = :o, expires = :e, #t = if_not_exists(#t, :zero) + :one")
            .value(":o", s(owner))
            .value(":e", n(now + ttl_ms))
            .value(":zero", n(0))
            .value(":one", n(1))
            .value(":now", n(now));
        self.count_write();
        let request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", s(format!("lease#{name}")))
            .update_expression(u.expression())
            .condition_expression("attribute_not_exists(pk) OR expires <= :now")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_names("#t", "token")
            .set_expression_attribute_values(Some(u.values))
            .return_values(ReturnValue::AllNew);
        match request.send().await {
            Ok(out) => {
                let item = out.attributes.unwrap_or_default();
                Ok(Some(Lease {
                    name: name.to_owned(),
                    owner: owner.to_owned(),
                    token: get_n(&item, "token").unwrap_or(0),
                    expires_at: now + ttl_ms,
                }))
            }
            Err(e) if is_condition_failed(&e) => Ok(None),
            Err(e) => Err(dynamo_err("UpdateItem (acquire lease)", e)),
        }
    }
    pub(super) async fn extend_lease(
        &self,
        lease: &Lease,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<Option<Lease>, StateError> {
        self.count_write();
        let request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", s(format!("lease#{}", lease.name)))
            .update_expression("SET expires = :e")
            .condition_expression("#t = :t AND expires > :now")
            .expression_attribute_names("#t", "token")
            .expression_attribute_values(":e", n(now + ttl_ms))
            .expression_attribute_values(":t", n(lease.token))
            .expression_attribute_values(":now", n(now));
        match request.send().await {
            Ok(_) => Ok(Some(Lease {
                expires_at: now + ttl_ms,
                ..lease.clone()
            })),
            Err(e) if is_condition_failed(&e) => Ok(None),
            Err(e) => Err(dynamo_err("UpdateItem (renew lease)", e)),
        }
    }
    pub(super) async fn give_up_lease(&self, lease: &Lease) -> Result<(), StateError> {
        self.count_write();
        let request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", s(format!("lease#{}", lease.name)))
            .update_expression("SET expires = :zero")
            .condition_expression("#t = :t")
            .expression_attribute_names("#t", "token")
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":t", n(lease.token));
        match request.send().await {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failed(&e) => Ok(()),
            Err(e) => Err(dynamo_err("UpdateItem (release lease)", e)),
        }
    }
}
