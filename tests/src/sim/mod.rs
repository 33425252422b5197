//! The deterministic simulation of the whole sync: one seed, one reproducible run of every
//! actor (the poller, transformers, two writers, resync) over Dynamics, Marketo and the state
//! store, with the faults the seed draws (calls refused, applied with their answers lost,
//! applied late; a Marketo outage; expired change tokens; processes killed between two awaits;
//! clock jumps), while Dynamics' users change opportunities, customers, owners, stakeholders
//! and emails. Then the faults stop, the actors drain, the failed records are replayed, and the
//! oracle checks the one property that matters: Marketo equals the rules applied to Dynamics,
//! and every record is synced or deleted.
//!
//! Everything runs on one thread with virtual time (tokio's paused clock), so a seed replays
//! the same interleaving and the same trace every time. `cargo run -p oppsync-tests --bin
//! simulate -- --seeds 0..1000` runs a campaign; a failing seed prints its trace.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use oppsync_mapping::OpportunityId;
use oppsync_pipeline::memory::MemoryMarketo;
use oppsync_pipeline::{Config, Pipeline, ResyncTarget};
use oppsync_simulators::dataverse::Table;
use oppsync_simulators::marketo::{SimLead, SimRole, Snapshot};
use oppsync_simulators::oracle::{self, Rules};
use oppsync_state::{StateStore, Status};
use tokio::task::JoinHandle;

pub mod dynamics;
pub mod faults;
pub mod marketo;
pub mod rng;
pub mod store;

use dynamics::SimDynamics;
use faults::{Faults, Rates};
use marketo::SimMarketo;
use rng::Rng;
use store::SimStore;

/// What a run does: how long the faults and changes last, and which faults.
#[derive(Debug, Clone)]
pub struct Options {
    /// Virtual minutes of changes and faults before the drain.
    pub minutes: u64,
    /// Opportunities Dynamics starts with.
    pub opportunities: u64,
    /// The fault classes on, at rates the seed draws (none: only the actors' interleavings and
    /// Dynamics' changes).
    pub faults: Vec<Class>,
}

/// A class of fault, each a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Calls to Dataverse, Marketo or the store refused before they are applied.
    Refused,
    /// Calls applied with their answers lost.
    Lost,
    /// Lost Marketo calls applied only later, after calls sent after them.
    Late,
    /// Marketo's daily quota (607).
    Quota,
    /// Processes killed between two awaits.
    Kills,
    /// The clock jumping past claim and lock lifetimes.
    Jumps,
    /// A Marketo outage of up to an hour.
    Outage,
    /// Dataverse's change tokens expiring.
    Expiry,
}

impl Class {
    pub const ALL: [Class; 8] = [
        Class::Refused,
        Class::Lost,
        Class::Late,
        Class::Quota,
        Class::Kills,
        Class::Jumps,
        Class::Outage,
        Class::Expiry,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Class::Refused => "refused",
            Class::Lost => "lost",
            Class::Late => "late",
            Class::Quota => "quota",
            Class::Kills => "kills",
            Class::Jumps => "jumps",
            Class::Outage => "outage",
            Class::Expiry => "expiry",
        }
    }

    pub fn parse(text: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.name() == text)
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            minutes: 20,
            opportunities: 12,
            faults: Class::ALL.to_vec(),
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    /// Every way Marketo or the state differ from what the rules make of Dynamics.
    pub violations: Vec<String>,
    /// The last events of the run.
    pub trace: Vec<String>,
    pub events: u64,
}

impl Outcome {
    /// The report of a failed seed: what differs, and the trace that led there.
    pub fn report(&self) -> String {
        format!(
            "seed {} failed: {} violation(s)\n  {}\nthe last {} of {} events:\n  {}\nrerun: cargo run -p oppsync-tests --bin simulate -- --seeds {}..{}",
            self.seed,
            self.violations.len(),
            self.violations.join("\n  "),
            self.trace.len(),
            self.events,
            self.trace.join("\n  "),
            self.seed,
            self.seed + 1
        )
    }
}

type SimPipeline = Pipeline<SimStore, SimDynamics, SimMarketo>;

