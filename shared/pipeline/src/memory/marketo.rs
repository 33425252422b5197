//! A Marketo in memory: keeps what it is sent, answers record by record as the real one does
//! (created, updated, skipped with a 1xxx code), and records the order of its calls.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::{Future, ready};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use oppsync_marketo::{LeadRecord, MarketoError, Reason, RecordOutcome, RecordStatus, RoleKey, RoleRecord};
use serde_json::{Map, Value, json};

use super::guard;
use crate::ports::MarketoPort;
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
