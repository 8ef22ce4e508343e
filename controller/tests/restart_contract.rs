//! One restart contract: what the engine's model of the database keeps (`persist::Db`, which
//! the simulator and the scenario tests restart from) and what the controller keeps in
//! PostgreSQL (`Write::persisted` and `Write::operation` through the journal, loaded again by
//! `controller::load`) must give a new leader the same state. Otherwise the simulator proves
//! the safety of restarts that production does not perform.
//!
//! Random runs of a small cluster drive the real engine: hosts register, report, go silent or
//! lose power and are declared dead, their VMs restart elsewhere; operators protect, drain,
//! migrate, stop and start; agents carry out commands or fail them; the leader restarts. Every
//! step's `Output.persist` goes to both stores, and after every action both are restored as a
//! new leader would, and compared.

mod support;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use support::PgServer;

use vmha_controller::journal::{Journal, Write};
use vmha_controller::store::{Store, StoreError};
use vmha_engine::cluster::HostResources;
use vmha_engine::event::Event;
use vmha_engine::health::Probe;
use vmha_engine::inventory::ReportedDomain;
use vmha_engine::lease::Echo;
use vmha_engine::operation::{Done, OpId, Overrides};
use vmha_engine::persist::Db;
use vmha_engine::step::{Command, CommandKind, Heartbeat, Input, Registration, Reply, Request};
use vmha_engine::{ClusterState, Engine, FencingMode, Millis, Policy, RunState, Timings, Watchdog};

const HOSTS: [&str; 4] = ["kvm1", "kvm2", "kvm3", "kvm4"];
const VMS: usize = 6;
/// A tick of the leader's loop, and the step of the test's clock.
const TICK_MS: u64 = 100;

fn timings() -> Timings {
    Timings::fast()
}

/// Quick to degrade and recover, so that a run sees health drains begin and end.
fn policy() -> Policy {
    Policy { degraded_after_ms: 1_000, recover_after_ms: 2_000, ..Policy::default() }
}

fn uuid(vm: usize) -> String {
    format!("00000000-0000-4000-8000-{:012}", vm + 1)
}

fn name(vm: usize) -> String {
    format!("vm{vm}")
}

/// A definition as an agent sends it: its disk named after the VM and how often it was
/// redefined, so that a redefinition changes the disks the controller reads from it.
fn definition(vm: usize, generation: u32) -> String {
    format!(
        "<domain type='kvm'><name>{}</name><uuid>{}</uuid><memory unit='KiB'>1048576</memory>\
         <devices><disk type='file' device='disk'><source file='/srv/vms/{}-{generation}.qcow2'/></disk>\
         <disk type='file' device='cdrom'><source file='/srv/iso/install.iso'/></disk></devices></domain>",
        name(vm),
        uuid(vm),
        name(vm)
    )
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    Done,
    Failed,
    /// The storage lock refused a start: another copy may run.
    DiskLocked,
}

#[derive(Clone, Debug)]
enum Act {
    /// Time passes: every host that reaches the leader heartbeats, the leader ticks.
    Pass(u64),
    /// The host stops reaching the leader; its VMs keep running.
    Silent(usize),
    /// Power pulled: no agent, and its VMs stop.
    PowerOff(usize),
    /// Reaches the leader again, and registers.
    Back(usize),
    Watchdog(usize, bool),
    Probes(usize, bool),
    /// Its agent reports a new total memory.
    Memory(usize, u64),
    /// The VM's host reports a changed definition.
    Redefine(usize),
    Protect {
        vm: usize,
        priority: i32,
        group: Option<u8>,
        allowed: Vec<usize>,
        prefer: Option<usize>,
        force: bool,
    },
    Unprotect(usize),
    Drain(usize, bool),
    Undrain(usize, bool),
    Fencing(usize, FencingMode),
    MemoryLimit(usize, Option<u64>),
    ConfirmDown(usize),
    FenceResult(usize, bool),
    Remove(usize),
    Migrate(usize, usize, bool),
    Cancel(usize),
    Stop(usize),
    Start(usize, Option<usize>),
    /// The agent of one of the commands sent carries it out, or fails it, and says so.
    Finish(usize, Outcome),
    /// The leader stops; the next one restores from the database.
    Restart,
}

