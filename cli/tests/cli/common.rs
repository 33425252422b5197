//! Running the binary with an environment pointing at the simulators.

use std::path::PathBuf;
use std::process::{Command, Output};

use oppsync_tests::harness::{Sims, unique};
use serde_json::Value;

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The environment `sync` reads, pointing at the simulators.
pub fn env_for(sims: &Sims) -> Vec<(String, String)> {
    let (tenant, client, secret) = sims.dv.credentials();
    vec![
        ("DYNAMICS_URL".into(), sims.dv.url()),
        ("DYNAMICS_TENANT_ID".into(), tenant),
        ("DYNAMICS_CLIENT_ID".into(), client),
        ("DYNAMICS_CLIENT_SECRET".into(), secret),
        ("DYNAMICS_TOKEN_URL".into(), sims.dv.token_url()),
        ("MARKETO_URL".into(), sims.mk.url()),
        ("MARKETO_CLIENT_ID".into(), sims.mk.client_id()),
        ("MARKETO_CLIENT_SECRET".into(), sims.mk.client_secret()),
    ]
}

/// Runs `oppsync args…` with exactly `env` (plus PATH), off the async runtime so the
/// simulators keep answering.
pub async fn oppsync(args: &[&str], env: &[(String, String)]) -> Run {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env = env.to_vec();
    let output: Output = tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_oppsync"));
        command.args(&args).env_clear().envs(env);
        if let Ok(path) = std::env::var("PATH") {
            command.env("PATH", path);
        }
        command.output().unwrap()
    })
    .await
    .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A state file path that does not exist yet.
pub fn state_path() -> PathBuf {
    std::env::temp_dir().join(format!("{}.db", unique("oppsync-cli-test")))
}

pub fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// A config file with `text`.
pub fn config_file(text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.toml", unique("oppsync-cli-config")));
    std::fs::write(&path, text).unwrap();
    path
}

/// What a long-running command did before a signal stopped it.
pub struct Stopped {
    /// The exit code (None if the signal killed it without one).
    pub code: Option<i32>,
    /// The first line of stdout starting with the awaited prefix.
    pub line: Option<String>,
    pub stderr: String,
}

/// Starts `oppsync args…` with exactly `env` in `cwd`, waits (up to a minute) for a stdout line
/// starting with `prefix` (the end of `sync`'s first cycle: "sync: "), then sends `signal`
/// ("INT", "TERM") and waits for it to end.
pub async fn run_then_signal(
    args: &[&str],
    env: &[(String, String)],
    cwd: &std::path::Path,
    prefix: &'static str,
    signal: &str,
) -> Stopped {
    let mut command = Command::new(env!("CARGO_BIN_EXE_oppsync"));
    command
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .envs(env.iter().cloned())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with(prefix))
    });
    let line = tokio::time::timeout(std::time::Duration::from_secs(60), line)
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    send_signal(&child, signal);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    Stopped {
        code: out.status.code(),
        line,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Sends `signal` ("INT", "TERM") to a child process.
pub fn send_signal(child: &std::process::Child, signal: &str) {
    let killed = Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success(), "kill -{signal} failed");
}
