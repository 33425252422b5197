//! Opportunities and their roles: the opportunity first, then the roles that name it and its
//! leads.

use super::*;

/// The codes a role gets when its lead does not exist (unconfirmed by the opportunity-roles
/// page: "not found" for a lead, or for the object generally).
const LEAD_GONE_CODES: [&str; 2] = ["1004", "1013"];

/// Error-codes page: 718 "ExternalSalesPersonID not found", a Sync Opportunities call naming a
/// sales person Marketo does not have; the whole call fails.
const SALES_PERSON_NOT_FOUND: &str = "718";

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// The opportunities, then their roles (on the leads already resolved: a role needs its
    /// lead's id).
    pub(crate) async fn write_opportunities_and_roles(
        &self,
        works: &mut [Work],
        leads: Resolved,
        deadline: Option<Instant>,
    ) -> Option<Stop> {
        // Only opportunities whose fields changed since the record's last write.
        let sending = |w: &Work| w.ok() && matches!(w.plan.action, Action::Upsert(_)) && w.sends_opportunity();
        for work in works.iter_mut() {
            work.opportunity_done = !work.sends_opportunity();
        }
        let records_of = |works: &[Work]| -> Vec<Value> {
            works
                .iter()
                .filter(|w| sending(w))
                .filter_map(|w| match &w.plan.action {
                    Action::Upsert(d) => Some(Value::Object(d.opportunity.clone().into_iter().collect())),
                    _ => None,
                })
                .collect()
        };
        let mut records = records_of(works);
        if !records.is_empty() {
            let mut answered = self.marketo.sync_opportunities(&records).await;
            if matches!(&answered, Err(e) if e.code() == SALES_PERSON_NOT_FOUND) {
                // Marketo lacks a sales person the call names: written again, the call once
                // more; a sales person it rejects keeps only its own records back.
                tracing::warn!("Marketo has lost a sales person (718); writing the call's sales persons again");
                if let Some(stop) = self.restore_sales_persons(works, sending).await {
                    return Some(Stop::Marketo(stop));
                }
                records = records_of(works);
                if !records.is_empty() {
                    answered = self.marketo.sync_opportunities(&records).await;
                }
            }
            match answered {
                _ if records.is_empty() => {}
                Ok(outcomes) => {
                    let mut outcomes = outcomes.into_iter();
                    for work in works.iter_mut().filter(|w| sending(w)) {
                        let Some(outcome) = outcomes.next() else { break };
                        work.answers.push(Answer {
                            operation: Operation::OpportunitySync.name(),
                            key: work.plan.opportunity_id.to_string(),
                            outcome: outcome.clone(),
                        });
                        if outcome.is_skipped() {
                            let (error, retryable) = skip_error(Operation::OpportunitySync.name(), &outcome);
                            work.fail(error, retryable);
                        } else {
                            work.touched = true;
                            work.opportunity_done = true;
                            if outcome.marketo_id.is_some() {
                                work.guid = outcome.marketo_id.clone();
                            }
                        }
                    }
                }
                Err(e) if e.code() == SALES_PERSON_NOT_FOUND => {
                    // Still refused with every sales person just written: not these records'
                    // fault, so they stay queued and the next run tries them again.
                    let error = sync_error(Operation::OpportunitySync.name(), e.code(), e.to_string());
                    for work in works.iter_mut().filter(|w| sending(w)) {
                        work.fail(error.clone(), true);
                    }
                }
                Err(e) => {
                    let affected = works.iter_mut().filter(|w| sending(w));
                    if let Some(stop) = Self::call_failed(e, Operation::OpportunitySync.name(), affected) {
                        return Some(Stop::Marketo(stop));
                    }
                }
            }
        }

        if Self::out_of_time(deadline) {
            return Some(Stop::Deadline);
        }

        // Roles of the opportunities just written.
        let mut roles: Vec<RoleRecord> = Vec::new();
        let mut owners: Vec<(usize, ContactId, String)> = Vec::new();
        for (index, work) in works.iter_mut().enumerate() {
            if !work.ok() {
                continue;
            }
            let Action::Upsert(desired) = &work.plan.action else {
                continue;
            };
            let mut soft: Option<SyncError> = None;
            let mut hard: Option<(SyncError, bool)> = None;
            let mut waiting: Option<SyncError> = None;
            for role in &desired.roles {
                if !work.sends_role(role.contact, &role.role) {
                    // In Marketo as planned since the record's last write.
                    continue;
                }
                match leads.by_contact.get(&role.contact) {
                    Some(LeadId::Found(lead_id)) => {
                        roles.push(RoleRecord {
                            key: RoleKey {
                                external_opportunity_id: work.plan.opportunity_id.to_string(),
                                lead_id: *lead_id,
                                role: role.role.clone(),
                            },
                            is_primary: role.is_primary,
                        });
                        owners.push((index, role.contact, role.role.clone()));
                    }
                    Some(LeadId::Duplicate(ids)) => {
                        soft.get_or_insert_with(|| {
                            sync_error(
                                Operation::LeadQuery.name(),
                                "duplicate-lead",
                                format!(
                                    "contact {} matches {} Marketo leads (ids {}); merge them in Marketo, then resync this opportunity",
                                    role.contact,
                                    ids.len(),
                                    ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                                ),
                            )
                        });
                    }
                    Some(LeadId::Failed(error, retryable)) => {
                        hard.get_or_insert_with(|| (error.clone(), *retryable));
                    }
                    Some(LeadId::Waiting(error)) => {
                        waiting.get_or_insert_with(|| error.clone());
                    }
                    Some(LeadId::Missing) | None => {
                        tracing::info!(
                            opportunity = %work.plan.opportunity_id, contact = %role.contact,
                            "no Marketo lead for this contact and leads are not created; role left out"
                        );
                    }
                }
            }
            if let Some(error) = soft {
                work.soft_error.get_or_insert(error);
            }
            if hard.is_none()
                && let Some(error) = waiting
            {
                // Not this record's fault: it waits without counting an attempt.
                work.pause(error);
            }
            if let Some((error, retryable)) = hard {
                work.fail(error, retryable);
            }
            if !work.ok() {
                owners.retain(|(i, _, _)| *i != index);
                let key = work.plan.opportunity_id.to_string();
                roles.retain(|r| r.key.external_opportunity_id != key);
            }
        }
        if roles.is_empty() {
            return None;
        }
        // Recorded before they are sent, under the claim: a role Marketo accepts is never
        // unknown to the state, whatever happens to this write afterwards. A record whose claim
        // is gone sends nothing more.
        let lost = self.record_planned(works, &roles, &owners).await;
        if !lost.is_empty() {
            let keep: Vec<bool> = owners.iter().map(|(i, _, _)| !lost.contains(i)).collect();
            let mut keep_roles = keep.iter();
            roles.retain(|_| *keep_roles.next().unwrap_or(&true));
            owners.retain(|(i, _, _)| !lost.contains(i));
            if roles.is_empty() {
                return None;
            }
        }
        let mut gone: Vec<String> = Vec::new();
        let stop = match self.marketo.sync_roles(&roles).await {
            Ok(outcomes) => {
                for ((index, contact, role), (record, outcome)) in owners.into_iter().zip(roles.iter().zip(outcomes)) {
                    let work = &mut works[index];
                    work.answers.push(Answer {
                        operation: Operation::RoleSync.name(),
                        key: format!(
                            "{}/{}/{}",
                            record.key.external_opportunity_id, record.key.lead_id, record.key.role
                        ),
                        outcome: outcome.clone(),
                    });
                    if outcome.is_skipped() {
                        let (error, mut retryable) = skip_error(Operation::RoleSync.name(), &outcome);
                        // The opportunity, not sent because unchanged, is gone from Marketo (a
                        // user deleted it): the next try sends everything.
                        if outcome.code() == Some(NOT_FOUND) && !work.sends_opportunity() {
                            retryable = true;
                            // Its roles went with it: the next try sends the opportunity and
                            // every role.
                            work.opportunity_done = false;
                            work.in_marketo.clear();
                        }
                        // A remembered lead Marketo no longer has (deleted, merged away): forget
                        // it, and the next try finds or creates the contact's lead again.
                        if outcome.code().is_some_and(|c| LEAD_GONE_CODES.contains(&c))
                            && let Some(name) = leads.remembered.get(&record.key.lead_id)
                        {
                            gone.push(name.clone());
                            retryable = true;
                        }
                        work.fail(error, retryable);
                    } else {
                        work.touched = true;
                        work.role_sent(contact, &role);
                        // The role was on another lead before: that one goes (deletions step).
                        if let Some(Some(old)) = work.roles.insert((contact, role), Some(record.key.lead_id))
                            && old != record.key.lead_id
                        {
                            work.replaced.push((
                                contact,
                                RoleKey {
                                    lead_id: old,
                                    ..record.key.clone()
                                },
                            ));
                        }
                    }
                }
                None
            }
            Err(e) => {
                let involved: BTreeSet<usize> = owners.iter().map(|(i, _, _)| *i).collect();
                let affected = works
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| involved.contains(i))
                    .map(|(_, w)| w);
                Self::call_failed(e, Operation::RoleSync.name(), affected).map(Stop::Marketo)
            }
        };
        self.forget_leads(&gone).await;
        stop
    }

    /// Records each record's roles about to be sent (with what was planned before and not yet
    /// recorded as written), extending its claim. Returns the records whose claim was lost.
    async fn record_planned(
        &self,
        works: &mut [Work],
        roles: &[RoleRecord],
        owners: &[(usize, ContactId, String)],
    ) -> BTreeSet<usize> {
        let ttl = i64::from(self.config.sync.claim_ttl_seconds) * 1000;
        let now = self.now();
        let mut planned: BTreeMap<usize, Vec<WrittenRole>> = BTreeMap::new();
        for ((index, contact, role), record) in owners.iter().zip(roles) {
            planned.entry(*index).or_default().push(WrittenRole {
                contact: *contact,
                role: role.clone(),
                lead_id: Some(record.key.lead_id),
            });
        }
        let calls = planned.into_iter().map(|(index, mut sending)| {
            let work = &works[index];
            sending.extend(work.state.planned.iter().cloned());
            sending.sort();
            sending.dedup();
            let claim = work.claim.clone();
            async move {
                let recorded = self.store.record_planned(&claim, &sending, ttl, now).await;
                (index, recorded, sending)
            }
        });
        let mut lost = BTreeSet::new();
        for (index, recorded, sending) in overlapped(calls).await {
            let work = &mut works[index];
            match recorded {
                Ok(Some(claim)) => {
                    work.claim = claim;
                    work.planned = sending;
                }
                Ok(None) => {
                    work.lost = true;
                    work.fail(
                        sync_error(
                            "write",
                            "superseded",
                            "another worker took this record during the write",
                        ),
                        true,
                    );
                    lost.insert(index);
                }
                Err(e) => {
                    // Not recorded: not sent either, so nothing can be orphaned.
                    work.fail(sync_error("write", "state", e.to_string()), e.is_retryable());
                    lost.insert(index);
                }
            }
        }
        lost
    }
}