/// The parts every process of the run shares: one Dynamics, one Marketo, one store.
#[derive(Clone)]
struct World {
    dynamics: SimDynamics,
    marketo: SimMarketo,
    store: SimStore,
    faults: Faults,
    config: Config,
}

impl World {
    /// A new process: a pipeline with caches and locks of its own, over the shared parts.
    fn process(&self, name: &str) -> SimPipeline {
        let faults = self.faults.clone();
        Pipeline::new(
            self.store.clone(),
            self.dynamics.clone(),
            self.marketo.clone(),
            self.config.clone(),
            name,
        )
        .with_clock(Arc::new(move || faults.now()))
    }
}

/// The actors, by name, each a process that runs until killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Actor {
    Poller,
    Transformer,
    Writer1,
    Writer2,
    Resync,
}

const ACTORS: [Actor; 5] = [
    Actor::Poller,
    Actor::Transformer,
    Actor::Writer1,
    Actor::Writer2,
    Actor::Resync,
];

/// Ids in a status (up to a batch).
async fn ids_in(p: &SimPipeline, status: Status) -> Vec<OpportunityId> {
    match p.store().list(status, 300, None).await {
        Ok(page) => page.items.into_iter().map(|s| s.id).collect(),
        Err(_) => Vec::new(),
    }
}

/// One step of an actor, through the pipeline's own entry points.
async fn step(actor: Actor, p: &SimPipeline, rng: &mut Rng, faults: &Faults) {
    let name = format!("{actor:?}");
    match actor {
        Actor::Poller => match p.poll(None).await {
            Ok(r) => faults.trace(format!(
                "{name} polled: {} changes, {} marked, {} requeued, {} woken{}",
                r.opportunity_changes + r.connection_changes,
                r.marked,
                r.requeued,
                r.woken,
                if r.deletion_scan { ", a deletion scan" } else { "" }
            )),
            Err(e) => faults.trace(format!("{name} poll failed: {e}")),
        },
        Actor::Transformer => {
            let ids = ids_in(p, Status::Pending).await;
            if !ids.is_empty() {
                match p.transform(&ids, false).await {
                    Ok(r) => faults.trace(format!("{name} transformed {} records", r.records.len())),
                    Err(e) => faults.trace(format!("{name} transform failed: {e}")),
                }
            }
        }
        Actor::Writer1 | Actor::Writer2 => {
            let ids = ids_in(p, Status::Ready).await;
            if !ids.is_empty() {
                match p.write(&ids).await {
                    Ok(r) => {
                        let mut by: BTreeMap<String, usize> = BTreeMap::new();
                        for record in &r.records {
                            let outcome = serde_json::to_value(&record.result).ok();
                            let outcome = outcome
                                .as_ref()
                                .and_then(|o| o["outcome"].as_str())
                                .unwrap_or("?")
                                .to_owned();
                            *by.entry(outcome).or_default() += 1;
                        }
                        faults.trace(format!(
                            "{name} wrote {by:?}{}",
                            r.stopped.map(|s| format!(", stopped: {s}")).unwrap_or_default()
                        ));
                    }
                    Err(e) => faults.trace(format!("{name} write failed: {e}")),
                }
            }
        }
        Actor::Resync => {
            let target = if rng.one_in(3) {
                ResyncTarget::Failed
            } else {
                let known = ids_in(p, Status::Synced).await;
                match rng.pick(&known) {
                    Some(id) => ResyncTarget::Ids(vec![*id]),
                    None => return,
                }
            };
            match p.resync(target.clone(), false).await {
                Ok(_) => faults.trace(format!("{name} resynced {target:?}")),
                Err(e) => faults.trace(format!("{name} resync of {target:?} failed: {e}")),
            }
        }
    }
}

/// How long an actor waits between steps.
fn pause(actor: Actor, rng: &mut Rng) -> Duration {
    let (lo, hi) = match actor {
        Actor::Poller => (5_000, 60_000),
        Actor::Resync => (60_000, 300_000),
        _ => (1_000, 10_000),
    };
    Duration::from_millis(rng.range(lo, hi))
}

