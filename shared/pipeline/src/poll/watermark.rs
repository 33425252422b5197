//! The watermark strategies (`versionnumber` or `modifiedon`, for tables read without change
//! tracking): the cursor, bounded whatever the ties, and the read from it.

use super::*;

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
    pub(crate) fn bounded(&self) -> WatermarkCursor {
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
    pub(crate) async fn watermark_cursor(&self, source: Source) -> Result<WatermarkCursor, PipelineError> {
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

    pub(crate) async fn store_watermark(
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
