//! Each host's libvirt, and the agent carrying out the controller's commands through it: the
//! domains each host has, starts and live migrations (see `Libvirt`), destroys, and the one
//! check of the safety rule: a VM starts (or arrives) only where no other copy runs.

use std::collections::BTreeMap;

use vmha_engine::cluster::HostResources;
use vmha_engine::guest::GuestSeen;
use vmha_engine::inventory::ReportedDomain;
use vmha_engine::operation::{Done, OpId};
use vmha_engine::step::{Command, CommandKind};
use vmha_engine::{Input, Millis, RunState};

use super::network::Event;
use super::{Libvirt, VmSpec, World};

/// A domain as libvirt on one host has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dom {
    Running,
    /// The paused incoming side of a live migration.
    Incoming,
    ShutOff,
}

/// What a test makes go wrong with a host's agent or libvirt, until it clears them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AgentFault {
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

/// What goes wrong inside a VM's guest, as its host's agent sees it through guest-agent pings
/// and the guest's own I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestFault {
    /// Answers its pings (once booted).
    Fine,
    /// A kernel panic: no answers, no I/O of its own; a reset cures it.
    Hung,
    /// Its agent stops answering but its vCPUs run and it does I/O: busy, not hung.
    Busy,
    /// Hangs at every boot: it never answers again, whatever is done.
    Broken,
}

/// A VM's guest: its fault, since when, and when it last booted (it answers pings from a
/// second after that, unless broken).
#[derive(Clone, Copy, Debug)]
pub struct Guest {
    pub fault: GuestFault,
    since: u64,
    booted: u64,
}

/// How long a sim guest takes from a reset or start to its agent's first answer.
const GUEST_BOOT_MS: u64 = 1_000;
/// The agent's ping interval (`--guest-ping-interval`).
const GUEST_PING_MS: u64 = 2_000;

pub struct Vm {
    pub spec: VmSpec,
    pub guest: Guest,
    /// Where libvirt has it defined, by host.
    pub on: BTreeMap<usize, Dom>,
    /// The definition its host reports, and the writable disks in it.
    pub(super) xml: String,
    pub(super) disks: Vec<String>,
}

impl Vm {
    pub(super) fn new(spec: VmSpec) -> Vm {
        Vm {
            on: BTreeMap::from([(spec.host, Dom::Running)]),
            guest: Guest { fault: GuestFault::Fine, since: 0, booted: 0 },
            xml: format!("<domain><name>{}</name></domain>", spec.name),
            disks: vec![format!("/srv/vms/{}.qcow2", spec.name)],
            spec,
        }
    }
}

#[derive(Clone, Debug)]
enum Work {
    Start { vm: usize },
    Migrate { vm: usize, target: usize },
}

#[derive(Clone, Copy, Debug)]
enum Ends {
    /// At the first step of its host from then on at which libvirt answers.
    Due(u64),
    /// By its own `JobDone` event.
    Event,
}

/// A command libvirt is carrying out, and the connection its result goes back on.
#[derive(Clone, Debug)]
pub(super) struct Job {
    op: OpId,
    conn: u64,
    started: u64,
    ends: Ends,
    work: Work,
    /// Its agent asked libvirt to abort it (an operator's cancel).
    aborted: bool,
}

