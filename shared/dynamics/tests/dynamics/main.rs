//! The Dataverse client against the Dataverse simulator, over real sockets.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod changes;
mod common;
mod faults;
mod fidelity;
mod related;
