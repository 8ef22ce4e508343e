//! The one decision step: `Engine::step(input, now) -> Output`.
//!
//! Every event of the world (a heartbeat, an operation's result, a fence verdict, an operator's
//! request, the clock) enters here, and everything the controller must do comes out: the reply,
//! the operations to record and the commands to send once they are recorded, the events to log,
//! and what to persist. The controller's shell and the safety simulator both drive this and
//! nothing else, so the order of the engine's calls lives in one place and the property tests
//! run what production runs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::Refusal;
use crate::admission;
use crate::availability::OutageMark;
use crate::cluster::HostResources;
use crate::drain::{self, Drain, Probe};
use crate::event::{Event, EventKind, Subject};
use crate::inventory::{self, InventoryChange, ReportedDomain};
use crate::lease::{self, Echo, LeaseAnswer};
use crate::migration;
use crate::operation::{Done, OpId, OpKind, OpState, Operation, Overrides, Purpose};
use crate::power;
use crate::recovery::{self, Action, Recovery};
use crate::roster::{Roster, RosterBook, RosterUpdate};
use crate::{AdminState, ClusterState, FencingMode, HostLiveness, HostView, Millis, RunState, Watchdog};

/// The controller's whole decision state: the cluster as observed, and the operations in
/// flight.
#[derive(Clone, Debug, Default)]
pub struct Engine {
    pub cluster: ClusterState,
    /// Operations in flight (ended ones leave at once).
    pub ops: BTreeMap<OpId, Operation>,
    /// Cold restarts whose destroy is done, by VM: (source, target, when it was destroyed).
    /// The start waits until every other live host has reported since: a copy nobody knew of
    /// (moved or started by hand) would show up there, and then nothing is started.
    cold_starts: BTreeMap<String, (String, String, Millis)>,
    next_seq: u64,
    /// What was last handed out for persisting, to persist only what changed.
    saved_hosts: BTreeMap<String, HostWork>,
    saved_vms: BTreeMap<String, VmWork>,
    /// What every heartbeat answer lists, built again only after a step that may have changed
    /// it: at 1000 hosts, building it for each heartbeat cost more than everything else.
    roster: RosterBook,
}

/// A host's work in progress, persisted so that a restarted controller resumes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostWork {
    pub admin: AdminState,
    pub fencing: FencingMode,
    pub memory_limit_kib: Option<u64>,
    /// Why it was declared dead; it stays dead until it reports again.
    pub dead: Option<String>,
    pub drain: Option<Drain>,
    /// Kept so that a new leader knows what the host's agent knew of the protected VMs: a
    /// leader and a host lost together must not leave that host's VMs waiting for an operator.
    pub roster_acked: Option<u64>,
    /// The membership its agent counts votes among, when the leader is sure of it
    /// (`HostLease::settled_members`): without it, a new leader could not tell a host that
    /// missed a join or a removal just before both failed.
    pub members_acked: Option<u64>,
}

/// A VM's desired state and work in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmWork {
    pub protected: bool,
    /// Protected with --force beyond the host reserve: by whom, and what it was short of.
    pub admission_override: Option<String>,
    pub priority: i32,
    pub anti_affinity: Option<String>,
    pub allowed_hosts: Vec<String>,
    pub preferred_host: Option<String>,
    /// Its restart after a host failure, while one is under way.
    pub recovery: Option<Recovery>,
    /// Stopped with `vmha vm stop`: by whom.
    pub stopped_by: Option<String>,
    /// The roster version that first listed its protection (`VmView::protected_in`).
    pub protected_in: Option<u64>,
}

impl HostWork {
    pub fn of(h: &HostView) -> HostWork {
        HostWork {
            admin: h.admin,
            fencing: h.fencing.clone(),
            memory_limit_kib: h.memory_limit_kib,
            dead: h.dead.as_ref().map(|d| d.cause.clone()),
            drain: h.drain.clone(),
            roster_acked: h.roster_acked,
            members_acked: h.lease.settled_members(),
        }
    }
}

impl VmWork {
    /// Gives `vm` these settings: as persisted (a restored controller), or as they were before
    /// a refused change.
    pub fn apply_to(&self, vm: &mut crate::VmView) {
        vm.protected = self.protected;
        vm.admission_override = self.admission_override.clone();
        vm.priority = self.priority;
        vm.anti_affinity = self.anti_affinity.clone();
        vm.allowed_hosts = self.allowed_hosts.clone();
        vm.preferred_host = self.preferred_host.clone();
        vm.recovery = self.recovery.clone();
        vm.stopped_by = self.stopped_by.clone();
        vm.protected_in = self.protected_in;
    }

    pub fn of(vm: &crate::VmView) -> VmWork {
        VmWork {
            protected: vm.protected,
            admission_override: vm.admission_override.clone(),
            priority: vm.priority,
            anti_affinity: vm.anti_affinity.clone(),
            allowed_hosts: vm.allowed_hosts.clone(),
            preferred_host: vm.preferred_host.clone(),
            recovery: vm.recovery.clone(),
            stopped_by: vm.stopped_by.clone(),
            protected_in: vm.protected_in,
        }
    }
}

/// A host's agent registers (again).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub host: String,
    pub migration_uri: String,
    pub peer_address: String,
    pub resources: HostResources,
    pub libvirt_version: String,
    pub lock_manager: String,
    /// For the log: "vmha-agent 0.1.0, libvirt 9.0.0".
    pub describe: String,
}

/// A host's heartbeat, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub host: String,
    pub echo: Option<Echo>,
    pub resources: Option<(HostResources, String)>,
    pub watchdog: Watchdog,
    pub probes: Vec<Probe>,
    /// `None`: libvirt did not answer the agent, so this report says nothing of its VMs.
    pub domains: Option<Vec<ReportedDomain>>,
    /// Domain XML that came with the report and passed the controller's checks, by UUID,
    /// with the writable disks it uses.
    pub xml: Vec<(String, String, Vec<String>)>,
    /// Domain XML that came with the report and failed them: UUID and why. The VM keeps the
    /// definition accepted before, if any.
    pub xml_refused: Vec<(String, String)>,
    /// When the controller received it, if earlier than the step that decides it (see
    /// `lease::on_heartbeat`).
    pub arrived: Option<Millis>,
    /// The roster version the agent holds (0: none); `None`: an agent that predates rosters,
    /// which gets the whole one every time.
    pub roster_known: Option<u64>,
    /// The agent says it has self-fenced: it destroyed its protected VMs and starts none
    /// until it holds a lease again.
    pub self_fenced: bool,
    /// The agent's count of its heartbeats (0: not given). One that a later heartbeat of the
    /// same agent overtook (a slow one the agent gave up on, then let go) lists its domains as
    /// they were before that later report's: its list is not taken.
    pub seq: u64,
}

/// A change an operator asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `vmha protect` / `unprotect`; `None`s leave a setting as it is.
    Protection {
        vm: String,
        protected: bool,
        priority: Option<i32>,
        anti_affinity: Option<String>,
        allowed_hosts: Option<Vec<String>>,
        preferred_host: Option<String>,
        /// Protect it even beyond the host reserve (`admission`); recorded and shown.
        force: bool,
    },
    Migrate {
        vm: String,
        to: String,
        overrides: Option<Overrides>,
    },
    Drain {
        host: String,
        allow_restart: bool,
    },
    /// `abort`: also cancel the drain's live migrations in flight.
    Undrain {
        host: String,
        abort: bool,
    },
    ConfirmDown {
        host: String,
    },
    SetFencing {
        host: String,
        mode: FencingMode,
    },
    SetMemoryLimit {
        host: String,
        limit_kib: Option<u64>,
    },
    /// `vmha host remove`: forget a retired host (no lease, no VMs, no operations).
    RemoveHost {
        host: String,
    },
    /// `vmha vm stop`: shut it down, destroyed after `timeout_ms`; not started again by vmha.
    StopVm {
        vm: String,
        timeout_ms: u64,
    },
    /// `vmha vm start`: start it (on `on`, or where placement says) when no copy may run.
    StartVm {
        vm: String,
        on: Option<String>,
    },
    /// `vmha cancel OP` / `vmha migrate VM --cancel`: abort a live migration in flight (by its
    /// operation, or the VM's); the VM stays on its source.
    Cancel {
        op: Option<OpId>,
        vm: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Register(Registration),
    Heartbeat(Heartbeat),
    /// The operation is in the database: its command may be sent.
    Recorded(OpId),
    /// The agent on `host` says how the operation ended (or the shell could not send it).
    Result {
        host: String,
        id: OpId,
        result: Result<Done, String>,
    },
    /// The external fence command for `host` finished: `Ok` means it is off.
    FenceResult {
        host: String,
        result: Result<String, String>,
    },
    Operator {
        actor: String,
        request: Request,
    },
    Tick,
}

/// The leader's answer to a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseReply {
    pub answer: LeaseAnswer,
    /// When to send the next one, aligned on the leader's clock.
    pub next_in_ms: u64,
    pub cluster_hosts: u32,
    /// The peers and the protected VMs (which the host's agent destroys if it fences).
    pub roster: Arc<Roster>,
    /// What the answer carries of it, for the roster version the agent said it holds.
    pub roster_update: RosterUpdate,
    /// Domains whose XML came with this heartbeat but were not recorded yet
    /// (`inventory::admit_new`): the agent sends their XML again.
    pub xml_not_taken: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Nothing to answer (a tick, a fence verdict).
    None,
    Registered {
        stamp: Millis,
    },
    Lease(LeaseReply),
    /// The request was carried out; it concerned this VM (UUID).
    Vm(String),
    /// The request was carried out; it concerned this host.
    Host(String),
    /// An operation was begun.
    Operation(OpId),
    Refused(Refusal),
}