impl World {
    /// A command reaches the agent of `h`, which carries it out through libvirt.
    pub(super) fn command_arrives(&mut self, h: usize, conn: u64, c: Command) {
        match self.agent_wait(h, conn) {
            None => return,
            Some(t) if t > self.now => return self.at(t, Event::Command { host: h, conn, command: c }),
            Some(_) => {}
        }
        if !matches!(c.kind, CommandKind::Cancel { .. }) && self.refuses(h, c.op) {
            return;
        }
        if self.hosts[h].faults.contains(&AgentFault::Hang) {
            return;
        }
        let libvirt_answers = self.libvirt_answers(h);
        match c.kind {
            CommandKind::Start { uuid, .. } => {
                let vm = self.vm(&uuid);
                match self.hosts[h].keeper.may_start(Millis(self.now)) {
                    Err(why) => self.report_result(h, conn, c.op, Err(why.to_string())),
                    Ok(()) => self.begin_start(h, conn, c.op, vm),
                }
            }
            CommandKind::Migrate { uuid, dest_uri, .. } => {
                let vm = self.vm(&uuid);
                let begun = self.begin_migration(h, conn, c.op, vm, &dest_uri);
                if let Err(e) = begun {
                    self.report_result(h, conn, c.op, Err(e));
                }
            }
            // The sim's guests shut down cleanly, at once.
            CommandKind::Destroy { uuid } | CommandKind::Shutdown { uuid, .. } if libvirt_answers => {
                let vm = self.vm(&uuid);
                if let Some(d) = self.vms[vm].on.get_mut(&h) {
                    *d = Dom::ShutOff;
                }
                self.report_result(h, conn, c.op, Ok(Done::default()));
            }
            CommandKind::Reset { uuid, hard } if libvirt_answers => {
                let vm = self.vm(&uuid);
                let result = self.reset(h, vm, hard);
                self.report_result(h, conn, c.op, result);
            }
            // libvirt aborts the job: the migration fails, the guest stays.
            CommandKind::Cancel { .. } if libvirt_answers => {
                let now = self.now;
                if let Some(j) = self.hosts[h].jobs.iter_mut().find(|j| j.op == c.op) {
                    j.aborted = true;
                    if let Ends::Due(t) = &mut j.ends {
                        *t = now;
                    }
                }
            }
            // The agent asks libvirt for both: a hung one loses them.
            CommandKind::Destroy { .. }
            | CommandKind::Shutdown { .. }
            | CommandKind::Cancel { .. }
            | CommandKind::Reset { .. } => {}
        }
    }

    /// Whether the agent of `h` refuses the command of operation `op`, as the real one does:
    /// it comes from a controller older than the newest it has seen (an operation's id
    /// carries the epoch of the controller that began it).
    fn refuses(&mut self, h: usize, op: OpId) -> bool {
        let epoch = (op.0 >> 64) as u64;
        let refused = self.hosts[h].keeper.see_epoch(epoch).is_err();
        if refused {
            let name = self.hosts[h].spec.name.clone();
            self.line(|| format!("sim {name} refuses {op}: epoch {epoch} is stale"));
        }
        refused
    }

    fn libvirt_answers(&self, h: usize) -> bool {
        self.now >= self.hosts[h].libvirt_hung_until
    }

    /// libvirtd hangs for `ms`: reports go on without the domain list, and starts sent to the
    /// host happen (or not) only when it answers again.
    pub fn hang_libvirt(&mut self, h: usize, ms: u64) {
        let a = &mut self.hosts[h];
        a.libvirt_hung_until = a.libvirt_hung_until.max(self.now + ms);
    }

    /// The agent checked its lease; libvirt starts the VM when the start is done (at once if
    /// it takes no time and libvirt answers).
    fn begin_start(&mut self, h: usize, conn: u64, op: OpId, vm: usize) {
        let ms = match (self.config.libvirt, self.hosts[h].faults.contains(&AgentFault::SlowStarts)) {
            (_, true) => 10_000,
            (Libvirt::Timed, false) => 1_000,
            (Libvirt::Sudden, false) => 0,
        };
        if ms == 0 && self.libvirt_answers(h) {
            let result = self.end_start(h, vm);
            return self.report_result(h, conn, op, result);
        }
        let job = Job {
            op,
            conn,
            started: self.now,
            ends: Ends::Due(self.now + ms),
            work: Work::Start { vm },
            aborted: false,
        };
        self.hosts[h].jobs.push(job);
    }

    /// Through libvirt's start hook, which lets a protected VM start only while the host's
    /// lease (as its agent last wrote it down) is valid.
    fn end_start(&mut self, h: usize, vm: usize) -> Result<Done, String> {
        let host = &self.hosts[h];
        host.keeper.may_start(Millis(self.now)).map_err(|e| format!("refused by the lease hook: {e}"))?;
        if host.faults.contains(&AgentFault::FailStarts) {
            return Err("internal error: qemu unexpectedly closed the monitor (sim)".into());
        }
        let locked = self.vms[vm].on.iter().any(|(o, d)| *o != h && *d != Dom::ShutOff);
        if self.config.disk_locks && locked {
            return Err(format!(
                "internal error: Failed to get \"write\" lock: Is another process using the image \
                 [/san/images/{}.qcow2]?",
                self.vms[vm].spec.name
            ));
        }
        self.run_copy(h, vm);
        self.guest_boots(vm);
        self.starts += 1;
        Ok(Done::default())
    }

