//! A Marketo REST API simulator that answers what Adobe's documentation shows, and nothing more
//! (../shared/docs/marketo.md; the pages named below are Adobe's marketo-developer REST pages).
//!
//! - Writes answer HTTP 200 with `result` in input order (error-codes page, "Record-Level").
//!   Opportunities, roles and companies carry `seq` (their pages' examples); **Sync Leads results
//!   do not** (leads page, "Create and Update": `{"id":50,"status":"created"}`). A skip is
//!   `{"status":"skipped","reasons":[{code,message}]}` with a 1xxx code (error-codes page).
//! - Request-level errors are HTTP 200 with `success: false` and `errors` (6xx/7xx, error-codes
//!   page); bodies over 1 MB get HTTP 413 and URLs over 8 KB HTTP 414 (same page).
//! - Identity takes its three parameters from the query string, by GET or POST (authentication
//!   page, "Creating an Access Token"); tokens expire (602) or are unknown (601).
//! - Limits: 100 calls per 20 s (606), 10 at once (615), a daily quota (607), 300 records a
//!   call (error-codes page and marketo.md).
//! - Native CRM sync (`crm_enabled`): opportunity and company writes are skipped with 1018 (the
//!   opportunities and companies pages: "read-only"), the role API is refused (the
//!   opportunity-roles page: "only exposed for subscriptions which do not have a native CRM sync";
//!   the code is not documented, so `crm_refusal` picks it), and with `crm_reads_disabled` the
//!   opportunity and company reads are refused too (the lead-database page: "disabled").
//!
//! Where the docs are silent the simulator takes the strictest reading, and [`ResultShape`]
//! switches to the other plausible shapes the client must also survive. Each such choice is
//! marked "unconfirmed" and listed in docs/API-FIDELITY.md.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::query::decode_pairs;

fn parse_query(text: &str) -> HashMap<String, String> {
    decode_pairs(text).into_iter().collect()
}

/// Limits and behaviour, each switchable. `Default` is Marketo's documented limits.
#[derive(Debug, Clone)]
pub struct MarketoConfig {
    pub client_id: String,
    pub client_secret: String,
    pub token_ttl: Duration,
    /// Calls allowed per `rate_window` (Marketo: 100 per 20 s); `None` disables the check.
    pub rate_limit: Option<usize>,
    pub rate_window: Duration,
    /// Concurrent calls allowed (Marketo: 10); `None` disables the check.
    pub concurrency_limit: Option<usize>,
    /// Calls allowed per day (Marketo: 50,000 by default; subscriptions vary).
    pub daily_quota: u64,
    pub max_batch: usize,
    pub max_body_bytes: usize,
    pub max_url_bytes: usize,
    /// Time each REST call takes inside the simulator, so concurrency is real.
    pub latency: Duration,
    /// Native CRM sync enabled: opportunity, role and company writes are refused (1018).
    pub crm_enabled: bool,
    /// Custom opportunity fields that exist besides the standard ones.
    pub custom_opportunity_fields: Vec<String>,
    /// Custom lead fields (for example one holding the Dynamics contact id).
    pub custom_lead_fields: Vec<String>,
    /// The code the role API answers with when native CRM sync disables it (unconfirmed:
    /// 1018 "CRM Enabled", 603 "Access denied" and 610 "Requested resource not found" are the
    /// plausible ones).
    pub crm_refusal: &'static str,
    /// With `crm_enabled`: the opportunity and company reads (describe, query) are refused as
    /// well, the lead-database page's reading ("disabled") rather than the object pages'
    /// ("read-only").
    pub crm_reads_disabled: bool,
    /// The shape of write results: as documented, or a variant the client must also survive.
    pub result_shape: ResultShape,
    /// Random faults: a call fails with 601, 602, 604, 606, 611, 615 or HTTP 502, and a record
    /// in a write is skipped with 1014 "Failed to create Object", which a retry gets past.
    pub chaos: Option<crate::Chaos>,
}

/// How write results are shaped. `Documented` is what Adobe's pages show; the others are
/// readings the docs leave open, for testing the client against each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResultShape {
    #[default]
    Documented,
    /// Results carrying `seq` come back in another order than the input (seq still right).
    Shuffled,
    /// No result carries `seq`: every write is matched by position, as Sync Leads is.
    NoSeq,
    /// A skip carries `reason: {code, message}` (the OpenAPI lead result) instead of
    /// `reasons: [...]`.
    SingularReason,
}

impl Default for MarketoConfig {
    fn default() -> Self {
        MarketoConfig {
            client_id: "sim-client".into(),
            client_secret: "sim-secret".into(),
            token_ttl: Duration::from_secs(3600),
            rate_limit: Some(100),
            rate_window: Duration::from_secs(20),
            concurrency_limit: Some(10),
            daily_quota: 50_000,
            max_batch: 300,
            max_body_bytes: 1_048_576,
            max_url_bytes: 8 * 1024,
            latency: Duration::ZERO,
            crm_enabled: false,
            custom_opportunity_fields: Vec::new(),
            custom_lead_fields: vec!["dynamicsContactId".into()],
            crm_refusal: "1018",
            crm_reads_disabled: false,
            result_shape: ResultShape::Documented,
            chaos: None,
        }
    }
}

/// The endpoints, for counters and fault schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Identity,
    OpportunitySync,
    OpportunityDelete,
    OpportunityQuery,
    OpportunityDescribe,
    RoleSync,
    RoleDelete,
    RoleQuery,
    RoleDescribe,
    CompanySync,
    CompanyQuery,
    LeadQuery,
    LeadSync,
    Usage,
}

/// A fault to inject on the Nth call (1-based) of an endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// HTTP 200, `success: false`, this error code.
    Code(&'static str),
    /// This HTTP status with an empty body.
    Http(u16),
    /// A body that is not JSON.
    Malformed,
    /// A well-formed success with one result fewer than the input.
    DropResult,
}

