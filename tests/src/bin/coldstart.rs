//! `cargo run -p oppsync-tests --bin coldstart -- [--runs N] [DIR]`: each function's cold start,
//! measured against a local Lambda Runtime API with moto's Secrets Manager
//! (OPPSYNC_DYNAMODB_ENDPOINT), `--runs` times each (default 20). DIR holds the binaries:
//! `target/lambda` after `cargo lambda build --release` (the default), or `target/debug`.

use std::path::PathBuf;
use std::time::Duration;

use oppsync_tests::coldstart::{self, ColdStart, FUNCTIONS};

fn percentile(mut values: Vec<Duration>, p: f64) -> Duration {
    values.sort();
    let i = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[i.min(values.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut runs = 20usize;
    let mut dir = PathBuf::from("target/lambda");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => match args.next().and_then(|n| n.parse().ok()).filter(|n| *n > 0) {
                Some(n) => runs = n,
                None => {
                    eprintln!("--runs takes a number of runs, at least 1");
                    return std::process::ExitCode::from(2);
                }
            },
            other => dir = PathBuf::from(other),
        }
    }
    let moto = oppsync_tests::harness::moto_endpoint();
    let env = coldstart::environment(&moto).await;
    println!(
        "cold start: {runs} runs each, binaries in {}, secrets from moto at {moto}",
        dir.display()
    );
    println!(
        "{:<12} {:>10} {:>10} {:>12} {:>22} {:>22}",
        "function", "init p50", "init p90", "secrets p50", "init − secrets p50", "init − secrets p90"
    );
    for function in FUNCTIONS {
        let binary = coldstart::binary(&dir, function);
        let mut measured: Vec<ColdStart> = Vec::new();
        for _ in 0..runs {
            match coldstart::measure(&binary, &env).await {
                Ok(m) => measured.push(m),
                Err(e) => {
                    eprintln!("{e}");
                    return std::process::ExitCode::from(1);
                }
            }
        }
        let init: Vec<Duration> = measured.iter().map(|m| m.init).collect();
        let secrets: Vec<Duration> = measured.iter().map(|m| m.secrets).collect();
        let own: Vec<Duration> = measured.iter().map(ColdStart::own).collect();
        println!(
            "{:<12} {:>8} ms {:>8} ms {:>10} ms {:>20} ms {:>20} ms",
            function,
            ms(percentile(init.clone(), 0.5)),
            ms(percentile(init, 0.9)),
            ms(percentile(secrets, 0.5)),
            ms(percentile(own.clone(), 0.5)),
            ms(percentile(own, 0.9)),
        );
    }
    std::process::ExitCode::SUCCESS
}