/// A command for an agent, sent once its operation is recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub op: OpId,
    /// The host whose agent carries it out.
    pub host: String,
    /// The VM's name, for the agent's log lines.
    pub vm: String,
    pub kind: CommandKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandKind {
    Start {
        uuid: String,
        xml: String,
    },
    /// `timeout_ms`: the operator's or the policy's, the one the deadline counts on;
    /// `bandwidth_mib_s`: the operator's, else the shell's default.
    Migrate {
        uuid: String,
        dest_uri: String,
        bandwidth_mib_s: Option<u64>,
        timeout_ms: u64,
    },
    Destroy {
        uuid: String,
    },
    /// A graceful shutdown, then a destroy if it has not ended within `timeout_ms`.
    Shutdown {
        uuid: String,
        timeout_ms: u64,
    },
    /// Abort the job (a live migration) that operation `op` of the command runs on the VM. No
    /// result of its own: the migration's says how it ended.
    Cancel {
        uuid: String,
    },
}

/// What to write to the database after this step, named; the shell writes each as the state
/// now has it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Persist {
    /// Hosts whose registration (addresses, resources) is new.
    pub registered: Vec<String>,
    /// Hosts whose watchdog changed.
    pub watchdog: Vec<String>,
    pub host_work: Vec<(String, HostWork)>,
    /// VMs whose observed state (host, run state, sizes) changed.
    pub vms: Vec<String>,
    /// VMs no host reports any more, dropped from the inventory.
    pub forgotten: Vec<String>,
    pub vm_work: Vec<(String, VmWork)>,
    /// VMs whose domain XML changed.
    pub xml: Vec<String>,
    /// Hosts an operator removed.
    pub removed_hosts: Vec<String>,
    /// Operations whose row changed (begun, sent, ended), as they are now.
    pub ops: Vec<Operation>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub reply: Reply,
    pub events: Vec<Event>,
    /// Operations to write down before anything else; once written, feed `Input::Recorded`.
    pub record: Vec<OpId>,
    pub commands: Vec<Command>,
    /// Run the external fence command for these hosts; feed back `Input::FenceResult`.
    pub fence: Vec<String>,
    pub persist: Persist,
    /// For the outage history (`vmha report`).
    pub outages: Vec<OutageMark>,
}

impl Default for Output {
    fn default() -> Output {
        Output {
            reply: Reply::None,
            events: Vec::new(),
            record: Vec::new(),
            commands: Vec::new(),
            fence: Vec::new(),
            persist: Persist::default(),
            outages: Vec::new(),
        }
    }
}

/// At most one `agent_connected` event per host in this long, unless its address changes.
pub const CONNECTED_EVENT_EVERY_MS: u64 = 60_000;

impl Engine {
    pub fn new(cluster: ClusterState) -> Engine {
        let mut e = Engine { cluster, roster: RosterBook::new(), ..Default::default() };
        e.cluster.index_vms();
        e.mark_saved();
        e
    }

    /// A controller that starts (or takes over) from what its predecessor persisted: `cluster`
    /// as loaded, and the operations it left in flight. Times persisted on another clock start
    /// over at `now`; operations get a full timeout; a start is in doubt until its host reports
    /// or is declared dead. Nothing is re-sent: results and reports settle what was begun.
    pub fn restore(mut cluster: ClusterState, ops: Vec<Operation>, now: Millis) -> (Engine, Vec<Event>) {
        let mut events = Vec::new();
        for h in cluster.hosts.values_mut() {
            if let Some(d) = &mut h.dead {
                d.at = now;
            }
            if let Some(d) = h.drain.as_ref().filter(|d| d.state == drain::DrainState::Draining) {
                events.push(Event::host(
                    &h.name,
                    EventKind::DrainResumed,
                    format!(
                        "the drain of {} continues under this controller ({} of {} VMs still to move)",
                        h.name,
                        d.steps.iter().filter(|s| !s.state.finished()).count(),
                        d.steps.len()
                    ),
                ));
            }
        }
        for vm in cluster.vms.values_mut() {
            // A report that echoes an earlier leader's answer may have been sent before any
            // result that leader saw: it is no news of a VM stopping (`inventory::apply_report`)
            // until its host echoes this leader's answer, a heartbeat or two.
            vm.settled_at = now;
            if let Some(r) = &mut vm.recovery {
                r.since = now;
                r.may_have_moved_since = r.may_have_moved_since.map(|_| now);
                if let Some(l) = &mut r.disk_locked {
                    l.since = now;
                    l.retry_at = now;
                }
            }
        }
        let mut e = Engine { cluster, roster: RosterBook::new(), ..Default::default() };
        e.cluster.index_vms();
        for mut op in ops {
            e.next_seq = e.next_seq.max((op.id.0 as u64).wrapping_add(1));
            op.inherited = true;
            op.state = OpState::Running;
            op.deadline = Operation::deadline(op.kind, op.overrides, &e.cluster.policy, now);
            let what = op.describe();
            if let Some(vm) = e.cluster.vms.get_mut(&op.vm_uuid) {
                match (op.kind, op.purpose) {
                    (OpKind::Start, Purpose::Restart) if !vm.awaits_start_on(&op.target) => {
                        vm.recovery = Some(Recovery::in_doubt(&op.target, now));
                    }
                    (OpKind::Migrate, _) => vm.busy_with = Some(format!("migration to {}", op.target)),
                    (OpKind::Destroy | OpKind::Start, Purpose::ColdRestart) => {
                        vm.busy_with = Some(format!("cold restart on {}", op.target))
                    }
                    (OpKind::Shutdown, _) => vm.busy_with = Some(format!("shutdown on {}", op.source)),
                    _ => {}
                }
            }
            events.push(Event {
                subject: Subject::Operation(op.id.to_string()),
                kind: EventKind::OperationReconciled,
                message: format!(
                    "{what} was begun by an earlier controller; it is followed to its end from its agent's result \
                     or reports, and never sent again"
                ),
                actor: "controller".into(),
            });
            e.ops.insert(op.id, op);
        }
        e.forget_unrecorded();
        e.mark_saved();
        (e, events)
    }

    /// A restart or drain step persisted as under way, whose operation never reached the
    /// database, was never sent (commands go out only once recorded): it is tried again.
    fn forget_unrecorded(&mut self) {
        let in_flight: BTreeSet<&str> = self.ops.values().map(|op| op.vm_uuid.as_str()).collect();
        for vm in self.cluster.vms.values_mut().filter(|v| !in_flight.contains(v.uuid.as_str())) {
            if let Some(r) = vm.recovery.as_mut() {
                r.starting_on = None;
            }
        }
        for h in self.cluster.hosts.values_mut() {
            for step in h.drain.iter_mut().flat_map(|d| d.steps.iter_mut()) {
                let sent = matches!(
                    step.state,
                    drain::StepState::Migrating { .. } | drain::StepState::Restarting { .. }
                );
                if sent && !in_flight.contains(step.vm_uuid.as_str()) {
                    step.state = drain::StepState::Pending;
                }
            }
        }
    }

    fn mark_saved(&mut self) {
        self.saved_hosts = self.cluster.hosts.iter().map(|(n, h)| (n.clone(), HostWork::of(h))).collect();
        self.saved_vms = self.cluster.vms.iter().map(|(u, v)| (u.clone(), VmWork::of(v))).collect();
    }

    /// Takes one input at `now` and says what to do.
    pub fn step(&mut self, input: Input, now: Millis) -> Output {
        let mut out = Output::default();
        let mut actions = Vec::new();
        // Heartbeats, the most frequent input, touch one host and its VMs, registrations their
        // host, and ticks only restarts in progress: only those are compared for persisting.
        // Results and operator requests may touch anything.
        let mut scope = Scope::Everything;
        match input {
            Input::Register(r) => {
                scope = Scope::Host(r.host.clone());
                self.register(r, now, &mut out)
            }
            Input::Heartbeat(hb) => {
                let host = hb.host.clone();
                let vms = self.heartbeat(hb, now, &mut out, &mut actions);
                scope = Scope::Report(host, vms);
            }
            Input::Recorded(id) => {
                scope = Scope::Operations;
                self.recorded(id, now, &mut out)
            }
            Input::Result { host, id, result } => match self.ops.get(&id) {
                None => out.reply = Reply::Refused(Refusal::UnknownOperation(id.to_string())),
                Some(op) if op.executor() != host => {
                    out.reply = Reply::Refused(Refusal::NotExecutor { operation: id.to_string(), host })
                }
                Some(_) => self.finish_op(id, result, now, &mut out, &mut actions),
            },
            Input::FenceResult { host, result } => {
                actions.extend(recovery::fence_finished(&mut self.cluster, &host, result, now))
            }
            Input::Operator { actor, request } => {
                // A protection change touches its VM alone (scripts protect thousands).
                let protection = matches!(request, Request::Protection { .. });
                match self.operator(&actor, request, now, &mut out, &mut actions) {
                    Ok(reply) => out.reply = reply,
                    Err(refusal) => out.reply = Reply::Refused(refusal),
                }
                if protection {
                    let vm = match &out.reply {
                        Reply::Vm(uuid) => vec![uuid.clone()],
                        _ => Vec::new(),
                    };
                    scope = Scope::Vms(vm);
                }
            }
            Input::Tick => {
                self.expire_ops(now, &mut out, &mut actions);
                self.start_cold_restarts(now, &mut out, &mut actions);
                actions.extend(recovery::tick(&mut self.cluster, now));
                actions.extend(drain::tick(&mut self.cluster, now));
                scope = Scope::Tick;
            }
        }
        self.perform(actions, now, &mut out);
        let narrow = !matches!(scope, Scope::Everything);
        self.collect_persist(scope, &mut out);
        let p = &out.persist;
        if !narrow || [p.vm_work.is_empty(), p.host_work.is_empty(), p.registered.is_empty()].contains(&false)
        {
            self.roster.may_have_changed();
        }
        out
    }