const STANDARD_OPPORTUNITY_FIELDS: &[&str] = &[
    "externalOpportunityId",
    "name",
    "description",
    "stage",
    "type",
    "amount",
    "expectedRevenue",
    "closeDate",
    "fiscalQuarter",
    "fiscalYear",
    "forecastCategory",
    "forecastCategoryName",
    "isClosed",
    "isWon",
    "quantity",
    "probability",
    "lastActivityDate",
    "leadSource",
    "nextStep",
    "externalCompanyId",
    "externalSalesPersonId",
];
const ROLE_FIELDS: &[&str] = &[
    "externalOpportunityId",
    "leadId",
    "role",
    "isPrimary",
    "externalCreatedDate",
];
const COMPANY_FIELDS: &[&str] = &[
    "externalCompanyId",
    "company",
    "website",
    "industry",
    "numberOfEmployees",
];
const LEAD_FIELDS: &[&str] = &[
    "email",
    "firstName",
    "lastName",
    "company",
    "externalCompanyId",
    "title",
];

/// A lead as the simulator stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct SimLead {
    pub id: i64,
    pub fields: Map<String, Value>,
}

/// An opportunity role as the simulator stores it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SimRole {
    pub external_opportunity_id: String,
    pub lead_id: i64,
    pub role: String,
    pub is_primary: bool,
    pub marketo_guid: String,
}

/// Everything the simulator holds, for assertions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// By externalOpportunityId: the fields, with `marketoGUID`.
    pub opportunities: BTreeMap<String, Map<String, Value>>,
    pub roles: Vec<SimRole>,
    /// By externalCompanyId.
    pub companies: BTreeMap<String, Map<String, Value>>,
    pub leads: Vec<SimLead>,
}

#[derive(Default)]
struct Counters {
    calls: BTreeMap<Endpoint, u64>,
    /// Records carried by answered calls, per endpoint (lead lookups: the values looked up).
    records: BTreeMap<Endpoint, u64>,
    /// Calls refused by a limit, by code (606, 615, 607, 601, 602, 413, 414).
    refused: BTreeMap<String, u64>,
    in_flight: usize,
    high_water: usize,
    daily: u64,
    window: VecDeque<Instant>,
    token_in_query: u64,
    method_overrides: u64,
    /// Calls and records failed by `chaos`.
    chaos_calls: u64,
    chaos_records: u64,
}

#[derive(Default)]
struct Data {
    opportunities: BTreeMap<String, Map<String, Value>>,
    roles: BTreeMap<(String, i64, String), SimRole>,
    companies: BTreeMap<String, Map<String, Value>>,
    /// By id; `lead_index` finds them by a lookup field's value (Marketo's lookups are
    /// indexed; a linear scan made 100,000-opportunity runs quadratic).
    leads: BTreeMap<i64, SimLead>,
    lead_index: HashMap<(String, String), BTreeSet<i64>>,
    next_id: i64,
}

impl Data {
    /// The index key of a lead field's value: emails compare case-insensitively in Marketo.
    fn index_key(field: &str, value: &str) -> (String, String) {
        if field == "email" {
            (field.to_owned(), value.to_ascii_lowercase())
        } else {
            (field.to_owned(), value.to_owned())
        }
    }

    fn unindex(&mut self, id: i64) {
        if let Some(lead) = self.leads.get(&id) {
            for (field, value) in &lead.fields {
                if let Some(v) = value.as_str()
                    && let Some(ids) = self.lead_index.get_mut(&Self::index_key(field, v))
                {
                    ids.remove(&id);
                }
            }
        }
    }

    /// Inserts or replaces a lead, keeping the index in step.
    fn put_lead(&mut self, lead: SimLead) {
        self.unindex(lead.id);
        for (field, value) in &lead.fields {
            if let Some(v) = value.as_str() {
                self.lead_index
                    .entry(Self::index_key(field, v))
                    .or_default()
                    .insert(lead.id);
            }
        }
        self.leads.insert(lead.id, lead);
    }
}

struct Inner {
    config: MarketoConfig,
    tokens: HashMap<String, Instant>,
    token_seq: u64,
    counters: Counters,
    data: Data,
    faults: Vec<(Endpoint, u64, Fault)>,
    record_faults: Vec<(String, &'static str, u32)>,
    dice: crate::chaos::Dice,
}

/// A running simulator. Dropping it stops the server.
pub struct MarketoSim {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
    _server: tokio::task::JoinHandle<()>,
}

impl Drop for MarketoSim {
    fn drop(&mut self) {
        self._server.abort();
    }
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl MarketoSim {
    /// Starts a simulator on 127.0.0.1 at an ephemeral port.
    pub async fn start(config: MarketoConfig) -> std::io::Result<MarketoSim> {
        Self::start_on("127.0.0.1:0".parse().map_err(std::io::Error::other)?, config).await
    }

    pub async fn start_on(addr: SocketAddr, config: MarketoConfig) -> std::io::Result<MarketoSim> {
        let dice = crate::chaos::Dice::new(config.chaos.map_or(1, |c| c.seed));
        let inner = Arc::new(Mutex::new(Inner {
            config,
            tokens: HashMap::new(),
            token_seq: 0,
            counters: Counters::default(),
            data: Data {
                next_id: 1000,
                ..Data::default()
            },
            faults: Vec::new(),
            record_faults: Vec::new(),
            dice,
        }));
        let app = Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::max(16 << 20))
            .with_state(Arc::clone(&inner));
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(MarketoSim {
            inner,
            addr,
            _server: server,
        })
    }

    /// The base URL (`{MARKETO_URL}`): identity at `/identity`, REST at `/rest/v1`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client_id(&self) -> String {
        lock(&self.inner).config.client_id.clone()
    }

    pub fn client_secret(&self) -> String {
        lock(&self.inner).config.client_secret.clone()
    }

