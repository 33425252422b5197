//! Marketo in the simulation: the pipeline's in-memory Marketo (record by record answers, leads
//! found and created by email, roles, companies, sales persons), behind the run's faults. A
//! call may be refused before it is applied, applied with its answer lost, or applied only
//! later, after calls sent after it. Two Sync Leads calls in flight at once that carry one
//! email both create the lead, as Adobe's leads page warns; the oracle then finds two leads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use oppsync_marketo::{CallLedger, LeadRecord, MarketoError, Preflight, RecordOutcome, RoleKey, RoleRecord};
use oppsync_pipeline::MarketoPort;
use oppsync_pipeline::memory::MemoryMarketo;
use serde_json::{Value, json};

use super::faults::{Faults, Port};

/// Marketo as the simulation serves it. Cheap to clone.
#[derive(Clone)]
pub struct SimMarketo {
    pub inner: MemoryMarketo,
    faults: Faults,
    /// The emails of each Sync Leads call in flight, by call.
    creating: Arc<Mutex<BTreeMap<u64, BTreeSet<String>>>>,
    calls: Arc<Mutex<u64>>,
}

impl SimMarketo {
    pub fn new(faults: Faults) -> SimMarketo {
        SimMarketo {
            inner: MemoryMarketo::default(),
            faults,
            creating: Arc::default(),
            calls: Arc::default(),
        }
    }

    /// One call: refused before it is applied, applied now, or applied later with its answer
    /// lost now; then the answer, or its loss.
    async fn send<T, F, Fut>(&self, operation: &'static str, apply: F) -> Result<T, MarketoError>
    where
        F: FnOnce(MemoryMarketo) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, MarketoError>> + Send + 'static,
        T: Send + 'static,
    {
        self.faults.call(Port::Marketo, operation).await?;
        if let Some(after) = self.faults.late() {
            let (inner, faults) = (self.inner.clone(), self.faults.clone());
            faults.trace(format!(
                "Marketo {operation}: answer lost; applied {} s later",
                after.as_secs()
            ));
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = apply(inner).await;
                faults.trace(format!("Marketo {operation}: the late call is applied"));
            });
            return Err(MarketoError::Transport {
                endpoint: operation,
                message: "timed out (a fault the simulation drew; the call will be applied later)".into(),
                timeout: true,
            });
        }
        let answer = apply(self.inner.clone()).await;
        self.faults.answer(Port::Marketo, operation).await?;
        answer
    }

    fn call_number(&self) -> u64 {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        *calls += 1;
        *calls
    }
}

/// A Sync Leads call in flight, until dropped.
struct InFlight {
    creating: Arc<Mutex<BTreeMap<u64, BTreeSet<String>>>>,
    call: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.call);
    }
}

/// Role keys as the trace shows them: the opportunity's number, the lead and the role.
fn short_roles<'a>(keys: impl Iterator<Item = &'a RoleKey>) -> String {
    let shown: Vec<String> = keys
        .map(|k| {
            format!(
                "{}/{}/{}",
                k.external_opportunity_id.trim_start_matches("0b000000-0000-4000-8000-"),
                k.lead_id,
                k.role
            )
        })
        .collect();
    shown.join(" ")
}

impl MarketoPort for SimMarketo {
    async fn sync_opportunities(&self, records: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        let records = records.to_vec();
        self.send("opportunities.sync", move |m| async move {
            m.sync_opportunities(&records).await
        })
        .await
    }

    async fn delete_opportunities(&self, ids: &[String]) -> Result<Vec<RecordOutcome>, MarketoError> {
        let ids = ids.to_vec();
        self.send("opportunities.delete", move |m| async move {
            m.delete_opportunities(&ids).await
        })
        .await
    }

    async fn sync_roles(&self, roles: &[RoleRecord]) -> Result<Vec<RecordOutcome>, MarketoError> {
        self.faults.trace(format!(
            "Marketo roles.sync sent: {}",
            short_roles(roles.iter().map(|r| &r.key))
        ));
        let roles = roles.to_vec();
        self.send("roles.sync", move |m| async move { m.sync_roles(&roles).await })
            .await
    }

    async fn delete_roles(&self, keys: &[RoleKey]) -> Result<Vec<RecordOutcome>, MarketoError> {
        self.faults
            .trace(format!("Marketo roles.delete sent: {}", short_roles(keys.iter())));
        let keys = keys.to_vec();
        self.send("roles.delete", move |m| async move { m.delete_roles(&keys).await })
            .await
    }

    async fn sync_companies(&self, records: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        let records = records.to_vec();
        self.send(
            "companies.sync",
            move |m| async move { m.sync_companies(&records).await },
        )
        .await
    }

    async fn sync_sales_persons(&self, records: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        let records = records.to_vec();
        self.send("salespersons.sync", move |m| async move {
            m.sync_sales_persons(&records).await
        })
        .await
    }

    async fn query_leads(
        &self,
        field: &str,
        values: &[String],
        fields: &[&str],
    ) -> Result<Vec<LeadRecord>, MarketoError> {
        let (field, values) = (field.to_owned(), values.to_vec());
        let fields: Vec<String> = fields.iter().map(|f| (*f).to_owned()).collect();
        self.send("leads.query", move |m| async move {
            let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
            m.query_leads(&field, &values, &fields).await
        })
        .await
    }

    async fn create_leads(&self, lookup_field: &str, leads: &[Value]) -> Result<Vec<RecordOutcome>, MarketoError> {
        let keys: BTreeSet<String> = leads
            .iter()
            .filter_map(|l| l.get(lookup_field)?.as_str().map(str::to_ascii_lowercase))
            .collect();
        // The call is in flight from here until Marketo applies it, or until it is refused or
        // dropped unsent (its process killed): the guard, moved into the call, says which.
        let call = self.call_number();
        let racing: BTreeSet<String> = {
            let mut creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
            let racing = creating
                .values()
                .flat_map(|other| other.intersection(&keys).cloned())
                .collect();
            creating.insert(call, keys);
            racing
        };
        let in_flight = InFlight {
            creating: self.creating.clone(),
            call,
        };
        let (lookup, leads_sent, faults) = (lookup_field.to_owned(), leads.to_vec(), self.faults.clone());
        self.send("leads.sync", move |m| async move {
            let answer = m.create_leads(&lookup, &leads_sent).await;
            drop(in_flight);
            // Another creation of the same email was in flight: each looked the email up
            // before the other created it, so both create.
            for email in racing {
                m.add_lead(json!({ lookup.clone(): email }));
                faults.trace(format!(
                    "Marketo leads.sync: two creations of one email were in flight ({email}): a duplicate lead"
                ));
            }
            answer
        })
        .await
    }

    async fn preflight(&self, fields: &[String]) -> Result<Preflight, MarketoError> {
        let fields = fields.to_vec();
        self.send("preflight", move |m| async move { m.preflight(&fields).await })
            .await
    }

    fn set_calls_today(&self, calls: u64) {
        self.inner.set_calls_today(calls);
    }

    fn count_calls_in(&self, ledger: Arc<dyn CallLedger>) -> bool {
        self.inner.count_calls_in(ledger)
    }

    fn share_limits_with(&self, sharers: usize) {
        self.inner.share_limits_with(sharers);
    }

    fn calls_by_endpoint(&self) -> BTreeMap<&'static str, u64> {
        self.inner.calls_by_endpoint()
    }
}
