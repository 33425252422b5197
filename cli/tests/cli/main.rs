//! The `oppsync` binary, run as a user runs it, against the simulators (and moto's DynamoDB for
//! `--table`): every command, and bad input of every kind, each with a clear message, a
//! non-zero exit and the state left as it was.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod bad_input;
mod commands;
mod common;
mod crash;
mod exit_codes;
mod readme;
mod sandbox;
mod state_files;
