//! The README against the binary: every command's flags as `--help` lists them, and every
//! `oppsync` example in the README's code blocks run as written (against the simulators where
//! it names a live system).

use std::collections::BTreeSet;

use oppsync_simulators::dataverse::Mix;
use oppsync_tests::harness::{assert_marketo_matches_dynamics, scratch_dir, sims};

use crate::common::*;

fn readme() -> String {
    std::fs::read_to_string(oppsync_tests::repo_root().join("README.md")).unwrap()
}

/// The commands that take the state and configuration flags, as the README says it.
const STATE_FLAGS_SENTENCE: &str = "`sync`, `plan`, `resync`, `status`, `errors`, `runs` and `validate` take `--state` or `--table`, and `--config FILE`";
const TAKE_STATE_FLAGS: &[&str] = &["sync", "plan", "resync", "status", "errors", "runs", "validate"];

fn flags_in(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_commands_flags_in_the_readme_are_the_ones_its_help_lists() {
    let text = readme();
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains(STATE_FLAGS_SENTENCE),
        "README no longer says which commands take --state"
    );
    let rows: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| {
            let usage = l.strip_prefix("| `oppsync ")?.split('`').next()?;
            let command = usage.split_whitespace().next()?.to_owned();
            Some((command, usage.to_owned()))
        })
        .collect();
    assert!(rows.len() >= 8, "{rows:?}");
    for (command, usage) in rows {
        let mut documented = flags_in(&usage);
        if TAKE_STATE_FLAGS.contains(&command.as_str()) {
            documented.extend(["--state", "--table", "--config"].map(str::to_owned));
        }
        let help = oppsync(&[&command, "--help"], &[]).await;
        assert_eq!(help.code, 0, "{help:?}");
        let listed: BTreeSet<String> = help
            .stdout
            .lines()
            .map(str::trim_start)
            .filter(|l| l.starts_with("--") || l.starts_with("-h, --"))
            .flat_map(|l| l.split_whitespace().find(|w| w.starts_with("--")))
            .map(|w| w.trim_end_matches(',').to_owned())
            .filter(|f| f != "--help")
            .collect();
        assert_eq!(
            documented, listed,
            "`oppsync {command}`: the README's row (left) and --help (right) list different flags"
        );
    }
}

/// The `oppsync` examples in the README's code blocks, as arguments.
fn examples() -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in readme().lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if let Some(args) = line
            .strip_prefix("cargo run --release -p oppsync -- ")
            .filter(|_| in_block)
        {
            out.push(args.split_whitespace().map(str::to_owned).collect());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_readme_command_example_runs_as_written() {
    let examples = examples();
    let commands: Vec<&str> = examples.iter().map(|a| a[0].as_str()).collect();
    assert_eq!(commands, ["demo", "validate", "sync"], "{examples:?}");
    let sims = sims().await;
    sims.dv.seed(40, 71, Mix::Realistic);
    let env = env_for(&sims);
    // Run where a user would: the default state file lands in the working directory.
    let cwd = scratch_dir("oppsync-readme");
    for args in &examples {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if args.contains(&"--every") {
            // Runs until stopped: stopped after its first cycle, as a user would stop it.
            let stopped = run_then_signal(&args, &env, &cwd, "sync: ", "TERM").await;
            assert!(
                stopped.line.as_deref().is_some_and(|l| l.contains("40 changes read")),
                "{args:?}: {:?} {}",
                stopped.line,
                stopped.stderr
            );
            assert_eq!(stopped.code, Some(143), "{args:?}: {}", stopped.stderr);
            continue;
        }
        let output = tokio::task::spawn_blocking({
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            let env = env.clone();
            let cwd = cwd.clone();
            move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_oppsync"))
                    .args(&args)
                    .current_dir(&cwd)
                    .env_clear()
                    .envs(env)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{args:?}:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        match args[0] {
            "demo" => assert!(stdout.contains("PASS"), "{stdout}"),
            "validate" => assert!(!stdout.contains("FAIL"), "{stdout}"),
            _ => {}
        }
    }
    assert_marketo_matches_dynamics(&sims);
    // The examples' state is in the working directory, where the README says it is.
    assert!(cwd.join("oppsync-state.db").exists());
}
