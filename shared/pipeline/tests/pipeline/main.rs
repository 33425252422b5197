//! The pipeline over real HTTP simulators and real stores (SQLite, and DynamoDB on moto).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod flow;
mod ports;
mod rare_paths;
mod sales_persons;
mod steps;
