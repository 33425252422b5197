//! The whole-product suite: one binary.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod api_docs;
mod bad_input;
mod budget;
mod chaos;
mod coldstart;
mod e2e;
mod lambda_events;
mod lambda_flow;
mod repo;
mod simulation;
mod template;
