//! The client: one `reqwest::Client`, the token cache, the limiter, the daily budget, and the
//! endpoints oppsync uses.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use crate::error::{ErrorClass, MarketoError, Reason, classify};
use crate::limiter::Limiter;
use crate::settings::{MarketoSettings, Secret};

/// Marketo's records per call.
pub const MAX_BATCH: usize = 300;
/// Marketo's body limit (1 MB), less room for the envelope.
const MAX_BODY: usize = 1_048_576 - 4_096;
/// Marketo's URL limit (8 KB), less a margin.
const MAX_URL: usize = 8 * 1024 - 256;
/// Retries of throttled and transient failures before giving up.
const MAX_ATTEMPTS: u32 = 6;

/// A cached identity token.
#[derive(Clone)]
struct Token {
    value: Secret,
    /// Refresh at this instant (before the token's end, unless Marketo handed back the same one).
    refresh_at: Instant,
}

/// Tokens by (identity URL, client id), shared by every client of the process.
fn token_cache() -> &'static Mutex<HashMap<(String, String), Token>> {
    static CACHE: OnceLock<Mutex<HashMap<(String, String), Token>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// What happened to one record of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordStatus {
    Created,
    Updated,
    Deleted,
    Skipped,
}

/// One record's result, matched back to its input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordOutcome {
    pub status: RecordStatus,
    /// `marketoGUID` (opportunities, roles) or `id` (companies, leads), as text.
    pub marketo_id: Option<String>,
    pub reasons: Vec<Reason>,
}

impl RecordOutcome {
    pub fn is_skipped(&self) -> bool {
        self.status == RecordStatus::Skipped
    }
    /// The first reason's code, if skipped.
    pub fn code(&self) -> Option<&str> {
        self.reasons.first().map(|r| r.code.as_str())
    }
    /// How to treat a skip: retry (a transient record code), or record it.
    pub fn class(&self) -> Option<ErrorClass> {
        self.is_skipped()
            .then(|| self.code().map_or(ErrorClass::Permanent, classify))
    }
}

/// An opportunity role: Marketo's key is (externalOpportunityId, leadId, role).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RoleKey {
    #[serde(rename = "externalOpportunityId")]
    pub external_opportunity_id: String,
    #[serde(rename = "leadId")]
    pub lead_id: i64,
    pub role: String,
}

/// A role to create or update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRecord {
    #[serde(flatten)]
    pub key: RoleKey,
    /// A role read back without it (or with null) is not primary.
    #[serde(rename = "isPrimary", default, deserialize_with = "null_is_false")]
    pub is_primary: bool,
}

fn null_is_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// A lead as queried: its id and the fields asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeadRecord {
    pub id: i64,
    pub fields: Map<String, Value>,
}

/// A Marketo object's description: its fields.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ObjectDescription {
    pub name: String,
    #[serde(rename = "dedupeFields", default)]
    pub dedupe_fields: Vec<String>,
    #[serde(default)]
    pub fields: Vec<FieldDescription>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FieldDescription {
    pub name: String,
}

/// What the preflight found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    /// `None` when the instance takes opportunity writes; else why not.
    pub blocked: Option<String>,
    /// Configured opportunity fields the instance does not have.
    pub missing_fields: Vec<String>,
}

impl Preflight {
    pub fn ok(&self) -> bool {
        self.blocked.is_none() && self.missing_fields.is_empty()
    }
}

/// The JSON envelope of every REST answer.
#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    result: Vec<Value>,
    #[serde(default)]
    errors: Vec<Reason>,
    #[serde(rename = "nextPageToken", default)]
    next_page_token: Option<String>,
}

/// One request, rebuilt for each attempt.
struct Request<'a> {
    endpoint: &'static str,
    method: Method,
    path: &'a str,
    query: Vec<(&'a str, String)>,
    body: Body<'a>,
}