fn act() -> impl Strategy<Value = Act> {
    let host = || 0..HOSTS.len();
    let vm = || 0..VMS;
    prop_oneof![
        6 => (1..40u64).prop_map(|ticks| Act::Pass(ticks * TICK_MS)),
        1 => host().prop_map(Act::Silent),
        1 => host().prop_map(Act::PowerOff),
        2 => host().prop_map(Act::Back),
        1 => (host(), any::<bool>()).prop_map(|(h, armed)| Act::Watchdog(h, armed)),
        1 => (host(), any::<bool>()).prop_map(|(h, ok)| Act::Probes(h, ok)),
        1 => (host(), 8..64u64).prop_map(|(h, gib)| Act::Memory(h, gib << 20)),
        1 => vm().prop_map(Act::Redefine),
        2 => (
            vm(),
            -5..5i32,
            prop::option::of(0..2u8),
            prop::collection::vec(host(), 0..3),
            prop::option::of(host()),
            any::<bool>()
        )
            .prop_map(|(vm, priority, group, allowed, prefer, force)| Act::Protect {
                vm,
                priority,
                group,
                allowed,
                prefer,
                force
            }),
        1 => vm().prop_map(Act::Unprotect),
        1 => (host(), any::<bool>()).prop_map(|(h, allow_restart)| Act::Drain(h, allow_restart)),
        1 => (host(), any::<bool>()).prop_map(|(h, abort)| Act::Undrain(h, abort)),
        1 => (host(), prop::sample::select(vec![FencingMode::SelfFence, FencingMode::External, FencingMode::Manual]))
            .prop_map(|(h, mode)| Act::Fencing(h, mode)),
        1 => (host(), prop::option::of(1..32u64)).prop_map(|(h, gib)| Act::MemoryLimit(h, gib.map(|g| g << 20))),
        1 => host().prop_map(Act::ConfirmDown),
        1 => (host(), any::<bool>()).prop_map(|(h, ok)| Act::FenceResult(h, ok)),
        1 => host().prop_map(Act::Remove),
        1 => (vm(), host(), any::<bool>()).prop_map(|(vm, to, overrides)| Act::Migrate(vm, to, overrides)),
        1 => vm().prop_map(Act::Cancel),
        1 => vm().prop_map(Act::Stop),
        1 => (vm(), prop::option::of(host())).prop_map(|(vm, on)| Act::Start(vm, on)),
        4 => (
            any::<usize>(),
            prop_oneof![8 => Just(Outcome::Done), 1 => Just(Outcome::Failed), 1 => Just(Outcome::DiskLocked)]
        )
            .prop_map(|(i, outcome)| Act::Finish(i, outcome)),
        1 => Just(Act::Restart),
    ]
}

/// A host as the test plays it: its agent, and the domains its libvirt runs.
struct Host {
    /// Reaches the leader.
    up: bool,
    /// The epoch of the leader it registered with.
    registered: Option<u64>,
    /// The last answer's epoch, stamp and arrival (on the test's clock), to echo.
    last_answer: Option<(u64, Millis, u64)>,
    /// The roster version its agent holds.
    roster: u64,
    next_heartbeat: u64,
    domains: BTreeMap<usize, RunState>,
    armed: bool,
    probes_ok: bool,
    memory_kib: u64,
}

type Written = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

struct World {
    /// The test's clock; the leader's reads `now - origin`, as a restarted controller's clock
    /// starts again at 0.
    now: u64,
    origin: u64,
    engine: Engine,
    db: Db,
    url: String,
    store: Store,
    journal: Journal,
    /// Writes queued for the database, each answered once it is written (or refused).
    written: Vec<Written>,
    hosts: Vec<Host>,
    /// Operations to tell the leader are recorded.
    recording: Vec<OpId>,
    /// Commands sent to agents, not carried out yet.
    sent: Vec<Command>,
    generation: [u32; VMS],
}

