//! One simulated cluster for the engine's tests: the controller (the real `Engine::step`, its
//! database as `persist::Db`, restarts that reload it), each host's agent (the real
//! `selffence::LeaseKeeper`: leases, peer polls, self-fence, watchdog feeds; registration,
//! heartbeats, its roster), each host's libvirt (domains, starts, live migrations) and the
//! network between them. `tests/safety.rs` drives it with random faults and checks that no VM
//! ever runs twice; `tests/scenarios.rs` drives it with scripts and compares its log.
//!
//! The two tests model time and a few details differently, on purpose, and say so in `Config`:
//! the scenarios' logs must stay readable and stable, while the safety run needs jitter,
//! overtaking messages and the worst timing it can find.

// Each test binary uses part of the world; what one leaves unused, the other uses.
#![allow(dead_code)]

mod agent;
mod controller;
mod libvirt;
mod network;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};

use vmha_engine::persist::Db;
use vmha_engine::step::Persist;
use vmha_engine::{ClusterState, Engine, Timings};

pub use agent::Host;
pub use libvirt::{AgentFault, Dom, GuestFault, Vm};
use network::{Event, Followup};

/// The controller's tick.
pub const TICK_MS: u64 = 100;

#[derive(Clone, Debug)]
pub struct Config {
    pub timings: Timings,
    /// The timeout each agent arms its watchdog with.
    pub watchdog_ms: u64,
    pub clock: Clock,
    /// Whether each agent holds a session with the controller (scenarios), as the real stream:
    /// it registers at its first heartbeat and again whenever the session broke (the agent or
    /// its host went down, the controller restarted, a heartbeat did not get through); a
    /// command goes over it or fails at once, and a result comes back only over the session
    /// its command came on. Without (safety): an agent registers when it starts, the
    /// controller sends to whatever its network reaches, and a result reaches any controller.
    pub sessions: bool,
    pub libvirt: Libvirt,
    /// A running copy locks its disk (libvirt's lockd): a second start fails.
    pub disk_locks: bool,
    /// Whether an agent reports its watchdog armed from its first heartbeat (scenarios), or
    /// only once it fed it, as the real agent arms it with its first lease (safety).
    pub watchdog_armed_at_boot: bool,
    pub log: Log,
}

/// How time goes.
#[derive(Clone, Copy, Debug)]
pub enum Clock {
    /// Scenarios: agents step on the controller's 100 ms tick; a message arrives in the
    /// instant it is sent (the controller takes its inputs in turn, an agent at once, and an
    /// RPC's answer comes back before the caller goes on); nothing is left to chance.
    Tick,
    /// Safety: agents step every 10 ms; a message takes 1-20 ms (on a slow network, one in ten
    /// 100-700 ms, longer than `max_transit`) and arrives at its own millisecond, so messages
    /// overtake each other; agents start at random phases with random seeds.
    Jittered { slow: bool },
}

/// How each host's libvirt carries out what it is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Libvirt {
    /// Scenarios: a start takes 1 s (10 s when slowed); a live migration 2 s (20 s), the paused
    /// incoming side on the target from its beginning (its start hook and the network checked
    /// then), and the agent undefines the source's copy at its end. Jobs end at their host's
    /// step.
    Timed,
    /// Safety: a start happens when it is asked (or when a hung libvirtd answers again); a
    /// live migration ends 200 ms to 2 s later at its own millisecond, which is when
    /// everything is checked and the VM moves; the source keeps its definition, shut off (the
    /// moment before the agent undefines it, made endless).
    Sudden,
}

/// Where the world's log lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Log {
    Off,
    Keep,
    Print,
}

#[derive(Clone, Debug)]
pub struct HostSpec {
    pub name: String,
    pub cpus: u32,
    pub mem_mib: u64,
    /// The free memory its agent reports whatever runs there (the safety run does not check
    /// room); `None`: what its guests leave.
    pub free_mib: Option<u64>,
    /// It has a watchdog device.
    pub watchdog: bool,
}

#[derive(Clone, Debug)]
pub struct VmSpec {
    pub uuid: String,
    pub name: String,
    pub mem_mib: u64,
    pub vcpus: u32,
    /// Where it runs at the start.
    pub host: usize,
}

pub struct World {
    /// The instant the world is at: after a run, the last one it simulated.
    pub now: u64,
    next_step: u64,
    pub config: Config,
    rng: u64,
    events: BinaryHeap<Reverse<(u64, u64, usize)>>,
    payloads: Vec<Option<Event>>,
    seq: u64,
    pub engine: Engine,
    /// What the controller persisted; a restarted controller starts from it.
    pub db: Db,
    /// What the controller's last step left to do, in turn: inputs it feeds itself and
    /// commands to send (and, on the tick clock, results that arrived).
    outbox: VecDeque<Followup>,
    /// Writes queued while the database is down: lost if the controller restarts meanwhile.
    unwritten: Vec<Persist>,
    paused_until: u64,
    db_down_until: u64,
    pub hosts: Vec<Host>,
    pub vms: Vec<Vm>,
    host_index: HashMap<String, usize>,
    vm_index: HashMap<String, usize>,
    /// Starts carried out by libvirt (a migration is no start).
    pub starts: usize,
    /// Guest resets carried out by libvirt: (in place, hard: destroyed and started again).
    pub resets: (usize, usize),
    /// Each time a VM started while another copy of it ran.
    pub violations: Vec<String>,
    /// Peer-poll questions asked (one RPC each), per second of simulated time.
    pub asks: Vec<u64>,