    /// Records carried by the calls of an endpoint that were answered with success (for a lead
    /// lookup, the values looked up): what the fewest possible calls are counted from.
    pub fn records(&self, endpoint: Endpoint) -> u64 {
        lock(&self.inner).counters.records.get(&endpoint).copied().unwrap_or(0)
    }

    /// Calls and records that `chaos` failed.
    pub fn chaos_faults(&self) -> (u64, u64) {
        let g = lock(&self.inner);
        (g.counters.chaos_calls, g.counters.chaos_records)
    }

    /// Calls answered per endpoint (refused calls included).
    pub fn calls(&self, endpoint: Endpoint) -> u64 {
        lock(&self.inner).counters.calls.get(&endpoint).copied().unwrap_or(0)
    }

    /// REST calls (identity excluded), as Marketo counts them against the quota.
    pub fn rest_calls(&self) -> u64 {
        let inner = lock(&self.inner);
        inner
            .counters
            .calls
            .iter()
            .filter(|(e, _)| **e != Endpoint::Identity)
            .map(|(_, n)| n)
            .sum()
    }

    /// Calls refused with `code` (606, 615, 607, 601, 602, 413, 414).
    pub fn refused(&self, code: &str) -> u64 {
        lock(&self.inner).counters.refused.get(code).copied().unwrap_or(0)
    }

    /// The most REST calls in flight at once.
    pub fn concurrency_high_water(&self) -> usize {
        lock(&self.inner).counters.high_water
    }

    /// Calls that carried the token as a query parameter (oppsync must never do that).
    pub fn token_in_query(&self) -> u64 {
        lock(&self.inner).counters.token_in_query
    }

    /// Calls sent as `POST ?_method=GET` (long queries).
    pub fn method_overrides(&self) -> u64 {
        lock(&self.inner).counters.method_overrides
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = lock(&self.inner);
        Snapshot {
            opportunities: inner.data.opportunities.clone(),
            roles: inner.data.roles.values().cloned().collect(),
            companies: inner.data.companies.clone(),
            leads: inner.data.leads.values().cloned().collect(),
        }
    }

    /// Adds a lead directly (as if created in Marketo), returning its id.
    pub fn add_lead(&self, fields: Value) -> i64 {
        let mut inner = lock(&self.inner);
        inner.data.next_id += 1;
        let id = inner.data.next_id;
        let fields = fields.as_object().cloned().unwrap_or_default();
        inner.data.put_lead(SimLead { id, fields });
        id
    }

    /// Schedules a fault for the `nth` call (1-based, counting from the start) of an endpoint.
    pub fn inject(&self, endpoint: Endpoint, nth: u64, fault: Fault) {
        lock(&self.inner).faults.push((endpoint, nth, fault));
    }

    /// Drops every fault still scheduled (calls and records).
    pub fn clear_faults(&self) {
        let mut g = lock(&self.inner);
        g.faults.clear();
        g.record_faults.clear();
    }

    /// Makes the next `times` writes of the record with this key (externalOpportunityId,
    /// externalCompanyId, email, or "externalOpportunityId|leadId|role") skipped with `code`.
    pub fn skip_record(&self, key: &str, code: &'static str, times: u32) {
        lock(&self.inner).record_faults.push((key.to_owned(), code, times));
    }

    /// Expires every token now (the next call answers 602).
    pub fn expire_tokens(&self) {
        let now = Instant::now();
        for expiry in lock(&self.inner).tokens.values_mut() {
            *expiry = now;
        }
    }

    /// Forgets every token (the next call answers 601).
    pub fn invalidate_tokens(&self) {
        lock(&self.inner).tokens.clear();
    }

    /// Changes the configuration while running (limits, CRM mode, quota).
    pub fn configure(&self, change: impl FnOnce(&mut MarketoConfig)) {
        change(&mut lock(&self.inner).config);
    }

    /// Sets the calls already made today (to test the quota without making them).
    pub fn set_daily_calls(&self, calls: u64) {
        lock(&self.inner).counters.daily = calls;
    }
}

fn endpoint_of(method: &Method, path: &str, query: &HashMap<String, String>) -> Option<Endpoint> {
    let get_override = query.get("_method").is_some_and(|m| m.eq_ignore_ascii_case("GET"));
    let is_get = *method == Method::GET || get_override;
    Some(match path {
        "/identity/oauth/token" => Endpoint::Identity,
        "/rest/v1/opportunities.json" if is_get => Endpoint::OpportunityQuery,
        "/rest/v1/opportunities.json" => Endpoint::OpportunitySync,
        "/rest/v1/opportunities/delete.json" => Endpoint::OpportunityDelete,
        "/rest/v1/opportunities/describe.json" => Endpoint::OpportunityDescribe,
        "/rest/v1/opportunities/roles.json" if is_get => Endpoint::RoleQuery,
        "/rest/v1/opportunities/roles.json" => Endpoint::RoleSync,
        "/rest/v1/opportunities/roles/delete.json" => Endpoint::RoleDelete,
        "/rest/v1/opportunities/roles/describe.json" => Endpoint::RoleDescribe,
        "/rest/v1/companies.json" if is_get => Endpoint::CompanyQuery,
        "/rest/v1/companies.json" => Endpoint::CompanySync,
        "/rest/v1/leads.json" if is_get => Endpoint::LeadQuery,
        "/rest/v1/leads.json" => Endpoint::LeadSync,
        "/rest/v1/stats/usage.json" => Endpoint::Usage,
        _ => return None,
    })
}

fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    format!("{:x}#sim", N.fetch_add(1, Ordering::Relaxed))
}

fn failure(code: &str, message: &str) -> Response {
    axum::Json(json!({
        "requestId": request_id(),
        "success": false,
        "errors": [{"code": code, "message": message}],
    }))
    .into_response()
}

/// A request-level error (HTTP 200, `success: false`), before it becomes a response.
struct Refusal {
    code: String,
    message: String,
}

fn refusal(code: &str, message: &str) -> Refusal {
    Refusal {
        code: code.to_owned(),
        message: message.to_owned(),
    }
}