impl World {
    async fn new(url: String) -> World {
        let epoch = Store::open(&url).await.unwrap().next_epoch().await.unwrap();
        let store = Store::open_for_epoch(&url, epoch).await.unwrap();
        let cluster = ClusterState { timings: timings(), policy: policy(), epoch, ..Default::default() };
        let hosts = (0..HOSTS.len())
            .map(|h| Host {
                up: true,
                registered: None,
                last_answer: None,
                roster: 0,
                next_heartbeat: 0,
                domains: (0..VMS)
                    .filter(|vm| vm % HOSTS.len() == h)
                    .map(|vm| (vm, RunState::Running))
                    .collect(),
                armed: true,
                probes_ok: true,
                memory_kib: 32 << 20,
            })
            .collect();
        World {
            now: 0,
            origin: 0,
            engine: Engine::new(cluster),
            db: Db::default(),
            url,
            journal: Journal::start(store.clone()),
            store,
            written: Vec::new(),
            hosts,
            recording: Vec::new(),
            sent: Vec::new(),
            generation: [0; VMS],
        }
    }

    fn epoch(&self) -> u64 {
        self.engine.cluster.epoch
    }

    /// One step of the leader, persisted to both stores.
    fn step(&mut self, input: Input) -> Reply {
        let out = self.engine.step(input, Millis(self.now - self.origin));
        self.db.apply(&self.engine, &out.persist);
        let epoch = self.epoch();
        let ops = out.persist.ops.iter().map(|op| Write::operation(op, epoch));
        for write in Write::persisted(&self.engine.cluster, &out.persist).into_iter().chain(ops) {
            self.write(write);
        }
        self.recording.extend(out.record);
        self.sent.extend(out.commands);
        out.reply
    }

    fn write(&mut self, write: Write) {
        self.written.push(Box::pin(self.journal.record(write)));
    }

    fn operator(&mut self, request: Request) {
        self.step(Input::Operator { actor: "alice".into(), request });
    }

    fn register(&mut self, h: usize) {
        let host = &self.hosts[h];
        let r = Registration {
            host: HOSTS[h].into(),
            migration_uri: format!("qemu+tcp://{}/system", HOSTS[h]),
            peer_address: format!("{}:7401", HOSTS[h]),
            resources: resources(host),
            libvirt_version: "10.0.0".into(),
            lock_manager: "lockd".into(),
            describe: "vmha-agent (test)".into(),
        };
        if let Reply::Registered { stamp } = self.step(Input::Register(r)) {
            let epoch = self.epoch();
            let host = &mut self.hosts[h];
            host.registered = Some(epoch);
            host.last_answer = Some((epoch, stamp, self.now));
            host.next_heartbeat = self.now + TICK_MS;
            // As the agent API does once the step registered the host: its facts, with the
            // hypervisor's version, which the engine does not keep.
            if let Some(view) = self.engine.cluster.hosts.get(HOSTS[h]).cloned() {
                self.write(Write::Host { host: view, hypervisor_version: "QEMU 8.2.2".into() });
            }
        }
    }

    fn heartbeat(&mut self, h: usize) {
        let host = &self.hosts[h];
        let domains = host
            .domains
            .iter()
            .map(|(&vm, &state)| ReportedDomain {
                uuid: uuid(vm),
                name: name(vm),
                state,
                memory_kib: 1 << 20,
                vcpus: 2,
                guest: None,
                probes: Vec::new(),
            })
            .collect();
        let xml = host
            .domains
            .keys()
            .map(|&vm| {
                let xml = definition(vm, self.generation[vm]);
                // The writable disks, as the controller's checks read them from a report.
                let disks = vmha_controller::domain_xml::disks(&xml);
                (uuid(vm), xml, disks)
            })
            .collect();
        let hb = Heartbeat {
            host: HOSTS[h].into(),
            echo: host.last_answer.map(|(epoch, stamp, at)| Echo { epoch, stamp, held_ms: self.now - at }),
            resources: Some((resources(host), "lockd".into())),
            watchdog: if host.armed {
                Watchdog::Armed { device: "/dev/watchdog".into(), timeout_ms: 1_000 }
            } else {
                Watchdog::Missing("no watchdog device (test)".into())
            },
            probes: vec![Probe { name: "storage".into(), ok: host.probes_ok, detail: String::new() }],
            domains: Some(domains),
            xml,
            xml_refused: Vec::new(),
            arrived: None,
            roster_known: Some(host.roster),
            self_fenced: false,
            seq: 0,
            probes_known: 0,
        };
        let epoch = self.epoch();
        match self.step(Input::Heartbeat(hb)) {
            Reply::Lease(r) => {
                let host = &mut self.hosts[h];
                host.last_answer = Some((epoch, r.answer.stamp(), self.now));
                host.roster = r.roster.version;
                host.next_heartbeat = self.now + r.next_in_ms;
            }
            // Not registered (removed, or a new leader): the agent registers again.
            _ => self.hosts[h].registered = None,
        }
    }

