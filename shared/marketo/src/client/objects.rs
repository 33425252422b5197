//! The endpoints oppsync uses, one method each: opportunities, roles, companies, sales persons
//! and leads
//! (sync, delete, query), describe, the preflight and usage.

use super::*;

impl MarketoClient {
    /// Writes records in as few calls as the limits allow; returns one outcome per input record,
    /// in input order. Duplicates (by `key`) are sent once and share the outcome.
    pub(super) async fn write(
        &self,
        endpoint: &'static str,
        path: &str,
        envelope: Map<String, Value>,
        records: &[Value],
        key: impl Fn(&Value) -> String,
    ) -> Result<Vec<RecordOutcome>, MarketoError> {
        let mut unique: Vec<&Value> = Vec::new();
        let mut first_of: HashMap<String, usize> = HashMap::new();
        let mut slot = Vec::with_capacity(records.len());
        for record in records {
            let k = key(record);
            let i = *first_of.entry(k).or_insert_with(|| {
                unique.push(record);
                unique.len() - 1
            });
            slot.push(i);
        }
        let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; unique.len()];
        // The calls of one write go out together: the limiter holds them to the budget's
        // concurrency and rate, so a large write keeps every allowed call in flight instead of
        // one at a time (calls take seconds on a real instance). Each carries distinct keys.
        let calls = batches(&unique).into_iter().map(|range| {
            let mut body = envelope.clone();
            body.insert(
                "input".into(),
                Value::Array(unique[range.clone()].iter().map(|v| (*v).clone()).collect()),
            );
            let body = Value::Object(body);
            async move {
                let envelope = self
                    .call(&Request {
                        endpoint,
                        method: Method::POST,
                        path,
                        query: Vec::new(),
                        body: Body::Json(&body),
                    })
                    .await?;
                let matched = match_results(endpoint, range.len(), envelope.result)?;
                Ok::<_, MarketoError>((range, matched))
            }
        });
        for answered in futures_util::future::join_all(calls).await {
            let (range, matched) = answered?;
            // 1018 on a record: the instance runs native CRM sync, so every record of every
            // call would be refused the same way; one error stops the run instead.
            if matched.iter().any(|o| o.code() == Some("1018")) {
                return Err(MarketoError::CrmEnabled);
            }
            for (i, outcome) in matched.into_iter().enumerate() {
                outcomes[range.start + i] = Some(outcome);
            }
        }
        slot.into_iter()
            .map(|i| outcomes[i].clone())
            .collect::<Option<Vec<_>>>()
            .ok_or(MarketoError::ResultMismatch {
                endpoint,
                sent: records.len(),
                got: 0,
                detail: " (a record without a result)",
            })
    }

    /// Creates or updates opportunities (by externalOpportunityId).
    pub async fn sync_opportunities(&self, records: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        let envelope = object([("action", json!("createOrUpdate")), ("dedupeBy", json!("dedupeFields"))]);
        self.write(
            Operation::OpportunitySync.name(),
            "rest/v1/opportunities.json",
            envelope,
            records,
            |r| r.get("externalOpportunityId").map(Value::to_string).unwrap_or_default(),
        )
        .await
    }

    /// Deletes opportunities by externalOpportunityId; a missing one is skipped with 1013.
    pub async fn delete_opportunities(&self, ids: &[String]) -> Result<Vec<RecordOutcome>, MarketoError> {
        let records: Vec<Value> = ids.iter().map(|id| json!({"externalOpportunityId": id})).collect();
        let envelope = object([("deleteBy", json!("dedupeFields"))]);
        self.write(
            Operation::OpportunityDelete.name(),
            "rest/v1/opportunities/delete.json",
            envelope,
            &records,
            |r| r.to_string(),
        )
        .await
    }

    /// Reads opportunities by externalOpportunityId.
    pub async fn query_opportunities(&self, ids: &[String]) -> Result<Vec<Map<String, Value>>, MarketoError> {
        self.query_by(
            Operation::OpportunityQuery.name(),
            "rest/v1/opportunities.json",
            "externalOpportunityId",
            ids,
        )
        .await
    }

    /// Creates or updates roles (by externalOpportunityId, leadId, role).
    pub async fn sync_roles(&self, roles: &[RoleRecord]) -> Result<Vec<RecordOutcome>, MarketoError> {
        let records = to_values(roles)?;
        let envelope = object([("action", json!("createOrUpdate")), ("dedupeBy", json!("dedupeFields"))]);
        self.write(
            Operation::RoleSync.name(),
            "rest/v1/opportunities/roles.json",
            envelope,
            &records,
            role_key_text,
        )
        .await
    }

    /// Deletes roles by their key; a missing one is skipped with 1013.
    pub async fn delete_roles(&self, keys: &[RoleKey]) -> Result<Vec<RecordOutcome>, MarketoError> {
        let records = to_values(keys)?;
        let envelope = object([("deleteBy", json!("dedupeFields"))]);
        self.write(
            Operation::RoleDelete.name(),
            "rest/v1/opportunities/roles/delete.json",
            envelope,
            &records,
            role_key_text,
        )
        .await
    }

    /// Reads roles by their compound key (`POST ?_method=GET`, since the key has three parts).
    pub async fn query_roles(&self, keys: &[RoleKey]) -> Result<Vec<RoleRecord>, MarketoError> {
        let mut found = Vec::new();
        for chunk in keys.chunks(MAX_BATCH) {
            let body = json!({"filterType": "dedupeFields", "fields": ["externalOpportunityId", "leadId", "role", "isPrimary"], "input": chunk});
            let envelope = self
                .call(&Request {
                    endpoint: Operation::RoleQuery.name(),
                    method: Method::POST,
                    path: "rest/v1/opportunities/roles.json",
                    query: vec![("_method", "GET".into())],
                    body: Body::Json(&body),
                })
                .await?;
            for r in envelope.result {
                found.push(serde_json::from_value(r).map_err(|e| MarketoError::Decode {
                    endpoint: Operation::RoleQuery.name(),
                    preview: e.to_string(),
                })?);
            }
        }
        Ok(found)
    }

    /// Creates or updates companies (by externalCompanyId).
    pub async fn sync_companies(&self, records: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        let envelope = object([("action", json!("createOrUpdate")), ("dedupeBy", json!("dedupeFields"))]);
        self.write(
            Operation::CompanySync.name(),
            "rest/v1/companies.json",
            envelope,
            records,
            |r| r.get("externalCompanyId").map(Value::to_string).unwrap_or_default(),
        )
        .await
    }

    /// Creates or updates sales persons (by externalSalesPersonId; sales-persons page).
    pub async fn sync_sales_persons(&self, records: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        let envelope = object([("action", json!("createOrUpdate")), ("dedupeBy", json!("dedupeFields"))]);
        self.write(
            Operation::SalesPersonSync.name(),
            "rest/v1/salespersons.json",
            envelope,
            records,
            |r| r.get("externalSalesPersonId").map(Value::to_string).unwrap_or_default(),
        )
        .await
    }

    pub async fn query_companies(&self, ids: &[String]) -> Result<Vec<Map<String, Value>>, MarketoError> {
        self.query_by(
            Operation::CompanyQuery.name(),
            "rest/v1/companies.json",
            "externalCompanyId",
            ids,
        )
        .await
    }

    /// Finds leads whose `field` (email or a custom string field) is one of `values`, 300 a
    /// call; a call whose URL would pass 8 KB is sent as `POST ?_method=GET` with a form body.
    pub async fn query_leads(
        &self,
        field: &str,
        values: &[String],
        fields: &[&str],
    ) -> Result<Vec<LeadRecord>, MarketoError> {
        let mut wanted: Vec<&str> = vec!["id", field];
        wanted.extend(fields.iter().copied().filter(|f| *f != "id" && *f != field));
        let wanted = wanted.join(",");
        // The chunks go out together, held to the budget by the limiter; each pages on its own.
        let chunks = values.chunks(MAX_BATCH).map(|chunk| {
            let wanted = wanted.clone();
            async move {
                let mut found = Vec::new();
                let mut page: Option<String> = None;
                loop {
                    let mut params = vec![
                        ("filterType", field.to_owned()),
                        ("filterValues", chunk.join(",")),
                        ("fields", wanted.clone()),
                    ];
                    if let Some(token) = &page {
                        params.push(("nextPageToken", token.clone()));
                    }
                    let request = self.read_request(Operation::LeadQuery.name(), "rest/v1/leads.json", params);
                    let envelope = self.call(&request).await?;
                    for lead in envelope.result {
                        let Value::Object(mut fields) = lead else { continue };
                        let Some(id) = fields.remove("id").and_then(|v| v.as_i64()) else {
                            continue;
                        };
                        found.push(LeadRecord { id, fields });
                    }
                    match envelope.next_page_token {
                        Some(token) if !token.is_empty() => page = Some(token),
                        _ => break,
                    }
                }
                Ok::<_, MarketoError>(found)
            }
        });
        let mut found = Vec::new();
        for chunk in futures_util::future::join_all(chunks).await {
            found.extend(chunk?);
        }
        Ok(found)
    }

    /// Creates or updates leads matched on `lookup_field`.
    pub async fn upsert_leads(&self, lookup_field: &str, leads: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        self.sync_leads("createOrUpdate", lookup_field, leads).await
    }

    /// Creates the leads no lead matches on `lookup_field`; one that exists is skipped (1005)
    /// and left as it is.
    pub async fn create_leads(&self, lookup_field: &str, leads: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        self.sync_leads("createOnly", lookup_field, leads).await
    }

    async fn sync_leads(
        &self,
        action: &str,
        lookup_field: &str,
        leads: &[Value],
    ) -> Result<Vec<RecordOutcome>, MarketoError> {
        let envelope = object([("action", json!(action)), ("lookupField", json!(lookup_field))]);
        let field = lookup_field.to_owned();
        self.write(
            Operation::LeadSync.name(),
            "rest/v1/leads.json",
            envelope,
            leads,
            move |r| {
                r.get(&field)
                    .and_then(Value::as_str)
                    .map(|s| s.to_ascii_lowercase())
                    .unwrap_or_default()
            },
        )
        .await
    }

    /// Describes the opportunity (`opportunity = true`) or opportunity role object.
    pub async fn describe(&self, opportunity: bool) -> Result<ObjectDescription, MarketoError> {
        let (endpoint, path) = if opportunity {
            (
                Operation::OpportunityDescribe.name(),
                "rest/v1/opportunities/describe.json",
            )
        } else {
            (
                Operation::RoleDescribe.name(),
                "rest/v1/opportunities/roles/describe.json",
            )
        };
        let envelope = self
            .call(&Request {
                endpoint,
                method: Method::GET,
                path,
                query: Vec::new(),
                body: Body::None,
            })
            .await?;
        let first = envelope.result.into_iter().next().ok_or(MarketoError::ResultMismatch {
            endpoint,
            sent: 1,
            got: 0,
            detail: "",
        })?;
        serde_json::from_value(first).map_err(|e| MarketoError::Decode {
            endpoint,
            preview: e.to_string(),
        })
    }

    /// Before any write: can this instance take opportunity writes, and does it have the
    /// configured fields?
    pub async fn preflight(&self, opportunity_fields: &[&str]) -> Result<Preflight, MarketoError> {
        let blocked = |blocked: String| Preflight {
            blocked: Some(blocked),
            missing_fields: Vec::new(),
        };
        // Native CRM sync makes the opportunity API read-only (opportunities page) or disabled
        // (lead-database page) and the role API unavailable (opportunity-roles page); how a
        // disabled API answers is not documented, so 1018, 603 and 610 all count.
        // Both at once: at seconds a call, the preflight costs one round trip, not two.
        let (opportunity, role) = tokio::join!(self.describe(true), self.describe(false));
        let description = match opportunity {
            Ok(d) => d,
            Err(e) => return unavailable(&e).map(blocked).ok_or(e),
        };
        if let Err(e) = role {
            return unavailable(&e).map(blocked).ok_or(e);
        }
        let missing_fields = opportunity_fields
            .iter()
            .filter(|f| !description.fields.iter().any(|d| d.name == **f))
            .map(|f| (*f).to_owned())
            .collect();
        Ok(Preflight {
            blocked: None,
            missing_fields,
        })
    }

    /// Marketo's own count of today's calls (`stats/usage`).
    pub async fn usage_today(&self) -> Result<u64, MarketoError> {
        let envelope = self
            .call(&Request {
                endpoint: Operation::Usage.name(),
                method: Method::GET,
                path: "rest/v1/stats/usage.json",
                query: Vec::new(),
                body: Body::None,
            })
            .await?;
        Ok(envelope
            .result
            .first()
            .and_then(|r| r.get("total"))
            .and_then(Value::as_u64)
            .unwrap_or(0))
    }

    async fn query_by(
        &self,
        endpoint: &'static str,
        path: &str,
        filter: &str,
        values: &[String],
    ) -> Result<Vec<Map<String, Value>>, MarketoError> {
        let chunks = values.chunks(MAX_BATCH).map(|chunk| async move {
            let params = vec![("filterType", filter.to_owned()), ("filterValues", chunk.join(","))];
            self.call(&self.read_request(endpoint, path, params)).await
        });
        let mut found = Vec::new();
        for envelope in futures_util::future::join_all(chunks).await {
            found.extend(envelope?.result.into_iter().filter_map(|v| match v {
                Value::Object(m) => Some(m),
                _ => None,
            }));
        }
        Ok(found)
    }
}