fn success(result: Vec<Value>) -> Response {
    axum::Json(json!({"requestId": request_id(), "success": true, "result": result})).into_response()
}

/// A Sync Leads skip: no `seq`, no `id` (error-codes page, "Record-Level").
fn lead_skipped(code: &str, message: &str) -> Value {
    json!({"status": "skipped", "reasons": [{"code": code, "message": message}]})
}

fn skipped(seq: usize, code: &str, message: &str) -> Value {
    json!({"seq": seq, "status": "skipped", "reasons": [{"code": code, "message": message}]})
}

/// Releases the in-flight slot when the request ends, however it ends.
struct InFlight(Arc<Mutex<Inner>>);
impl Drop for InFlight {
    fn drop(&mut self) {
        let mut inner = lock(&self.0);
        inner.counters.in_flight = inner.counters.in_flight.saturating_sub(1);
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = parse_query(uri.query().unwrap_or(""));
    let Some(endpoint) = endpoint_of(&method, uri.path(), &query) else {
        return (StatusCode::NOT_FOUND, "no such endpoint").into_response();
    };
    if endpoint == Endpoint::Identity {
        return identity(&inner, &query);
    }

    // Admission, in the order Marketo documents its checks.
    let latency = {
        let mut guard = lock(&inner);
        let g = &mut *guard;
        *g.counters.calls.entry(endpoint).or_default() += 1;
        let refuse = |g: &mut Inner, code: &str| {
            *g.counters.refused.entry(code.to_owned()).or_default() += 1;
        };
        if query.contains_key("access_token") {
            g.counters.token_in_query += 1;
        }
        if method == Method::POST && query.get("_method").is_some_and(|m| m.eq_ignore_ascii_case("GET")) {
            g.counters.method_overrides += 1;
        }
        if uri.to_string().len() > g.config.max_url_bytes {
            refuse(g, "414");
            return (StatusCode::URI_TOO_LONG, "").into_response();
        }
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned)
            .or_else(|| query.get("access_token").cloned());
        match bearer.as_deref().and_then(|t| g.tokens.get(t)) {
            None => {
                refuse(g, "601");
                return failure("601", "Access token invalid");
            }
            Some(expiry) if *expiry <= Instant::now() => {
                refuse(g, "602");
                return failure("602", "Access token expired");
            }
            Some(_) => {}
        }
        if let Some(limit) = g.config.concurrency_limit
            && g.counters.in_flight >= limit
        {
            refuse(g, "615");
            return failure("615", &format!("Concurrent access limit reached ({limit})"));
        }
        let now = Instant::now();
        let window = g.config.rate_window;
        while g
            .counters
            .window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            g.counters.window.pop_front();
        }
        if let Some(limit) = g.config.rate_limit
            && g.counters.window.len() >= limit
        {
            refuse(g, "606");
            return failure(
                "606",
                &format!("Max rate limit '{limit}' exceeded with in '{}' secs", window.as_secs()),
            );
        }
        if g.counters.daily >= g.config.daily_quota {
            refuse(g, "607");
            return failure("607", "Daily quota reached");
        }
        if body.len() > g.config.max_body_bytes {
            refuse(g, "413");
            return (StatusCode::PAYLOAD_TOO_LARGE, "").into_response();
        }
        g.counters.window.push_back(now);
        g.counters.daily += 1;
        g.counters.in_flight += 1;
        g.counters.high_water = g.counters.high_water.max(g.counters.in_flight);
        g.config.latency
    };
    let _slot = InFlight(Arc::clone(&inner));
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let mut guard = lock(&inner);
    let g = &mut *guard;
    let nth = g.counters.calls.get(&endpoint).copied().unwrap_or(0);
    let fault = g
        .faults
        .iter()
        .position(|(e, n, _)| *e == endpoint && *n == nth)
        .map(|i| g.faults.remove(i).2);
    let fault = fault.or_else(|| {
        let chaos = g.config.chaos?;
        g.dice.hit(chaos.rate).then(|| {
            g.counters.chaos_calls += 1;
            g.dice.pick(&[
                Fault::Code("601"),
                Fault::Code("602"),
                Fault::Code("604"),
                Fault::Code("606"),
                Fault::Code("611"),
                Fault::Code("615"),
                Fault::Http(502),
            ])
        })
    });
    match fault {
        Some(Fault::Code(code)) => return failure(code, "Injected fault"),
        Some(Fault::Http(status)) => {
            return StatusCode::from_u16(status)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                .into_response();
        }
        Some(Fault::Malformed) => return (StatusCode::OK, "<html>Service Unavailable</html>").into_response(),
        Some(Fault::DropResult) | None => {}
    }

    if g.config.crm_enabled {
        let refused = match endpoint {
            Endpoint::RoleSync | Endpoint::RoleDelete | Endpoint::RoleQuery | Endpoint::RoleDescribe => true,
            Endpoint::OpportunityDescribe | Endpoint::OpportunityQuery | Endpoint::CompanyQuery => {
                g.config.crm_reads_disabled
            }
            _ => false,
        };
        if refused {
            let code = g.config.crm_refusal;
            let message = match code {
                "603" => "Access denied",
                "610" => "Requested resource not found",
                _ => "CRM Enabled",
            };
            return failure(code, message);
        }
    }
    // A read sent as `POST ?_method=GET` carries its parameters as a form body (error-codes
    // page, 414).
    let read_params = || {
        let mut params = query.clone();
        if method == Method::POST {
            params.extend(parse_query(&String::from_utf8_lossy(&body)));
        }
        params
    };
    let input = || -> Result<Value, Refusal> {
        if body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&body).map_err(|_| refusal("609", "Invalid JSON"))
    };
    let mut response = match endpoint {
        Endpoint::OpportunitySync => input().map(|b| opportunity_sync(g, &b)),
        Endpoint::OpportunityDelete => input().map(|b| delete(g, &b, Kind::Opportunity)),
        Endpoint::RoleSync => input().map(|b| role_sync(g, &b)),
        Endpoint::RoleDelete => input().map(|b| delete(g, &b, Kind::Role)),
        Endpoint::CompanySync => input().map(|b| company_sync(g, &b)),
        Endpoint::LeadSync => input().map(|b| lead_sync(g, &b)),
        Endpoint::OpportunityQuery => Ok(query_by(g, &read_params(), Kind::Opportunity)),
        Endpoint::CompanyQuery => Ok(query_by(g, &read_params(), Kind::Company)),
        Endpoint::LeadQuery => Ok(lead_query(g, &read_params())),
        Endpoint::RoleQuery => input().map(|b| role_query(g, &b)),
        Endpoint::OpportunityDescribe => Ok(describe(g, Kind::Opportunity)),
        Endpoint::RoleDescribe => Ok(describe(g, Kind::Role)),
        // Usage page, "Daily Usage": one result with the date, the total and a per-user count.
        Endpoint::Usage => Ok(Ok(vec![
            json!({"date": "2026-12-01", "total": g.counters.daily, "users": [{"userId": "api@sim", "count": g.counters.daily}]}),
        ])),
        Endpoint::Identity => Ok(Ok(Vec::new())),
    };
    if let Ok(Ok(results)) = &mut response
        && matches!(fault, Some(Fault::DropResult))
    {
        results.pop();
    }
    if let Ok(Ok(results)) = &mut response {
        reshape(endpoint, g.config.result_shape, results);
    }
    match response {
        Err(r) | Ok(Err(r)) => failure(&r.code, &r.message),
        Ok(Ok(results)) => {
            let carried = match endpoint {
                Endpoint::LeadQuery => read_params()
                    .get("filterValues")
                    .map_or(0, |v| v.split(',').filter(|x| !x.is_empty()).count() as u64),
                _ => results.len() as u64,
            };
            *g.counters.records.entry(endpoint).or_default() += carried;
            success(results)
        }
    }
}

