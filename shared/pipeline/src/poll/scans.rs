//! The scans a poll owes after a full read: deletions (opportunities gone while change tracking
//! could not see them) and stakeholders (connections gone likewise). Each is an obligation stored
//! before the cursor moves, paid by this poll or a later one.

use super::*;

/// The [`Source::DeletionScan`] values: a scan is owed, or none is.
pub(super) const SCAN_OWED: &str = "owed";
pub(super) const SCAN_DONE: &str = "done";

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// Records that a scan is owed (see [`Source::DeletionScan`], [`Source::StakeholderScan`]).
    pub(crate) async fn owe(&self, lease: &mut Lease, scan: Source) -> Result<(), PipelineError> {
        self.store.advance_cursor(lease, scan, SCAN_OWED, self.now()).await?;
        Ok(())
    }

    pub(crate) async fn owed(&self, scan: Source) -> Result<bool, PipelineError> {
        Ok(self.store.cursor(scan).await?.is_some_and(|c| c.value == SCAN_OWED))
    }

    /// Plans every opportunity again if a stakeholder scan is owed: the synced, ready and
    /// pending ones are put back to pending (a plan that is what Marketo holds costs no Marketo
    /// call; a transform or write in flight, which may have read the stakeholders before the
    /// removal, loses its claim), so a stakeholder removed while the connections' token was
    /// expired loses its role. Then clears the obligation.
    pub(crate) async fn pay_stakeholder_scan(
        &self,
        lease: &mut Lease,
        report: &mut PollReport,
        marked_now: &mut BTreeSet<OpportunityId>,
    ) -> Result<(), PipelineError> {
        if !self.owed(Source::StakeholderScan).await? {
            return Ok(());
        }
        for status in [Status::Synced, Status::Ready, Status::Pending] {
            let ids: Vec<OpportunityId> = self
                .ids_in(status, |_| true, None)
                .await?
                .into_iter()
                .filter(|id| !marked_now.contains(id))
                .collect();
            // Several requeues in flight at once: on DynamoDB each is a round trip, and a
            // scan of a large table one after another would outlast the poller's deadline.
            let now = self.now();
            let requeues: Vec<_> = ids
                .iter()
                .copied()
                .map(|id| self.store.requeue(id, false, now))
                .collect();
            for (id, requeued) in ids.iter().zip(overlapped(requeues).await) {
                if requeued? {
                    report.requeued += 1;
                    marked_now.insert(*id);
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
    pub(crate) async fn pay_deletion_scan(
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
}
