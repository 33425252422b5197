//! The stores under test, each fresh: the workspace's test harness makes them.

pub use oppsync_tests::harness::{dynamo, dynamo_client as client, sqlite};