/// The identity endpoint: GET or POST with `grant_type`, `client_id` and `client_secret` in the
/// query string (authentication page); a form body is not documented, so it is not read. Bad
/// credentials: HTTP 401 (error-codes page: "The Identity endpoint can return a 401").
/// Applies a [`ResultShape`] variant to a write's results.
fn reshape(endpoint: Endpoint, shape: ResultShape, results: &mut [Value]) {
    let write = matches!(
        endpoint,
        Endpoint::OpportunitySync
            | Endpoint::OpportunityDelete
            | Endpoint::RoleSync
            | Endpoint::RoleDelete
            | Endpoint::CompanySync
            | Endpoint::LeadSync
    );
    if !write {
        return;
    }
    match shape {
        ResultShape::Documented => {}
        ResultShape::Shuffled => {
            // Deterministic: reversed, then the halves swapped, so no result keeps its place
            // in a call of three or more.
            results.reverse();
            let half = results.len() / 2;
            results.rotate_left(half);
        }
        ResultShape::NoSeq => {
            for r in results.iter_mut() {
                if let Some(o) = r.as_object_mut() {
                    o.remove("seq");
                }
            }
        }
        ResultShape::SingularReason => {
            for r in results.iter_mut() {
                if let Some(o) = r.as_object_mut()
                    && let Some(Value::Array(mut reasons)) = o.remove("reasons")
                    && !reasons.is_empty()
                {
                    o.insert("reason".into(), reasons.swap_remove(0));
                }
            }
        }
    }
}

fn identity(inner: &Mutex<Inner>, query: &HashMap<String, String>) -> Response {
    let params = query;
    let mut g = lock(inner);
    *g.counters.calls.entry(Endpoint::Identity).or_default() += 1;
    let ok = params.get("grant_type").map(String::as_str) == Some("client_credentials")
        && params.get("client_id") == Some(&g.config.client_id)
        && params.get("client_secret") == Some(&g.config.client_secret);
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "unauthorized", "error_description": "Bad client credentials"})),
        )
            .into_response();
    }
    let now = Instant::now();
    // Before expiry Marketo returns the same token with its remaining lifetime.
    if let Some((token, expiry)) = g.tokens.iter().find(|(_, e)| **e > now) {
        let remaining = expiry.duration_since(now).as_secs();
        return axum::Json(
            json!({"access_token": token, "token_type": "bearer", "expires_in": remaining, "scope": "api@sim"}),
        )
        .into_response();
    }
    g.token_seq += 1;
    let token = format!("sim-token-{}-{:x}", g.token_seq, now.elapsed().as_nanos() ^ 0x5eed);
    let ttl = g.config.token_ttl;
    g.tokens.insert(token.clone(), now + ttl);
    axum::Json(json!({"access_token": token, "token_type": "bearer", "expires_in": ttl.as_secs(), "scope": "api@sim"}))
        .into_response()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Opportunity,
    Role,
    Company,
}

/// The `input` array of a write, or a request-level error.
fn inputs<'a>(g: &Inner, body: &'a Value) -> Result<&'a Vec<Value>, Refusal> {
    let Some(input) = body.get("input").and_then(Value::as_array) else {
        return Err(refusal("1001", "Invalid value for input"));
    };
    if input.len() > g.config.max_batch {
        // Unconfirmed: the exact code Marketo returns for an oversized batch.
        return Err(refusal("1003", &format!("Batch size exceeds {}", g.config.max_batch)));
    }
    Ok(input)
}

/// A record fault for this key, consumed.
fn record_fault(g: &mut Inner, key: &str) -> Option<&'static str> {
    if let Some(chaos) = g.config.chaos
        && g.dice.hit(chaos.rate)
    {
        g.counters.chaos_records += 1;
        // Unconfirmed: no record-level code is documented as transient; 1014 "Failed to create
        // Object" is the one Marketo clients retry (marketorestpython).
        return Some("1014");
    }
    let i = g.record_faults.iter().position(|(k, _, n)| k == key && *n > 0)?;
    g.record_faults[i].2 -= 1;
    Some(g.record_faults[i].1)
}

