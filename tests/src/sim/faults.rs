//! The faults and the clock of one simulated run, drawn from its seed: how long each call to
//! Dataverse, Marketo or the state store takes (virtual time, so calls of different actors
//! interleave differently with every seed), whether it fails before it is applied, whether it
//! is applied but its answer is lost, whether a lost call is applied later still, Marketo
//! outages, and jumps of the clock past claim and lock lifetimes. Every event joins the trace.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use oppsync_dynamics::DataverseError;
use oppsync_marketo::MarketoError;
use oppsync_state::{Millis, StateError};

use super::rng::Rng;

/// Where the simulated time starts: a July day, when Marketo's quota day is on daylight time.
pub const T0: Millis = 1_782_907_200_000;

/// A call applied after its answer was lost lands at most this long after it was sent. The
/// Marketo client gives up on a call after 60 s; the sync relies on a lost call settling
/// within that (a lead-creation lock lasts 60 s), so the simulation draws late landings
/// within it, and longer ones are not a fault the sync claims to survive.
pub const LATE_MAX_MS: u64 = 50_000;

/// The trace keeps this many of the last events (a run has tens of thousands).
const TRACE_KEPT: usize = 600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Dataverse,
    Marketo,
    Store,
}

/// How often each fault strikes, per call (0 turns a class off).
#[derive(Debug, Clone)]
pub struct Rates {
    /// Refused before it was applied (429 or 5xx; 606, 615 or 5xx; a throttled store call).
    pub before: f64,
    /// Applied, but the answer never came (a timeout after the server acted).
    pub lost: f64,
    /// Of the lost Marketo calls, the share applied only later, after calls sent after them.
    pub late: f64,
    /// Marketo's daily quota answers 607 for a call.
    pub quota: f64,
    /// The longest a call takes, in virtual milliseconds.
    pub latency_ms: u64,
}

impl Rates {
    pub fn none() -> Rates {
        Rates {
            before: 0.0,
            lost: 0.0,
            late: 0.0,
            quota: 0.0,
            latency_ms: 50,
        }
    }

    pub fn every_class(rng: &mut Rng) -> Rates {
        Rates {
            before: [0.0, 0.02, 0.05, 0.1][rng.below(4) as usize],
            lost: [0.0, 0.02, 0.05][rng.below(3) as usize],
            late: 0.5,
            quota: [0.0, 0.005][rng.below(2) as usize],
            latency_ms: [50, 500, 3_000][rng.below(3) as usize],
        }
    }
}

/// A fault a call met.
#[derive(Debug, Clone)]
pub struct Fault {
    pub port: Port,
    pub operation: &'static str,
    pub kind: FaultKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// 429 from Dataverse, 606 from Marketo.
    Throttled,
    /// Marketo's 615: too many calls at once.
    Concurrency,
    ServerError,
    Quota,
    Lost,
    Outage,
}

struct Inner {
    rng: Rng,
    rates: Rates,
    /// Marketo answers 503 to everything until then.
    outage_until: Millis,
    trace: VecDeque<String>,
    events: u64,
}

/// The run's faults and clock, shared by every adapter and actor. Cheap to clone.
#[derive(Clone)]
pub struct Faults {
    inner: Arc<Mutex<Inner>>,
    /// Added to the virtual time: a clock that jumped.
    jump: Arc<AtomicI64>,
    start: tokio::time::Instant,
}

