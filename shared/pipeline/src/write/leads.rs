//! Leads: each role's contact resolved to its Marketo lead: remembered from an earlier write,
//! else created when allowed (an existing lead is never changed), else looked up.

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

/// A batch's contacts resolved to leads.
#[derive(Debug, Default)]
pub(crate) struct Resolved {
    pub(crate) by_contact: HashMap<ContactId, LeadId>,
    /// The store key of each lead id the store remembered: forgotten when Marketo says the lead
    /// is gone (deleted, merged away), so the next try looks it up again.
    pub(crate) remembered: HashMap<i64, String>,
}

/// Sync Leads `createOnly` skips a lead that exists with 1005, or 1007 when several match
/// (error-codes page): such a key is looked up instead.
const EXISTS_CODES: [&str; 2] = ["1005", "1007"];

/// The locks taken for one creation call, to free those whose lead was not created.
struct LeadLocks {
    /// Lock name by lead key.
    names: HashMap<String, String>,
    at: Millis,
}

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// Finds (or creates) the leads the batch's roles need, in as few calls as the docs allow:
    /// none for a contact whose lead is remembered; for the rest one `createOnly` call, which
    /// returns the id of every lead it creates and leaves an existing lead untouched, then one
    /// lookup of those that existed (which also finds an email's duplicates). Without creation,
    /// one lookup.
    pub(crate) async fn resolve_leads(&self, works: &mut [Work]) -> Result<Resolved, MarketoError> {
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
                // Only the leads of roles this write sends.
                let needed: BTreeSet<ContactId> = desired
                    .roles
                    .iter()
                    .filter(|r| work.sends_role(r.contact, &r.role))
                    .map(|r| r.contact)
                    .collect();
                for lead in desired.leads.iter().filter(|l| needed.contains(&l.contact)) {
                    if let Some(key) = key_of(lead) {
                        contact_key.insert(lead.contact, key.clone());
                        leads.entry(key).or_insert_with(|| lead.clone());
                    }
                }
            }
        }
        let mut resolved = Resolved::default();
        if leads.is_empty() {
            return Ok(resolved);
        }
        // Hashed: the state store never holds an email address.
        let names: HashMap<String, String> = leads.keys().map(|k| (k.clone(), lead_name(field, k))).collect();
        let mut found: HashMap<String, Vec<i64>> = HashMap::new();
        let listed: Vec<String> = names.values().cloned().collect();
        match self.store.known_leads(&listed).await {
            Ok(known) => {
                for (key, name) in &names {
                    if let Some(id) = known.get(name) {
                        found.insert(key.clone(), vec![*id]);
                        resolved.remembered.insert(*id, name.clone());
                    }
                }
            }
            // Only a saving lost: the leads are resolved through Marketo.
            Err(e) => tracing::warn!(error = %e, "could not read the remembered leads; resolving them in Marketo"),
        }
        let unknown: Vec<&oppsync_mapping::Lead> = leads
            .iter()
            .filter(|(k, _)| !found.contains_key(*k))
            .map(|(_, l)| l)
            .collect();
        let mut created: HashMap<String, LeadId> = HashMap::new();
        let mut learned: Vec<(String, i64)> = Vec::new();
        let mut to_query: Vec<String> = Vec::new();
        if !mapping.create_missing_leads {
            to_query = unknown.iter().filter_map(|l| key_of(l)).collect();
        } else if !unknown.is_empty() {
            // One creation per email at a time across every writer, and none in quick
            // succession: Adobe's leads page warns that concurrent upserts with one key can
            // create duplicate leads. A lead another writer is creating now waits for a later
            // try, when it is remembered or found.
            let (free, held, locks) = self.lock_lead_keys(&names, unknown, key_of).await;
            created.extend(held);
            if !free.is_empty() {
                let records: Vec<Value> = free.iter().map(|lead| lead_record(mapping, lead)).collect();
                let outcomes = match self.marketo.create_leads(field, &records).await {
                    Ok(outcomes) => outcomes,
                    Err(e) => {
                        // Refused: nothing was created, and the keys are free for the next try.
                        // A call whose answer was lost may have created them: their locks stand
                        // until they expire, so no other try creates them again meanwhile.
                        if !e.may_have_been_applied() {
                            let keys: Vec<String> = free.iter().filter_map(|l| key_of(l)).collect();
                            self.unlock_lead_keys(&locks, &keys).await;
                        }
                        return Err(e);
                    }
                };
                let mut not_created: Vec<String> = Vec::new();
                for (lead, outcome) in free.iter().zip(outcomes) {
                    let Some(key) = key_of(lead) else { continue };
                    if outcome.is_skipped() {
                        not_created.push(key.clone());
                        if outcome.code().is_some_and(|c| EXISTS_CODES.contains(&c)) {
                            // Found by the lookup below; if it is not, this stands.
                            created.insert(
                                key.clone(),
                                LeadId::Failed(
                                    sync_error(
                                        Operation::LeadQuery.name(),
                                        "lead-not-found",
                                        "Marketo said the contact's lead exists, but a lookup did not find it",
                                    ),
                                    true,
                                ),
                            );
                            to_query.push(key);
                        } else {
                            let (error, retryable) = skip_error(Operation::LeadSync.name(), &outcome);
                            created.insert(key, LeadId::Failed(error, retryable));
                        }
                        continue;
                    }
                    let id = match outcome.marketo_id.as_deref().and_then(|t| t.parse::<i64>().ok()) {
                        Some(id) => {
                            learned.push((names[&key].clone(), id));
                            LeadId::Found(id)
                        }
                        None => LeadId::Failed(
                            sync_error(
                                Operation::LeadSync.name(),
                                "no-id",
                                "Marketo created a lead without returning its id",
                            ),
                            true,
                        ),
                    };
                    created.insert(key, id);
                }
                self.unlock_lead_keys(&locks, &not_created).await;
            }
        }
        // Remembered before the lookup, which may fail: the creations stand either way.
        self.remember_leads(&mut learned).await;
        if !to_query.is_empty() {
            for record in self.marketo.query_leads(field, &to_query, &[]).await? {
                let value = match record.fields.get(field) {
                    Some(Value::String(s)) => s.trim().to_ascii_lowercase(),
                    Some(other) => other.to_string(),
                    None => continue,
                };
                found.entry(value).or_default().push(record.id);
            }
            // Only a single match is remembered: duplicates are found again each time, until
            // someone merges them.
            for key in &to_query {
                if let Some([id]) = found.get(key).map(Vec::as_slice) {
                    learned.push((names[key].clone(), *id));
                }
            }
            self.remember_leads(&mut learned).await;
        }
        for (contact, key) in contact_key {
            let id = match found.get(&key) {
                Some(ids) if ids.len() == 1 => LeadId::Found(ids[0]),
                Some(ids) => LeadId::Duplicate(ids.clone()),
                None => created.get(&key).cloned().unwrap_or(LeadId::Missing),
            };
            resolved.by_contact.insert(contact, id);
        }
        Ok(resolved)
    }

    /// Best effort: a lead not remembered is resolved through Marketo next time.
    async fn remember_leads(&self, learned: &mut Vec<(String, i64)>) {
        if learned.is_empty() {
            return;
        }
        if let Err(e) = self.store.remember_leads(learned).await {
            tracing::warn!(error = %e, "could not remember leads; they are resolved through Marketo next time");
        }
        learned.clear();
    }

    /// Forgets remembered leads Marketo no longer has (best effort: a stale one fails its role
    /// again and is forgotten then).
    pub(crate) async fn forget_leads(&self, names: &[String]) {
        if names.is_empty() {
            return;
        }
        if let Err(e) = self.store.forget_leads(names).await {
            tracing::warn!(error = %e, "could not forget leads Marketo no longer has");
        }
    }

    /// Locks the lead keys about to be created; returns the leads whose key was taken, the
    /// resolution of those it could not take (another writer holds it: wait; the store
    /// failed: retry), and the locks taken.
    async fn lock_lead_keys<'l>(
        &self,
        names: &HashMap<String, String>,
        missing: Vec<&'l oppsync_mapping::Lead>,
        key_of: fn(&oppsync_mapping::Lead) -> Option<String>,
    ) -> (Vec<&'l oppsync_mapping::Lead>, Vec<(String, LeadId)>, LeadLocks) {
        let keys: Vec<String> = missing.iter().map(|l| key_of(l).unwrap_or_default()).collect();
        let names: Vec<String> = keys.iter().map(|k| names.get(k).cloned().unwrap_or_default()).collect();
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
    async fn unlock_lead_keys(&self, locks: &LeadLocks, keys: &[String]) {
        let names: Vec<String> = keys.iter().filter_map(|k| locks.names.get(k).cloned()).collect();
        if names.is_empty() {
            return;
        }
        if let Err(e) = self.store.unlock(&names, LEAD_LOCK_MS, locks.at).await {
            tracing::warn!(error = %e, "could not free lead locks; they expire by themselves");
        }
    }
}

/// A lead key's name in the state store (locks, remembered ids): a hash, so no email is stored.
fn lead_name(field: &str, key: &str) -> String {
    format!(
        "lead#{:032x}",
        xxhash_rust::xxh3::xxh3_128(format!("{field}\0{key}").as_bytes())
    )
}

/// The Sync Leads record that creates a contact's lead: its key, email and names.
fn lead_record(mapping: &oppsync_mapping::Mapping, lead: &oppsync_mapping::Lead) -> Value {
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
}
