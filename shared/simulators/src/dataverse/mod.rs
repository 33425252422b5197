//! A Dataverse Web API simulator: what oppsync's read-only client depends on
//! (../shared/docs/dataverse.md), answering in the shapes Microsoft's pages show: the token as
//! Entra ID's client-credentials page; errors as `{"error": {"code", "message"}}`
//! (compose-http-requests page); paging with `Prefer: odata.maxpagesize` and a `$skiptoken` next
//! link (page-results page); change tracking with a delta link on the last page, `/$delta`
//! contexts and `$deletedEntity` rows on delta reads only, and no `$filter`/`$orderby`/`$expand`/
//! `$top` (change-tracking page); 429 with `Retry-After` and 0x80072322 (api-limits page); 401
//! with a bearer challenge. What the pages leave open is switchable in [`DataverseConfig`] (the
//! expired stamp's status, the empty delta answer, a read without a delta link, the annotations
//! defect) and listed in docs/API-FIDELITY.md.
//!
//! It serves the Entra ID token endpoint and `/api/data/v9.2/` for opportunities, accounts,
//! contacts, connections (stored as reciprocal pairs) and connectionroles. The OData subset is
//! the one the client uses: `$select`, `$filter` (`eq`, `ge`, `gt`, `and`, lookup paths like
//! `record2roleid/category`, `Microsoft.Dynamics.CRM.In`), `$expand` of a connection's roles,
//! `$orderby` on one attribute, `$top`. It pages with `Prefer: odata.maxpagesize` and
//! `@odata.nextLink`, annotates with `Prefer: odata.include-annotations`, tracks changes with
//! `Prefer: odata.track-changes`, `@odata.deltaLink`, `$deletedEntity` rows and expiring delta
//! tokens, throttles with 429 and `Retry-After`, and answers any request that is not a GET
//! with 405 (and counts it).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::query::decode_pairs as parse_query;

mod metadata;
mod odata;
mod seed;
mod server;

pub use seed::{Mix, SEED_CURRENCY, SEED_ROLES, Seeded, seed_id};
use server::routes;

const API: &str = "/api/data/v9.2/";
const FORMATTED: &str = "@OData.Community.Display.V1.FormattedValue";
const LOOKUP: &str = "@Microsoft.Dynamics.CRM.lookuplogicalname";
/// Dataverse's "Version stamp associated with the client has expired".
pub const EXPIRED_VERSION_STAMP: &str = "0x80044352";

/// Behaviour switches.
#[derive(Debug, Clone)]
pub struct DataverseConfig {
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: String,
    pub token_ttl: Duration,
    /// Largest page served, whatever the client asks (Dataverse: 5000).
    pub max_page_size: usize,
    /// Tables whose change tracking is off: their metadata says so, and a change-tracking read
    /// of them is refused.
    pub untracked: Vec<Table>,
    /// Tables the application user has no Read privilege on: every read answers 403 with
    /// code 0x80040220 "Principal user … is missing prv… privilege" (the client-errors page,
    /// error -2147220960).
    pub forbidden: Vec<Table>,
    /// Random faults: a request is throttled (429, `Retry-After: 1`), fails with 500 or 503, or
    /// answers with a body that is not JSON.
    pub chaos: Option<crate::Chaos>,
    /// How long a delta token stays valid (Dataverse default: 7 days).
    pub change_retention: Duration,
    /// Requests allowed per `throttle_window`; past it, 429 with `Retry-After`.
    pub throttle: Option<(usize, Duration)>,
    pub max_url_bytes: usize,
    /// Write `@odata.nextLink`/`@odata.deltaLink` with this host instead of the server's own
    /// (to test that the client refuses links to another host).
    pub link_host: Option<String>,
    /// The status of the expired-version-stamp error (0x80044352). Unconfirmed for the Web API
    /// (dataverse.md: "likely 400"); the client must recognise it by code or message at any.
    pub expired_stamp_status: u16,
    /// The reported defect (powerapps-docs issue 439): a change-tracking read that asks for
    /// annotations gets its last page without `@odata.deltaLink`.
    pub annotations_drop_delta_link: bool,
    /// Every change-tracking read ends without `@odata.deltaLink`, annotations or not (the
    /// defect's worst case).
    pub never_delta_link: bool,
    /// A delta read with no changes answers `{}` (change-tracking page: "An empty JSON response
    /// is returned if no table changes have occurred"), not an empty `value` with a new link.
    pub empty_delta_body: bool,
    /// Answer every Web API request with `302 Found` to this URL (the client must not follow).
    pub redirect_to: Option<String>,
    /// How many writes share one `modifiedon` second. Dataverse stamps `modifiedon` to the
    /// second, so a bulk import stamps thousands of rows alike; 1 gives each write its own.
    pub writes_per_second: i64,
}

