//! What a poll does besides reading: `peek` (what a poll would record, cursors untouched), the
//! paging listing of a status, the sweep of records stuck in a claim and the wake of records
//! whose retry wait ended.

use super::*;

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
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

    /// The opportunities one page of changes names (`peek`).
    pub(crate) async fn peeked(
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
