//! Scenario tests, in the style of pve-ha-manager's test folders: each folder under
//! `tests/scenarios/` holds a `README` (one line: what it shows), an `input` script and the
//! `expected` log. The runner plays every script against the engine's one entry point
//! (`Engine::step`) in the simulated world of `tests/sim/` (the one the safety run uses too),
//! and compares what happened with `expected`.
//! `UPDATE_EXPECT=1 cargo test -p vmha-engine --test scenarios` rewrites the `expected` files.
//!
//! The world: hosts whose agents register, heartbeat on the schedule the controller gives them
//! (echoing its stamps, so they hold leases), run the agent's real lease state machine
//! (`selffence::LeaseKeeper`: peer polls, self-fence, watchdog feeds), report their domains and
//! carry out commands (a start takes 1 s, a live migration 2 s: `sim::Libvirt::Timed`). Time
//! advances in 100 ms ticks; messages arrive at once (`sim::Clock::Tick`). The script (`#`
//! starts a comment):
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
//! `heal H`, `kill-agent H`, `restart-agent H`, `crash VM`, `hang-guest VM` (a kernel panic),
//! `busy-guest VM` (its agent silent, its I/O going on), `break-guest VM` (hangs at every boot),
//! `fix-guest VM`, `start-by-hand VM H`,
//! `migrate-by-hand VM H`, `hang-libvirt H DURATION`, the faults
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

mod sim;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::Instant;

use sim::{AgentFault, Clock, GuestFault, Libvirt, Log, TICK_MS, World};
use vmha_engine::health::Probe;
use vmha_engine::{ClusterState, FencingMode, Millis, Policy, Reply, Request, Timings, recovery};

