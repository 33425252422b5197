//! Read-only Dataverse Web API client for oppsync.
//!
//! Read-only by construction: the only request that is not a GET is the Entra ID token request,
//! and nothing public can build another.
//!
//! - Token: client credentials against Entra ID (or `DYNAMICS_TOKEN_URL`), scope
//!   `{environment}/.default`, cached and refreshed before it runs out; a 401 from the Web API
//!   refreshes once and retries.
//! - Change detection: change tracking ([`DataverseClient::changes`], delta links, `$deletedEntity`
//!   rows; an expired delta token restarts a full read of that table, logged) or a watermark on
//!   `versionnumber` / `modifiedon` ([`DataverseClient::watermark_changes`]) with a full id scan
//!   ([`DataverseClient::all_ids`]) to find deletions.
//! - Paging: `Prefer: odata.maxpagesize`; `@odata.nextLink` followed verbatim, only to the
//!   environment's own host; one page per call, so the caller records a page before it stores the
//!   cursor that follows it.
//! - Related reads for a batch: `Microsoft.Dynamics.CRM.In` filters chunked under the 32 KB URL
//!   limit ([`DataverseClient::related`]).
//! - Service protection: 429 waits exactly `Retry-After`; 5xx, timeouts and garbled answers retry
//!   with capped exponential backoff and jitter; concurrency is bounded.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use oppsync_mapping::dataverse::{ParentCustomer, Related, Table};
use oppsync_mapping::{ContactId, Opportunity, OpportunityId, RecordError};
use reqwest::{StatusCode, Url};
use serde_json::Value;
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;

/// Dataverse's "Version stamp associated with the client has expired".
pub const EXPIRED_VERSION_STAMP: &str = "0x80044352";
const ANNOTATIONS: &str =
    "odata.include-annotations=\"OData.Community.Display.V1.FormattedValue,Microsoft.Dynamics.CRM.lookuplogicalname\"";
/// Dataverse's URL limit for a GET (32 KB, dataverse.md), less 2 KB for the `$skiptoken` a
/// next link adds to the same query (the page-results page's example cookie is about 420 bytes).
pub const MAX_GET_URL: usize = 32 * 1024 - 2 * 1024;
const MAX_ATTEMPTS: u32 = 6;

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Secret(text.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The tables oppsync reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntitySet {
    Opportunities,
    Accounts,
    Contacts,
    Connections,
    ConnectionRoles,
}

impl EntitySet {
    pub fn name(self) -> &'static str {
        match self {
            EntitySet::Opportunities => "opportunities",
            EntitySet::Accounts => "accounts",
            EntitySet::Contacts => "contacts",
            EntitySet::Connections => "connections",
            EntitySet::ConnectionRoles => "connectionroles",
        }
    }
    /// The table's logical name (EntityDefinitions' `LogicalName`).
    pub fn logical(self) -> &'static str {
        match self {
            EntitySet::Opportunities => "opportunity",
            EntitySet::Accounts => "account",
            EntitySet::Contacts => "contact",
            EntitySet::Connections => "connection",
            EntitySet::ConnectionRoles => "connectionrole",
        }
    }
    pub fn key(self) -> &'static str {
        match self {
            EntitySet::Opportunities => "opportunityid",
            EntitySet::Accounts => "accountid",
            EntitySet::Contacts => "contactid",
            EntitySet::Connections => "connectionid",
            EntitySet::ConnectionRoles => "connectionroleid",
        }
    }
}

/// What went wrong talking to Dataverse.
#[derive(Debug, thiserror::Error)]
pub enum DataverseError {
    #[error(
        "Entra ID refused the Dataverse credentials (HTTP {status}: {detail}); check DYNAMICS_TENANT_ID, DYNAMICS_CLIENT_ID and DYNAMICS_CLIENT_SECRET, and that the app registration has a Dataverse application user"
    )]
    Auth { status: u16, detail: String },
    #[error(
        "Dataverse refused access ({code}: {message}); give the application user a security role with organization-level Read on opportunity, connection, account, contact and connectionrole"
    )]
    Forbidden { code: String, message: String },
    #[error("Dataverse: not found ({code}: {message})")]
    NotFound { code: String, message: String },
    #[error("Dataverse rejected the query ({code}: {message})")]
    BadQuery { code: String, message: String },
    #[error("Dataverse kept throttling (429) after {attempts} attempts")]
    Throttled { attempts: u32 },
    #[error("Dataverse failed with HTTP {status} after {attempts} attempts ({message})")]
    Transient {
        status: u16,
        attempts: u32,
        message: String,
    },
    #[error("the change-tracking token has expired (Dataverse {EXPIRED_VERSION_STAMP}); a full read is needed")]
    ChangeTokenExpired,
    #[error("refusing to follow a link to another host: {0}")]
    ForeignLink(String),
    #[error(
        "Dataverse answered HTTP {status}, a redirect to {to}; oppsync follows no redirects. Set DYNAMICS_URL to the environment's own URL (Power Platform admin center > Environments > Environment URL)"
    )]
    Redirected { status: u16, to: String },
    #[error("Dataverse answered something that is not OData JSON: {0}")]
    Decode(String),
    #[error("cannot reach Dataverse: {message}")]
    Transport { message: String, timeout: bool },
    #[error("{0}")]
    Settings(String),
}

