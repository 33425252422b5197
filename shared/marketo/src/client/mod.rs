//! The client: one `reqwest::Client`, the token cache, the limiter, the daily budget, and one
//! call with its retries. The endpoints are in `objects`, the record types and how results are
//! matched to records in `records`.

use secrecy::ExposeSecret;
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
use crate::operation::Operation;
use crate::settings::{MarketoSettings, Secret};

mod objects;
mod records;

pub use records::{
    FieldDescription, LeadRecord, ObjectDescription, Preflight, RecordOutcome, RecordStatus, RoleKey, RoleRecord,
};
use records::{batches, match_results};

/// Marketo's records per call.
pub const MAX_BATCH: usize = 300;
/// Marketo's body limit (1 MB), less room for the envelope.
const MAX_BODY: usize = 1_048_576 - 4_096;
/// The largest answer read: 300 records' results are tens of KB; past this it is not Marketo's
/// envelope, and is refused before it is held whole.
const MAX_ANSWER: usize = 16 * 1024 * 1024;
/// The largest identity answer (a token and its lifetime: well under 1 KB).
const MAX_IDENTITY_ANSWER: usize = 64 * 1024;
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

/// Where the day's calls are counted when more than one process writes to the instance: each
/// call is taken from the day's count before it is sent, atomically across processes.
pub trait CallLedger: Send + Sync {
    /// Counts one call against today's count if it stays within `budget`, and says how many
    /// processes share the budget now. An error is the ledger's own (the call is not sent).
    fn take(&self, budget: u64) -> futures_util::future::BoxFuture<'static, Result<Taken, String>>;
}

/// A call taken from the shared ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// Today's count with this call, or `None` when today's budget is spent (not counted).
    pub used: Option<u64>,
    /// The processes writing to the instance now, this one included: each takes an equal share
    /// of the rate and the calls at once.
    pub sharers: usize,
}

/// The Marketo client. Cheap to clone; clones share the token, limiter and budget.
#[derive(Clone)]
pub struct MarketoClient {
    http: reqwest::Client,
    settings: Arc<MarketoSettings>,
    limiter: Limiter,
    budget: u64,
    used_today: Arc<AtomicU64>,
    /// The shared count of today's calls, once a state store provides one.
    ledger: Arc<Mutex<Option<Arc<dyn CallLedger>>>>,
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
            ledger: Arc::new(Mutex::new(None)),
            calls: Arc::new(Mutex::new(BTreeMap::new())),
            backoff_base: Duration::from_millis(500),
        })
    }

    /// Shortens the first backoff (tests and simulators with short windows).
    pub fn with_backoff_base(mut self, base: Duration) -> Self {
        self.backoff_base = base;
        self
    }

    /// Counts every call from now on in `ledger` before it is sent (shared by every process
    /// that writes to the instance), instead of in this process alone.
    pub fn count_calls_in(&self, ledger: Arc<dyn CallLedger>) {
        *self.ledger.lock().unwrap_or_else(|p| p.into_inner()) = Some(ledger);
    }

    /// This process's share of the limits: 1/`sharers` of the calls per window and at once.
    pub fn share_limits_with(&self, sharers: usize) {
        self.limiter.share_with(sharers);
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
                endpoint: Operation::Identity.name(),
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
                ("client_secret", self.settings.client_secret.expose_secret()),
            ])
            .send()
            .await
            .map_err(|e| transport(Operation::Identity.name(), &e))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN || status == StatusCode::BAD_REQUEST {
            return Err(MarketoError::Auth {
                status: status.as_u16(),
            });
        }
        // Any other refusal but a timeout or throttling means the host is not a Marketo
        // instance: a setup error, not a reason to fail records.
        if status.is_client_error() && status != StatusCode::REQUEST_TIMEOUT && status != StatusCode::TOO_MANY_REQUESTS
        {
            return Err(MarketoError::NotMarketo {
                status: status.as_u16(),
            });
        }
        if !status.is_success() {
            return Err(MarketoError::Http {
                endpoint: Operation::Identity.name(),
                status: status.as_u16(),
            });
        }
        #[derive(Deserialize)]
        struct Issued {
            access_token: String,
            expires_in: u64,
        }
        let text = oppsync_support::body_capped(response, MAX_IDENTITY_ANSWER)
            .await
            .map_err(|e| match e {
                oppsync_support::BodyError::Read(message, timeout) => MarketoError::Transport {
                    endpoint: Operation::Identity.name(),
                    message,
                    timeout,
                },
                e => MarketoError::Decode {
                    endpoint: Operation::Identity.name(),
                    preview: e.to_string(),
                },
            })?;
        let issued: Issued = serde_json::from_str(&text).map_err(|_| MarketoError::Decode {
            endpoint: Operation::Identity.name(),
            // Never echo an identity body: it may hold a token.
            preview: "(identity answer withheld)".into(),
        })?;
        let value = Secret::from(issued.access_token);
        let mut cache = token_cache().lock().unwrap_or_else(|p| p.into_inner());
        let same_as_before = cache
            .get(&key)
            .is_some_and(|t| t.value.expose_secret() == value.expose_secret());
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

    /// Counts a call against today's budget before it is sent, or refuses it: in the shared
    /// ledger when there is one, else in this process.
    async fn spend(&self, endpoint: &'static str) -> Result<(), MarketoError> {
        let ledger = self.ledger.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(ledger) = ledger {
            let taken = ledger.take(self.budget).await;
            if let Ok(taken) = &taken {
                // Before the limiter is asked: a process that just joined shrinks this share.
                self.limiter.share_with(taken.sharers);
            }
            match taken.map(|t| t.used) {
                Ok(Some(used)) => self.used_today.store(used, Ordering::SeqCst),
                Ok(None) => {
                    return Err(MarketoError::BudgetExhausted {
                        used: self.budget,
                        budget: self.budget,
                    });
                }
                Err(message) => {
                    return Err(MarketoError::Transport {
                        endpoint,
                        message: format!("could not count the call in the state store: {message}"),
                        timeout: false,
                    });
                }
            }
        } else {
            let used = self.used_today.fetch_add(1, Ordering::SeqCst);
            if used >= self.budget {
                self.used_today.fetch_sub(1, Ordering::SeqCst);
                return Err(MarketoError::BudgetExhausted {
                    used,
                    budget: self.budget,
                });
            }
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
        self.spend(request.endpoint).await?;
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
            .bearer_auth(token.expose_secret())
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
        let text = match oppsync_support::body_capped(response, MAX_ANSWER).await {
            Ok(text) => text,
            Err(oppsync_support::BodyError::Read(message, timeout)) => {
                return Err(MarketoError::Transport {
                    endpoint: request.endpoint,
                    message,
                    timeout,
                });
            }
            Err(e @ oppsync_support::BodyError::TooLarge { .. }) => {
                return Err(MarketoError::Decode {
                    endpoint: request.endpoint,
                    preview: e.to_string(),
                });
            }
        };
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
}

/// The client's backoff: jittered, capped at 20 s (a 606 waits longer; see `call`).
fn backoff(base: Duration, attempt: u32) -> Duration {
    oppsync_support::backoff(base, attempt, Duration::from_secs(20))
}

fn transport(endpoint: &'static str, e: &reqwest::Error) -> MarketoError {
    // reqwest's message names the URL, which can hold the identity secret or lead emails
    // (filterValues): the message is kept, the URL is not.
    let timeout = e.is_timeout();
    let message = oppsync_support::error_without_urls(e, if timeout { "timed out" } else { "request failed" });
    MarketoError::Transport {
        endpoint,
        message,
        timeout,
    }
}