    /// `ms` of the cluster's life: recorded operations are told, hosts heartbeat, the leader
    /// ticks.
    fn pass(&mut self, ms: u64) {
        for id in std::mem::take(&mut self.recording) {
            self.step(Input::Recorded(id));
        }
        for _ in 0..ms / TICK_MS {
            self.now += TICK_MS;
            for h in 0..HOSTS.len() {
                let host = &self.hosts[h];
                if !host.up {
                    continue;
                }
                if host.registered != Some(self.epoch()) {
                    self.register(h);
                } else if self.now >= host.next_heartbeat {
                    self.heartbeat(h);
                }
            }
            self.step(Input::Tick);
        }
    }

    /// Carries out the `i`th command sent (modulo their number) on its host, and reports.
    fn finish(&mut self, i: usize, outcome: Outcome) {
        if self.sent.is_empty() {
            return;
        }
        let c = self.sent.remove(i % self.sent.len());
        let h = host_index(&c.host);
        let result = match (&c.kind, outcome) {
            // Its migration's result says how a cancel ended.
            (CommandKind::Cancel { .. }, _) => return,
            (_, Outcome::Failed) => Err(format!("{} failed on {} (test)", c.vm, c.host)),
            (_, Outcome::DiskLocked) => Err(format!(
                "internal error: process exited while connecting to monitor: Failed to get \"write\" lock \
                 on /srv/vms/{}.qcow2; Is another process using the image?",
                c.vm
            )),
            (CommandKind::Start { uuid, .. }, Outcome::Done) => {
                self.hosts[h].domains.insert(vm_index(uuid), RunState::Running);
                Ok(Done { elapsed_ms: 900, ..Done::default() })
            }
            (CommandKind::Migrate { uuid, dest_uri, .. }, Outcome::Done) => {
                let vm = vm_index(uuid);
                let to = HOSTS.iter().position(|t| dest_uri.contains(t)).expect("a test host's URI");
                self.hosts[h].domains.remove(&vm);
                self.hosts[to].domains.insert(vm, RunState::Running);
                Ok(Done { elapsed_ms: 4_000, downtime_ms: 40, bytes: 1 << 30 })
            }
            (CommandKind::Destroy { uuid } | CommandKind::Shutdown { uuid, .. }, Outcome::Done) => {
                self.hosts[h].domains.insert(vm_index(uuid), RunState::ShutOff);
                Ok(Done { elapsed_ms: 300, ..Done::default() })
            }
            // In place: the domain runs on where it ran.
            (CommandKind::Reset { .. }, Outcome::Done) => Ok(Done { elapsed_ms: 100, ..Done::default() }),
        };
        self.step(Input::Result { host: c.host, id: c.op, result });
    }

