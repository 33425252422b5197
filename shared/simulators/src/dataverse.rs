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
}

impl Default for DataverseConfig {
    fn default() -> Self {
        DataverseConfig {
            tenant_id: "00000000-0000-4000-8000-00000000a11c".into(),
            client_id: "sim-dataverse-client".into(),
            client_secret: "sim-dataverse-secret".into(),
            token_ttl: Duration::from_secs(3599),
            max_page_size: 5000,
            untracked: Vec::new(),
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
}

impl Table {
    fn from_set(name: &str) -> Option<Table> {
        Some(match name {
            "opportunities" => Table::Opportunities,
            "accounts" => Table::Accounts,
            "contacts" => Table::Contacts,
            "connections" => Table::Connections,
            "connectionroles" => Table::ConnectionRoles,
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
        }
    }
    fn key(self) -> &'static str {
        match self {
            Table::Opportunities => "opportunityid",
            Table::Accounts => "accountid",
            Table::Contacts => "contactid",
            Table::Connections => "connectionid",
            Table::ConnectionRoles => "connectionroleid",
        }
    }
    fn logical(self) -> &'static str {
        match self {
            Table::Opportunities => "opportunity",
            Table::Accounts => "account",
            Table::Contacts => "contact",
            Table::Connections => "connection",
            Table::ConnectionRoles => "connectionrole",
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
    let total = 1_795_132_800 + seconds; // 2026-11-20T00:00:00Z
    let (days, rem) = (total.div_euclid(86_400), total.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
        let app = Router::new().fallback(handle).with_state(Arc::clone(&inner));
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

fn upsert_row(g: &mut Inner, table: Table, id: &str, attributes: Value, lookups: &[(&str, &'static str)]) {
    g.version += 1;
    g.clock += 1;
    let (version, modified) = (g.version, timestamp(g.clock));
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

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    if path.ends_with("/oauth2/v2.0/token") {
        return token(&inner, &method, &path, &body);
    }
    let Some(rest) = path.strip_prefix(API) else {
        return odata_error(StatusCode::NOT_FOUND, "0x80060888", "Resource not found");
    };
    let delay = {
        let mut g = lock(&inner);
        g.counters.requests += 1;
        if method != Method::GET {
            g.counters.not_get += 1;
            return odata_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "0x80060888",
                "This simulator is read-only",
            );
        }
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if bearer
            .and_then(|t| g.tokens.get(t))
            .is_none_or(|e| *e <= Instant::now())
        {
            // A bearer challenge naming the tenant's authority (Entra ID's error-response shape).
            let challenge = format!(
                "Bearer authorization_uri=https://login.microsoftonline.com/{}/oauth2/authorize, error=\"invalid_token\", error_description=\"The access token is missing or expired.\"",
                g.config.tenant_id
            );
            return (StatusCode::UNAUTHORIZED, [("WWW-Authenticate", challenge)]).into_response();
        }
        if let Some(to) = &g.config.redirect_to {
            return (StatusCode::FOUND, [("Location", to.clone())]).into_response();
        }
        if uri.to_string().len() > g.config.max_url_bytes {
            return odata_error(StatusCode::URI_TOO_LONG, "0x8006088a", "The URL is too long");
        }
        let nth = g.counters.requests;
        let fault = g
            .faults
            .iter()
            .position(|(n, _)| *n == nth)
            .map(|i| g.faults.remove(i).1);
        let fault = fault.or_else(|| {
            let chaos = g.config.chaos?;
            g.dice.hit(chaos.rate).then(|| {
                g.counters.chaos += 1;
                g.dice.pick(&[
                    DataverseFault::Throttle(1),
                    DataverseFault::Status(500),
                    DataverseFault::Status(503),
                    DataverseFault::Malformed,
                ])
            })
        });
        if let Some((limit, window)) = g.config.throttle {
            let now = Instant::now();
            g.counters.window.retain(|t| now.duration_since(*t) < window);
            if g.counters.window.len() >= limit {
                g.counters.throttled += 1;
                let retry = window
                    .saturating_sub(now.duration_since(g.counters.window[0]))
                    .as_secs()
                    .max(1);
                return throttle_response(retry);
            }
            g.counters.window.push(now);
        }
        match fault {
            Some(DataverseFault::Throttle(secs)) => {
                g.counters.throttled += 1;
                return throttle_response(secs);
            }
            Some(DataverseFault::Status(code)) => {
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return odata_error(status, "0x80040216", "An unexpected error occurred.");
            }
            Some(DataverseFault::Malformed) => return (StatusCode::OK, "<html>gateway</html>").into_response(),
            Some(DataverseFault::Delay(d)) => d,
            None => Duration::ZERO,
        }
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let prefer = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let mut g = lock(&inner);
    serve(&mut g, rest, &parse_query(uri.query().unwrap_or("")), &prefer)
}

/// `EntityDefinitions(LogicalName='…')`: the one metadata property oppsync reads.
fn entity_definition(g: &Inner, logical: &str) -> Response {
    let Some(table) = table_of_logical(logical) else {
        return odata_error(
            StatusCode::NOT_FOUND,
            "0x80040217",
            &format!("Could not find an entity with LogicalName = {logical}"),
        );
    };
    axum::Json(json!({
        "@odata.context": format!("{API}$metadata#EntityDefinitions(ChangeTrackingEnabled)/$entity"),
        "LogicalName": logical,
        "ChangeTrackingEnabled": !g.config.untracked.contains(&table),
    }))
    .into_response()
}

fn throttle_response(retry_after: u64) -> Response {
    let mut response = odata_error(
        StatusCode::TOO_MANY_REQUESTS,
        "0x80072322",
        "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
    );
    if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
        response.headers_mut().insert("Retry-After", v);
    }
    response
}

fn token(inner: &Mutex<Inner>, method: &Method, path: &str, body: &[u8]) -> Response {
    let mut g = lock(inner);
    g.counters.token_requests += 1;
    let form: HashMap<String, String> = parse_query(&String::from_utf8_lossy(body)).into_iter().collect();
    let tenant_ok = path == format!("/{}/oauth2/v2.0/token", g.config.tenant_id);
    let ok = *method == Method::POST
        && tenant_ok
        && form.get("grant_type").map(String::as_str) == Some("client_credentials")
        && form.get("client_id") == Some(&g.config.client_id)
        && form.get("client_secret") == Some(&g.config.client_secret)
        && form.get("scope").is_some_and(|s| s.ends_with("/.default"));
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."})),
        )
            .into_response();
    }
    let token = format!("sim-dv-token-{}", g.counters.token_requests);
    let ttl = g.config.token_ttl;
    g.tokens.insert(token.clone(), Instant::now() + ttl);
    axum::Json(json!({"token_type": "Bearer", "expires_in": ttl.as_secs(), "ext_expires_in": ttl.as_secs(), "access_token": token}))
        .into_response()
}

/// A parsed `$filter`: a conjunction of comparisons.
#[derive(Debug)]
enum Condition {
    Compare {
        path: Vec<String>,
        op: Op,
        value: Value,
    },
    In {
        attribute: String,
        /// `_{attribute}_value`: where a lookup's id is, computed once.
        lookup: String,
        values: std::collections::HashSet<String>,
    },
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Eq,
    Ge,
    Gt,
}

fn parse_filter(text: &str) -> Result<Vec<Condition>, String> {
    let mut conditions = Vec::new();
    for clause in split_and(text) {
        let clause = clause.trim();
        if let Some(args) = clause
            .strip_prefix("Microsoft.Dynamics.CRM.In(")
            .and_then(|c| c.strip_suffix(')'))
        {
            let name = args
                .split_once("PropertyName=")
                .and_then(|(_, r)| r.split('\'').nth(1))
                .ok_or("In() needs PropertyName='…'")?;
            let list = args
                .split_once("PropertyValues=[")
                .and_then(|(_, r)| r.rsplit_once(']'))
                .map(|(l, _)| l)
                .ok_or("In() needs PropertyValues=[…]")?;
            let values = list
                .split(',')
                .map(|v| v.trim().trim_matches('\'').to_ascii_lowercase())
                .filter(|v| !v.is_empty())
                .collect();
            conditions.push(Condition::In {
                attribute: name.to_owned(),
                lookup: format!("_{name}_value"),
                values,
            });
            continue;
        }
        let parts: Vec<&str> = clause.splitn(3, ' ').collect();
        let [path, op, literal] = parts.as_slice() else {
            return Err(format!("cannot parse `{clause}`"));
        };
        let op = match *op {
            "eq" => Op::Eq,
            "ge" => Op::Ge,
            "gt" => Op::Gt,
            other => return Err(format!("operator `{other}` is not supported here")),
        };
        let value = if *literal == "null" {
            Value::Null
        } else if let Some(s) = literal.strip_prefix('\'').and_then(|l| l.strip_suffix('\'')) {
            json!(s.replace("''", "'"))
        } else if let Ok(n) = literal.parse::<i64>() {
            json!(n)
        } else if literal.len() == 36 && literal.matches('-').count() == 4 {
            // Unquoted GUIDs compare lowercase.
            json!(literal.to_ascii_lowercase())
        } else if literal.ends_with('Z') {
            // DateTimeOffset literals compare as written (ISO 8601 sorts as text).
            json!(literal)
        } else {
            return Err(format!("cannot parse the literal `{literal}`"));
        };
        conditions.push(Condition::Compare {
            path: path.split('/').map(str::to_owned).collect(),
            op,
            value,
        });
    }
    // A conjunction: the cheap set lookups first, so most rows are dropped before a lookup path
    // is followed.
    conditions.sort_by_key(|c| !matches!(c, Condition::In { .. }));
    Ok(conditions)
}

/// Splits on ` and ` outside brackets and quotes.
fn split_and(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut quoted, mut start) = (Vec::new(), 0i32, false, 0);
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' => quoted = !quoted,
            b'(' | b'[' if !quoted => depth += 1,
            b')' | b']' if !quoted => depth -= 1,
            b' ' if !quoted && depth == 0 && text[i..].starts_with(" and ") => {
                parts.push(&text[start..i]);
                start = i + 5;
                i += 4;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&text[start..]);
    parts
}

/// The value at a path: an attribute, or a lookup followed to its row (`record2roleid/category`).
fn value_at(g: &Inner, row: &Row, path: &[String]) -> Value {
    match path {
        [attr] => row
            .attributes
            .get(attr)
            .or_else(|| row.attributes.get(&format!("_{attr}_value")))
            .cloned()
            .unwrap_or(Value::Null),
        [nav, rest @ ..] => {
            let lookup = format!("_{nav}_value");
            let target = row.lookups.get(&lookup).copied();
            let id = row.attributes.get(&lookup).and_then(Value::as_str);
            match (target.and_then(table_of_logical), id) {
                (Some(t), Some(id)) => g
                    .tables
                    .get(&t)
                    .and_then(|rows| rows.get(id))
                    .map_or(Value::Null, |r| value_at(g, r, rest)),
                _ => Value::Null,
            }
        }
        [] => Value::Null,
    }
}

fn table_of_logical(name: &str) -> Option<Table> {
    [
        Table::Opportunities,
        Table::Accounts,
        Table::Contacts,
        Table::Connections,
        Table::ConnectionRoles,
    ]
    .into_iter()
    .find(|t| t.logical() == name)
}

fn matches(g: &Inner, row: &Row, conditions: &[Condition]) -> bool {
    conditions.iter().all(|c| match c {
        Condition::In {
            attribute,
            lookup,
            values,
        } => {
            match row.attributes.get(attribute).or_else(|| row.attributes.get(lookup)) {
                // GUIDs are stored lowercase: the first test nearly always decides.
                Some(Value::String(s)) => values.contains(s) || values.contains(&s.to_ascii_lowercase()),
                _ => false,
            }
        }
        Condition::Compare { path, op, value } => {
            let actual = value_at(g, row, path);
            match op {
                Op::Eq => match (&actual, value) {
                    (Value::String(a), Value::String(b)) => a.eq_ignore_ascii_case(b),
                    (a, b) => a == b,
                },
                Op::Ge | Op::Gt => {
                    let ordering = match (&actual, value) {
                        (Value::Number(a), Value::Number(b)) => a.as_f64().partial_cmp(&b.as_f64()),
                        (Value::String(a), Value::String(b)) => Some(a.as_str().cmp(b.as_str())),
                        _ => None,
                    };
                    matches!(
                        (op, ordering),
                        (Op::Ge, Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal))
                            | (Op::Gt, Some(std::cmp::Ordering::Greater))
                    )
                }
            }
        }
    })
}

/// Renders a row: selected attributes with the annotations asked for, and expanded roles.
fn render(
    g: &Inner,
    table: Table,
    row: &Row,
    select: &Option<Vec<String>>,
    expand: &[String],
    annotate: bool,
) -> Value {
    let mut out = Map::new();
    let wanted = |name: &str| {
        select
            .as_ref()
            .is_none_or(|s| s.iter().any(|x| x == name || format!("_{x}_value") == name))
    };
    for (name, value) in &row.attributes {
        if name != table.key() && !wanted(name) {
            continue;
        }
        out.insert(name.clone(), value.clone());
        if annotate {
            if let Some(target) = row.lookups.get(name) {
                out.insert(format!("{name}{LOOKUP}"), json!(target));
                if let Some(label) = lookup_name(g, target, value) {
                    out.insert(format!("{name}{FORMATTED}"), json!(label));
                }
            } else if name == "statecode" && table == Table::Opportunities {
                let label = match value.as_i64() {
                    Some(0) => "Open",
                    Some(1) => "Won",
                    Some(2) => "Lost",
                    _ => "",
                };
                out.insert(format!("{name}{FORMATTED}"), json!(label));
            }
        }
    }
    for nav in expand {
        let lookup = format!("_{nav}_value");
        let id = row.attributes.get(&lookup).and_then(Value::as_str);
        let expanded = id
            .and_then(|id| g.tables.get(&Table::ConnectionRoles)?.get(id))
            .map(|r| Value::Object(r.attributes.clone()))
            .unwrap_or(Value::Null);
        out.insert(nav.clone(), expanded);
    }
    out.insert("@odata.etag".into(), json!(format!("W/\"{}\"", row.version)));
    Value::Object(out)
}

fn lookup_name(g: &Inner, target: &str, id: &Value) -> Option<String> {
    let row = g.tables.get(&table_of_logical(target)?)?.get(id.as_str()?)?;
    let a = &row.attributes;
    a.get("name")
        .or_else(|| a.get("fullname"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn serve(g: &mut Inner, rest: &str, query: &[(String, String)], prefer: &str) -> Response {
    let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if let Some(logical) = rest
        .strip_prefix("EntityDefinitions(LogicalName='")
        .and_then(|r| r.strip_suffix("')"))
    {
        return entity_definition(g, logical);
    }
    let (set, single) = match rest.split_once('(') {
        Some((set, id)) => (set, Some(id.trim_end_matches(')').to_ascii_lowercase())),
        None => (rest, None),
    };
    let Some(table) = Table::from_set(set) else {
        return odata_error(
            StatusCode::NOT_FOUND,
            "0x80060888",
            &format!("Resource not found for the segment '{set}'."),
        );
    };
    *g.counters.by_table.entry(table).or_default() += 1;
    let annotate = prefer.contains("odata.include-annotations");
    let select = param("$select").map(|s| s.split(',').map(str::to_owned).collect::<Vec<_>>());
    let expand: Vec<String> = param("$expand")
        .map(|e| {
            e.split(',')
                .map(|x| x.split('(').next().unwrap_or("").trim().to_owned())
                .collect()
        })
        .unwrap_or_default();
    if let Some(id) = single {
        return match g.tables.get(&table).and_then(|t| t.get(&id)) {
            Some(row) => axum::Json(render(g, table, row, &select, &expand, annotate)).into_response(),
            None => odata_error(
                StatusCode::NOT_FOUND,
                "0x80040217",
                &format!("{} With Id = {id} Does Not Exist", table.logical()),
            ),
        };
    }
    let track = prefer.contains("odata.track-changes") || param("$deltatoken").is_some();
    if track && g.config.untracked.contains(&table) {
        // The exact code Dataverse sends here is not documented (dataverse.md): a 400 naming the
        // table is what the client must handle, whatever the code.
        return odata_error(
            StatusCode::BAD_REQUEST,
            "0x80048d19",
            &format!("Change tracking is not enabled for the entity '{}'.", table.logical()),
        );
    }
    if track
        && (param("$filter").is_some()
            || param("$orderby").is_some()
            || param("$expand").is_some()
            || param("$top").is_some())
    {
        return odata_error(
            StatusCode::BAD_REQUEST,
            "0x80060888",
            "$filter, $orderby, $expand and $top are not supported with change tracking",
        );
    }
    let page_size = prefer
        .split(',')
        .find_map(|p| p.trim().strip_prefix("odata.maxpagesize="))
        .and_then(|n| n.trim_matches('"').parse::<usize>().ok())
        .unwrap_or(g.config.max_page_size)
        .clamp(1, g.config.max_page_size);
    let conditions = match param("$filter").map(|f| parse_filter(&f)).transpose() {
        Ok(c) => c.unwrap_or_default(),
        Err(message) => return odata_error(StatusCode::BAD_REQUEST, "0x80060888", &message),
    };
    // Delta reads: changes after the token's version, up to the version the read started at.
    // `delta`: a read from a delta token (its pages carry deletions); a full read's pages do
    // not ("Deleted objects are not returned", change-tracking page).
    let (after, upto, delta) = match (param("$deltatoken"), param("$skiptoken")) {
        (_, Some(skip)) => {
            let mut parts = skip.split(':').map(|p| p.parse::<i64>().unwrap_or(0));
            (
                parts.next().unwrap_or(0),
                parts.next().unwrap_or(g.version),
                parts.next() == Some(1),
            )
        }
        (Some(token), None) => {
            let issued = g.issued.get(&token).copied();
            match issued {
                Some(at) if at.elapsed() <= g.config.change_retention => (
                    token.split('!').next().and_then(|v| v.parse().ok()).unwrap_or(0),
                    g.version,
                    true,
                ),
                _ => {
                    return odata_error(
                        StatusCode::from_u16(g.config.expired_stamp_status).unwrap_or(StatusCode::BAD_REQUEST),
                        EXPIRED_VERSION_STAMP,
                        "Version stamp associated with the client has expired. Please perform a full sync.",
                    );
                }
            }
        }
        (None, None) => (i64::MIN, g.version, false),
    };
    let start_offset: usize = if track {
        0
    } else {
        param("$skiptoken").and_then(|s| s.parse().ok()).unwrap_or(0)
    };
    let empty = BTreeMap::new();
    let view: &Inner = g;
    let rows = view.tables.get(&table).unwrap_or(&empty);
    // An In() on the primary key reads those rows by id, as Dataverse's index would; anything
    // else scans.
    let by_key = conditions.iter().find_map(|c| match c {
        Condition::In { attribute, values, .. } if attribute == table.key() => Some(values),
        _ => None,
    });
    let candidates: Box<dyn Iterator<Item = &Row>> = match by_key {
        Some(ids) => {
            let mut ids: Vec<&String> = ids.iter().collect();
            ids.sort();
            Box::new(ids.into_iter().filter_map(|id| rows.get(id)))
        }
        None => Box::new(rows.values()),
    };
    let mut hits: Vec<&Row> = candidates
        .filter(|r| !track || (r.version > after && r.version <= upto))
        .filter(|r| matches(view, r, &conditions))
        .collect();
    match param("$orderby") {
        Some(order) => {
            let attr = order.split_whitespace().next().unwrap_or("").to_owned();
            let desc = order.ends_with(" desc");
            hits.sort_by(|a, b| {
                let (x, y) = (a.attributes.get(&attr), b.attributes.get(&attr));
                let o = match (x.and_then(Value::as_f64), y.and_then(Value::as_f64)) {
                    (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal),
                    _ => x.map(Value::to_string).cmp(&y.map(Value::to_string)),
                };
                if desc { o.reverse() } else { o }
            });
        }
        None if track => hits.sort_by_key(|r| r.version),
        None => {}
    }
    if let Some(top) = param("$top").and_then(|t| t.parse::<usize>().ok()) {
        hits.truncate(top);
    }
    let mut value: Vec<Value> = Vec::new();
    let mut tombstones: Vec<(String, i64)> = if track && delta {
        view.tombstones
            .get(&table)
            .map(|t| t.iter().filter(|(_, v)| *v > after && *v <= upto).cloned().collect())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    tombstones.sort_by_key(|(_, v)| *v);
    // In a delta read, rows and tombstones are served in version order.
    let mut merged: Vec<(i64, Result<&Row, String>)> = hits
        .into_iter()
        .skip(start_offset)
        .map(|r| (r.version, Ok(r)))
        .chain(tombstones.into_iter().map(|(id, v)| (v, Err(id))))
        .collect();
    if track {
        merged.sort_by_key(|(v, _)| *v);
    }
    let more = merged.len() > page_size;
    merged.truncate(page_size);
    let last_version = merged.last().map(|(v, _)| *v);
    let host = view.config.link_host.clone().unwrap_or_else(|| view.addr.clone());
    let base = format!("http://{host}{API}{}", table.set());
    for (_, item) in &merged {
        value.push(match item {
            Ok(row) => render(view, table, row, &select, &expand, annotate),
            // Change-tracking page: {"@odata.context":"[Organization URI]/api/data/v9.0/$metadata#accounts/$deletedEntity","id":…,"reason":"deleted"}
            Err(id) => json!({"@odata.context": format!("http://{host}{API}$metadata#{}/$deletedEntity", table.set()), "id": id, "reason": "deleted"}),
        });
    }
    let delta_read = track && delta;
    if delta_read && value.is_empty() && !more && view.config.empty_delta_body {
        return (
            StatusCode::OK,
            [("content-type", "application/json; odata.metadata=minimal")],
            "{}",
        )
            .into_response();
    }
    let mut page = Map::new();
    // A delta page's context ends in `/$delta` (change-tracking page).
    let context = if delta_read {
        format!("http://{host}{API}$metadata#{}/$delta", table.set())
    } else {
        format!("http://{host}{API}$metadata#{}", table.set())
    };
    page.insert("@odata.context".into(), json!(context));
    page.insert("value".into(), Value::Array(value));
    let carried: String = query
        .iter()
        .filter(|(k, _)| k != "$skiptoken" && k != "$deltatoken")
        .map(|(k, v)| format!("{}={}&", encode(k), encode(v)))
        .collect();
    if more {
        let skip = if track {
            format!("{}:{upto}:{}", last_version.unwrap_or(after), u8::from(delta))
        } else {
            (start_offset + page_size).to_string()
        };
        page.insert(
            "@odata.nextLink".into(),
            json!(format!("{base}?{carried}$skiptoken={}", encode(&skip))),
        );
    } else if track && !g.config.never_delta_link && !(annotate && g.config.annotations_drop_delta_link) {
        let token = format!("{upto}!{}", g.issued.len());
        g.issued.insert(token.clone(), Instant::now());
        page.insert(
            "@odata.deltaLink".into(),
            json!(format!("{base}?{carried}$deltatoken={}", encode(&token))),
        );
    }
    let body = Value::Object(page).to_string();
    (
        StatusCode::OK,
        [("content-type", "application/json; odata.metadata=minimal")],
        body,
    )
        .into_response()
}

/// Connection roles the generator uses: (id suffix, name, category).
pub const SEED_ROLES: [(u64, &str, i64); 6] = [
    (1, "Champion", 1000),
    (2, "Decision Maker", 1000),
    (3, "Influencer", 1000),
    (4, "Economic Buyer", 1000),
    (5, "Sales Professional", 1001),
    (6, "Friend", 3),
];

/// GUIDs the generator uses, readable by table.
pub fn seed_id(prefix: u32, n: u64) -> String {
    format!("{prefix:08x}-0000-4000-8000-{n:012}")
}

/// What the generator made, for assertions.
#[derive(Debug, Clone, Default)]
pub struct Seeded {
    pub opportunities: Vec<String>,
    pub accounts: Vec<String>,
    pub contacts: Vec<String>,
    /// Connection pairs, by opportunity.
    pub stakeholders: BTreeMap<String, Vec<(String, String)>>,
}

/// The mix of records the generator builds.
#[derive(Debug, Clone, Copy)]
pub enum Mix {
    /// Every case: account customers, contact customers with and without an account (and with a
    /// contact as parent), both form fields set, 0–5 stakeholders, Sales Team and inactive
    /// connections, open, won and lost, a custom field.
    Realistic,
    /// The benchmark's shape: a contact customer with a parent account and 2 stakeholders each.
    Uniform,
}

impl DataverseSim {
    /// Builds `n` opportunities with everything they refer to, deterministically from `seed`.
    pub fn seed(&self, n: u64, seed: u64, mix: Mix) -> Seeded {
        let mut g = lock(&self.inner);
        let mut x = seed | 1;
        let mut rand = move |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m.max(1)
        };
        let mut out = Seeded::default();
        for (k, name, category) in SEED_ROLES {
            let id = seed_id(0xf000_0000, k);
            upsert_row(
                &mut g,
                Table::ConnectionRoles,
                &id,
                json!({"name": name, "category": category}),
                &[],
            );
        }
        let accounts = (n / 2).max(1);
        for a in 0..accounts {
            let id = seed_id(0xa000_0000, a);
            upsert_row(
                &mut g,
                Table::Accounts,
                &id,
                json!({"name": format!("Account {a}")}),
                &[],
            );
            out.accounts.push(id);
        }
        let contacts = 3 * n.max(1);
        for c in 0..contacts {
            let id = seed_id(0xc000_0000, c);
            let parent = match (mix, rand(10)) {
                (Mix::Uniform, _) | (_, 0..=6) => Some((seed_id(0xa000_0000, c % accounts), "account")),
                (_, 7) if c > 0 => Some((seed_id(0xc000_0000, c - 1), "contact")),
                _ => None,
            };
            let email = if matches!(mix, Mix::Realistic) && rand(50) == 0 {
                Value::Null
            } else {
                json!(format!("person{c}@example.com"))
            };
            let mut attrs = json!({"firstname": "Pat", "lastname": format!("Person {c}"), "fullname": format!("Pat Person {c}"),
                                   "emailaddress1": email, "_parentcustomerid_value": Value::Null});
            let mut lookups = vec![];
            if let Some((pid, table)) = &parent {
                attrs["_parentcustomerid_value"] = json!(pid);
                lookups.push((
                    "_parentcustomerid_value",
                    if *table == "account" { "account" } else { "contact" },
                ));
            }
            upsert_row(&mut g, Table::Contacts, &id, attrs, &lookups);
            out.contacts.push(id);
        }
        drop(g);
        for o in 0..n {
            let id = seed_id(0x0b00_0000, o);
            let contact = seed_id(0xc000_0000, 3 * o);
            let account = seed_id(0xa000_0000, o % accounts);
            let (state, kind) = match mix {
                Mix::Uniform => (0, 1),
                Mix::Realistic => ([0, 0, 0, 1, 2][rand(5) as usize], rand(4)),
            };
            let status = [1, 3, 5][state as usize];
            let region = ["EMEA", "AMER", "APAC"][rand(3) as usize];
            let mut attrs = json!({
                "name": format!("Opportunity {o}"), "description": format!("Generated opportunity {o}"),
                "estimatedvalue": 1000 + rand(100_000) as i64, "closeprobability": rand(101) as i64,
                "estimatedclosedate": "2026-12-31", "actualclosedate": if state == 0 { Value::Null } else { json!("2026-11-01") },
                "statecode": state, "statuscode": status,
                "new_region": region,
                "_customerid_value": Value::Null, "_parentaccountid_value": Value::Null, "_parentcontactid_value": Value::Null,
            });
            let mut lookups = vec![];
            match kind {
                0 => {
                    attrs["_customerid_value"] = json!(account);
                    attrs["_parentaccountid_value"] = json!(account);
                    lookups.extend([("_customerid_value", "account"), ("_parentaccountid_value", "account")]);
                }
                1 => {
                    attrs["_customerid_value"] = json!(contact);
                    attrs["_parentcontactid_value"] = json!(contact);
                    lookups.extend([("_customerid_value", "contact"), ("_parentcontactid_value", "contact")]);
                }
                2 => {
                    // Both on the form: Dynamics stores the account.
                    attrs["_customerid_value"] = json!(account);
                    attrs["_parentaccountid_value"] = json!(account);
                    attrs["_parentcontactid_value"] = json!(contact);
                    lookups.extend([
                        ("_customerid_value", "account"),
                        ("_parentaccountid_value", "account"),
                        ("_parentcontactid_value", "contact"),
                    ]);
                }
                _ => {}
            }
            self.upsert(Table::Opportunities, &id, attrs, &lookups);
            let stakeholders = match mix {
                Mix::Uniform => 2,
                Mix::Realistic => rand(6),
            };
            for s in 0..stakeholders {
                let stakeholder = seed_id(0xc000_0000, (3 * o + 1 + s) % contacts);
                let role = match mix {
                    Mix::Uniform => s + 1,
                    Mix::Realistic => 1 + rand(SEED_ROLES.len() as u64),
                };
                let pair = self.add_stakeholder(&id, &stakeholder, &seed_id(0xf000_0000, role));
                if matches!(mix, Mix::Realistic) && rand(8) == 0 {
                    self.set_connection_state(&pair, 1);
                }
                out.stakeholders.entry(id.clone()).or_default().push(pair);
            }
            out.opportunities.push(id);
        }
        out
    }
}
