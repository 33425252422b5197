//! The write: ready plans go to Marketo in as few calls as the 300-record limit allows, in
//! dependency order (companies, sales persons, leads, opportunities and roles, role and opportunity
//! deletions; one file each), and each record's outcome is recorded.

mod companies;
mod deletions;
mod leads;
mod opportunities;
mod sales_persons;
mod sent;

use leads::{LeadId, Resolved};

use super::*;

/// Marketo's answer for one record of one call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer {
    /// `companies`, `leads`, `opportunities`, `roles`, `role_deletions`, `opportunity_deletions`.
    pub operation: &'static str,
    /// The record's key in that call.
    pub key: String,
    pub outcome: RecordOutcome,
}

/// How one record's write ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Wrote {
    Synced,
    Deleted,
    /// A retryable failure: the record stays ready.
    Retry {
        error: SyncError,
    },
    /// A permanent failure, in the error ledger.
    Failed {
        error: SyncError,
    },
    NotClaimed,
    /// A newer version arrived during the write; what was written is recorded and the newer
    /// version will be written next.
    Superseded,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WriteRecord {
    pub id: OpportunityId,
    #[serde(flatten)]
    pub result: Wrote,
    pub answers: Vec<Answer>,
}

/// What a write batch did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WriteReport {
    pub records: Vec<WriteRecord>,
    /// Why writing stopped early (quota, budget, credentials), if it did.
    pub stopped: Option<String>,
    /// The stop will not pass by itself (credentials refused, an instance that runs Marketo's
    /// native CRM sync): someone must fix something. False for the quota and the budget.
    pub stopped_for_good: bool,
    pub marketo_calls: u64,
    #[serde(skip)]
    pub metrics: Metrics,
}

impl WriteReport {
    /// Records to hand back for retry (Lambda `batchItemFailures`).
    pub fn retry(&self) -> Vec<OpportunityId> {
        self.records
            .iter()
            .filter(|r| matches!(r.result, Wrote::Retry { .. }))
            .map(|r| r.id)
            .collect()
    }
}

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

/// Why a write batch stopped before its last step.
#[derive(Debug)]
pub(crate) enum Stop {
    /// Marketo refused the run (quota, budget, credentials, a CRM-enabled instance).
    Marketo(MarketoError),
    /// The invocation's time ran out.
    Deadline,
    /// Marketo's preflight found the instance cannot take this configuration's writes.
    Preflight(String),
}

impl Stop {
    fn describe(&self) -> String {
        match self {
            Stop::Marketo(e) => e.to_string(),
            Stop::Deadline => "the writer's time ran out; unfinished records are written by the next run".into(),
            Stop::Preflight(why) => why.clone(),
        }
    }
}

/// The day's Marketo count as a run of calls began.
pub(crate) struct Budgeted {
    day: String,
    counted: bool,
}

