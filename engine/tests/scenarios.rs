//! Scenario tests, in the style of pve-ha-manager's test folders: each folder under
//! `tests/scenarios/` holds a `README` (one line: what it shows), an `input` script and the
//! `expected` log. The runner plays every script against the engine's one entry point
//! (`Engine::step`) in a small simulated world, and compares what happened with `expected`.
//! `UPDATE_EXPECT=1 cargo test -p vmha-engine --test scenarios` rewrites the `expected` files.
//!
//! The world: hosts whose agents register, heartbeat on the schedule the controller gives them
//! (echoing its stamps, so they hold leases), run the agent's real lease state machine
//! (`selffence::LeaseKeeper`: peer polls, self-fence, watchdog feeds), report their domains and
//! carry out commands (a start takes 1 s, a live migration 2 s). Time advances in 100 ms
//! ticks; messages arrive at once. The script (`#` starts a comment):
//!
//! ```text
//! hosts kvm1 kvm2 kvm3          each: 4 CPUs, 4096 MiB for guests, a 3 s watchdog, self-fencing
//! host kvm3 fencing=external mem=2048 cpus=2 watchdog=none limit=1024
//! vm dns1 on kvm1 mem=512 vcpus=1 protect priority=10 group=dns hosts=kvm1,kvm2 prefer=kvm1
//! policy failback_after=5s migration_timeout=5s max_parallel_starts=1 ... accept_no_watchdog
//! storage lockd                 a running copy locks its disk (libvirt's lockd)
//! accept double-run             fencing is bypassed on purpose (an operator's false confirm-down)
//! expected hand-written         `expected` says what should happen where the engine has a bug:
//!                               UPDATE_EXPECT leaves it alone (drop the line once fixed)
//! at 10.5s ACTION               in time order, on the 100 ms grid
//! run 60s                       simulate until then
//! ```
//!
//! Actions (see `Action`): the world's `kill H`, `revive H`, `cut H`, `cut-controller H`,
//! `heal H`, `kill-agent H`, `restart-agent H`, `crash VM`, `start-by-hand VM H`, the faults
//! `fail-migrations H`, `fail-starts H`, `slow-migrations H` (20 s), `slow-starts H` (10 s),
//! `hang H`, `mute H` and `fix H` (clears them), `probe H ok|fail [NAME]`,
//! `fence-result H ok|fail`, `restart-controller`; the operator's `drain H [allow-restart]`,
//! `undrain H`, `migrate VM H`, `confirm-down H`, `remove-host H`, `protect VM [priority=N ...]`,
//! `unprotect VM`, `stop VM [timeout=60s]`, `start VM [on=H]`, `cancel VM` (its migration),
//! `undrain H abort`;
//! and `status`, which logs where everything is, as at the end.
//!
//! The log, one line each: the engine's events (`12.0s host kvm1 host_dead: MESSAGE`: subject
//! kind, subject, kind, message), the script's actions (`script ...`), refused operator
//! requests (`refused: ...`), what the world does on its own (`sim kvm1 self_fence: ...`,
//! `watchdog_reset`, `keeps_vms`, `DOUBLE_RUN`), then where everything ended up (`end ...`).
//! Every scenario also checks the safety invariant: no VM ever runs on two hosts at once (the
//! paused incoming side of a live migration aside).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::Instant;

use vmha_engine::availability::OutageMark;
use vmha_engine::cluster::HostResources;
use vmha_engine::drain::Probe;
use vmha_engine::event::Event;
use vmha_engine::inventory::ReportedDomain;
use vmha_engine::lease::{Echo, LeaseAnswer};
use vmha_engine::operation::{Done, OpId};
use vmha_engine::persist::Db;
use vmha_engine::selffence::{Decision, LeaseKeeper, PeerAnswer, Phase, Poll};
use vmha_engine::step::{Command, CommandKind, Heartbeat, LeaseReply, Registration};
use vmha_engine::{
    ClusterState, Engine, FencingMode, Input, Millis, Policy, Reply, Request, RunState, Timings, Watchdog,
    recovery,
};

const TICK_MS: u64 = 100;
/// Fits `Timings::default()` (at most 3.75 s), as the lab's watchdogs do.
const WATCHDOG_MS: u64 = 3_000;
const START_MS: u64 = 1_000;
const SLOW_START_MS: u64 = 10_000;
const MIGRATION_MS: u64 = 2_000;
const SLOW_MIGRATION_MS: u64 = 20_000;
const OPERATOR: &str = "admin";
/// When the operator sets the cluster up: agents register at 0 and report a tick later.
const SETUP_AT: u64 = TICK_MS;

// ---------------------------------------------------------------------------------------------
// The script

#[derive(Clone, Debug)]
struct HostSpec {
    name: String,
    cpus: u32,
    mem_mib: u64,
    fencing: FencingMode,
    watchdog: bool,
    limit_mib: Option<u64>,
}

#[derive(Clone, Debug)]
struct VmSpec {
    name: String,
    host: String,
    mem_mib: u64,
    vcpus: u32,
    /// The operator's `vmha protect` at the start, if any.
    protect: Option<Request>,
}

/// A fault of a host's agent or libvirt, on from its action until `fix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    FailMigrations,
    FailStarts,
    SlowMigrations,
    SlowStarts,
    /// Commands are lost before libvirt sees them (the agent died mid-command and came
    /// back at once): no effect, no result.
    Hang,
    /// Commands are carried out, but their results never reach the controller.
    Mute,
}

