//! The controller's shell: holds the observed cluster state for the engine, persists what the
//! engine decides or observes, and talks to connected agents. The gRPC handlers and the tick
//! loop call into it; decisions are made in `vmha_engine`, never here.
//!
//! PostgreSQL is written behind (`journal`): nothing that grants a lease waits for it, so an
//! outage of the database fences nobody. What must be on record before it is done (an
//! operation, before its command is sent) waits for the database instead, and operator
//! requests that need it are refused with `Unavailable` while it is known to be away.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tonic::Status;
use uuid::Uuid;
use vmha_engine::drain;
use vmha_engine::inventory::{self, InventoryChange};
use vmha_engine::recovery::{self, Action};
use vmha_engine::{ClusterState, MigrationPlan, Millis, Policy, Timings};
use vmha_proto::v1::{
    Command, DestroyDomain, MigrateDomain, Operation, OperationProgress, OperationResult, StartDomain,
    command,
};

use crate::journal::{Journal, Write};
use crate::store::{NewEvent, OperationOutcome, OperationRow, Store, StoreError, retry_while_unreachable};
use crate::views;

/// Defaults for live migrations the controller starts.
#[derive(Clone, Debug)]
pub struct MigrationSettings {
    pub auto_converge: bool,
    pub bandwidth_mib_s: u64,
    pub timeout: Duration,
    pub postcopy: bool,
    pub max_downtime_ms: u64,
    /// How long after `timeout` an operation without a result is given up.
    pub result_grace: Duration,
}

/// The external fence command (fencing mode `external`): run with the host name as its one
/// argument; exit status 0 means the host is confirmed off.
#[derive(Clone, Debug)]
pub struct FenceSettings {
    pub command: Option<PathBuf>,
    pub timeout: Duration,
}

type AgentSender = mpsc::Sender<Result<Command, Status>>;

/// How often the engine is asked whether to declare a host dead or start a waiting VM.
const TICK: Duration = Duration::from_millis(100);

/// How many ended operations are kept in memory for `WatchOperation`.
const ENDED_KEPT: usize = 256;

pub struct Controller {
    /// For reads; every write goes through `journal`.
    pub store: Store,
    journal: Journal,
    pub epoch: u64,
    pub migration: MigrationSettings,
    pub fence: FenceSettings,
    origin: Instant,
    /// The engine's input. A std mutex: never held across an await.
    state: Mutex<ClusterState>,
    /// Command streams of connected agents, by host.
    agents: Mutex<HashMap<String, AgentSender>>,
    /// Operations in flight, for `WatchOperation` followers and result checks.
    ops: Mutex<HashMap<Uuid, watch::Sender<Operation>>>,
    /// The last operations that ended, newest last: a follower that comes just after the end
    /// is answered from here, since the final state may still be queued for the database.
    ended: Mutex<VecDeque<Operation>>,
    /// Actions decided outside a request or tick (a fence command's verdict), for the next tick.
    deferred: Mutex<Vec<Action>>,
}

/// What an operator is told to do while the database is away.
const RETRY_LATER: &str =
    "vmha keeps retrying on its own; try again once `vmha status` no longer shows a database problem";

/// A failed read or write as the operator sees it: `Unavailable` when the database could not
/// be reached (try again later), `Internal` when it refused.
pub fn store_error(e: StoreError) -> Status {
    if e.is_unavailable() {
        tracing::warn!(error = %e, "store");
        Status::unavailable(format!("database unavailable: {e}; {RETRY_LATER}"))
    } else {
        tracing::error!(error = %e, "store");
        Status::internal(format!("{e}; see the controller's log"))
    }
}

/// The host that carries out an operation (and alone may report on it).
fn executor(op: &Operation) -> &str {
    if op.kind == "start" { &op.target } else { &op.source }
}

impl Controller {
    /// Connects to `database_url` and starts, waiting as long as PostgreSQL is unreachable (and
    /// saying so in the log); fails at once on what waiting cannot fix (a malformed URL, a
    /// schema newer than this build).
    pub async fn start_when_reachable(
        database_url: &str,
        timings: Timings,
        policy: Policy,
        migration: MigrationSettings,
        fence: FenceSettings,
    ) -> Result<Arc<Controller>, StoreError> {
        let waiting = |e: &StoreError, pause: Duration| {
            tracing::warn!(
                error = %e,
                "PostgreSQL is unreachable; the controller starts once it is (next try in {pause:?})"
            )
        };
        let store = retry_while_unreachable(|| Store::open(database_url), waiting).await?;
        retry_while_unreachable(
            || Controller::start(store.clone(), timings, policy, migration.clone(), fence.clone()),
            waiting,
        )
        .await
    }

