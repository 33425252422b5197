//! The configuration file: one TOML document whose sections belong to the crates that use them
//! (`[mapping]`, `[dataverse]`, `[marketo]`) plus the pipeline's own `[sync]`. Every problem in
//! every section is reported at once, each naming the key and the fix.

use std::fmt;

use oppsync_dynamics::DataverseOptions;
use oppsync_mapping::{Mapping, MappingConfig};
use oppsync_marketo::LimitsConfig;
use serde::Deserialize;

/// The `[sync]` section: how the pipeline batches and holds work.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncOptions {
    /// Opportunities per transform or write batch. 300 fills one Marketo call per object type.
    pub batch_size: usize,
    /// How long a claimed record is held before another worker may take it.
    pub claim_ttl_seconds: u32,
    /// How long the poller's lease lasts without renewal.
    pub lease_ttl_seconds: u32,
    /// Open records untouched this long are requeued by the poller's sweep.
    pub stuck_after_minutes: u32,
    /// A deletion scan that finds more than this share of the known opportunities gone (and
    /// more than ten) stops and deletes nothing: a lost read permission looks like a purge.
    pub max_deletion_percent: u32,
    /// A record whose write failed retryably this many times fails for good, with the last
    /// error in the ledger (waits between attempts double from 30 s up to 15 minutes). Stops
    /// that are not the record's fault (quota, budget, credentials, the deadline) do not count.
    pub max_attempts: u32,
    /// How long the run history (`oppsync runs`) keeps each run.
    pub run_history_days: u32,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            batch_size: 300,
            claim_ttl_seconds: 300,
            lease_ttl_seconds: 120,
            stuck_after_minutes: 15,
            max_deletion_percent: 20,
            max_attempts: 10,
            run_history_days: 30,
        }
    }
}

/// A checked configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub mapping: Mapping,
    pub dataverse: DataverseOptions,
    pub marketo: LimitsConfig,
    pub sync: SyncOptions,
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// Where the configuration came from (a path, or "the embedded defaults").
    pub origin: String,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "the configuration in {} has {n} problem{}:",
            self.origin,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        write!(f, "See README.md, section Configuration, for every key.")
    }
}

const SECTIONS: [&str; 4] = ["mapping", "dataverse", "marketo", "sync"];

/// The largest configuration accepted: a full mapping with comments is a few kilobytes.
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;

impl Config {
    /// Parses and checks a whole configuration document. `origin` names it in errors.
    pub fn from_toml(document: &str, origin: &str) -> Result<Config, ConfigError> {
        let fail = |problems: Vec<String>| ConfigError {
            origin: origin.to_owned(),
            problems,
        };
        if document.len() > MAX_CONFIG_BYTES {
            return Err(fail(vec![format!(
                "the configuration is {} bytes, more than the {} KB a configuration can be. Fix: point --config (or OPPSYNC_CONFIG) at oppsync's TOML file",
                document.len(),
                MAX_CONFIG_BYTES / 1024
            )]));
        }
        let table: toml::Table = toml::from_str(document).map_err(|e| {
            fail(vec![format!(
                "not valid TOML: {}{}. Fix: correct that line",
                e.message().trim_end_matches('\n'),
                e.span().map(|s| where_in(document, s.start)).unwrap_or_default()
            )])
        })?;
        let mut problems = Vec::new();
        for key in table.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                problems.push(format!(
                    "{key}: unknown section. Fix: the sections are [mapping], [dataverse], [marketo] and [sync]"
                ));
            }
        }
        let mapping = match MappingConfig::from_toml(document).and_then(|c| c.validate()) {
            Ok(m) => Some(m),
            Err(errors) => {
                problems.extend(errors.0.iter().map(ToString::to_string));
                None
            }
        };
        let dataverse = DataverseOptions::from_toml(document)
            .map_err(|e| problems.extend(e))
            .ok();
        // A section with keys of the wrong type is reported key by key (serde stops at the
        // first), so every problem in it is named at once.
        let marketo = if each_key::<LimitsConfig>(&table, "marketo", MARKETO_KEYS, &mut problems) {
            LimitsConfig::from_toml(document).map_err(|e| problems.extend(e)).ok()
        } else {
            None
        };
        let sync = if each_key::<SyncOptions>(&table, "sync", SYNC_KEYS, &mut problems) {
            sync_section(&table, &mut problems)
        } else {
            None
        };
        match (mapping, dataverse, marketo, sync) {
            (Some(mapping), Some(dataverse), Some(marketo), Some(sync)) if problems.is_empty() => Ok(Config {
                mapping,
                dataverse,
                marketo,
                sync,
            }),
            _ => Err(fail(problems)),
        }
    }
}