    fn begin_migration(
        &mut self,
        source: usize,
        conn: u64,
        op: OpId,
        vm: usize,
        dest_uri: &str,
    ) -> Result<(), String> {
        let target = (dest_uri.strip_prefix("qemu+tcp://").and_then(|u| u.strip_suffix("/system")))
            .and_then(|name| self.host_index.get(name).copied())
            .ok_or_else(|| format!("no host answers at {dest_uri}"))?;
        if !self.libvirt_answers(source) {
            return Err("libvirt did not answer".into());
        }
        if self.vms[vm].on.get(&source) != Some(&Dom::Running) {
            return Err("Requested operation is not valid: domain is not running".into());
        }
        let ends = match self.config.libvirt {
            Libvirt::Timed => {
                let to = &self.hosts[target].spec.name;
                if !self.hosts[target].powered || !self.linked(source, target) {
                    return Err(format!("unable to connect to server at '{to}:16509': No route to host"));
                }
                (self.hosts[target].keeper.may_start(Millis(self.now)))
                    .map_err(|e| format!("refused by the lease hook on {to}: {e}"))?;
                self.vms[vm].on.insert(target, Dom::Incoming);
                let slow = self.hosts[source].faults.contains(&AgentFault::SlowMigrations);
                Ends::Due(self.now + if slow { 20_000 } else { 2_000 })
            }
            Libvirt::Sudden => {
                let t = self.now + 200 + self.rand(1_800);
                self.at(t, Event::JobDone { host: source, op });
                Ends::Event
            }
        };
        let job =
            Job { op, conn, started: self.now, ends, work: Work::Migrate { vm, target }, aborted: false };
        self.hosts[source].jobs.push(job);
        Ok(())
    }

    /// Jobs of `h` whose time has come end, whether or not the agent that took them still
    /// runs (libvirt carries them out; only the result needs the agent).
    pub(super) fn end_due_jobs(&mut self, h: usize) {
        if !self.hosts[h].powered || !self.libvirt_answers(h) || self.hosts[h].jobs.is_empty() {
            return;
        }
        let now = self.now;
        let (due, rest) = std::mem::take(&mut self.hosts[h].jobs)
            .into_iter()
            .partition(|j| matches!(j.ends, Ends::Due(t) if t <= now));
        self.hosts[h].jobs = rest;
        for job in due {
            self.end_job(h, job);
        }
    }

    pub(super) fn job_done(&mut self, h: usize, op: OpId) {
        if let Some(i) = self.hosts[h].jobs.iter().position(|j| j.op == op) {
            let job = self.hosts[h].jobs.remove(i);
            self.end_job(h, job);
        }
    }

    fn end_job(&mut self, h: usize, job: Job) {
        let result = match job.work {
            Work::Start { vm } => self.end_start(h, vm),
            Work::Migrate { vm, target } => self.end_migration(h, vm, target, &job),
        };
        self.report_result(h, job.conn, job.op, result);
    }

    fn end_migration(&mut self, source: usize, vm: usize, target: usize, job: &Job) -> Result<Done, String> {
        let timed = self.config.libvirt == Libvirt::Timed;
        let to = &self.hosts[target].spec.name;
        let checked = if job.aborted {
            Err("operation aborted: migration out job: canceled by client".into())
        } else if self.hosts[source].faults.contains(&AgentFault::FailMigrations) {
            Err("operation failed: migration out job: unexpectedly failed (sim)".to_string())
        } else if timed && self.vms[vm].on.get(&target) != Some(&Dom::Incoming) {
            Err(format!("{to} went away during the migration"))
        } else {
            Ok(())
        };
        let moved = checked.and_then(|()| self.live_migrate(vm, source, target, !timed));
        if moved.is_err() && self.vms[vm].on.get(&target) == Some(&Dom::Incoming) {
            self.vms[vm].on.remove(&target);
        }
        let (elapsed_ms, bytes) = (self.now - job.started, self.vms[vm].spec.mem_mib << 20);
        moved.map(|()| Done { elapsed_ms, downtime_ms: 30, bytes })
    }