impl Faults {
    pub fn new(rng: Rng) -> Faults {
        Faults {
            inner: Arc::new(Mutex::new(Inner {
                rng,
                rates: Rates::none(),
                outage_until: 0,
                trace: VecDeque::new(),
                events: 0,
            })),
            jump: Arc::default(),
            start: tokio::time::Instant::now(),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Now, in Unix milliseconds: the virtual time since the run began, plus any jumps.
    pub fn now(&self) -> Millis {
        T0 + self.start.elapsed().as_millis() as Millis + self.jump.load(Ordering::Relaxed)
    }

    pub fn set_rates(&self, rates: Rates) {
        self.inner().rates = rates;
    }

    pub fn rng(&self) -> Rng {
        self.inner().rng.fork()
    }

    /// Marketo refuses everything for `ms`.
    pub fn outage(&self, ms: i64) {
        let until = self.now() + ms;
        self.inner().outage_until = until;
        self.trace(format!("Marketo outage for {} s", ms / 1000));
    }

    /// The clock jumps ahead (a host clock corrected, a process paused): claims and locks
    /// taken before it expire at once.
    pub fn jump(&self, ms: i64) {
        self.jump.fetch_add(ms, Ordering::Relaxed);
        self.trace(format!("the clock jumps {} s", ms / 1000));
    }

    pub fn trace(&self, event: String) {
        let at = self.now() - T0;
        let mut inner = self.inner();
        inner.events += 1;
        if inner.trace.len() == TRACE_KEPT {
            inner.trace.pop_front();
        }
        inner.trace.push_back(format!("{:>9.3}s {event}", at as f64 / 1000.0));
    }

    /// The last events, oldest first, and how many there were in all.
    pub fn trace_lines(&self) -> (Vec<String>, u64) {
        let inner = self.inner();
        (inner.trace.iter().cloned().collect(), inner.events)
    }

    fn latency(&self) -> Duration {
        let mut inner = self.inner();
        let max = inner.rates.latency_ms;
        Duration::from_millis(inner.rng.below(max + 1))
    }

    /// Before a call is applied: its latency, then whether it is refused.
    pub async fn call(&self, port: Port, operation: &'static str) -> Result<(), Fault> {
        tokio::time::sleep(self.latency()).await;
        let now = self.now();
        let kind = {
            let mut inner = self.inner();
            let rates = inner.rates.clone();
            if port == Port::Marketo && now < inner.outage_until {
                Some(FaultKind::Outage)
            } else if port == Port::Marketo && rates.quota > 0.0 && inner.rng.chance(rates.quota) {
                Some(FaultKind::Quota)
            } else if rates.before > 0.0 && inner.rng.chance(rates.before) {
                Some(if inner.rng.one_in(2) {
                    FaultKind::Throttled
                } else {
                    FaultKind::ServerError
                })
            } else {
                None
            }
        };
        match kind {
            Some(kind) => {
                if kind != FaultKind::Outage {
                    self.trace(format!(
                        "{port:?} {operation}: refused before it was applied ({kind:?})"
                    ));
                }
                Err(Fault { port, operation, kind })
            }
            None => Ok(()),
        }
    }

    /// After a call was applied: whether its answer comes back, and when.
    pub async fn answer(&self, port: Port, operation: &'static str) -> Result<(), Fault> {
        let lost = {
            let mut inner = self.inner();
            let p = inner.rates.lost;
            p > 0.0 && inner.rng.chance(p)
        };
        tokio::time::sleep(self.latency()).await;
        if lost {
            self.trace(format!("{port:?} {operation}: applied, but the answer was lost"));
            return Err(Fault {
                port,
                operation,
                kind: FaultKind::Lost,
            });
        }
        Ok(())
    }

    /// Whether a Marketo call about to be applied is instead applied later, its answer lost
    /// now: how long after, if so.
    pub fn late(&self) -> Option<Duration> {
        let mut inner = self.inner();
        let p = inner.rates.lost * inner.rates.late;
        (p > 0.0 && inner.rng.chance(p)).then(|| Duration::from_millis(inner.rng.range(1_000, LATE_MAX_MS)))
    }
}

impl From<Fault> for DataverseError {
    fn from(f: Fault) -> Self {
        match f.kind {
            FaultKind::Throttled | FaultKind::Concurrency => DataverseError::Throttled { attempts: 5 },
            kind => DataverseError::Transient {
                status: if kind == FaultKind::Lost { 504 } else { 503 },
                attempts: 5,
                message: format!("{}: a fault the simulation drew", f.operation),
            },
        }
    }
}

/// The Marketo operation as its errors name it.
fn endpoint(operation: &'static str) -> &'static str {
    operation
}

impl From<Fault> for MarketoError {
    fn from(f: Fault) -> Self {
        let endpoint = endpoint(f.operation);
        match f.kind {
            FaultKind::Throttled => MarketoError::Api {
                endpoint,
                code: "606".into(),
                message: "Max rate limit exceeded (a fault the simulation drew)".into(),
            },
            FaultKind::Concurrency => MarketoError::Api {
                endpoint,
                code: "615".into(),
                message: "Concurrent access limit reached (a fault the simulation drew)".into(),
            },
            FaultKind::ServerError | FaultKind::Outage => MarketoError::Http { endpoint, status: 503 },
            FaultKind::Quota => MarketoError::QuotaExhausted,
            FaultKind::Lost => MarketoError::Transport {
                endpoint,
                message: "timed out (a fault the simulation drew; the call may have been applied)".into(),
                timeout: true,
            },
        }
    }
}

impl From<Fault> for StateError {
    fn from(f: Fault) -> Self {
        StateError::Dynamo {
            operation: f.operation,
            message: format!("{:?} (a fault the simulation drew)", f.kind),
            retryable: true,
        }
    }
}
