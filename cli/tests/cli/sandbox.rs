//! `oppsync sandbox`: the README's walk-through, run as written against a sandbox the test
//! starts as a user would, typing into its terminal and running the commands in another.

use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::common::*;

/// The walk-through's steps, in the README's order: `oppsync …` in the second terminal, the
/// rest typed in the sandbox's.
const WALKTHROUGH: &[&str] = &[
    "oppsync validate",
    "oppsync fields --write oppsync.toml",
    "oppsync validate --config oppsync.toml",
    "oppsync plan",
    "oppsync sync",
    "change 3",
    "oppsync plan",
    "oppsync sync",
    "ids 1",
    "reject",
    "oppsync resync",
    "oppsync errors",
    "oppsync resync --failed",
    "oppsync status",
    "oppsync runs",
    "stats",
];

struct Sandbox {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Sandbox {
    fn start(args: &[&str]) -> Sandbox {
        let mut child = Command::new(env!("CARGO_BIN_EXE_oppsync"))
            .arg("sandbox")
            .args(args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Sandbox { child, stdin, lines }
    }

    /// Lines up to and including the first that `last` accepts.
    fn read_until(&self, last: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut out = Vec::new();
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    let done = last(&line);
                    out.push(line);
                    if done {
                        return out;
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    panic!("the sandbox stopped answering; it said:\n{}", out.join("\n"))
                }
            }
        }
    }

    /// Sends SIGTERM, waits for the sandbox to say it stopped, and returns its exit code.
    async fn terminate(mut self) -> Option<i32> {
        send_signal(&self.child, "TERM");
        let stopped = self.read_until(|l| l.contains("stopped by SIGTERM"));
        assert!(!stopped.is_empty());
        tokio::task::spawn_blocking(move || self.child.wait().unwrap().code())
            .await
            .unwrap()
    }

    /// Types a line in the sandbox's terminal; its answer, up to a line `last` accepts.
    fn type_line(&mut self, line: &str, last: impl Fn(&str) -> bool) -> Vec<String> {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        self.read_until(last)
    }
}