fn unknown_field(record: &Map<String, Value>, allowed: &[&str], custom: &[String]) -> Option<String> {
    record
        .keys()
        .find(|k| !allowed.contains(&k.as_str()) && !custom.iter().any(|c| c == *k))
        .cloned()
}

fn new_guid(g: &mut Inner, prefix: &str) -> String {
    g.data.next_id += 1;
    format!("{prefix}-{:08x}-sim", g.data.next_id)
}

/// Sync Opportunities (opportunities page, "Create and Update"): `action` createOrUpdate by
/// default, `externalOpportunityId` required, `name` not null on create; results with `seq` and
/// `marketoGUID`. Read-only with native CRM sync: each record skipped with 1018.
fn opportunity_sync(g: &mut Inner, body: &Value) -> Result<Vec<Value>, Refusal> {
    let input = inputs(g, body)?.clone();
    let action = body.get("action").and_then(Value::as_str).unwrap_or("createOrUpdate");
    let mut seen = std::collections::HashSet::new();
    let mut results = Vec::with_capacity(input.len());
    for (seq, record) in input.iter().enumerate() {
        let Some(record) = record.as_object() else {
            results.push(skipped(seq, "1003", "Invalid record"));
            continue;
        };
        if g.config.crm_enabled {
            results.push(skipped(seq, "1018", "CRM Enabled"));
            continue;
        }
        let Some(key) = record
            .get("externalOpportunityId")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            results.push(skipped(
                seq,
                "1003",
                "Value for required field 'externalOpportunityId' not specified",
            ));
            continue;
        };
        if !seen.insert(key.clone()) {
            results.push(skipped(seq, "1036", "Duplicate externalOpportunityId in input"));
            continue;
        }
        if let Some(field) = unknown_field(record, STANDARD_OPPORTUNITY_FIELDS, &g.config.custom_opportunity_fields) {
            results.push(skipped(seq, "1006", &format!("Field '{field}' not found")));
            continue;
        }
        if let Some(code) = record_fault(g, &key) {
            results.push(skipped(seq, code, "Injected record fault"));
            continue;
        }
        if key.chars().count() > 50 {
            results.push(skipped(seq, "1003", "externalOpportunityId longer than 50"));
            continue;
        }
        // Opportunities page: "The 'name' field must not be null" (on an update too: the page
        // does not limit it to creates, so the strict reading).
        if record.get("name").is_some_and(Value::is_null) {
            results.push(skipped(seq, "1003", "Value for required field 'name' not specified"));
            continue;
        }
        let exists = g.data.opportunities.contains_key(&key);
        match (action, exists) {
            ("createOnly", true) => results.push(skipped(seq, "1005", "Opportunity already exists")),
            ("updateOnly", false) => results.push(skipped(seq, "1013", "Opportunity not found")),
            (_, true) => {
                let stored = g.data.opportunities.get_mut(&key).map(|o| {
                    o.extend(record.clone());
                    o.get("marketoGUID").cloned().unwrap_or(Value::Null)
                });
                results.push(json!({"seq": seq, "status": "updated", "marketoGUID": stored}));
            }
            (_, false) => {
                if record.get("name").is_none_or(Value::is_null) {
                    results.push(skipped(seq, "1003", "Value for required field 'name' not specified"));
                    continue;
                }
                let guid = new_guid(g, "opp");
                let mut stored = record.clone();
                stored.insert("marketoGUID".into(), json!(guid));
                g.data.opportunities.insert(key, stored);
                results.push(json!({"seq": seq, "status": "created", "marketoGUID": guid}));
            }
        }
    }
    Ok(results)
}

fn role_key(record: &Map<String, Value>) -> Option<(String, i64, String)> {
    Some((
        record.get("externalOpportunityId")?.as_str()?.to_owned(),
        record.get("leadId")?.as_i64()?,
        record.get("role")?.as_str()?.to_owned(),
    ))
}

/// Sync Opportunity Roles (opportunity-roles page, "Create and Update"): keyed by
/// (externalOpportunityId, leadId, role); the opportunity and the lead must exist (the codes for
/// a missing one are unconfirmed: 1013, 1004); results with `seq` and `marketoGUID`.
fn role_sync(g: &mut Inner, body: &Value) -> Result<Vec<Value>, Refusal> {
    let input = inputs(g, body)?.clone();
    let mut seen = std::collections::HashSet::new();
    let mut results = Vec::with_capacity(input.len());
    for (seq, record) in input.iter().enumerate() {
        let Some(record) = record.as_object() else {
            results.push(skipped(seq, "1003", "Invalid record"));
            continue;
        };
        let Some(key) = role_key(record) else {
            results.push(skipped(
                seq,
                "1003",
                "externalOpportunityId, leadId and role are required",
            ));
            continue;
        };
        if !seen.insert(key.clone()) {
            results.push(skipped(seq, "1036", "Duplicate role in input"));
            continue;
        }
        if let Some(field) = unknown_field(record, ROLE_FIELDS, &[]) {
            results.push(skipped(seq, "1006", &format!("Field '{field}' not found")));
            continue;
        }
        if let Some(code) = record_fault(g, &format!("{}|{}|{}", key.0, key.1, key.2)) {
            results.push(skipped(seq, code, "Injected record fault"));
            continue;
        }
        if key.2.chars().count() > 50 {
            results.push(skipped(seq, "1003", "role longer than 50"));
            continue;
        }
        // Unconfirmed: the codes for a role whose opportunity or lead does not exist.
        if !g.data.opportunities.contains_key(&key.0) {
            results.push(skipped(seq, "1013", "Opportunity not found"));
            continue;
        }
        if !g.data.leads.contains_key(&key.1) {
            results.push(skipped(seq, "1004", "Lead not found"));
            continue;
        }
        let is_primary = record.get("isPrimary").and_then(Value::as_bool).unwrap_or(false);
        match g.data.roles.get_mut(&key) {
            Some(existing) => {
                existing.is_primary = is_primary;
                let guid = existing.marketo_guid.clone();
                results.push(json!({"seq": seq, "status": "updated", "marketoGUID": guid}));
            }
            None => {
                let guid = new_guid(g, "role");
                g.data.roles.insert(
                    key.clone(),
                    SimRole {
                        external_opportunity_id: key.0,
                        lead_id: key.1,
                        role: key.2,
                        is_primary,
                        marketo_guid: guid.clone(),
                    },
                );
                results.push(json!({"seq": seq, "status": "created", "marketoGUID": guid}));
            }
        }
    }
    Ok(results)
}