fn spawn_actor(world: &World, actor: Actor, generation: u32, mut rng: Rng) -> JoinHandle<()> {
    let p = world.process(&format!("{actor:?}-{generation}"));
    let faults = world.faults.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(pause(actor, &mut rng)).await;
            step(actor, &p, &mut rng, &faults).await;
        }
    })
}

/// A change a Dynamics user makes.
fn change_dynamics(dynamics: &SimDynamics, rng: &mut Rng, faults: &Faults) {
    let what = match rng.below(20) {
        0..=5 => dynamics.edit_opportunity(rng).map(|id| format!("edited {id}")),
        6 | 7 => Some(format!("created {}", dynamics.create_opportunity(rng))),
        8 => {
            // A bulk import: several in the same second.
            let ids: Vec<String> = (0..rng.range(2, 6)).map(|_| dynamics.create_opportunity(rng)).collect();
            Some(format!("imported {}", ids.len()))
        }
        9 | 10 => dynamics.delete_opportunity(rng).map(|id| format!("deleted {id}")),
        11 => dynamics.restore_opportunity(rng).map(|id| format!("restored {id}")),
        12..=14 => dynamics
            .add_stakeholder(rng)
            .map(|id| format!("added a stakeholder to {id}")),
        15 | 16 => dynamics
            .remove_stakeholder(rng)
            .map(|id| format!("removed a stakeholder of {id}")),
        17 => {
            dynamics.change_contact_email(rng);
            Some("changed a contact's email".into())
        }
        _ => {
            dynamics.change_user_email(rng);
            Some("changed a user's email".into())
        }
    };
    if let Some(what) = what {
        faults.trace(format!("Dynamics: {what}"));
    }
}

/// Runs one seed.
pub fn run(seed: u64, options: &Options) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a single-threaded runtime");
    runtime.block_on(simulate(seed, options, |_| {}))
}

/// [`run`], with `tamper` changing Marketo after the drain and before the check (a test that
/// the oracle sees what it should).
pub fn run_then(seed: u64, options: &Options, tamper: impl FnOnce(&MemoryMarketo)) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a single-threaded runtime");
    runtime.block_on(simulate(seed, options, tamper))
}

async fn simulate(seed: u64, options: &Options, tamper: impl FnOnce(&MemoryMarketo)) -> Outcome {
    let mut rng = Rng::new(seed);
    let faults = Faults::new(rng.fork());
    let dynamics = SimDynamics::new(&mut rng, options.opportunities, faults.clone());
    let mut config = Config::default();
    config.sync.claim_ttl_seconds = 60;
    let world = World {
        dynamics: dynamics.clone(),
        marketo: SimMarketo::new(faults.clone()),
        store: SimStore::new(faults.clone()),
        faults: faults.clone(),
        config,
    };
    let on = |class: Class| options.faults.contains(&class);
    let mut rates = Rates::every_class(&mut rng);
    for (class, rate) in [
        (Class::Refused, &mut rates.before),
        (Class::Lost, &mut rates.lost),
        (Class::Late, &mut rates.late),
        (Class::Quota, &mut rates.quota),
    ] {
        if !on(class) {
            *rate = 0.0;
        }
    }
    faults.set_rates(rates);
    let mut generation = 0;
    let mut actors: BTreeMap<Actor, JoinHandle<()>> = ACTORS
        .iter()
        .map(|a| (*a, spawn_actor(&world, *a, generation, rng.fork())))
        .collect();
    // The chaos: Dynamics' users, and the faults that are not a call's.
    let end = faults.now() + options.minutes as i64 * 60_000;
    while faults.now() < end {
        tokio::time::sleep(Duration::from_millis(rng.range(1_000, 20_000))).await;
        dynamics.set_time(oppsync_pipeline::time::format_utc(faults.now()));
        change_dynamics(&dynamics, &mut rng, &faults);
        match rng.below(40) {
            0..=2 if on(Class::Kills) => {
                // A process killed between two awaits: its claims and locks are left to expire.
                let victim = *rng.pick(&ACTORS).unwrap_or(&Actor::Writer1);
                generation += 1;
                if let Some(handle) = actors.remove(&victim) {
                    handle.abort();
                }
                faults.trace(format!("{victim:?} killed; a new process starts"));
                actors.insert(victim, spawn_actor(&world, victim, generation, rng.fork()));
            }
            3 if on(Class::Jumps) => faults.jump(rng.range(61_000, 400_000) as i64),
            4 if on(Class::Outage) && rng.one_in(4) => faults.outage(rng.range(60_000, 3_600_000) as i64),
            5 if on(Class::Expiry) && rng.one_in(3) => {
                dynamics.expire_tokens();
                faults.trace("Dataverse's change tokens expire".into());
            }
            _ => {}
        }
    }
    // The faults stop; late calls still land; the actors drain what is left.
    faults.set_rates(Rates::none());
    faults.outage(0);
    for (_, handle) in std::mem::take(&mut actors) {
        handle.abort();
    }
    faults.trace("the faults stop; the drain begins".into());
    let p = world.process("drain");
    let mut violations = drain(&p, &faults).await;
    // What failed is replayed, and must then be written.
    if let Err(e) = p.resync(ResyncTarget::Failed, false).await {
        violations.push(format!("the replay of the failed records failed: {e}"));
    }
    violations.extend(drain(&p, &faults).await);
    tamper(&world.marketo.inner);
    violations.extend(check(&world).await);
    let (trace, events) = faults.trace_lines();
    Outcome {
        seed,
        violations,
        trace,
        events,
    }
}

