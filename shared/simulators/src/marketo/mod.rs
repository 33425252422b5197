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
//!   opportunities and companies pages: "read-only"; the sales-persons page: "read-only access"), the role API is refused (the
//!   opportunity-roles page: "only exposed for subscriptions which do not have a native CRM sync";
//!   the code is not documented, so `crm_refusal` picks it), and with `crm_reads_disabled` the
//!   opportunity and company reads are refused too (the lead-database page: "disabled").
//!
//! Where the docs are silent the simulator takes the strictest reading, and [`ResultShape`]
//! switches to the other plausible shapes the client must also survive. Each such choice is
//! marked "unconfirmed" and listed in docs/API-FIDELITY.md.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
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

mod companies;
mod leads;
mod opportunities;
mod roles;
mod salespersons;
mod server;

use server::{
    Kind, RecordChecks, Refusal, check_record, inputs, lead_skipped, new_guid, record_fault, refusal, routes, skipped,
    unknown_field,
};

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

/// The calls the simulator answers, by the same [`Operation`] the client names them with
/// (for counters and fault schedules).
pub use oppsync_marketo::Operation;

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
/// Sales-persons page: the describe example's fields and the "Create and Update" example's.
const SALES_PERSON_FIELDS: &[&str] = &["externalSalesPersonId", "email", "firstName", "lastName"];
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
    /// By externalSalesPersonId.
    pub sales_persons: BTreeMap<String, Map<String, Value>>,
    pub leads: Vec<SimLead>,
}

/// The honest minimum of calls between two snapshots: every record Marketo came to hold (new
/// or changed) written once, every record it lost deleted once, 300 records a call per object
/// type and direction. For an initial sync that is ⌈opportunities/300⌉ + ⌈companies/300⌉ +
/// ⌈sales persons/300⌉ + ⌈leads/300⌉ + ⌈roles/300⌉.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Minimum {
    /// By object type: (records written, records deleted).
    pub by_object: BTreeMap<&'static str, (u64, u64)>,
}

impl Minimum {
    pub fn calls(&self) -> u64 {
        self.by_object
            .values()
            .map(|(written, deleted)| written.div_ceil(300) + deleted.div_ceil(300))
            .sum()
    }
}

impl Snapshot {
    /// The fewest calls that could take Marketo from `before` to this snapshot.
    pub fn minimum_since(&self, before: &Snapshot) -> Minimum {
        // What Marketo stamps itself is not what a write carries.
        fn same(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
            let carried = |m: &Map<String, Value>| -> BTreeMap<String, Value> {
                m.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "marketoGUID" | "updatedAt" | "createdAt" | "id"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            };
            carried(a) == carried(b)
        }
        fn diff<K: Ord>(
            before: &BTreeMap<K, &Map<String, Value>>,
            after: &BTreeMap<K, &Map<String, Value>>,
        ) -> (u64, u64) {
            let written = after
                .iter()
                .filter(|(k, v)| before.get(*k).is_none_or(|b| !same(b, v)))
                .count();
            let deleted = before.keys().filter(|k| !after.contains_key(*k)).count();
            (written as u64, deleted as u64)
        }
        fn by_key(m: &BTreeMap<String, Map<String, Value>>) -> BTreeMap<String, &Map<String, Value>> {
            m.iter().map(|(k, v)| (k.clone(), v)).collect()
        }
        fn leads(s: &Snapshot) -> BTreeMap<i64, &Map<String, Value>> {
            s.leads.iter().map(|l| (l.id, &l.fields)).collect()
        }
        let roles = |s: &Snapshot| -> BTreeMap<(String, i64, String), bool> {
            s.roles
                .iter()
                .map(|r| {
                    (
                        (r.external_opportunity_id.clone(), r.lead_id, r.role.clone()),
                        r.is_primary,
                    )
                })
                .collect()
        };
        let (roles_before, roles_after) = (roles(before), roles(self));
        let roles_written = roles_after
            .iter()
            .filter(|(k, p)| roles_before.get(*k) != Some(*p))
            .count() as u64;
        let roles_deleted = roles_before.keys().filter(|k| !roles_after.contains_key(*k)).count() as u64;
        let mut by_object = BTreeMap::new();
        by_object.insert(
            "opportunities",
            diff(&by_key(&before.opportunities), &by_key(&self.opportunities)),
        );
        by_object.insert("companies", diff(&by_key(&before.companies), &by_key(&self.companies)));
        by_object.insert(
            "sales_persons",
            diff(&by_key(&before.sales_persons), &by_key(&self.sales_persons)),
        );
        by_object.insert("leads", diff(&leads(before), &leads(self)));
        by_object.insert("roles", (roles_written, roles_deleted));
        Minimum { by_object }
    }
}

