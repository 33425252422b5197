//! The Marketo client against the Marketo simulator, over real sockets.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod auth;
mod batching;
mod common;
mod errors;
mod fidelity;
mod limits;
mod secrets;
mod simulator;
