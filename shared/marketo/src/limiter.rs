//! The process-wide limiter: calls per sliding window and calls in flight.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How much of the instance's shared limits this integration may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimiterSettings {
    /// Calls per window: default 50, half of Marketo's 100 per 20 s.
    pub calls_per_window: usize,
    pub window: Duration,
    /// Calls in flight: default 5, half of Marketo's 10.
    pub concurrency: usize,
}

impl Default for LimiterSettings {
    fn default() -> Self {
        LimiterSettings {
            calls_per_window: 50,
            window: Duration::from_secs(20),
            concurrency: 5,
        }
    }
}

/// Shared by every call of a process (clone it; clones share the limits). Its share of the
/// settings can change while it runs: with `n` processes writing to one instance, each takes
/// 1/n of the calls per window and of the calls at once (at least one of each).
#[derive(Clone, Debug)]
pub struct Limiter {
    settings: LimiterSettings,
    state: Arc<Mutex<State>>,
    freed: Arc<Notify>,
}

#[derive(Debug, Default)]
struct State {
    sent: VecDeque<Instant>,
    in_flight: usize,
    /// How many processes share the settings (1: this one alone).
    sharers: usize,
}

/// A call's place among the calls at once, given back when the call returns.
#[derive(Debug)]
pub struct Permit {
    state: Arc<Mutex<State>>,
    freed: Arc<Notify>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        lock(&self.state).in_flight -= 1;
        self.freed.notify_waiters();
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Limiter {
    pub fn new(settings: LimiterSettings) -> Self {
        let settings = LimiterSettings {
            calls_per_window: settings.calls_per_window.max(1),
            concurrency: settings.concurrency.max(1),
            ..settings
        };
        Limiter {
            settings,
            state: Arc::new(Mutex::new(State {
                sharers: 1,
                ..State::default()
            })),
            freed: Arc::new(Notify::new()),
        }
    }

    /// The settings this process was given (its whole share when it writes alone).
    pub fn settings(&self) -> LimiterSettings {
        self.settings
    }

    /// Shares the settings with `sharers` processes in all (this one included): from the next
    /// call on, this process uses 1/`sharers` of each limit.
    pub fn share_with(&self, sharers: usize) {
        lock(&self.state).sharers = sharers.max(1);
        self.freed.notify_waiters();
    }

    /// The limits in force now: this process's share of the settings.
    pub fn in_force(&self) -> LimiterSettings {
        let sharers = lock(&self.state).sharers;
        LimiterSettings {
            calls_per_window: (self.settings.calls_per_window / sharers).max(1),
            concurrency: (self.settings.concurrency / sharers).max(1),
            window: self.settings.window,
        }
    }

    /// How long a sent call counts against the window here: the window and a margin. Marketo
    /// counts a call when it arrives, this limiter when it leaves; a call that waits for a
    /// connection or meets a slower network arrives later than one sent a window before it, and
    /// without the margin two such calls fall into one of Marketo's windows (a two-writer test
    /// drew a 606 that way). A 40th of the window, at least 50 ms: 500 ms of Marketo's 20 s.
    fn hold(&self) -> Duration {
        self.settings.window + (self.settings.window / 40).max(Duration::from_millis(50))
    }

    /// Waits for a free slot in both limits; the call holds the permit until it returns.
    pub async fn acquire(&self) -> Permit {
        let hold = self.hold();
        loop {
            // Registered before the check, so a permit freed in between is not missed.
            let freed = self.freed.notified();
            let wait = {
                let limits = self.in_force();
                let mut state = lock(&self.state);
                let now = Instant::now();
                while state.sent.front().is_some_and(|t| now.duration_since(*t) >= hold) {
                    state.sent.pop_front();
                }
                if state.in_flight >= limits.concurrency {
                    None
                } else if state.sent.len() < limits.calls_per_window {
                    state.sent.push_back(now);
                    state.in_flight += 1;
                    return Permit {
                        state: Arc::clone(&self.state),
                        freed: Arc::clone(&self.freed),
                    };
                } else {
                    // The oldest call leaves the window at front + hold.
                    let len = state.sent.len();
                    state.sent.get(len - limits.calls_per_window).map(|t| *t + hold - now)
                }
            };
            match wait {
                // Every call at once is taken: wait for one to return.
                None => freed.await,
                Some(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d + Duration::from_millis(1)) => {}
                        _ = freed => {}
                    }
                }
            }
        }
    }
}