impl DataverseError {
    /// Whether trying again later may help.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DataverseError::Throttled { .. }
                | DataverseError::Transient { .. }
                | DataverseError::Transport { .. }
                | DataverseError::Decode(_)
        )
    }
}

/// Where Dataverse is and who we are.
#[derive(Clone, Debug)]
pub struct DataverseSettings {
    /// The environment URL (`DYNAMICS_URL`), like https://contoso.crm.dynamics.com.
    pub environment: Url,
    pub token_url: Url,
    pub client_id: String,
    pub client_secret: Secret,
    /// Rows per page (Prefer: odata.maxpagesize), at most 5000.
    pub page_size: u32,
    /// Requests in flight at once (Dataverse allows 52 per user).
    pub concurrency: usize,
}

fn loopback(url: &Url) -> bool {
    let host = url
        .host_str()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn checked_url(name: &str, text: &str) -> Result<Url, DataverseError> {
    let url = Url::parse(text.trim()).map_err(|_| DataverseError::Settings(format!("{name} `{text}` is not a URL")))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback(&url) => Ok(url),
        _ => Err(DataverseError::Settings(format!(
            "{name} `{text}` must use https:// (plain http is only for loopback simulators)"
        ))),
    }
}

impl DataverseSettings {
    /// `token_url` overrides `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token`.
    pub fn new(
        environment: &str,
        tenant_id: &str,
        client_id: &str,
        client_secret: Secret,
        token_url: Option<&str>,
    ) -> Result<Self, DataverseError> {
        let mut environment = checked_url("DYNAMICS_URL", environment)?;
        environment.set_path("/");
        let token_url = match token_url {
            Some(t) => checked_url("DYNAMICS_TOKEN_URL", t)?,
            None => {
                if tenant_id.trim().is_empty() {
                    return Err(DataverseError::Settings("DYNAMICS_TENANT_ID is empty".into()));
                }
                checked_url(
                    "the Entra ID token URL",
                    &format!(
                        "https://login.microsoftonline.com/{}/oauth2/v2.0/token",
                        tenant_id.trim()
                    ),
                )?
            }
        };
        if client_id.trim().is_empty() || client_secret.expose().is_empty() {
            return Err(DataverseError::Settings(
                "DYNAMICS_CLIENT_ID and DYNAMICS_CLIENT_SECRET must both be set".into(),
            ));
        }
        Ok(DataverseSettings {
            environment,
            token_url,
            client_id: client_id.trim().to_owned(),
            client_secret,
            page_size: 5000,
            concurrency: 4,
        })
    }
}

/// One page of changes and the cursor that follows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangePage {
    /// Rows created or updated (current state, as `$select`ed, annotated).
    pub rows: Vec<Value>,
    /// Ids of deleted rows.
    pub deleted: Vec<String>,
    /// The cursor to store once this page is recorded.
    pub cursor: String,
    /// True when `cursor` is a delta link: the read is caught up.
    pub caught_up: bool,
    /// True when the stored delta token had expired and this is a full read starting over.
    pub full_resync: bool,
}

/// A watermark for tables read without change tracking.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Watermark {
    /// `versionnumber gt N`: a rowversion, so no ties.
    Version(i64),
    /// `modifiedon ge T`, skipping the rows already seen at exactly T (one-second precision
    /// makes ties; `gt` would drop them).
    ModifiedOn { at: String, seen: Vec<(String, i64)> },
}

/// The client. Cheap to clone; clones share the token, the limit and the counters.
#[derive(Clone)]
pub struct DataverseClient {
    http: reqwest::Client,
    settings: Arc<DataverseSettings>,
    api: Url,
    token: Arc<Mutex<Option<(Secret, Instant)>>>,
    permits: Arc<Semaphore>,
    requests: Arc<AtomicU64>,
    backoff_base: Duration,
}

impl std::fmt::Debug for DataverseClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataverseClient")
            .field("environment", &self.settings.environment.as_str())
            .field("client_id", &self.settings.client_id)
            .finish_non_exhaustive()
    }
}

/// The host a redirect points at (its path and query may carry anything; only the host is told).
fn redirect_host(location: &str) -> String {
    Url::parse(location)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| "an unnamed location".into())
}

/// A parsed OData error body.
fn odata_error(body: &str) -> (String, String) {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    (
        v["error"]["code"].as_str().unwrap_or("").to_owned(),
        v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| body.get(..200).unwrap_or(body))
            .to_owned(),
    )
}

