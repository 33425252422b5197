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
            let outcomes = self.marketo.upsert_leads(field, &records).await?;
            for (lead, outcome) in missing.iter().zip(outcomes) {
                let Some(key) = key_of(lead) else { continue };
                let id = if outcome.is_skipped() {
                    let (error, retryable) = skip_error(Operation::LeadSync.name(), &outcome);
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
}
