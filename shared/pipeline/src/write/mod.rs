//! The write: ready plans go to Marketo in as few calls as the 300-record limit allows, in
//! dependency order (companies, sales persons, leads, opportunities and roles, role and opportunity
//! deletions; one file each), and each record's outcome is recorded.

mod companies;
mod deletions;
mod leads;
mod opportunities;
mod preflight;
mod sales_persons;
mod sent;
mod work;

use leads::{LeadId, Resolved};
pub(crate) use preflight::Verdict;
pub(crate) use work::{Work, company_of, roles_in_marketo, sales_person_of};

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