/// Delete Opportunities / Opportunity Roles (their pages, "Delete"): `deleteBy` dedupeFields;
/// results with `seq`, `marketoGUID` and `status: deleted`; a record not found is skipped with
/// 1013 (companies page, "Delete").
fn delete(g: &mut Inner, body: &Value, kind: Kind) -> Result<Vec<Value>, Refusal> {
    let input = inputs(g, body)?.clone();
    let mut results = Vec::with_capacity(input.len());
    for (seq, record) in input.iter().enumerate() {
        let record = record.as_object().cloned().unwrap_or_default();
        if g.config.crm_enabled {
            results.push(skipped(seq, "1018", "CRM Enabled"));
            continue;
        }
        let found = match kind {
            Kind::Opportunity => record
                .get("externalOpportunityId")
                .and_then(Value::as_str)
                .and_then(|k| g.data.opportunities.remove(k))
                .and_then(|o| o.get("marketoGUID").cloned()),
            Kind::Role => role_key(&record)
                .and_then(|k| g.data.roles.remove(&k))
                .map(|r| json!(r.marketo_guid)),
            Kind::Company => None,
        };
        match found {
            Some(guid) => results.push(json!({"seq": seq, "status": "deleted", "marketoGUID": guid})),
            None => results.push(skipped(seq, "1013", "Record not found")),
        }
    }
    Ok(results)
}

/// Sync Companies (companies page, "Create and Update"): keyed by externalCompanyId; results
/// with `seq` and the integer `id`; 1036 for a key repeated in one input (error-codes page).
fn company_sync(g: &mut Inner, body: &Value) -> Result<Vec<Value>, Refusal> {
    let input = inputs(g, body)?.clone();
    let mut seen = std::collections::HashSet::new();
    let mut results = Vec::with_capacity(input.len());
    for (seq, record) in input.iter().enumerate() {
        let Some(record) = record.as_object() else {
            results.push(skipped(seq, "1003", "Invalid record"));
            continue;
        };
        if g.config.crm_enabled {
            results.push(skipped(seq, "1018", "CRM Enabled"));
            continue;
        }
        let Some(key) = record
            .get("externalCompanyId")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            results.push(skipped(
                seq,
                "1003",
                "Value for required field 'externalCompanyId' not specified",
            ));
            continue;
        };
        if !seen.insert(key.clone()) {
            results.push(skipped(seq, "1036", "Duplicate externalCompanyId in input"));
            continue;
        }
        if let Some(field) = unknown_field(record, COMPANY_FIELDS, &[]) {
            results.push(skipped(seq, "1006", &format!("Field '{field}' not found")));
            continue;
        }
        if let Some(code) = record_fault(g, &key) {
            results.push(skipped(seq, code, "Injected record fault"));
            continue;
        }
        match g.data.companies.get_mut(&key) {
            Some(existing) => {
                existing.extend(record.clone());
                let id = existing.get("id").cloned();
                results.push(json!({"seq": seq, "status": "updated", "id": id}));
            }
            None => {
                g.data.next_id += 1;
                let id = g.data.next_id;
                let mut stored = record.clone();
                stored.insert("id".into(), json!(id));
                g.data.companies.insert(key, stored);
                results.push(json!({"seq": seq, "status": "created", "id": id}));
            }
        }
    }
    Ok(results)
}

fn lead_matches<'a>(g: &'a Inner, field: &str, value: &str) -> Vec<&'a SimLead> {
    g.data
        .lead_index
        .get(&Data::index_key(field, value))
        .into_iter()
        .flatten()
        .filter_map(|id| g.data.leads.get(id))
        .collect()
}

