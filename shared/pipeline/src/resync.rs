//! Resync: transform and write named records (or every opportunity) now, whatever their cursor
//! or hash; a dry run plans them and changes nothing.

use super::*;

/// The resync function's input: exactly one of `opportunityIds`, `all`, `failed` and
/// `modifiedSince`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResyncRequest {
    #[serde(default)]
    pub opportunity_ids: Vec<String>,
    #[serde(default)]
    pub all: bool,
    /// Every record the state holds as failed (a replay once the cause is fixed).
    #[serde(default)]
    pub failed: bool,
    /// Every opportunity Dynamics changed at or after this time (`YYYY-MM-DD` or
    /// `YYYY-MM-DDTHH:MM:SSZ`, UTC).
    #[serde(default)]
    pub modified_since: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

/// A resync input that makes sense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncTarget {
    Ids(Vec<OpportunityId>),
    All,
    /// The records the state holds as failed.
    Failed,
    /// The opportunities Dynamics changed at or after this time.
    ModifiedSince(Since),
}

/// A UTC time to read changes from, as Dataverse's `$filter` takes it (`2026-11-01T00:00:00Z`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since(String);

impl Since {
    /// `YYYY-MM-DD` (midnight UTC) or `YYYY-MM-DDTHH:MM:SSZ`; anything else is refused, so
    /// nothing but a timestamp reaches a Dataverse query.
    pub fn parse(text: &str) -> Result<Since, String> {
        let text = text.trim();
        let refuse = || {
            format!(
                "modified since `{}`: not a UTC date or time; give YYYY-MM-DD (midnight UTC) or YYYY-MM-DDTHH:MM:SSZ, e.g. 2026-11-01 or 2026-11-01T08:30:00Z",
                oppsync_support::input::shown(text)
            )
        };
        let full = match text.len() {
            10 => format!("{text}T00:00:00Z"),
            20 => text.to_owned(),
            _ => return Err(refuse()),
        };
        let b = full.as_bytes();
        let digits = |range: std::ops::Range<usize>| -> Option<i64> {
            let part = full.get(range)?;
            part.bytes().all(|c| c.is_ascii_digit()).then(|| part.parse().ok())?
        };
        let shape = b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':' && b[16] == b':' && b[19] == b'Z';
        let (Some(y), Some(m), Some(d), Some(h), Some(min), Some(sec)) = (
            digits(0..4),
            digits(5..7),
            digits(8..10),
            digits(11..13),
            digits(14..16),
            digits(17..19),
        ) else {
            return Err(refuse());
        };
        // A day that does not exist (2026-02-30) comes back as another one.
        let real_day = oppsync_support::civil_from_days(oppsync_support::days_from_civil(y, m, d)) == (y, m, d);
        if !shape || !(1..=12).contains(&m) || !real_day || h > 23 || min > 59 || sec > 59 {
            return Err(refuse());
        }
        Ok(Since(full))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ResyncRequest {
    /// Checks the request: ids are GUIDs and a time is a time (nothing else reaches a Dataverse
    /// query), and exactly one target is given.
    pub fn target(&self) -> Result<ResyncTarget, String> {
        let given = usize::from(!self.opportunity_ids.is_empty())
            + usize::from(self.all)
            + usize::from(self.failed)
            + usize::from(self.modified_since.is_some());
        if given > 1 {
            return Err(
                "give one of \"opportunityIds\", \"all\": true, \"failed\": true and \"modifiedSince\", not both (or more) at once"
                    .into(),
            );
        }
        if self.all {
            return Ok(ResyncTarget::All);
        }
        if self.failed {
            return Ok(ResyncTarget::Failed);
        }
        if let Some(since) = &self.modified_since {
            return Since::parse(since).map(ResyncTarget::ModifiedSince);
        }
        if self.opportunity_ids.is_empty() {
            return Err(
                "nothing to resync: give \"opportunityIds\": [\"<guid>\", ...], \"all\": true, \"failed\": true or \"modifiedSince\": \"YYYY-MM-DD\""
                    .into(),
            );
        }
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
    /// How many records the request named or found (the failed ones, those changed since).
    pub targeted: u64,
    pub records: Vec<ResyncRecord>,
    pub stopped: Option<String>,
    /// See [`crate::WriteReport::stopped_for_good`].
    pub stopped_for_good: bool,
    /// Records written (or deleted) in Marketo, reported in `records` or not (`--all` reports
    /// only those that need attention).
    pub written: u64,
    /// Marketo calls made.
    pub marketo_calls: u64,
}

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// Transforms and writes the named records (or every opportunity in Dynamics) now, whatever
    /// their cursor or hash. A dry run plans them and changes nothing.
    #[tracing::instrument(skip_all, name = "resync", fields(dry_run))]
    pub async fn resync(&self, target: ResyncTarget, dry_run: bool) -> Result<ResyncReport, PipelineError> {
        // Records found in Dynamics are reported when they need attention; records named (by
        // id, or as failed) are reported whatever happened.
        let all = matches!(target, ResyncTarget::All | ResyncTarget::ModifiedSince(_));
        let ids: Vec<OpportunityId> = match target {
            ResyncTarget::Ids(ids) => ids,
            ResyncTarget::All => self
                .dataverse
                .all_ids(EntitySet::Opportunities)
                .await?
                .into_iter()
                .map(OpportunityId)
                .collect(),
            ResyncTarget::Failed => self.ids_in(Status::Failed, |_| true, None).await?,
            ResyncTarget::ModifiedSince(since) => self.modified_since(&since).await?,
        };
        let mut report = ResyncReport {
            dry_run,
            targeted: ids.len() as u64,
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
            report.marketo_calls += written.marketo_calls;
            report.written += written
                .records
                .iter()
                .filter(|r| matches!(r.result, Wrote::Synced | Wrote::Deleted))
                .count() as u64;
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

    /// Every opportunity Dynamics changed at or after `since`, page by page (ids only).
    async fn modified_since(&self, since: &Since) -> Result<Vec<OpportunityId>, PipelineError> {
        let from = Watermark::ModifiedOn {
            at: since.as_str().to_owned(),
            seen: Vec::new(),
        };
        let mut ids = Vec::new();
        self.each_watermark_page(EntitySet::Opportunities, &["opportunityid"], &from, |rows| {
            ids.extend(poll::opportunity_ids(&rows));
        })
        .await?;
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_since_is_a_utc_date_or_time_that_exists() {
        assert_eq!(Since::parse("2026-11-01").unwrap().as_str(), "2026-11-01T00:00:00Z");
        assert_eq!(
            Since::parse(" 2026-11-01T08:30:59Z ").unwrap().as_str(),
            "2026-11-01T08:30:59Z"
        );
        assert_eq!(Since::parse("2028-02-29").unwrap().as_str(), "2028-02-29T00:00:00Z");
        for bad in [
            "2026-02-29",
            "2026-00-10",
            "2026-11-31",
            "2026-11-01T08:60:00Z",
            "2026-11-01T08:30:00+01:00",
            "2026/11/01",
            "+026-11-01",
            "2026-11-01T08:30:00z",
            "",
            "2026-11-0é",
        ] {
            let e = Since::parse(bad).unwrap_err();
            assert!(e.contains("YYYY-MM-DD"), "{bad}: {e}");
        }
    }
}
