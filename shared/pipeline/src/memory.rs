//! In-memory adapters for the ports, for testing a step without a socket: a Dataverse that
//! serves rows it was given (change feed included) and a Marketo that keeps what it is sent,
//! answers record by record as the real one does (created, updated, skipped with a 1xxx code),
//! and records the order of its calls. The simulators stay for end-to-end tests over HTTP.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::{Future, ready};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use oppsync_dynamics::{ChangePage, DataverseError, EntitySet, Watermark, WatermarkPage};
use oppsync_mapping::dataverse::Related;
use oppsync_mapping::{Guid, Opportunity, OpportunityId, RecordError};
use oppsync_marketo::{LeadRecord, MarketoError, Reason, RecordOutcome, RecordStatus, RoleKey, RoleRecord};
use serde_json::{Map, Value, json};

use crate::ports::{DataversePort, MarketoPort};

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Rows by table, and what changed since the change feed was last read.
#[derive(Default)]
struct Tables {
    opportunities: BTreeMap<String, Value>,
    accounts: Vec<Value>,
    contacts: Vec<Value>,
    roles: Vec<Value>,
    connections: BTreeMap<String, Value>,
    /// Users (opportunity owners).
    users: Vec<Value>,
    /// Changed (Some(row)) or deleted (None) since the last read, by table.
    changed: BTreeMap<EntitySet, BTreeMap<String, Option<Value>>>,
    read_once: BTreeSet<EntitySet>,
    /// Rows a batch read leaves out although they exist (a replica behind, a read that lost
    /// rows): they are still found by their key.
    hidden: BTreeSet<String>,
    /// Contacts and connection roles the application user cannot read (left out of `related`).
    unreadable: BTreeSet<String>,
    /// The next change-feed read of every table answers as an expired token does: a full
    /// read, flagged `full_resync`, with no deletions (change tracking lost them).
    expired: bool,
    /// Reads that fail, by operation (`changes`, `all_ids`, `opportunities`, `related`), with
    /// how many more times.
    failing: BTreeMap<&'static str, u32>,
    requests: u64,
    /// A batch read of opportunities that waits for a signal: how many reads before it, and
    /// the signal (see [`MemoryDataverse::hold_read`]).
    held_read: Option<(u32, Arc<tokio::sync::Notify>)>,
}

impl Tables {
    /// Counts a request; fails it if a fault is scheduled for `operation`.
    fn request(&mut self, operation: &'static str) -> Result<(), DataverseError> {
        self.requests += 1;
        match self.failing.get_mut(operation) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(DataverseError::Transport {
                    message: format!("{operation}: connection reset (a fault the test scheduled)"),
                    timeout: false,
                })
            }
            _ => Ok(()),
        }
    }
}

/// A Dataverse in memory. Cheap to clone; clones share the rows.
#[derive(Clone, Default)]
pub struct MemoryDataverse(Arc<Mutex<Tables>>);

fn key_of(set: EntitySet, row: &Value) -> String {
    row[set.key()].as_str().unwrap_or_default().to_ascii_lowercase()
}

impl MemoryDataverse {
    /// Rows as the Web API returns them (annotated).
    pub fn new(
        opportunities: Vec<Value>,
        accounts: Vec<Value>,
        contacts: Vec<Value>,
        roles: Vec<Value>,
        connections: Vec<Value>,
    ) -> MemoryDataverse {
        let t = Tables {
            opportunities: opportunities
                .into_iter()
                .map(|r| (key_of(EntitySet::Opportunities, &r), r))
                .collect(),
            accounts,
            contacts,
            roles,
            connections: connections
                .into_iter()
                .map(|r| (key_of(EntitySet::Connections, &r), r))
                .collect(),
            ..Tables::default()
        };
        MemoryDataverse(Arc::new(Mutex::new(t)))
    }

    /// The batch read of opportunities after the next `reads` waits until `signal` is given,
    /// as a slow Dataverse would: work that should run meanwhile shows that it does.
    pub fn hold_read(&self, reads: u32, signal: Arc<tokio::sync::Notify>) {
        guard(&self.0).held_read = Some((reads, signal));
    }

    /// Creates or replaces an opportunity row; the change feed reports it.
    pub fn upsert_opportunity(&self, row: Value) {
        let mut t = guard(&self.0);
        let id = key_of(EntitySet::Opportunities, &row);
        t.changed
            .entry(EntitySet::Opportunities)
            .or_default()
            .insert(id.clone(), Some(row.clone()));
        t.opportunities.insert(id, row);
    }

