//! The transform: pending records become plans (or are marked synced when the plan is what
//! Marketo already holds); `plan` makes plans without touching the state (a dry run, `oppsync plan`).

use super::*;

/// One record's transform.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Transformed {
    /// Planned: ready to write.
    Ready { plan: Box<Plan> },
    /// The plan equals what Marketo holds: synced without a call.
    Unchanged,
    /// Excluded by the sync filter.
    Filtered,
    /// Deleted in Dynamics; the delete policy (or an earlier write) leaves nothing to do.
    Kept,
    /// Could not be planned.
    Failed { error: SyncError },
    /// Not pending, or another worker holds it.
    NotClaimed,
    /// A newer version arrived while planning; the newer one will be planned.
    Superseded,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransformRecord {
    pub id: OpportunityId,
    #[serde(flatten)]
    pub result: Transformed,
}

/// What a transform batch did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TransformReport {
    pub records: Vec<TransformRecord>,
    #[serde(skip)]
    pub metrics: Metrics,
}

impl TransformReport {
    pub fn ready(&self) -> Vec<OpportunityId> {
        self.records
            .iter()
            .filter(|r| matches!(r.result, Transformed::Ready { .. }))
            .map(|r| r.id)
            .collect()
    }
}

/// A plan made without touching the state (dry runs, `oppsync plan`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Planned {
    pub id: OpportunityId,
    pub plan: Result<Plan, SyncError>,
    pub written: Option<WrittenSummary>,
    /// The plan equals what was last written: a sync would make no Marketo call.
    pub unchanged: bool,
}

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// Plans records without touching the state: for dry runs and `oppsync plan`.
    pub async fn plan(&self, ids: &[OpportunityId]) -> Result<Vec<Planned>, PipelineError> {
        let mut states = Vec::with_capacity(ids.len());
        for id in ids {
            states.push((*id, self.store.get(*id).await?));
        }
        let plans = self.plan_batch(&states).await?;
        Ok(states
            .into_iter()
            .zip(plans)
            .map(|((id, state), plan)| {
                let written = state.as_ref().and_then(|s| s.written.as_ref());
                let unchanged = match (&plan, written) {
                    (Ok(p), Some(w)) => p.hash == w.hash && p.role_deletions.is_empty(),
                    _ => false,
                };
                Planned {
                    id,
                    plan,
                    written: written.map(WrittenSummary::from),
                    unchanged,
                }
            })
            .collect())
    }

    /// Reads what the rules need for a batch and plans each record.
    pub(crate) async fn plan_batch(
        &self,
        states: &[(OpportunityId, Option<OpportunityState>)],
    ) -> Result<Vec<Result<Plan, SyncError>>, PipelineError> {
        let live: Vec<OpportunityId> = states
            .iter()
            .filter(|(_, s)| !s.as_ref().is_some_and(|s| s.deleted))
            .map(|(id, _)| *id)
            .collect();
        let select = self.opportunity_select();
        let select: Vec<&str> = select.iter().map(String::as_str).collect();
        let rows = if live.is_empty() {
            Vec::new()
        } else {
            self.dataverse.opportunities(&live, &select).await?
        };
        let mut parsed: HashMap<OpportunityId, Result<Opportunity, SyncError>> = HashMap::new();
        for row in rows {
            let id = row["opportunityid"].as_str().and_then(|t| OpportunityId::parse(t).ok());
            let result = Opportunity::from_json(row);
            match (id, result) {
                (_, Ok(o)) => {
                    parsed.insert(o.id, Ok(o));
                }
                (Some(id), Err(e)) => {
                    parsed.insert(id, Err(sync_error("read", "bad-record", e.to_string())));
                }
                (None, Err(e)) => tracing::warn!(error = %e, "an opportunity row without a usable id"),
            }
        }
        // Absent is not deleted: a live record the batch read did not return is read again by its
        // key; only a 404 plans its delete. One that exists stops the batch (it is read again
        // later) rather than deleting what Dynamics still holds.
        for id in live.iter().filter(|id| !parsed.contains_key(id)) {
            if self.dataverse.opportunity_exists(*id).await? {
                return Err(DataverseError::Decode(format!(
                    "opportunity {id} exists in Dataverse but its batch read left it out; the batch is read again later"
                ))
                .into());
            }
        }
        let opportunities: Vec<Opportunity> = parsed.values().filter_map(|r| r.as_ref().ok().cloned()).collect();
        let related = if opportunities.is_empty() {
            Related::default()
        } else {
            let (related, problems) = self.dataverse.related(&opportunities).await?;
            for problem in problems {
                tracing::warn!(problem = %problem, "a related record could not be read; plans carry a warning");
            }
            related
        };
        Ok(states
            .iter()
            .map(|(id, state)| {
                // Deletions are planned against what Marketo may hold: the roles written, and
                // those a write sent (or was about to) without recording its outcome.
                let written_roles: Vec<WrittenRole> = state
                    .iter()
                    .flat_map(|s| s.written.iter().flat_map(|w| w.roles.iter()).chain(s.planned.iter()))
                    .cloned()
                    .collect();
                let change = if state.as_ref().is_some_and(|s| s.deleted) {
                    Change::Deleted(*id)
                } else {
                    match parsed.remove(id) {
                        Some(Ok(o)) => Change::Upserted(o),
                        Some(Err(e)) => return Err(e),
                        // Not in Dataverse any more (confirmed by its key above): deleted after
                        // the poll read it. The poll's deletion record follows; planning the
                        // delete now is the same outcome.
                        None => Change::Deleted(*id),
                    }
                };
                // Excluded by the sync filter when last planned: deleted in Dynamics, it is left
                // alone in Marketo as it was while excluded.
                let excluded = state
                    .as_ref()
                    .and_then(|s| s.plan.as_ref())
                    .is_some_and(|p| matches!(p.action, Action::Filtered));
                let plan = match &change {
                    Change::Deleted(id) if excluded => plan_delete_excluded(*id),
                    _ => plan_change(&self.config.mapping, &change, &related, &written_roles),
                };
                for w in &plan.warnings {
                    tracing::warn!(opportunity = %id, field = %w.field, "{}", w.message);
                }
                Ok(plan)
            })
            .collect())
    }

    /// Plans a batch of pending records. With `force`, a plan equal to what was last written is
    /// still made ready (resync).
    #[tracing::instrument(skip_all, name = "transform", fields(records = ids.len()))]
    pub async fn transform(&self, ids: &[OpportunityId], force: bool) -> Result<TransformReport, PipelineError> {
        let ttl = i64::from(self.config.sync.claim_ttl_seconds) * 1000;
        let mut report = TransformReport::default();
        let mut claimed = Vec::new();
        let mut unique: Vec<OpportunityId> = ids.to_vec();
        unique.sort();
        unique.dedup();
        for (id, taken) in self.claim_all(&unique, Status::Pending, ttl).await? {
            match taken {
                Some((claim, state)) => claimed.push((claim, state)),
                None => {
                    // A delivery with nothing to do (a duplicate, or another worker has it): the
                    // stream filters keep these rare; the metric shows how rare.
                    report.metrics.count("ClaimsMissed", 1);
                    report.records.push(TransformRecord {
                        id,
                        result: Transformed::NotClaimed,
                    })
                }
            }
        }
        self.transform_claimed(claimed, force, report).await
    }

    /// Plans records already claimed for their transform, and records each outcome. On an
    /// error the claims not yet completed are released, so a redelivery can take them at once.
    pub(crate) async fn transform_claimed(
        &self,
        claimed: Vec<(Claim, OpportunityState)>,
        force: bool,
        mut report: TransformReport,
    ) -> Result<TransformReport, PipelineError> {
        if claimed.is_empty() {
            return Ok(report);
        }
        let states: Vec<(OpportunityId, Option<OpportunityState>)> =
            claimed.iter().map(|(c, s)| (c.id, Some(s.clone()))).collect();
        let plans = match self.plan_batch(&states).await {
            Ok(plans) => plans,
            Err(e) => {
                self.release_all(claimed.iter().map(|(c, _)| c)).await;
                return Err(e);
            }
        };
        // Every outcome decided first, then recorded together.
        let mut decided = Vec::with_capacity(claimed.len());
        for ((claim, state), plan) in claimed.into_iter().zip(plans) {
            // Marketo may differ from what was recorded (a superseded write, a resync): write
            // even a plan whose hash matches.
            let force = force || state.rewrite;
            let quarantined = state.unreadable.as_ref().filter(|_| !state.rewrite).map(|reason| {
                sync_error(
                    "transform",
                    "unreadable-state",
                    format!(
                        "{reason}; `oppsync resync {}` plans and writes it afresh from Dynamics",
                        claim.id
                    ),
                )
            });
            let (result, outcome) = match (quarantined, plan) {
                // Part of its stored state cannot be read (edited by hand, damaged): failed with
                // the reason, so the run goes on; a resync (`rewrite`) writes it afresh.
                (Some(error), _) | (None, Err(error)) => {
                    (TransformResult::Failed(error.clone()), Transformed::Failed { error })
                }
                (None, Ok(plan)) => {
                    let written = state.written.as_ref();
                    let unchanged = written.is_some_and(|w| w.hash == plan.hash) && plan.role_deletions.is_empty();
                    match &plan.action {
                        Action::Filtered => (TransformResult::Filtered(plan), Transformed::Filtered),
                        Action::Kept => (TransformResult::Kept(plan), Transformed::Kept),
                        // A deletion already written stays deleted.
                        Action::Delete if unchanged && !force => (TransformResult::Kept(plan), Transformed::Kept),
                        _ if unchanged && !force => (TransformResult::Unchanged, Transformed::Unchanged),
                        _ => (
                            TransformResult::Ready(plan.clone()),
                            Transformed::Ready { plan: Box::new(plan) },
                        ),
                    }
                }
            };
            crash::point("transform.planned");
            decided.push((claim, state.modified_on, result, outcome));
        }
        let now = self.now();
        let owned: Vec<(Claim, TransformResult)> = decided.iter().map(|(c, _, r, _)| (c.clone(), r.clone())).collect();
        let completions = overlapped(
            owned
                .into_iter()
                .map(|(claim, result)| async move { self.store.complete_transform(&claim, result, now).await }),
        )
        .await;
        // A completion that failed leaves its claim: released, so a redelivery can take it.
        let mut failed: Option<StateError> = None;
        let mut unrecorded: Vec<&Claim> = Vec::new();
        let mut recorded: Vec<Completion> = Vec::with_capacity(completions.len());
        for ((claim, _, _, _), completion) in decided.iter().zip(completions) {
            match completion {
                Ok(c) => recorded.push(c),
                Err(e) => {
                    unrecorded.push(claim);
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            self.release_all(unrecorded.into_iter()).await;
            return Err(e.into());
        }
        for ((claim, modified_on, _, outcome), completion) in decided.into_iter().zip(recorded) {
            let outcome = match completion {
                Completion::Completed => outcome,
                Completion::Superseded => Transformed::Superseded,
            };
            let name = match &outcome {
                Transformed::Ready { .. } => "OpportunitiesPlanned",
                Transformed::Unchanged => "OpportunitiesSkippedUnchanged",
                Transformed::Filtered => "OpportunitiesFiltered",
                Transformed::Kept => "OpportunitiesKept",
                Transformed::Failed { .. } => "OpportunitiesFailed",
                Transformed::NotClaimed | Transformed::Superseded => "OpportunitiesSuperseded",
            };
            report.metrics.count(name, 1);
            if matches!(outcome, Transformed::Unchanged)
                && let Some(at) = modified_on.as_deref().and_then(time::parse_utc)
            {
                report.metrics.observe_ms("SyncLag", (self.now() - at).max(0) as f64);
            }
            tracing::debug!(opportunity = %claim.id, outcome = name, "transformed");
            report.records.push(TransformRecord {
                id: claim.id,
                result: outcome,
            });
        }
        report.metrics.count("DataverseCalls", 0);
        Ok(report)
    }
}