    fn register(&mut self, r: Registration, now: Millis, out: &mut Output) {
        let s = &mut self.cluster;
        // A host the cluster knows always comes back; only new ones count against the cap.
        if !s.hosts.contains_key(&r.host) && s.hosts.len() >= s.policy.max_hosts {
            out.reply = Reply::Refused(Refusal::TooManyHosts { host: r.host, hosts: s.hosts.len() });
            return;
        }
        lease::observe_quorum(s, now);
        let h = s.hosts.entry(r.host.clone()).or_insert_with(|| HostView::new(&r.host));
        // An agent that registers again and again while it is heard from (a crash loop, or a
        // hostile host) is logged once a minute with a count, not at every registration: the
        // event log must not grow at the pace a host chooses. A host back after an absence (a
        // lease's length without a word) or at a new address is always said at once.
        let moved = h.migration_uri != r.migration_uri || h.peer_address != r.peer_address;
        let ttl = s.timings.lease_ttl_ms;
        let away = h.last_heartbeat.is_none_or(|t| now.0.saturating_sub(t.0) >= ttl);
        let logged = match h.connected_logged {
            Some((at, unsaid))
                if !moved && !away && now.0 < at.0.saturating_add(CONNECTED_EVENT_EVERY_MS) =>
            {
                h.connected_logged = Some((at, unsaid.saturating_add(1)));
                None
            }
            previous => {
                h.connected_logged = Some((now, 0));
                Some(previous.map_or(0, |(_, unsaid)| unsaid))
            }
        };
        h.migration_uri = r.migration_uri.clone();
        h.peer_address = r.peer_address;
        h.resources = r.resources;
        h.libvirt_version = r.libvirt_version;
        h.lock_manager = r.lock_manager;
        h.last_heartbeat = Some(now);
        // A new run of the agent counts its heartbeats from 1 again.
        h.report_seq = 0;
        let stamp = lease::issue_stamp(s, &r.host, now);
        out.persist.registered.push(r.host.clone());
        if let Some(unsaid) = logged {
            let before = match unsaid {
                0 => String::new(),
                n => format!(" ({n} more registrations since the last one logged)"),
            };
            out.events.push(
                Event::host(
                    &r.host,
                    EventKind::AgentConnected,
                    format!(
                        "agent on {} connected ({}); migrations to it use {}{before}",
                        r.host, r.describe, r.migration_uri
                    ),
                )
                .by(&r.host),
            );
        }
        out.reply = Reply::Registered { stamp };
    }

    /// Returns the VMs the heartbeat may have changed.
    fn heartbeat(
        &mut self,
        hb: Heartbeat,
        now: Millis,
        out: &mut Output,
        actions: &mut Vec<Action>,
    ) -> Vec<String> {
        let host = hb.host;
        let roster_known = hb.roster_known;
        let s = &mut self.cluster;
        let Some(h) = s.hosts.get_mut(&host) else {
            out.reply = Reply::Refused(Refusal::NotRegistered(host));
            return Vec::new();
        };
        h.last_heartbeat = Some(now);
        if let Some((resources, lock_manager)) = hb.resources {
            h.resources = resources;
            h.lock_manager = lock_manager;
        }
        if h.watchdog != hb.watchdog {
            out.events.push(Event::host(&host, EventKind::Watchdog, watchdog_message(&host, &hb.watchdog)));
            h.watchdog = hb.watchdog;
            out.persist.watchdog.push(host.clone());
        }
        if h.self_fenced != hb.self_fenced {
            h.self_fenced = hb.self_fenced;
            out.events.push(self_fence_event(&host, hb.self_fenced));
        }
        let overtaken = hb.seq != 0 && hb.seq <= h.report_seq;
        if hb.domains.is_some() && !overtaken {
            h.report_seq = h.report_seq.max(hb.seq);
        }
        drain::on_probes(s, &host, hb.probes, now);
        let mut touched: Vec<String> = Vec::new();
        // Without its domain list a report says nothing about the VMs: the last one stands. Nor
        // does one a later report of the same agent overtook.
        let domains = hb.domains.filter(|_| !overtaken);
        let reported = domains.is_some();
        // The report was sent after the agent received the answer it echoes: on this leader's
        // clock, after that answer's stamp. (Nothing is known of an echo of another leader's.)
        let sent_after = hb.echo.filter(|e| e.epoch == s.epoch).map_or(Millis(0), |e| e.stamp);
        let mut deferred = BTreeSet::new();
        if let Some(domains) = domains {
            touched.extend(domains.iter().map(|d| d.uuid.clone()));
            touched.extend(recovery::lock_holder_reported(s, &host, &domains, now));
            let (first, stale) = recovery::on_report(s, &host, &domains, now);
            actions.extend(first);
            let kept: Vec<_> = domains.into_iter().filter(|d| !stale.contains(&d.uuid)).collect();
            let admitted = inventory::admit_new(s, &host, kept, now);
            if let Some(message) = admitted.message {
                out.events.push(Event::host(&host, EventKind::DiscoveryDeferred, message).by(&host));
            }
            deferred = admitted.deferred.into_iter().collect();
            let kept = admitted.domains;
            let changes = inventory::apply_report(s, &host, &kept, sent_after, now);
            let after = recovery::after_report(s, &host, &changes, now);
            if !after.is_empty() {
                // It placed the waiting restarts again: any of them may wait for another reason,
                // or have ended (another live host reports the VM running), which leaves no
                // recovery behind to find it by.
                touched.extend(s.vms.values().filter(|v| v.recovery.is_some()).map(|v| v.uuid.clone()));
                touched.extend(after.iter().filter_map(|a| match a {
                    recovery::Action::Outage(OutageMark::Ended { vm_uuid }) => Some(vm_uuid.clone()),
                    _ => None,
                }));
            }
            actions.extend(after);
            touched.extend(changes.iter().map(|c| c.uuid().to_string()));
            self.inventory_changes(changes, &host, out);
            self.settle_inherited_from_report(&host, now, out, actions);
        }
        let s = &mut self.cluster;
        // After the report: a host declared dead earns a lease again only with a report of its
        // domains, and this one may be it.
        // The roster this answer carries (built now if a step changed it): an echo of the answer
        // later tells that the agent holds that version.
        let roster = self.roster.current(s);
        touched.extend(self.roster.take_listed());
        let answer = lease::on_heartbeat(s, &host, hb.echo, roster.version, hb.arrived.unwrap_or(now), now);
        if let (LeaseAnswer::Granted { .. }, true, Some(h)) = (&answer, reported, s.hosts.get_mut(&host)) {
            h.reported_at = Some(now);
        }
        // Only for its own domains: a host cannot rewrite the definition of another's VM.
        let xml_not_taken: Vec<String> = (hb.xml.iter().map(|(uuid, ..)| uuid))
            .chain(hb.xml_refused.iter().map(|(uuid, _)| uuid))
            .filter(|u| deferred.contains(*u))
            .cloned()
            .collect();
        let mut refused = hb.xml_refused;
        for (uuid, xml, disks) in hb.xml {
            if s.vms.get(&uuid).is_none_or(|vm| vm.host.as_deref() != Some(&host)) {
                continue;
            }
            // A second writer on a disk corrupts it: a definition that names another VM's disk
            // is refused, so that no failover starts it beside that VM.
            if let Some((disk, other)) = s.disk_taken(&uuid, &disks) {
                refused.push((
                    uuid,
                    format!("disk {disk} belongs to VM {other} (a writable disk belongs to one VM)"),
                ));
                continue;
            }
            let Some(vm) = s.vms.get_mut(&uuid) else { continue };
            vm.definition_refused = None;
            if vm.xml != xml {
                vm.xml = xml;
                out.persist.xml.push(uuid.clone());
            }
            s.set_disks(&uuid, disks);
        }
        for (uuid, why) in refused {
            let Some(vm) = s.vms.get_mut(&uuid).filter(|vm| vm.host.as_deref() == Some(&host)) else {
                continue;
            };
            if vm.definition_refused.as_deref() == Some(why.as_str()) {
                continue;
            }
            let name = vm.name.clone();
            let then = if vm.xml.is_empty() {
                format!(
                    "{name} cannot be restarted elsewhere until {host} reports a definition that passes \
                     the controller's checks"
                )
            } else {
                format!(
                    "a restart elsewhere uses the definition accepted before, until {host} reports one \
                     that passes the controller's checks"
                )
            };
            out.events.push(
                Event::vm(
                    &name,
                    EventKind::DefinitionRefused,
                    format!("definition of VM {name} reported by host {host} refused: {why}; {then}"),
                )
                .by(&host),
            );
            vm.definition_refused = Some(why);
        }
        let interval = s.timings.heartbeat_interval_ms;
        // Align every host's heartbeats on the leader's clock, so that their leases end
        // together if the leader goes away (see SAFETY.md).
        let mut next_in_ms = interval - now.0 % interval;
        if next_in_ms < interval / 4 {
            next_in_ms += interval;
        }
        let cluster_hosts = s.hosts.len() as u32;
        out.reply = Reply::Lease(LeaseReply {
            answer,
            next_in_ms,
            cluster_hosts,
            roster_update: self.roster.update_for(s, roster_known.unwrap_or(0)),
            roster,
            xml_not_taken,
        });
        touched
    }

