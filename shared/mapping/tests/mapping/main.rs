//! The mapping crate's integration tests: one binary, one module per concern.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;
mod config;
mod customer_rules;
mod owners;
mod plans;
mod properties;
mod stakeholders;
mod suggest;