/// What Marketo's preflight found, as this process knows it.
#[derive(Debug, Default)]
pub(crate) enum Verdict {
    /// Not checked, or the check could not be made (a timeout, the credentials).
    #[default]
    Unknown,
    Passed,
    /// The instance cannot take this configuration's writes; the next write stops on it.
    Blocked(String),
}

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// Marketo's preflight, once per process before its first write: an instance that runs the
    /// native CRM sync, or lacks a mapped field, stops the write before any record is sent (each
    /// would fail alone, with 1018 or 1006). A preflight that could not be made (a timeout, the
    /// credentials) is not a verdict: the write goes on and meets the cause itself, and the
    /// next write checks again; so does the write after a stop, so a fixed instance is noticed.
    async fn preflight(&self) -> Option<Stop> {
        let mut verdict = self.preflight.lock().await;
        if matches!(*verdict, Verdict::Unknown) {
            *verdict = self.check_marketo().await;
        }
        match std::mem::take(&mut *verdict) {
            Verdict::Passed => {
                *verdict = Verdict::Passed;
                None
            }
            Verdict::Blocked(why) => Some(Stop::Preflight(why)),
            Verdict::Unknown => None,
        }
    }

    /// The preflight ahead of the write, while Dataverse is read: at seconds a Marketo call it
    /// is one round trip, which this way costs nothing unless the reads are shorter. Its
    /// verdict waits for the first write.
    /// Its describes are counted against the day's budget like any call; the metrics say so.
    pub(crate) async fn preflight_early(&self) -> Metrics {
        let mut metrics = Metrics::default();
        let mut verdict = self.preflight.lock().await;
        if !matches!(*verdict, Verdict::Unknown) {
            return metrics;
        }
        let budget = match self.open_budget().await {
            Ok(b) => b,
            Err(e) => {
                // Left to the write, which meets the store's trouble itself.
                tracing::warn!(error = %e, "could not read the day's Marketo calls; the preflight waits for the write");
                return metrics;
            }
        };
        *verdict = self.check_marketo().await;
        if let Err(e) = self.close_budget(budget, &mut metrics).await {
            tracing::warn!(error = %e, "could not count the preflight's calls in the day's budget");
        }
        metrics
    }

    /// Before calls to Marketo: the day's count so far, from the store unless the adapter
    /// counts each call there itself (the budget holds across processes), and the calls made.
    async fn open_budget(&self) -> Result<Budgeted, StateError> {
        let day = time::marketo_day(self.now());
        let counted = self.share_budget().await;
        if !counted {
            let used = self.store.marketo_calls(&day).await?;
            self.marketo.set_calls_today(used);
        }
        self.accounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| self.marketo.calls_by_endpoint());
        Ok(Budgeted { day, counted })
    }

    /// After them: the calls made since the last close (of this write, or of one that
    /// overlapped it), counted in `metrics` and, unless the adapter did, in the day's count in
    /// the store. Overlapping writes each count a call once; which of them counts it does not
    /// matter to a drain, which adds them up.
    async fn close_budget(&self, budget: Budgeted, metrics: &mut Metrics) -> Result<u64, StateError> {
        let mut calls = 0;
        let now = self.marketo.calls_by_endpoint();
        let before = self
            .accounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(now.clone())
            .unwrap_or_default();
        for (endpoint, n) in &now {
            let delta = n.saturating_sub(before.get(endpoint).copied().unwrap_or(0));
            if delta > 0 {
                calls += delta;
                metrics.count(format!("MarketoCalls.{endpoint}"), delta);
            }
        }
        if calls > 0 && !budget.counted {
            self.store.add_marketo_calls(&budget.day, calls).await?;
        }
        Ok(calls)
    }

    async fn check_marketo(&self) -> Verdict {
        let fields: Vec<String> = self
            .config
            .mapping
            .fields
            .iter()
            .map(|f| f.marketo.to_string())
            .collect();
        match self.marketo.preflight(&fields).await {
            Ok(found) => match found.blocked {
                Some(blocked) => Verdict::Blocked(blocked),
                None if !found.missing_fields.is_empty() => Verdict::Blocked(format!(
                    "the instance has no opportunity field {}; nothing was sent. Fix: create the fields in Marketo (Admin > Field Management); or remove them from [mapping] and run `oppsync resync --all`, so that the plans already made are made again",
                    found.missing_fields.join(", ")
                )),
                None => Verdict::Passed,
            },
            Err(e) => {
                tracing::debug!(error = %e, "Marketo's preflight could not be made; writing");
                Verdict::Unknown
            }
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
    /// Writes a batch of ready plans to Marketo: companies and sales persons, then leads (found or created), then
    /// opportunities, roles, role deletions and opportunity deletions, each as few calls as the
    /// 300-record limit allows; then records each outcome.
    #[tracing::instrument(skip_all, name = "write", fields(records = ids.len()))]
    pub async fn write(&self, ids: &[OpportunityId]) -> Result<WriteReport, PipelineError> {
        self.write_batch(ids, false, None, true).await
    }

    /// [`Pipeline::write`] that stops before a step it has no time left for (the Lambda writer):
    /// records not yet written wait for the next run, no attempt counted.
    pub async fn write_until(
        &self,
        ids: &[OpportunityId],
        deadline: Option<Instant>,
    ) -> Result<WriteReport, PipelineError> {
        self.write_batch(ids, false, deadline, true).await
    }

    /// [`Pipeline::write`]; `fresh` writes every company again, even one this process wrote.
    /// Without `backoff` a record left ready may be tried again at once (the local drain, which
    /// bounds its own attempts, and resync); with it, it waits (the stream-driven writer, where
    /// an immediate retry would re-trigger itself).
    pub(crate) async fn write_batch(
        &self,
        ids: &[OpportunityId],
        fresh: bool,
        deadline: Option<Instant>,
        backoff: bool,
    ) -> Result<WriteReport, PipelineError> {
        let ttl = i64::from(self.config.sync.claim_ttl_seconds) * 1000;
        let mut report = WriteReport::default();
        let mut works = Vec::new();
        let mut unique: Vec<OpportunityId> = ids.to_vec();
        unique.sort();
        unique.dedup();
        let taken = self.claim_all(&unique, Status::Ready, ttl).await?;
        let every_claim: Vec<Claim> = taken
            .iter()
            .filter_map(|(_, c)| c.as_ref().map(|(claim, _)| claim.clone()))
            .collect();
        for (id, claimed) in taken {
            match claimed {
                Some((claim, state)) => match state.plan.clone() {
                    Some(plan) => works.push({
                        let (parts, previous, in_marketo) =
                            sent::parts_and_previous(&plan, &state, &self.config.mapping.lead_match, fresh);
                        let (roles, replaced) = roles_in_marketo(&state);
                        Work {
                            roles,
                            replaced,
                            guid: state.written.as_ref().and_then(|w| w.marketo_guid.clone()),
                            parts,
                            previous,
                            in_marketo,
                            claim,
                            state,
                            plan,
                            error: None,
                            paused: false,
                            call_failed: false,
                            lost: false,
                            soft_error: None,
                            company_done: false,
                            sales_person_done: false,
                            opportunity_done: false,
                            touched: false,
                            planned: Vec::new(),
                            answers: Vec::new(),
                        }
                    }),
                    None => {
                        let error = match &state.unreadable {
                            Some(reason) => sync_error(
                                "write",
                                "unreadable-state",
                                format!(
                                    "{reason}; `oppsync resync {}` plans and writes it afresh from Dynamics",
                                    claim.id
                                ),
                            ),
                            None => sync_error("write", "no-plan", "a ready record without a stored plan; resync it"),
                        };
                        let failed = WriteResult::Failed {
                            error: error.clone(),
                            written: None,
                        };
                        if let Err(e) = self.store.complete_write(&claim, failed, self.now()).await {
                            self.release_all(every_claim.iter()).await;
                            return Err(e.into());
                        }
                        report.records.push(WriteRecord {
                            id,
                            result: Wrote::Failed { error },
                            answers: Vec::new(),
                        });
                    }
                },
                None => {
                    // See the transform's `ClaimsMissed`.
                    report.metrics.count("ClaimsMissed", 1);
                    report.records.push(WriteRecord {
                        id,
                        result: Wrote::NotClaimed,
                        answers: Vec::new(),
                    })
                }
            }
        }
        if works.is_empty() {
            return Ok(report);
        }
        // A handler that fails hands its records back: they must be claimable at once by the
        // redelivery, not only when the claims expire.
        let claims: Vec<Claim> = works.iter().map(|w| w.claim.clone()).collect();
        match self.write_claimed(works, fresh, deadline, backoff, report).await {
            Ok(report) => Ok(report),
            Err((e, completed)) => {
                self.release_all(claims.iter().filter(|c| !completed.contains(&c.id)))
                    .await;
                Err(e)
            }
        }
    }

    /// Claims `ids` in `from` status, [`STORE_CONCURRENCY`] at once; on an error every claim
    /// taken is released.
    pub(crate) async fn claim_all(
        &self,
        ids: &[OpportunityId],
        from: Status,
        ttl: i64,
    ) -> Result<Vec<(OpportunityId, Option<(Claim, OpportunityState)>)>, PipelineError> {
        let now = self.now();
        // Owned arguments: a future borrowing the iterator's items is not `Send` for every
        // lifetime, which a Lambda handler's future must be.
        let owned: Vec<OpportunityId> = ids.to_vec();
        let answers = self.store.claim_many(owned, from, ttl, now).await;
        let mut out = Vec::with_capacity(ids.len());
        let mut failed = None;
        for (id, answer) in ids.iter().zip(answers) {
            match answer {
                Ok(taken) => out.push((*id, taken)),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            self.release_all(out.iter().filter_map(|(_, c)| c.as_ref().map(|(claim, _)| claim)))
                .await;
            return Err(e.into());
        }
        Ok(out)
    }

    /// Best effort: a claim that cannot be released expires by itself.
    pub(crate) async fn release_all(&self, claims: impl Iterator<Item = &Claim>) {
        let now = self.now();
        let claims: Vec<Claim> = claims.cloned().collect();
        let answers = overlapped(
            claims
                .clone()
                .into_iter()
                .map(|claim| async move { self.store.release(&claim, now).await }),
        )
        .await;
        for (claim, answer) in claims.iter().zip(answers) {
            if let Err(e) = answer {
                tracing::warn!(opportunity = %claim.id, error = %e, "could not release a claim; it expires by itself");
            }
        }
    }

    /// The calls and the recording for claimed records. On error, also the records already
    /// recorded (their claims are gone; the rest are released by the caller).
    async fn write_claimed(
        &self,
        mut works: Vec<Work>,
        fresh: bool,
        deadline: Option<Instant>,
        backoff: bool,
        mut report: WriteReport,
    ) -> Result<WriteReport, (PipelineError, BTreeSet<OpportunityId>)> {
        let mut completed: BTreeSet<OpportunityId> = BTreeSet::new();
        let fail = |e: StateError, completed: &BTreeSet<OpportunityId>| (PipelineError::from(e), completed.clone());
        // The budget holds across processes: each call is taken from the day's count in the
        // store before it is sent, and the rate and calls at once are shared among the writers.
        let budget = self.open_budget().await.map_err(|e| fail(e, &completed))?;

        let stopped = match self.preflight().await {
            Some(stop) => {
                Self::stop_all(&mut works, &stop);
                Some(stop)
            }
            None => self.write_steps(&mut works, fresh, deadline).await,
        };
        crash::point("write.sent");
        if let Some(stop) = &stopped {
            tracing::warn!(reason = %stop.describe(), "Marketo writes stopped early; unfinished records stay ready");
            report.stopped = Some(stop.describe());
            report.stopped_for_good = match stop {
                Stop::Marketo(e) => e.disposition() == Disposition::Fix,
                Stop::Preflight(_) => true,
                Stop::Deadline => false,
            };
        }

        report.marketo_calls = self
            .close_budget(budget, &mut report.metrics)
            .await
            .map_err(|e| fail(e, &completed))?;

        // Every outcome decided first, then recorded together.
        let decided: Vec<(WriteResult, Wrote)> = works.iter().map(|work| self.finish(work, backoff)).collect();
        let now = self.now();
        let owned: Vec<(Claim, WriteResult)> = works
            .iter()
            .zip(&decided)
            .map(|(work, (result, _))| (work.claim.clone(), result.clone()))
            .collect();
        let completions = self.store.complete_writes(owned, now).await;
        let mut failed: Option<StateError> = None;
        let mut recorded = Vec::with_capacity(completions.len());
        for (work, completion) in works.iter().zip(completions) {
            match completion {
                Ok(c) => {
                    completed.insert(work.claim.id);
                    crash::point("write.recorded");
                    recorded.push(Some(c));
                }
                Err(e) => {
                    failed.get_or_insert(e);
                    recorded.push(None);
                }
            }
        }
        // A record this write touched in Marketo is planned and written again when another
        // worker took it during the write (what this one sent may have landed after the other's:
        // a late call, a retry inside the client), or when its completion may not have been
        // recorded. Done for every such record before an error is returned, so that one failed
        // completion never leaves another record's older data in Marketo.
        let mut requeue_failed = None;
        for (work, completion) in works.iter().zip(&recorded) {
            if work.touched && !matches!(completion, Some(Completion::Completed)) {
                match self.store.requeue(work.claim.id, true, self.now()).await {
                    Ok(_) => {
                        tracing::info!(opportunity = %work.claim.id, "superseded after writing; requeued to be written again")
                    }
                    Err(e) => {
                        requeue_failed.get_or_insert(e);
                    }
                }
            }
        }
        if let Some(e) = failed.or(requeue_failed) {
            // The records not recorded are released by the caller.
            return Err(fail(e, &completed));
        }
        for ((work, (_, wrote)), completion) in works.into_iter().zip(decided).zip(recorded) {
            let wrote = match completion {
                Some(Completion::Completed) => wrote,
                _ => Wrote::Superseded,
            };
            let name = match &wrote {
                Wrote::Synced => "OpportunitiesSynced",
                Wrote::Deleted => "OpportunitiesDeleted",
                Wrote::Retry { .. } => "OpportunitiesRetried",
                Wrote::Failed { .. } => "OpportunitiesFailed",
                Wrote::NotClaimed | Wrote::Superseded => "OpportunitiesSuperseded",
            };
            report.metrics.count(name, 1);
            if matches!(wrote, Wrote::Synced | Wrote::Deleted)
                && let Some(at) = work.state.modified_on.as_deref().and_then(time::parse_utc)
            {
                report.metrics.observe_ms("SyncLag", (self.now() - at).max(0) as f64);
            }
            match &wrote {
                Wrote::Failed { error } | Wrote::Retry { error } => tracing::warn!(
                    opportunity = %work.claim.id, operation = %error.operation, code = %error.code,
                    outcome = name, "{}", error.message
                ),
                _ => tracing::debug!(opportunity = %work.claim.id, outcome = name, "written"),
            }
            report.records.push(WriteRecord {
                id: work.claim.id,
                result: wrote,
                answers: work.answers,
            });
        }
        Ok(report)
    }

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

pub(crate) const NOT_FOUND: &str = "1013";

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// Records a failed call against every record it carried; returns the error when it stops
    /// the whole batch (quota, budget, credentials, a CRM-enabled instance).
    pub(crate) fn call_failed<'w>(
        error: MarketoError,
        operation: &str,
        affected: impl Iterator<Item = &'w mut Work>,
    ) -> Option<MarketoError> {
        let disposition = error.disposition();
        // The call's own operation where the error names it (a lead lookup or creation inside
        // the leads step), else the step's.
        let operation = error.operation().unwrap_or(operation);
        let recorded = sync_error(operation, error.code(), error.to_string());
        let stops = disposition.stops_the_run();
        // A call whose answer was lost may have been applied: its records count as touched.
        let applied = error.may_have_been_applied();
        for work in affected {
            work.touched |= applied;
            if stops {
                work.pause(recorded.clone());
            } else if work.ok() {
                let retryable = disposition.keeps_records_queued();
                work.fail(recorded.clone(), retryable);
                work.call_failed = retryable;
            }
        }
        stops.then_some(error)
    }

    /// After a batch-stopping error, every record not yet failed waits for the next run.
    pub(crate) fn stop_all(works: &mut [Work], stop: &Stop) {
        let recorded = match stop {
            Stop::Marketo(e) => sync_error("write", e.code(), e.to_string()),
            Stop::Deadline => sync_error("write", DEADLINE_CODE, stop.describe()),
            Stop::Preflight(why) => sync_error("write", "preflight", why.clone()),
        };
        for work in works.iter_mut() {
            work.pause(recorded.clone());
        }
    }

    /// Re-checks (and extends) the claims of the records that still have calls to make, before
    /// a step: a record another worker took meanwhile (a newer version, an expired claim) makes
    /// no further call, so a superseded writer stops writing as soon as it can tell.
    pub(crate) async fn recheck_claims(
        &self,
        works: &mut [Work],
        needs: impl Fn(&Work) -> bool,
    ) -> Result<(), StateError> {
        // Still writing: the budget's membership is renewed with the claims.
        self.share_budget().await;
        let ttl = i64::from(self.config.sync.claim_ttl_seconds) * 1000;
        let now = self.now();
        let claims: Vec<(usize, Claim)> = works
            .iter()
            .enumerate()
            .filter(|(_, w)| w.ok() && needs(w))
            .map(|(i, w)| (i, w.claim.clone()))
            .collect();
        let checks = claims
            .into_iter()
            .map(|(i, claim)| async move { (i, self.store.renew_claim(&claim, ttl, now).await) });
        for (i, renewed) in overlapped(checks).await {
            match renewed? {
                Some(claim) => works[i].claim = claim,
                None => {
                    let work = &mut works[i];
                    work.lost = true;
                    work.fail(
                        sync_error(
                            "write",
                            "superseded",
                            "another worker took this record during the write",
                        ),
                        true,
                    );
                }
            }
        }
        Ok(())
    }

    /// The Marketo calls for a batch, in dependency order, each step only while there is time
    /// and each record only while its claim holds. Returns what stopped the batch early, if
    /// anything did.
    pub(crate) async fn write_steps(&self, works: &mut [Work], fresh: bool, deadline: Option<Instant>) -> Option<Stop> {
        let stop = self.run_steps(works, fresh, deadline).await;
        if let Some(stop) = &stop {
            Self::stop_all(works, stop);
        }
        stop
    }

    async fn run_steps(&self, works: &mut [Work], fresh: bool, deadline: Option<Instant>) -> Option<Stop> {
        let upserting = |w: &Work| matches!(w.plan.action, Action::Upsert(_));
        let deleting = |w: &Work| matches!(w.plan.action, Action::Delete) || !w.plan.role_deletions.is_empty();
        let leads = {
            // Companies and leads one write at a time in this process (see `front`); the
            // opportunities and roles overlap the next write's.
            let _front = self.front.lock().await;
            if Self::out_of_time(deadline) {
                return Some(Stop::Deadline);
            }
            // Companies and sales persons depend on nothing: their calls go out together.
            let companies = self.companies_to_send(works, fresh);
            let persons = self.sales_persons_to_send(works, fresh, false, |_| true);
            let (companies_answered, persons_answered) = tokio::join!(
                async {
                    if companies.is_empty() {
                        None
                    } else {
                        Some(self.marketo.sync_companies(&companies).await)
                    }
                },
                async {
                    if persons.is_empty() {
                        None
                    } else {
                        Some(self.marketo.sync_sales_persons(&persons).await)
                    }
                }
            );
            let stopped = [
                companies_answered.and_then(|a| self.companies_answered(works, &companies, a)),
                persons_answered.and_then(|a| self.sales_persons_answered(works, &persons, a, |_| true)),
            ];
            if let Some(stop) = stopped.into_iter().flatten().next() {
                return Some(Stop::Marketo(stop));
            }
            if Self::out_of_time(deadline) {
                return Some(Stop::Deadline);
            }
            if let Err(e) = self.recheck_claims(works, upserting).await {
                tracing::warn!(error = %e, "could not re-check claims; the write goes on under them");
            }
            match self.resolve_leads(works).await {
                Ok(leads) => leads,
                Err(e) => {
                    let affected = works
                        .iter_mut()
                        .filter(|w| w.ok() && matches!(&w.plan.action, Action::Upsert(d) if !d.roles.is_empty()));
                    if let Some(stop) = Self::call_failed(e, Operation::LeadQuery.name(), affected) {
                        return Some(Stop::Marketo(stop));
                    }
                    Resolved::default()
                }
            }
        };
        if let Some(stop) = self.write_opportunities_and_roles(works, leads, deadline).await {
            return Some(stop);
        }
        if Self::out_of_time(deadline) {
            return Some(Stop::Deadline);
        }
        if let Err(e) = self.recheck_claims(works, deleting).await {
            tracing::warn!(error = %e, "could not re-check claims; the write goes on under them");
        }
        if let Some(stop) = self.delete_roles(works).await {
            return Some(Stop::Marketo(stop));
        }
        self.delete_opportunities(works).await.map(Stop::Marketo)
    }
}

/// The code a record left by the writer's deadline carries.
pub(crate) const DEADLINE_CODE: &str = "deadline";

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
