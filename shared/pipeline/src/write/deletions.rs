//! Deletions: roles no longer planned, then opportunities deleted or filtered out in Dynamics.

use super::*;

/// What a deleted role's record forgets.
enum Forget {
    /// A role no longer planned: its (contact, role).
    Role(ContactId, String),
    /// A replaced role, on a lead the contact no longer maps to.
    Replaced(ContactId, RoleKey),
}

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    pub(crate) async fn delete_roles(&self, works: &mut [Work]) -> Option<MarketoError> {
        let mut keys = Vec::new();
        // Whose key each is, and what it forgets once deleted.
        let mut owners: Vec<(usize, Forget)> = Vec::new();
        for (index, work) in works.iter_mut().enumerate() {
            if !work.ok() {
                continue;
            }
            // A replaced role whose lead is the contact's lead again is the current one.
            let current = |(contact, key): &(ContactId, RoleKey)| {
                work.roles.get(&(*contact, key.role.clone())) == Some(&Some(key.lead_id))
            };
            let replaced: Vec<(ContactId, RoleKey)> = work.replaced.iter().filter(|r| !current(r)).cloned().collect();
            work.replaced.retain(|r| !current(r));
            for (contact, key) in replaced {
                keys.push(key.clone());
                owners.push((index, Forget::Replaced(contact, key)));
            }
            for gone in &work.plan.role_deletions {
                // The lead id recorded when the role was written; fall back to the one in state.
                let lead = gone
                    .lead_id
                    .or_else(|| work.roles.get(&(gone.contact, gone.role.clone())).copied().flatten());
                match lead {
                    Some(lead_id) => {
                        keys.push(RoleKey {
                            external_opportunity_id: work.plan.opportunity_id.to_string(),
                            lead_id,
                            role: gone.role.clone(),
                        });
                        owners.push((index, Forget::Role(gone.contact, gone.role.clone())));
                    }
                    None => {
                        tracing::warn!(
                            opportunity = %work.plan.opportunity_id, contact = %gone.contact,
                            "a removed role whose Marketo lead is unknown cannot be deleted; forgotten"
                        );
                        work.roles.remove(&(gone.contact, gone.role.clone()));
                    }
                }
            }
        }
        if keys.is_empty() {
            return None;
        }
        match self.marketo.delete_roles(&keys).await {
            Ok(outcomes) => {
                for ((index, forget), (key, outcome)) in owners.into_iter().zip(keys.iter().zip(outcomes)) {
                    let work = &mut works[index];
                    work.answers.push(Answer {
                        operation: Operation::RoleDelete.name(),
                        key: format!("{}/{}/{}", key.external_opportunity_id, key.lead_id, key.role),
                        outcome: outcome.clone(),
                    });
                    // Already gone is as good as deleted.
                    if outcome.is_skipped() && outcome.code() != Some(NOT_FOUND) {
                        let (error, retryable) = skip_error(Operation::RoleDelete.name(), &outcome);
                        work.fail(error, retryable);
                    } else {
                        work.touched = true;
                        match forget {
                            Forget::Role(contact, role) => {
                                work.roles.remove(&(contact, role));
                            }
                            Forget::Replaced(contact, key) => work.replaced.retain(|r| *r != (contact, key.clone())),
                        }
                    }
                }
                None
            }
            Err(e) => {
                let involved: BTreeSet<usize> = owners.iter().map(|(i, _)| *i).collect();
                let affected = works
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| involved.contains(i))
                    .map(|(_, w)| w);
                Self::call_failed(e, Operation::RoleDelete.name(), affected)
            }
        }
    }

    pub(crate) async fn delete_opportunities(&self, works: &mut [Work]) -> Option<MarketoError> {
        let ids: Vec<String> = works
            .iter()
            .filter(|w| w.ok() && matches!(w.plan.action, Action::Delete))
            .map(|w| w.plan.opportunity_id.to_string())
            .collect();
        if ids.is_empty() {
            return None;
        }
        match self.marketo.delete_opportunities(&ids).await {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                for work in works
                    .iter_mut()
                    .filter(|w| w.ok() && matches!(w.plan.action, Action::Delete))
                {
                    let Some(outcome) = outcomes.next() else { break };
                    work.answers.push(Answer {
                        operation: Operation::OpportunityDelete.name(),
                        key: work.plan.opportunity_id.to_string(),
                        outcome: outcome.clone(),
                    });
                    if outcome.is_skipped() && outcome.code() != Some(NOT_FOUND) {
                        let (error, retryable) = skip_error(Operation::OpportunityDelete.name(), &outcome);
                        work.fail(error, retryable);
                    } else {
                        work.touched = true;
                        work.guid = None;
                    }
                }
                None
            }
            Err(e) => {
                let affected = works
                    .iter_mut()
                    .filter(|w| w.ok() && matches!(w.plan.action, Action::Delete));
                Self::call_failed(e, Operation::OpportunityDelete.name(), affected)
            }
        }
    }
}