const SYNC_KEYS: &str = "batch_size, claim_ttl_seconds, lease_ttl_seconds, stuck_after_minutes, max_deletion_percent, max_attempts and run_history_days";
const MARKETO_KEYS: &str = "calls_per_20s, concurrent_calls and daily_budget";

/// Whether each key of `[section]` reads as part of `T` on its own; a problem per key that
/// does not (a wrong type, an unknown key, a number out of its type's range).
fn each_key<T: serde::de::DeserializeOwned>(
    table: &toml::Table,
    section: &str,
    keys: &str,
    problems: &mut Vec<String>,
) -> bool {
    let Some(value) = table.get(section) else {
        return true;
    };
    let Some(entries) = value.as_table() else {
        problems.push(format!(
            "{section}: is not a table. Fix: write it as a [{section}] section"
        ));
        return false;
    };
    let before = problems.len();
    for (key, value) in entries {
        let one = toml::Table::from_iter([(key.clone(), value.clone())]);
        if let Err(e) = toml::Value::Table(one).try_into::<T>() {
            problems.push(format!(
                "{section}.{}: {}. Fix: the keys are {keys}",
                oppsync_support::input::shown(key).trim_matches('`'),
                e.message().trim_end_matches('\n')
            ));
        }
    }
    problems.len() == before
}

fn sync_section(table: &toml::Table, problems: &mut Vec<String>) -> Option<SyncOptions> {
    let Some(section) = table.get("sync") else {
        return Some(SyncOptions::default());
    };
    let options: SyncOptions = match section.clone().try_into() {
        Ok(o) => o,
        Err(e) => {
            problems.push(format!("sync: {}. Fix: the keys are {SYNC_KEYS}", e.message()));
            return None;
        }
    };
    let before = problems.len();
    if !(1..=300).contains(&options.batch_size) {
        problems.push(format!(
            "sync.batch_size: {} is outside 1..=300. Fix: Marketo takes at most 300 records a call; 300 makes the fewest calls",
            options.batch_size
        ));
    }
    if options.claim_ttl_seconds < 30 {
        problems.push(format!(
            "sync.claim_ttl_seconds: {} is under 30. Fix: a claim must outlast one batch's Marketo calls; 300 is safe",
            options.claim_ttl_seconds
        ));
    }
    if options.lease_ttl_seconds < 10 {
        problems.push(format!(
            "sync.lease_ttl_seconds: {} is under 10. Fix: the lease must outlast one Dataverse page; 120 is safe",
            options.lease_ttl_seconds
        ));
    }
    if u64::from(options.stuck_after_minutes) * 60 <= u64::from(options.claim_ttl_seconds) {
        problems.push(format!(
            "sync.stuck_after_minutes: {} minutes does not outlast a claim ({} s). Fix: make it longer than claim_ttl_seconds",
            options.stuck_after_minutes, options.claim_ttl_seconds
        ));
    }
    if !(1..=100).contains(&options.max_deletion_percent) {
        problems.push(format!(
            "sync.max_deletion_percent: {} is outside 1..=100. Fix: the share of known opportunities one deletion scan may delete; 20 is the default",
            options.max_deletion_percent
        ));
    }
    if !(1..=100).contains(&options.max_attempts) {
        problems.push(format!(
            "sync.max_attempts: {} is outside 1..=100. Fix: how many retryable write failures a record may have before it fails for good; 10 is the default",
            options.max_attempts
        ));
    }
    if !(1..=3650).contains(&options.run_history_days) {
        problems.push(format!(
            "sync.run_history_days: {} is outside 1..=3650. Fix: how many days `oppsync runs` keeps each run; 30 is the default",
            options.run_history_days
        ));
    }
    (problems.len() == before).then_some(options)
}

/// Where a byte offset falls, as a person finds it: the line, the column, and the start of the
/// line (cut short, so a long value is not echoed back whole).
fn where_in(document: &str, offset: usize) -> String {
    let offset = offset.min(document.len());
    let before = document.get(..offset).unwrap_or(document);
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[start..].chars().count() + 1;
    let text = document[start..].lines().next().unwrap_or("");
    format!(
        " (line {line}, column {column}: {})",
        oppsync_support::input::shown(text)
    )
}
