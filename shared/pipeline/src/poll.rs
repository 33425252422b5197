//! The poll: what changed in Dynamics becomes pending records, then the cursors move
//! (change tracking or a watermark), with the deletion scan after a full re-read, `peek` (what a
//! poll would record, cursors untouched) and the sweep of records stuck in a claim.

use super::*;

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

/// The [`Source::DeletionScan`] values: a scan is owed, or none is.
const SCAN_OWED: &str = "owed";
const SCAN_DONE: &str = "done";

/// The cursor of a watermark strategy, stored as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WatermarkCursor {
    pub(crate) watermark: Watermark,
    /// Polls since the last full scan for deletions.
    pub(crate) polls: u32,
    /// Where the watermark stood at recent polls (when, and where), oldest first: each poll
    /// reads from the one `watermark_overlap_seconds` ago. Absent in cursors from before.
    #[serde(default)]
    pub(crate) history: Vec<(Millis, Watermark)>,
    /// Where a read that stopped partway (the run's deadline, an error) had reached: the next
    /// poll goes on from here instead of starting the read over, so a first poll of a large
    /// table is recorded a page at a time and always moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reading: Option<Watermark>,
}

/// At most this many history entries (one a poll) are kept, whatever the overlap.
const WATERMARK_HISTORY_MAX: usize = 1_000;

/// A `modifiedon` watermark keeps at most this many rows seen at its second (about 50 KB as
/// JSON); a larger tie (a bulk import) is read again from its second's start instead, which
/// records nothing twice (each row is already at its version). Unbounded, a 5,000-row tie made
/// a 480 KB cursor, past DynamoDB's 400 KB item limit.
const WATERMARK_SEEN_MAX: usize = 1_000;

impl WatermarkCursor {
    /// The cursor as stored: bounded whatever the ties. The history's watermarks keep no rows:
    /// one at the watermark's second reads with the watermark's rows, an older one is where an
    /// overlapping re-read starts, which re-reads on from there anyway.
    fn bounded(&self) -> WatermarkCursor {
        let cap = |w: &Watermark, keep: usize| match w {
            Watermark::ModifiedOn { at, seen } if seen.len() > keep => Watermark::ModifiedOn {
                at: at.clone(),
                seen: Vec::new(),
            },
            other => other.clone(),
        };
        WatermarkCursor {
            watermark: cap(&self.watermark, WATERMARK_SEEN_MAX),
            polls: self.polls,
            history: self.history.iter().map(|(at, w)| (*at, cap(w, 0))).collect(),
            reading: self.reading.as_ref().map(|w| cap(w, WATERMARK_SEEN_MAX)),
        }
    }

    /// Where a poll at `now` reads from: the newest watermark at least `overlap_ms` old, else
    /// the oldest one kept.
    /// A history entry at the watermark's own second reads as the watermark, with the rows it
    /// has seen there (stored history keeps none: see [`WatermarkCursor::bounded`]).
    pub(crate) fn read_from(&self, now: Millis, overlap_ms: i64) -> Watermark {
        let from = self
            .history
            .iter()
            .rev()
            .find(|(at, _)| *at <= now - overlap_ms)
            .or(self.history.first())
            .map_or_else(|| self.watermark.clone(), |(_, w)| w.clone());
        match (&from, &self.watermark) {
            (Watermark::ModifiedOn { at: a, .. }, Watermark::ModifiedOn { at: b, .. }) if a == b => {
                self.watermark.clone()
            }
            _ => from,
        }
    }