    /// Takes a new epoch, loads desired state, and closes what a previous controller left open.
    pub async fn start(
        store: Store,
        timings: Timings,
        policy: Policy,
        migration: MigrationSettings,
        fence: FenceSettings,
    ) -> Result<Arc<Controller>, StoreError> {
        let epoch = store.next_epoch().await?;
        let mut state = ClusterState { timings, policy, started: Millis(0), epoch, ..Default::default() };
        for h in store.load_hosts().await? {
            state.hosts.insert(h.name.clone(), h);
        }
        for vm in store.load_vms().await? {
            state.vms.insert(vm.uuid.clone(), vm);
        }
        for op in store.fail_orphaned_operations(epoch).await? {
            let mut message = format!(
                "{} of {} ({} -> {}) was left unfinished by the controller of epoch {}; marked failed",
                op.kind, op.vm_name, op.source, op.target, op.epoch
            );
            // Whether that start happened nobody knows: the VM is not started anywhere else
            // until its target reports it (running or not) or is declared dead.
            if op.kind == "start"
                && let Some(vm) = state.vms.get_mut(&op.vm_uuid.to_string())
            {
                vm.recovery = Some(recovery::Recovery::in_doubt(&op.target, Millis(0)));
                message.push_str(&format!(
                    "; {} is not started elsewhere until {} reports it or is declared dead",
                    op.vm_name, op.target
                ));
            }
            store
                .append_event(&NewEvent {
                    subject_kind: "operation",
                    subject: op.id.to_string(),
                    kind: "operation_orphaned",
                    message,
                    actor: "controller".into(),
                })
                .await?;
        }
        store
            .append_event(&NewEvent {
                subject_kind: "controller",
                subject: format!("epoch {epoch}"),
                kind: "controller_started",
                message: format!(
                    "controller started with epoch {epoch}; {} hosts and {} VMs known; nothing is declared dead \
                     before it has held quorum for {} ms",
                    state.hosts.len(),
                    state.vms.len(),
                    timings.lease_ttl_ms + timings.fence_margin_ms
                ),
                actor: "controller".into(),
            })
            .await?;
        Ok(Arc::new(Controller {
            journal: Journal::start(store.clone()),
            store,
            epoch,
            migration,
            fence,
            origin: Instant::now(),
            state: Mutex::new(state),
            agents: Mutex::default(),
            ops: Mutex::default(),
            ended: Mutex::default(),
            deferred: Mutex::default(),
        }))
    }

    pub fn now(&self) -> Millis {
        Millis(self.origin.elapsed().as_millis() as u64)
    }

    pub fn timings(&self) -> Timings {
        self.read(|s| s.timings)
    }

    /// Reads the cluster state.
    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        f(&self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Changes the cluster state.
    pub fn update<R>(&self, f: impl FnOnce(&mut ClusterState) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Asks the engine what to do every tick, and does it. Runs for the controller's life.
    pub async fn run_ticks(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.expire_silent_operations().await;
            let now = self.now();
            let mut actions: Vec<Action> =
                std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|p| p.into_inner()));
            actions.extend(self.update(|s| {
                let mut a = recovery::tick(s, now);
                a.extend(drain::tick(s, now));
                a
            }));
            let work = self.perform(actions);
            tokio::pin!(work);
            loop {
                tokio::select! {
                    () = &mut work => break,
                    // Waiting for the database to record a restart is no hang.
                    () = tokio::time::sleep(Duration::from_secs(1)) => {
                        if self.database_trouble().is_some() {
                            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                        }
                    }
                }
            }
            // systemd's WatchdogSec: the decision loop still runs.
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }

    /// Why the database is not taking writes (`vmha status`); `None` while it is.
    pub fn database_trouble(&self) -> Option<String> {
        self.journal.trouble()
    }

