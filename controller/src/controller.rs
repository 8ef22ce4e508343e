//! The controller's shell, a thin loop around the engine: every input (a heartbeat, an
//! operation's result, a fence verdict, an operator's request, the clock) goes through
//! `Controller::step`, which runs `vmha_engine::Engine::step`, queues what the output says to
//! persist, and then carries out the rest: operations are recorded and only then sent, fence
//! commands run, and the reply goes back. Decisions are made in the engine, never here.
//!
//! PostgreSQL is written behind (`journal`): nothing that grants a lease waits for it, so an
//! outage of the database fences nobody. What must be on record before it is done (an
//! operation, before its command is sent) waits for the database instead, and operator
//! requests that need it are refused with `Unavailable` while it is known to be away.
//!
//! One task owns the engine (`DecisionLoop`): handlers send it their input and wait for the
//! reply, reads run on it too, and nothing else can touch the state. A panic anywhere ends the
//! process (see `main.rs`): systemd restarts it, and the new controller resumes from the
//! database, so no half-made step is ever used and no task keeps serving without ticks.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;
use vmha_engine::event::{Event, Subject};
use vmha_engine::operation::{OpId, OpState, Operation};
use vmha_engine::step::{CommandKind, Input, Output, Reply};
use vmha_engine::{ClusterState, Engine, Millis, Policy, Timings};
use vmha_proto::v1 as pb;

use crate::errors::Error;
use crate::journal::{Journal, Write};
use crate::leadership::Leadership;
use crate::metrics::METRICS;
use crate::store::{NewEvent, Store, StoreError, op_uuid, retry_while_unreachable};
use crate::views;

/// Defaults for live migrations the controller starts (their timeout is the engine's policy:
/// its deadlines count on it).
#[derive(Clone, Debug)]
pub struct MigrationSettings {
    pub auto_converge: bool,
    pub bandwidth_mib_s: u64,
    pub postcopy: bool,
    pub max_downtime_ms: u64,
}

/// The external fence command (fencing mode `external`): run with the host name as its one
/// argument; exit status 0 means the host is confirmed off.
#[derive(Clone, Debug)]
pub struct FenceSettings {
    pub command: Option<PathBuf>,
    pub timeout: Duration,
}

type AgentSender = mpsc::Sender<Result<pb::Command, Status>>;

/// How often the engine is asked whether to declare a host dead or start a waiting VM.
const TICK: Duration = Duration::from_millis(100);

/// How many inputs and reads may wait for the decision loop. Beyond it, callers wait to hand
/// theirs in: a flood of requests slows its senders, it does not grow the controller's memory.
/// Each connection has at most `validate::caps::REQUESTS_PER_CONNECTION` requests in flight.
const INBOX: usize = 4096;

/// How many ended operations are kept in memory for `WatchOperation`.
const ENDED_KEPT: usize = 256;

pub struct Controller {
    /// For reads; every write goes through `journal`.
    pub store: Store,
    journal: Journal,
    pub epoch: u64,
    /// Until when this controller may act (see `leadership`).
    leadership: Arc<Leadership>,
    pub migration: MigrationSettings,
    pub fence: FenceSettings,
    origin: Instant,
    pub timings: Timings,
    /// The decision loop's input.
    inbox: mpsc::Sender<Msg>,
    /// Command streams of connected agents, by host.
    agents: Mutex<HashMap<String, AgentSender>>,
    /// The operations in flight: who carries each out (and alone may report on it), and its
    /// live view for `WatchOperation` followers and progress.
    watched: Mutex<HashMap<OpId, Followed>>,
    /// The last operations that ended, newest last: a follower that comes just after the end
    /// is answered from here, since the final state may still be queued for the database.
    ended: Mutex<VecDeque<pb::Operation>>,
    /// Bumped whenever a host's work (a drain's steps) or an operation's progress changes:
    /// what `WatchDrain` followers wait for.
    work_changed: watch::Sender<u64>,
    /// When each registered agent's certificate expires (seconds since the Unix epoch), for
    /// `vmha host ls`: read from the certificate it registered with.
    host_certs: Mutex<HashMap<String, i64>>,
}