    async fn act(&mut self, act: &Act) {
        let host = |h: usize| HOSTS[h].to_string();
        match act.clone() {
            Act::Pass(ms) => self.pass(ms),
            Act::Silent(h) => self.hosts[h].up = false,
            Act::PowerOff(h) => {
                let host = &mut self.hosts[h];
                host.up = false;
                host.domains.values_mut().for_each(|d| *d = RunState::ShutOff);
            }
            Act::Back(h) => {
                let host = &mut self.hosts[h];
                (host.up, host.registered) = (true, None);
            }
            Act::Watchdog(h, armed) => self.hosts[h].armed = armed,
            Act::Probes(h, ok) => self.hosts[h].probes_ok = ok,
            Act::Memory(h, kib) => self.hosts[h].memory_kib = kib,
            Act::Redefine(vm) => self.generation[vm] += 1,
            Act::Protect { vm, priority, group, allowed, prefer, force } => {
                self.operator(Request::Protection {
                    vm: name(vm),
                    protected: true,
                    priority: Some(priority),
                    anti_affinity: group.map(|g| format!("group{g}")),
                    allowed_hosts: Some(allowed.into_iter().map(host).collect()),
                    preferred_host: prefer.map(host),
                    force,
                })
            }
            Act::Unprotect(vm) => self.operator(Request::Protection {
                vm: name(vm),
                protected: false,
                priority: None,
                anti_affinity: None,
                allowed_hosts: None,
                preferred_host: None,
                force: false,
            }),
            Act::Drain(h, allow_restart) => self.operator(Request::Drain { host: host(h), allow_restart }),
            Act::Undrain(h, abort) => self.operator(Request::Undrain { host: host(h), abort }),
            Act::Fencing(h, mode) => self.operator(Request::SetFencing { host: host(h), mode }),
            Act::MemoryLimit(h, limit_kib) => {
                self.operator(Request::SetMemoryLimit { host: host(h), limit_kib })
            }
            Act::ConfirmDown(h) => self.operator(Request::ConfirmDown { host: host(h) }),
            Act::FenceResult(h, ok) => {
                let result =
                    if ok { Ok("power is off (test)".into()) } else { Err("no answer (test)".into()) };
                self.step(Input::FenceResult { host: host(h), result });
            }
            Act::Remove(h) => self.operator(Request::RemoveHost { host: host(h) }),
            Act::Migrate(vm, to, overrides) => self.operator(Request::Migrate {
                vm: name(vm),
                to: host(to),
                overrides: overrides.then_some(Overrides { bandwidth_mib_s: 200, timeout_ms: 60_000 }),
            }),
            Act::Cancel(vm) => self.operator(Request::Cancel { op: None, vm: Some(name(vm)) }),
            Act::Stop(vm) => self.operator(Request::StopVm { vm: name(vm), timeout_ms: 30_000 }),
            Act::Start(vm, on) => self.operator(Request::StartVm { vm: name(vm), on: on.map(host) }),
            Act::Finish(i, outcome) => self.finish(i, outcome),
            Act::Restart => self.restart().await,
        }
    }

    /// Waits until the database has every write queued, each taken.
    async fn written(&mut self) {
        for w in self.written.drain(..) {
            w.await.expect("the database takes every write of the contract");
        }
    }

    /// What a new leader of `epoch` restores from each store, at its clock's start.
    async fn restored(&mut self, epoch: u64) -> [(Engine, Vec<Event>); 2] {
        self.written().await;
        let from_model = self.db.load(&self.engine.cluster, epoch, Millis(0));
        let (cluster, unfinished) =
            vmha_controller::controller::load(&self.store, timings(), policy(), epoch)
                .await
                .expect("load from the database");
        [from_model, Engine::restore(cluster, unfinished, Millis(0))]
    }

    /// The leader stops; the next one takes an epoch and restores from the database (the
    /// model's and PostgreSQL's restores being the same, checked after every action). The
    /// agents register with it; commands already sent still run, and their results come to it.
    async fn restart(&mut self) {
        let epoch = Store::open(&self.url).await.unwrap().next_epoch().await.unwrap();
        let [(engine, _), _] = self.restored(epoch).await;
        self.store = Store::open_for_epoch(&self.url, epoch).await.unwrap();
        self.journal = Journal::start(self.store.clone());
        self.engine = engine;
        self.origin = self.now;
        // Not recorded before the stop: never sent, and the new leader does not know of them.
        self.recording.clear();
    }
}

fn resources(host: &Host) -> HostResources {
    HostResources {
        cpus: 16,
        memory_total_kib: host.memory_kib,
        memory_free_kib: host.memory_kib / 2,
        cpu_model: "x86_64".into(),
    }
}

fn host_index(name: &str) -> usize {
    HOSTS.iter().position(|h| *h == name).expect("a test host")
}