    /// Creates or replaces a user row (an owner).
    pub fn upsert_user(&self, row: Value) {
        let mut t = guard(&self.0);
        let id = key_of(EntitySet::SystemUsers, &row);
        t.users.retain(|u| key_of(EntitySet::SystemUsers, u) != id);
        t.users.push(row);
    }

    /// Replaces a contact row (a changed email, say). Contacts are not change-tracked by the
    /// pipeline: the change reaches Marketo with the next change to an opportunity naming it.
    pub fn upsert_contact(&self, row: Value) {
        let mut t = guard(&self.0);
        let id = key_of(EntitySet::Contacts, &row);
        t.contacts.retain(|c| key_of(EntitySet::Contacts, c) != id);
        t.contacts.push(row);
    }

    /// Deletes an opportunity; the change feed reports the deletion.
    pub fn delete_opportunity(&self, id: &str) {
        let mut t = guard(&self.0);
        let id = id.to_ascii_lowercase();
        t.opportunities.remove(&id);
        t.changed.entry(EntitySet::Opportunities).or_default().insert(id, None);
    }

    /// Deletes an opportunity without the change feed seeing it (while a change-tracking token
    /// was expired, or under a watermark, which cannot see deletions).
    pub fn delete_opportunity_unseen(&self, id: &str) {
        guard(&self.0).opportunities.remove(&id.to_ascii_lowercase());
    }

    /// A contact or connection role (by id) the application user cannot read: `related` leaves
    /// it out, as Dataverse leaves out rows a security role hides.
    pub fn make_unreadable(&self, id: &str) {
        guard(&self.0).unreadable.insert(id.to_ascii_lowercase());
    }

    /// Undoes [`MemoryDataverse::make_unreadable`].
    pub fn make_readable(&self, id: &str) {
        guard(&self.0).unreadable.remove(&id.to_ascii_lowercase());
    }

    /// The next change-feed reads answer as for an expired token (a full read).
    pub fn expire_change_tokens(&self) {
        guard(&self.0).expired = true;
    }

    /// The next `times` reads of `operation` (`changes`, `all_ids`, `opportunities`,
    /// `related`) fail as a dropped connection does.
    pub fn fail_next(&self, operation: &'static str, times: u32) {
        guard(&self.0).failing.insert(operation, times);
    }

    /// Leaves an opportunity out of batch reads although it exists (read by key, it is there).
    pub fn hide_from_batch_reads(&self, id: &str) {
        guard(&self.0).hidden.insert(id.to_ascii_lowercase());
    }

    /// Creates or replaces a connection row; the change feed reports it.
    pub fn upsert_connection(&self, row: Value) {
        let mut t = guard(&self.0);
        let id = key_of(EntitySet::Connections, &row);
        t.changed
            .entry(EntitySet::Connections)
            .or_default()
            .insert(id.clone(), Some(row.clone()));
        t.connections.insert(id, row);
    }

    /// Deletes a connection row; the change feed reports the deletion.
    pub fn delete_connection(&self, id: &str) {
        let mut t = guard(&self.0);
        let id = id.to_ascii_lowercase();
        t.connections.remove(&id);
        t.changed.entry(EntitySet::Connections).or_default().insert(id, None);
    }

    fn rows(t: &Tables, set: EntitySet) -> Vec<Value> {
        match set {
            EntitySet::Opportunities => t.opportunities.values().cloned().collect(),
            EntitySet::Connections => t.connections.values().cloned().collect(),
            EntitySet::Accounts => t.accounts.clone(),
            EntitySet::Contacts => t.contacts.clone(),
            EntitySet::ConnectionRoles => t.roles.clone(),
            EntitySet::SystemUsers => t.users.clone(),
        }
    }
}