impl Default for DataverseConfig {
    fn default() -> Self {
        DataverseConfig {
            tenant_id: "00000000-0000-4000-8000-00000000a11c".into(),
            client_id: "00000000-0000-4000-8000-00000000c11e".into(),
            client_secret: "sim-dataverse-secret".into(),
            token_ttl: Duration::from_secs(3599),
            max_page_size: 5000,
            untracked: Vec::new(),
            forbidden: Vec::new(),
            chaos: None,
            change_retention: Duration::from_secs(7 * 24 * 3600),
            throttle: None,
            max_url_bytes: 32 * 1024,
            link_host: None,
            expired_stamp_status: 400,
            annotations_drop_delta_link: false,
            never_delta_link: false,
            empty_delta_body: false,
            redirect_to: None,
            writes_per_second: 1,
        }
    }
}

/// A fault for the Nth data request (1-based, counting every API request).
#[derive(Debug, Clone, PartialEq)]
pub enum DataverseFault {
    /// 429 with this `Retry-After` (seconds) and the service-protection error code.
    Throttle(u64),
    /// This status with a Dataverse error body.
    Status(u16),
    /// A 200 whose body is not JSON.
    Malformed,
    /// Wait this long before answering.
    Delay(Duration),
}

/// The tables, by entity set name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Opportunities,
    Accounts,
    Contacts,
    Connections,
    ConnectionRoles,
    /// Users: opportunity owners.
    SystemUsers,
}

impl Table {
    fn from_set(name: &str) -> Option<Table> {
        Some(match name {
            "opportunities" => Table::Opportunities,
            "accounts" => Table::Accounts,
            "contacts" => Table::Contacts,
            "connections" => Table::Connections,
            "connectionroles" => Table::ConnectionRoles,
            "systemusers" => Table::SystemUsers,
            _ => return None,
        })
    }
    fn set(self) -> &'static str {
        match self {
            Table::Opportunities => "opportunities",
            Table::Accounts => "accounts",
            Table::Contacts => "contacts",
            Table::Connections => "connections",
            Table::ConnectionRoles => "connectionroles",
            Table::SystemUsers => "systemusers",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Table::Opportunities => "opportunityid",
            Table::Accounts => "accountid",
            Table::Contacts => "contactid",
            Table::Connections => "connectionid",
            Table::ConnectionRoles => "connectionroleid",
            Table::SystemUsers => "systemuserid",
        }
    }
    fn logical(self) -> &'static str {
        match self {
            Table::Opportunities => "opportunity",
            Table::Accounts => "account",
            Table::Contacts => "contact",
            Table::Connections => "connection",
            Table::ConnectionRoles => "connectionrole",
            Table::SystemUsers => "systemuser",
        }
    }
}

/// A row: attributes by logical name (lookups as `_x_value`), and the table each lookup points at.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub attributes: Map<String, Value>,
    pub lookups: BTreeMap<String, &'static str>,
    pub version: i64,
}

#[derive(Default)]
struct Counters {
    requests: u64,
    /// Requests failed by `chaos`.
    chaos: u64,
    by_table: BTreeMap<Table, u64>,
    not_get: u64,
    throttled: u64,
    token_requests: u64,
    window: Vec<Instant>,
}

struct Inner {
    config: DataverseConfig,
    tables: BTreeMap<Table, BTreeMap<String, Row>>,
    tombstones: BTreeMap<Table, Vec<(String, i64)>>,
    version: i64,
    clock: i64,
    tokens: HashMap<String, Instant>,
    faults: Vec<(u64, DataverseFault)>,
    dice: crate::chaos::Dice,
    counters: Counters,
    /// Delta tokens issued, by token: when.
    issued: HashMap<String, Instant>,
    addr: String,
}