/// Get Leads by Filter Type (leads page, "Query"): up to 300 `filterValues`; no match is
/// `success: true` with an empty result; no `seq`.
fn lead_query(g: &Inner, params: &HashMap<String, String>) -> Result<Vec<Value>, Refusal> {
    let field = params.get("filterType").cloned().unwrap_or_default();
    if field != "email" && field != "id" && !g.config.custom_lead_fields.contains(&field) {
        return Err(refusal("1003", &format!("Invalid filterType '{field}'")));
    }
    let values: Vec<&str> = params
        .get("filterValues")
        .map(|v| v.split(',').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    if values.len() > g.config.max_batch {
        return Err(refusal("1003", "Too many filterValues"));
    }
    let mut found: Vec<&SimLead> = Vec::new();
    for value in values {
        if field == "id" {
            found.extend(value.parse::<i64>().ok().and_then(|id| g.data.leads.get(&id)));
        } else {
            found.extend(lead_matches(g, &field, value));
        }
    }
    // Leads page: "If the number of leads matching the lead filter is greater than 1,000 an
    // error is returned: 1003, Too many results match the filter".
    if found.len() > 1000 {
        return Err(refusal("1003", "Too many results match the filter"));
    }
    // Leads page: without `fields`, id, email, updatedAt, createdAt, firstName and lastName;
    // with it, those fields, a field with no value left out ("implied to be null").
    let default_fields = "email,updatedAt,createdAt,firstName,lastName";
    let wanted: Vec<&str> = params
        .get("fields")
        .map_or(default_fields, String::as_str)
        .split(',')
        .map(str::trim)
        .collect();
    Ok(found
        .into_iter()
        .map(|lead| {
            let mut out = Map::new();
            out.insert("id".into(), json!(lead.id));
            for f in &wanted {
                if let Some(v) = lead.fields.get(*f).filter(|v| !v.is_null()) {
                    out.insert((*f).to_owned(), v.clone());
                }
            }
            Value::Object(out)
        })
        .collect())
}

/// Sync Leads (leads page, "Create and Update"): `action` createOrUpdate by default,
/// `lookupField` email by default; 1007 when the key matches several leads, 1005/1004 for
/// createOnly/updateOnly (error-codes page).
fn lead_sync(g: &mut Inner, body: &Value) -> Result<Vec<Value>, Refusal> {
    let input = inputs(g, body)?.clone();
    let action = body.get("action").and_then(Value::as_str).unwrap_or("createOrUpdate");
    let lookup = body
        .get("lookupField")
        .and_then(Value::as_str)
        .unwrap_or("email")
        .to_owned();
    let mut results = Vec::with_capacity(input.len());
    // Results in input order, without `seq` (leads page, "Create and Update"; error-codes page).
    for record in &input {
        let Some(record) = record.as_object() else {
            results.push(lead_skipped("1003", "Invalid record"));
            continue;
        };
        if let Some(field) = unknown_field(record, LEAD_FIELDS, &g.config.custom_lead_fields) {
            results.push(lead_skipped("1006", &format!("Field '{field}' not found")));
            continue;
        }
        if record.contains_key("id") && action != "updateOnly" {
            // Leads page: "The id field can only be included ... when using the updateOnly action".
            results.push(lead_skipped("1003", "Invalid data"));
            continue;
        }
        let Some(key) = record.get(&lookup).and_then(Value::as_str).map(str::to_owned) else {
            results.push(lead_skipped(
                "1003",
                &format!("Value for lookup field '{lookup}' not specified"),
            ));
            continue;
        };
        if let Some(code) = record_fault(g, &key) {
            results.push(lead_skipped(code, "Injected record fault"));
            continue;
        }
        let matches: Vec<i64> = lead_matches(g, &lookup, &key).iter().map(|l| l.id).collect();
        match (action, matches.as_slice()) {
            (_, [_, _, ..]) => results.push(lead_skipped("1007", "Multiple lead match lookup criteria")),
            ("createOnly", [_]) => results.push(lead_skipped("1005", "Lead already exists")),
            ("updateOnly", []) => results.push(lead_skipped("1004", "Lead not found")),
            (_, [id]) => {
                let id = *id;
                if let Some(mut lead) = g.data.leads.get(&id).cloned() {
                    lead.fields.extend(record.clone());
                    g.data.put_lead(lead);
                }
                results.push(json!({"id": id, "status": "updated"}));
            }
            (_, []) => {
                g.data.next_id += 1;
                let id = g.data.next_id;
                g.data.put_lead(SimLead {
                    id,
                    fields: record.clone(),
                });
                results.push(json!({"id": id, "status": "created"}));
            }
        }
    }
    Ok(results)
}

fn query_by(g: &Inner, params: &HashMap<String, String>, kind: Kind) -> Result<Vec<Value>, Refusal> {
    let values: Vec<&str> = params
        .get("filterValues")
        .map(|v| v.split(',').collect())
        .unwrap_or_default();
    if values.len() > g.config.max_batch {
        return Err(refusal("1003", "Too many filterValues"));
    }
    let table = match kind {
        Kind::Opportunity => &g.data.opportunities,
        _ => &g.data.companies,
    };
    // The opportunities and companies pages show query results with `seq`.
    Ok(values
        .into_iter()
        .filter_map(|v| table.get(v).cloned())
        .enumerate()
        .map(|(seq, mut record)| {
            record.insert("seq".into(), json!(seq));
            Value::Object(record)
        })
        .collect())
}

/// Query roles by compound key, `POST roles.json?_method=GET` with a JSON body
/// (opportunity-roles page, "Query"): "the same type of response as a standard GET query".
fn role_query(g: &Inner, body: &Value) -> Result<Vec<Value>, Refusal> {
    let keys = body.get("input").and_then(Value::as_array).cloned().unwrap_or_default();
    if keys.len() > g.config.max_batch {
        return Err(refusal("1003", "Too many keys"));
    }
    Ok(keys
        .iter()
        .filter_map(|k| role_key(k.as_object()?))
        .filter_map(|k| g.data.roles.get(&k))
        .map(|r| {
            json!({"externalOpportunityId": r.external_opportunity_id, "leadId": r.lead_id, "role": r.role,
                   "isPrimary": r.is_primary, "marketoGUID": r.marketo_guid})
        })
        .collect())
}

/// Describe Opportunity / Opportunity Role (their pages, "Describe"): name, idField,
/// dedupeFields and the fields.
fn describe(g: &Inner, kind: Kind) -> Result<Vec<Value>, Refusal> {
    let (name, dedupe, fields): (&str, Vec<&str>, Vec<String>) = match kind {
        Kind::Opportunity => (
            "opportunity",
            vec!["externalOpportunityId"],
            STANDARD_OPPORTUNITY_FIELDS
                .iter()
                .map(|f| (*f).to_owned())
                .chain(g.config.custom_opportunity_fields.iter().cloned())
                .collect(),
        ),
        _ => (
            "opportunityRole",
            vec!["externalOpportunityId", "leadId", "role"],
            ROLE_FIELDS.iter().map(|f| (*f).to_owned()).collect(),
        ),
    };
    Ok(vec![json!({
        "name": name,
        "idField": "marketoGUID",
        "dedupeFields": dedupe,
        "fields": fields.iter().map(|f| json!({"name": f, "displayName": f, "dataType": "string", "updateable": true})).collect::<Vec<_>>(),
    })])
}
