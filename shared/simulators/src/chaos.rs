//! Random faults at a rate, for the chaos runs: each simulator draws from its own seeded
//! generator, so a run's faults are the same every time for the same seed and call order.

/// Faults on a share of the calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chaos {
    /// The share of calls (and, in Marketo, of records) that fail: 0.1 is 10%.
    pub rate: f64,
    pub seed: u64,
}

/// A xorshift generator: deterministic, no dependency.
#[derive(Debug, Clone)]
pub(crate) struct Dice(u64);

impl Dice {
    pub(crate) fn new(seed: u64) -> Dice {
        Dice(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// True with probability `p`.
    pub(crate) fn hit(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 1_000_000.0 < p
    }

    /// One of `choices`, uniformly.
    pub(crate) fn pick<T: Clone>(&mut self, choices: &[T]) -> T {
        choices[(self.next() % choices.len() as u64) as usize].clone()
    }
}