enum Body<'a> {
    None,
    Json(&'a Value),
    Form(Vec<(&'a str, String)>),
}

/// The Marketo client. Cheap to clone; clones share the token, limiter and budget.
#[derive(Clone)]
pub struct MarketoClient {
    http: reqwest::Client,
    settings: Arc<MarketoSettings>,
    limiter: Limiter,
    budget: u64,
    used_today: Arc<AtomicU64>,
    calls: Arc<Mutex<BTreeMap<&'static str, u64>>>,
    backoff_base: Duration,
}

impl std::fmt::Debug for MarketoClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MarketoClient")
            .field("base", &self.settings.base.as_str())
            .field("client_id", &self.settings.client_id)
            .field("limiter", &self.limiter.settings())
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl MarketoClient {
    /// A client with Marketo's timeouts (30 s; sync and delete calls may take 60 s).
    pub fn new(settings: MarketoSettings, limiter: Limiter, daily_budget: u64) -> Result<Self, MarketoError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            // A redirect is answered as the error it is: following one could send the bearer
            // token or the identity query to another host.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| MarketoError::Transport {
                endpoint: "client",
                message: e.to_string(),
                timeout: false,
            })?;
        Ok(MarketoClient {
            http,
            settings: Arc::new(settings),
            limiter,
            budget: daily_budget,
            used_today: Arc::new(AtomicU64::new(0)),
            calls: Arc::new(Mutex::new(BTreeMap::new())),
            backoff_base: Duration::from_millis(500),
        })
    }

    /// Shortens the first backoff (tests and simulators with short windows).
    pub fn with_backoff_base(mut self, base: Duration) -> Self {
        self.backoff_base = base;
        self
    }

    /// Seeds today's count from the state store (calls this process did not make).
    pub fn set_calls_today(&self, calls: u64) {
        self.used_today.store(calls, Ordering::SeqCst);
    }

    /// REST calls counted against today's budget.
    pub fn calls_today(&self) -> u64 {
        self.used_today.load(Ordering::SeqCst)
    }

    /// REST calls made by this client, by endpoint.
    pub fn calls_by_endpoint(&self) -> BTreeMap<&'static str, u64> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn cache_key(&self) -> (String, String) {
        (self.settings.base.to_string(), self.settings.client_id.clone())
    }

    /// A valid token: the cached one, or a new one from the identity endpoint.
    async fn token(&self) -> Result<Secret, MarketoError> {
        let key = self.cache_key();
        if let Some(t) = token_cache().lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && Instant::now() < t.refresh_at
        {
            return Ok(t.value.clone());
        }
        let url = self
            .settings
            .base
            .join("identity/oauth/token")
            .map_err(|e| MarketoError::Transport {
                endpoint: "identity",
                message: e.to_string(),
                timeout: false,
            })?;
        // The documented shape (authentication page, "Creating an Access Token"): the three
        // parameters in the query string. The URL therefore holds the secret: it goes only to
        // Marketo over TLS, and every error drops the URL (`transport`), so no log sees it.
        let response = self
            .http
            .get(url)
            .query(&[
                ("grant_type", "client_credentials"),
                ("client_id", self.settings.client_id.as_str()),
                ("client_secret", self.settings.client_secret.expose()),
            ])
            .send()
            .await
            .map_err(|e| transport("identity", &e))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN || status == StatusCode::BAD_REQUEST {
            return Err(MarketoError::Auth {
                status: status.as_u16(),
            });
        }
        if !status.is_success() {
            return Err(MarketoError::Http {
                endpoint: "identity",
                status: status.as_u16(),
            });
        }
        #[derive(Deserialize)]
        struct Issued {
            access_token: String,
            expires_in: u64,
        }
        let text = response.text().await.map_err(|e| transport("identity", &e))?;
        let issued: Issued = serde_json::from_str(&text).map_err(|_| MarketoError::Decode {
            endpoint: "identity",
            // Never echo an identity body: it may hold a token.
            preview: "(identity answer withheld)".into(),
        })?;
        let value = Secret::new(issued.access_token);
        let mut cache = token_cache().lock().unwrap_or_else(|p| p.into_inner());
        let same_as_before = cache.get(&key).is_some_and(|t| t.value == value);
        // Marketo says 3600 s at most (authentication page); a larger or absurd value is
        // capped, so a server's number can never overflow the clock.
        let lifetime = Duration::from_secs(issued.expires_in.min(3600));
        // Refresh a minute early; but before expiry Marketo hands back the same token, so once
        // it has, use it to its end (a 602 in flight then re-authenticates).
        let margin = if same_as_before {
            Duration::ZERO
        } else {
            Duration::from_secs(60).min(lifetime / 2)
        };
        cache.insert(
            key,
            Token {
                value: value.clone(),
                refresh_at: Instant::now()
                    .checked_add(lifetime.saturating_sub(margin))
                    .unwrap_or_else(Instant::now),
            },
        );
        tracing::debug!(expires_in = issued.expires_in, "marketo identity token obtained");
        Ok(value)
    }

    fn forget_token(&self) {
        token_cache()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.cache_key());
    }

    /// Counts a call against today's budget, or refuses it.
    fn spend(&self, endpoint: &'static str) -> Result<(), MarketoError> {
        let used = self.used_today.fetch_add(1, Ordering::SeqCst);
        if used >= self.budget {
            self.used_today.fetch_sub(1, Ordering::SeqCst);
            return Err(MarketoError::BudgetExhausted {
                used,
                budget: self.budget,
            });
        }
        *self
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(endpoint)
            .or_default() += 1;
        Ok(())
    }

    /// Sends a request with re-authentication, backoff and the limits; returns the envelope of a
    /// successful call.
    async fn call(&self, request: &Request<'_>) -> Result<Envelope, MarketoError> {
        let mut reauthenticated = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self.attempt(request).await;
            let error = match result {
                Ok(envelope) => return Ok(envelope),
                Err(e) => e,
            };
            match error.class() {
                ErrorClass::ReAuth if !reauthenticated => {
                    tracing::info!(endpoint = request.endpoint, code = %error.code(), "marketo token refused; re-authenticating");
                    self.forget_token();
                    reauthenticated = true;
                }
                ErrorClass::Throttled | ErrorClass::Transient if attempt < MAX_ATTEMPTS => {
                    let mut wait = backoff(self.backoff_base, attempt);
                    // 606: the instance's 20-second window is full (other integrations share
                    // it). Short retries would all land in the same window; a quarter window
                    // each spreads the remaining attempts past it.
                    if error.code() == "606" {
                        wait = wait.max(self.limiter.settings().window / 4);
                    }
                    tracing::warn!(endpoint = request.endpoint, code = %error.code(), attempt, wait_ms = wait.as_millis() as u64, "marketo call failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                _ => return Err(error),
            }
        }
    }

    async fn attempt(&self, request: &Request<'_>) -> Result<Envelope, MarketoError> {
        let token = self.token().await?;
        self.spend(request.endpoint)?;
        let _permit = self.limiter.acquire().await;
        let url = self
            .settings
            .base
            .join(request.path)
            .map_err(|e| MarketoError::Transport {
                endpoint: request.endpoint,
                message: e.to_string(),
                timeout: false,
            })?;
        let mut builder = self
            .http
            .request(request.method.clone(), url)
            .bearer_auth(token.expose())
            .query(&request.query);
        builder = match &request.body {
            Body::None => builder,
            Body::Json(v) => builder.json(v),
            Body::Form(f) => builder.form(f),
        };
        let response = builder.send().await.map_err(|e| transport(request.endpoint, &e))?;
        let status = response.status();
        tracing::debug!(endpoint = request.endpoint, status = status.as_u16(), "marketo call");
        if !status.is_success() {
            return Err(MarketoError::Http {
                endpoint: request.endpoint,
                status: status.as_u16(),
            });
        }
        let text = response.text().await.map_err(|e| transport(request.endpoint, &e))?;
        let envelope: Envelope = serde_json::from_str(&text).map_err(|_| MarketoError::Decode {
            endpoint: request.endpoint,
            preview: text.chars().take(120).collect(),
        })?;
        if envelope.success {
            return Ok(envelope);
        }
        let first = envelope.errors.into_iter().next().unwrap_or(Reason {
            code: "unknown".into(),
            message: "success: false without errors".into(),
        });
        Err(match first.code.as_str() {
            "607" => MarketoError::QuotaExhausted,
            "1018" => MarketoError::CrmEnabled,
            _ => MarketoError::Api {
                endpoint: request.endpoint,
                code: first.code,
                message: first.message,
            },
        })
    }

    /// Writes records in as few calls as the limits allow; returns one outcome per input record,
    /// in input order. Duplicates (by `key`) are sent once and share the outcome.
    async fn write(
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
        for range in batches(&unique) {
            let mut body = envelope.clone();
            body.insert(
                "input".into(),
                Value::Array(unique[range.clone()].iter().map(|v| (*v).clone()).collect()),
            );
            let body = Value::Object(body);
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
            "opportunities.sync",
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
            "opportunities.delete",
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
            "opportunities.query",
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
            "roles.sync",
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
            "roles.delete",
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
                    endpoint: "roles.query",
                    method: Method::POST,
                    path: "rest/v1/opportunities/roles.json",
                    query: vec![("_method", "GET".into())],
                    body: Body::Json(&body),
                })
                .await?;
            for r in envelope.result {
                found.push(serde_json::from_value(r).map_err(|e| MarketoError::Decode {
                    endpoint: "roles.query",
                    preview: e.to_string(),
                })?);
            }
        }
        Ok(found)
    }

    /// Creates or updates companies (by externalCompanyId).
    pub async fn sync_companies(&self, records: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        let envelope = object([("action", json!("createOrUpdate")), ("dedupeBy", json!("dedupeFields"))]);
        self.write("companies.sync", "rest/v1/companies.json", envelope, records, |r| {
            r.get("externalCompanyId").map(Value::to_string).unwrap_or_default()
        })
        .await
    }

    pub async fn query_companies(&self, ids: &[String]) -> Result<Vec<Map<String, Value>>, MarketoError> {
        self.query_by("companies.query", "rest/v1/companies.json", "externalCompanyId", ids)
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
        let mut found = Vec::new();
        let mut wanted: Vec<&str> = vec!["id", field];
        wanted.extend(fields.iter().copied().filter(|f| *f != "id" && *f != field));
        let wanted = wanted.join(",");
        for chunk in values.chunks(MAX_BATCH) {
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
                let request = self.read_request("leads.query", "rest/v1/leads.json", params);
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
        }
        Ok(found)
    }

    /// Creates or updates leads matched on `lookup_field`.
    pub async fn upsert_leads(&self, lookup_field: &str, leads: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        let envelope = object([
            ("action", json!("createOrUpdate")),
            ("lookupField", json!(lookup_field)),
        ]);
        let field = lookup_field.to_owned();
        self.write("leads.sync", "rest/v1/leads.json", envelope, leads, move |r| {
            r.get(&field)
                .and_then(Value::as_str)
                .map(|s| s.to_ascii_lowercase())
                .unwrap_or_default()
        })
        .await
    }

    /// Describes the opportunity (`opportunity = true`) or opportunity role object.
    pub async fn describe(&self, opportunity: bool) -> Result<ObjectDescription, MarketoError> {
        let (endpoint, path) = if opportunity {
            ("opportunities.describe", "rest/v1/opportunities/describe.json")
        } else {
            ("roles.describe", "rest/v1/opportunities/roles/describe.json")
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
        let description = match self.describe(true).await {
            Ok(d) => d,
            Err(e) => return unavailable(&e).map(blocked).ok_or(e),
        };
        if let Err(e) = self.describe(false).await {
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
                endpoint: "stats.usage",
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

    /// A read: `GET` with the parameters in the query string, or, where that URL would pass
    /// Marketo's 8 KB, `POST ?_method=GET` with them as a form body (error-codes page, 414).
    fn read_request<'a>(&self, endpoint: &'static str, path: &'a str, params: Vec<(&'a str, String)>) -> Request<'a> {
        // Measured as it would be sent (the same form encoding reqwest's `query` uses).
        let url_len = self.settings.base.join(path).map_or(usize::MAX, |mut url| {
            url.query_pairs_mut()
                .extend_pairs(params.iter().map(|(k, v)| (*k, v.as_str())));
            url.as_str().len()
        });
        if url_len > MAX_URL {
            Request {
                endpoint,
                method: Method::POST,
                path,
                query: vec![("_method", "GET".into())],
                body: Body::Form(params),
            }
        } else {
            Request {
                endpoint,
                method: Method::GET,
                path,
                query: params,
                body: Body::None,
            }
        }
    }

    async fn query_by(
        &self,
        endpoint: &'static str,
        path: &str,
        filter: &str,
        values: &[String],
    ) -> Result<Vec<Map<String, Value>>, MarketoError> {
        let mut found = Vec::new();
        for chunk in values.chunks(MAX_BATCH) {
            let params = vec![("filterType", filter.to_owned()), ("filterValues", chunk.join(","))];
            let envelope = self.call(&self.read_request(endpoint, path, params)).await?;
            found.extend(envelope.result.into_iter().filter_map(|v| match v {
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

fn parse_outcome(result: &Value) -> Option<RecordOutcome> {
    let status = match result.get("status")?.as_str()? {
        "created" => RecordStatus::Created,
        "updated" => RecordStatus::Updated,
        "deleted" => RecordStatus::Deleted,
        "skipped" => RecordStatus::Skipped,
        _ => return None,
    };
    let marketo_id = result
        .get("marketoGUID")
        .or_else(|| result.get("id"))
        .and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
    // The pages show `reasons: [{code, message}]`; the OpenAPI lead result has
    // `reason: {code, message}`. Either, as one object or a list, is read.
    let reasons = ["reasons", "reason"]
        .iter()
        .filter_map(|key| result.get(*key))
        .flat_map(|r| match r {
            Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        })
        .filter_map(|r| serde_json::from_value::<Reason>(r).ok())
        .collect();
    Some(RecordOutcome {
        status,
        marketo_id,
        reasons,
    })
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

/// Matches a write's results to the `sent` records of its call: by `seq` where every result
/// carries one (opportunities, roles, companies), else by position (Sync Leads results have no
/// `seq`; the error-codes page: results are "ordered in the same way as the input array").
fn match_results(endpoint: &'static str, sent: usize, results: Vec<Value>) -> Result<Vec<RecordOutcome>, MarketoError> {
    let got = results.len();
    let mismatch = |detail| MarketoError::ResultMismatch {
        endpoint,
        sent,
        got,
        detail,
    };
    if got != sent {
        return Err(mismatch(""));
    }
    let by_seq = results.iter().all(|r| r.get("seq").is_some());
    let mut matched: Vec<Option<RecordOutcome>> = vec![None; sent];
    for (position, result) in results.iter().enumerate() {
        let outcome = parse_outcome(result).ok_or_else(|| mismatch(" (a result without a known status)"))?;
        let index = if by_seq {
            match &result["seq"] {
                Value::Number(n) => n.as_u64().map(|n| n as usize),
                Value::String(s) => s.parse().ok(),
                _ => None,
            }
            .ok_or_else(|| mismatch(" (a seq that is not a number)"))?
        } else {
            position
        };
        match matched.get_mut(index) {
            Some(slot @ None) => *slot = Some(outcome),
            _ => return Err(mismatch(" (a seq out of range or repeated)")),
        }
    }
    matched
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| mismatch(" (a record without a result)"))
}

/// Splits records into runs of at most 300 records and about 1 MB of JSON.
fn batches(records: &[&Value]) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, record) in records.iter().enumerate() {
        let size = serde_json::to_vec(record).map_or(0, |v| v.len()) + 1;
        if i > start && (i - start == MAX_BATCH || bytes + size > MAX_BODY) {
            ranges.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < records.len() {
        ranges.push(start..records.len());
    }
    ranges
}

/// Exponential backoff with full jitter: up to base × 2^(attempt-1), capped at 20 s.
fn backoff(base: Duration, attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let ceiling = base
        .saturating_mul(1 << attempt.saturating_sub(1).min(10))
        .min(Duration::from_secs(20));
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    let fraction = (h.finish() % 1000) as u32;
    // Half fixed, half random: never a zero wait after throttling.
    ceiling / 2 + ceiling / 2 * fraction / 1000
}

fn transport(endpoint: &'static str, e: &reqwest::Error) -> MarketoError {
    // reqwest's message names the URL, which can hold the identity secret or lead emails
    // (filterValues): the message is kept, the URL is not.
    let timeout = e.is_timeout();
    let mut message = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = source {
        let text = err.to_string();
        if !text.contains("://") && !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
        source = err.source();
    }
    if message.is_empty() {
        message = if timeout {
            "timed out".into()
        } else {
            "request failed".into()
        };
    }
    MarketoError::Transport {
        endpoint,
        message,
        timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_at_most_300_records_and_about_a_megabyte() {
        let small: Vec<Value> = (0..1000).map(|i| json!({"externalOpportunityId": i})).collect();
        let refs: Vec<&Value> = small.iter().collect();
        let sizes: Vec<usize> = batches(&refs).iter().map(|r| r.len()).collect();
        assert_eq!(sizes, [300, 300, 300, 100]);
        let big: Vec<Value> = (0..10)
            .map(|i| json!({"id": i, "description": "x".repeat(300_000)}))
            .collect();
        let refs: Vec<&Value> = big.iter().collect();
        for range in batches(&refs) {
            let bytes: usize = big[range].iter().map(|v| v.to_string().len()).sum();
            assert!(bytes < MAX_BODY, "{bytes}");
        }
        assert!(batches(&[]).is_empty());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        assert!(backoff(base, 1) <= Duration::from_millis(100) && backoff(base, 1) >= Duration::from_millis(50));
        assert!(backoff(base, 4) >= Duration::from_millis(400));
        assert!(backoff(base, 30) <= Duration::from_secs(20));
    }
}