    /// libvirt moves `vm` from `source` to `target`: only if it still runs on the source, the
    /// two hosts reach each other, and the target's lease lets a protected VM start there (the
    /// incoming side goes through the same start hook). `keep_source`: the source keeps its
    /// definition, shut off.
    fn live_migrate(
        &mut self,
        vm: usize,
        source: usize,
        target: usize,
        keep_source: bool,
    ) -> Result<(), String> {
        let to = &self.hosts[target].spec.name;
        if self.vms[vm].on.get(&source) != Some(&Dom::Running) || !self.hosts[source].powered {
            return Err("domain is not running".into());
        }
        if !self.hosts[target].powered || !self.linked(source, target) {
            return Err(format!("connection to {to} lost during the migration"));
        }
        if !self.hosts[target].agent_up {
            return Err(format!("the agent on {to} does not run"));
        }
        // Both libvirtds take part in a live migration: a hung one lets none through.
        if !self.libvirt_answers(source) || !self.libvirt_answers(target) {
            return Err("libvirt does not answer on one of the hosts".into());
        }
        (self.hosts[target].keeper.may_start(Millis(self.now)))
            .map_err(|why| format!("refused by the lease hook: {why}"))?;
        if keep_source {
            self.vms[vm].on.insert(source, Dom::ShutOff);
        } else {
            self.vms[vm].on.remove(&source);
        }
        self.run_copy(target, vm);
        Ok(())
    }

    /// Someone live-migrates a VM with `virsh migrate` behind vmha's back: it runs on the
    /// target at once, and the source keeps its definition, shut off.
    pub fn migrate_by_hand(&mut self, vm: usize, to: usize) {
        let from = self.copies(vm).into_iter().find(|s| *s != to);
        if let Some(from) = from.filter(|f| self.hosts[*f].powered && self.hosts[to].powered) {
            let _ = self.live_migrate(vm, from, to, true);
        }
    }

    /// An operator starts a VM with `virsh start`, bypassing vmha.
    pub fn start_by_hand(&mut self, vm: usize, h: usize) {
        self.run_copy(h, vm);
        self.guest_boots(vm);
    }

    /// The agent resets the guest in place: only a copy running here; the hard way destroys it
    /// and starts it again through the lease check every start passes.
    fn reset(&mut self, h: usize, vm: usize, hard: bool) -> Result<Done, String> {
        if self.vms[vm].on.get(&h) != Some(&Dom::Running) {
            return Err("Requested operation is not valid: domain is not running".into());
        }
        if hard {
            self.vms[vm].on.insert(h, Dom::ShutOff);
            self.hosts[h]
                .keeper
                .may_start(Millis(self.now))
                .map_err(|e| format!("refusing to start it again: {e}; it stays off"))?;
            self.run_copy(h, vm);
            self.resets.1 += 1;
        } else {
            self.resets.0 += 1;
        }
        self.guest_boots(vm);
        Ok(Done::default())
    }

    /// Its guest boots (a start or a reset): a panic is gone, a broken guest hangs again.
    fn guest_boots(&mut self, vm: usize) {
        let g = &mut self.vms[vm].guest;
        if g.fault != GuestFault::Broken {
            g.fault = GuestFault::Fine;
        }
        g.booted = self.now;
        g.since = self.now;
    }

    /// Something goes wrong (or right again) inside the guest, from now.
    pub fn guest_fault(&mut self, vm: usize, fault: GuestFault) {
        let g = &mut self.vms[vm].guest;
        if fault != g.fault {
            g.fault = fault;
            g.since = self.now;
        }
    }

    /// What the agent of a host running the guest sees of it.
    fn guest_seen(&self, vm: usize) -> GuestSeen {
        let g = &self.vms[vm].guest;
        let up = self.now.saturating_sub(g.booted);
        let silent = |busy| {
            let ms = self.now.saturating_sub(g.since);
            let quiet_ms = if busy { 0 } else { ms };
            GuestSeen::Silent { since_answer_ms: ms, missed: (ms / GUEST_PING_MS) as u32, quiet_ms }
        };
        match g.fault {
            _ if up < GUEST_BOOT_MS => GuestSeen::Waiting,
            GuestFault::Broken if g.booted > 0 => GuestSeen::Waiting,
            GuestFault::Fine => {
                GuestSeen::Answering { since_answer_ms: (up - GUEST_BOOT_MS) % GUEST_PING_MS }
            }
            GuestFault::Hung | GuestFault::Broken => silent(false),
            GuestFault::Busy => silent(true),
        }
    }

    /// The guest dies: the VM is shut off wherever it ran.
    pub fn crash(&mut self, vm: usize) {
        for d in self.vms[vm].on.values_mut().filter(|d| **d == Dom::Running) {
            *d = Dom::ShutOff;
        }
    }

