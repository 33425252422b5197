//! `oppsync fields`: the product's "select fields to sync at setup". Reads Dataverse's
//! opportunity columns (with their types and option sets) and Marketo's opportunity fields
//! (describe), prints them side by side with a suggested mapping, and with `--write FILE`
//! writes that suggestion as a commented configuration `oppsync validate` accepts.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use oppsync_dynamics::EntitySet;
use oppsync_mapping::suggest::{self, Column, Field, Suggestion, Why};
use serde_json::json;

use crate::CliError;
use crate::context;

#[derive(Debug, Args)]
pub struct FieldsArgs {
    /// A configuration to read [dataverse], [marketo] and `sales_persons` from [default: the
    /// built-in defaults].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Write the suggested mapping as a commented TOML configuration to FILE (a new file:
    /// an existing one is never overwritten).
    #[arg(long, value_name = "FILE")]
    pub write: Option<PathBuf>,
    /// One JSON document on stdout: both sides and the suggestion.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: FieldsArgs) -> Result<ExitCode, CliError> {
    let config = context::load_config(args.config.as_deref())?;
    // Checked before anything is read: a path that cannot be written wastes no API call.
    let mut target = match &args.write {
        Some(path) => Some(NewFile::create(path)?),
        None => None,
    };
    let (dynamics, marketo) = context::endpoints(&config, |k| std::env::var(k).ok())?;
    let (dataverse, marketo) = context::clients(&config, dynamics, marketo)?;
    let (columns, described) = tokio::join!(
        dataverse.attribute_definitions(EntitySet::Opportunities),
        marketo.describe(true)
    );
    let columns: Vec<Column> = columns
        .map_err(|e| CliError::Fatal(format!("Dynamics: reading the opportunity columns: {e}")))?
        .into_iter()
        .map(|a| Column {
            name: a.logical_name,
            kind: a.attribute_type,
            display: a.display_name,
            custom: a.is_custom,
            options: a.options,
        })
        .collect();
    let fields: Vec<Field> = described
        .map_err(|e| CliError::Fatal(format!("Marketo: describing the opportunity object: {e}")))?
        .fields
        .into_iter()
        .map(|f| Field {
            name: f.name,
            kind: f.data_type.unwrap_or_else(|| "string".into()),
            display: f.display_name,
            length: f.length,
            updateable: f.updateable.unwrap_or(true),
        })
        .collect();
    let sales_persons = config.mapping.sales_persons;
    let suggestion = suggest::suggest(&columns, &fields, sales_persons);
    let toml = suggestion.to_toml(sales_persons, &columns);
    if let Err(e) = Suggestion::check(&toml) {
        // A suggestion oppsync itself would refuse is a defect here, not the user's to fix.
        return Err(CliError::Fatal(format!(
            "the suggested configuration does not validate (please report this): {e}"
        )));
    }

    if args.json {
        println!(
            "{}",
            json!({"dataverse": columns, "marketo": fields, "suggestion": suggestion})
        );
    } else {
        print_table(&suggestion, &columns, &fields);
    }
    if let Some(target) = target.as_mut() {
        target.write(&toml)?;
        if !args.json {
            println!(
                "\nWrote {}. Check it with: oppsync validate --config {}",
                target.path.display(),
                target.path.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The `--write` file: created before anything is read (refused when one is there: a
/// configuration is never overwritten), removed again unless the suggestion was written to it.
struct NewFile {
    path: PathBuf,
    file: std::fs::File,
    written: bool,
}

impl NewFile {
    fn create(path: &std::path::Path) -> Result<NewFile, CliError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                let fix = if e.kind() == std::io::ErrorKind::AlreadyExists {
                    "choose a new file name, or move the existing file away (oppsync never overwrites a configuration)"
                } else {
                    "give --write a path in a directory you can write to"
                };
                CliError::Usage(format!("cannot create {}: {e}. Fix: {fix}", path.display()))
            })?;
        Ok(NewFile {
            path: path.to_owned(),
            file,
            written: false,
        })
    }

    fn write(&mut self, text: &str) -> Result<(), CliError> {
        self.file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.sync_all())
            .map_err(|e| CliError::Usage(format!("cannot write {}: {e}", self.path.display())))?;
        self.written = true;
        Ok(())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.written {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn print_table(suggestion: &Suggestion, columns: &[Column], fields: &[Field]) {
    println!(
        "Dynamics: {} opportunity columns ({} custom). Marketo: {} opportunity fields ({} updateable).\n",
        columns.len(),
        columns.iter().filter(|c| c.custom).count(),
        fields.len(),
        fields.iter().filter(|f| f.updateable).count()
    );
    println!(
        "{:<26} {:<9} <- {:<24} {:<17} {:<10} why",
        "Marketo field", "type", "Dynamics column", "type", "as"
    );
    for p in &suggestion.pairs {
        let why = match p.why {
            Why::Default => "default mapping",
            Why::Rule => "set by the rules",
            Why::Standard => "standard pair",
            Why::Name => "matching names",
        };
        let source = match (&p.dataverse, p.why) {
            (Some(d), _) => d.clone(),
            (None, Why::Rule) => "(customer / owner)".into(),
            (None, _) => "(close dates)".into(),
        };
        println!(
            "{:<26} {:<9} <- {:<24} {:<17} {:<10} {why}{}",
            p.marketo,
            p.marketo_kind,
            source,
            p.dataverse_kind.as_deref().unwrap_or("-"),
            p.conversion,
            if p.custom { ", custom" } else { "" }
        );
    }
    if !suggestion.excluded_defaults.is_empty() {
        println!(
            "\nDefault fields this Marketo instance lacks (excluded): {}",
            suggestion.excluded_defaults.join(", ")
        );
    }
    for m in &suggestion.mismatches {
        println!(
            "\nNot suggested: {} ({}) and {} ({}) match by name, but no conversion turns one into the other",
            m.marketo, m.marketo_kind, m.dataverse, m.dataverse_kind
        );
    }
    if !suggestion.unmatched_marketo.is_empty() {
        println!(
            "\nMarketo fields with no Dynamics column found: {}",
            suggestion.unmatched_marketo.join(", ")
        );
    }
    if !suggestion.unmatched_dataverse.is_empty() {
        println!(
            "Custom Dynamics columns no Marketo field matches: {}",
            suggestion.unmatched_dataverse.join(", ")
        );
    }
    if let Some(filter) = &suggestion.sync_filter {
        println!("A sync filter column was found: {filter} (suggested, commented out, as sync_filter)");
    }
}
