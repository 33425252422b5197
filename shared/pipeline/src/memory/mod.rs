//! In-memory adapters for the ports, for testing a step without a socket: a Dataverse that
//! serves rows it was given (change feed included) and a Marketo that keeps what it is sent,
//! answers record by record as the real one does (created, updated, skipped with a 1xxx code),
//! and records the order of its calls. The simulators stay for end-to-end tests over HTTP.

mod dataverse;
mod marketo;

use std::sync::{Mutex, MutexGuard};

pub use dataverse::MemoryDataverse;
pub use marketo::{Interleaved, MarketoHolds, MemoryMarketo};

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