    /// Events and writes for what a report changed.
    fn inventory_changes(&mut self, changes: Vec<InventoryChange>, actor: &str, out: &mut Output) {
        for change in changes {
            if let InventoryChange::Vanished { uuid, name, from, forgotten: true } = &change {
                out.persist.forgotten.push(uuid.clone());
                out.events.push(
                    Event::vm(
                        name,
                        EventKind::VmForgotten,
                        format!("{name} is no longer defined on {from} nor reported by any host: forgotten"),
                    )
                    .by(actor),
                );
                continue;
            }
            let Some(vm) = self.cluster.vms.get(change.uuid()) else { continue };
            out.persist.vms.push(vm.uuid.clone());
            // Running again (restarted, started, or moved while an outage was open).
            let back = match &change {
                InventoryChange::StateChanged { from, to, .. } => !from.has_process() && to.has_process(),
                InventoryChange::Moved { state, .. } => state.has_process(),
                _ => false,
            };
            if back {
                out.outages.push(OutageMark::Ended { vm_uuid: vm.uuid.clone() });
            }
            let (kind, message) = match &change {
                InventoryChange::Appeared { name, host, state, .. } => {
                    (EventKind::VmDiscovered, format!("{name} found {} on {host}", state.as_str()))
                }
                InventoryChange::Moved { name, from, to, .. } => {
                    (EventKind::VmMoved, format!("{name} now runs on {to} (was on {from})"))
                }
                InventoryChange::StateChanged { name, host, from, to, unwatched, .. } => (
                    EventKind::VmState,
                    format!(
                        "{name} on {host} is now {} (was {}{})",
                        to.as_str(),
                        from.as_str(),
                        if *unwatched { " when the previous leader last saw it" } else { "" }
                    ),
                ),
                InventoryChange::Vanished { name, from, .. } => {
                    (EventKind::VmVanished, format!("{name} is no longer reported by {from}"))
                }
                // after_report writes its event, with what is done about it.
                InventoryChange::Updated { .. } | InventoryChange::TwoCopies { .. } => continue,
            };
            out.events.push(Event::vm(&vm.name, kind, message).by(actor));
        }
    }

    /// An operation an earlier leader began may have ended while no controller listened: a
    /// migration whose VM the target now runs succeeded.
    fn settle_inherited_from_report(
        &mut self,
        host: &str,
        now: Millis,
        out: &mut Output,
        actions: &mut Vec<Action>,
    ) {
        let done: Vec<OpId> = self
            .ops
            .values()
            .filter(|op| {
                op.inherited && matches!(op.kind, OpKind::Migrate | OpKind::Start) && op.target == host
            })
            .filter(|op| {
                self.cluster
                    .vms
                    .get(&op.vm_uuid)
                    .is_some_and(|v| v.host.as_deref() == Some(host) && v.state == RunState::Running)
            })
            .map(|op| op.id)
            .collect();
        for id in done {
            self.finish_op(id, Ok(Done::default()), now, out, actions);
        }
    }

    /// A recorded operation's command goes out, if it is still wanted: the cluster may have
    /// changed while the database was slow or away (the host came back with the VM, or was
    /// declared dead).
    fn recorded(&mut self, id: OpId, now: Millis, out: &mut Output) {
        let Some(op) = self.ops.get(&id).filter(|op| op.state == OpState::Recording) else { return };
        let vm = self.cluster.vms.get(&op.vm_uuid);
        let wanted = match (op.kind, op.purpose) {
            (OpKind::Start, Purpose::Restart) => vm.is_some_and(|v| v.awaits_start_on(&op.target)),
            _ => vm.is_some(),
        };
        if !wanted {
            self.set_op_state(
                id,
                OpState::Aborted,
                "no longer wanted once recorded (the cluster changed while the database was slow or away)"
                    .into(),
                out,
            );
            return;
        }
        let xml = vm.map(|v| v.xml.clone()).unwrap_or_default();
        let kind = match op.kind {
            OpKind::Start => CommandKind::Start { uuid: op.vm_uuid.clone(), xml },
            OpKind::Migrate => CommandKind::Migrate {
                uuid: op.vm_uuid.clone(),
                dest_uri: self
                    .cluster
                    .hosts
                    .get(&op.target)
                    .map(|h| h.migration_uri.clone())
                    .unwrap_or_default(),
                bandwidth_mib_s: op.overrides.map(|o| o.bandwidth_mib_s),
                timeout_ms: op.overrides.map_or(self.cluster.policy.migration_timeout_ms, |o| o.timeout_ms),
            },
            OpKind::Destroy => CommandKind::Destroy { uuid: op.vm_uuid.clone() },
            OpKind::Shutdown => CommandKind::Shutdown {
                uuid: op.vm_uuid.clone(),
                timeout_ms: op.overrides.map_or(0, |o| o.timeout_ms),
            },
        };
        out.commands.push(Command { op: id, host: op.executor().to_string(), vm: op.vm_name.clone(), kind });
        // Its time runs from now: it may have waited long for the database.
        let deadline = Operation::deadline(op.kind, op.overrides, &self.cluster.policy, now);
        if let Some(op) = self.ops.get_mut(&id) {
            op.deadline = deadline;
        }
        self.set_op_state(id, OpState::Running, String::new(), out);
    }

    /// The one place an operation changes state; each change is one event.
    fn set_op_state(&mut self, id: OpId, to: OpState, error: String, out: &mut Output) {
        let Some(op) = self.ops.get_mut(&id) else { return };
        op.state = to;
        op.error = error;
        let what = op.describe();
        let (kind, message) = match to {
            OpState::Recording => (EventKind::OperationDone, format!("{what} is being recorded")),
            OpState::Running => match op.kind {
                OpKind::Start => (EventKind::RestartStarted, format!("{what} sent (was on {})", op.source)),
                OpKind::Migrate => (EventKind::MigrationRequested, format!("{what} requested")),
                OpKind::Destroy | OpKind::Shutdown => (EventKind::OperationDone, format!("{what} sent")),
            },
            OpState::Succeeded => match op.kind {
                OpKind::Migrate if op.done.elapsed_ms > 0 => (
                    EventKind::MigrationSucceeded,
                    format!(
                        "{} live-migrated from {} to {} in {} ms (downtime {} ms, {} MiB sent)",
                        op.vm_name,
                        op.source,
                        op.target,
                        op.done.elapsed_ms,
                        op.done.downtime_ms,
                        op.done.bytes >> 20
                    ),
                ),
                OpKind::Migrate => (EventKind::MigrationSucceeded, format!("{what} succeeded")),
                OpKind::Start | OpKind::Destroy => (EventKind::OperationDone, format!("{what} done")),
                OpKind::Shutdown => (
                    EventKind::VmStoppedByOperator,
                    format!(
                        "{} is off on {} ({}): not restarted until `vmha vm start {}`",
                        op.vm_name,
                        op.source,
                        match op.overrides.map(|o| o.timeout_ms) {
                            Some(t) if op.done.elapsed_ms >= t =>
                                format!("no clean shutdown within {}, so it was destroyed", recovery::secs(t)),
                            _ => format!("shut down in {}", recovery::secs(op.done.elapsed_ms)),
                        },
                        op.vm_name
                    ),
                ),
            },
            OpState::Failed => match op.kind {
                OpKind::Migrate => (
                    EventKind::MigrationFailed,
                    format!("{what} failed: {}; {} stays on {}", op.error, op.vm_name, op.source),
                ),
                OpKind::Start | OpKind::Destroy => {
                    (EventKind::OperationDone, format!("{what} failed: {}", op.error))
                }
                OpKind::Shutdown => (
                    EventKind::OperationDone,
                    format!(
                        "{what} failed: {}; {} stays as it is, and protected if it was",
                        op.error, op.vm_name
                    ),
                ),
            },
            OpState::Aborted => (EventKind::OperationAborted, format!("{what} not sent: {}", op.error)),
            OpState::Cancelled => (
                EventKind::MigrationCancelled,
                format!("{what} {}; {} stays on {}", op.error, op.vm_name, op.source),
            ),
        };
        out.events.push(Event {
            subject: Subject::Vm(op.vm_name.clone()),
            kind,
            message,
            actor: op.actor.clone(),
        });
        out.persist.ops.push(op.clone());
        if to.ended() {
            self.ops.remove(&id);
        }
    }

    /// Begins an operation: recorded first, sent once recorded.
    #[allow(clippy::too_many_arguments)]
    fn begin(
        &mut self,
        kind: OpKind,
        purpose: Purpose,
        vm_uuid: &str,
        source: &str,
        target: &str,
        actor: &str,
        overrides: Option<Overrides>,
        now: Millis,
        out: &mut Output,
    ) -> OpId {
        let id = OpId::new(self.cluster.epoch, self.next_seq);
        self.next_seq += 1;
        let vm_name = self.cluster.vms.get(vm_uuid).map(|v| v.name.clone()).unwrap_or_default();
        let op = Operation {
            id,
            kind,
            purpose,
            vm_uuid: vm_uuid.into(),
            vm_name,
            source: source.into(),
            target: target.into(),
            actor: actor.into(),
            state: OpState::Recording,
            error: String::new(),
            // Set again when it is sent (`recorded`); a recording operation never expires.
            deadline: Operation::deadline(kind, overrides, &self.cluster.policy, now),
            overrides,
            inherited: false,
            done: Done::default(),
            cancelled_by: None,
        };
        out.persist.ops.push(op.clone());
        self.ops.insert(id, op);
        out.record.push(id);
        id
    }

