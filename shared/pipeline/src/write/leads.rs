//! Leads: each role's contact resolved to its Marketo lead (looked up, created when allowed).

use super::*;

/// A contact's Marketo lead, as resolved for one write batch.
#[derive(Debug, Clone)]
pub(crate) enum LeadId {
    Found(i64),
    /// Several leads match: which one is meant is not ours to guess.
    Duplicate(Vec<i64>),
    /// No lead, and the configuration says not to create one.
    Missing,
    /// Creating it failed.
    Failed(SyncError, bool),
    /// Another writer is creating it (or just did): the record waits, no attempt counted.
    Waiting(SyncError),
}

/// How long a lead key stays locked after its creation was sent: the call's own time and a
/// settling time, so no second creation with the same email follows in quick succession.
pub(crate) const LEAD_LOCK_MS: i64 = 60_000;

/// The code a record waiting for another writer's lead creation carries.
pub(crate) const LEAD_LOCKED_CODE: &str = "lead-being-created";

/// The locks taken for one creation call, to free those whose lead was not created.
struct LeadLocks {
    /// Lock name by lead key.
    names: HashMap<String, String>,
    at: Millis,
}

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// Finds (or creates) the leads the batch's roles need.
    pub(crate) async fn resolve_leads(&self, works: &mut [Work]) -> Result<HashMap<ContactId, LeadId>, MarketoError> {
        let mapping = &self.config.mapping;
        // The key each contact is looked up by: its email, or its contact id in a custom field.
        let (field, key_of): (&str, fn(&oppsync_mapping::Lead) -> Option<String>) = match &mapping.lead_match {
            LeadMatch::Email => ("email", |l| l.email.as_ref().map(|e| e.trim().to_ascii_lowercase())),
            LeadMatch::Field(f) => (f.as_str(), |l| Some(l.contact.to_string())),
        };
        let mut leads: BTreeMap<String, oppsync_mapping::Lead> = BTreeMap::new();
        let mut contact_key: HashMap<ContactId, String> = HashMap::new();
        for work in works.iter().filter(|w| w.ok()) {
            if let Action::Upsert(desired) = &work.plan.action {
                for lead in &desired.leads {
                    if let Some(key) = key_of(lead) {
                        contact_key.insert(lead.contact, key.clone());
                        leads.entry(key).or_insert_with(|| lead.clone());
                    }
                }
            }
        }
        let mut resolved: HashMap<ContactId, LeadId> = HashMap::new();
        if leads.is_empty() {
            return Ok(resolved);
        }
        let keys: Vec<String> = leads.keys().cloned().collect();
        let mut found: HashMap<String, Vec<i64>> = HashMap::new();
        for record in self.marketo.query_leads(field, &keys, &[]).await? {
            let value = match record.fields.get(field) {
                Some(Value::String(s)) => s.trim().to_ascii_lowercase(),
                Some(other) => other.to_string(),
                None => continue,
            };
            found.entry(value).or_default().push(record.id);
        }
        let missing: Vec<&oppsync_mapping::Lead> = keys
            .iter()
            .filter(|k| !found.contains_key(*k))
            .filter_map(|k| leads.get(k))
            .collect();
        let mut created: HashMap<String, LeadId> = HashMap::new();
        // One creation per email at a time across every writer, and none in quick succession:
        // Adobe's leads page warns that concurrent upserts with one key can create duplicate
        // leads. A lead another writer is creating now waits for a later try, when the lookup
        // finds it.
        let (missing, locks) = if mapping.create_missing_leads && !missing.is_empty() {
            let (free, held, locks) = self.lock_lead_keys(field, missing, key_of).await;
            for (key, error) in held {
                created.insert(key, error);
            }
            (free, Some(locks))
        } else {
            (missing, None)
        };
        if mapping.create_missing_leads && !missing.is_empty() {
            let records: Vec<Value> = missing
                .iter()
                .map(|lead| {
                    let mut r = serde_json::Map::new();
                    if let LeadMatch::Field(f) = &mapping.lead_match {
                        r.insert(f.clone(), Value::String(lead.contact.to_string()));
                    }
                    if let Some(email) = &lead.email {
                        r.insert("email".into(), Value::String(email.clone()));
                    }
                    if let Some(first) = &lead.first_name {
                        r.insert("firstName".into(), Value::String(first.clone()));
                    }
                    if let Some(last) = &lead.last_name {
                        r.insert("lastName".into(), Value::String(last.clone()));
                    }
                    Value::Object(r)
                })
                .collect();
            let outcomes = match self.marketo.upsert_leads(field, &records).await {
                Ok(outcomes) => outcomes,
                Err(e) => {
                    // Nothing known to be created: the keys are free for the next try.
                    let keys: Vec<String> = missing.iter().filter_map(|l| key_of(l)).collect();
                    self.unlock_lead_keys(locks.as_ref(), &keys).await;
                    return Err(e);
                }
            };
            let mut not_created: Vec<String> = Vec::new();
            for (lead, outcome) in missing.iter().zip(outcomes) {
                let Some(key) = key_of(lead) else { continue };
                let id = if outcome.is_skipped() {
                    let (error, retryable) = skip_error(Operation::LeadSync.name(), &outcome);
                    not_created.push(key.clone());
                    LeadId::Failed(error, retryable)
                } else {
                    match outcome.marketo_id.as_deref().and_then(|t| t.parse::<i64>().ok()) {
                        Some(id) => LeadId::Found(id),
                        None => LeadId::Failed(
                            sync_error(
                                Operation::LeadSync.name(),
                                "no-id",
                                "Marketo created a lead without returning its id",
                            ),
                            true,
                        ),
                    }
                };
                created.insert(key, id);
            }
            self.unlock_lead_keys(locks.as_ref(), &not_created).await;
        }
        for (contact, key) in contact_key {
            let id = match found.get(&key) {
                Some(ids) if ids.len() == 1 => LeadId::Found(ids[0]),
                Some(ids) => LeadId::Duplicate(ids.clone()),
                None => created.get(&key).cloned().unwrap_or(LeadId::Missing),
            };
            resolved.insert(contact, id);
        }
        Ok(resolved)
    }

    /// Locks the lead keys about to be created; returns the leads whose key was taken, the
    /// resolution of those it could not take (another writer holds it: wait; the store
    /// failed: retry), and the locks taken.
    async fn lock_lead_keys<'l>(
        &self,
        field: &str,
        missing: Vec<&'l oppsync_mapping::Lead>,
        key_of: fn(&oppsync_mapping::Lead) -> Option<String>,
    ) -> (Vec<&'l oppsync_mapping::Lead>, Vec<(String, LeadId)>, LeadLocks) {
        let keys: Vec<String> = missing.iter().map(|l| key_of(l).unwrap_or_default()).collect();
        // Hashed: the state store never holds an email address.
        let names: Vec<String> = keys
            .iter()
            .map(|k| {
                format!(
                    "lead#{:032x}",
                    xxhash_rust::xxh3::xxh3_128(format!("{field}\0{k}").as_bytes())
                )
            })
            .collect();
        let at = self.now();
        let mut locks = LeadLocks {
            names: HashMap::new(),
            at,
        };
        let taken = match self.store.lock(&names, LEAD_LOCK_MS, at).await {
            Ok(taken) => taken,
            Err(e) => {
                let error = sync_error(Operation::LeadSync.name(), "state", e.to_string());
                let retry = LeadId::Failed(error, e.is_retryable());
                return (
                    Vec::new(),
                    keys.into_iter().map(|k| (k, retry.clone())).collect(),
                    locks,
                );
            }
        };
        let mut free = Vec::new();
        let mut held = Vec::new();
        for (((lead, key), name), taken) in missing.into_iter().zip(keys).zip(names).zip(taken) {
            if taken {
                free.push(lead);
                locks.names.insert(key, name);
            } else {
                held.push((
                    key,
                    LeadId::Waiting(sync_error(
                        Operation::LeadSync.name(),
                        LEAD_LOCKED_CODE,
                        "another writer is creating (or just created) the Marketo lead for a contact of this opportunity; it is tried again once that settles",
                    )),
                ));
            }
        }
        (free, held, locks)
    }

    /// Frees the locks of leads that were not created (best effort: a lock left expires).
    async fn unlock_lead_keys(&self, locks: Option<&LeadLocks>, keys: &[String]) {
        let Some(locks) = locks else { return };
        let names: Vec<String> = keys.iter().filter_map(|k| locks.names.get(k).cloned()).collect();
        if names.is_empty() {
            return;
        }
        if let Err(e) = self.store.unlock(&names, LEAD_LOCK_MS, locks.at).await {
            tracing::warn!(error = %e, "could not free lead locks; they expire by themselves");
        }
    }
}