    /// Records where the watermark stands now, and forgets what no later read can start from.
    pub(crate) fn advance(&mut self, next: Watermark, now: Millis, overlap_ms: i64) {
        self.watermark = next.clone().later(self.watermark.clone());
        self.history.push((now, self.watermark.clone()));
        let old_enough = self.history.iter().rposition(|(at, _)| *at <= now - overlap_ms);
        if let Some(keep_from) = old_enough {
            self.history.drain(..keep_from);
        }
        let excess = self.history.len().saturating_sub(WATERMARK_HISTORY_MAX);
        self.history.drain(..excess);
    }
}

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// Reads what changed in Dynamics since the cursors and records each changed opportunity as
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
                let first_connections_read = cursor.is_none() && source == Source::Connections;
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

    /// Records that a scan is owed (see [`Source::DeletionScan`], [`Source::StakeholderScan`]).
    async fn owe(&self, lease: &mut Lease, scan: Source) -> Result<(), PipelineError> {
        self.store.advance_cursor(lease, scan, SCAN_OWED, self.now()).await?;
        Ok(())
    }

    async fn owed(&self, scan: Source) -> Result<bool, PipelineError> {
        Ok(self.store.cursor(scan).await?.is_some_and(|c| c.value == SCAN_OWED))
    }

    /// Plans every opportunity again if a stakeholder scan is owed: the synced, ready and
    /// pending ones are put back to pending (a plan that is what Marketo holds costs no Marketo
    /// call; a transform or write in flight, which may have read the stakeholders before the
    /// removal, loses its claim), so a stakeholder removed while the connections' token was
    /// expired loses its role. Then clears the obligation.
    async fn pay_stakeholder_scan(
        &self,
        lease: &mut Lease,
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<(), PipelineError> {
        if !self.owed(Source::StakeholderScan).await? {
            return Ok(());
        }
        for status in [Status::Synced, Status::Ready, Status::Pending] {
            for id in self.ids_in(status, |_| true, None).await? {
                if !marked_now.contains(&id) && self.store.requeue(id, false, self.now()).await? {
                    report.requeued += 1;
                    marked_now.insert(id);
                }
            }
            self.renew(lease).await?;
        }
        self.store
            .advance_cursor(lease, Source::StakeholderScan, SCAN_DONE, self.now())
            .await?;
        Ok(())
    }

    /// Runs the deletion scan if one is owed, by this run or an earlier one that stopped (its
    /// deadline, an error, a scan refused by the deletion guard) before it could; then clears
    /// the obligation.
    async fn pay_deletion_scan(
        &self,
        lease: &mut Lease,
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<(), PipelineError> {
        if !self.owed(Source::DeletionScan).await? {
            return Ok(());
        }
        report.deletion_scan = true;
        self.scan_deletions(report, marked_now).await?;
        self.renew(lease).await?;
        self.store
            .advance_cursor(lease, Source::DeletionScan, SCAN_DONE, self.now())
            .await?;
        Ok(())
    }

    pub(crate) async fn poll_watermark(
        &self,
        lease: &mut Lease,
        deadline: Option<Instant>,
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<bool, PipelineError> {
        for (source, set) in [
            (Source::Opportunities, EntitySet::Opportunities),
            (Source::Connections, EntitySet::Connections),
        ] {
            let mut cursor = self.watermark_cursor(source).await?;
            let overlap_ms = i64::from(self.config.dataverse.watermark_overlap_seconds) * 1000;
            let columns: Vec<&str> = if source == Source::Opportunities {
                vec!["opportunityid"]
            } else {
                CONNECTION_SELECT.to_vec()
            };
            // Read from where the watermark stood a while ago: a row committed after the last
            // read with an earlier stamp is read now; the ones read before are stale marks. A
            // read that stopped partway goes on from where it reached.
            let from = match cursor.reading.clone() {
                Some(reached) => reached,
                None => cursor.read_from(self.now(), overlap_ms),
            };
            let mut reached = from.clone();
            let mut link: Option<String> = None;
            loop {
                if Self::out_of_time(deadline) {
                    return Ok(false);
                }
                let page = self
                    .dataverse
                    .watermark_page(set, &columns, &from, link.as_deref())
                    .await?;
                match source {
                    Source::Opportunities => {
                        report.opportunity_changes += page.rows.len() as u64;
                        self.record_opportunity_changes(&page.rows, &[], report, marked_now)
                            .await?;
                    }
                    _ => {
                        report.connection_changes += page.rows.len() as u64;
                        self.record_connection_changes(&page.rows, &[], report, marked_now)
                            .await?;
                    }
                }
                crash::point("poll.recorded");
                reached = page.reached.later(reached);
                self.renew(lease).await?;
                let Some(next) = page.next else { break };
                // Recorded up to `reached`: a stop from here on goes on from it.
                cursor.reading = Some(reached.clone());
                self.store_watermark(lease, source, &cursor).await?;
                crash::point("poll.cursor");
                link = Some(next);
            }
            let polls = cursor.polls + 1;
            let due = source == Source::Opportunities && polls >= self.config.dataverse.full_scan_every;
            if due {
                // Stored before the count resets with the cursor, so no stop can lose it.
                self.owe(lease, Source::DeletionScan).await?;
            }
            cursor.reading = None;
            cursor.advance(reached, self.now(), overlap_ms);
            cursor.polls = if due { 0 } else { polls };
            self.store_watermark(lease, source, &cursor).await?;
            crash::point("poll.cursor");
        }
        self.pay_deletion_scan(lease, report, marked_now).await?;
        self.pay_stakeholder_scan(lease, report, marked_now).await?;
        Ok(true)
    }

    /// A watermark strategy's stored cursor, or the one before every row.
    async fn watermark_cursor(&self, source: Source) -> Result<WatermarkCursor, PipelineError> {
        match self.store.cursor(source).await? {
            Some(c) => Ok(
                serde_json::from_str::<WatermarkCursor>(&c.value).map_err(|e| StateError::Corrupt {
                    key: format!("cursor {}", source.as_str()),
                    reason: format!(
                        "{e}; a cursor from another change-detection strategy? Reset it with a full resync"
                    ),
                })?,
            ),
            None => Ok(WatermarkCursor {
                watermark: self.first_watermark(),
                polls: 0,
                history: Vec::new(),
                reading: None,
            }),
        }
    }

    async fn store_watermark(
        &self,
        lease: &Lease,
        source: Source,
        cursor: &WatermarkCursor,
    ) -> Result<(), PipelineError> {
        let value = serde_json::to_string(&cursor.bounded()).map_err(|e| StateError::Corrupt {
            key: "cursor".into(),
            reason: e.to_string(),
        })?;
        self.store.advance_cursor(lease, source, &value, self.now()).await?;
        Ok(())
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

    /// Finds opportunities deleted while no change tracking saw it: every id the store knows
    /// (listed first, so a record created meanwhile is not mistaken for a deletion) that
    /// Dataverse no longer has.
    pub(crate) async fn scan_deletions(
        &self,
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<(), PipelineError> {
        let mut known = Vec::new();
        for status in Status::ALL {
            if status == Status::Deleted {
                continue;
            }
            known.extend(self.ids_in(status, |s| !s.deleted, None).await?);
        }
        let known_count = known.len();
        let present = self.dataverse.all_ids(EntitySet::Opportunities).await?;
        let gone: Vec<PendingChange> = known
            .into_iter()
            .filter(|id| !present.contains(&id.0))
            .map(PendingChange::deleted)
            .collect();
        let limit = self.config.sync.max_deletion_percent as usize;
        if gone.len() > 10 && gone.len() * 100 > known_count * limit {
            return Err(PipelineError::Refused(format!(
                "the deletion scan found {} of {known_count} known opportunities missing from Dataverse ({}%), over [sync] \
                 max_deletion_percent ({limit}%); nothing was deleted. If the application user lost read access, fix its \
                 security role; if the deletions are real, raise max_deletion_percent for the next run",
                gone.len(),
                gone.len() * 100 / known_count.max(1)
            )));
        }
        tracing::info!(deletions = gone.len(), "deletion scan");
        report.opportunity_changes += gone.len() as u64;
        self.mark(&gone, report, marked_now).await
    }

    /// The opportunities a poll would record now: read from the stored cursors, which do not
    /// move, and nothing is recorded (`oppsync plan`). Deletions a watermark cannot see are
    /// left to the poll's periodic scan.
    pub async fn peek(&self) -> Result<BTreeSet<OpportunityId>, PipelineError> {
        let mut ids = BTreeSet::new();
        let opportunity_columns = ["opportunityid"];
        for (source, set) in [
            (Source::Opportunities, EntitySet::Opportunities),
            (Source::Connections, EntitySet::Connections),
        ] {
            let columns: &[&str] = if source == Source::Opportunities {
                &opportunity_columns
            } else {
                CONNECTION_SELECT
            };
            // Page by page: what a page names is kept as ids, not rows.
            match self.config.dataverse.change_detection {
                ChangeDetection::ChangeTracking => {
                    let mut cursor = self.store.cursor(source).await?.map(|c| c.value);
                    loop {
                        let page = self.dataverse.changes(set, columns, cursor.as_deref()).await?;
                        self.peeked(source, &page.rows, &page.deleted, &mut ids).await?;
                        cursor = Some(page.cursor);
                        if page.caught_up {
                            break;
                        }
                    }
                }
                _ => {
                    let cursor = self.watermark_cursor(source).await?;
                    let from = cursor.reading.unwrap_or(cursor.watermark);
                    self.each_watermark_page(set, columns, &from, |rows| match source {
                        Source::Opportunities => ids.extend(opportunity_ids(&rows)),
                        _ => ids.extend(oppsync_dynamics::opportunities_touched(&rows)),
                    })
                    .await?;
                }
            }
        }
        Ok(ids)
    }

    /// The ids of the records in `status` that `keep` keeps, read from the store page by page,
    /// at most `limit` of them (all without one).
    pub async fn ids_in(
        &self,
        status: Status,
        keep: impl Fn(&OpportunityState) -> bool,
        limit: Option<usize>,
    ) -> Result<Vec<OpportunityId>, PipelineError> {
        let limit = limit.unwrap_or(usize::MAX);
        let mut ids = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let listed = self.store.list(status, limit.clamp(1, 1000), page.as_deref()).await?;
            ids.extend(listed.items.iter().filter(|s| keep(s)).map(|s| s.id));
            match listed.next {
                Some(next) if ids.len() < limit => page = Some(next),
                _ => break,
            }
        }
        ids.truncate(limit);
        Ok(ids)
    }

    /// Every page of a watermark read from `from`, each handed to `visit` as it comes.
    pub(crate) async fn each_watermark_page(
        &self,
        set: EntitySet,
        columns: &[&str],
        from: &Watermark,
        mut visit: impl FnMut(Vec<Value>),
    ) -> Result<(), PipelineError> {
        let mut link: Option<String> = None;
        loop {
            let page = self
                .dataverse
                .watermark_page(set, columns, from, link.as_deref())
                .await?;
            visit(page.rows);
            match page.next {
                Some(next) => link = Some(next),
                None => return Ok(()),
            }
        }
    }

    /// The opportunities one page of changes names (`peek`).
    async fn peeked(
        &self,
        source: Source,
        rows: &[Value],
        deleted: &[String],
        ids: &mut BTreeSet<OpportunityId>,
    ) -> Result<(), PipelineError> {
        match source {
            Source::Opportunities => {
                ids.extend(opportunity_ids(rows));
                ids.extend(deleted.iter().filter_map(|t| OpportunityId::parse(t).ok()));
            }
            _ => {
                ids.extend(oppsync_dynamics::opportunities_touched(rows));
                if !deleted.is_empty() {
                    ids.extend(self.store.linked_opportunities(deleted).await?);
                }
            }
        }
        Ok(())
    }

    /// Requeues open records nobody has touched for `stuck_after_minutes`: a worker died, a
    /// stream delivery went to the dead-letter queue, or a retry was never redelivered.
    pub async fn sweep_stuck(&self) -> Result<u64, PipelineError> {
        let now = self.now();
        let cutoff = now - i64::from(self.config.sync.stuck_after_minutes) * 60_000;
        let mut requeued = 0;
        for status in [Status::Pending, Status::Ready] {
            let mut page: Option<String> = None;
            'pages: loop {
                let listed = self.store.list(status, 500, page.as_deref()).await?;
                for item in &listed.items {
                    // The view lists oldest in its status first: once one entered its status
                    // after the cutoff, so did the rest, and none can be stuck.
                    if item.status_since > cutoff {
                        break 'pages;
                    }
                    // Waiting long but touched lately (a newer version, a retry): not stuck,
                    // and not a reason to stop looking at the ones behind it.
                    if item.updated_at > cutoff {
                        continue;
                    }
                    // Waiting out a retry's backoff is not stuck: `wake_due` hands it back.
                    if item.retry_at.is_some() {
                        continue;
                    }
                    if item.claim_until.is_none_or(|until| until <= now)
                        && self.store.requeue(item.id, true, now).await?
                    {
                        tracing::warn!(opportunity = %item.id, status = %status, "requeued a stuck record");
                        requeued += 1;
                    }
                }
                match listed.next {
                    Some(next) => page = Some(next),
                    None => break,
                }
            }
        }
        Ok(requeued)
    }

    /// Hands ready records whose retry wait has ended back to the writer (the stream sees the
    /// wait end; the local drain does not wait). Returns how many.
    pub async fn wake_due(&self) -> Result<u64, PipelineError> {
        let now = self.now();
        let mut woken = 0;
        let mut page: Option<String> = None;
        loop {
            let listed = self.store.list(Status::Ready, 500, page.as_deref()).await?;
            for item in &listed.items {
                let due = item.retry_at.is_some_and(|at| at <= now);
                let free = item.claim_until.is_none_or(|until| until <= now);
                if due && free && self.store.wake(item.id, now).await? {
                    woken += 1;
                }
            }
            match listed.next {
                Some(next) => page = Some(next),
                None => break,
            }
        }
        if woken > 0 {
            tracing::info!(records = woken, "retry waits ended; records handed back to the writer");
        }
        Ok(woken)
    }
}

/// The valid `opportunityid`s of opportunity rows.
pub(crate) fn opportunity_ids(rows: &[Value]) -> impl Iterator<Item = OpportunityId> + '_ {
    rows.iter()
        .filter_map(|r| r["opportunityid"].as_str())
        .filter_map(|t| OpportunityId::parse(t).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_history_keeps_just_the_overlap_and_never_moves_back() {
        let overlap = 180_000;
        let mut cursor = WatermarkCursor {
            watermark: Watermark::Version(0),
            polls: 0,
            history: Vec::new(),
            reading: None,
        };
        assert_eq!(cursor.read_from(0, overlap), Watermark::Version(0), "nothing kept yet");
        for poll in 1..=10_i64 {
            let now = poll * 60_000;
            let from = cursor.read_from(now, overlap);
            if poll > 4 {
                // The watermark as it stood three minutes (three polls) ago.
                assert_eq!(from, Watermark::Version((poll - 3) * 100), "poll {poll}");
            }
            cursor.advance(Watermark::Version(poll * 100), now, overlap);
            assert!(cursor.history.len() <= 5, "{:?}", cursor.history);
        }
        // A read from an earlier point that finds less (rows deleted since) does not move it back.
        cursor.advance(Watermark::Version(50), 11 * 60_000, overlap);
        assert_eq!(cursor.watermark, Watermark::Version(1000));
    }
}