/// Fits `Timings::default()` (at most 3.75 s), as the lab's watchdogs do.
const WATCHDOG_MS: u64 = 3_000;
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
fn agent_fault(s: &str) -> Option<AgentFault> {
    Some(match s {
        "fail-migrations" => AgentFault::FailMigrations,
        "fail-starts" => AgentFault::FailStarts,
        "slow-migrations" => AgentFault::SlowMigrations,
        "slow-starts" => AgentFault::SlowStarts,
        "hang" => AgentFault::Hang,
        "mute" => AgentFault::Mute,
        _ => return None,
    })
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
    /// Inside the guest: a kernel panic (`hang-guest`), an agent too slow to answer while the
    /// guest works (`busy-guest`), a guest that hangs at every boot (`break-guest`), or well
    /// again (`fix-guest`).
    Guest(String, GuestFault),
    /// An operator starts the VM on a host with `virsh start`, bypassing vmha.
    StartByHand {
        vm: String,
        host: String,
    },
    /// An operator live-migrates the VM with `virsh migrate`, bypassing vmha: it runs on the
    /// host at once, and its source keeps the definition, shut off.
    MigrateByHand {
        vm: String,
        host: String,
    },
    /// libvirtd on the host stops answering for a while: the agent's reports go on without
    /// the domain list, starts wait, destroys are lost.
    HangLibvirt(String, u64),
    Fault(String, AgentFault),
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
        && let Some(f) = agent_fault(fault)
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
        ["hang-guest", vm] => Action::Guest(s(vm), GuestFault::Hung),
        ["busy-guest", vm] => Action::Guest(s(vm), GuestFault::Busy),
        ["break-guest", vm] => Action::Guest(s(vm), GuestFault::Broken),
        ["fix-guest", vm] => Action::Guest(s(vm), GuestFault::Fine),
        ["start-by-hand", vm, h] => Action::StartByHand { vm: s(vm), host: s(h) },
        ["migrate-by-hand", vm, h] => Action::MigrateByHand { vm: s(vm), host: s(h) },
        ["hang-libvirt", h, t] => Action::HangLibvirt(s(h), duration(t)?),
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
        ["unprotect", vm] => Action::Operator(sim::protection(vm, false, false)),
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
        ("guest_failure", v) => p.guest_failure_ms = duration(v)?,
        ("guest_boot_grace", v) => p.guest_boot_grace_ms = duration(v)?,
        ("guest_resets", v) => p.guest_resets = number(v)?,
        ("guest_reset_window", v) => p.guest_reset_window_ms = duration(v)?,
        _ => return Err(format!("unknown policy option '{o}'")),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Playing it

/// The script's cluster, on the world's tick clock, its agents registering at its first tick.
fn world(script: &Script) -> World {
    let mut hosts = script.hosts.clone();
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    let vms = (script.vms.iter().enumerate())
        .map(|(i, v)| sim::VmSpec {
            uuid: format!("00000000-0000-0000-0000-{:012}", i + 1),
            name: v.name.clone(),
            mem_mib: v.mem_mib,
            vcpus: v.vcpus,
            host: hosts.iter().position(|h| h.name == v.host).expect("checked by parse"),
        })
        .collect();
    let hosts = (hosts.into_iter())
        .map(|h| sim::HostSpec {
            name: h.name,
            cpus: h.cpus,
            mem_mib: h.mem_mib,
            free_mib: None,
            watchdog: h.watchdog,
        })
        .collect();
    let cluster =
        ClusterState { timings: Timings::default(), policy: script.policy, epoch: 1, ..Default::default() };
    let config = sim::Config {
        timings: Timings::default(),
        watchdog_ms: WATCHDOG_MS,
        clock: Clock::Tick,
        sessions: true,
        libvirt: Libvirt::Timed,
        disk_locks: script.lockd,
        watchdog_armed_at_boot: true,
        log: Log::Keep,
    };
    World::new(config, 0, cluster, hosts, vms)
}

fn operator(w: &mut World, request: Request) {
    if let Reply::Refused(r) = w.operator(request) {
        w.line(|| format!("refused: {r}"));
    }
}

/// The operator's setup: fencing modes, memory limits, protections.
fn configure(w: &mut World, script: &Script) {
    for h in &script.hosts {
        if h.fencing != FencingMode::SelfFence {
            operator(w, Request::SetFencing { host: h.name.clone(), mode: h.fencing.clone() });
        }
        if let Some(l) = h.limit_mib {
            operator(w, Request::SetMemoryLimit { host: h.name.clone(), limit_kib: Some(l << 10) });
        }
    }
    for p in script.vms.iter().filter_map(|v| v.protect.clone()) {
        operator(w, p);
    }
}

fn act(w: &mut World, a: Action) {
    match a {
        Action::Kill(h) => w.power_off(w.host(&h)),
        Action::Revive(h) => w.revive(w.host(&h)),
        Action::Cut(h) => {
            let h = w.host(&h);
            w.hosts[h].link_network = false;
        }
        Action::CutController(h) => {
            let h = w.host(&h);
            w.hosts[h].link_controller = false;
        }
        Action::Heal(h) => w.heal(w.host(&h)),
        Action::KillAgent(h) => w.kill_agent(w.host(&h)),
        Action::RestartAgent(h) => w.restart_agent(w.host(&h)),
        Action::Crash(vm) => w.crash(w.vm_named(&vm)),
        Action::Guest(vm, fault) => w.guest_fault(w.vm_named(&vm), fault),
        Action::StartByHand { vm, host } => w.start_by_hand(w.vm_named(&vm), w.host(&host)),
        Action::MigrateByHand { vm, host } => w.migrate_by_hand(w.vm_named(&vm), w.host(&host)),
        Action::HangLibvirt(h, ms) => w.hang_libvirt(w.host(&h), ms),
        Action::Fault(h, f) => {
            let h = w.host(&h);
            w.hosts[h].faults.insert(f);
        }
        Action::Fix(h) => {
            let h = w.host(&h);
            w.hosts[h].faults.clear();
        }
        Action::Probe { host, ok, name } => {
            let detail = if ok { "exit 0".into() } else { "exit 1: failing (sim)".into() };
            let h = w.host(&host);
            w.hosts[h].probes = vec![Probe { name, ok, detail }];
        }
        Action::FenceResult { host, ok } => w.fence_result(w.host(&host), ok),
        Action::RestartController => w.restart_controller(0),
        Action::Operator(r) => operator(w, r),
        Action::Status => status(w, "status"),
    }
}

/// Where everything is: each host as the world and the controller see it, and why each VM
/// that runs nowhere does not.
fn status(w: &mut World, label: &str) {
    let now = Millis(w.now);
    let s = &w.engine.cluster;
    let mut lines = Vec::new();
    for (h, a) in w.hosts.iter().enumerate() {
        let name = &a.spec.name;
        let world = match (a.powered, a.agent_up, a.link_network && a.link_controller) {
            (false, ..) => "off",
            (true, false, _) => "agent down",
            (true, true, false) => "cut",
            (true, true, true) => "up",
        };
        let seen = s.hosts.get(name).map_or("unknown".into(), |v| {
            format!("{}, {}", s.liveness(name, now).as_str(), v.admin.as_str())
        });
        let mut running: Vec<&str> = (w.vms.iter())
            .filter(|vm| vm.on.get(&h) == Some(&sim::Dom::Running))
            .map(|vm| vm.spec.name.as_str())
            .collect();
        running.sort();
        let running = if running.is_empty() { "-".into() } else { running.join(" ") };
        lines.push(format!("{label} {name}: {world}; controller: {seen}; runs: {running}"));
    }
    for (i, vm) in w.vms.iter().enumerate() {
        if !w.copies(i).is_empty() {
            continue;
        }
        let uuid = &vm.spec.uuid;
        let why = match recovery::explain(s, uuid, now) {
            Some(why) => why,
            None if s.vms.contains_key(uuid) => "the controller thinks it runs".into(),
            None => "unknown to the controller".into(),
        };
        lines.push(format!("{label} {}: not running: {why}", vm.spec.name));
    }
    for l in lines {
        w.line(|| l);
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
    let mut w = world(script);
    let mut actions = script.actions.iter().peekable();
    w.run_acting(script.end, |w| {
        if w.now == SETUP_AT {
            configure(w, script);
        }
        while let Some((_, text, a)) = actions.next_if(|(t, ..)| *t <= w.now) {
            w.line(|| format!("script {text}"));
            act(w, a.clone());
        }
    });
    status(&mut w, "end");
    Outcome { log: w.log.join("\n") + "\n", double_runs: w.violations.len() }
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
