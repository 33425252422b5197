//! Resync: transform and write named records (or every opportunity) now, whatever their cursor
//! or hash; a dry run plans them and changes nothing.

use super::*;

/// The resync function's input.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResyncRequest {
    #[serde(default)]
    pub opportunity_ids: Vec<String>,
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub dry_run: bool,
}

/// A resync input that makes sense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncTarget {
    Ids(Vec<OpportunityId>),
    All,
}

impl ResyncRequest {
    /// Checks the request: ids are GUIDs (nothing else reaches a Dataverse query), and exactly
    /// one of `opportunityIds` and `all` is given.
    pub fn target(&self) -> Result<ResyncTarget, String> {
        match (self.all, self.opportunity_ids.is_empty()) {
            (true, false) => Err("give either \"opportunityIds\" or \"all\": true, not both".into()),
            (false, true) => {
                Err("nothing to resync: give \"opportunityIds\": [\"<guid>\", ...] or \"all\": true".into())
            }
            (true, true) => Ok(ResyncTarget::All),
            (false, false) => {
                let mut ids = Vec::new();
                let mut bad = Vec::new();
                for text in &self.opportunity_ids {
                    match OpportunityId::parse(text.trim()) {
                        Ok(id) => ids.push(id),
                        Err(_) => bad.push(text.chars().take(80).collect::<String>()),
                    }
                }
                if bad.is_empty() {
                    ids.sort();
                    ids.dedup();
                    Ok(ResyncTarget::Ids(ids))
                } else {
                    Err(format!(
                        "not opportunity ids (GUIDs like 6f1c3b2a-5d4e-4f60-8a7b-9c0d1e2f3a4b): {}",
                        bad.iter().map(|b| format!("`{b}`")).collect::<Vec<_>>().join(", ")
                    ))
                }
            }
        }
    }
}

/// One record's resync.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResyncRecord {
    pub id: OpportunityId,
    /// The plan made now.
    pub plan: Option<Plan>,
    /// What Marketo held before (from the sync state).
    pub previously_written: Option<WrittenSummary>,
    pub transform: Option<Transformed>,
    pub write: Option<Wrote>,
    pub answers: Vec<Answer>,
    /// Named, but Dynamics does not have it and oppsync never wrote it (a mistyped id, or one
    /// from another system): nothing was sent and nothing stored.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub not_found: bool,
}

impl ResyncRecord {
    /// What the resync does (or, in a dry run, would do) in Marketo: `write`, `delete`,
    /// `nothing` (filtered, kept, unchanged), or `not found`.
    pub fn action(&self) -> &'static str {
        if self.not_found {
            return "not found";
        }
        match self.plan.as_ref().map(|p| &p.action) {
            Some(Action::Upsert(_)) => "write",
            Some(Action::Delete) => "delete",
            Some(Action::Filtered | Action::Kept) => "nothing",
            None if matches!(self.write, Some(Wrote::Deleted)) => "delete",
            None => "nothing",
        }
    }
}

/// What was last written, for reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WrittenSummary {
    pub version: i64,
    pub hash: PlanHash,
    pub marketo_guid: Option<String>,
    pub roles: Vec<WrittenRole>,
    pub deleted: bool,
}