/// An operation in flight, as the shell follows it.
struct Followed {
    executor: String,
    view: watch::Sender<pb::Operation>,
}

impl Followed {
    fn new(op: &Operation, epoch: u64) -> Followed {
        Followed {
            executor: op.executor().to_string(),
            view: watch::channel(views::operation_in_flight(op, epoch)).0,
        }
    }
}

/// What the decision loop is asked.
enum Msg {
    /// An input, and where its reply goes (none: the sender does not wait).
    Step(Box<Input>, Option<oneshot::Sender<Reply>>),
    /// A read of the state, run on the loop.
    Read(Box<dyn FnOnce(&Engine) + Send>),
    /// A copy of the state, for a read too heavy for the loop (`Controller::view`).
    Snapshot(oneshot::Sender<Arc<ClusterState>>),
}

/// How old a copy of the state may be when it is handed out again: heavy reads (status,
/// capacity, listings) cost the loop one copy per this much time, however many ask.
const SNAPSHOT_REUSE: Duration = Duration::from_millis(100);

/// The one task that owns the engine: it takes inputs and reads in the order they come, and
/// ticks the clock.
pub struct DecisionLoop {
    engine: Engine,
    inbox: mpsc::Receiver<Msg>,
    /// The last copy handed out, and when it was made; dropped by an operator's change, so
    /// that a listing after `vmha protect` shows it.
    snapshot: Option<(Arc<ClusterState>, Instant)>,
}

impl DecisionLoop {
    /// Runs for the controller's life (until every sender is gone).
    pub async fn run(mut self, c: Arc<Controller>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = self.inbox.recv() => match msg {
                    None => return,
                    // A leader that can no longer prove it holds the lock decides nothing (it is
                    // deposed within moments); the caller hears that the loop is gone.
                    Some(Msg::Step(..)) if !c.leadership.acting() => {}
                    Some(Msg::Step(input, reply)) => {
                        if matches!(*input, Input::Operator { .. }) {
                            self.snapshot = None;
                        }
                        let r = c.run_step(&mut self.engine, *input);
                        if let Some(tx) = reply {
                            let _ = tx.send(r);
                        }
                    }
                    Some(Msg::Read(f)) => f(&self.engine),
                    Some(Msg::Snapshot(tx)) => {
                        let fresh = self.snapshot.as_ref().filter(|(_, at)| at.elapsed() < SNAPSHOT_REUSE);
                        let copy = match fresh {
                            Some((copy, _)) => copy.clone(),
                            None => {
                                let copy = Arc::new(self.engine.cluster.clone());
                                self.snapshot = Some((copy.clone(), Instant::now()));
                                copy
                            }
                        };
                        let _ = tx.send(copy);
                    }
                },
                _ = tick.tick() => {
                    if !c.leadership.acting() {
                        continue;
                    }
                    c.run_step(&mut self.engine, Input::Tick);
                    // systemd's WatchdogSec: the decision loop still runs.
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            }
        }
    }
}

