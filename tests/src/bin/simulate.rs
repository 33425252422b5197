//! Runs the deterministic simulation on a range of seeds: `simulate --seeds 0..1000 [--minutes N]
//! [--opportunities N] [--faults a,b,… | --no-faults] [--trace]`. Prints each failing seed's report and a summary; exits 1
//! when any seed failed, 2 on bad arguments.

use std::process::ExitCode;
use std::time::Instant;

use oppsync_tests::sim::{Class, Options, run};

fn parse_range(text: &str) -> Option<(u64, u64)> {
    let (a, b) = text.split_once("..")?;
    let (a, b) = (a.parse().ok()?, b.parse().ok()?);
    (a < b).then_some((a, b))
}

fn main() -> ExitCode {
    let mut seeds = (0, 300);
    let mut options = Options::default();
    let mut trace = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = |args: &mut dyn Iterator<Item = String>| args.next().unwrap_or_default();
        match arg.as_str() {
            "--seeds" => match parse_range(&value(&mut args)) {
                Some(range) => seeds = range,
                None => {
                    eprintln!("--seeds takes a range like 0..1000 (start below end)");
                    return ExitCode::from(2);
                }
            },
            "--minutes" | "--opportunities" => match value(&mut args).parse() {
                Ok(n) if arg == "--minutes" => options.minutes = n,
                Ok(n) => options.opportunities = n,
                Err(_) => {
                    eprintln!("{arg} takes a whole number");
                    return ExitCode::from(2);
                }
            },
            "--no-faults" => options.faults.clear(),
            "--faults" => {
                let text = value(&mut args);
                let parsed: Option<Vec<Class>> = text.split(',').map(Class::parse).collect();
                match parsed {
                    Some(classes) => options.faults = classes,
                    None => {
                        let names: Vec<&str> = Class::ALL.iter().map(|c| c.name()).collect();
                        eprintln!("--faults takes a comma-separated list of {}", names.join(", "));
                        return ExitCode::from(2);
                    }
                }
            }
            "--trace" => trace = true,
            other => {
                eprintln!(
                    "unknown argument `{other}`; usage: simulate --seeds A..B [--minutes N] [--opportunities N] [--faults a,b,… | --no-faults] [--trace]"
                );
                return ExitCode::from(2);
            }
        }
    }
    let started = Instant::now();
    let mut failed = Vec::new();
    for seed in seeds.0..seeds.1 {
        let outcome = run(seed, &options);
        if trace {
            println!(
                "seed {seed}: {} events; the last:\n  {}",
                outcome.events,
                outcome.trace.join("\n  ")
            );
        }
        if !outcome.violations.is_empty() {
            println!("{}\n", outcome.report());
            failed.push(seed);
        }
    }
    let total = seeds.1 - seeds.0;
    println!(
        "{} passed, {} failed ({total} seeds from {} in {:.1} s){}",
        total - failed.len() as u64,
        failed.len(),
        seeds.0,
        started.elapsed().as_secs_f64(),
        if failed.is_empty() {
            String::new()
        } else {
            format!("; failing seeds: {failed:?}")
        }
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
