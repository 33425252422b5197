//! The Marketo budget shared by every process that writes to one instance (Lambda writers, the
//! resync function, an `oppsync` command on the same table): the day's calls are counted in
//! the state store before each call, and the rate and calls at once are split equally among the
//! processes writing now.

use futures_util::future::BoxFuture;
use oppsync_marketo::{CallLedger, Taken};

use super::*;

/// How long a process counts as writing after it last said so. It says so before each write and
/// each write step, so a live writer never lapses; a dead one stops counting within this time.
pub(crate) const MEMBER_TTL_MS: i64 = 120_000;

/// The day's call count and the budget's members in the state store. Each call renews this
/// process's membership and reads how many share the budget, so a process that joins shrinks
/// the others' shares from their next call on.
struct StoreLedger<S> {
    store: S,
    clock: Clock,
    member: String,
}

impl<S: StateStore> CallLedger for StoreLedger<S> {
    fn take(&self, budget: u64) -> BoxFuture<'static, Result<Taken, String>> {
        let (store, member) = (self.store.clone(), self.member.clone());
        let now = (self.clock)();
        let day = time::marketo_day(now);
        Box::pin(async move {
            let sharers = store
                .join_budget(&member, now + MEMBER_TTL_MS, now)
                .await
                .map_err(|e| e.to_string())?;
            let used = store.take_marketo_call(&day, budget).await.map_err(|e| e.to_string())?;
            Ok(Taken {
                used,
                sharers: sharers as usize,
            })
        })
    }
}

/// A name for this process among the budget's members, unique across processes.
pub(crate) fn member_name(owner: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("{owner}#{:016x}", h.finish())
}

impl<S: StateStore, D: DataversePort, M: MarketoPort> Pipeline<S, D, M> {
    /// Counts this process among the budget's members (renewing it) and takes its share of the
    /// rate and calls at once; the first time, has the Marketo adapter count each call in the
    /// store before sending it. Every write does this first; a process may do it earlier, so
    /// that its share is known before any other process's first call. Returns whether the
    /// adapter counts its calls in the store (false for an in-memory adapter: the write adds
    /// them after).
    pub async fn share_budget(&self) -> bool {
        let counted = *self.counted.get_or_init(|| {
            self.marketo.count_calls_in(Arc::new(StoreLedger {
                store: self.store.clone(),
                clock: self.clock.clone(),
                member: self.member.clone(),
            }))
        });
        let now = self.now();
        match self.store.join_budget(&self.member, now + MEMBER_TTL_MS, now).await {
            Ok(members) => self.marketo.share_limits_with(members as usize),
            // The share stays what it was; the store's trouble shows in the write's own calls.
            Err(e) => tracing::warn!(error = %e, "could not count this process among the Marketo budget's members"),
        }
        counted
    }

    /// Withdraws this process from the budget's members, so the others' shares grow at once
    /// (the command, when it finishes; a Lambda function's membership lapses by itself).
    pub async fn leave_budget(&self) {
        if let Err(e) = self.store.leave_budget(&self.member).await {
            tracing::warn!(error = %e, "could not withdraw from the Marketo budget's members; the membership lapses by itself");
        }
    }
}
