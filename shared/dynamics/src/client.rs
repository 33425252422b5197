//! The client's core: one `reqwest::Client`, the Entra ID token, and one GET with its retries
//! (401 refresh, 429 `Retry-After`, 5xx backoff), only to the environment's own host; paging.

use super::*;
use secrecy::ExposeSecret;

/// The largest page oppsync reads: 5,000 annotated rows are a few MB; an answer past this is
/// not Dataverse's page, and is refused before it is held whole.
pub(crate) const MAX_PAGE_BYTES: usize = 64 * 1024 * 1024;
/// The largest token answer (a few KB in practice).
const MAX_TOKEN_BYTES: usize = 1024 * 1024;

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

    pub(crate) async fn access_token(&self, refresh: bool) -> Result<Secret, DataverseError> {
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
                ("client_secret", self.settings.client_secret.expose_secret()),
                ("scope", scope.as_str()),
            ])
            .send()
            .await
            .map_err(|e| DataverseError::Transport {
                message: format!(
                    "token request: {}",
                    oppsync_support::error_without_urls(&e, "request failed")
                ),
                timeout: e.is_timeout(),
            })?;
        let status = response.status();
        let text = oppsync_support::body_capped(response, MAX_TOKEN_BYTES)
            .await
            .unwrap_or_default();
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
        // Capped at a day, so a server's absurd number can never overflow the clock.
        let lifetime = Duration::from_secs(issued.expires_in.min(86_400));
        let until = Instant::now()
            .checked_add(lifetime.saturating_sub(Duration::from_secs(300).min(lifetime / 2)))
            .unwrap_or_else(Instant::now);
        let token = Secret::from(issued.access_token);
        *cached = Some((token.clone(), until));
        Ok(token)
    }

    /// Whether `url` is on this environment (scheme, host and port): the only place the
    /// bearer token is sent.
    pub(crate) fn is_ours(&self, url: &Url) -> bool {
        let ours = &self.settings.environment;
        url.host_str() == ours.host_str()
            && url.port_or_known_default() == ours.port_or_known_default()
            && url.scheme() == ours.scheme()
    }

    /// This environment's host, as DYNAMICS_URL names it.
    pub(crate) fn host(&self) -> &str {
        self.settings.environment.host_str().unwrap_or_default()
    }

    /// GETs one URL of the environment, with retries; returns the JSON body.
    pub(crate) async fn get(&self, url: Url, prefer: &[&str]) -> Result<Value, DataverseError> {
        if !self.is_ours(&url) {
            return Err(DataverseError::ForeignLink(crate::changes::link_host(&url)));
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
                .bearer_auth(token.expose_secret())
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
                    let error = oppsync_support::error_without_urls(&e, "request failed");
                    tracing::warn!(error = %error, attempt, "dataverse request failed; retrying");
                    tokio::time::sleep(backoff(self.backoff_base, attempt)).await;
                    continue;
                }
                Err(e) => {
                    return Err(DataverseError::Transport {
                        message: oppsync_support::error_without_urls(&e, "request failed"),
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
            let text = match oppsync_support::body_capped(response, MAX_PAGE_BYTES).await {
                Ok(text) => text,
                Err(oppsync_support::BodyError::TooLarge { .. }) => {
                    return Err(DataverseError::TooLarge {
                        cap_mb: MAX_PAGE_BYTES / (1024 * 1024),
                        page_size: self.settings.page_size,
                    });
                }
                // A connection lost mid-answer: read again, like any transient failure.
                Err(oppsync_support::BodyError::Read(..)) => String::new(),
            };
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

    pub(crate) fn entity_url(&self, set: EntitySet, params: &[(&str, String)]) -> Result<Url, DataverseError> {
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
    pub(crate) async fn all_pages(&self, url: Url, prefer: &[&str]) -> Result<Vec<Value>, DataverseError> {
        let mut rows = Vec::new();
        self.each_page(url, prefer, |page| rows.extend(page)).await?;
        Ok(rows)
    }

    /// GETs `url` and every page after it, handing each page's rows to `visit` as it comes: a
    /// whole-table read holds one page at a time, not the table.
    pub(crate) async fn each_page(
        &self,
        mut url: Url,
        prefer: &[&str],
        mut visit: impl FnMut(Vec<Value>),
    ) -> Result<(), DataverseError> {
        loop {
            let (rows, next) = self.one_page(url, prefer).await?;
            visit(rows);
            match next {
                Some(next) => url = next,
                None => return Ok(()),
            }
        }
    }

    /// GETs one page of a collection: its rows and the link to the next page, if any.
    pub(crate) async fn one_page(
        &self,
        url: Url,
        prefer: &[&str],
    ) -> Result<(Vec<Value>, Option<Url>), DataverseError> {
        let path = url.path().to_owned();
        let mut body = self.get(url, prefer).await?;
        // Absent is not empty: zero rows would plan deletes for a whole batch.
        let rows = match body.get_mut("value").map(Value::take) {
            Some(Value::Array(values)) => values,
            _ => {
                return Err(DataverseError::Decode(format!(
                    "a collection answer without its `value` array (from {path})"
                )));
            }
        };
        let next = match body["@odata.nextLink"].as_str() {
            Some(next) => Some(Url::parse(next).map_err(|_| DataverseError::Decode(next.to_owned()))?),
            None => None,
        };
        Ok((rows, next))
    }

    pub(crate) fn page_pref(&self) -> String {
        format!("odata.maxpagesize={}", self.settings.page_size.clamp(1, 5000))
    }

    /// Reads one row of a table: proves the credentials work and the application user may read
    /// it (`oppsync validate`).
    pub async fn probe(&self, set: EntitySet) -> Result<(), DataverseError> {
        let url = self.entity_url(set, &[("$select", set.key().to_owned()), ("$top", "1".to_owned())])?;
        self.get(url, &[]).await.map(|_| ())
    }

    /// The transaction currencies opportunities use: none, or the first two found. Two
    /// requests of one row each, whatever the table's size (`ne null` is said outright, so the
    /// answer does not rest on how `ne` treats a null).
    pub async fn opportunity_currencies(&self) -> Result<Vec<String>, DataverseError> {
        const CURRENCY: &str = "_transactioncurrencyid_value";
        let mut found: Vec<String> = Vec::new();
        for _ in 0..2 {
            let mut filter = format!("{CURRENCY} ne null");
            for id in &found {
                filter.push_str(&format!(" and {CURRENCY} ne {id}"));
            }
            let url = self.entity_url(
                EntitySet::Opportunities,
                &[
                    ("$select", CURRENCY.to_owned()),
                    ("$filter", filter),
                    ("$top", "1".to_owned()),
                ],
            )?;
            let (rows, _) = self.one_page(url, &[]).await?;
            // Only a GUID goes back into the next filter.
            match rows
                .first()
                .and_then(|r| r[CURRENCY].as_str())
                .map(|t| oppsync_support::input::guid(CURRENCY, t, ""))
            {
                Some(Ok(id)) => found.push(id),
                Some(Err(_)) => return Err(DataverseError::Decode(format!("{CURRENCY} that is not a GUID"))),
                None => break,
            }
        }
        Ok(found)
    }

    /// Whether a row exists, read by its key (`{set}({id})`): a 404 says it does not. This
    /// confirms a row a batch read did not return before anything is deleted for it.
    pub async fn exists(&self, set: EntitySet, id: &str) -> Result<bool, DataverseError> {
        let mut url = self
            .api
            .join(&format!("{}({id})", set.name()))
            .map_err(|e| DataverseError::Settings(e.to_string()))?;
        url.query_pairs_mut().append_pair("$select", set.key());
        match self.get(url, &[]).await {
            Ok(_) => Ok(true),
            Err(DataverseError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A path under the Web API root (`…/api/data/v9.2/`).
    pub(crate) fn api_url(&self, path: &str) -> Result<Url, DataverseError> {
        self.api.join(path).map_err(|e| DataverseError::Settings(e.to_string()))
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
}

/// The client's backoff: jittered, capped at 30 s.
pub(crate) fn backoff(base: Duration, attempt: u32) -> Duration {
    oppsync_support::backoff(base, attempt, Duration::from_secs(30))
}