    /// An operation ended: its purpose says which state machine goes on.
    fn finish_op(
        &mut self,
        id: OpId,
        result: Result<Done, String>,
        now: Millis,
        out: &mut Output,
        actions: &mut Vec<Action>,
    ) {
        let Some(op) = self.ops.get(&id).cloned() else { return };
        if let Some(vm) = self.cluster.vms.get_mut(&op.vm_uuid) {
            vm.settled_at = now;
        }
        let (to, error) = match (&result, &op.cancelled_by) {
            (Ok(_), _) => (OpState::Succeeded, String::new()),
            (Err(e), Some(by)) => (OpState::Cancelled, format!("cancelled by {by} ({e})")),
            (Err(e), None) => (OpState::Failed, e.clone()),
        };
        if let (Ok(d), Some(op)) = (&result, self.ops.get_mut(&id)) {
            op.done = d.clone();
        }
        self.set_op_state(id, to, error, out);
        let done = result.as_ref().cloned().unwrap_or_default();
        let verdict = result.map(|_| ());
        let s = &mut self.cluster;
        let protected = s.vms.get(&op.vm_uuid).is_some_and(|v| v.protected);
        match (op.kind, op.purpose) {
            (OpKind::Migrate, _) => {
                if verdict.is_ok() && protected && done.downtime_ms > 0 {
                    out.outages.push(OutageMark::Pause {
                        vm_uuid: op.vm_uuid.clone(),
                        vm_name: op.vm_name.clone(),
                        ms: done.downtime_ms,
                        cause: format!("live migration from {} to {}", op.source, op.target),
                    });
                }
                if verdict.is_ok() {
                    let change = inventory::apply_migrated(s, &op.vm_uuid, &op.target);
                    self.inventory_changes(change.into_iter().collect(), "controller", out);
                }
                let s = &mut self.cluster;
                if let Some(vm) = s.vms.get_mut(&op.vm_uuid) {
                    vm.busy_with = None;
                }
                actions.extend(drain::migration_finished(s, &op.vm_uuid, &op.target, verdict, now));
            }
            (OpKind::Start, Purpose::Restart) => {
                actions.extend(recovery::start_finished(s, &op.vm_uuid, &op.target, verdict, now));
                out.persist.vms.push(op.vm_uuid.clone());
            }
            (OpKind::Start, _) => {
                actions.extend(drain::restart_finished(s, &op.vm_uuid, &op.target, verdict, now));
                out.persist.vms.push(op.vm_uuid.clone());
            }
            (OpKind::Destroy, Purpose::ColdRestart) => match verdict {
                // The first half of a cold restart: the second follows once every host reported.
                Ok(()) => {
                    if protected {
                        out.outages.push(OutageMark::Began {
                            vm_uuid: op.vm_uuid.clone(),
                            vm_name: op.vm_name.clone(),
                            ago_ms: 0,
                            planned: true,
                            cause: format!("cold restart by the drain of {}", op.source),
                        });
                    }
                    self.cold_starts.insert(op.vm_uuid.clone(), (op.source.clone(), op.target.clone(), now));
                }
                Err(e) => {
                    let why = format!("destroying it on {} failed: {e}; it keeps running there", op.source);
                    actions.extend(drain::restart_finished(s, &op.vm_uuid, &op.target, Err(why), now));
                }
            },
            (OpKind::Destroy, _) => {}
            (OpKind::Shutdown, _) => {
                if let Some(vm) = s.vms.get_mut(&op.vm_uuid) {
                    vm.busy_with = None;
                    // Still running: the stop did not happen, so vmha keeps it up as before.
                    if verdict.is_err() {
                        vm.stopped_by = None;
                    } else if vm.protected {
                        out.outages.push(OutageMark::Began {
                            vm_uuid: vm.uuid.clone(),
                            vm_name: vm.name.clone(),
                            ago_ms: done.elapsed_ms,
                            planned: true,
                            cause: format!("stopped by {} with `vmha vm stop`", op.actor),
                        });
                    }
                }
                out.persist.vms.push(op.vm_uuid.clone());
            }
        }
    }

    /// The second half of cold restarts whose hosts have all reported since the destroy: the
    /// start, unless a report showed the VM running elsewhere (then it has left the host).
    fn start_cold_restarts(&mut self, now: Millis, out: &mut Output, actions: &mut Vec<Action>) {
        let due: Vec<(String, String, String)> = self
            .cold_starts
            .iter()
            .filter(|(uuid, (_, _, since))| {
                self.cluster
                    .vms
                    .get(*uuid)
                    .is_none_or(|vm| recovery::not_reported_since(&self.cluster, vm, *since).is_none())
            })
            .map(|(uuid, (source, target, _))| (uuid.clone(), source.clone(), target.clone()))
            .collect();
        for (uuid, source, target) in due {
            self.cold_starts.remove(&uuid);
            let Some(vm) = self.cluster.vms.get(&uuid) else { continue };
            match vm.host.clone().filter(|h| *h != source && vm.state.has_process()) {
                Some(elsewhere) => {
                    out.events.push(Event::vm(
                        &vm.name,
                        EventKind::RestartCancelled,
                        format!("{} runs on {elsewhere} already: it is not started on {target}", vm.name),
                    ));
                    actions.extend(drain::restart_finished(
                        &mut self.cluster,
                        &uuid,
                        &elsewhere,
                        Ok(()),
                        now,
                    ));
                }
                None => {
                    self.begin(
                        OpKind::Start,
                        Purpose::ColdRestart,
                        &uuid,
                        &source,
                        &target,
                        "controller",
                        None,
                        now,
                        out,
                    );
                }
            }
        }
    }

    /// Whether `host` reported its domains (with a lease) after the time an operation with this
    /// deadline ran out (before the grace for its result), or is dead: either way, a VM it does
    /// not report running is not there.
    fn reported_after(&self, host: &str, deadline: Millis) -> bool {
        let ran_out = Millis(deadline.0.saturating_sub(self.cluster.policy.result_grace_ms));
        self.cluster
            .hosts
            .get(host)
            .is_none_or(|h| h.dead.is_some() || h.reported_at.is_some_and(|r| r > ran_out))
    }

    /// Operations without a result past their deadline are settled from what the agents
    /// report. A restart's start never is: a hung libvirtd may still carry it out, so its VM
    /// waits for its host to report it or to be declared dead.
    fn expire_ops(&mut self, now: Millis, out: &mut Output, actions: &mut Vec<Action>) {
        let due: Vec<OpId> = self
            .ops
            .values()
            .filter(|op| op.state == OpState::Running && op.deadline <= now)
            .filter(|op| {
                !(op.kind == OpKind::Start
                    && self.cluster.vms.get(&op.vm_uuid).is_some_and(|v| v.awaits_start_on(&op.target)))
            })
            .map(|op| op.id)
            .collect();
        for id in due {
            let op = self.ops[&id].clone();
            let vm = self.cluster.vms.get(&op.vm_uuid);
            let at = |h: &str| vm.is_some_and(|v| v.host.as_deref() == Some(h) && v.state.has_process());
            // Gone only by a report that shows it: a host whose libvirt does not answer leaves
            // the VM's state unknown, and unknown is not off.
            let gone_from = |h: &str| {
                vm.is_some_and(|v| {
                    v.state != RunState::Unknown && !(v.host.as_deref() == Some(h) && v.state.has_process())
                })
            };
            let settled = match op.kind {
                OpKind::Migrate if !at(&op.target) && !self.reported_after(&op.target, op.deadline) => {
                    // Neither its result nor a report of the target since the migration's time
                    // ran out: it may have ended there. Wait for one (or the target's death).
                    continue;
                }
                OpKind::Migrate | OpKind::Start => at(&op.target),
                OpKind::Destroy | OpKind::Shutdown => gone_from(&op.source),
            };
            let result = if settled {
                Ok(Done::default())
            } else {
                Err(format!(
                    "no result from the agent on {} in time; it may have restarted mid-command, and its reports \
                     do not show it done",
                    op.executor()
                ))
            };
            out.events.push(Event {
                subject: Subject::Operation(id.to_string()),
                kind: EventKind::OperationExpired,
                message: format!(
                    "{} sent no result in time; settled as {} from the agents' reports",
                    op.describe(),
                    if settled { "done" } else { "failed" }
                ),
                actor: "controller".into(),
            });
            self.finish_op(id, result, now, out, actions);
        }
    }