    /// Waits until what this controller queued so far is written, for at most `limit`: a
    /// database that has just gone away is not waited for.
    pub async fn caught_up(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.journal.caught_up()).await;
    }

    /// Refuses an operator request that needs the database while it is known to be away,
    /// before anything is changed. `what`: the request, as in "protecting a VM".
    pub fn require_database(&self, what: &str) -> Result<(), Status> {
        match self.journal.trouble() {
            None => Ok(()),
            Some(why) => Err(Status::unavailable(format!(
                "database unavailable ({why}); {what} needs it, so nothing was done; {RETRY_LATER}"
            ))),
        }
    }

    /// Logs an event and queues it for the event log.
    pub fn event(
        &self,
        subject_kind: &'static str,
        subject: &str,
        kind: &'static str,
        message: String,
        actor: &str,
    ) {
        tracing::info!(subject = %subject, kind, "{message}");
        self.journal.write(Write::Event(NewEvent {
            subject_kind,
            subject: subject.into(),
            kind,
            message,
            actor: actor.into(),
        }));
    }

    /// Carries out the engine's actions, and those their immediate failures lead to. Actions
    /// that send a command wait for the database to record them.
    pub async fn perform(self: &Arc<Self>, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::DeclaredDead { host, cause } => {
                    self.event(
                        "host",
                        &host,
                        "host_dead",
                        format!("{host} declared dead: {cause}"),
                        "controller",
                    );
                    self.persist_vms_on(&host);
                }
                Action::Fence { host } => {
                    self.event(
                        "host",
                        &host,
                        "fencing",
                        format!("{host} lost its lease; running the fence command"),
                        "controller",
                    );
                    tokio::spawn(self.clone().fence(host));
                }
                Action::Start { vm_uuid, vm_name, host } => {
                    if let Err(why) = self.start_vm(&vm_uuid, &vm_name, &host).await {
                        let now = self.now();
                        queue.extend(
                            self.update(|s| recovery::start_finished(s, &vm_uuid, &host, Err(why), now)),
                        );
                    }
                }
                Action::Migrate { vm_uuid, vm_name, host, why } => {
                    let now = self.now();
                    let started = match self
                        .read(|s| vmha_engine::migration::plan_migration(s, &vm_uuid, &host, now))
                    {
                        Ok(plan) => {
                            if why == "failback" {
                                self.event(
                                    "vm",
                                    &vm_name,
                                    "failback",
                                    format!(
                                        "{vm_name}'s preferred host {host} is healthy again: moving it back"
                                    ),
                                    "controller",
                                );
                            }
                            self.start_migration(plan, why, None)
                                .await
                                .map(|_| ())
                                .map_err(|e| e.message().to_string())
                        }
                        Err(refusal) => Err(refusal.to_string()),
                    };
                    if let Err(e) = started {
                        tracing::warn!(vm = %vm_name, error = %e, why, "migration not started");
                        let now = self.now();
                        queue.extend(
                            self.update(|s| drain::migration_finished(s, &vm_uuid, &host, Err(e), now)),
                        );
                    }
                }
                Action::ColdRestart { vm_uuid, vm_name, from, to } => {
                    self.event(
                        "vm",
                        &vm_name,
                        "cold_restart",
                        format!("{vm_name} cannot be live-migrated off {from}; restarting it on {to} (--allow-restart)"),
                        "controller",
                    );
                    // Destroyed first; the start on `to` follows the destroy's result.
                    let cmd = command::Kind::Destroy(DestroyDomain { uuid: vm_uuid.clone() });
                    if let Err(why) =
                        self.send_operation("destroy", &vm_uuid, &vm_name, &from, &to, cmd, || true).await
                    {
                        let now = self.now();
                        queue.extend(
                            self.update(|s| drain::restart_finished(s, &vm_uuid, &to, Err(why), now)),
                        );
                    }
                }
                Action::DestroyStale { vm_uuid, vm_name, host } => {
                    let cmd = command::Kind::Destroy(DestroyDomain { uuid: vm_uuid.clone() });
                    if let Err(why) =
                        self.send_operation("destroy", &vm_uuid, &vm_name, &host, "", cmd, || true).await
                    {
                        self.event(
                            "vm",
                            &vm_name,
                            "stale_copy",
                            format!("could not destroy it on {host}: {why}"),
                            "controller",
                        );
                    }
                }
                Action::Event { subject_kind, subject, kind, message } => {
                    self.event(subject_kind, &subject, kind, message, "controller");
                }
            }
        }
    }

    /// Runs the fence command for `host` and hands its verdict to the engine.
    async fn fence(self: Arc<Self>, host: String) {
        let result = match &self.fence.command {
            None => Err("no --fence-command is configured".to_string()),
            Some(cmd) => {
                let run = tokio::process::Command::new(cmd).arg(&host).kill_on_drop(true).output();
                match tokio::time::timeout(self.fence.timeout, run).await {
                    Err(_) => Err(format!(
                        "{} {host} did not finish within {:?}",
                        cmd.display(),
                        self.fence.timeout
                    )),
                    Ok(Err(e)) => Err(format!("cannot run {}: {e}", cmd.display())),
                    Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .next()
                        .unwrap_or("exit 0")
                        .to_string()),
                    Ok(Ok(out)) => Err(format!(
                        "{} {host} exited with {}: {}",
                        cmd.display(),
                        out.status,
                        String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("")
                    )),
                }
            }
        };
        let now = self.now();
        let actions = self.update(|s| recovery::fence_finished(s, &host, result, now));
        // Carried out by the tick loop (a task spawned by `perform` cannot await `perform`).
        self.deferred.lock().unwrap_or_else(|p| p.into_inner()).extend(actions);
    }

    /// Queues a write that no snapshot of the state is needed for (see `persist_vm`).
    pub fn write(&self, write: Write) {
        self.journal.write(write);
    }

    /// Queues a host's admin state (a drain may just have put it in maintenance).
    pub fn persist_admin(&self, host: &str) {
        self.read(|s| s.hosts.get(host).map(|h| self.journal.write(Write::HostAdmin(h.clone()))));
    }

    /// Queues a host's fencing mode.
    pub fn persist_fencing(&self, host: &str) {
        self.read(|s| {
            s.hosts
                .get(host)
                .map(|h| self.journal.write(Write::Fencing { host: h.name.clone(), mode: h.fencing.clone() }))
        });
    }

    /// Queues a VM's observed and desired state (an operator changed the latter).
    pub fn persist_vm(&self, uuid: &str) {
        // Under the state lock, like every VM snapshot queued: the queue then holds them in
        // the order the state changed, and the database never sees an older one after a newer.
        self.read(|s| {
            if let Some(vm) = s.vms.get(uuid) {
                self.journal.write(Write::vm(vm));
                self.journal.write(Write::protection(vm));
            }
        });
    }

    /// An operation whose agent never reports (it restarted mid-command, its host was cut off
    /// for good) is failed after the migration timeout plus a grace, so the VM is not held
    /// busy forever; heartbeats then show where it really is.
    async fn expire_silent_operations(self: &Arc<Self>) {
        let limit = chrono::Duration::from_std(self.migration.timeout + self.migration.result_grace)
            .unwrap_or(chrono::Duration::MAX);
        let now = chrono::Utc::now();
        let silent: Vec<Operation> = self
            .active_operations()
            .into_iter()
            .filter(|op| {
                chrono::DateTime::parse_from_rfc3339(&op.created_at)
                    .is_ok_and(|t| now.signed_duration_since(t) > limit)
            })
            // A start with no result may still happen (a hung libvirtd holds it): the engine
            // waits for its host to report the VM or to be declared dead, never for a clock.
            .filter(|op| {
                op.kind != "start"
                    || !self.read(|s| s.vms.get(&op.vm_uuid).is_some_and(|v| v.awaits_start_on(&op.target)))
            })
            .collect();
        for op in silent {
            let host = executor(&op).to_string();
            let r = OperationResult {
                operation_id: op.id.clone(),
                ok: false,
                error: format!(
                    "no result from the agent on {host} within {} s; it may have restarted mid-command",
                    limit.num_seconds()
                ),
                ..Default::default()
            };
            if let Err(e) = self.result(&host, r).await {
                tracing::warn!(operation = %op.id, error = %e.message(), "expiring a silent operation");
            }
        }
    }

    /// Operations in flight, for `vmha status` and drain progress.
    pub fn active_operations(&self) -> Vec<Operation> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).values().map(|tx| tx.borrow().clone()).collect()
    }

    fn persist_vms_on(&self, host: &str) {
        self.read(|s| {
            for vm in s.vms.values().filter(|v| v.host.as_deref() == Some(host)) {
                self.journal.write(Write::vm(vm));
            }
        });
    }

    /// Queues the VMs that changed, as they are now, and one event per observable change.
    pub fn persist_inventory(&self, changes: Vec<InventoryChange>, actor: &str) {
        if changes.is_empty() {
            return;
        }
        // Under the state lock: see `persist_vm`.
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for change in changes {
            if let InventoryChange::Vanished { uuid, name, from, forgotten: true } = &change {
                self.journal.write(Write::DeleteVm { uuid: uuid.clone() });
                let message =
                    format!("{name} is no longer defined on {from} nor reported by any host: forgotten");
                self.event("vm", name, "vm_forgotten", message, actor);
                continue;
            }
            let Some(vm) = s.vms.get(change.uuid()) else { continue };
            if let Some(h) = &vm.host {
                // The hosts table is the foreign key's target; a report can name a host that
                // registered after this controller loaded its state.
                if !s.hosts.contains_key(h) {
                    continue;
                }
            }
            self.journal.write(Write::vm(vm));
            let (kind, message) = match &change {
                InventoryChange::Appeared { name, host, state, .. } => {
                    ("vm_discovered", format!("{name} found {} on {host}", state.as_str()))
                }
                InventoryChange::Moved { name, from, to, .. } => {
                    ("vm_moved", format!("{name} now runs on {to} (was on {from})"))
                }
                InventoryChange::StateChanged { name, host, from, to, .. } => {
                    ("vm_state", format!("{name} on {host} is now {} (was {})", to.as_str(), from.as_str()))
                }
                InventoryChange::Vanished { name, from, .. } => {
                    ("vm_vanished", format!("{name} is no longer reported by {from}"))
                }
                // after_report writes its event, with what is done about it.
                InventoryChange::Updated { .. } | InventoryChange::TwoCopies { .. } => continue,
            };
            self.event("vm", &vm.name, kind, message, actor);
        }
    }

    /// Opens the command stream for `host`'s agent, replacing any earlier one.
    pub fn connect_agent(&self, host: &str) -> mpsc::Receiver<Result<Command, Status>> {
        let (tx, rx) = mpsc::channel(64);
        self.agents.lock().unwrap_or_else(|p| p.into_inner()).insert(host.into(), tx);
        rx
    }

    async fn send_command(&self, host: &str, cmd: Command) -> Result<(), String> {
        let tx = self.agents.lock().unwrap_or_else(|p| p.into_inner()).get(host).cloned();
        let Some(tx) = tx else {
            return Err(format!(
                "the agent on {host} has no command stream open; is vmha-agent running there?"
            ));
        };
        tx.send(Ok(cmd)).await.map_err(|_| format!("the agent on {host} disconnected"))
    }

    /// Writes an operation down, then sends its command to the host that carries it out, if
    /// `still_wanted` holds once it is recorded: the engine may have moved on while the database
    /// was away (the host came back with the VM, or was declared dead). On a send failure the
    /// operation is recorded as failed and the reason returned.
    #[allow(clippy::too_many_arguments)]
    async fn send_operation(
        &self,
        kind: &str,
        vm_uuid: &str,
        vm_name: &str,
        source: &str,
        target: &str,
        cmd: command::Kind,
        still_wanted: impl Fn() -> bool,
    ) -> Result<Operation, String> {
        let uuid = Uuid::parse_str(vm_uuid).map_err(|e| e.to_string())?;
        let row = OperationRow::pending(kind, uuid, vm_name, source, target, self.epoch);
        let id = row.id;
        let (tx, _) = watch::channel(views::operation(&row));
        // While the database is away this waits for it: failing instead would count as a
        // failed start or migration, and send the engine to the next host for nothing.
        self.journal
            .record(Write::Operation(row))
            .await
            .map_err(|e| format!("the database refused to record the operation: {e}"))?;
        if !still_wanted() {
            let outcome = OperationOutcome {
                state: "aborted",
                error: "no longer wanted once recorded (the cluster changed while the database was away)"
                    .into(),
                ..Default::default()
            };
            self.journal.write(Write::OperationFinished { id, outcome });
            return Ok(tx.borrow().clone());
        }
        let view = tx.borrow().clone();
        let runs_on = executor(&view).to_string();
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        let cmd = Command { operation_id: id.to_string(), epoch: self.epoch, kind: Some(cmd) };
        if let Err(why) = self.send_command(&runs_on, cmd).await {
            self.ops.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            let failed = OperationOutcome { state: "failed", error: why.clone(), ..Default::default() };
            self.journal.write(Write::OperationFinished { id, outcome: failed });
            return Err(why);
        }
        self.journal.write(Write::OperationRunning(id));
        self.modify_op(id, |op| {
            if op.state == "pending" {
                op.state = "running".into();
            }
        });
        Ok(self.watch_operation(id).map(|rx| rx.borrow().clone()).unwrap_or(view))
    }

    /// A restart after a host failure: define and start the VM on `host`.
    async fn start_vm(&self, vm_uuid: &str, vm_name: &str, host: &str) -> Result<(), String> {
        let (xml, from) = self.read(|s| {
            let vm = s.vms.get(vm_uuid);
            (
                vm.map(|v| v.xml.clone()).unwrap_or_default(),
                vm.and_then(|v| v.host.clone()).unwrap_or_default(),
            )
        });
        self.event(
            "vm",
            vm_name,
            "restart_started",
            format!("starting {vm_name} on {host} (was on {from})"),
            "controller",
        );
        let cmd = command::Kind::Start(StartDomain { xml });
        let still_wanted = || self.read(|s| s.vms.get(vm_uuid).is_some_and(|v| v.awaits_start_on(host)));
        self.send_operation("start", vm_uuid, vm_name, &from, host, cmd, still_wanted).await.map(|_| ())
    }

    /// Writes the migration down, then sends it to the source agent.
    /// `overrides`: bandwidth (MiB/s) and timeout for this migration instead of the defaults.
    pub async fn start_migration(
        &self,
        plan: MigrationPlan,
        actor: &str,
        overrides: Option<(u64, Duration)>,
    ) -> Result<Operation, Status> {
        let claim = format!("migration to {}", plan.target);
        let claimed = self.update(|s| match s.vms.get_mut(&plan.vm_uuid) {
            Some(vm) if vm.busy_with.is_none() => {
                vm.busy_with = Some(claim);
                true
            }
            _ => false,
        });
        if !claimed {
            return Err(Status::failed_precondition(format!(
                "VM {} is busy with another operation; wait for it (`vmha events`) and retry",
                plan.vm_name
            )));
        }
        self.event(
            "vm",
            &plan.vm_name,
            "migration_requested",
            format!("live migration of {} from {} to {} requested", plan.vm_name, plan.source, plan.target),
            actor,
        );
        let cmd = command::Kind::Migrate(MigrateDomain {
            uuid: plan.vm_uuid.clone(),
            dest_uri: plan.target_uri.clone(),
            auto_converge: self.migration.auto_converge,
            bandwidth_mib_s: overrides.map_or(self.migration.bandwidth_mib_s, |o| o.0),
            timeout_ms: overrides.map_or(self.migration.timeout, |o| o.1).as_millis() as u64,
            postcopy: self.migration.postcopy,
            max_downtime_ms: self.migration.max_downtime_ms,
        });
        match self
            .send_operation("migrate", &plan.vm_uuid, &plan.vm_name, &plan.source, &plan.target, cmd, || true)
            .await
        {
            Ok(op) => Ok(op),
            Err(why) => {
                self.release(&plan.vm_uuid);
                let message = format!(
                    "live migration of {} from {} to {} failed: {why}; {} stays on {}",
                    plan.vm_name, plan.source, plan.target, plan.vm_name, plan.source
                );
                self.event("vm", &plan.vm_name, "migration_failed", message.clone(), "controller");
                Err(Status::unavailable(message))
            }
        }
    }

    fn release(&self, vm_uuid: &str) {
        self.update(|s| {
            if let Some(vm) = s.vms.get_mut(vm_uuid) {
                vm.busy_with = None;
            }
        });
    }

    fn modify_op(&self, id: Uuid, f: impl FnOnce(&mut Operation)) {
        if let Some(tx) = self.ops.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            tx.send_modify(f);
        }
    }

    /// The in-flight operation's live view; `None` once it has ended (read the store then).
    pub fn watch_operation(&self, id: Uuid) -> Option<watch::Receiver<Operation>> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|tx| tx.subscribe())
    }

    /// The final state of an operation that ended lately.
    pub fn ended_operation(&self, id: Uuid) -> Option<Operation> {
        let id = id.to_string();
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).iter().rev().find(|op| op.id == id).cloned()
    }

    /// The operation, if `host` is the one that carries it out.
    fn check_reporter(&self, host: &str, id: &str) -> Result<Operation, Status> {
        let id = Uuid::parse_str(id)
            .map_err(|_| Status::invalid_argument(format!("'{id}' is not an operation id")))?;
        let op = self.ops.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|tx| tx.borrow().clone());
        match op {
            Some(op) if executor(&op) == host => Ok(op),
            Some(_) => Err(Status::permission_denied(format!("operation {id} does not run on {host}"))),
            None => Err(Status::not_found(format!("operation {id} is not in flight"))),
        }
    }

    pub async fn progress(&self, host: &str, p: OperationProgress) -> Result<(), Status> {
        let op = self.check_reporter(host, &p.operation_id)?;
        let id = Uuid::parse_str(&op.id).expect("checked");
        self.modify_op(id, |op| {
            op.data_total = p.data_total;
            op.data_processed = p.data_processed;
            op.data_remaining = p.data_remaining;
            op.elapsed_ms = p.elapsed_ms;
        });
        self.journal.write(Write::OperationProgress {
            id,
            total: p.data_total,
            processed: p.data_processed,
            remaining: p.data_remaining,
        });
        Ok(())
    }

    /// Records how an operation ended, tells the engine and the followers.
    pub async fn result(self: &Arc<Self>, host: &str, r: OperationResult) -> Result<(), Status> {
        let op = self.check_reporter(host, &r.operation_id)?;
        let id = Uuid::parse_str(&op.id).expect("checked");
        let o = OperationOutcome {
            state: if r.ok { "succeeded" } else { "failed" },
            error: r.error,
            elapsed_ms: r.elapsed_ms,
            downtime_ms: r.downtime_ms,
            bytes: r.bytes,
        };
        self.journal.write(Write::OperationFinished { id, outcome: o.clone() });
        let ok = r.ok;
        let now = self.now();
        match op.kind.as_str() {
            "migrate" => {
                if ok {
                    let change = self.update(|s| inventory::apply_migrated(s, &op.vm_uuid, &op.target));
                    self.persist_inventory(change.into_iter().collect(), "controller");
                }
                self.release(&op.vm_uuid);
                let message = if ok {
                    format!(
                        "{} live-migrated from {} to {} in {} ms (downtime {} ms, {} MiB sent)",
                        op.vm,
                        op.source,
                        op.target,
                        o.elapsed_ms,
                        o.downtime_ms,
                        o.bytes >> 20
                    )
                } else {
                    format!(
                        "live migration of {} from {} to {} failed: {}; {} stays on {}",
                        op.vm, op.source, op.target, o.error, op.vm, op.source
                    )
                };
                let kind = if ok { "migration_succeeded" } else { "migration_failed" };
                self.event("vm", &op.vm, kind, message, "controller");
                let verdict = if ok { Ok(()) } else { Err(o.error.clone()) };
                let actions =
                    self.update(|s| drain::migration_finished(s, &op.vm_uuid, &op.target, verdict, now));
                self.persist_admin(&op.source);
                self.perform(actions).await;
            }
            "start" => {
                let verdict = if ok { Ok(()) } else { Err(o.error.clone()) };
                let actions = self.update(|s| {
                    let mut a = recovery::start_finished(s, &op.vm_uuid, &op.target, verdict.clone(), now);
                    a.extend(drain::restart_finished(s, &op.vm_uuid, &op.target, verdict, now));
                    a
                });
                self.persist_vms_on(&op.target);
                self.perform(actions).await;
            }
            "destroy" if !op.target.is_empty() => {
                // The first half of a cold restart.
                let started = match ok {
                    true => self.start_vm(&op.vm_uuid, &op.vm, &op.target).await,
                    false => Err(format!(
                        "destroying it on {} failed: {}; it keeps running there",
                        op.source, o.error
                    )),
                };
                if let Err(why) = started {
                    let actions =
                        self.update(|s| drain::restart_finished(s, &op.vm_uuid, &op.target, Err(why), now));
                    self.perform(actions).await;
                }
            }
            _ => {
                let message = if ok {
                    format!("{} of {} on {} done", op.kind, op.vm, op.source)
                } else {
                    format!("{} of {} on {} failed: {}", op.kind, op.vm, op.source, o.error)
                };
                self.event("vm", &op.vm, "operation_done", message, "controller");
            }
        }
        let tx = self.ops.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        if let Some(tx) = tx {
            tx.send_modify(|v| {
                v.state = o.state.into();
                v.error = o.error.clone();
                v.elapsed_ms = o.elapsed_ms;
                v.downtime_ms = o.downtime_ms;
                v.bytes = o.bytes;
            });
            let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
            if ended.len() == ENDED_KEPT {
                ended.pop_front();
            }
            ended.push_back(tx.borrow().clone());
        }
        Ok(())
    }
}