/// A running Dataverse simulator. Dropping it stops the server.
pub struct DataverseSim {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for DataverseSim {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

/// `modifiedon` for a simulated second: 2026-11-20T00:00:00Z plus `seconds`.
fn timestamp(seconds: i64) -> String {
    oppsync_support::utc_timestamp(1_795_132_800 + seconds)
}

impl DataverseSim {
    pub async fn start(config: DataverseConfig) -> std::io::Result<DataverseSim> {
        let dice = crate::chaos::Dice::new(config.chaos.map_or(1, |c| c.seed));
        let inner = Arc::new(Mutex::new(Inner {
            config,
            tables: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            version: 1_000_000,
            clock: 0,
            tokens: HashMap::new(),
            faults: Vec::new(),
            dice,
            counters: Counters::default(),
            issued: HashMap::new(),
            addr: String::new(),
        }));
        let app = routes(Arc::clone(&inner));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        lock(&inner).addr = addr.to_string();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(DataverseSim { inner, addr, server })
    }

    /// The environment URL (`DYNAMICS_URL`); the Web API is at `/api/data/v9.2/`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token endpoint (`DYNAMICS_TOKEN_URL`), standing in for login.microsoftonline.com.
    pub fn token_url(&self) -> String {
        let g = lock(&self.inner);
        format!("http://{}/{}/oauth2/v2.0/token", self.addr, g.config.tenant_id)
    }

    pub fn credentials(&self) -> (String, String, String) {
        let g = lock(&self.inner);
        (
            g.config.tenant_id.clone(),
            g.config.client_id.clone(),
            g.config.client_secret.clone(),
        )
    }

    /// API requests answered (token requests excluded).
    pub fn requests(&self) -> u64 {
        lock(&self.inner).counters.requests
    }

    pub fn requests_to(&self, table: Table) -> u64 {
        lock(&self.inner).counters.by_table.get(&table).copied().unwrap_or(0)
    }

    /// Requests that were not GET (the client must never send one).
    pub fn non_get_requests(&self) -> u64 {
        lock(&self.inner).counters.not_get
    }

    /// Requests that `chaos` failed.
    pub fn chaos_faults(&self) -> u64 {
        lock(&self.inner).counters.chaos
    }

    pub fn throttled(&self) -> u64 {
        lock(&self.inner).counters.throttled
    }

    pub fn token_requests(&self) -> u64 {
        lock(&self.inner).counters.token_requests
    }

    pub fn inject(&self, nth_request: u64, fault: DataverseFault) {
        lock(&self.inner).faults.push((nth_request, fault));
    }

    pub fn configure(&self, change: impl FnOnce(&mut DataverseConfig)) {
        change(&mut lock(&self.inner).config);
    }