    fn operator(
        &mut self,
        actor: &str,
        request: Request,
        now: Millis,
        out: &mut Output,
        actions: &mut Vec<Action>,
    ) -> Result<Reply, Refusal> {
        let s = &mut self.cluster;
        let unknown_host = |s: &ClusterState, h: &str| -> Result<(), Refusal> {
            if s.hosts.contains_key(h) { Ok(()) } else { Err(Refusal::UnknownHost(h.into())) }
        };
        match request {
            Request::Protection {
                vm,
                protected,
                priority,
                anti_affinity,
                allowed_hosts,
                preferred_host,
                force,
            } => {
                let uuid = s.find_vm(&vm)?.uuid.clone();
                for h in allowed_hosts.iter().flatten().chain(preferred_host.iter().filter(|p| !p.is_empty()))
                {
                    unknown_host(s, h)?;
                }
                let Some(vm) = s.vms.get_mut(&uuid) else { return Err(Refusal::UnknownVm(uuid)) };
                let (before, since_before) = (VmWork::of(vm), vm.protected_since);
                if protected && !vm.protected {
                    vm.protected_since = now;
                }
                if !protected || !vm.protected {
                    // Listed by the next roster built (`RosterBook::current`).
                    vm.protected_in = None;
                }
                vm.protected = protected;
                if let Some(p) = priority {
                    vm.priority = p;
                }
                if let Some(g) = anti_affinity {
                    vm.anti_affinity = (!g.is_empty()).then_some(g);
                }
                if let Some(a) = allowed_hosts {
                    vm.allowed_hosts = a;
                }
                if let Some(p) = preferred_host {
                    vm.preferred_host = (!p.is_empty()).then_some(p);
                }
                if !vm.protected {
                    vm.recovery = None;
                }
                let admitted = if protected { admission::admit(s, &uuid, now) } else { Ok(()) };
                let vm = s.vms.get_mut(&uuid).expect("found above");
                match admitted {
                    Ok(()) => vm.admission_override = None,
                    Err(why) if force => vm.admission_override = Some(format!("{actor}: {why}")),
                    Err(why) => {
                        // Nothing changes: the settings go back as they were.
                        before.apply_to(vm);
                        vm.protected_since = since_before;
                        return Err(Refusal::BeyondReserve { vm: vm.name.clone(), why });
                    }
                }
                if VmWork::of(vm) != before {
                    out.events.push(protection_event(vm).by(actor));
                }
                Ok(Reply::Vm(uuid))
            }
            Request::Migrate { vm, to, overrides } => {
                let plan = migration::plan_migration(s, &vm, &to, now)?;
                let id = self.begin_migration(
                    &plan.vm_uuid,
                    &plan.target,
                    Purpose::Operator,
                    actor,
                    overrides,
                    now,
                    out,
                );
                Ok(Reply::Operation(id))
            }
            Request::Drain { host, allow_restart } => {
                actions.extend(drain::start(s, &host, allow_restart, now)?);
                Ok(Reply::Host(host))
            }
            Request::Undrain { host, abort } => {
                actions.extend(drain::undrain(s, &host)?);
                if abort {
                    let moving: Vec<OpId> = (self.ops.values())
                        .filter(|op| {
                            op.kind == OpKind::Migrate && op.purpose == Purpose::Drain && op.source == host
                        })
                        .filter(|op| op.state == OpState::Running)
                        .map(|op| op.id)
                        .collect();
                    for id in moving {
                        self.cancel(id, actor, out)?;
                    }
                }
                Ok(Reply::Host(host))
            }
            Request::Cancel { op, vm } => {
                let id = match (op, vm) {
                    (Some(id), _) => id,
                    (None, Some(vm)) => {
                        let uuid = s.find_vm(&vm)?.uuid.clone();
                        (self.ops.values())
                            .find(|op| op.kind == OpKind::Migrate && op.vm_uuid == uuid)
                            .map(|op| op.id)
                            .ok_or(Refusal::NothingToCancel(vm))?
                    }
                    (None, None) => return Err(Refusal::NothingToCancel(String::new())),
                };
                self.cancel(id, actor, out)?;
                Ok(Reply::Operation(id))
            }
            Request::ConfirmDown { host } => {
                let a = recovery::confirm_down(s, &host, now)?;
                out.events.push(
                    Event::host(
                        &host,
                        EventKind::ConfirmedDown,
                        format!("an operator confirmed {host} is off"),
                    )
                    .by(actor),
                );
                actions.extend(a);
                Ok(Reply::Host(host))
            }
            Request::SetFencing { host, mode } => {
                let Some(h) = s.hosts.get_mut(&host) else { return Err(Refusal::UnknownHost(host)) };
                h.fencing = mode.clone();
                out.events.push(
                    Event::host(
                        &host,
                        EventKind::FencingSet,
                        format!("{host}'s fencing mode is now {}", mode.as_str()),
                    )
                    .by(actor),
                );
                Ok(Reply::Host(host))
            }
            Request::SetMemoryLimit { host, limit_kib } => {
                let Some(h) = s.hosts.get_mut(&host) else { return Err(Refusal::UnknownHost(host)) };
                h.memory_limit_kib = limit_kib;
                let message = match limit_kib {
                    Some(l) => format!("vmha places at most {} MiB of VMs on {host}", l / 1024),
                    None => format!("no memory cap on {host} beyond what it has free"),
                };
                out.events.push(Event::host(&host, EventKind::MemoryLimit, message).by(actor));
                Ok(Reply::Host(host))
            }
            Request::StopVm { vm, timeout_ms } => match power::stop(s, &vm, actor, now)? {
                power::Stop::Shutdown { uuid, host } => {
                    let overrides = Some(Overrides { bandwidth_mib_s: 0, timeout_ms });
                    let id = self.begin(
                        OpKind::Shutdown,
                        Purpose::Operator,
                        &uuid,
                        &host,
                        &host,
                        actor,
                        overrides,
                        now,
                        out,
                    );
                    Ok(Reply::Operation(id))
                }
                power::Stop::AlreadyOff { uuid, why } => {
                    let name = &s.vms[&uuid].name;
                    let message = format!(
                        "{name} is stopped on purpose ({why}): {}",
                        power::stopped_on_purpose(name, actor)
                    );
                    out.events.push(Event::vm(name, EventKind::VmStoppedByOperator, message).by(actor));
                    Ok(Reply::Vm(uuid))
                }
            },
            Request::StartVm { vm, on } => {
                let uuid = power::start(s, &vm, on, now)?;
                let message = power::start_message(s, &uuid);
                out.events
                    .push(Event::vm(&s.vms[&uuid].name, EventKind::VmStartRequested, message).by(actor));
                recovery::schedule_restarts(s, now, actions);
                Ok(Reply::Vm(uuid))
            }
            Request::RemoveHost { host } => {
                self.remove_host(&host, now)?;
                out.persist.removed_hosts.push(host.clone());
                let message = format!(
                    "{host} was removed from the cluster; its agent would register it again, as a new host"
                );
                out.events.push(Event::host(&host, EventKind::HostRemoved, message).by(actor));
                Ok(Reply::None)
            }
        }
    }

    /// Asks the source of live migration `id` to abort it. It ends when its agent's result
    /// (or reports, past its deadline) says so: cancelled, or succeeded if it ended first.
    fn cancel(&mut self, id: OpId, actor: &str, out: &mut Output) -> Result<(), Refusal> {
        let op = self.ops.get_mut(&id).ok_or_else(|| Refusal::UnknownOperation(id.to_string()))?;
        let what = op.describe();
        if op.kind != OpKind::Migrate {
            return Err(Refusal::CannotCancel {
                what,
                why: "only a live migration can be cancelled; a start or a stop runs to its end".into(),
            });
        }
        if op.state == OpState::Recording {
            return Err(Refusal::CannotCancel {
                what,
                why: "it is being recorded and not sent yet; retry in a moment".into(),
            });
        }
        if op.cancelled_by.is_some() {
            return Ok(());
        }
        op.cancelled_by = Some(actor.into());
        out.commands.push(Command {
            op: id,
            host: op.source.clone(),
            vm: op.vm_name.clone(),
            kind: CommandKind::Cancel { uuid: op.vm_uuid.clone() },
        });
        let message =
            format!("cancel of the {what} asked for; it stays on {} unless it has just ended", op.source);
        out.events.push(Event::vm(&op.vm_name, EventKind::MigrationCancelRequested, message).by(actor));
        Ok(())
    }

    /// Forgets a retired host. Only one that holds no lease (it cannot be counted for quorum or
    /// run anything vmha knows of), is the place of no VM and takes part in no operation: its
    /// removal then changes nothing but the count of hosts a majority is taken of.
    fn remove_host(&mut self, host: &str, now: Millis) -> Result<(), Refusal> {
        let s = &mut self.cluster;
        if !s.hosts.contains_key(host) {
            return Err(Refusal::UnknownHost(host.into()));
        }
        if s.liveness(host, now) == HostLiveness::Online {
            return Err(Refusal::HostOnline(host.into()));
        }
        let vms: Vec<&str> =
            s.vms.values().filter(|v| v.host.as_deref() == Some(host)).map(|v| v.name.as_str()).collect();
        if !vms.is_empty() {
            return Err(Refusal::HostInUse { host: host.into(), what: format!("VMs: {}", vms.join(", ")) });
        }
        if let Some(op) = self.ops.values().find(|o| o.source == host || o.target == host) {
            return Err(Refusal::HostInUse {
                host: host.into(),
                what: format!("operation {} in flight", op.id),
            });
        }
        s.hosts.remove(host);
        lease::forget_membership(s);
        self.saved_hosts.remove(host);
        Ok(())
    }

    /// Claims the VM and begins its live migration.
    #[allow(clippy::too_many_arguments)]
    fn begin_migration(
        &mut self,
        vm_uuid: &str,
        target: &str,
        purpose: Purpose,
        actor: &str,
        overrides: Option<Overrides>,
        now: Millis,
        out: &mut Output,
    ) -> OpId {
        let source = self.cluster.vms.get(vm_uuid).and_then(|v| v.host.clone()).unwrap_or_default();
        if let Some(vm) = self.cluster.vms.get_mut(vm_uuid) {
            vm.busy_with = Some(format!("migration to {target}"));
        }
        self.begin(OpKind::Migrate, purpose, vm_uuid, &source, target, actor, overrides, now, out)
    }

