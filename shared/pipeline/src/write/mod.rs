//! The write: ready plans go to Marketo in as few calls as the 300-record limit allows, in
//! dependency order (companies, leads, opportunities and roles, role and opportunity
//! deletions; one file each), and each record's outcome is recorded.

mod companies;
mod deletions;
mod leads;
mod opportunities;

use leads::LeadId;

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
    /// An error that does not stop the other writes (a duplicate lead), recorded at the end.
    pub(crate) soft_error: Option<SyncError>,
    pub(crate) roles: BTreeMap<(ContactId, String), Option<i64>>,
    /// Roles written on a lead the contact no longer maps to (its email changed, its leads were
    /// merged): the role now on the current lead replaced them, so they are deleted in the same
    /// write.
    pub(crate) replaced: Vec<RoleKey>,
    pub(crate) guid: Option<String>,
    pub(crate) company_done: bool,
    pub(crate) touched: bool,
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
}

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// Writes a batch of ready plans to Marketo: companies, then leads (found or created), then
    /// opportunities, roles, role deletions and opportunity deletions, each as few calls as the
    /// 300-record limit allows; then records each outcome.
    #[tracing::instrument(skip_all, name = "write", fields(records = ids.len()))]
    pub async fn write(&self, ids: &[OpportunityId]) -> Result<WriteReport, PipelineError> {
        self.write_batch(ids, false).await
    }

    /// [`Pipeline::write`]; `fresh` writes every company again, even one this process wrote.
    pub(crate) async fn write_batch(&self, ids: &[OpportunityId], fresh: bool) -> Result<WriteReport, PipelineError> {
        let ttl = i64::from(self.config.sync.claim_ttl_seconds) * 1000;
        let mut report = WriteReport::default();
        let mut works = Vec::new();
        let mut unique: Vec<OpportunityId> = ids.to_vec();
        unique.sort();
        unique.dedup();
        for id in unique {
            match self.store.claim(id, Status::Ready, ttl, self.now()).await? {
                Some((claim, state)) => match state.plan.clone() {
                    Some(plan) => works.push(Work {
                        roles: state
                            .written
                            .as_ref()
                            .map(|w| {
                                w.roles
                                    .iter()
                                    .map(|r| ((r.contact, r.role.clone()), r.lead_id))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        guid: state.written.as_ref().and_then(|w| w.marketo_guid.clone()),
                        claim,
                        state,
                        plan,
                        error: None,
                        soft_error: None,
                        replaced: Vec::new(),
                        company_done: false,
                        touched: false,
                        answers: Vec::new(),
                    }),
                    None => {
                        let error = sync_error("write", "no-plan", "a ready record without a stored plan; resync it");
                        self.store
                            .complete_write(
                                &claim,
                                WriteResult::Failed {
                                    error: error.clone(),
                                    written: None,
                                },
                                self.now(),
                            )
                            .await?;
                        report.records.push(WriteRecord {
                            id,
                            result: Wrote::Failed { error },
                            answers: Vec::new(),
                        });
                    }
                },
                None => report.records.push(WriteRecord {
                    id,
                    result: Wrote::NotClaimed,
                    answers: Vec::new(),
                }),
            }
        }
        if works.is_empty() {
            return Ok(report);
        }
        // The daily budget holds across processes: start from the store's count.
        let day = time::marketo_day(self.now());
        let used = self.store.marketo_calls(&day).await?;
        self.marketo.set_calls_today(used);
        let before = self.marketo.calls_by_endpoint();

        let stopped = self.write_steps(&mut works, fresh).await;
        crash::point("write.sent");
        if let Some(e) = &stopped {
            tracing::warn!(error = %e, "Marketo writes stopped early; unfinished records stay ready");
            report.stopped = Some(e.to_string());
            report.stopped_for_good = e.disposition() == Disposition::Fix;
        }

        let after = self.marketo.calls_by_endpoint();
        let mut calls = 0;
        for (endpoint, n) in &after {
            let delta = n - before.get(endpoint).copied().unwrap_or(0);
            if delta > 0 {
                calls += delta;
                report.metrics.count(format!("MarketoCalls.{endpoint}"), delta);
            }
        }
        report.marketo_calls = calls;
        if calls > 0 {
            self.store.add_marketo_calls(&day, calls).await?;
        }

        for work in works {
            let (result, wrote) = self.finish(&work);
            let completion = self.store.complete_write(&work.claim, result, self.now()).await?;
            crash::point("write.recorded");
            let wrote = match completion {
                Completion::Completed => wrote,
                Completion::Superseded => Wrote::Superseded,
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
    pub(crate) fn finish(&self, work: &Work) -> (WriteResult, Wrote) {
        let deleting = matches!(work.plan.action, Action::Delete);
        let previous = work.state.written.as_ref();
        let roles: Vec<WrittenRole> = work
            .roles
            .iter()
            .map(|((contact, role), lead_id)| WrittenRole {
                contact: *contact,
                role: role.clone(),
                lead_id: *lead_id,
            })
            .collect();
        let written = |hash: PlanHash, deleted: bool| Written {
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
        };
        let failure: Option<(&SyncError, bool)> = match (&work.error, &work.soft_error) {
            (Some((error, retryable)), _) => Some((error, *retryable)),
            (None, Some(error)) => Some((error, false)),
            (None, None) => None,
        };
        let Some((error, retryable)) = failure else {
            return (
                WriteResult::Synced(written(work.plan.hash, deleting)),
                if deleting { Wrote::Deleted } else { Wrote::Synced },
            );
        };
        // Record what did get written, so later plans delete the right roles; keep the old hash
        // so the record is never mistaken for synced.
        let partial = (work.touched || previous.is_some()).then(|| {
            written(
                previous.map_or(PlanHash(0), |w| w.hash),
                previous.is_some_and(|w| w.deleted),
            )
        });
        if retryable {
            (
                WriteResult::Retry {
                    error: error.clone(),
                    written: partial,
                },
                Wrote::Retry { error: error.clone() },
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
        for work in affected {
            work.fail(recorded.clone(), disposition.keeps_records_queued());
        }
        disposition.stops_the_run().then_some(error)
    }

    /// After a batch-stopping error, every record not yet failed is failed the same way.
    pub(crate) fn stop_all(works: &mut [Work], error: &MarketoError) {
        let recorded = sync_error("write", error.code(), error.to_string());
        for work in works.iter_mut() {
            work.fail(recorded.clone(), true);
        }
    }

    /// The Marketo calls for a batch, in dependency order. Returns the error that stopped the
    /// batch early, if one did.
    pub(crate) async fn write_steps(&self, works: &mut [Work], fresh: bool) -> Option<MarketoError> {
        let stop = match self.write_companies(works, fresh).await {
            Some(stop) => Some(stop),
            None => match self.write_opportunities_and_roles(works).await {
                Some(stop) => Some(stop),
                None => match self.delete_roles(works).await {
                    Some(stop) => Some(stop),
                    None => self.delete_opportunities(works).await,
                },
            },
        };
        if let Some(stop) = &stop {
            Self::stop_all(works, stop);
        }
        stop
    }
}

pub(crate) fn company_of(work: &Work) -> Option<String> {
    match &work.plan.action {
        Action::Upsert(d) => d.company.as_ref().map(|c| c.external_company_id.to_string()),
        _ => None,
    }
}