impl DataverseClient {
    pub fn new(settings: DataverseSettings) -> Result<Self, DataverseError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            // Never follow a redirect: the bearer token would go with it, and the host check on
            // paging links would be bypassed. A 3xx is answered as an error.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| DataverseError::Transport {
                message: e.to_string(),
                timeout: false,
            })?;
        let api = settings
            .environment
            .join("api/data/v9.2/")
            .map_err(|e| DataverseError::Settings(e.to_string()))?;
        Ok(DataverseClient {
            http,
            permits: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            settings: Arc::new(settings),
            api,
            token: Arc::new(Mutex::new(None)),
            requests: Arc::new(AtomicU64::new(0)),
            backoff_base: Duration::from_millis(500),
        })
    }

    /// Shortens the first backoff (tests).
    pub fn with_backoff_base(mut self, base: Duration) -> Self {
        self.backoff_base = base;
        self
    }

    /// Web API requests sent (token requests excluded).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    async fn access_token(&self, refresh: bool) -> Result<Secret, DataverseError> {
        let mut cached = self.token.lock().await;
        if !refresh
            && let Some((token, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        let scope = format!("{}/.default", self.settings.environment.as_str().trim_end_matches('/'));
        let response = self
            .http
            .post(self.settings.token_url.clone())
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", self.settings.client_id.as_str()),
                ("client_secret", self.settings.client_secret.expose()),
                ("scope", scope.as_str()),
            ])
            .send()
            .await
            .map_err(|e| DataverseError::Transport {
                message: format!("token request: {e}"),
                timeout: e.is_timeout(),
            })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let detail = v["error_description"]
                .as_str()
                .or_else(|| v["error"].as_str())
                .unwrap_or("no detail")
                .chars()
                .take(200)
                .collect();
            return Err(DataverseError::Auth {
                status: status.as_u16(),
                detail,
            });
        }
        #[derive(serde::Deserialize)]
        struct Issued {
            access_token: String,
            expires_in: u64,
        }
        let issued: Issued = serde_json::from_str(&text)
            .map_err(|_| DataverseError::Decode("the token endpoint's answer (withheld)".into()))?;
        // Lifetimes are 60-90 minutes: trust expires_in, refresh 5 minutes (or half) early.
        let lifetime = Duration::from_secs(issued.expires_in);
        let until = Instant::now() + lifetime - Duration::from_secs(300).min(lifetime / 2);
        let token = Secret::new(issued.access_token);
        *cached = Some((token.clone(), until));
        Ok(token)
    }

    /// GETs one URL of the environment, with retries; returns the JSON body.
    async fn get(&self, url: Url, prefer: &[&str]) -> Result<Value, DataverseError> {
        if url.host_str() != self.settings.environment.host_str()
            || url.port_or_known_default() != self.settings.environment.port_or_known_default()
            || url.scheme() != self.settings.environment.scheme()
        {
            return Err(DataverseError::ForeignLink(url.to_string()));
        }
        let mut refreshed = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let token = self.access_token(false).await?;
            let _permit = self.permits.acquire().await.map_err(|_| DataverseError::Transport {
                message: "client closed".into(),
                timeout: false,
            })?;
            self.requests.fetch_add(1, Ordering::Relaxed);
            let mut request = self
                .http
                .get(url.clone())
                .bearer_auth(token.expose())
                .header("Accept", "application/json")
                .header("OData-MaxVersion", "4.0")
                .header("OData-Version", "4.0")
                .header("If-None-Match", "null");
            if !prefer.is_empty() {
                request = request.header("Prefer", prefer.join(","));
            }
            let result = request.send().await;
            drop(_permit);
            let response = match result {
                Ok(r) => r,
                Err(e) if attempt < MAX_ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "dataverse request failed; retrying");
                    tokio::time::sleep(backoff(self.backoff_base, attempt)).await;
                    continue;
                }
                Err(e) => {
                    return Err(DataverseError::Transport {
                        message: e.to_string(),
                        timeout: e.is_timeout(),
                    });
                }
            };
            let status = response.status();
            let retry_after = response
                .headers()
                .get("Retry-After")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let location = response
                .headers()
                .get("Location")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let text = response.text().await.unwrap_or_default();
            if !status.is_success() {
                // The expired version stamp, recognised by its code or its message whatever the
                // status (the Web API's status for it is not documented).
                let (code, message) = odata_error(&text);
                if code.eq_ignore_ascii_case(EXPIRED_VERSION_STAMP)
                    || code == "-2147204270"
                    || message.contains("Version stamp associated with the client has expired")
                {
                    return Err(DataverseError::ChangeTokenExpired);
                }
            }
            match status {
                s if s.is_success() => match serde_json::from_str(&text) {
                    Ok(v) => return Ok(v),
                    Err(_) if attempt < MAX_ATTEMPTS => {
                        tracing::warn!(attempt, "dataverse answered non-JSON; retrying");
                        tokio::time::sleep(backoff(self.backoff_base, attempt)).await;
                    }
                    Err(_) => return Err(DataverseError::Decode(text.chars().take(120).collect())),
                },
                StatusCode::UNAUTHORIZED if !refreshed => {
                    refreshed = true;
                    self.access_token(true).await?;
                }
                StatusCode::UNAUTHORIZED => {
                    return Err(DataverseError::Auth {
                        status: 401,
                        detail: "the Web API refused a fresh token".into(),
                    });
                }
                StatusCode::TOO_MANY_REQUESTS if attempt < MAX_ATTEMPTS + 4 => {
                    // Service protection: wait exactly what Dataverse asks (fallback 2^n seconds).
                    let wait = retry_after.map_or_else(|| backoff(self.backoff_base, attempt), Duration::from_secs);
                    tracing::warn!(
                        wait_s = wait.as_secs_f64(),
                        attempt,
                        "dataverse throttled (429); waiting Retry-After"
                    );
                    tokio::time::sleep(wait).await;
                }
                StatusCode::TOO_MANY_REQUESTS => return Err(DataverseError::Throttled { attempts: attempt }),
                s if (s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT) && attempt < MAX_ATTEMPTS => {
                    tracing::warn!(status = s.as_u16(), attempt, "dataverse server error; retrying");
                    tokio::time::sleep(backoff(self.backoff_base, attempt)).await;
                }
                s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => {
                    let (_, message) = odata_error(&text);
                    return Err(DataverseError::Transient {
                        status: s.as_u16(),
                        attempts: attempt,
                        message,
                    });
                }
                s if s.is_redirection() => {
                    return Err(DataverseError::Redirected {
                        status: s.as_u16(),
                        to: redirect_host(&location),
                    });
                }
                s => {
                    let (code, message) = odata_error(&text);
                    return Err(match s {
                        StatusCode::FORBIDDEN => DataverseError::Forbidden { code, message },
                        StatusCode::NOT_FOUND => DataverseError::NotFound { code, message },
                        _ => DataverseError::BadQuery { code, message },
                    });
                }
            }
        }
    }

    fn entity_url(&self, set: EntitySet, params: &[(&str, String)]) -> Result<Url, DataverseError> {
        let mut url = self
            .api
            .join(set.name())
            .map_err(|e| DataverseError::Settings(e.to_string()))?;
        if !params.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(params.iter().map(|(k, v)| (*k, v.as_str())));
        }
        Ok(url)
    }

    /// GETs `url` and every page after it (following `@odata.nextLink`); returns all rows.
    async fn all_pages(&self, mut url: Url, prefer: &[&str]) -> Result<Vec<Value>, DataverseError> {
        let mut rows = Vec::new();
        loop {
            let body = self.get(url, prefer).await?;
            if let Some(Value::Array(values)) = body.get("value") {
                rows.extend(values.iter().cloned());
            }
            match body["@odata.nextLink"].as_str() {
                Some(next) => url = Url::parse(next).map_err(|_| DataverseError::Decode(next.to_owned()))?,
                None => return Ok(rows),
            }
        }
    }

    fn page_pref(&self) -> String {
        format!("odata.maxpagesize={}", self.settings.page_size.clamp(1, 5000))
    }

    /// Reads one page of changes. `cursor` is what the previous page returned (a next link or
    /// a delta link); `None` starts a full read. An expired delta token starts a full read too,
    /// flagged `full_resync`.
    pub async fn changes(
        &self,
        set: EntitySet,
        select: &[&str],
        cursor: Option<&str>,
    ) -> Result<ChangePage, DataverseError> {
        let page_pref = self.page_pref();
        // No annotations on change-tracking reads: with them, Dataverse has been seen to drop
        // `@odata.deltaLink` from the last page (powerapps-docs issue 439). The poll needs ids and
        // versions only; the transform reads the rows again, annotated.
        let prefer = ["odata.track-changes", page_pref.as_str()];
        let full_read = self.entity_url(set, &[("$select", select.join(","))])?;
        let delta_read = cursor.is_some_and(is_delta_link);
        let (body, full_resync) = match cursor {
            Some(link) => {
                let url = Url::parse(link)
                    .map_err(|_| DataverseError::Decode(format!("stored cursor `{link}` is not a URL")))?;
                match self.get(url, &prefer).await {
                    Ok(body) => (body, false),
                    Err(DataverseError::ChangeTokenExpired) => {
                        tracing::warn!(
                            table = set.name(),
                            "change-tracking token expired; reading the whole table again"
                        );
                        (self.get(full_read.clone(), &prefer).await?, true)
                    }
                    Err(e) => return Err(e),
                }
            }
            None => (self.get(full_read.clone(), &prefer).await?, false),
        };
        let mut rows = Vec::new();
        let mut deleted = Vec::new();
        let no_links = body.get("@odata.nextLink").is_none() && body.get("@odata.deltaLink").is_none();
        let values = match body.get("value") {
            Some(Value::Array(values)) => values.clone(),
            // The documented empty answer to a delta read with no changes.
            None if delta_read && no_links => Vec::new(),
            _ => {
                return Err(DataverseError::Decode(format!(
                    "a change-tracking page of {} without its `value` array",
                    set.name()
                )));
            }
        };
        for item in values {
            let is_deletion = item
                .get("@odata.context")
                .and_then(Value::as_str)
                .is_some_and(|c| c.ends_with("$deletedEntity"));
            if is_deletion {
                if let Some(id) = item.get("id").and_then(Value::as_str) {
                    deleted.push(id.to_ascii_lowercase());
                }
            } else {
                rows.push(item);
            }
        }
        let (cursor, caught_up) = match (body["@odata.nextLink"].as_str(), body["@odata.deltaLink"].as_str()) {
            (Some(next), _) => (next.to_owned(), false),
            (None, Some(delta)) => (delta.to_owned(), true),
            // "An empty JSON response is returned if no table changes have occurred" (change
            // tracking page): a delta read with no link keeps the delta link it was read with.
            (None, None) if delta_read && !full_resync => {
                if !rows.is_empty() || !deleted.is_empty() {
                    tracing::warn!(
                        table = set.name(),
                        "a change-tracking page with changes but no @odata.deltaLink; the same delta link is read again next poll (repeats are harmless)"
                    );
                }
                (cursor.unwrap_or_default().to_owned(), true)
            }
            // A full read whose last page has no delta link cannot be continued: the next poll
            // reads the table again rather than stalling on a cursor that leads nowhere.
            (None, None) => {
                tracing::warn!(
                    table = set.name(),
                    "Dataverse ended a change-tracking read without @odata.deltaLink; the next poll reads the whole table again"
                );
                (full_read.to_string(), true)
            }
        };
        Ok(ChangePage {
            rows,
            deleted,
            cursor,
            caught_up,
            full_resync,
        })
    }

    /// Reads rows changed after a watermark, following every page; returns them and the next
    /// watermark.
    pub async fn watermark_changes(
        &self,
        set: EntitySet,
        select: &[&str],
        watermark: &Watermark,
    ) -> Result<(Vec<Value>, Watermark), DataverseError> {
        let (filter, order) = match watermark {
            Watermark::Version(v) => (format!("versionnumber gt {v}"), "versionnumber asc"),
            Watermark::ModifiedOn { at, .. } => (format!("modifiedon ge {at}"), "modifiedon asc"),
        };
        let mut select: Vec<&str> = select.to_vec();
        select.extend(["versionnumber", "modifiedon"]);
        select.sort_unstable();
        select.dedup();
        let page_pref = self.page_pref();
        let prefer = [page_pref.as_str(), ANNOTATIONS];
        let url = self.entity_url(
            set,
            &[
                ("$select", select.join(",")),
                ("$filter", filter),
                ("$orderby", order.into()),
            ],
        )?;
        let mut rows = self.all_pages(url, &prefer).await?;
        let version = |r: &Value| r["versionnumber"].as_i64().unwrap_or(0);
        let id = |r: &Value| r[set.key()].as_str().unwrap_or("").to_owned();
        let next = match watermark {
            Watermark::Version(v) => Watermark::Version(rows.iter().map(version).max().unwrap_or(*v).max(*v)),
            Watermark::ModifiedOn { at, seen } => {
                rows.retain(|r| !seen.contains(&(id(r), version(r))));
                let newest = rows
                    .iter()
                    .filter_map(|r| r["modifiedon"].as_str())
                    .max()
                    .map(str::to_owned)
                    .unwrap_or_else(|| at.clone());
                let mut at_newest: Vec<(String, i64)> = rows
                    .iter()
                    .filter(|r| r["modifiedon"].as_str() == Some(newest.as_str()))
                    .map(|r| (id(r), version(r)))
                    .collect();
                if newest == *at {
                    at_newest.extend(seen.iter().cloned());
                }
                Watermark::ModifiedOn {
                    at: newest,
                    seen: at_newest,
                }
            }
        };
        Ok((rows, next))
    }

    /// Reads one row of a table: proves the credentials work and the application user may read
    /// it (`oppsync validate`).
    pub async fn probe(&self, set: EntitySet) -> Result<(), DataverseError> {
        let url = self.entity_url(set, &[("$select", set.key().to_owned()), ("$top", "1".to_owned())])?;
        self.get(url, &[]).await.map(|_| ())
    }

    /// Whether change tracking is on for a table, from its metadata
    /// (`EntityDefinitions(LogicalName='…')?$select=ChangeTrackingEnabled`).
    pub async fn change_tracking_enabled(&self, set: EntitySet) -> Result<bool, DataverseError> {
        let mut url = self
            .api
            .join(&format!("EntityDefinitions(LogicalName='{}')", set.logical()))
            .map_err(|e| DataverseError::Settings(e.to_string()))?;
        url.query_pairs_mut().append_pair("$select", "ChangeTrackingEnabled");
        let body = self.get(url, &[]).await?;
        body["ChangeTrackingEnabled"].as_bool().ok_or_else(|| {
            DataverseError::Decode(format!(
                "EntityDefinitions for {} has no ChangeTrackingEnabled",
                set.logical()
            ))
        })
    }

    /// Every id in a table (a watermark strategy's periodic scan for deletions).
    pub async fn all_ids(&self, set: EntitySet) -> Result<BTreeSet<String>, DataverseError> {
        let page_pref = self.page_pref();
        let url = self.entity_url(set, &[("$select", set.key().to_owned())])?;
        let rows = self.all_pages(url, &[page_pref.as_str()]).await?;
        Ok(rows
            .iter()
            .filter_map(|row| row[set.key()].as_str())
            .map(str::to_ascii_lowercase)
            .collect())
    }

    /// Reads rows whose `property` (a logical name, like `contactid` or `record1id`) is one of
    /// `ids`, in `In()` chunks, following pages; `filter` and `expand` are added to each request.
    pub async fn read_in(
        &self,
        set: EntitySet,
        property: &str,
        ids: &[String],
        select: &[&str],
        filter: Option<&str>,
        expand: Option<&str>,
    ) -> Result<Vec<Value>, DataverseError> {
        let mut rows = Vec::new();
        let page_pref = self.page_pref();
        let prefer = [page_pref.as_str(), ANNOTATIONS];
        for url in self.in_urls(set, property, ids, select, filter, expand)? {
            rows.extend(self.all_pages(url, &prefer).await?);
        }
        Ok(rows)
    }

    /// The `In()` requests for `ids`: as few as fit, each URL measured as sent against
    /// Dataverse's 32 KB limit with room left for the `$skiptoken` a next link adds.
    pub fn in_urls(
        &self,
        set: EntitySet,
        property: &str,
        ids: &[String],
        select: &[&str],
        filter: Option<&str>,
        expand: Option<&str>,
    ) -> Result<Vec<Url>, DataverseError> {
        let url_for = |chunk: &[String]| {
            let values: Vec<String> = chunk.iter().map(|id| format!("'{id}'")).collect();
            let mut f = format!(
                "Microsoft.Dynamics.CRM.In(PropertyName='{property}',PropertyValues=[{}])",
                values.join(",")
            );
            if let Some(extra) = filter {
                f.push_str(" and ");
                f.push_str(extra);
            }
            let mut params = vec![("$select", select.join(",")), ("$filter", f)];
            if let Some(e) = expand {
                params.push(("$expand", e.to_owned()));
            }
            self.entity_url(set, &params)
        };
        let fixed = url_for(&[])?.as_str().len();
        let mut urls = Vec::new();
        let mut start = 0;
        while start < ids.len() {
            // Each id adds `'id',` percent-encoded; count it exactly, then check the real URL.
            let mut end = start;
            let mut len = fixed;
            while end < ids.len() {
                let cost = form_encoded_len(&ids[end]) + 9; // two %27 and one %2C
                if end > start && len + cost > MAX_GET_URL {
                    break;
                }
                len += cost;
                end += 1;
            }
            let mut url = url_for(&ids[start..end])?;
            while url.as_str().len() > MAX_GET_URL && end - start > 1 {
                end = start + (end - start) / 2;
                url = url_for(&ids[start..end])?;
            }
            if url.as_str().len() > MAX_GET_URL {
                return Err(DataverseError::Settings(format!(
                    "a query of {} is {} bytes even for one record, over Dataverse's 32 KB URL limit; map fewer fields",
                    set.name(),
                    url.as_str().len()
                )));
            }
            urls.push(url);
            start = end;
        }
        Ok(urls)
    }

    /// Everything the mapping needs for a batch of opportunities, in a handful of requests:
    /// active opportunity→contact connections with their roles expanded, the contacts (customers
    /// and stakeholders), and the accounts (customers and the contacts' parents).
    pub async fn related(&self, opportunities: &[Opportunity]) -> Result<(Related, Vec<RecordError>), DataverseError> {
        let opportunity_ids: Vec<String> = opportunities.iter().map(|o| o.id.to_string()).collect();
        let connections = self
            .read_in(
                EntitySet::Connections,
                "record1id",
                &opportunity_ids,
                &[
                    "connectionid",
                    "_record1id_value",
                    "_record2id_value",
                    "record1objecttypecode",
                    "record2objecttypecode",
                    "_record2roleid_value",
                    "statecode",
                ],
                Some("record1objecttypecode eq 3 and record2objecttypecode eq 2 and statecode eq 0"),
                Some("record2roleid($select=connectionroleid,name,category)"),
            )
            .await?;
        let mut contact_ids: BTreeSet<String> = BTreeSet::new();
        let mut account_ids: BTreeSet<String> = BTreeSet::new();
        for o in opportunities {
            if let Some(c) = o.customer.customerid {
                match c.table {
                    Some(Table::Account) => {
                        account_ids.insert(c.id.to_string());
                    }
                    Some(Table::Contact) => {
                        contact_ids.insert(c.id.to_string());
                    }
                    // Unknown table: read it as both; the mapping resolves it by what exists.
                    _ => {
                        account_ids.insert(c.id.to_string());
                        contact_ids.insert(c.id.to_string());
                    }
                }
            }
            account_ids.extend(o.customer.parent_account.map(|a| a.to_string()));
            contact_ids.extend(o.customer.parent_contact.map(|c| c.to_string()));
        }
        for c in &connections {
            if let Some(id) = c["_record2id_value"].as_str() {
                contact_ids.insert(id.to_ascii_lowercase());
            }
        }
        let contact_ids: Vec<String> = contact_ids.into_iter().collect();
        let contacts = self
            .read_in(
                EntitySet::Contacts,
                "contactid",
                &contact_ids,
                &[
                    "contactid",
                    "emailaddress1",
                    "firstname",
                    "lastname",
                    "_parentcustomerid_value",
                ],
                None,
                None,
            )
            .await?;
        for c in &contacts {
            if let Ok(contact) = oppsync_mapping::Contact::from_json(c.clone()) {
                match contact.parent {
                    Some(ParentCustomer::Account(a)) => {
                        account_ids.insert(a.to_string());
                    }
                    Some(ParentCustomer::Unknown(g)) => {
                        account_ids.insert(g.to_string());
                    }
                    _ => {}
                }
            }
        }
        let account_ids: Vec<String> = account_ids.into_iter().collect();
        let accounts = self
            .read_in(
                EntitySet::Accounts,
                "accountid",
                &account_ids,
                &["accountid", "name"],
                None,
                None,
            )
            .await?;
        Ok(Related::from_json(accounts, contacts, Vec::new(), connections))
    }

    /// Reads opportunities by id (a resync of named records).
    pub async fn opportunities(&self, ids: &[OpportunityId], select: &[&str]) -> Result<Vec<Value>, DataverseError> {
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        self.read_in(EntitySet::Opportunities, "opportunityid", &ids, select, None, None)
            .await
    }
}

