//! A one-line progress counter on stderr, drawn only when stderr is a terminal (a pipe or a CI
//! log gets the stage summaries alone).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    done: usize,
    total: usize,
    draw: bool,
    last: Instant,
}

impl Progress {
    pub fn new(label: &str, total: usize) -> Progress {
        Progress {
            label: label.to_owned(),
            done: 0,
            total,
            draw: std::io::stderr().is_terminal(),
            last: Instant::now() - Duration::from_secs(1),
        }
    }

    pub fn add(&mut self, n: usize) {
        self.done += n;
        if self.draw && self.last.elapsed() >= Duration::from_millis(100) {
            self.last = Instant::now();
            let width = 30;
            let filled = (self.done.min(self.total) * width)
                .checked_div(self.total)
                .unwrap_or(width);
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r  {:<10} [{}{}] {}/{}",
                self.label,
                "#".repeat(filled),
                " ".repeat(width - filled),
                self.done,
                self.total
            );
            let _ = err.flush();
        }
    }

    pub fn finish(self) {
        if self.draw {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{}\r", " ".repeat(self.label.len() + 60));
            let _ = err.flush();
        }
    }
}
