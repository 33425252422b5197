//! Crash and restart: `oppsync sync` killed at every step boundary (a crash point aborts the
//! process there) and at random moments (SIGKILL), over many seeds, then restarted until it
//! finishes. However it died, the end state is the same: Marketo matches Dynamics by the rules,
//! record by record, every record synced, none failed.

use std::process::Command;
use std::time::Duration;

use oppsync_pipeline::crash::POINTS;
use oppsync_simulators::dataverse::{Mix, Table, seed_id};
use oppsync_tests::harness::{Sims, assert_marketo_matches_dynamics, sims};
use serde_json::json;

use crate::common::*;

/// Small pages and batches, so each step boundary is reached many times in one run (a drain
/// writes ten batches at once).
const CONFIG: &str = "[dataverse]\npage_size = 50\n[sync]\nbatch_size = 5\n";

async fn world(seed: u64) -> (Sims, Vec<(String, String)>) {
    let sims = sims().await;
    sims.dv.seed(200, seed, Mix::Realistic);
    sims.dv.configure(|c| c.max_page_size = 50);
    let env = env_for(&sims);
    (sims, env)
}

/// Restarts `oppsync sync` until a run finishes with nothing left open.
async fn run_to_the_end(state: &std::path::Path, config: &std::path::Path, env: &[(String, String)]) {
    for _ in 0..10 {
        let run = oppsync(&["sync", "--state", s(state), "--config", s(config)], env).await;
        let view = oppsync(&["status", "--json", "--state", s(state)], &[]).await.json();
        let open = view["counts"]["pending"].as_u64().unwrap() + view["counts"]["ready"].as_u64().unwrap();
        if run.code == 0 && open == 0 {
            assert_eq!(view["counts"]["failed"], 0, "{view}");
            return;
        }
    }
    panic!("oppsync sync did not converge after a crash");
}

fn assert_converged(sims: &Sims) {
    assert_marketo_matches_dynamics(sims);
}

/// A change between the crash and the restart, so the restarted run has new work too.
fn change_something(sims: &Sims, n: u64) {
    sims.dv.upsert(
        Table::Opportunities,
        &seed_id(0x0b00_0000, n % 200),
        json!({"estimatedvalue": 31_337 + n as i64}),
        &[],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_step_boundary_a_restart_converges() {
    let config = config_file(CONFIG);
    for (k, point) in POINTS.iter().enumerate() {
        for hit in [1u64, 3] {
            let (sims, env) = world(100 + k as u64 * 10 + hit).await;
            let state = state_path();
            let mut crashing = env.clone();
            crashing.push(("OPPSYNC_CRASH_AT".into(), format!("{point}:{hit}")));
            let crashed = oppsync(&["sync", "--state", s(&state), "--config", s(&config)], &crashing).await;
            assert_ne!(crashed.code, 0, "{point}:{hit} should have crashed: {crashed:?}");
            assert!(crashed.stderr.contains(&format!("crash point {point}")), "{crashed:?}");
            change_something(&sims, k as u64 + hit);
            run_to_the_end(&state, &config, &env).await;
            assert_converged(&sims);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_moments_a_restart_converges() {
    let config = config_file(CONFIG);
    for seed in 0..8u64 {
        let (sims, env) = world(500 + seed).await;
        let state = state_path();
        // Two kills per seed, at moments drawn from the seed, each followed by a change.
        for kill in 0..2u64 {
            let delay = Duration::from_millis(40 + (seed * 7919 + kill * 104_729) % 400);
            let args = vec![
                "sync".to_string(),
                "--state".into(),
                s(&state).into(),
                "--config".into(),
                s(&config).into(),
            ];
            let env2 = env.clone();
            tokio::task::spawn_blocking(move || {
                let mut child = Command::new(env!("CARGO_BIN_EXE_oppsync"))
                    .args(&args)
                    .env_clear()
                    .envs(env2)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                std::thread::sleep(delay);
                // SIGKILL: no destructor, no flush, like a power cut.
                let _ = child.kill();
                let _ = child.wait();
            })
            .await
            .unwrap();
            change_something(&sims, seed * 2 + kill);
        }
        run_to_the_end(&state, &config, &env).await;
        assert_converged(&sims);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_the_same_state_is_refused_while_the_first_holds_it() {
    let (_sims, env) = world(900).await;
    let state = state_path();
    let config = config_file(CONFIG);
    // A first run stopped at a crash point would have exited; hold the lock from a live one.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(format!("{}.lock", s(&state)))
        .unwrap();
    lock.lock().unwrap();
    let run = oppsync(&["sync", "--state", s(&state), "--config", s(&config)], &env).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("another oppsync is using the state"), "{run:?}");
    drop(lock);
    let run = oppsync(&["sync", "--state", s(&state), "--config", s(&config)], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
}
