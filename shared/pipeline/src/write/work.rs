//! One record during a write: what it has to send, what Marketo answered, and what is recorded
//! for it after the calls ([`Pipeline::finish`]).

use super::*;

/// Per-record bookkeeping during a write.
pub(crate) struct Work {
    pub(crate) claim: Claim,
    pub(crate) state: OpportunityState,
    pub(crate) plan: Plan,
    /// The first error met; later steps skip the record.
    pub(crate) error: Option<(SyncError, bool)>,
    /// The error came from a stop of the whole run (quota, budget, credentials, the deadline),
    /// not from the record: it waits without counting an attempt.
    pub(crate) paused: bool,
    /// The error came from a whole call that failed retryably (a 5xx, a lost answer, 606,
    /// 615): Marketo's trouble, not the record's. It waits like a retry but counts no attempt,
    /// so an outage longer than `max_attempts` tries never fails the backlog.
    pub(crate) call_failed: bool,
    /// Another worker took the record during the write (a newer version, an expired claim).
    pub(crate) lost: bool,
    /// An error that does not stop the other writes (a duplicate lead), recorded at the end.
    pub(crate) soft_error: Option<SyncError>,
    pub(crate) roles: RoleLeads,
    /// Roles on a lead the contact no longer maps to (its email changed, its leads were
    /// merged), with the contact: the role on the current lead replaced them, so they are
    /// deleted in the same write. Until deleted they are recorded with what was written (a
    /// refused role, a failed delete or the deadline cannot make them forgotten), and the next
    /// write finds them again (see [`roles_in_marketo`]).
    pub(crate) replaced: Vec<(ContactId, RoleKey)>,
    pub(crate) guid: Option<String>,
    /// The plan's parts, hashed (an upsert's).
    pub(crate) parts: Option<sent::Parts>,
    /// What the last complete write left in Marketo; none when everything is sent.
    pub(crate) previous: Option<oppsync_state::Sent>,
    /// Hashes of the planned roles now in Marketo as planned.
    pub(crate) in_marketo: BTreeSet<u64>,
    pub(crate) company_done: bool,
    pub(crate) sales_person_done: bool,
    /// The opportunity is in Marketo as planned (written by this try, or unchanged since the
    /// last): a retry need not send it again.
    pub(crate) opportunity_done: bool,
    pub(crate) touched: bool,
    /// The roles this write recorded as planned before sending them: until a completed write
    /// records what Marketo holds, Marketo may hold any of them (a send that failed or lost
    /// its answer), so a write that does not complete records them with what was written.
    pub(crate) planned: Vec<WrittenRole>,
    pub(crate) answers: Vec<Answer>,
}

impl Work {
    pub(crate) fn fail(&mut self, error: SyncError, retryable: bool) {
        if self.error.is_none() {
            self.error = Some((error, retryable));
        }
    }
    pub(crate) fn ok(&self) -> bool {
        self.error.is_none()
    }
    pub(crate) fn pause(&mut self, error: SyncError) {
        if self.error.is_none() {
            self.error = Some((error, true));
            self.paused = true;
        }
    }
}

/// Each (contact, role) with the lead its role is on.
pub(crate) type RoleLeads = BTreeMap<(ContactId, String), Option<i64>>;

/// What Marketo may hold of a record's roles: those written, and those planned by a write that
/// never recorded its outcome, by (contact, role), with the lead each is on. A (contact, role)
/// recorded on more than one lead (a replaced role not yet deleted) keeps the last one, the
/// newest (planned roles come after written ones, and a record lists its replaced roles
/// first), and the others are to be deleted.
pub(crate) fn roles_in_marketo(state: &OpportunityState) -> (RoleLeads, Vec<(ContactId, RoleKey)>) {
    let mut roles = RoleLeads::new();
    let mut replaced = Vec::new();
    let every = state
        .written
        .iter()
        .flat_map(|w| w.roles.iter())
        .chain(state.planned.iter());
    for r in every {
        if let Some(Some(old)) = roles.insert((r.contact, r.role.clone()), r.lead_id)
            && Some(old) != r.lead_id
        {
            replaced.push((
                r.contact,
                RoleKey {
                    external_opportunity_id: state.id.to_string(),
                    lead_id: old,
                    role: r.role.clone(),
                },
            ));
        }
    }
    replaced.sort_by(|a, b| (a.0, &a.1.role, a.1.lead_id).cmp(&(b.0, &b.1.role, b.1.lead_id)));
    replaced.dedup();
    // A lead recorded twice is one role, and the current one is no replaced one.
    replaced.retain(|(contact, key)| roles.get(&(*contact, key.role.clone())) != Some(&Some(key.lead_id)));
    (roles, replaced)
}

/// The wait before the next try of a record whose write failed retryably `attempts` times:
/// 30 s, doubling, at most 15 minutes.
pub(crate) fn backoff_ms(attempts: u32) -> i64 {
    let doublings = attempts.saturating_sub(1).min(5);
    (30_000_i64 << doublings).min(15 * 60_000)
}

