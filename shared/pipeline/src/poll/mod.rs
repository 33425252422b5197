//! The poll: what changed in Dynamics becomes pending records, then the cursors move
//! (change tracking or a watermark), with the deletion scan after a full re-read, `peek` (what a
//! poll would record, cursors untouched) and the sweep of records stuck in a claim.

use super::*;

mod scans;
mod sweep;
mod watermark;

/// What a poll did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PollReport {
    /// Another poller holds the lease; nothing was read.
    pub busy: bool,
    /// Changed or deleted opportunities read.
    pub opportunity_changes: u64,
    /// Stakeholder connection changes read.
    pub connection_changes: u64,
    /// Records newly marked pending.
    pub marked: u64,
    /// Changes the store already had at that version or newer.
    pub stale: u64,
    /// Records put back to pending because their stakeholders changed, or they were stuck.
    pub requeued: u64,
    /// Both sources are read up to now; false when the time budget ran out first (the next
    /// poll continues from the stored cursors).
    pub caught_up: bool,
    /// A change-tracking token had expired and a source was read again in full.
    pub full_resync: bool,
    /// A full id scan for deletions ran.
    pub deletion_scan: bool,
    /// Ready records whose retry wait ended, handed back to the writer.
    pub woken: u64,
    pub dataverse_requests: u64,
}

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// pending; a cursor moves only after the changes it covers are recorded. Stops at `deadline`
    /// with `caught_up: false`; the next poll continues from there.
    #[tracing::instrument(skip_all, name = "poll")]
    pub async fn poll(&self, deadline: Option<Instant>) -> Result<PollReport, PipelineError> {
        let requests_before = self.dataverse.requests();
        let ttl = i64::from(self.config.sync.lease_ttl_seconds) * 1000;
        let Some(lease) = self
            .store
            .acquire_lease(POLL_LEASE, &self.owner, ttl, self.now())
            .await?
        else {
            tracing::info!("another poller holds the lease; nothing to do");
            return Ok(PollReport {
                busy: true,
                ..PollReport::default()
            });
        };
        let mut report = PollReport::default();
        let result = self.poll_under(lease.clone(), deadline, &mut report).await;
        // Give the lease up even after an error: the cursors hold everything recorded so far.
        if let Err(e) = self.store.release_lease(&lease).await {
            tracing::warn!(error = %e, "could not release the poller lease; it expires by itself");
        }
        report.dataverse_requests = self.dataverse.requests() - requests_before;
        result?;
        Ok(report)
    }

    pub(crate) async fn poll_under(
        &self,
        mut lease: Lease,
        deadline: Option<Instant>,
        report: &mut PollReport,
    ) -> Result<(), PipelineError> {
        let mut marked_now: BTreeSet<OpportunityId> = BTreeSet::new();
        let read = match self.config.dataverse.change_detection {
            ChangeDetection::ChangeTracking => self.poll_tracked(&mut lease, deadline, report, &mut marked_now).await,
            _ => self.poll_watermark(&mut lease, deadline, report, &mut marked_now).await,
        };
        report.caught_up = matches!(read, Ok(true));
        match read {
            Ok(true) => {
                report.requeued += self.sweep_stuck().await?;
                report.woken += self.wake_due().await?;
                Ok(())
            }
            // Out of time: the next poll sweeps.
            Ok(false) => Ok(()),
            Err(e) => {
                // The read failed (Dataverse down, a deletion scan the guard refused): the
                // records already queued do not wait for it. Their sweep and wake go on, and
                // the read's error is what the poll reports.
                match self.sweep_stuck().await {
                    Ok(n) => report.requeued += n,
                    Err(sweep) => tracing::warn!(error = %sweep, "could not sweep stuck records"),
                }
                match self.wake_due().await {
                    Ok(n) => report.woken += n,
                    Err(wake) => tracing::warn!(error = %wake, "could not wake records whose wait ended"),
                }
                Err(e)
            }
        }
    }

    pub(crate) fn out_of_time(deadline: Option<Instant>) -> bool {
        deadline.is_some_and(|d| Instant::now() >= d)
    }

    pub(crate) async fn renew(&self, lease: &mut Lease) -> Result<(), PipelineError> {
        let ttl = i64::from(self.config.sync.lease_ttl_seconds) * 1000;
        match self.store.renew_lease(lease, ttl, self.now()).await? {
            Some(renewed) => {
                *lease = renewed;
                Ok(())
            }
            None => Err(StateError::LeaseLost(lease.name.clone()).into()),
        }
    }

    pub(crate) async fn poll_tracked(
        &self,
        lease: &mut Lease,
        deadline: Option<Instant>,
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<bool, PipelineError> {
        let select: Vec<String> = vec!["opportunityid".into(), "versionnumber".into(), "modifiedon".into()];
        // Opportunities read by an earlier poll: a first read of the connections now comes after
        // them (on an initial sync both are read for the first time, and every opportunity is
        // planned anyway).
        let opportunities_read_before = self.store.cursor(Source::Opportunities).await?.is_some();
        let select: Vec<&str> = select.iter().map(String::as_str).collect();
        for (source, set) in [
            (Source::Opportunities, EntitySet::Opportunities),
            (Source::Connections, EntitySet::Connections),
        ] {
            loop {
                if Self::out_of_time(deadline) {
                    return Ok(false);
                }
                let cursor = self.store.cursor(source).await?;
                let columns = if source == Source::Opportunities {
                    &select[..]
                } else {
                    CONNECTION_SELECT
                };
                let page = self
                    .dataverse
                    .changes(set, columns, cursor.as_ref().map(|c| c.value.as_str()))
                    .await?;
                report.full_resync |= page.full_resync;
                match source {
                    Source::Opportunities => {
                        report.opportunity_changes += (page.rows.len() + page.deleted.len()) as u64;
                        self.record_opportunity_changes(&page.rows, &page.deleted, report, marked_now)
                            .await?;
                    }
                    _ => {
                        report.connection_changes += (page.rows.len() + page.deleted.len()) as u64;
                        self.record_connection_changes(&page.rows, &page.deleted, report, marked_now)
                            .await?;
                    }
                }
                crash::point("poll.recorded");
                self.renew(lease).await?;
                // The first read of the connections is a full read too: opportunities synced
                // before it (an earlier poll stopped before the connections' cursor was
                // stored) may name a stakeholder removed meanwhile.
                let first_connections_read =
                    cursor.is_none() && source == Source::Connections && opportunities_read_before;
                if page.full_resync || first_connections_read {
                    // Deletions during the expired window are gone from change tracking; the
                    // full read is followed by a scan that finds them (opportunities) or a
                    // replan of every opportunity (connections: a removed stakeholder is known
                    // only by its absence). The obligation is stored before the cursor moves
                    // past the expiry, so no stop can lose it.
                    let scan = if source == Source::Opportunities {
                        Source::DeletionScan
                    } else {
                        Source::StakeholderScan
                    };
                    self.owe(lease, scan).await?;
                }
                self.store
                    .advance_cursor(lease, source, &page.cursor, self.now())
                    .await?;
                crash::point("poll.cursor");
                if page.caught_up {
                    break;
                }
            }
        }
        self.pay_deletion_scan(lease, report, marked_now).await?;
        self.pay_stakeholder_scan(lease, report, marked_now).await?;
        Ok(true)
    }

    pub(crate) async fn record_opportunity_changes(
        &self,
        rows: &[Value],
        deleted: &[String],
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<(), PipelineError> {
        let mut changes = Vec::with_capacity(rows.len() + deleted.len());
        for row in rows {
            let Some(id) = row["opportunityid"].as_str().and_then(|t| OpportunityId::parse(t).ok()) else {
                // The row itself is not logged: only what identifies the problem.
                tracing::warn!(
                    opportunityid = ?row["opportunityid"].as_str().map(|t| t.chars().take(40).collect::<String>()),
                    "a changed opportunity without a valid opportunityid; skipped"
                );
                continue;
            };
            let version = match &row["versionnumber"] {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            }
            .unwrap_or(0);
            changes.push(PendingChange::upserted(
                id,
                version,
                row["modifiedon"].as_str().map(str::to_owned),
            ));
        }
        for text in deleted {
            match OpportunityId::parse(text) {
                Ok(id) => changes.push(PendingChange::deleted(id)),
                Err(_) => tracing::warn!(id = %text, "a deleted opportunity id that is not a GUID; skipped"),
            }
        }
        self.mark(&changes, report, marked_now).await
    }

    pub(crate) async fn mark(
        &self,
        changes: &[PendingChange],
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<(), PipelineError> {
        for chunk in changes.chunks(1000) {
            let outcomes = self.store.mark_pending(chunk, self.now()).await?;
            for (change, outcome) in chunk.iter().zip(outcomes) {
                match outcome {
                    MarkOutcome::Recorded => {
                        report.marked += 1;
                        marked_now.insert(change.id);
                    }
                    MarkOutcome::Stale => report.stale += 1,
                }
            }
        }
        Ok(())
    }

    pub(crate) async fn record_connection_changes(
        &self,
        rows: &[Value],
        deleted: &[String],
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<(), PipelineError> {
        let mut links = Vec::new();
        for row in rows {
            let touched = oppsync_dynamics::opportunities_touched(std::slice::from_ref(row));
            if let (Some(connection), Some(opportunity)) = (row["connectionid"].as_str(), touched.first()) {
                links.push((connection.to_owned(), *opportunity));
            }
        }
        self.store.remember_links(&links).await?;
        let mut touched: BTreeSet<OpportunityId> = links.iter().map(|(_, o)| *o).collect();
        touched.extend(self.store.linked_opportunities(deleted).await?);
        touched.retain(|id| !marked_now.contains(id));
        self.touch(touched, report, marked_now).await
    }

    /// Opportunities whose related records changed but whose own version did not: new ones are
    /// recorded at version 0 (the transform reads the current record), known ones requeued.
    pub(crate) async fn touch(
        &self,
        ids: BTreeSet<OpportunityId>,
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<(), PipelineError> {
        let changes: Vec<PendingChange> = ids.iter().map(|id| PendingChange::upserted(*id, 0, None)).collect();
        for chunk in changes.chunks(1000) {
            let outcomes = self.store.mark_pending(chunk, self.now()).await?;
            for (change, outcome) in chunk.iter().zip(outcomes) {
                match outcome {
                    MarkOutcome::Recorded => report.marked += 1,
                    MarkOutcome::Stale => {
                        if self.store.requeue(change.id, false, self.now()).await? {
                            report.requeued += 1;
                        }
                    }
                }
                marked_now.insert(change.id);
            }
        }
        Ok(())
    }
}

/// The valid `opportunityid`s of opportunity rows.
pub(crate) fn opportunity_ids(rows: &[Value]) -> impl Iterator<Item = OpportunityId> + '_ {
    rows.iter()
        .filter_map(|r| r["opportunityid"].as_str())
        .filter_map(|t| OpportunityId::parse(t).ok())
}