/// Locks a mutex of the shell (agents' streams, operation followers). A panic ends the process
/// (see `main.rs`), so a poisoned lock is never seen by a live controller; taking it anyway
/// keeps this free of `unwrap`.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a new leader of `epoch` restores (`Engine::restore`) from the database: the cluster
/// as stored, on a clock that starts at 0, and the operations an earlier leader left unfinished.
pub async fn load(
    store: &Store,
    timings: Timings,
    policy: Policy,
    epoch: u64,
) -> Result<(ClusterState, Vec<Operation>), StoreError> {
    let unwatched_before_ms = store.last_led_ms_ago().await?.unwrap_or(0);
    let mut cluster = ClusterState {
        timings,
        policy,
        started: Millis(0),
        epoch,
        unwatched_before_ms,
        ..Default::default()
    };
    for h in store.load_hosts().await? {
        cluster.hosts.insert(h.name.clone(), h);
    }
    for mut vm in store.load_vms().await? {
        // Which VM each disk belongs to is read again from the definitions, so that a
        // host cannot claim one between a takeover and its VM's next report.
        vm.disks = crate::domain_xml::disks(&vm.xml);
        cluster.vms.insert(vm.uuid.clone(), vm);
    }
    Ok((cluster, store.unfinished_operations().await?))
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
        leadership: Arc<Leadership>,
    ) -> Result<(Arc<Controller>, DecisionLoop), StoreError> {
        let waiting = |e: &StoreError, pause: Duration| {
            tracing::warn!(
                error = %e,
                "PostgreSQL is unreachable; the controller starts once it is (next try in {pause:?})"
            )
        };
        let base = retry_while_unreachable(|| Store::open(database_url), waiting).await?;
        retry_while_unreachable(
            || async {
                let epoch = base.next_epoch().await?;
                let store = Store::open_for_epoch(database_url, epoch).await?;
                let settings = (migration.clone(), fence.clone(), leadership.clone());
                Controller::start(store, epoch, timings, policy, settings).await
            },
            waiting,
        )
        .await
    }

    /// Loads desired state and the work an earlier controller left in progress, and resumes it
    /// with `epoch` (just taken) once the returned loop runs. `store` writes for that epoch.
    async fn start(
        store: Store,
        epoch: u64,
        timings: Timings,
        policy: Policy,
        (migration, fence, leadership): (MigrationSettings, FenceSettings, Arc<Leadership>),
    ) -> Result<(Arc<Controller>, DecisionLoop), StoreError> {
        let (cluster, unfinished) = load(&store, timings, policy, epoch).await?;
        let (engine, resumed) = Engine::restore(cluster, unfinished, Millis(0));
        let mut db = store.connection().await?;
        for e in &resumed {
            log_event(e);
            Store::append_event(&mut db, &new_event(e)).await?;
        }
        let watched = engine.ops.values().map(|op| (op.id, Followed::new(op, epoch))).collect();
        let (inbox, rx) = mpsc::channel(INBOX);
        let controller = Arc::new(Controller {
            journal: Journal::start(store.clone()),
            store,
            epoch,
            leadership,
            migration,
            fence,
            origin: Instant::now(),
            timings,
            inbox,
            agents: Mutex::default(),
            host_certs: Mutex::default(),
            work_changed: watch::channel(0).0,
            watched: Mutex::new(watched),
            ended: Mutex::default(),
        });
        Ok((controller, DecisionLoop { engine, inbox: rx, snapshot: None }))
    }

    pub fn now(&self) -> Millis {
        Millis(self.origin.elapsed().as_millis() as u64)
    }

    /// `t` on this leader's clock.
    pub fn millis_at(&self, t: std::time::Instant) -> Millis {
        Millis(t.saturating_duration_since(self.origin).as_millis() as u64)
    }

    /// Reads the cluster state, on the decision loop.
    pub async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&ClusterState) -> R + Send + 'static,
    ) -> Result<R, Error> {
        let (tx, rx) = oneshot::channel();
        let read = Box::new(move |e: &Engine| {
            let _ = tx.send(f(&e.cluster));
        });
        self.inbox.send(Msg::Read(read)).await.map_err(|_| Error::LoopGone)?;
        rx.await.map_err(|_| Error::LoopGone)
    }

    /// `read` for what is heavy (status, capacity, listings): `f` runs off the decision loop,
    /// on a copy of the state at most `SNAPSHOT_REUSE` old (or as of the last operator change),
    /// so that heartbeats are never queued behind it.
    pub async fn view<R: Send + 'static>(
        &self,
        f: impl FnOnce(&ClusterState) -> R + Send + 'static,
    ) -> Result<R, Error> {
        let (tx, rx) = oneshot::channel();
        self.inbox.send(Msg::Snapshot(tx)).await.map_err(|_| Error::LoopGone)?;
        let copy = rx.await.map_err(|_| Error::LoopGone)?;
        tokio::task::spawn_blocking(move || f(&copy)).await.map_err(|_| Error::LoopGone)
    }

    /// Hands an input to the decision loop and waits for the reply.
    pub async fn step(&self, input: Input) -> Result<Reply, Error> {
        let (tx, rx) = oneshot::channel();
        self.inbox.send(Msg::Step(Box::new(input), Some(tx))).await.map_err(|_| Error::LoopGone)?;
        rx.await.map_err(|_| Error::LoopGone)
    }

    /// Hands an input to the decision loop without waiting for its reply. Never from the loop
    /// itself: with the inbox full, it would wait for itself.
    async fn submit(&self, input: Input) {
        let _ = self.inbox.send(Msg::Step(Box::new(input), None)).await;
    }

    /// One step of the engine, and the steps its immediate failures lead to (a command that
    /// could not be sent is a failed operation); carries out their output. On the loop only.
    fn run_step(self: &Arc<Self>, engine: &mut Engine, input: Input) -> Reply {
        let mut queue = VecDeque::from([input]);
        let mut first = None;
        while let Some(input) = queue.pop_front() {
            let (kind, started) = (input_kind(&input), std::time::Instant::now());
            let out = engine.step(input, self.now());
            let took = started.elapsed();
            if took > SLOW_STEP {
                // Every input waits behind this one, heartbeats included: worth a line.
                tracing::warn!(input = kind, took_ms = took.as_millis() as u64, "slow decision step");
            }
            // Queued in the order the state changed: the database never sees an older row
            // after a newer one.
            let recording = self.persist(engine, &out);
            let reply = self.carry_out(out, recording, &mut queue);
            first.get_or_insert(reply);
        }
        first.unwrap_or(Reply::None)
    }

    /// Queues what the step changed; returns the writes of new operations to wait for.
    fn persist(&self, engine: &Engine, out: &Output) -> Vec<(OpId, String, RecordFuture)> {
        let s = &engine.cluster;
        let p = &out.persist;
        for write in Write::persisted(s, p) {
            self.journal.write(write);
        }
        if !p.host_work.is_empty() {
            self.work_changed.send_modify(|n| *n += 1);
        }
        for host in &p.removed_hosts {
            lock(&self.host_certs).remove(host);
        }
        for e in &out.events {
            METRICS.event(s, e);
            log_event(e);
            self.journal.write(Write::Event(new_event(e)));
        }
        for mark in &out.outages {
            METRICS.outage(mark);
            self.journal.write(Write::Outage { mark: mark.clone(), at: chrono::Utc::now() });
        }
        let mut recording = Vec::new();
        for op in &p.ops {
            let write = Write::operation(op, self.epoch);
            if op.state == OpState::Recording {
                let written = self.journal.record(write);
                recording.push((op.id, op.executor().to_string(), Box::pin(written) as RecordFuture));
            } else {
                if op.state.ended() {
                    METRICS.operation_ended(op);
                }
                self.journal.write(write);
            }
        }
        recording
    }

    /// Everything of a step's output but persisting: follower views, recording then sending,
    /// fencing.
    fn carry_out(
        self: &Arc<Self>,
        out: Output,
        recording: Vec<(OpId, String, RecordFuture)>,
        queue: &mut VecDeque<Input>,
    ) -> Reply {
        for op in &out.persist.ops {
            self.follow(op);
        }
        if !recording.is_empty() {
            let c = self.clone();
            // Waits for the database, however long it is away; the step that follows decides
            // whether the command is still wanted then. One task, in the order the engine
            // recorded them: commands go out in the engine's order (restarts by priority).
            tokio::spawn(async move {
                for (id, host, written) in recording {
                    let input = match written.await {
                        Ok(()) => Input::Recorded(id),
                        Err(e) => Input::Result {
                            host,
                            id,
                            result: Err(format!("the database refused to record the operation: {e}")),
                        },
                    };
                    c.submit(input).await;
                }
            });
        }
        for cmd in out.commands {
            if let Err(why) = self.send(&cmd.host, self.command(cmd.op, cmd.vm, cmd.kind)) {
                queue.push_back(Input::Result { host: cmd.host, id: cmd.op, result: Err(why) });
            }
        }
        for host in out.fence {
            tokio::spawn(self.clone().run_fence(host));
        }
        out.reply
    }

    /// Updates the view followers of an operation see; an ended one moves to `ended`.
    fn follow(&self, op: &Operation) {
        let mut watched = lock(&self.watched);
        let view = views::operation_in_flight(op, self.epoch);
        if op.state.ended() {
            if let Some(Followed { view: tx, .. }) = watched.remove(&op.id) {
                tx.send_modify(|v| {
                    v.state = view.state.clone();
                    v.error = view.error.clone();
                    v.elapsed_ms = view.elapsed_ms;
                    v.downtime_ms = view.downtime_ms;
                    v.bytes = view.bytes;
                });
                let mut ended = lock(&self.ended);
                if ended.len() == ENDED_KEPT {
                    ended.pop_front();
                }
                ended.push_back(tx.borrow().clone());
            }
        } else {
            match watched.get(&op.id) {
                Some(f) => f.view.send_modify(|v| v.state = view.state.clone()),
                None => {
                    watched.insert(op.id, Followed::new(op, self.epoch));
                }
            }
        }
    }

    fn command(&self, op: OpId, vm_name: String, kind: CommandKind) -> pb::Command {
        use pb::command::Kind;
        let m = &self.migration;
        let kind = match kind {
            CommandKind::Start { xml, uuid } => Kind::Start(pb::StartDomain { xml, uuid }),
            CommandKind::Destroy { uuid } => Kind::Destroy(pb::DestroyDomain { uuid }),
            CommandKind::Shutdown { uuid, timeout_ms } => {
                Kind::Shutdown(pb::ShutdownDomain { uuid, timeout_ms })
            }
            CommandKind::Cancel { uuid } => Kind::Cancel(pb::CancelJob { uuid }),
            CommandKind::Reset { uuid, hard } => Kind::Reset(pb::ResetDomain { uuid, hard }),
            CommandKind::Migrate { uuid, dest_uri, bandwidth_mib_s, timeout_ms } => {
                Kind::Migrate(pb::MigrateDomain {
                    uuid,
                    dest_uri,
                    auto_converge: m.auto_converge,
                    bandwidth_mib_s: bandwidth_mib_s.unwrap_or(m.bandwidth_mib_s),
                    timeout_ms,
                    postcopy: m.postcopy,
                    max_downtime_ms: m.max_downtime_ms,
                })
            }
        };
        pb::Command { operation_id: op.to_string(), epoch: self.epoch, vm_name, kind: Some(kind) }
    }

    /// Hands a command to the agent's stream without waiting: a full or closed stream is a
    /// failed send.
    fn send(&self, host: &str, cmd: pb::Command) -> Result<(), String> {
        let tx = lock(&self.agents).get(host).cloned();
        let Some(tx) = tx else {
            return Err(format!(
                "the agent on {host} has no command stream open; is vmha-agent running there?"
            ));
        };
        tx.try_send(Ok(cmd)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => format!("the agent on {host} is not taking commands"),
            mpsc::error::TrySendError::Closed(_) => format!("the agent on {host} disconnected"),
        })
    }

    /// Why the database is not taking writes (`vmha status`); `None` while it is.
    pub fn database_trouble(&self) -> Option<String> {
        self.journal.trouble()
    }

    /// Waits until what this controller queued so far is written, for at most `limit`: a
    /// database that has just gone away is not waited for. False: not written yet.
    pub async fn caught_up(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.journal.caught_up()).await.is_ok()
    }

    /// Refuses an operator request that needs the database while it is known to be away,
    /// before anything is changed. `what`: the request, as in "protecting a VM".
    pub fn require_database(&self, what: &str) -> Result<(), Error> {
        match self.journal.trouble() {
            None => Ok(()),
            Some(why) => Err(Error::DatabaseAway { what: what.into(), why }),
        }
    }

    /// `write`, and waits until the database has it (an error: it refused it).
    pub fn record(&self, write: Write) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        self.journal.record(write)
    }

    /// Queues a write outside a step (a host's registration facts).
    pub fn write(&self, write: Write) {
        self.journal.write(write);
    }

    /// Logs an event of the shell's own (not a decision) and queues it for the event log.
    pub fn event(&self, e: Event) {
        log_event(&e);
        self.journal.write(Write::Event(new_event(&e)));
    }

    /// Runs the fence command for `host` and hands its verdict to the engine.
    async fn run_fence(self: Arc<Self>, host: String) {
        let (verdict, result) = match &self.fence.command {
            None => ("failed", Err("no --fence-command is configured".to_string())),
            Some(cmd) => {
                let run = tokio::process::Command::new(cmd).arg(&host).kill_on_drop(true).output();
                match tokio::time::timeout(self.fence.timeout, run).await {
                    Err(_) => (
                        "timed_out",
                        Err(format!(
                            "{} {host} did not finish within {:?}",
                            cmd.display(),
                            self.fence.timeout
                        )),
                    ),
                    Ok(Err(e)) => ("failed", Err(format!("cannot run {}: {e}", cmd.display()))),
                    Ok(Ok(out)) if out.status.success() => (
                        "succeeded",
                        Ok(String::from_utf8_lossy(&out.stdout)
                            .lines()
                            .next()
                            .unwrap_or("exit 0")
                            .to_string()),
                    ),
                    Ok(Ok(out)) => (
                        "failed",
                        Err(format!(
                            "{} {host} exited with {}: {}",
                            cmd.display(),
                            out.status,
                            String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("")
                        )),
                    ),
                }
            }
        };
        METRICS.fence_command(verdict);
        self.submit(Input::FenceResult { host, result }).await;
    }

    pub fn set_host_cert_expiry(&self, host: &str, not_after: i64) {
        lock(&self.host_certs).insert(host.into(), not_after);
    }

    pub fn host_cert_expiry(&self, host: &str) -> Option<i64> {
        lock(&self.host_certs).get(host).copied()
    }

    /// Every registered host's certificate expiry (seconds since the Unix epoch), by name.
    pub fn host_cert_expiries(&self) -> Vec<(String, i64)> {
        let mut all: Vec<(String, i64)> =
            lock(&self.host_certs).iter().map(|(h, t)| (h.clone(), *t)).collect();
        all.sort();
        all
    }

    /// Opens the command stream for `host`'s agent, replacing any earlier one.
    pub fn connect_agent(&self, host: &str) -> mpsc::Receiver<Result<pb::Command, Status>> {
        let (tx, rx) = mpsc::channel(64);
        lock(&self.agents).insert(host.into(), tx);
        rx
    }

    /// The in-flight operation's live view; `None` once it has ended (read the store then).
    pub fn watch_operation(&self, id: OpId) -> Option<watch::Receiver<pb::Operation>> {
        lock(&self.watched).get(&id).map(|f| f.view.subscribe())
    }

    /// The final state of an operation that ended lately.
    pub fn ended_operation(&self, id: OpId) -> Option<pb::Operation> {
        let id = id.to_string();
        lock(&self.ended).iter().rev().find(|op| op.id == id).cloned()
    }

    /// Tells when a host's work or an operation's progress changed.
    pub fn watch_work(&self) -> watch::Receiver<u64> {
        self.work_changed.subscribe()
    }

    /// Operations in flight, for `vmha status` and drain progress.
    pub fn active_operations(&self) -> Vec<pb::Operation> {
        lock(&self.watched).values().map(|f| f.view.borrow().clone()).collect()
    }

    /// A running migration's progress, as the agent that carries it out reports it.
    pub fn progress(&self, host: &str, p: pb::OperationProgress) -> Result<(), Error> {
        let id = self.reporter(host, &p.operation_id)?;
        if let Some(f) = lock(&self.watched).get(&id) {
            f.view.send_modify(|op| {
                op.data_total = p.data_total;
                op.data_processed = p.data_processed;
                op.data_remaining = p.data_remaining;
                op.elapsed_ms = p.elapsed_ms;
            });
        }
        self.work_changed.send_modify(|n| *n += 1);
        self.journal.write(Write::OperationProgress {
            id: op_uuid(id),
            total: p.data_total,
            processed: p.data_processed,
            remaining: p.data_remaining,
        });
        Ok(())
    }

    /// The operation `id`, if it is in flight and `host` carries it out.
    fn reporter(&self, host: &str, id: &str) -> Result<OpId, Error> {
        let parsed = crate::host_message::operation_id(id)?;
        match lock(&self.watched).get(&parsed).map(|f| f.executor.as_str()) {
            Some(e) if e == host => Ok(parsed),
            Some(_) => Err(Error::PermissionDenied(format!("operation {id} does not run on {host}"))),
            None => Err(Error::NotFound(format!("operation {id} is not in flight"))),
        }
    }
}