/// How long records wait after a stop that Marketo or the credentials caused: long enough not
/// to cycle, short enough that a fixed secret or a new quota day is noticed soon.
pub(crate) const PAUSE_AFTER_STOP_MS: i64 = 15 * 60_000;

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// What to record for one record after the calls.
    pub(crate) fn finish(&self, work: &Work, backoff: bool) -> (WriteResult, Wrote) {
        let deleting = matches!(work.plan.action, Action::Delete);
        let previous = work.state.written.as_ref();
        // Replaced roles first: of a (contact, role) recorded on two leads, the last is the
        // current one (see `roles_in_marketo`).
        let roles: Vec<WrittenRole> = work
            .replaced
            .iter()
            .map(|(contact, key)| WrittenRole {
                contact: *contact,
                role: key.role.clone(),
                lead_id: Some(key.lead_id),
            })
            .chain(work.roles.iter().map(|((contact, role), lead_id)| WrittenRole {
                contact: *contact,
                role: role.clone(),
                lead_id: *lead_id,
            }))
            .collect();
        let written = |hash: PlanHash, deleted: bool, complete: bool| Written {
            version: work.plan.source_version.unwrap_or(work.claim.version),
            hash,
            marketo_guid: if deleted { None } else { work.guid.clone() },
            company: match &work.plan.action {
                Action::Upsert(d) if work.company_done => d.company.as_ref().map(|c| c.external_company_id),
                _ => previous.and_then(|w| w.company),
            },
            roles: roles.clone(),
            deleted,
            at: self.now(),
            // A complete write says what Marketo holds part by part; a partial one what got
            // through, so a retry sends only the rest.
            sent: match &work.parts {
                Some(parts) if !deleted => Some(if complete {
                    parts.sent(&work.in_marketo)
                } else {
                    parts.partly_sent(work)
                }),
                _ => None,
            },
        };
        let failure: Option<(&SyncError, bool)> = match (&work.error, &work.soft_error) {
            (Some((error, retryable)), _) => Some((error, *retryable)),
            (None, Some(error)) => Some((error, false)),
            (None, None) => None,
        };
        let Some((error, retryable)) = failure else {
            return (
                WriteResult::Synced(written(work.plan.hash, deleting, true)),
                if deleting { Wrote::Deleted } else { Wrote::Synced },
            );
        };
        // Record what did get written, and the roles planned and perhaps sent (newest last, so
        // a role on a new lead reads back as the current one), so later plans delete the right
        // roles; keep the old hash so the record is never mistaken for synced.
        let partial =
            (work.touched || previous.is_some() || !work.state.planned.is_empty() || !work.planned.is_empty()).then(
                || {
                    let mut partial = written(
                        previous.map_or(PlanHash(0), |w| w.hash),
                        previous.is_some_and(|w| w.deleted),
                        false,
                    );
                    for role in &work.planned {
                        if !partial.roles.contains(role) {
                            partial.roles.push(role.clone());
                        }
                    }
                    partial
                },
            );
        let now = self.now();
        if retryable && work.paused {
            let until = if error.code == DEADLINE_CODE || !backoff {
                now
            } else if error.code == leads::LEAD_LOCKED_CODE {
                now + leads::LEAD_LOCK_MS
            } else {
                now + PAUSE_AFTER_STOP_MS
            };
            (
                WriteResult::Paused {
                    error: error.clone(),
                    written: partial,
                    until,
                },
                Wrote::Retry { error: error.clone() },
            )
        } else if retryable && work.call_failed {
            // Marketo's trouble, not the record's: no attempt counted, the first retry's wait.
            (
                WriteResult::Paused {
                    error: error.clone(),
                    written: partial,
                    until: if backoff { now + backoff_ms(1) } else { now },
                },
                Wrote::Retry { error: error.clone() },
            )
        } else if retryable && work.state.attempts + 1 < self.config.sync.max_attempts {
            (
                WriteResult::Retry {
                    error: error.clone(),
                    written: partial,
                    retry_at: if backoff {
                        now + backoff_ms(work.state.attempts + 1)
                    } else {
                        now
                    },
                },
                Wrote::Retry { error: error.clone() },
            )
        } else if retryable {
            // Past the cap: a failure for good, with the last error, in the ledger.
            let error = SyncError {
                message: format!(
                    "gave up after {} attempts ([sync] max_attempts); the last: {}",
                    work.state.attempts + 1,
                    error.message
                ),
                ..error.clone()
            };
            (
                WriteResult::Failed {
                    error: error.clone(),
                    written: partial,
                },
                Wrote::Failed { error },
            )
        } else {
            (
                WriteResult::Failed {
                    error: error.clone(),
                    written: partial,
                },
                Wrote::Failed { error: error.clone() },
            )
        }
    }
}

pub(crate) fn sales_person_of(work: &Work) -> Option<&SalesPerson> {
    match &work.plan.action {
        Action::Upsert(d) => d.sales_person.as_ref(),
        _ => None,
    }
}

pub(crate) fn company_of(work: &Work) -> Option<String> {
    match &work.plan.action {
        Action::Upsert(d) => d.company.as_ref().map(|c| c.external_company_id.to_string()),
        _ => None,
    }
}