    /// `vm` starts running on `h`: the one place the safety rule is checked.
    fn run_copy(&mut self, h: usize, vm: usize) {
        let others: Vec<usize> = (self.vms[vm].on.iter())
            .filter(|(o, d)| **o != h && **d == Dom::Running)
            .map(|(o, _)| *o)
            .collect();
        if !others.is_empty() {
            let others: Vec<&str> = others.iter().map(|o| self.hosts[*o].spec.name.as_str()).collect();
            let text = format!(
                "{} DOUBLE_RUN: starts on {} while it runs on {}",
                self.vms[vm].spec.name,
                self.hosts[h].spec.name,
                others.join(", ")
            );
            self.violations.push(format!("t={} ms: {text}", self.now));
            self.line(|| format!("sim {text}"));
        }
        self.vms[vm].on.insert(h, Dom::Running);
    }

    /// Power pulled: its VMs and agent die at once.
    pub fn power_off(&mut self, h: usize) {
        let a = &mut self.hosts[h];
        a.powered = false;
        a.agent_up = false;
        a.watchdog_deadline = None;
        let jobs = std::mem::take(&mut a.jobs);
        for vm in &mut self.vms {
            match vm.on.get(&h) {
                Some(Dom::Incoming) => {
                    vm.on.remove(&h);
                }
                Some(Dom::Running) => {
                    vm.on.insert(h, Dom::ShutOff);
                }
                _ => {}
            }
        }
        // Incoming sides of its outgoing migrations lose their source.
        for job in jobs {
            if let Work::Migrate { vm, target } = job.work
                && self.vms[vm].on.get(&target) == Some(&Dom::Incoming)
            {
                self.vms[vm].on.remove(&target);
            }
        }
        // Migrations to it abort at once: libvirt sees the connection go.
        let now = self.now;
        for job in self.hosts.iter_mut().flat_map(|a| a.jobs.iter_mut()) {
            if let (Work::Migrate { target, .. }, Ends::Due(t)) = (&job.work, &mut job.ends)
                && *target == h
            {
                *t = now;
            }
        }
    }

    /// Destroys the protected VMs that run on `h` (or arrive there); says which.
    pub(super) fn destroy_protected(&mut self, h: usize) -> Vec<String> {
        let mut destroyed = Vec::new();
        for &v in &self.hosts[h].protected {
            let vm = &mut self.vms[v];
            if let Some(d) = vm.on.get_mut(&h).filter(|d| **d != Dom::ShutOff) {
                *d = Dom::ShutOff;
                destroyed.push(vm.spec.name.clone());
            }
        }
        destroyed
    }

    /// What libvirt on `h` lists now.
    pub(super) fn domains_of(&self, h: usize) -> Vec<ReportedDomain> {
        (self.vms.iter().enumerate())
            .filter_map(|(v, vm)| {
                let state = match vm.on.get(&h)? {
                    Dom::Running => RunState::Running,
                    Dom::Incoming => RunState::Paused,
                    Dom::ShutOff => RunState::ShutOff,
                };
                Some(ReportedDomain {
                    uuid: vm.spec.uuid.clone(),
                    name: vm.spec.name.clone(),
                    state,
                    memory_kib: vm.spec.mem_mib << 10,
                    vcpus: vm.spec.vcpus,
                    // The agent watches the guests of the protected VMs it runs.
                    guest: (state == RunState::Running && self.hosts[h].protected.contains(&v))
                        .then(|| self.guest_seen(v)),
                    probes: Vec::new(),
                })
            })
            .collect()
    }

    pub(super) fn resources(&self, h: usize) -> HostResources {
        let spec = &self.hosts[h].spec;
        let free = spec.free_mib.unwrap_or_else(|| {
            let used: u64 = (self.vms.iter())
                .filter(|vm| vm.on.get(&h).is_some_and(|d| *d != Dom::ShutOff))
                .map(|vm| vm.spec.mem_mib)
                .sum();
            spec.mem_mib.saturating_sub(used)
        });
        HostResources {
            cpus: spec.cpus,
            memory_total_kib: spec.mem_mib << 10,
            memory_free_kib: free << 10,
            cpu_model: "x86".into(),
        }
    }

    /// The agent sends a command's result back, if the connection the command came on still
    /// stands.
    fn report_result(&mut self, h: usize, conn: u64, op: OpId, result: Result<Done, String>) {
        let a = &self.hosts[h];
        if a.agent_up && a.conn == conn && self.command_stream(h) && !a.faults.contains(&AgentFault::Mute) {
            self.send_result(Input::Result { host: a.spec.name.clone(), id: op, result });
        }
    }
}
