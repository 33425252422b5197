//! Marketo's preflight (an instance that cannot take this configuration's writes stops them
//! before any record is sent) and the day's budget around a run of calls.

use super::*;

/// The day's Marketo count as a run of calls began.
pub(crate) struct Budgeted {
    day: String,
    counted: bool,
}

/// What Marketo's preflight found, as this process knows it.
#[derive(Debug, Default)]
pub(crate) enum Verdict {
    /// Not checked, or the check could not be made (a timeout, the credentials).
    #[default]
    Unknown,
    Passed,
    /// The instance cannot take this configuration's writes; the next write stops on it.
    Blocked(String),
}

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// Marketo's preflight, once per process before its first write: an instance that runs the
    /// native CRM sync, or lacks a mapped field, stops the write before any record is sent (each
    /// would fail alone, with 1018 or 1006). A preflight that could not be made (a timeout, the
    /// credentials) is not a verdict: the write goes on and meets the cause itself, and the
    /// next write checks again; so does the write after a stop, so a fixed instance is noticed.
    pub(crate) async fn preflight(&self) -> Option<Stop> {
        let mut verdict = self.preflight.lock().await;
        if matches!(*verdict, Verdict::Unknown) {
            *verdict = self.check_marketo().await;
        }
        match std::mem::take(&mut *verdict) {
            Verdict::Passed => {
                *verdict = Verdict::Passed;
                None
            }
            Verdict::Blocked(why) => Some(Stop::Preflight(why)),
            Verdict::Unknown => None,
        }
    }

    /// The preflight ahead of the write, while Dataverse is read: at seconds a Marketo call it
    /// is one round trip, which this way costs nothing unless the reads are shorter. Its
    /// verdict waits for the first write.
    /// Its describes are counted against the day's budget like any call; the metrics say so.
    pub(crate) async fn preflight_early(&self) -> Metrics {
        let mut metrics = Metrics::default();
        let mut verdict = self.preflight.lock().await;
        if !matches!(*verdict, Verdict::Unknown) {
            return metrics;
        }
        let budget = match self.open_budget().await {
            Ok(b) => b,
            Err(e) => {
                // Left to the write, which meets the store's trouble itself.
                tracing::warn!(error = %e, "could not read the day's Marketo calls; the preflight waits for the write");
                return metrics;
            }
        };
        *verdict = self.check_marketo().await;
        if let Err(e) = self.close_budget(budget, &mut metrics).await {
            tracing::warn!(error = %e, "could not count the preflight's calls in the day's budget");
        }
        metrics
    }

    /// Before calls to Marketo: the day's count so far, from the store unless the adapter
    /// counts each call there itself (the budget holds across processes), and the calls made.
    pub(crate) async fn open_budget(&self) -> Result<Budgeted, StateError> {
        let day = time::marketo_day(self.now());
        let counted = self.share_budget().await;
        if !counted {
            let used = self.store.marketo_calls(&day).await?;
            self.marketo.set_calls_today(used);
        }
        self.accounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| self.marketo.calls_by_endpoint());
        Ok(Budgeted { day, counted })
    }

    /// After them: the calls made since the last close (of this write, or of one that
    /// overlapped it), counted in `metrics` and, unless the adapter did, in the day's count in
    /// the store. Overlapping writes each count a call once; which of them counts it does not
    /// matter to a drain, which adds them up.
    pub(crate) async fn close_budget(&self, budget: Budgeted, metrics: &mut Metrics) -> Result<u64, StateError> {
        let mut calls = 0;
        let now = self.marketo.calls_by_endpoint();
        let before = self
            .accounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(now.clone())
            .unwrap_or_default();
        for (endpoint, n) in &now {
            let delta = n.saturating_sub(before.get(endpoint).copied().unwrap_or(0));
            if delta > 0 {
                calls += delta;
                metrics.count(format!("MarketoCalls.{endpoint}"), delta);
            }
        }
        if calls > 0 && !budget.counted {
            self.store.add_marketo_calls(&budget.day, calls).await?;
        }
        Ok(calls)
    }

    async fn check_marketo(&self) -> Verdict {
        let fields: Vec<String> = self
            .config
            .mapping
            .fields
            .iter()
            .map(|f| f.marketo.to_string())
            .collect();
        match self.marketo.preflight(&fields).await {
            Ok(found) => match found.blocked {
                Some(blocked) => Verdict::Blocked(blocked),
                None if !found.missing_fields.is_empty() => Verdict::Blocked(format!(
                    "the instance has no opportunity field {}; nothing was sent. Fix: create the fields in Marketo (Admin > Field Management); or remove them from [mapping] and run `oppsync resync --all`, so that the plans already made are made again",
                    found.missing_fields.join(", ")
                )),
                None => Verdict::Passed,
            },
            Err(e) => {
                tracing::debug!(error = %e, "Marketo's preflight could not be made; writing");
                Verdict::Unknown
            }
        }
    }
}