/// GIVEN `oppsync sandbox` started as the README says WHEN the walk-through's commands run in
/// another "terminal" with the printed environment, and changes are typed into the sandbox
/// THEN each command answers as the README says: validate passes, plan shows the initial sync
/// and later the 3 changes, sync writes them, a rejected record fails (exit 1), is listed by
/// `errors` and written by `resync --failed`, and Marketo ends in step with the rules; SIGTERM
/// stops the sandbox with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_sandbox_walkthrough_runs_as_written() {
    // The README's section holds the walk-through's steps in this order.
    let readme = std::fs::read_to_string(oppsync_tests::repo_root().join("README.md")).unwrap();
    let section = readme
        .split("## Try every command: the sandbox")
        .nth(1)
        .expect("README has the sandbox section")
        .split("\n## ")
        .next()
        .unwrap();
    let mut rest = section;
    for step in WALKTHROUGH {
        let at = rest
            .find(step)
            .unwrap_or_else(|| panic!("the README's walk-through lacks `{step}` (in order)"));
        rest = &rest[at + step.len()..];
    }

    let env_file = std::env::temp_dir().join(format!("{}.env", oppsync_tests::harness::unique("sandbox")));
    let mut sandbox = Sandbox::start(&["--opportunities", "30", "--env-file", s(&env_file)]);
    let banner = sandbox.read_until(|l| l.contains("Ctrl-C stops the simulators"));
    let env: Vec<(String, String)> = banner
        .iter()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(env.len(), 8, "{banner:?}");
    let sourced = std::fs::read_to_string(&env_file).unwrap();
    for (k, v) in &env {
        assert!(sourced.contains(&format!("export {k}={v}")), "{sourced}");
    }
    let state = state_path();
    let run = |args: &[&str]| {
        let mut args = args.to_vec();
        args.extend(["--state", s(&state)]);
        let env = env.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            oppsync(&args, &env).await
        }
    };

    let validate = run(&["validate"]).await;
    assert_eq!(validate.code, 0, "{validate:?}");
    assert!(!validate.stdout.contains("FAIL"), "{validate:?}");
    let config = std::env::temp_dir().join(format!("{}.toml", oppsync_tests::harness::unique("sandbox-fields")));
    let fields = oppsync(&["fields", "--write", s(&config)], &env).await;
    assert_eq!(fields.code, 0, "{fields:?}");
    assert!(
        fields.stdout.contains("<- new_region"),
        "the sandbox's custom field: {fields:?}"
    );
    let suggested = run(&["validate", "--config", s(&config)]).await;
    assert_eq!(suggested.code, 0, "{suggested:?}");
    assert!(!suggested.stdout.contains("FAIL"), "{suggested:?}");
    let _ = std::fs::remove_file(&config);
    let plan = run(&["plan"]).await;
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        plan.stdout.contains("of 30 opportunities would change"),
        "the initial sync's 30 opportunities: {plan:?}"
    );
    let sync = run(&["sync"]).await;
    assert_eq!(sync.code, 0, "{sync:?}");
    assert!(sync.stdout.contains("30 written"), "{sync:?}");

    let changed = sandbox.type_line("change 3", |l| l.contains("changed"));
    assert!(
        changed.last().unwrap().contains("changed the amount of 3"),
        "{changed:?}"
    );
    let plan = run(&["plan"]).await;
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(plan.stdout.contains("3 of 3 opportunities would change"), "{plan:?}");
    let sync = run(&["sync"]).await;
    assert!(sync.code == 0 && sync.stdout.contains("3 written"), "{sync:?}");

    let id = sandbox.type_line("ids 1", |l| l.len() == 36).pop().unwrap();
    let rejected = sandbox.type_line(&format!("reject {id}"), |l| l.contains("reject"));
    assert!(rejected.last().unwrap().contains("1003"), "{rejected:?}");
    let resync = run(&["resync", &id]).await;
    assert_eq!(resync.code, 1, "a record Marketo rejected: {resync:?}");
    let errors = run(&["errors"]).await;
    assert!(
        errors.stdout.contains(&id) && errors.stdout.contains("1003"),
        "{errors:?}"
    );
    let replay = run(&["resync", "--failed"]).await;
    assert_eq!(replay.code, 0, "{replay:?}");
    let errors = run(&["errors"]).await;
    assert!(!errors.stdout.contains(&id), "{errors:?}");
    let status = run(&["status"]).await;
    assert_eq!(status.code, 0, "{status:?}");
    assert!(status.stdout.contains("Last run: "), "{status:?}");
    let runs = run(&["runs"]).await;
    assert_eq!(runs.code, 0, "{runs:?}");
    // Two sync cycles and two resyncs.
    assert_eq!(runs.stdout.lines().count(), 4, "{runs:?}");

    let stats = sandbox.type_line("stats", |l| l.starts_with("Differences from the rules"));
    assert_eq!(stats.last().unwrap(), "Differences from the rules: 0", "{stats:?}");
    let unknown = sandbox.type_line("frobnicate", |l| l.starts_with("error:"));
    assert!(unknown.last().unwrap().contains("help"), "{unknown:?}");

    assert_eq!(sandbox.terminate().await, Some(0));
}

/// GIVEN a sandbox busy with a typed command WHEN SIGTERM arrives during it THEN the sandbox
/// still stops, saying so, with exit 0. (It listened for signals only while waiting for a
/// line, so one that came during a command was lost and the sandbox ran on.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_a_command_stops_the_sandbox() {
    let mut sandbox = Sandbox::start(&["--opportunities", "20000"]);
    sandbox.read_until(|l| l.contains("Ctrl-C stops the simulators"));
    // `stats` compares 20,000 opportunities with the rules: long enough to be busy in it.
    writeln!(sandbox.stdin, "stats").unwrap();
    sandbox.stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(sandbox.terminate().await, Some(0));
}