type RecordFuture = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// An event's log line: its subject's name under the field of its kind (`host`, `vm`,
/// `operation`, `controller`), so that a log shipper finds every line about a VM by `vm`.
fn log_event(e: &Event) {
    let (kind, actor, message) = (e.kind.as_str(), &e.actor, &e.message);
    match &e.subject {
        Subject::Host(host) => tracing::info!(%host, kind, %actor, "{message}"),
        Subject::Vm(vm) => tracing::info!(%vm, kind, %actor, "{message}"),
        Subject::Operation(operation) => tracing::info!(%operation, kind, %actor, "{message}"),
        Subject::Controller(controller) => tracing::info!(%controller, kind, %actor, "{message}"),
    }
}

fn new_event(e: &Event) -> NewEvent {
    NewEvent {
        subject_kind: e.subject.kind(),
        subject: e.subject.name().to_string(),
        kind: e.kind.as_str(),
        message: e.message.clone(),
        actor: e.actor.clone(),
    }
}

/// A step longer than this is logged: every heartbeat queues behind it.
const SLOW_STEP: std::time::Duration = std::time::Duration::from_millis(20);

fn input_kind(input: &Input) -> &'static str {
    match input {
        Input::Register(_) => "register",
        Input::Heartbeat(_) => "heartbeat",
        Input::Recorded(_) => "recorded",
        Input::Result { .. } => "result",
        Input::FenceResult { .. } => "fence result",
        Input::Operator { .. } => "operator request",
        Input::Tick => "tick",
        Input::ProtectionUnconfirmed { .. } => "protection unconfirmed",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vmha_engine::event::{Event, EventKind};

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A log shipper finds every line about a VM by `vm`, about a host by `host`.
    #[test]
    fn an_events_log_line_names_its_vm_or_host_in_the_field_of_its_kind() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber =
            tracing_subscriber::fmt().json().flatten_event(true).with_writer(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            super::log_event(&Event::vm("dns1", EventKind::VmRestarted, "dns1 restarted on kvm2".into()));
            super::log_event(&Event::host("kvm1", EventKind::HostDead, "kvm1 is dead".into()));
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let logged: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(logged.len(), 2, "{text}");
        assert_eq!(
            (&logged[0]["vm"], &logged[0]["kind"]),
            (&"dns1".into(), &"vm_restarted".into()),
            "{text}"
        );
        assert_eq!(logged[0]["message"], "dns1 restarted on kvm2");
        assert_eq!(
            (&logged[1]["host"], &logged[1]["actor"]),
            (&"kvm1".into(), &"controller".into()),
            "{text}"
        );
    }
}