fn object<const N: usize>(pairs: [(&str, Value); N]) -> Map<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

fn to_values<T: Serialize>(items: &[T]) -> Result<Vec<Value>, MarketoError> {
    items
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()
        .map_err(|e| MarketoError::Decode {
            endpoint: "encode",
            preview: e.to_string(),
        })
}

fn role_key_text(r: &Value) -> String {
    format!(
        "{}|{}|{}",
        r.get("externalOpportunityId").map(Value::to_string).unwrap_or_default(),
        r.get("leadId").map(Value::to_string).unwrap_or_default(),
        r.get("role").map(Value::to_string).unwrap_or_default()
    )
}

/// Why an opportunity or role API refused to answer, when the refusal means oppsync cannot
/// work with this instance (rather than a fault to retry).
fn unavailable(error: &MarketoError) -> Option<String> {
    match error {
        MarketoError::CrmEnabled => Some(error.to_string()),
        MarketoError::Api {
            endpoint,
            code,
            message,
        } if code == "603" || code == "610" => Some(format!(
            "Marketo {endpoint} is unavailable ({code}: {message}). Marketo disables the opportunity and role APIs on \
             instances that run its native Dynamics or Salesforce sync, and oppsync is for instances without it; \
             if this instance has no native CRM sync, give the API user's role the Read-Write Lead permission"
        )),
        _ => None,
    }
}