/// Poll, transform and write until nothing is left, a minute apart (claims, locks and waits
/// expire in between). A drain that never ends is a violation.
async fn drain(p: &SimPipeline, faults: &Faults) -> Vec<String> {
    let mut rng = Rng::new(0);
    let mut quiet = 0;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(60)).await;
        step(Actor::Poller, p, &mut rng, faults).await;
        for _ in 0..3 {
            step(Actor::Transformer, p, &mut rng, faults).await;
            step(Actor::Writer1, p, &mut rng, faults).await;
        }
        let counts = match p.store().counts().await {
            Ok(c) => c,
            Err(e) => return vec![format!("the store could not count: {e}")],
        };
        if counts.get(Status::Pending) + counts.get(Status::Ready) == 0 {
            quiet += 1;
            if quiet == 2 {
                return Vec::new();
            }
        } else {
            quiet = 0;
        }
    }
    vec!["the drain did not end: records stay pending or ready after an hour without faults".into()]
}

/// The oracle: Marketo against the rules applied to Dynamics, one lead per email, and every
/// record synced or deleted.
async fn check(world: &World) -> Vec<String> {
    let expected = oracle::expected_from(|table: Table| world.dynamics.oracle_rows(table), &Rules::default());
    let holds = world.marketo.inner.holds();
    let snapshot = Snapshot {
        opportunities: holds.opportunities.clone(),
        roles: holds
            .roles
            .iter()
            .map(|(key, primary)| SimRole {
                external_opportunity_id: key.external_opportunity_id.clone(),
                lead_id: key.lead_id,
                role: key.role.clone(),
                is_primary: *primary,
                marketo_guid: String::new(),
            })
            .collect(),
        companies: holds.companies.clone(),
        sales_persons: holds.sales_persons.clone(),
        leads: holds
            .leads
            .iter()
            .map(|(id, fields)| SimLead {
                id: *id,
                fields: fields.clone(),
            })
            .collect(),
    };
    let mut violations = oracle::differences(&expected, &snapshot, &BTreeSet::new());
    let mut emails: BTreeMap<String, usize> = BTreeMap::new();
    for lead in &snapshot.leads {
        if let Some(email) = lead.fields.get("email").and_then(|e| e.as_str()) {
            *emails.entry(email.to_ascii_lowercase()).or_default() += 1;
        }
    }
    for (email, n) in emails.into_iter().filter(|(_, n)| *n > 1) {
        violations.push(format!("{n} leads with the email {email}"));
    }
    for state in world.store.inner.all() {
        if !matches!(state.status, Status::Synced | Status::Deleted) {
            violations.push(format!(
                "opportunity {} is {} after the replay ({:?})",
                state.id, state.status, state.last_error
            ));
        }
    }
    violations
}