    /// Carries out the engine's actions, and those their immediate refusals lead to.
    fn perform(&mut self, actions: Vec<Action>, now: Millis, out: &mut Output) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::DeclaredDead { host, cause } => {
                    out.events.push(Event::host(
                        &host,
                        EventKind::HostDead,
                        format!("{host} declared dead: {cause}"),
                    ));
                    out.persist.vms.extend(
                        self.cluster
                            .vms
                            .values()
                            .filter(|v| v.host.as_deref() == Some(&host))
                            .map(|v| v.uuid.clone()),
                    );
                    // What it was carrying out ended with it: nothing of it can succeed now.
                    let on_it: Vec<OpId> =
                        self.ops.values().filter(|op| op.executor() == host).map(|op| op.id).collect();
                    let mut more = Vec::new();
                    for id in on_it {
                        self.finish_op(id, Err(format!("{host} was declared dead")), now, out, &mut more);
                    }
                    queue.extend(more);
                }
                Action::Fence { host } => {
                    out.events.push(Event::host(
                        &host,
                        EventKind::Fencing,
                        format!("{host} lost its lease; running the fence command"),
                    ));
                    out.fence.push(host);
                }
                Action::Start { vm_uuid, host, .. } => {
                    let from =
                        self.cluster.vms.get(&vm_uuid).and_then(|v| v.host.clone()).unwrap_or_default();
                    self.begin(
                        OpKind::Start,
                        Purpose::Restart,
                        &vm_uuid,
                        &from,
                        &host,
                        "controller",
                        None,
                        now,
                        out,
                    );
                }
                Action::Migrate { vm_uuid, vm_name, host, why } => {
                    match migration::plan_migration(&self.cluster, &vm_uuid, &host, now) {
                        Ok(plan) => {
                            let purpose = if why == "failback" {
                                out.events.push(Event::vm(
                                    &vm_name,
                                    EventKind::Failback,
                                    format!(
                                        "{vm_name}'s preferred host {host} is healthy again: moving it back"
                                    ),
                                ));
                                Purpose::Failback
                            } else {
                                Purpose::Drain
                            };
                            self.begin_migration(
                                &plan.vm_uuid,
                                &plan.target,
                                purpose,
                                "controller",
                                None,
                                now,
                                out,
                            );
                        }
                        Err(refusal) => queue.extend(drain::migration_finished(
                            &mut self.cluster,
                            &vm_uuid,
                            &host,
                            Err(refusal.to_string()),
                            now,
                        )),
                    }
                }
                Action::ColdRestart { vm_uuid, vm_name, from, to } => {
                    out.events.push(Event::vm(
                        &vm_name,
                        EventKind::ColdRestart,
                        format!(
                            "{vm_name} cannot be live-migrated off {from}; restarting it on {to} (--allow-restart)"
                        ),
                    ));
                    self.begin(
                        OpKind::Destroy,
                        Purpose::ColdRestart,
                        &vm_uuid,
                        &from,
                        &to,
                        "controller",
                        None,
                        now,
                        out,
                    );
                }
                Action::DestroyStale { vm_uuid, host, .. } => {
                    self.begin(
                        OpKind::Destroy,
                        Purpose::StaleCopy,
                        &vm_uuid,
                        &host,
                        "",
                        "controller",
                        None,
                        now,
                        out,
                    );
                }
                Action::Event { subject_kind, subject, kind, message } => {
                    let subject = match subject_kind {
                        "host" => Subject::Host(subject),
                        _ => Subject::Vm(subject),
                    };
                    out.events.push(Event { subject, kind, message, actor: "controller".into() });
                }
                Action::Outage(mark) => out.outages.push(mark),
            }
        }
    }

    /// Whether every host's and VM's work was handed out for persisting (the narrow scopes of
    /// `collect_persist` missed nothing): checked by the simulator after every step.
    pub fn check_persisted(&self) -> Result<(), String> {
        for (name, h) in &self.cluster.hosts {
            let (was, is) = (self.saved_hosts.get(name), HostWork::of(h));
            if was != Some(&is) {
                return Err(format!("host {name}'s work changed but was not persisted: {was:?} -> {is:?}"));
            }
        }
        for (uuid, vm) in &self.cluster.vms {
            let (was, is) = (self.saved_vms.get(uuid), VmWork::of(vm));
            if was != Some(&is) {
                return Err(format!("VM {uuid}'s work changed but was not persisted: {was:?} -> {is:?}"));
            }
        }
        Ok(())
    }

    /// Names what changed since it was last persisted, comparing what `scope` may have touched.
    fn collect_persist(&mut self, scope: Scope, out: &mut Output) {
        let all_hosts = || self.cluster.hosts.keys().cloned().collect();
        let (hosts, vms): (Vec<String>, Vec<String>) = match scope {
            // A report may also end a migration, and so move a drain of another host on.
            Scope::Report(host, mut vms) => {
                vms.extend(out.persist.vms.iter().cloned());
                let draining = self
                    .saved_hosts
                    .iter()
                    .filter(|(_, w)| w.drain.as_ref().is_some_and(|d| d.state == drain::DrainState::Draining))
                    .map(|(n, _)| n.clone());
                (std::iter::once(host).chain(draining).collect(), vms)
            }
            // A tick changes a VM's work only through its restart (`recovery`): the VMs with
            // one now, or with one when last persisted.
            Scope::Tick => {
                let now = self.cluster.vms.values().filter(|v| v.recovery.is_some()).map(|v| v.uuid.clone());
                let before =
                    self.saved_vms.iter().filter(|(_, w)| w.recovery.is_some()).map(|(u, _)| u.clone());
                (all_hosts(), now.chain(before).chain(out.persist.vms.iter().cloned()).collect())
            }
            Scope::Vms(vms) => (Vec::new(), vms),
            Scope::Host(host) => (vec![host], Vec::new()),
            Scope::Operations => (Vec::new(), Vec::new()),
            Scope::Everything => (all_hosts(), self.cluster.vms.keys().cloned().collect()),
        };
        for name in hosts {
            let Some(h) = self.cluster.hosts.get(&name) else { continue };
            let now = HostWork::of(h);
            if self.saved_hosts.get(&name) != Some(&now) {
                self.saved_hosts.insert(name.clone(), now.clone());
                out.persist.host_work.push((name, now));
            }
        }
        let vms: BTreeSet<String> = vms.into_iter().collect();
        for uuid in vms {
            let Some(vm) = self.cluster.vms.get(&uuid) else {
                self.saved_vms.remove(&uuid);
                continue;
            };
            let now = VmWork::of(vm);
            if self.saved_vms.get(&uuid) != Some(&now) {
                self.saved_vms.insert(uuid.clone(), now.clone());
                out.persist.vm_work.push((uuid, now));
            }
        }
        out.persist.vms.sort();
        out.persist.vms.dedup();
    }
}

/// What one step may have changed, for `collect_persist`.
enum Scope {
    /// A report: its host, and the VMs it listed or changed.
    Report(String, Vec<String>),
    /// These VMs' settings.
    Vms(Vec<String>),
    /// A registration: its host alone. At 1000 hosts, comparing every VM for each of them
    /// starved the heartbeats of a controller's start, and agents that lost their lease
    /// registered again: a collapse that fed itself.
    Host(String),
    /// A recorded operation: only its own row changes.
    Operations,
    Tick,
    Everything,
}

fn watchdog_message(host: &str, wd: &Watchdog) -> String {
    match wd {
        Watchdog::Armed { device, timeout_ms } => {
            format!(
                "{host}'s watchdog is armed ({device}, {timeout_ms} ms): a dead or hung agent gets the host reset"
            )
        }
        Watchdog::Missing(why) => format!(
            "{host} has no working watchdog ({why}): if it fails, its VMs wait for a fence or `vmha host confirm-down \
             {host}`"
        ),
        Watchdog::Unknown => format!("{host}'s watchdog is unknown"),
    }
}

/// What an agent's self-fence flag means, when it changes.
fn self_fence_event(host: &str, fenced: bool) -> Event {
    let event = if fenced {
        Event::host(
            host,
            EventKind::SelfFenced,
            format!(
                "{host}'s agent SELF-FENCED: its lease ran out with no proof that this controller lacked quorum, so \
                 it destroyed its protected VMs; they are restarted elsewhere once {host} is declared dead (its \
                 agent's log says why)"
            ),
        )
    } else {
        Event::host(
            host,
            EventKind::SelfFenceLifted,
            format!(
                "{host}'s agent holds a lease again after its self-fence: protected VMs may run there again"
            ),
        )
    };
    event.by(host)
}

