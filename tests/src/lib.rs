//! Helpers shared by the whole-product suite and the crates' own integration tests: the
//! simulators and stores wired into a pipeline, moto's DynamoDB stream read as Lambda would
//! deliver it, and the SAM template.
// Test support: a failed unwrap is a failed test, with the panic naming what broke.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

pub mod canned;
pub mod coldstart;
pub mod harness;
pub mod sim;
pub mod stream;
pub mod template;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The first line of the fenced code block under the README heading `heading`.
pub fn readme_command(readme: &str, heading: &str) -> Option<String> {
    let after = &readme[readme.find(heading)? + heading.len()..];
    let fence = after.find("```")?;
    let block = &after[fence + 3..];
    let body = &block[block.find('\n')? + 1..];
    body.lines().next().map(|l| l.trim().to_owned())
}