#[derive(Default)]
struct Counters {
    calls: BTreeMap<Operation, u64>,
    /// Records carried by answered calls, per endpoint (lead lookups: the values looked up).
    records: BTreeMap<Operation, u64>,
    /// Calls refused, by code: by a limit (606, 615, 607, 601, 602, 413, 414) or by what they
    /// carried (609, 718, …).
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
    /// Sync Leads calls in flight by the lookup keys they carry (`field\0value`).
    lead_keys_in_flight: HashMap<String, usize>,
    /// Lead keys a Sync Leads call carried while another call in flight carried them too.
    lead_key_races: u64,
    /// Each answered REST call: its operation, when it was admitted and when it ended.
    call_log: Vec<(Operation, Instant, Instant)>,
}

#[derive(Default)]
struct Data {
    opportunities: BTreeMap<String, Map<String, Value>>,
    roles: BTreeMap<(String, i64, String), SimRole>,
    companies: BTreeMap<String, Map<String, Value>>,
    sales_persons: BTreeMap<String, Map<String, Value>>,
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
    faults: Vec<(Operation, u64, Fault)>,
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
        let app = routes(Arc::clone(&inner)).layer(DefaultBodyLimit::max(16 << 20));
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
    pub fn records(&self, endpoint: Operation) -> u64 {
        lock(&self.inner).counters.records.get(&endpoint).copied().unwrap_or(0)
    }

    /// Calls and records that `chaos` failed.
    pub fn chaos_faults(&self) -> (u64, u64) {
        let g = lock(&self.inner);
        (g.counters.chaos_calls, g.counters.chaos_records)
    }

    /// Calls answered per endpoint (refused calls included).
    pub fn calls(&self, endpoint: Operation) -> u64 {
        lock(&self.inner).counters.calls.get(&endpoint).copied().unwrap_or(0)
    }

    /// REST calls (identity excluded), as Marketo counts them against the quota.
    pub fn rest_calls(&self) -> u64 {
        let inner = lock(&self.inner);
        inner
            .counters
            .calls
            .iter()
            .filter(|(e, _)| **e != Operation::Identity)
            .map(|(_, n)| n)
            .sum()
    }

    /// Calls refused with `code` (606, 615, 607, 601, 602, 413, 414, or a request-level error
    /// such as 718).
    pub fn refused(&self, code: &str) -> u64 {
        lock(&self.inner).counters.refused.get(code).copied().unwrap_or(0)
    }

    /// The most REST calls in flight at once.
    /// Lead keys sent while another Sync Leads call carrying the same key was in flight (each
    /// one made a duplicate lead: see `leads::lead_sync`).
    pub fn lead_key_races(&self) -> u64 {
        lock(&self.inner).counters.lead_key_races
    }

    /// Every answered REST call: its operation, when it was admitted and when it ended.
    pub fn call_log(&self) -> Vec<(Operation, Instant, Instant)> {
        lock(&self.inner).counters.call_log.clone()
    }

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
            sales_persons: inner.data.sales_persons.clone(),
            leads: inner.data.leads.values().cloned().collect(),
        }
    }

    /// Deletes a sales person directly (as an admin could through the API): opportunities
    /// naming it are then refused with 718.
    pub fn delete_sales_person(&self, external_id: &str) -> bool {
        lock(&self.inner).data.sales_persons.remove(external_id).is_some()
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
    pub fn inject(&self, endpoint: Operation, nth: u64, fault: Fault) {
        lock(&self.inner).faults.push((endpoint, nth, fault));
    }

    /// Drops every fault still scheduled (calls and records).
    pub fn clear_faults(&self) {
        let mut g = lock(&self.inner);
        g.faults.clear();
        g.record_faults.clear();
    }

    /// Makes the next `times` writes of the record with this key (externalOpportunityId,
    /// externalCompanyId, externalSalesPersonId, email, or "externalOpportunityId|leadId|role") skipped with `code`.
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