/// The length of `text` as `application/x-www-form-urlencoded` (how `Url` writes query pairs).
fn form_encoded_len(text: &str) -> usize {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"*-._ ".contains(&b) {
                1
            } else {
                3
            }
        })
        .sum()
}

/// Whether a stored cursor is a delta link (a caught-up read), not a next link or a full read.
fn is_delta_link(link: &str) -> bool {
    Url::parse(link).is_ok_and(|u| u.query_pairs().any(|(k, _)| k == "$deltatoken"))
}

/// The opportunities a page of connection rows touches: either side may be the opportunity.
pub fn opportunities_touched(connection_rows: &[Value]) -> BTreeSet<OpportunityId> {
    let mut out = BTreeSet::new();
    for row in connection_rows {
        for side in ["1", "2"] {
            let code = row[format!("record{side}objecttypecode")].as_i64();
            let logical = row[format!("_record{side}id_value@Microsoft.Dynamics.CRM.lookuplogicalname")].as_str();
            if (code == Some(3) || logical == Some("opportunity"))
                && let Some(id) = row[format!("_record{side}id_value")]
                    .as_str()
                    .and_then(|t| OpportunityId::parse(t).ok())
            {
                out.insert(id);
            }
        }
    }
    out
}

/// Contacts a page of connection rows names (for tests and diagnostics).
pub fn contacts_touched(connection_rows: &[Value]) -> BTreeSet<ContactId> {
    let mut out = BTreeSet::new();
    for row in connection_rows {
        for side in ["1", "2"] {
            if row[format!("record{side}objecttypecode")].as_i64() == Some(2)
                && let Some(id) = row[format!("_record{side}id_value")]
                    .as_str()
                    .and_then(|t| ContactId::parse(t).ok())
            {
                out.insert(id);
            }
        }
    }
    out
}