    pub log: Vec<String>,
    /// The open outage of each VM (UUID) as the store keeps it, for the log: when it began.
    outages: BTreeMap<String, u64>,
}

impl World {
    /// A cluster whose controller starts from `cluster` (its database holding the same) and
    /// whose VMs run where `vms` say. Without sessions every agent registers at once.
    pub fn new(
        config: Config,
        seed: u64,
        cluster: ClusterState,
        hosts: Vec<HostSpec>,
        vms: Vec<VmSpec>,
    ) -> World {
        let db = Db { hosts: cluster.hosts.clone(), vms: cluster.vms.clone(), ops: Default::default() };
        // What the controller already protects, the agents know (their state directories).
        let protected: BTreeSet<usize> = (vms.iter().enumerate())
            .filter(|(_, v)| cluster.vms.get(&v.uuid).is_some_and(|v| v.protected))
            .map(|(i, _)| i)
            .collect();
        let mut world = World {
            now: 0,
            next_step: 0,
            rng: seed | 1,
            events: BinaryHeap::new(),
            payloads: Vec::new(),
            seq: 0,
            engine: Engine::new(cluster),
            db,
            outbox: VecDeque::new(),
            unwritten: Vec::new(),
            paused_until: 0,
            db_down_until: 0,
            host_index: hosts.iter().enumerate().map(|(i, h)| (h.name.clone(), i)).collect(),
            vm_index: vms.iter().enumerate().map(|(i, v)| (v.uuid.clone(), i)).collect(),
            hosts: hosts.into_iter().map(|spec| Host::new(spec, &config, protected.clone())).collect(),
            vms: vms.into_iter().map(Vm::new).collect(),
            starts: 0,
            resets: (0, 0),
            violations: Vec::new(),
            asks: Vec::new(),

            log: Vec::new(),
            outages: BTreeMap::new(),
            config,
        };
        for h in 0..world.hosts.len() {
            world.boot(h);
        }
        world
    }

    /// Runs until `until` (inclusive), going on from where the last run ended.
    pub fn run(&mut self, until: u64) {
        self.run_acting(until, |_| {});
    }

    /// Runs until `until`; at each step, after the agents, `act` does what a test does then.
    pub fn run_acting(&mut self, until: u64, mut act: impl FnMut(&mut World)) {
        while self.next_step <= until {
            self.now = self.next_step;
            self.deliver_due();
            for h in 0..self.hosts.len() {
                self.host_step(h);
            }
            act(self);
            self.tick();
            self.next_step += self.step_ms();
        }
    }

    /// `act` happens at `t`, in turn with the messages due then.
    pub fn schedule(&mut self, t: u64, act: impl FnOnce(&mut World) + 'static) {
        self.at(t, Event::Act(Box::new(act)));
    }

    fn step_ms(&self) -> u64 {
        match self.config.clock {
            Clock::Tick => TICK_MS,
            Clock::Jittered { .. } => 10,
        }
    }

    /// A number below `n` (xorshift).
    fn rand(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n.max(1)
    }

    pub fn host(&self, name: &str) -> usize {
        *self.host_index.get(name).unwrap_or_else(|| panic!("unknown host {name}"))
    }

    pub fn vm(&self, uuid: &str) -> usize {
        *self.vm_index.get(uuid).unwrap_or_else(|| panic!("unknown VM {uuid}"))
    }

    pub fn vm_named(&self, name: &str) -> usize {
        self.vms.iter().position(|v| v.spec.name == name).unwrap_or_else(|| panic!("unknown VM {name}"))
    }

    /// Messages on their way, and what tests scheduled.
    pub fn pending_events(&self) -> usize {
        self.events.len()
    }

    /// The hosts where `vm` runs.
    pub fn copies(&self, vm: usize) -> BTreeSet<usize> {
        self.vms[vm].on.iter().filter(|(_, d)| **d == Dom::Running).map(|(h, _)| *h).collect()
    }

    /// A line of the log, stamped with the time; built only when someone reads it.
    pub fn line(&mut self, text: impl FnOnce() -> String) {
        match self.config.log {
            Log::Off => {}
            Log::Keep => self.log.push(format!("{} {}", secs(self.now), text())),
            Log::Print => eprintln!("{} {}", secs(self.now), text()),
        }
    }
}

/// "12.3s", right-aligned: times in the log line up.
fn secs(ms: u64) -> String {
    format!("{:>7}", format!("{}.{}s", ms / 1000, ms % 1000 / 100))
}

/// On the tick clock nothing is left to chance: an agent's keeper is seeded from its host's
/// name.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
}

/// The operator's `vmha protect` (`force`: past the reserve check) or `unprotect`, changing
/// nothing else.
pub fn protection(vm: &str, protected: bool, force: bool) -> vmha_engine::Request {
    vmha_engine::Request::Protection {
        vm: vm.into(),
        protected,
        priority: None,
        anti_affinity: None,
        allowed_hosts: None,
        preferred_host: None,
        force,
    }
}