impl DataversePort for MemoryDataverse {
    fn changes(
        &self,
        set: EntitySet,
        _select: &[&str],
        cursor: Option<&str>,
    ) -> impl Future<Output = Result<ChangePage, DataverseError>> + Send {
        let mut t = guard(&self.0);
        if let Err(e) = t.request("changes") {
            return ready(Err(e));
        }
        // The first read of a table (or a read without a cursor) is a full read; later ones are
        // what changed since. An expired token is a full read too, flagged as such.
        let expired = std::mem::take(&mut t.expired) && cursor.is_some();
        if expired {
            t.expired = set == EntitySet::Opportunities;
        }
        let full = cursor.is_none() || !t.read_once.contains(&set) || expired;
        t.read_once.insert(set);
        let changed = t.changed.remove(&set).unwrap_or_default();
        let (rows, deleted) = if full {
            (Self::rows(&t, set), Vec::new())
        } else {
            let mut rows = Vec::new();
            let mut deleted = Vec::new();
            for (id, row) in changed {
                match row {
                    Some(row) => rows.push(row),
                    None => deleted.push(id),
                }
            }
            (rows, deleted)
        };
        ready(Ok(ChangePage {
            rows,
            deleted,
            cursor: format!("memory:{}:delta", set.name()),
            caught_up: true,
            full_resync: expired,
        }))
    }

    fn watermark_page(
        &self,
        set: EntitySet,
        _select: &[&str],
        _from: &Watermark,
        _link: Option<&str>,
    ) -> impl Future<Output = Result<WatermarkPage, DataverseError>> + Send {
        let mut t = guard(&self.0);
        t.requests += 1;
        ready(Ok(WatermarkPage {
            rows: Self::rows(&t, set),
            reached: Watermark::Version(0),
            next: None,
        }))
    }

    fn all_ids(&self, set: EntitySet) -> impl Future<Output = Result<BTreeSet<Guid>, DataverseError>> + Send {
        let mut t = guard(&self.0);
        if let Err(e) = t.request("all_ids") {
            return ready(Err(e));
        }
        ready(Ok(Self::rows(&t, set)
            .iter()
            .filter_map(|r| Guid::parse(&key_of(set, r)).ok())
            .collect()))
    }

    fn opportunities(
        &self,
        ids: &[OpportunityId],
        _select: &[&str],
    ) -> impl Future<Output = Result<Vec<Value>, DataverseError>> + Send {
        let mut t = guard(&self.0);
        let refused = t.request("opportunities").err();
        let rows: Vec<Value> = ids
            .iter()
            .filter(|id| !t.hidden.contains(&id.to_string()))
            .filter_map(|id| t.opportunities.get(&id.to_string()).cloned())
            .collect();
        let wait = match &mut t.held_read {
            Some((0, signal)) => {
                let signal = signal.clone();
                t.held_read = None;
                Some(signal)
            }
            Some((reads, _)) => {
                *reads -= 1;
                None
            }
            None => None,
        };
        async move {
            if let Some(signal) = wait {
                signal.notified().await;
            }
            refused.map_or(Ok(rows), Err)
        }
    }

    fn opportunity_exists(&self, id: OpportunityId) -> impl Future<Output = Result<bool, DataverseError>> + Send {
        let mut t = guard(&self.0);
        t.requests += 1;
        ready(Ok(t.opportunities.contains_key(&id.to_string())))
    }

    fn related(
        &self,
        _opportunities: &[Opportunity],
    ) -> impl Future<Output = Result<(Related, Vec<RecordError>), DataverseError>> + Send {
        let mut t = guard(&self.0);
        if let Err(e) = t.request("related") {
            return ready(Err(e));
        }
        let readable = |set: EntitySet, rows: &[Value]| -> Vec<Value> {
            rows.iter()
                .filter(|r| !t.unreadable.contains(&key_of(set, r)))
                .cloned()
                .collect()
        };
        let (mut related, mut rejected) = Related::from_json(
            t.accounts.clone(),
            readable(EntitySet::Contacts, &t.contacts),
            readable(EntitySet::ConnectionRoles, &t.roles),
            t.connections.values().cloned().collect(),
        );
        rejected.extend(related.add_users(readable(EntitySet::SystemUsers, &t.users)));
        ready(Ok((related, rejected)))
    }

    fn requests(&self) -> u64 {
        guard(&self.0).requests
    }
}

/// What the in-memory Marketo holds, and the calls it answered, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MarketoHolds {
    /// By externalOpportunityId.
    pub opportunities: BTreeMap<String, Map<String, Value>>,
    /// Role keys, with isPrimary.
    pub roles: BTreeMap<RoleKey, bool>,
    /// By externalCompanyId.
    pub companies: BTreeMap<String, Map<String, Value>>,
    /// By externalSalesPersonId.
    pub sales_persons: BTreeMap<String, Map<String, Value>>,
    /// By lead id.
    pub leads: BTreeMap<i64, Map<String, Value>>,
    /// Operation names (`opportunities.sync`, `leads.query`, …), one per call, in order.
    pub calls: Vec<&'static str>,
    /// The records of each `roles.sync` call, in order.
    pub role_writes: Vec<usize>,
}