fn vm_index(uuid_: &str) -> usize {
    (0..VMS).find(|&vm| uuid(vm) == uuid_).expect("a test VM")
}

/// Equal, or a failure that shows both sides and the lines of their pretty `Debug` that differ.
fn same<T: PartialEq + Debug>(what: &str, model: &T, database: &T) -> Result<(), TestCaseError> {
    if model == database {
        return Ok(());
    }
    let (m, d) = (format!("{model:#?}"), format!("{database:#?}"));
    let differing: Vec<String> = m
        .lines()
        .zip(d.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("  model:    {}\n  database: {}", a.trim(), b.trim()))
        .collect();
    Err(TestCaseError::fail(format!(
        "{what} restores differently from the model and from PostgreSQL; first differing lines:\n{}\n\
         model: {m}\ndatabase: {d}",
        differing.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
    )))
}

/// Compares what each restore hands the new leader. `ClusterState` has no `PartialEq`, so
/// its fields are compared one by one; none is left out. The engine's private books
/// (`cold_starts`, `next_seq`, the last persisted work) are rebuilt by `restore` from these.
fn compare(model: &(Engine, Vec<Event>), database: &(Engine, Vec<Event>)) -> Result<(), TestCaseError> {
    let ((m, m_events), (d, d_events)) = (model, database);
    let names = |c: &ClusterState| (c.hosts.keys().cloned().collect(), c.vms.keys().cloned().collect());
    same::<(Vec<String>, Vec<String>)>("the hosts and VMs", &names(&m.cluster), &names(&d.cluster))?;
    for (name, h) in &m.cluster.hosts {
        same(&format!("host {name}"), h, &d.cluster.hosts[name])?;
    }
    for (uuid, vm) in &m.cluster.vms {
        same(&format!("VM {uuid}"), vm, &d.cluster.vms[uuid])?;
    }
    same("the operations in flight", &m.ops, &d.ops)?;
    same("the disks' owners", &m.cluster.disk_owners, &d.cluster.disk_owners)?;
    same("the VMs by host", &m.cluster.near, &d.cluster.near)?;
    let (mc, dc) = (&m.cluster, &d.cluster);
    same("the timings", &mc.timings, &dc.timings)?;
    same("the policy", &mc.policy, &dc.policy)?;
    same("the epoch and start", &(mc.epoch, mc.started), &(dc.epoch, dc.started))?;
    same(
        "the caches",
        &(mc.quorum_since, mc.quorum_cache, mc.membership_cache),
        &(dc.quorum_since, dc.quorum_cache, dc.membership_cache),
    )?;
    // How long no leader watched before this one is read from the controllers' presence
    // (`Store::last_led_ms_ago`), which the model leaves out and the test never writes: 0 in
    // both, and compared so that it stays so.
    same("the unwatched time", &mc.unwatched_before_ms, &dc.unwatched_before_ms)?;
    same("the restore's events", m_events, d_events)
}

async fn run(url: String, acts: &[Act]) -> Result<(), TestCaseError> {
    let mut w = World::new(url).await;
    // Every host registers and reports, leases are acknowledged, the leader holds quorum.
    w.pass(3_000);
    for (i, act) in acts.iter().enumerate() {
        w.act(act).await;
        let epoch = w.epoch() + 1;
        let [model, database] = w.restored(epoch).await;
        compare(&model, &database)
            .map_err(|e| TestCaseError::fail(format!("after action {i} ({act:?}): {e}")))?;
    }
    Ok(())
}

/// 64 random runs by default; `VMHA_CONTRACT_CASES=N` for more (each needs its own database).
#[test]
fn the_model_and_postgresql_restore_the_same_leader() {
    let pg = PgServer::shared();
    let cases = std::env::var("VMHA_CONTRACT_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(64);
    let config = Config { cases, max_shrink_iters: 256, failure_persistence: None, ..Config::default() };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let result = TestRunner::new(config)
        .run(&prop::collection::vec(act(), 1..40), |acts| rt.block_on(run(pg.fresh_database(), &acts)));
    if let Err(e) = result {
        panic!("{e}");
    }
}