    /// Makes every delta token issued so far older than the retention period.
    pub fn expire_delta_tokens(&self) {
        let mut g = lock(&self.inner);
        let long_ago = Instant::now()
            .checked_sub(g.config.change_retention + Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        for issued in g.issued.values_mut() {
            *issued = long_ago;
        }
    }

    pub fn expire_tokens(&self) {
        let now = Instant::now();
        for t in lock(&self.inner).tokens.values_mut() {
            *t = now;
        }
    }

    pub fn row(&self, table: Table, id: &str) -> Option<Row> {
        lock(&self.inner).tables.get(&table)?.get(id).cloned()
    }

    /// Every row of a table, by id.
    pub fn rows(&self, table: Table) -> Vec<(String, Row)> {
        lock(&self.inner)
            .tables
            .get(&table)
            .map(|rows| rows.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    pub fn count(&self, table: Table) -> usize {
        lock(&self.inner).tables.get(&table).map_or(0, BTreeMap::len)
    }

    /// Creates or updates a row (attributes merge); bumps `versionnumber` and `modifiedon`.
    pub fn upsert(&self, table: Table, id: &str, attributes: Value, lookups: &[(&str, &'static str)]) {
        let mut g = lock(&self.inner);
        upsert_row(&mut g, table, id, attributes, lookups);
    }

    /// Starts a write that commits later: the row's `versionnumber` (a SQL rowversion, taken
    /// when the row is written) and `modifiedon` are assigned now, but readers see the row only
    /// at [`DataverseSim::commit`]. Rows written meanwhile get later stamps, so a watermark read
    /// in between passes this one's stamp before the row is visible (a long transaction, a
    /// plug-in running inside one).
    pub fn begin_write(&self) -> PendingWrite {
        let mut g = lock(&self.inner);
        g.version += 1;
        g.clock += 1;
        PendingWrite {
            version: g.version,
            clock: g.clock,
        }
    }

    /// Commits a write begun with [`DataverseSim::begin_write`], with the stamps it took then.
    pub fn commit(&self, pending: PendingWrite, table: Table, id: &str, attributes: Value) {
        let mut g = lock(&self.inner);
        write_row(&mut g, table, id, attributes, &[], (pending.version, pending.clock));
    }

    /// Deletes a row, leaving a tombstone for change tracking.
    pub fn delete(&self, table: Table, id: &str) -> bool {
        let mut g = lock(&self.inner);
        delete_row(&mut g, table, id)
    }

    /// Adds a stakeholder: a connection and its reciprocal. Returns the pair's ids.
    pub fn add_stakeholder(&self, opportunity: &str, contact: &str, role: &str) -> (String, String) {
        let mut g = lock(&self.inner);
        let n = g.version;
        let (a, b) = (
            format!("e0000000-0000-4000-8000-{:012}", n),
            format!("e0000000-0000-4000-8001-{:012}", n),
        );
        let base = |cid: &str, rel: &str, r1: &str, t1: i64, r2: &str, t2: i64, role1: Value, role2: Value| {
            json!({"connectionid": cid, "_relatedconnectionid_value": rel, "_record1id_value": r1, "record1objecttypecode": t1,
                   "_record2id_value": r2, "record2objecttypecode": t2, "_record1roleid_value": role1,
                   "_record2roleid_value": role2, "statecode": 0, "ismaster": cid == a})
        };
        let row_a = base(&a, &b, opportunity, 3, contact, 2, Value::Null, json!(role));
        let row_b = base(&b, &a, contact, 2, opportunity, 3, json!(role), Value::Null);
        let lookups_a = [
            ("_record1id_value", "opportunity"),
            ("_record2id_value", "contact"),
            ("_record2roleid_value", "connectionrole"),
            ("_relatedconnectionid_value", "connection"),
        ];
        let lookups_b = [
            ("_record1id_value", "contact"),
            ("_record2id_value", "opportunity"),
            ("_record1roleid_value", "connectionrole"),
            ("_relatedconnectionid_value", "connection"),
        ];
        upsert_row(&mut g, Table::Connections, &a, row_a, &lookups_a);
        upsert_row(&mut g, Table::Connections, &b, row_b, &lookups_b);
        (a, b)
    }

    /// Deletes both rows of a connection.
    pub fn remove_connection(&self, (a, b): &(String, String)) {
        let mut g = lock(&self.inner);
        delete_row(&mut g, Table::Connections, a);
        delete_row(&mut g, Table::Connections, b);
    }

    /// Sets `statecode` on both rows of a connection (1 deactivates it).
    pub fn set_connection_state(&self, (a, b): &(String, String), state: i64) {
        let mut g = lock(&self.inner);
        upsert_row(&mut g, Table::Connections, a, json!({"statecode": state}), &[]);
        upsert_row(&mut g, Table::Connections, b, json!({"statecode": state}), &[]);
    }
}

/// A write begun and not yet committed: the stamps it took.
#[derive(Debug, Clone, Copy)]
pub struct PendingWrite {
    version: i64,
    clock: i64,
}

fn upsert_row(g: &mut Inner, table: Table, id: &str, attributes: Value, lookups: &[(&str, &'static str)]) {
    g.version += 1;
    g.clock += 1;
    let stamps = (g.version, g.clock);
    write_row(g, table, id, attributes, lookups, stamps);
}

fn write_row(
    g: &mut Inner,
    table: Table,
    id: &str,
    attributes: Value,
    lookups: &[(&str, &'static str)],
    (version, clock): (i64, i64),
) {
    let modified = timestamp(clock / g.config.writes_per_second.max(1));
    let row = g.tables.entry(table).or_default().entry(id.to_owned()).or_default();
    if let Value::Object(attrs) = attributes {
        row.attributes.extend(attrs);
    }
    for (attr, target) in lookups {
        row.lookups.insert((*attr).to_owned(), target);
    }
    row.attributes.insert(table.key().to_owned(), json!(id));
    row.attributes.insert("versionnumber".into(), json!(version));
    row.attributes.insert("modifiedon".into(), json!(modified));
    row.version = version;
}

fn delete_row(g: &mut Inner, table: Table, id: &str) -> bool {
    let removed = g.tables.entry(table).or_default().remove(id).is_some();
    if removed {
        g.version += 1;
        let v = g.version;
        g.tombstones.entry(table).or_default().push((id.to_owned(), v));
    }
    removed
}

fn odata_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(json!({"error": {"code": code, "message": message}}))).into_response()
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~!$'()*,;:@/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