#[derive(Default)]
struct MarketoData {
    holds: MarketoHolds,
    next_id: i64,
    /// Records refused by key (externalOpportunityId, externalCompanyId, email, or
    /// "opportunity|lead|role"), with the 1xxx code they are skipped with.
    refuse: HashMap<String, &'static str>,
    /// The next role records written are skipped with this code, this many of them.
    refuse_roles: (u32, &'static str),
    /// Runs while the next lead upsert is in flight (see [`MemoryMarketo::during_next_lead_upsert`]).
    in_flight: Option<Interleaved>,
    /// Signals given when an operation is called (see [`MemoryMarketo::signal_on`]).
    signals: Vec<(&'static str, Arc<tokio::sync::Notify>)>,
}

/// Work that runs at a chosen point inside a call, as another process would meanwhile.
pub type Interleaved = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A Marketo in memory. Cheap to clone; clones share what it holds.
#[derive(Clone, Default)]
pub struct MemoryMarketo(Arc<Mutex<MarketoData>>);

fn created(status: RecordStatus, id: impl ToString) -> RecordOutcome {
    RecordOutcome {
        status,
        marketo_id: Some(id.to_string()),
        reasons: Vec::new(),
    }
}

fn skipped(code: &str, message: &str) -> RecordOutcome {
    RecordOutcome {
        status: RecordStatus::Skipped,
        marketo_id: None,
        reasons: vec![Reason {
            code: code.to_owned(),
            message: message.to_owned(),
        }],
    }
}

fn text(record: &Value, key: &str) -> String {
    record.get(key).and_then(Value::as_str).unwrap_or_default().to_owned()
}

impl MemoryMarketo {
    pub fn holds(&self) -> MarketoHolds {
        guard(&self.0).holds.clone()
    }

    /// A lead that already exists in Marketo; returns its id.
    pub fn add_lead(&self, fields: Value) -> i64 {
        let mut d = guard(&self.0);
        d.next_id += 1;
        let id = d.next_id;
        d.holds
            .leads
            .insert(id, fields.as_object().cloned().unwrap_or_default());
        id
    }

    /// An opportunity a Marketo user deleted, with its roles.
    pub fn remove_opportunity(&self, external_id: &str) {
        let mut d = guard(&self.0);
        d.holds.opportunities.remove(external_id);
        d.holds.roles.retain(|k, _| k.external_opportunity_id != external_id);
    }

    /// A role a Marketo user deleted.
    pub fn remove_role(&self, key: &RoleKey) {
        guard(&self.0).holds.roles.remove(key);
    }

    /// A sales person deleted in Marketo: opportunities naming it are refused with 718.
    pub fn remove_sales_person(&self, external_id: &str) {
        guard(&self.0).holds.sales_persons.remove(external_id);
    }

    /// A lead deleted in Marketo (by a user, or merged away), with its roles.
    pub fn remove_lead(&self, id: i64) {
        let mut d = guard(&self.0);
        d.holds.leads.remove(&id);
        d.holds.roles.retain(|k, _| k.lead_id != id);
    }

    /// Runs `work` while the next lead upsert is in flight: the call looks its keys up when it
    /// starts and creates what it did not find when it ends, so a lead `work` creates with the
    /// same key meanwhile is created twice. That is what Adobe's leads page warns of:
    /// concurrent upserts (or upserts in quick succession) with the same key value can create
    /// duplicate leads.
    pub fn during_next_lead_upsert(&self, work: Interleaved) {
        guard(&self.0).in_flight = Some(work);
    }

    /// Gives `signal` each time `operation` (`opportunities.sync`, `preflight`, …) is called.
    pub fn signal_on(&self, operation: &'static str, signal: Arc<tokio::sync::Notify>) {
        guard(&self.0).signals.push((operation, signal));
    }

    fn signal(d: &MarketoData, operation: &str) {
        for (_, signal) in d.signals.iter().filter(|(o, _)| *o == operation) {
            signal.notify_one();
        }
    }

    /// The next `n` role records written (in any call) are skipped with `code`.
    pub fn refuse_next_roles(&self, n: u32, code: &'static str) {
        guard(&self.0).refuse_roles = (n, code);
    }

    /// Every write of the record with `key` is skipped with `code`.
    pub fn refuse(&self, key: &str, code: &'static str) {
        guard(&self.0).refuse.insert(key.to_owned(), code);
    }

    fn upsert(
        &self,
        operation: &'static str,
        key_field: &str,
        records: &[Value],
        table: impl Fn(&mut MarketoHolds) -> &mut BTreeMap<String, Map<String, Value>>,
    ) -> Vec<RecordOutcome> {
        let mut d = guard(&self.0);
        d.holds.calls.push(operation);
        Self::signal(&d, operation);
        let mut outcomes = Vec::with_capacity(records.len());
        for record in records {
            let key = text(record, key_field);
            if let Some(code) = d.refuse.get(&key) {
                outcomes.push(skipped(code, "Refused"));
                continue;
            }
            d.next_id += 1;
            let next = d.next_id;
            let fields = record.as_object().cloned().unwrap_or_default();
            let stored = table(&mut d.holds);
            let status = if stored.contains_key(&key) {
                RecordStatus::Updated
            } else {
                RecordStatus::Created
            };
            let entry = stored.entry(key).or_default();
            entry.extend(fields);
            let id = entry.entry("id").or_insert(json!(next)).clone();
            outcomes.push(created(status, id.as_i64().unwrap_or(next)));
        }
        outcomes
    }
}

impl MarketoPort for MemoryMarketo {
    fn sync_opportunities(
        &self,
        records: &[Value],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send {
        // Error-codes page, 718: a call naming a sales person Marketo does not have fails whole.
        {
            let mut d = guard(&self.0);
            let unknown = records.iter().any(|r| {
                r.get("externalSalesPersonId")
                    .and_then(Value::as_str)
                    .is_some_and(|id| !d.holds.sales_persons.contains_key(id))
            });
            if unknown {
                d.holds.calls.push("opportunities.sync");
                return ready(Err(MarketoError::Api {
                    endpoint: "opportunities.sync",
                    code: "718".into(),
                    message: "ExternalSalesPersonID not found".into(),
                }));
            }
        }
        ready(Ok(self.upsert(
            "opportunities.sync",
            "externalOpportunityId",
            records,
            |h| &mut h.opportunities,
        )))
    }

    fn delete_opportunities(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send {
        let mut d = guard(&self.0);
        d.holds.calls.push("opportunities.delete");
        let outcomes = ids
            .iter()
            .map(|id| match d.holds.opportunities.remove(id) {
                Some(_) => created(RecordStatus::Deleted, id),
                None => skipped("1013", "Record not found"),
            })
            .collect();
        ready(Ok(outcomes))
    }

    fn sync_roles(
        &self,
        roles: &[RoleRecord],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send {
        let mut d = guard(&self.0);
        d.holds.calls.push("roles.sync");
        d.holds.role_writes.push(roles.len());
        let mut outcomes = Vec::with_capacity(roles.len());
        for role in roles {
            let k = &role.key;
            if d.refuse_roles.0 > 0 {
                d.refuse_roles.0 -= 1;
                outcomes.push(skipped(d.refuse_roles.1, "Refused"));
                continue;
            }
            // Opportunity-roles page: the opportunity and the lead must exist.
            if !d.holds.opportunities.contains_key(&k.external_opportunity_id) {
                outcomes.push(skipped("1013", "Opportunity not found"));
            } else if !d.holds.leads.contains_key(&k.lead_id) {
                outcomes.push(skipped("1004", "Lead not found"));
            } else {
                let status = match d.holds.roles.insert(k.clone(), role.is_primary) {
                    Some(_) => RecordStatus::Updated,
                    None => RecordStatus::Created,
                };
                outcomes.push(created(
                    status,
                    format!("{}|{}|{}", k.external_opportunity_id, k.lead_id, k.role),
                ));
            }
        }
        ready(Ok(outcomes))
    }

    fn delete_roles(&self, keys: &[RoleKey]) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send {
        let mut d = guard(&self.0);
        d.holds.calls.push("roles.delete");
        let outcomes = keys
            .iter()
            .map(|k| match d.holds.roles.remove(k) {
                Some(_) => created(RecordStatus::Deleted, &k.role),
                None => skipped("1013", "Record not found"),
            })
            .collect();
        ready(Ok(outcomes))
    }

    fn sync_companies(
        &self,
        records: &[Value],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send {
        ready(Ok(self.upsert("companies.sync", "externalCompanyId", records, |h| {
            &mut h.companies
        })))
    }

    fn sync_sales_persons(
        &self,
        records: &[Value],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send {
        ready(Ok(self.upsert(
            "salespersons.sync",
            "externalSalesPersonId",
            records,
            |h| &mut h.sales_persons,
        )))
    }

    fn query_leads(
        &self,
        field: &str,
        values: &[String],
        _fields: &[&str],
    ) -> impl Future<Output = Result<Vec<LeadRecord>, MarketoError>> + Send {
        let mut d = guard(&self.0);
        d.holds.calls.push("leads.query");
        let wanted: BTreeSet<String> = values.iter().map(|v| v.to_ascii_lowercase()).collect();
        let found = d
            .holds
            .leads
            .iter()
            .filter(|(_, fields)| {
                fields
                    .get(field)
                    .and_then(Value::as_str)
                    .is_some_and(|v| wanted.contains(&v.to_ascii_lowercase()))
            })
            .map(|(id, fields)| LeadRecord {
                id: *id,
                fields: fields.clone(),
            })
            .collect();
        ready(Ok(found))
    }

    fn create_leads(
        &self,
        lookup_field: &str,
        leads: &[Value],
    ) -> impl Future<Output = Result<Vec<RecordOutcome>, MarketoError>> + Send {
        let (this, lookup_field, leads) = (self.clone(), lookup_field.to_owned(), leads.to_vec());
        async move {
            // The lookup, when the call starts.
            let (lookups, in_flight) = {
                let mut d = guard(&this.0);
                d.holds.calls.push("leads.sync");
                let lookups: Vec<(String, Vec<i64>)> = leads
                    .iter()
                    .map(|lead| {
                        let key = text(lead, &lookup_field).to_ascii_lowercase();
                        let existing = d
                            .holds
                            .leads
                            .iter()
                            .filter(|(_, f)| {
                                f.get(&lookup_field)
                                    .and_then(Value::as_str)
                                    .is_some_and(|v| v.eq_ignore_ascii_case(&key))
                            })
                            .map(|(id, _)| *id)
                            .collect();
                        (key, existing)
                    })
                    .collect();
                (lookups, d.in_flight.take())
            };
            if let Some(work) = in_flight {
                work().await;
            }
            // The writes, when it ends, by what the lookup saw.
            let mut d = guard(&this.0);
            let mut outcomes = Vec::with_capacity(leads.len());
            for (lead, (key, existing)) in leads.iter().zip(lookups) {
                if let Some(code) = d.refuse.get(&key) {
                    outcomes.push(skipped(code, "Refused"));
                    continue;
                }
                let fields = lead.as_object().cloned().unwrap_or_default();
                // Sync Leads `createOnly` (leads page): an existing lead is skipped, untouched.
                match existing.as_slice() {
                    [_] => outcomes.push(skipped("1005", "Lead already exists")),
                    [] => {
                        d.next_id += 1;
                        let id = d.next_id;
                        d.holds.leads.insert(id, fields);
                        outcomes.push(created(RecordStatus::Created, id));
                    }
                    _ => outcomes.push(skipped("1007", "Multiple leads match the lookup criteria")),
                }
            }
            Ok(outcomes)
        }
    }

    fn set_calls_today(&self, _calls: u64) {}

    fn count_calls_in(&self, _ledger: std::sync::Arc<dyn oppsync_marketo::CallLedger>) -> bool {
        false
    }

    fn share_limits_with(&self, _sharers: usize) {}

    /// The in-memory instance has every field and takes writes; the check is not a call.
    fn preflight(
        &self,
        _fields: &[String],
    ) -> impl Future<Output = Result<oppsync_marketo::Preflight, MarketoError>> + Send {
        Self::signal(&guard(&self.0), "preflight");
        ready(Ok(oppsync_marketo::Preflight {
            blocked: None,
            missing_fields: Vec::new(),
        }))
    }
    fn calls_by_endpoint(&self) -> BTreeMap<&'static str, u64> {
        let mut counts = BTreeMap::new();
        for call in &guard(&self.0).holds.calls {
            *counts.entry(*call).or_default() += 1;
        }
        counts
    }
}