/// Capped exponential backoff with jitter: between half and all of base × 2^(attempt-1), at most 30 s.
fn backoff(base: Duration, attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let ceiling = base
        .saturating_mul(1 << attempt.saturating_sub(1).min(10))
        .min(Duration::from_secs(30));
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    ceiling / 2 + ceiling / 2 * ((h.finish() % 1000) as u32) / 1000
}

/// How changes are detected, chosen in the `[dataverse]` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeDetection {
    /// Dataverse change tracking (delta links); needs change tracking enabled on the tables.
    ChangeTracking,
    /// `versionnumber gt N`, with a full id scan every `full_scan_every` polls for deletions.
    VersionWatermark,
    /// `modifiedon ge T` (deduplicated), with the same full scan.
    ModifiedOnWatermark,
}

/// The `[dataverse]` section of oppsync's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataverseOptions {
    pub change_detection: ChangeDetection,
    pub page_size: u32,
    pub concurrency: usize,
    /// With a watermark: scan every id for deletions once per this many polls.
    pub full_scan_every: u32,
}

impl Default for DataverseOptions {
    fn default() -> Self {
        DataverseOptions {
            change_detection: ChangeDetection::ChangeTracking,
            page_size: 5000,
            concurrency: 4,
            full_scan_every: 1440,
        }
    }
}