fn protection_event(vm: &crate::VmView) -> Event {
    if vm.protected {
        let mut m = format!("{} is protected with priority {} (higher restarts first)", vm.name, vm.priority);
        if let Some(g) = &vm.anti_affinity {
            m += &format!(", anti-affinity group {g}");
        }
        if !vm.allowed_hosts.is_empty() {
            m += &format!(", only on {}", vm.allowed_hosts.join(","));
        }
        if let Some(p) = &vm.preferred_host {
            m += &format!(", prefers {p}");
        }
        if let Some(o) = &vm.admission_override {
            m += &format!("; FORCED beyond the host reserve by {o}");
        }
        Event::vm(&vm.name, EventKind::VmProtected, m)
    } else {
        Event::vm(
            &vm.name,
            EventKind::VmUnprotected,
            format!("{} is no longer protected: it will not be restarted elsewhere", vm.name),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::{three_hosts, vm_on};
    use crate::drain::{DrainCause, DrainState, DrainStep, StepState};

    fn step_of(uuid: &str, state: StepState) -> DrainStep {
        DrainStep {
            vm_uuid: uuid.into(),
            vm_name: uuid.into(),
            protected: false,
            planned: None,
            why: String::new(),
            state,
            tried: Vec::new(),
        }
    }

    fn start_op(vm: &str, target: &str) -> Operation {
        Operation {
            id: OpId::new(1, 0),
            kind: OpKind::Start,
            purpose: Purpose::Restart,
            vm_uuid: vm.into(),
            vm_name: vm.into(),
            source: "kvm1".into(),
            target: target.into(),
            actor: "controller".into(),
            state: OpState::Running,
            error: String::new(),
            deadline: Millis(0),
            overrides: None,
            inherited: true,
            done: Done::default(),
            cancelled_by: None,
        }
    }

    fn registration(host: &str) -> Registration {
        Registration {
            host: host.into(),
            migration_uri: format!("qemu+tcp://{host}/system"),
            peer_address: format!("{host}:7401"),
            resources: HostResources::default(),
            libvirt_version: "9".into(),
            lock_manager: "lockd".into(),
            describe: "test".into(),
        }
    }

    #[test]
    fn an_agent_that_registers_in_a_loop_is_logged_once_a_minute_with_a_count() {
        let mut e = Engine::new(ClusterState::default());
        let connected = |out: &Output| {
            out.events
                .iter()
                .filter(|ev| ev.kind == EventKind::AgentConnected)
                .map(|ev| ev.message.clone())
                .collect::<Vec<_>>()
        };
        let mut logged = Vec::new();
        for i in 0..120u64 {
            logged.extend(connected(&e.step(Input::Register(registration("kvm1")), Millis(1000 + i * 500))));
        }
        assert_eq!(logged.len(), 1, "{logged:?}");
        let out = e.step(Input::Register(registration("kvm1")), Millis(1000 + CONNECTED_EVENT_EVERY_MS));
        let said = connected(&out);
        assert_eq!(said.len(), 1);
        assert!(said[0].contains("(119 more registrations since the last one logged)"), "{}", said[0]);
        // A new address is said at once.
        let moved =
            Registration { migration_uri: "qemu+tcp://10.0.0.9/system".into(), ..registration("kvm1") };
        let out = e.step(Input::Register(moved), Millis(2000 + CONNECTED_EVENT_EVERY_MS));
        assert_eq!(connected(&out).len(), 1);
        // Every registration is still taken.
        assert!(matches!(out.reply, Reply::Registered { .. }));
    }

    fn report(host: &str, uuid: &str) -> Heartbeat {
        Heartbeat {
            host: host.into(),
            echo: None,
            resources: None,
            watchdog: Watchdog::Missing("test".into()),
            probes: Vec::new(),
            domains: Some(vec![ReportedDomain {
                uuid: uuid.into(),
                name: "dns1".into(),
                state: RunState::Running,
                memory_kib: 65_536,
                vcpus: 1,
            }]),
            xml: Vec::new(),
            xml_refused: Vec::new(),
            roster_known: None,
            self_fenced: false,
            arrived: None,
            seq: 0,
        }
    }

    #[test]
    fn a_new_host_beyond_the_cap_is_refused_and_a_known_one_always_comes_back() {
        let mut e = Engine::new(ClusterState { epoch: 1, ..Default::default() });
        e.cluster.policy.max_hosts = 1;
        let r = e.step(Input::Register(registration("kvm1")), Millis(0));
        assert!(matches!(r.reply, Reply::Registered { .. }));
        let r = e.step(Input::Register(registration("kvm2")), Millis(1));
        let Reply::Refused(refusal) = r.reply else { panic!("{:?}", r.reply) };
        assert!(refusal.to_string().contains("--max-hosts"), "{refusal}");
        assert!(!e.cluster.hosts.contains_key("kvm2") && r.events.is_empty());
        let r = e.step(Input::Register(registration("kvm1")), Millis(2));
        assert!(matches!(r.reply, Reply::Registered { .. }));
    }

    /// A refused definition costs its host nothing (the heartbeat is answered as any other),
    /// is said once per reason, and the VM keeps the definition accepted before.
    #[test]
    fn a_refused_definition_is_said_once_and_the_last_accepted_one_stays() {
        const U: &str = "00000000-0000-0000-0000-000000000001";
        let mut e = Engine::new(ClusterState { epoch: 1, ..Default::default() });
        e.step(Input::Register(registration("kvm1")), Millis(0));
        let refused = |why: &str| {
            let mut hb = report("kvm1", U);
            hb.xml_refused = vec![(U.into(), why.into())];
            Input::Heartbeat(hb)
        };
        let kinds = |o: &Output| o.events.iter().map(|e| e.kind).collect::<Vec<_>>();
        let o = e.step(refused("hostdev: host device passthrough"), Millis(10));
        assert!(matches!(o.reply, Reply::Lease(_)), "{:?}", o.reply);
        assert_eq!(kinds(&o), [EventKind::Watchdog, EventKind::VmDiscovered, EventKind::DefinitionRefused]);
        assert!(o.events[2].message.contains("cannot be restarted elsewhere"), "{}", o.events[1].message);
        assert!(kinds(&e.step(refused("hostdev: host device passthrough"), Millis(20))).is_empty());
        let mut ok = report("kvm1", U);
        ok.xml = vec![(U.into(), "<domain/>".into(), Vec::new())];
        let o = e.step(Input::Heartbeat(ok), Millis(30));
        assert_eq!(o.persist.xml, [U]);
        assert_eq!(e.cluster.vms[U].definition_refused, None);
        let o = e.step(refused("disk vda: outside"), Millis(40));
        assert!(o.events[0].message.contains("uses the definition accepted before"), "{:?}", o.events);
        assert_eq!(e.cluster.vms[U].xml, "<domain/>");
        assert!(o.persist.xml.is_empty());
        // Another host cannot have a VM's definition refused (or accepted) either.
        let o = e.step(Input::Register(registration("kvm2")), Millis(50));
        assert!(matches!(o.reply, Reply::Registered { .. }));
        let mut other = report("kvm2", U);
        other.domains = Some(Vec::new());
        other.xml_refused = vec![(U.into(), "other".into())];
        assert!(!kinds(&e.step(Input::Heartbeat(other), Millis(60))).contains(&EventKind::DefinitionRefused));
        assert_eq!(e.cluster.vms[U].definition_refused.as_deref(), Some("disk vda: outside"));
    }

    /// A definition that names another VM's writable disk is refused, whichever host sends
    /// it: a failover would start it beside that VM, two writers on one disk. The disk is free
    /// again once its VM no longer uses it.
    #[test]
    fn a_disk_belongs_to_one_vm() {
        const A: &str = "00000000-0000-0000-0000-00000000000a";
        const B: &str = "00000000-0000-0000-0000-00000000000b";
        let mut e = Engine::new(ClusterState { epoch: 1, ..Default::default() });
        e.step(Input::Register(registration("kvm1")), Millis(0));
        e.step(Input::Register(registration("kvm2")), Millis(0));
        let define = |host: &str, uuid: &str, disk: &str| {
            let mut hb = report(host, uuid);
            hb.xml = vec![(uuid.into(), format!("<domain>{disk}</domain>"), vec![disk.to_string()])];
            Input::Heartbeat(hb)
        };
        e.step(define("kvm1", A, "/srv/vms/dns1.qcow2"), Millis(10));
        assert_eq!(e.cluster.vms[A].disks, ["/srv/vms/dns1.qcow2"]);
        let o = e.step(define("kvm2", B, "/srv/vms/dns1.qcow2"), Millis(20));
        let refused = o.events.iter().find(|e| e.kind == EventKind::DefinitionRefused).expect("refused");
        assert!(
            refused
                .message
                .contains("disk /srv/vms/dns1.qcow2 belongs to VM dns1 (a writable disk belongs to one VM)"),
            "{}",
            refused.message
        );
        assert!(e.cluster.vms[B].xml.is_empty(), "nothing of it was kept");
        // dns1 moves to another disk: the old one is free for the other VM.
        e.step(define("kvm1", A, "/srv/vms/dns1-new.qcow2"), Millis(30));
        e.step(define("kvm2", B, "/srv/vms/dns1.qcow2"), Millis(40));
        assert_eq!(e.cluster.vms[B].disks, ["/srv/vms/dns1.qcow2"]);
        assert_eq!(e.cluster.vms[B].definition_refused, None);
    }

    /// A deferred VM's XML is handed back, so that its agent sends it again.
    #[test]
    fn the_xml_of_a_vm_not_recorded_yet_is_asked_for_again() {
        let mut e = Engine::new(ClusterState { epoch: 1, ..Default::default() });
        e.cluster.policy.new_vms_per_minute = 1;
        e.step(Input::Register(registration("kvm1")), Millis(0));
        let mut hb = report("kvm1", "a");
        let mut second = hb.domains.as_ref().unwrap()[0].clone();
        second.uuid = "b".into();
        hb.domains.as_mut().unwrap().push(second);
        hb.xml =
            vec![("a".into(), "<domain/>".into(), Vec::new()), ("b".into(), "<domain/>".into(), Vec::new())];
        let o = e.step(Input::Heartbeat(hb.clone()), Millis(10));
        let Reply::Lease(lease) = &o.reply else { panic!("{:?}", o.reply) };
        assert_eq!(lease.xml_not_taken, ["b"]);
        assert!(o.events.iter().any(|e| e.kind == EventKind::DiscoveryDeferred));
        assert!(!e.cluster.vms.contains_key("b"));
        let o = e.step(Input::Heartbeat(hb), Millis(60_010));
        let Reply::Lease(lease) = &o.reply else { panic!("{:?}", o.reply) };
        assert!(lease.xml_not_taken.is_empty());
        assert_eq!(e.cluster.vms["b"].xml, "<domain/>");
    }

    /// Work persisted as under way whose operation never reached the database was never sent:
    /// a restarted controller tries it again instead of waiting for it for ever; work whose
    /// operation was recorded is followed, never re-sent.
    #[test]
    fn a_restart_resumes_recorded_work_and_retries_what_was_never_sent() {
        let mut s = three_hosts();
        vm_on(&mut s, "a", "dns1", "kvm1");
        vm_on(&mut s, "b", "web1", "kvm1");
        vm_on(&mut s, "c", "db1", "kvm2");
        s.hosts.get_mut("kvm1").unwrap().drain = Some(Drain {
            cause: DrainCause::Operator,
            allow_restart: false,
            state: DrainState::Draining,
            steps: vec![
                step_of("a", StepState::Migrating { target: "kvm2".into() }),
                step_of("b", StepState::Pending),
            ],
            message: String::new(),
        });
        for (uuid, on) in [("b", "kvm3"), ("c", "kvm3")] {
            s.vms.get_mut(uuid).unwrap().recovery = Some(Recovery::in_doubt(on, Millis(0)));
        }
        let (e, events) = Engine::restore(s, vec![start_op("c", "kvm3")], Millis(5));
        let steps = &e.cluster.hosts["kvm1"].drain.as_ref().unwrap().steps;
        assert_eq!(steps[0].state, StepState::Pending, "a migration never recorded is tried again");
        assert_eq!(e.cluster.vms["b"].recovery.as_ref().unwrap().starting_on, None, "nor sent: retried");
        assert!(e.cluster.vms["c"].awaits_start_on("kvm3"), "a recorded start stays in doubt");
        assert!(e.ops.values().all(|op| op.inherited && op.deadline > Millis(5)));
        let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::DrainResumed, EventKind::OperationReconciled]);
    }
}