/// The `[marketo]` section of oppsync's configuration: how much of the shared instance to use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Calls per 20 seconds, of Marketo's 100 per instance.
    #[serde(default = "default_calls")]
    pub calls_per_20s: u32,
    /// Calls in flight, of Marketo's 10 per instance.
    #[serde(default = "default_concurrent")]
    pub concurrent_calls: u32,
    /// Calls per day, of the instance's quota (50,000 unless the subscription says otherwise).
    #[serde(default = "default_budget")]
    pub daily_budget: u64,
}

fn default_calls() -> u32 {
    50
}
fn default_concurrent() -> u32 {
    5
}
fn default_budget() -> u64 {
    40_000
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            calls_per_20s: default_calls(),
            concurrent_calls: default_concurrent(),
            daily_budget: default_budget(),
        }
    }
}

/// The smallest daily budget the configuration accepts.
pub const MIN_DAILY_BUDGET: u64 = 100;

impl LimitsConfig {
    /// Reads the `[marketo]` table of a configuration file (absent: the defaults) and checks it.
    /// Each error names the key and the fix.
    pub fn from_toml(document: &str) -> Result<LimitsConfig, Vec<String>> {
        #[derive(serde::Deserialize)]
        struct Doc {
            #[serde(default)]
            marketo: Option<LimitsConfig>,
        }
        let doc: Doc = toml::from_str(document).map_err(|e| vec![format!("marketo: {}", one_line(&e))])?;
        let config = doc.marketo.unwrap_or_default();
        let mut errors = Vec::new();
        if !(1..=100).contains(&config.calls_per_20s) {
            errors.push(format!(
                "marketo.calls_per_20s: {} is outside 1..=100. Fix: Marketo allows 100 calls per 20 s for the whole instance; 50 leaves room for other integrations",
                config.calls_per_20s
            ));
        }
        if !(1..=10).contains(&config.concurrent_calls) {
            errors.push(format!(
                "marketo.concurrent_calls: {} is outside 1..=10. Fix: Marketo allows 10 concurrent calls for the whole instance; 5 leaves room for other integrations",
                config.concurrent_calls
            ));
        }
        // A write of 1,500 opportunities takes about 55 calls; a budget that cannot cover one
        // would stop the same write every day and never finish it.
        if config.daily_budget < MIN_DAILY_BUDGET {
            errors.push(format!(
                "marketo.daily_budget: {} is under {MIN_DAILY_BUDGET}, too few for one write of 1,500 opportunities. Fix: set it below the instance's daily quota, like 40000",
                config.daily_budget
            ));
        }
        if errors.is_empty() { Ok(config) } else { Err(errors) }
    }

    /// The limiter these settings describe.
    pub fn limiter(&self) -> LimiterSettings {
        LimiterSettings {
            calls_per_window: self.calls_per_20s as usize,
            window: Duration::from_secs(20),
            concurrency: self.concurrent_calls as usize,
        }
    }
}

/// A TOML error on one line, with the line it points at (which names the key).
fn one_line(e: &toml::de::Error) -> String {
    e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_half_the_shared_limits_and_a_budget_below_the_quota() {
        let c = LimitsConfig::from_toml("").unwrap();
        assert_eq!((c.calls_per_20s, c.concurrent_calls, c.daily_budget), (50, 5, 40_000));
        assert_eq!(c.limiter(), LimiterSettings::default());
    }

    #[test]
    fn values_past_marketos_limits_are_errors_naming_the_key() {
        let errors =
            LimitsConfig::from_toml("[marketo]\ncalls_per_20s = 150\nconcurrent_calls = 0\ndaily_budget = 0\n")
                .unwrap_err();
        assert_eq!(errors.len(), 3);
        assert!(errors[0].starts_with("marketo.calls_per_20s") && errors[0].contains("Fix:"));
        assert!(errors[1].starts_with("marketo.concurrent_calls"));
        assert!(errors[2].starts_with("marketo.daily_budget"));
        let typo = LimitsConfig::from_toml("[marketo]\ncalls_per_20_s = 10\n").unwrap_err();
        assert!(typo[0].contains("calls_per_20_s"), "{typo:?}");
    }

    #[tokio::test]
    async fn a_call_leaves_the_window_a_margin_after_it_so_late_arrivals_do_not_share_one() {
        let limiter = Limiter::new(LimiterSettings {
            calls_per_window: 2,
            window: Duration::from_millis(400),
            concurrency: 5,
        });
        let start = Instant::now();
        drop(limiter.acquire().await);
        drop(limiter.acquire().await);
        drop(limiter.acquire().await);
        // The third waits for the first to leave: the window and 50 ms (a 40th of 400 ms is
        // less), so a call reaching Marketo up to 50 ms late still falls in the next window.
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(450), "{waited:?}");
        assert!(waited < Duration::from_millis(900), "{waited:?}");
    }
}