impl Fault {
    fn parse(s: &str) -> Option<Fault> {
        Some(match s {
            "fail-migrations" => Fault::FailMigrations,
            "fail-starts" => Fault::FailStarts,
            "slow-migrations" => Fault::SlowMigrations,
            "slow-starts" => Fault::SlowStarts,
            "hang" => Fault::Hang,
            "mute" => Fault::Mute,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug)]
enum Action {
    /// Power off: heartbeats stop, its VMs die.
    Kill(String),
    /// Power on: a fresh agent registers; its domains are defined but shut off.
    Revive(String),
    /// The host's whole network goes away (controller and peers); what runs there keeps running.
    Cut(String),
    /// Only its link to the controller goes away; its peers still reach it.
    CutController(String),
    Heal(String),
    /// The agent dies (`kill -9`); its VMs keep running, its watchdog is no longer fed.
    KillAgent(String),
    RestartAgent(String),
    /// The guest dies: the VM is shut off where it ran.
    Crash(String),
    /// An operator starts the VM on a host with `virsh start`, bypassing vmha.
    StartByHand {
        vm: String,
        host: String,
    },
    Fault(String, Fault),
    Fix(String),
    Probe {
        host: String,
        ok: bool,
        name: String,
    },
    /// The external fence command finished; `ok` also powers the host off.
    FenceResult {
        host: String,
        ok: bool,
    },
    RestartController,
    Operator(Request),
    /// Logs where everything is and why each VM that runs nowhere does not, as at the end.
    Status,
}

#[derive(Debug)]
struct Script {
    hosts: Vec<HostSpec>,
    vms: Vec<VmSpec>,
    policy: Policy,
    lockd: bool,
    accept_double_run: bool,
    hand_written: bool,
    /// Time, the line as written, the action; in the script's order.
    actions: Vec<(u64, String, Action)>,
    end: u64,
}

fn parse(text: &str) -> Result<Script, String> {
    let mut s = Script {
        hosts: Vec::new(),
        vms: Vec::new(),
        policy: Policy::default(),
        lockd: false,
        accept_double_run: false,
        hand_written: false,
        actions: Vec::new(),
        end: 0,
    };
    for (n, line) in text.lines().enumerate() {
        let words: Vec<&str> = line.split('#').next().unwrap_or("").split_whitespace().collect();
        if !words.is_empty() {
            parse_line(&mut s, &words).map_err(|e| format!("input line {}: {e}: {line}", n + 1))?;
        }
    }
    if s.end == 0 {
        return Err("no `run` line".into());
    }
    if let Some(vm) = s.vms.iter().find(|v| !s.hosts.iter().any(|h| h.name == v.host)) {
        return Err(format!("{} is on {}, which no `hosts` line names", vm.name, vm.host));
    }
    if !s.actions.is_sorted_by_key(|(t, ..)| *t) {
        return Err("the `at` lines are not in time order".into());
    }
    Ok(s)
}

fn parse_line(s: &mut Script, words: &[&str]) -> Result<(), String> {
    match words {
        ["hosts", names @ ..] => s.hosts.extend(names.iter().map(|n| HostSpec::new(n))),
        ["host", name, opts @ ..] => {
            let h = s.hosts.iter_mut().find(|h| h.name == *name).ok_or("unknown host")?;
            opts.iter().try_for_each(|o| h.set(o))?;
        }
        ["vm", name, "on", host, opts @ ..] => s.vms.push(VmSpec::parse(name, host, opts)?),
        ["policy", opts @ ..] => opts.iter().try_for_each(|o| set_policy(&mut s.policy, o))?,
        ["storage", "lockd"] => s.lockd = true,
        ["accept", "double-run"] => s.accept_double_run = true,
        ["expected", "hand-written"] => s.hand_written = true,
        ["at", t, action @ ..] => {
            let t = duration(t)?;
            if t % TICK_MS != 0 {
                return Err(format!("times are whole ticks of {TICK_MS} ms"));
            }
            s.actions.push((t, action.join(" "), parse_action(action)?));
        }
        ["run", t] => s.end = duration(t)?,
        _ => return Err("not a directive".into()),
    }
    Ok(())
}

fn parse_action(words: &[&str]) -> Result<Action, String> {
    let s = |w: &&str| w.to_string();
    if let [fault, h] = words
        && let Some(f) = Fault::parse(fault)
    {
        return Ok(Action::Fault(s(h), f));
    }
    Ok(match words {
        ["kill", h] => Action::Kill(s(h)),
        ["revive", h] => Action::Revive(s(h)),
        ["cut", h] => Action::Cut(s(h)),
        ["cut-controller", h] => Action::CutController(s(h)),
        ["heal", h] => Action::Heal(s(h)),
        ["kill-agent", h] => Action::KillAgent(s(h)),
        ["restart-agent", h] => Action::RestartAgent(s(h)),
        ["crash", vm] => Action::Crash(s(vm)),
        ["start-by-hand", vm, h] => Action::StartByHand { vm: s(vm), host: s(h) },
        ["fix", h] => Action::Fix(s(h)),
        ["probe", h, verdict @ ("ok" | "fail"), name @ ..] => Action::Probe {
            host: s(h),
            ok: *verdict == "ok",
            name: name.first().map_or("check:raid".into(), s),
        },
        ["fence-result", h, verdict @ ("ok" | "fail")] => {
            Action::FenceResult { host: s(h), ok: *verdict == "ok" }
        }
        ["restart-controller"] => Action::RestartController,
        ["status"] => Action::Status,
        ["drain", h, rest @ ..] => Action::Operator(Request::Drain {
            host: s(h),
            allow_restart: match rest {
                [] => false,
                ["allow-restart"] => true,
                _ => return Err("drain HOST [allow-restart]".into()),
            },
        }),
        ["undrain", h] => Action::Operator(Request::Undrain { host: s(h), abort: false }),
        ["undrain", h, "abort"] => Action::Operator(Request::Undrain { host: s(h), abort: true }),
        ["cancel", vm] => Action::Operator(Request::Cancel { op: None, vm: Some(s(vm)) }),
        ["migrate", vm, to] => Action::Operator(Request::Migrate { vm: s(vm), to: s(to), overrides: None }),
        ["confirm-down", h] => Action::Operator(Request::ConfirmDown { host: s(h) }),
        ["remove-host", h] => Action::Operator(Request::RemoveHost { host: s(h) }),
        ["stop", vm, rest @ ..] => Action::Operator(Request::StopVm {
            vm: s(vm),
            timeout_ms: match rest {
                [] => 60_000,
                [t] => duration(t.strip_prefix("timeout=").ok_or("stop VM [timeout=DURATION]")?)?,
                _ => return Err("stop VM [timeout=DURATION]".into()),
            },
        }),
        ["start", vm, rest @ ..] => Action::Operator(Request::StartVm {
            vm: s(vm),
            on: match rest {
                [] => None,
                [h] => Some(h.strip_prefix("on=").ok_or("start VM [on=HOST]")?.to_string()),
                _ => return Err("start VM [on=HOST]".into()),
            },
        }),
        ["protect", vm, opts @ ..] => Action::Operator(protection(vm, opts)?),
        ["unprotect", vm] => Action::Operator(Request::Protection {
            vm: s(vm),
            protected: false,
            priority: None,
            anti_affinity: None,
            allowed_hosts: None,
            preferred_host: None,
            force: false,
        }),
        _ => return Err("unknown action".into()),
    })
}

/// "10s", "2.5s", "500ms".
fn duration(t: &str) -> Result<u64, String> {
    let bad = || format!("'{t}' is not a duration like 10s, 2.5s or 500ms");
    let (num, unit) = match (t.strip_suffix("ms"), t.strip_suffix('s')) {
        (Some(n), _) => (n, 1.0),
        (None, Some(n)) => (n, 1_000.0),
        (None, None) => return Err(bad()),
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    Ok((v * unit).round() as u64)
}

/// "key=value" or a bare flag.
fn option(o: &str) -> (&str, &str) {
    o.split_once('=').unwrap_or((o, ""))
}

fn number<T: std::str::FromStr>(v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("'{v}' is not a number"))
}

fn fencing_mode(m: &str) -> Result<FencingMode, String> {
    FencingMode::parse(m).ok_or_else(|| format!("fencing is self, external or manual, not '{m}'"))
}

impl HostSpec {
    fn new(name: &str) -> HostSpec {
        HostSpec {
            name: name.into(),
            cpus: 4,
            mem_mib: 4096,
            fencing: FencingMode::SelfFence,
            watchdog: true,
            limit_mib: None,
        }
    }

    fn set(&mut self, o: &str) -> Result<(), String> {
        match option(o) {
            ("fencing", m) => self.fencing = fencing_mode(m)?,
            ("mem", v) => self.mem_mib = number(v)?,
            ("cpus", v) => self.cpus = number(v)?,
            ("limit", v) => self.limit_mib = Some(number(v)?),
            ("watchdog", "none") => self.watchdog = false,
            _ => return Err(format!("unknown host option '{o}'")),
        }
        Ok(())
    }

    fn migration_uri(&self) -> String {
        format!("qemu+tcp://{}/system", self.name)
    }
}

impl VmSpec {
    fn parse(name: &str, host: &str, opts: &[&str]) -> Result<VmSpec, String> {
        let mut vm = VmSpec { name: name.into(), host: host.into(), mem_mib: 512, vcpus: 1, protect: None };
        let (mut protect, mut protection_opts) = (false, Vec::new());
        for o in opts {
            match option(o) {
                ("mem", v) => vm.mem_mib = number(v)?,
                ("vcpus", v) => vm.vcpus = number(v)?,
                ("protect", "") => protect = true,
                _ => protection_opts.push(*o),
            }
        }
        if protect {
            vm.protect = Some(protection(name, &protection_opts)?);
        } else if !protection_opts.is_empty() {
            return Err(format!("{protection_opts:?} need `protect`"));
        }
        Ok(vm)
    }
}

/// `vmha protect VM [priority=N] [group=G] [hosts=A,B] [prefer=H] [force]`.
fn protection(vm: &str, opts: &[&str]) -> Result<Request, String> {
    let (mut priority, mut anti_affinity, mut allowed_hosts, mut preferred_host) = (None, None, None, None);
    let mut force = false;
    for o in opts {
        match option(o) {
            ("force", "") => force = true,
            ("priority", v) => priority = Some(number(v)?),
            ("group", g) => anti_affinity = Some(g.to_string()),
            ("hosts", l) => allowed_hosts = Some(l.split(',').map(str::to_string).collect()),
            ("prefer", h) => preferred_host = Some(h.to_string()),
            _ => return Err(format!("unknown protection option '{o}'")),
        }
    }
    Ok(Request::Protection {
        vm: vm.into(),
        protected: true,
        priority,
        anti_affinity,
        allowed_hosts,
        preferred_host,
        force,
    })
}

fn set_policy(p: &mut Policy, o: &str) -> Result<(), String> {
    match option(o) {
        ("failback_after", v) => p.failback_after_ms = Some(duration(v)?),
        ("migration_timeout", v) => p.migration_timeout_ms = duration(v)?,
        ("degraded_after", v) => p.degraded_after_ms = duration(v)?,
        ("recover_after", v) => p.recover_after_ms = duration(v)?,
        ("max_relocate", v) => p.max_relocate = number(v)?,
        ("max_parallel_starts", v) => p.max_parallel_starts = number(v)?,
        ("reserve_hosts", v) => p.reserve_hosts = number(v)?,
        ("migrations_per_host", v) => p.migrations_per_host = number(v)?,
        ("migrations_per_cluster", v) => p.migrations_per_cluster = number(v)?,
        ("vcpu_overcommit", v) => p.vcpu_overcommit = number(v)?,
        ("accept_no_watchdog", "") => p.accept_no_watchdog = true,
        _ => return Err(format!("unknown policy option '{o}'")),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The world

/// A domain as libvirt on one host has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dom {
    Running,
    /// The paused incoming side of a live migration.
    Incoming,
    ShutOff,
}

#[derive(Clone, Debug)]
enum Work {
    Start { uuid: String },
    Migrate { uuid: String, to: String },
}

/// A command libvirt is carrying out, and the session its result goes back on.
#[derive(Clone, Debug)]
struct Job {
    op: OpId,
    session: u64,
    started: u64,
    done_at: u64,
    work: Work,
    /// Its agent asked libvirt to abort it (an operator's cancel).
    aborted: bool,
}

struct Host {
    spec: HostSpec,
    powered: bool,
    agent_up: bool,
    link_controller: bool,
    link_network: bool,
    keeper: LeaseKeeper,
    /// Registered with the current controller in this session; a lost heartbeat or a new
    /// controller ends it, and the agent registers again.
    session: Option<u64>,
    /// The newest answer: its epoch, stamp and arrival, echoed by the next heartbeat.
    last_answer: Option<(u64, Millis, u64)>,
    next_heartbeat: u64,
    /// What the controller last said is protected: what a self-fence destroys.
    protected: BTreeSet<String>,
    /// By UUID.
    domains: BTreeMap<String, Dom>,
    jobs: Vec<Job>,
    faults: BTreeSet<Fault>,
    probes: Vec<Probe>,
    /// When the watchdog resets the host unless fed; `None` until the agent first feeds it.
    watchdog_deadline: Option<u64>,
}

#[derive(Clone, Debug)]
struct Vm {
    name: String,
    mem_mib: u64,
    vcpus: u32,
}

/// What the engine's step left to do: inputs to feed it, commands for the agents.
enum Followup {
    Input(Input),
    Command(Command),
}

struct World {
    now: u64,
    engine: Engine,
    db: Db,
    /// The outage history as the store keeps it: the open outage of each VM (UUID), when it
    /// began and whether it was planned.
    outages: BTreeMap<String, (u64, bool)>,
    hosts: BTreeMap<String, Host>,
    /// By UUID.
    vms: BTreeMap<String, Vm>,
    queue: VecDeque<Followup>,
    sessions: u64,
    lockd: bool,
    log: Vec<String>,
    double_runs: usize,
}

fn uuid_of(i: usize) -> String {
    format!("00000000-0000-0000-0000-{:012}", i + 1)
}

fn secs(ms: u64) -> String {
    format!("{:>7}", format!("{}.{}s", ms / 1000, ms % 1000 / 100))
}

impl World {
    fn new(script: &Script) -> World {
        let cluster = ClusterState {
            timings: Timings::default(),
            policy: script.policy,
            epoch: 1,
            ..Default::default()
        };
        let mut hosts: BTreeMap<String, Host> =
            script.hosts.iter().map(|spec| (spec.name.clone(), Host::new(spec.clone()))).collect();
        let mut vms = BTreeMap::new();
        for (i, v) in script.vms.iter().enumerate() {
            let host = hosts.get_mut(&v.host).expect("checked by parse");
            host.domains.insert(uuid_of(i), Dom::Running);
            vms.insert(uuid_of(i), Vm { name: v.name.clone(), mem_mib: v.mem_mib, vcpus: v.vcpus });
        }
        World {
            now: 0,
            engine: Engine::new(cluster),
            db: Db::default(),
            outages: BTreeMap::new(),
            hosts,
            vms,
            queue: VecDeque::new(),
            sessions: 0,
            lockd: script.lockd,
            log: Vec::new(),
            double_runs: 0,
        }
    }

    fn line(&mut self, text: String) {
        self.log.push(format!("{} {text}", secs(self.now)));
    }

    /// The engine's events: subject kind, subject, kind and message (the actor is left out:
    /// the subject and the message say enough).
    fn events(&mut self, events: &[Event]) {
        for e in events {
            let (kind, subject) = (e.subject.kind(), e.subject.name());
            self.line(format!("{kind} {subject} {}: {}", e.kind.as_str(), e.message));
        }
    }

    /// The outage marks, kept as the store keeps them; a line for each outage that begins or
    /// ends (an end with none open is nothing).
    fn outages(&mut self, marks: &[OutageMark]) {
        for m in marks {
            let text = match m {
                OutageMark::Began { vm_uuid, vm_name, ago_ms, planned, cause } => {
                    if self.outages.contains_key(vm_uuid) {
                        continue;
                    }
                    self.outages.insert(vm_uuid.clone(), (self.now.saturating_sub(*ago_ms), *planned));
                    let how = if *planned { "planned" } else { "unplanned" };
                    format!("outage {vm_name} began {} ago, {how}: {cause}", secs(*ago_ms).trim())
                }
                OutageMark::Ended { vm_uuid } => {
                    let Some((began, _)) = self.outages.remove(vm_uuid) else { continue };
                    let name = self.vms.get(vm_uuid).map_or(vm_uuid.as_str(), |v| v.name.as_str());
                    format!("outage {name} ended after {}", secs(self.now - began).trim())
                }
                OutageMark::Pause { vm_name, ms, cause, .. } => {
                    format!("outage {vm_name} paused {ms} ms, planned: {cause}")
                }
            };
            self.line(text);
        }
    }

    /// One step of the engine; its log goes to ours, its follow-ups to the queue.
    fn step(&mut self, input: Input) -> Reply {
        let out = self.engine.step(input, Millis(self.now));
        self.engine.cluster.check_near().expect("the index of VMs by host is complete");
        self.engine.check_persisted().expect("every change is persisted");
        self.db.apply(&self.engine, &out.persist);
        self.events(&out.events);
        self.outages(&out.outages);
        // The database is always there: a recorded operation's command goes out at once.
        self.queue.extend(out.record.into_iter().map(|id| Followup::Input(Input::Recorded(id))));
        self.queue.extend(out.commands.into_iter().map(Followup::Command));
        out.reply
    }

    /// Feeds the engine what its last steps left to do, until nothing is left.
    fn settle(&mut self) {
        while let Some(f) = self.queue.pop_front() {
            match f {
                Followup::Input(i) => {
                    self.step(i);
                }
                Followup::Command(c) => self.command(c),
            }
        }
    }

    fn operator(&mut self, request: Request) {
        if let Reply::Refused(r) = self.step(Input::Operator { actor: OPERATOR.into(), request }) {
            self.line(format!("refused: {r}"));
        }
        self.settle();
    }

    /// The operator's setup: fencing modes, memory limits, protections.
    fn configure(&mut self, script: &Script) {
        for h in &script.hosts {
            if h.fencing != FencingMode::SelfFence {
                self.operator(Request::SetFencing { host: h.name.clone(), mode: h.fencing.clone() });
            }
            if let Some(l) = h.limit_mib {
                self.operator(Request::SetMemoryLimit { host: h.name.clone(), limit_kib: Some(l << 10) });
            }
        }
        for p in script.vms.iter().filter_map(|v| v.protect.clone()) {
            self.operator(p);
        }
    }

    fn run(&mut self, script: &Script) {
        let names: Vec<String> = self.hosts.keys().cloned().collect();
        let mut actions = script.actions.iter().peekable();
        for now in (0..=script.end).step_by(TICK_MS as usize) {
            self.now = now;
            for h in &names {
                self.agent_step(h);
            }
            if self.now == SETUP_AT {
                self.configure(script);
            }
            while let Some((_, text, a)) = actions.next_if(|(t, ..)| *t <= self.now) {
                self.line(format!("script {text}"));
                self.act(a.clone());
            }
            self.step(Input::Tick);
            self.settle();
        }
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::Kill(h) => self.power_off(&h),
            Action::Revive(h) => {
                self.host(&h).powered = true;
                self.start_agent(&h);
            }
            Action::Cut(h) => self.host(&h).link_network = false,
            Action::CutController(h) => self.host(&h).link_controller = false,
            Action::Heal(h) => {
                let host = self.host(&h);
                (host.link_network, host.link_controller) = (true, true);
            }
            Action::KillAgent(h) => {
                let host = self.host(&h);
                (host.agent_up, host.session) = (false, None);
            }
            Action::RestartAgent(h) => self.start_agent(&h),
            Action::Crash(vm) => {
                let uuid = self.uuid(&vm);
                for host in self.hosts.values_mut() {
                    if let Some(d) = host.domains.get_mut(&uuid).filter(|d| **d == Dom::Running) {
                        *d = Dom::ShutOff;
                    }
                }
            }
            Action::StartByHand { vm, host } => {
                let uuid = self.uuid(&vm);
                self.run_copy(&host, &uuid);
            }
            Action::Fault(h, f) => {
                self.host(&h).faults.insert(f);
            }
            Action::Fix(h) => self.host(&h).faults.clear(),
            Action::Probe { host, ok, name } => {
                let detail = if ok { "exit 0".into() } else { "exit 1: failing (sim)".into() };
                self.host(&host).probes = vec![Probe { name, ok, detail }];
            }
            Action::FenceResult { host, ok } => {
                let result = if ok {
                    self.power_off(&host);
                    Ok("power is off (sim)".into())
                } else {
                    Err("ipmitool: no answer from the BMC (sim)".into())
                };
                self.step(Input::FenceResult { host, result });
                self.settle();
            }
            Action::RestartController => self.restart_controller(),
            Action::Operator(r) => self.operator(r),
            Action::Status => self.status("status"),
        }
    }

    fn host(&mut self, name: &str) -> &mut Host {
        self.hosts.get_mut(name).unwrap_or_else(|| panic!("unknown host {name}"))
    }

    fn uuid(&self, vm: &str) -> String {
        self.vms
            .iter()
            .find(|(_, v)| v.name == vm)
            .map(|(u, _)| u.clone())
            .unwrap_or_else(|| panic!("unknown VM {vm}"))
    }

    /// A new controller from what its predecessor persisted; every agent's stream to the old
    /// one broke, so each registers again, and results still on their way are lost.
    fn restart_controller(&mut self) {
        let epoch = self.engine.cluster.epoch + 1;
        let (engine, events) = self.db.load(&self.engine.cluster, epoch, Millis(self.now));
        self.engine = engine;
        self.events(&events);
        for h in self.hosts.values_mut() {
            h.session = None;
        }
    }

    fn power_off(&mut self, name: &str) {
        let host = self.host(name);
        host.powered = false;
        host.agent_up = false;
        host.session = None;
        host.watchdog_deadline = None;
        host.domains.retain(|_, d| *d != Dom::Incoming);
        host.domains.values_mut().for_each(|d| *d = Dom::ShutOff);
        // Incoming sides of its outgoing migrations lose their source.
        for job in std::mem::take(&mut host.jobs) {
            if let Work::Migrate { uuid, to } = job.work {
                self.host(&to).domains.remove(&uuid);
            }
        }
        // Migrations to it abort at once: libvirt sees the connection go.
        let now = self.now;
        for job in self.hosts.values_mut().flat_map(|h| h.jobs.iter_mut()) {
            if matches!(&job.work, Work::Migrate { to, .. } if to == name) {
                job.done_at = now;
            }
        }
    }

    fn start_agent(&mut self, name: &str) {
        let now = self.now;
        let host = self.host(name);
        if host.powered {
            host.agent_up = true;
            host.keeper = LeaseKeeper::new(name, Timings::default(), Millis(now), now);
            host.session = None;
            host.next_heartbeat = now;
        }
    }

    fn reaches_controller(&self, name: &str) -> bool {
        let h = &self.hosts[name];
        h.powered && h.agent_up && h.link_controller && h.link_network
    }

    /// The session a command to `name` would go over, if its agent is connected.
    fn connected(&self, name: &str) -> Option<u64> {
        self.hosts[name].session.filter(|_| self.reaches_controller(name))
    }

    // -- the agents

    fn agent_step(&mut self, name: &str) {
        let now = self.now;
        if !self.hosts[name].powered {
            return;
        }
        self.finish_jobs(name);
        if self.hosts[name].watchdog_deadline.is_some_and(|d| now > d) {
            self.line(format!(
                "sim {name} watchdog_reset: its watchdog was not fed in time; the host is reset"
            ));
            self.power_off(name);
            return;
        }
        if !self.hosts[name].agent_up {
            return;
        }
        let decision = self.host(name).keeper.tick(Millis(now));
        self.decide(name, decision);
        let host = self.host(name);
        if host.spec.watchdog && host.keeper.may_feed(Millis(now), WATCHDOG_MS) {
            host.watchdog_deadline = Some(now + WATCHDOG_MS);
        }
        if now >= self.hosts[name].next_heartbeat {
            self.heartbeat(name);
        }
    }

    fn decide(&mut self, name: &str, decision: Decision) {
        match decision {
            Decision::Nothing => {}
            Decision::PollPeers { ask } => {
                let answers = self.poll_peers(name, &ask);
                let now = Millis(self.now);
                self.host(name).keeper.polled(Poll { started: now, answers });
            }
            Decision::Keep { reason } => self.line(format!("sim {name} keeps_vms: no lease, but {reason}")),
            Decision::Fence { reason } => {
                let destroyed = self.self_fence(name);
                self.host(name).keeper.fence_completed();
                self.line(format!("sim {name} self_fence: {reason}; destroyed: {destroyed}"));
            }
        }
    }

    /// Every peer agent asked that the host reaches answers at once.
    fn poll_peers(&self, name: &str, ask: &[String]) -> Vec<PeerAnswer> {
        let now = Millis(self.now);
        self.hosts
            .iter()
            .filter(|(p, h)| ask.contains(p) && h.agent_up && self.peers_reach(name, p))
            .map(|(p, h)| PeerAnswer {
                host: p.clone(),
                upper_remaining_ms: h.keeper.upper_remaining_ms(now),
                received_at: now,
                epoch: h.keeper.newest_epoch(),
                fact: h.keeper.fact(now),
            })
            .collect()
    }

    /// Destroys the protected VMs the agent knows of; says which.
    fn self_fence(&mut self, name: &str) -> String {
        let host = self.host(name);
        let victims: Vec<String> = host
            .domains
            .iter()
            .filter(|(u, d)| **d != Dom::ShutOff && host.protected.contains(*u))
            .map(|(u, _)| u.clone())
            .collect();
        for u in &victims {
            host.domains.insert(u.clone(), Dom::ShutOff);
        }
        let names: Vec<&str> = victims.iter().map(|u| self.vms[u].name.as_str()).collect();
        if names.is_empty() { "nothing".into() } else { names.join(", ") }
    }

    fn heartbeat(&mut self, name: &str) {
        let interval = Timings::default().heartbeat_interval_ms;
        self.host(name).next_heartbeat = self.now + interval;
        if !self.reaches_controller(name) {
            self.host(name).session = None;
            return;
        }
        if self.hosts[name].session.is_none() {
            // The first heartbeat follows a tick later: were it answered in the same
            // millisecond as the registration, both answers would carry the same stamp.
            self.register(name);
            self.host(name).next_heartbeat = self.now + TICK_MS;
            return;
        }
        let report = self.report(name);
        let reply = self.step(Input::Heartbeat(report));
        match reply {
            Reply::Lease(r) => self.answered(name, r),
            _ => self.host(name).session = None,
        }
        self.settle();
    }

    fn register(&mut self, name: &str) {
        let spec = &self.hosts[name].spec;
        let r = Registration {
            host: name.into(),
            migration_uri: spec.migration_uri(),
            peer_address: format!("{name}:7070"),
            resources: self.resources(name),
            libvirt_version: "9.0.0".into(),
            lock_manager: self.lock_manager().into(),
            describe: "vmha-agent (sim), libvirt 9.0.0".into(),
        };
        if let Reply::Registered { stamp } = self.step(Input::Register(r)) {
            let (epoch, now) = (self.engine.cluster.epoch, self.now);
            self.sessions += 1;
            let session = self.sessions;
            let host = self.host(name);
            host.last_answer = Some((epoch, stamp, now));
            host.session = Some(session);
        }
        self.settle();
    }

    fn answered(&mut self, name: &str, r: LeaseReply) {
        let (epoch, now) = (self.engine.cluster.epoch, self.now);
        let host = self.host(name);
        host.last_answer = Some((epoch, r.answer.stamp(), now));
        host.keeper.set_peers(r.roster.peers.iter().map(|(p, _)| p.clone()).filter(|p| p != name));
        match r.answer {
            // Sent and answered at the same instant: the lease runs from now.
            LeaseAnswer::Granted { ttl_ms, .. } => host
                .keeper
                .granted(Millis(now), ttl_ms, r.cluster_hosts as usize, epoch)
                .expect("scenario agents hear only the current leader"),
            LeaseAnswer::Refused { .. } => host.keeper.set_cluster_hosts(r.cluster_hosts as usize),
        }
        host.protected = r.roster.protected.iter().cloned().collect();
        host.next_heartbeat = now + r.next_in_ms;
    }

    fn lock_manager(&self) -> &'static str {
        if self.lockd { "lockd" } else { "none" }
    }

    fn resources(&self, name: &str) -> HostResources {
        let h = &self.hosts[name];
        let used: u64 =
            h.domains.iter().filter(|(_, d)| **d != Dom::ShutOff).map(|(u, _)| self.vms[u].mem_mib).sum();
        HostResources {
            cpus: h.spec.cpus,
            memory_total_kib: h.spec.mem_mib << 10,
            memory_free_kib: h.spec.mem_mib.saturating_sub(used) << 10,
            cpu_model: "x86".into(),
        }
    }

    fn report(&self, name: &str) -> Heartbeat {
        let h = &self.hosts[name];
        let domains: Vec<ReportedDomain> = h
            .domains
            .iter()
            .map(|(uuid, d)| {
                let vm = &self.vms[uuid];
                ReportedDomain {
                    uuid: uuid.clone(),
                    name: vm.name.clone(),
                    state: match d {
                        Dom::Running => RunState::Running,
                        Dom::Incoming => RunState::Paused,
                        Dom::ShutOff => RunState::ShutOff,
                    },
                    memory_kib: vm.mem_mib << 10,
                    vcpus: vm.vcpus,
                }
            })
            .collect();
        let xml = domains
            .iter()
            .map(|d| {
                let xml = format!("<domain><name>{}</name></domain>", d.name);
                (d.uuid.clone(), xml, vec![format!("/srv/vms/{}.qcow2", d.name)])
            })
            .collect();
        Heartbeat {
            host: name.into(),
            echo: h.last_answer.map(|(epoch, stamp, at)| Echo { epoch, stamp, held_ms: self.now - at }),
            resources: Some((self.resources(name), self.lock_manager().into())),
            watchdog: if h.spec.watchdog {
                Watchdog::Armed { device: "/dev/watchdog".into(), timeout_ms: WATCHDOG_MS }
            } else {
                Watchdog::Missing("no watchdog device (sim)".into())
            },
            probes: h.probes.clone(),
            domains: Some(domains),
            xml,
            xml_refused: Vec::new(),
            roster_known: None,
            arrived: None,
            self_fenced: matches!(h.keeper.phase(), Phase::Fenced { .. }),
            seq: 0,
        }
    }

    // -- commands

    /// An agent takes a command: a start or a live migration runs for a while (see
    /// `finish_jobs`), a destroy is done at once.
    fn command(&mut self, c: Command) {
        let Some(session) = self.connected(&c.host) else {
            let result = Err(format!("could not send it: the agent on {} is not connected", c.host));
            self.queue.push_back(Followup::Input(Input::Result { host: c.host, id: c.op, result }));
            return;
        };
        let faults = self.hosts[&c.host].faults.clone();
        if faults.contains(&Fault::Hang) {
            return;
        }
        let now = self.now;
        let ends_in = |slow: Fault, slow_ms, ms| now + if faults.contains(&slow) { slow_ms } else { ms };
        let job = |work, done_at| Job { op: c.op, session, started: now, done_at, work, aborted: false };
        match c.kind {
            CommandKind::Start { uuid, .. } => {
                let job = job(Work::Start { uuid }, ends_in(Fault::SlowStarts, SLOW_START_MS, START_MS));
                self.host(&c.host).jobs.push(job);
            }
            CommandKind::Migrate { uuid, dest_uri, .. } => match self.incoming(&c.host, &uuid, &dest_uri) {
                Ok(to) => {
                    let done_at = ends_in(Fault::SlowMigrations, SLOW_MIGRATION_MS, MIGRATION_MS);
                    self.host(&c.host).jobs.push(job(Work::Migrate { uuid, to }, done_at));
                }
                Err(e) => self.answer(&c.host, c.op, session, Err(e)),
            },
            // libvirt aborts the job at once: the migration fails, the guest stays.
            CommandKind::Cancel { .. } => {
                if let Some(j) = self.host(&c.host).jobs.iter_mut().find(|j| j.op == c.op) {
                    (j.aborted, j.done_at) = (true, now);
                }
            }
            // The sim's guests shut down cleanly, at once.
            CommandKind::Destroy { uuid } | CommandKind::Shutdown { uuid, .. } => {
                if let Some(d) = self.host(&c.host).domains.get_mut(&uuid) {
                    *d = Dom::ShutOff;
                }
                self.answer(&c.host, c.op, session, Ok(Done::default()));
            }
        }
    }

    /// The target of a live migration from `source` takes the VM's paused incoming side, if the
    /// migration can begin; its start hook wants a lease, as for a start.
    fn incoming(&mut self, source: &str, uuid: &str, dest_uri: &str) -> Result<String, String> {
        let to = self
            .hosts
            .values()
            .find(|h| h.spec.migration_uri() == dest_uri)
            .map(|h| h.spec.name.clone())
            .ok_or_else(|| format!("no host answers at {dest_uri}"))?;
        if self.hosts[source].domains.get(uuid) != Some(&Dom::Running) {
            return Err("Requested operation is not valid: domain is not running".into());
        }
        if !self.peers_reach(source, &to) {
            return Err(format!("unable to connect to server at '{to}:16509': No route to host"));
        }
        let now = Millis(self.now);
        self.hosts[&to]
            .keeper
            .may_start(now)
            .map_err(|e| format!("refused by the lease hook on {to}: {e}"))?;
        self.host(&to).domains.insert(uuid.into(), Dom::Incoming);
        Ok(to)
    }

    /// Libvirt's part of the network between two hosts (the agents' peer polls use it too).
    fn peers_reach(&self, a: &str, b: &str) -> bool {
        let (a, b) = (&self.hosts[a], &self.hosts[b]);
        a.powered && b.powered && a.link_network && b.link_network
    }

    /// The agent sends a command's result back over the session the command came on.
    fn answer(&mut self, name: &str, op: OpId, session: u64, result: Result<Done, String>) {
        if self.connected(name) == Some(session) && !self.hosts[name].faults.contains(&Fault::Mute) {
            self.queue.push_back(Followup::Input(Input::Result { host: name.into(), id: op, result }));
        }
    }

    /// Commands whose time has come end, whether or not the agent that took them still runs
    /// (libvirt carries them out; only the result needs the agent).
    fn finish_jobs(&mut self, name: &str) {
        let now = self.now;
        let host = self.host(name);
        let (due, rest): (Vec<Job>, Vec<Job>) =
            std::mem::take(&mut host.jobs).into_iter().partition(|j| j.done_at <= now);
        host.jobs = rest;
        for job in due {
            let result = match &job.work {
                Work::Start { uuid } => self.finish_start(name, uuid),
                Work::Migrate { uuid, to } if job.aborted => {
                    self.host(to).domains.remove(uuid);
                    Err("operation aborted: migration out job: canceled by client".into())
                }
                Work::Migrate { uuid, to } => self.finish_migration(name, uuid, to, now - job.started),
            };
            self.answer(name, job.op, job.session, result);
        }
        self.settle();
    }

    fn finish_start(&mut self, name: &str, uuid: &str) -> Result<Done, String> {
        let host = &self.hosts[name];
        host.keeper.may_start(Millis(self.now)).map_err(|e| format!("refused by the lease hook: {e}"))?;
        if host.faults.contains(&Fault::FailStarts) {
            return Err("internal error: qemu unexpectedly closed the monitor (sim)".into());
        }
        let locked = self
            .hosts
            .iter()
            .any(|(n, h)| n != name && h.domains.get(uuid).is_some_and(|d| *d != Dom::ShutOff));
        if self.lockd && locked {
            return Err(format!(
                "internal error: Failed to get \"write\" lock: Is another process using the image \
                 [/san/images/{}.qcow2]?",
                self.vms[uuid].name
            ));
        }
        self.run_copy(name, uuid);
        Ok(Done::default())
    }

    fn finish_migration(
        &mut self,
        source: &str,
        uuid: &str,
        to: &str,
        elapsed_ms: u64,
    ) -> Result<Done, String> {
        let failed = if self.hosts[source].faults.contains(&Fault::FailMigrations) {
            Some("operation failed: migration out job: unexpectedly failed (sim)".to_string())
        } else if self.hosts[to].domains.get(uuid) != Some(&Dom::Incoming) {
            Some(format!("{to} went away during the migration"))
        } else if self.hosts[source].domains.get(uuid) != Some(&Dom::Running) {
            Some("domain is not running".into())
        } else if !self.peers_reach(source, to) {
            Some(format!("connection to {to} lost during the migration"))
        } else {
            None
        };
        if let Some(e) = failed {
            let target = self.host(to);
            if target.domains.get(uuid) == Some(&Dom::Incoming) {
                target.domains.remove(uuid);
            }
            return Err(e);
        }
        // libvirt's peer-to-peer migration undefines the source's copy.
        self.host(source).domains.remove(uuid);
        self.run_copy(to, uuid);
        Ok(Done { elapsed_ms, downtime_ms: 30, bytes: self.vms[uuid].mem_mib << 20 })
    }

    /// `uuid` starts running on `name`: the one place the safety invariant is checked.
    fn run_copy(&mut self, name: &str, uuid: &str) {
        let others: Vec<&str> = self
            .hosts
            .iter()
            .filter(|(n, h)| *n != name && h.domains.get(uuid) == Some(&Dom::Running))
            .map(|(n, _)| n.as_str())
            .collect();
        if !others.is_empty() {
            let line = format!(
                "sim {} DOUBLE_RUN: starts on {name} while it runs on {}",
                self.vms[uuid].name,
                others.join(", ")
            );
            self.double_runs += 1;
            self.line(line);
        }
        self.host(name).domains.insert(uuid.into(), Dom::Running);
    }

    /// Where everything is: each host as the world and the controller see it, and why each VM
    /// that runs nowhere does not.
    fn status(&mut self, label: &str) {
        let now = Millis(self.now);
        let mut lines = Vec::new();
        for (name, h) in &self.hosts {
            let world = match (h.powered, h.agent_up, h.link_network && h.link_controller) {
                (false, ..) => "off",
                (true, false, _) => "agent down",
                (true, true, false) => "cut",
                (true, true, true) => "up",
            };
            let s = &self.engine.cluster;
            let seen = s.hosts.get(name).map_or("unknown".into(), |v| {
                format!("{}, {}", s.liveness(name, now).as_str(), v.admin.as_str())
            });
            let mut running: Vec<&str> = h
                .domains
                .iter()
                .filter(|(_, d)| **d == Dom::Running)
                .map(|(u, _)| self.vms[u].name.as_str())
                .collect();
            running.sort();
            let running = if running.is_empty() { "-".into() } else { running.join(" ") };
            lines.push(format!("{label} {name}: {world}; controller: {seen}; runs: {running}"));
        }
        for (uuid, vm) in &self.vms {
            if self.hosts.values().any(|h| h.domains.get(uuid) == Some(&Dom::Running)) {
                continue;
            }
            let why = match recovery::explain(&self.engine.cluster, uuid, now) {
                Some(why) => why,
                None if self.engine.cluster.vms.contains_key(uuid) => "the controller thinks it runs".into(),
                None => "unknown to the controller".into(),
            };
            lines.push(format!("{label} {}: not running: {why}", vm.name));
        }
        for l in lines {
            self.line(l);
        }
    }
}

impl Host {
    fn new(spec: HostSpec) -> Host {
        let seed = spec.name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        let keeper = LeaseKeeper::new(&spec.name, Timings::default(), Millis(0), seed);
        Host {
            keeper,
            spec,
            powered: true,
            agent_up: true,
            link_controller: true,
            link_network: true,
            session: None,
            last_answer: None,
            next_heartbeat: 0,
            protected: BTreeSet::new(),
            domains: BTreeMap::new(),
            jobs: Vec::new(),
            faults: BTreeSet::new(),
            probes: Vec::new(),
            watchdog_deadline: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The runner

/// What playing a script gave.
struct Outcome {
    log: String,
    double_runs: usize,
}

fn play(script: &Script) -> Outcome {
    let mut w = World::new(script);
    w.run(script);
    w.status("end");
    Outcome { log: w.log.join("\n") + "\n", double_runs: w.double_runs }
}

/// Runs one scenario folder; `Err` says why it failed.
fn check(dir: &Path, update: bool) -> Result<(), String> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).map_err(|e| format!("{f}: {e}"));
    let readme = read("README")?;
    if readme.trim().is_empty() || readme.trim().lines().count() != 1 {
        return Err("README must be one line saying what the scenario shows".into());
    }
    let script = parse(&read("input")?)?;
    let outcome = catch_unwind(AssertUnwindSafe(|| play(&script))).map_err(|p| {
        let why =
            p.downcast_ref::<String>().map(String::as_str).or_else(|| p.downcast_ref::<&str>().copied());
        format!("panicked: {}", why.unwrap_or("?"))
    })?;
    if update && !script.hand_written {
        std::fs::write(dir.join("expected"), &outcome.log).map_err(|e| format!("expected: {e}"))?;
    } else {
        let expected = read("expected").unwrap_or_default();
        if expected != outcome.log {
            return Err(format!(
                "the log differs from `expected` (- expected, + actual):\n{}",
                diff(&expected, &outcome.log)
            ));
        }
    }
    if outcome.double_runs > 0 && !script.accept_double_run {
        return Err(format!(
            "SAFETY: a VM ran on two hosts at once {} time(s) (see DOUBLE_RUN)",
            outcome.double_runs
        ));
    }
    Ok(())
}

/// The lines only one side has, by a longest common subsequence; each carries its time, which
/// says where it belongs.
fn diff(expected: &str, actual: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            (i, j) = (i + 1, j + 1);
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out += &format!("-{}\n", a[i]);
            i += 1;
        } else {
            out += &format!("+{}\n", b[j]);
            j += 1;
        }
    }
    out
}

#[test]
fn scenarios() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("tests/scenarios")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let started = Instant::now();
    let failures: Vec<String> = dirs
        .iter()
        .filter_map(|d| {
            check(d, update)
                .err()
                .map(|e| format!("--- {}: {e}", d.file_name().unwrap_or_default().to_string_lossy()))
        })
        .collect();
    eprintln!("{} scenarios in {:.2} s", dirs.len(), started.elapsed().as_secs_f64());
    assert!(
        failures.is_empty(),
        "{} of {} scenarios failed:\n\n{}",
        failures.len(),
        dirs.len(),
        failures.join("\n")
    );
}
