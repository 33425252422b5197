//! The process-wide limiter: calls per sliding window and calls in flight.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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

/// Shared by every call of a process (clone it; clones share the limits).
#[derive(Clone, Debug)]
pub struct Limiter {
    settings: LimiterSettings,
    sent: Arc<Mutex<VecDeque<Instant>>>,
    in_flight: Arc<Semaphore>,
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
            sent: Arc::new(Mutex::new(VecDeque::new())),
            in_flight: Arc::new(Semaphore::new(settings.concurrency)),
        }
    }

    pub fn settings(&self) -> LimiterSettings {
        self.settings
    }

    /// Waits for a free slot in both limits; the call holds the permit until it returns.
    pub async fn acquire(&self) -> OwnedSemaphorePermit {
        let permit = match Arc::clone(&self.in_flight).acquire_owned().await {
            Ok(p) => p,
            // The semaphore is never closed.
            Err(_) => unreachable!("the limiter's semaphore was closed"),
        };
        loop {
            let wait = {
                let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                while sent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= self.settings.window)
                {
                    sent.pop_front();
                }
                if sent.len() < self.settings.calls_per_window {
                    sent.push_back(now);
                    None
                } else {
                    // The oldest call leaves the window at front + window.
                    sent.front().map(|t| *t + self.settings.window - now)
                }
            };
            match wait {
                None => return permit,
                Some(d) => tokio::time::sleep(d + Duration::from_millis(1)).await,
            }
        }
    }
}