impl From<&Written> for WrittenSummary {
    fn from(w: &Written) -> Self {
        WrittenSummary {
            version: w.version,
            hash: w.hash,
            marketo_guid: w.marketo_guid.clone(),
            roles: w.roles.clone(),
            deleted: w.deleted,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ResyncReport {
    pub dry_run: bool,
    pub records: Vec<ResyncRecord>,
    pub stopped: Option<String>,
    /// See [`crate::WriteReport::stopped_for_good`].
    pub stopped_for_good: bool,
}

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// Transforms and writes the named records (or every opportunity in Dynamics) now, whatever
    /// their cursor or hash. A dry run plans them and changes nothing.
    #[tracing::instrument(skip_all, name = "resync", fields(dry_run))]
    pub async fn resync(&self, target: ResyncTarget, dry_run: bool) -> Result<ResyncReport, PipelineError> {
        let all = target == ResyncTarget::All;
        let ids: Vec<OpportunityId> = match target {
            ResyncTarget::Ids(ids) => ids,
            ResyncTarget::All => self
                .dataverse
                .all_ids(EntitySet::Opportunities)
                .await?
                .iter()
                .filter_map(|t| OpportunityId::parse(t).ok())
                .collect(),
        };
        let mut report = ResyncReport {
            dry_run,
            ..ResyncReport::default()
        };
        for chunk in ids.chunks(self.config.sync.batch_size) {
            // A named id Dynamics does not have is a deletion only if oppsync wrote it: one it
            // never knew (a typo, another system's id) is reported, and nothing is sent for it.
            let mut unknown: BTreeSet<OpportunityId> = BTreeSet::new();
            if dry_run || !all {
                for preview in self.plan(chunk).await? {
                    let gone = matches!(&preview.plan, Ok(p) if p.action == Action::Delete);
                    let not_found = gone && preview.written.is_none();
                    if not_found {
                        unknown.insert(preview.id);
                    } else if !dry_run {
                        continue;
                    }
                    let (plan, transform) = match preview.plan {
                        Ok(plan) if !not_found => (Some(plan), None),
                        Ok(_) => (None, None),
                        Err(error) => (None, Some(Transformed::Failed { error })),
                    };
                    report.records.push(ResyncRecord {
                        id: preview.id,
                        plan,
                        previously_written: preview.written,
                        transform,
                        write: None,
                        answers: Vec::new(),
                        not_found,
                    });
                }
                if dry_run {
                    continue;
                }
            }
            let chunk: Vec<OpportunityId> = chunk.iter().copied().filter(|id| !unknown.contains(id)).collect();
            if chunk.is_empty() {
                continue;
            }
            let mut before: HashMap<OpportunityId, Option<WrittenSummary>> = HashMap::new();
            let ttl = i64::from(self.config.sync.claim_ttl_seconds) * 1000;
            let mut claimed = Vec::new();
            let mut report_of_claims = TransformReport::default();
            for id in &chunk {
                // Requeued and claimed in one step: a stream transformer cannot plan it in
                // between and mark it unchanged, which would leave an edit made in Marketo.
                let taken = match self.store.requeue_claimed(*id, ttl, self.now()).await? {
                    Some(taken) => Some(taken),
                    None => {
                        self.store
                            .mark_pending(&[PendingChange::upserted(*id, 0, None)], self.now())
                            .await?;
                        self.store.claim(*id, Status::Pending, ttl, self.now()).await?
                    }
                };
                match taken {
                    Some((claim, state)) => {
                        before.insert(*id, state.written.as_ref().map(WrittenSummary::from));
                        claimed.push((claim, state));
                    }
                    None => report_of_claims.records.push(TransformRecord {
                        id: *id,
                        result: Transformed::NotClaimed,
                    }),
                }
            }
            let transformed = self.transform_claimed(claimed, true, report_of_claims).await?;
            let ready = transformed.ready();
            let written = if ready.is_empty() {
                WriteReport::default()
            } else {
                self.write_batch(&ready, true, None, false).await?
            };
            let mut writes: HashMap<OpportunityId, WriteRecord> =
                written.records.into_iter().map(|r| (r.id, r)).collect();
            for t in transformed.records {
                let write = writes.remove(&t.id);
                let clean = matches!(
                    write.as_ref().map(|w| &w.result),
                    Some(Wrote::Synced) | Some(Wrote::Deleted)
                );
                // `all` reports only what needs attention; a named resync reports everything.
                if all && clean {
                    continue;
                }
                let (plan, transform) = match t.result {
                    Transformed::Ready { plan } => (Some(*plan), None),
                    other => (None, Some(other)),
                };
                report.records.push(ResyncRecord {
                    id: t.id,
                    plan,
                    previously_written: before.remove(&t.id).flatten(),
                    transform,
                    write: write.as_ref().map(|w| w.result.clone()),
                    answers: write.map(|w| w.answers).unwrap_or_default(),
                    not_found: false,
                });
            }
            if let Some(stop) = written.stopped {
                report.stopped = Some(stop);
                report.stopped_for_good = written.stopped_for_good;
                break;
            }
        }
        Ok(report)
    }
}