impl DataverseOptions {
    /// Reads and checks the `[dataverse]` table (absent: the defaults); each error names the key
    /// and the fix.
    pub fn from_toml(document: &str) -> Result<DataverseOptions, Vec<String>> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Section {
            change_detection: Option<String>,
            page_size: Option<i64>,
            concurrency: Option<i64>,
            full_scan_every: Option<i64>,
        }
        #[derive(serde::Deserialize)]
        struct Doc {
            dataverse: Option<Section>,
        }
        let doc: Doc = toml::from_str(document).map_err(|e| vec![format!("dataverse: {}", one_line(&e))])?;
        let Some(section) = doc.dataverse else {
            return Ok(DataverseOptions::default());
        };
        let mut errors = Vec::new();
        let mut options = DataverseOptions::default();
        match section.change_detection.as_deref() {
            None | Some("change_tracking") => {}
            Some("versionnumber") => options.change_detection = ChangeDetection::VersionWatermark,
            Some("modifiedon") => options.change_detection = ChangeDetection::ModifiedOnWatermark,
            Some(other) => errors.push(format!(
                "dataverse.change_detection: unknown strategy `{other}`. Fix: use \"change_tracking\" (needs change tracking enabled on opportunity and connection), \"versionnumber\" or \"modifiedon\""
            )),
        }
        match section.page_size {
            None => {}
            Some(n @ 1..=5000) => options.page_size = n as u32,
            Some(n) => errors.push(format!(
                "dataverse.page_size: {n} is outside 1..=5000. Fix: Dataverse serves at most 5000 rows a page; 5000 makes the fewest requests"
            )),
        }
        match section.concurrency {
            None => {}
            Some(n @ 1..=52) => options.concurrency = n as usize,
            Some(n) => errors.push(format!(
                "dataverse.concurrency: {n} is outside 1..=52. Fix: Dataverse allows 52 concurrent requests per user; 4 is plenty"
            )),
        }
        match section.full_scan_every {
            None => {}
            Some(n) if n >= 1 => options.full_scan_every = n as u32,
            Some(n) => errors.push(format!(
                "dataverse.full_scan_every: {n} must be at least 1. Fix: 1440 scans once a day at one poll a minute"
            )),
        }
        if errors.is_empty() { Ok(options) } else { Err(errors) }
    }

    /// Logs the strategy in use (operators need to know deletions come late with a watermark).
    pub fn log(&self) {
        match self.change_detection {
            ChangeDetection::ChangeTracking => {
                tracing::info!(
                    strategy = "change_tracking",
                    page_size = self.page_size,
                    "dataverse change detection"
                )
            }
            strategy => tracing::info!(
                strategy = if strategy == ChangeDetection::VersionWatermark {
                    "versionnumber"
                } else {
                    "modifiedon"
                },
                full_scan_every = self.full_scan_every,
                page_size = self.page_size,
                "dataverse change detection: watermark; deletions are found by the periodic full scan"
            ),
        }
    }
}

/// A TOML error on one line, with the line it points at (which names the key).
fn one_line(e: &toml::de::Error) -> String {
    e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_strategy_is_chosen_by_configuration_and_defaults_to_change_tracking() {
        assert_eq!(DataverseOptions::from_toml("").unwrap(), DataverseOptions::default());
        let o = DataverseOptions::from_toml("[dataverse]\nchange_detection = \"versionnumber\"\npage_size = 1000\n")
            .unwrap();
        assert_eq!(
            (o.change_detection, o.page_size),
            (ChangeDetection::VersionWatermark, 1000)
        );
        let o = DataverseOptions::from_toml("[dataverse]\nchange_detection = \"modifiedon\"\n").unwrap();
        assert_eq!(o.change_detection, ChangeDetection::ModifiedOnWatermark);
    }

    #[test]
    fn bad_options_are_errors_naming_the_key_and_the_fix() {
        let e = DataverseOptions::from_toml(
            "[dataverse]\nchange_detection = \"polling\"\npage_size = 9000\nconcurrency = 0\nfull_scan_every = 0\n",
        )
        .unwrap_err();
        assert_eq!(e.len(), 4);
        for (err, key) in e
            .iter()
            .zip(["change_detection", "page_size", "concurrency", "full_scan_every"])
        {
            assert!(
                err.starts_with(&format!("dataverse.{key}")) && err.contains("Fix:"),
                "{err}"
            );
        }
        assert!(DataverseOptions::from_toml("[dataverse]\npagesize = 1\n").unwrap_err()[0].contains("pagesize"));
    }
}
