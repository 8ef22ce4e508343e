//! The controller's writes to PostgreSQL, kept off the paths that grant leases: heartbeats
//! and registrations answer from memory, and what they changed is queued here and written by
//! one task, in the order it was queued, retried with backoff for as long as the database is
//! unreachable. A write the database refuses (not one it could not be asked) is logged and
//! skipped, so one bad row cannot hold back the rest.
//!
//! One queue for every write keeps two guarantees without locks: the database never sees an
//! older VM snapshot after a newer one, and a host's row is written before the VMs on it.
//!
//! Batches: the writer takes everything queued (up to `BATCH` entries) and writes it in one
//! transaction, in queue order. A commit per write capped discovery at about 50 VMs/s (1000
//! hosts of 25 VMs queue 75,000 writes); a commit per batch leaves one round trip per write.
//! What this keeps of the guarantees above:
//! - `record` answers, and `caught_up` returns, only once the transaction has committed.
//! - An unreachable database mid-batch: the transaction did not commit, nothing of it was
//!   written, and the whole batch is written again. A connection lost during the commit
//!   leaves it in doubt: the database is asked whether that transaction committed before
//!   anything is written again, as events and operations must not be written twice.
//! - A refused write rolls its batch back; the batch is written again without it, so it alone
//!   is skipped. A refused commit (no write to blame) has the batch written one write per
//!   transaction. A deposed leader's refusal (epoch fence) deposes at once.
//!
//! Memory: the queue holds one entry per change (a VM changed state, an event, a host
//! registered, a migration reported progress), not one per heartbeat: heartbeats that change
//! nothing add nothing. An outage costs memory in proportion to how much the cluster changes
//! meanwhile, a few hundred bytes per change.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgConnection;
use std::future::Future;
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use vmha_engine::availability::OutageMark;
use vmha_engine::operation::{OpState, Operation};
use vmha_engine::step::{HostWork, Persist, VmWork};
use vmha_engine::{ClusterState, HostView, VmView, Watchdog};

use crate::store::{NewEvent, OperationOutcome, Store, StoreError, op_uuid, retry_while_unreachable};

/// One write, as the store takes it.
#[derive(Debug)]
pub enum Write {
    Host {
        host: HostView,
        hypervisor_version: String,
    },
    HostWork {
        host: String,
        work: HostWork,
    },
    Watchdog {
        host: String,
        watchdog: Watchdog,
    },
    /// A VM's observed state (see `Write::vm`).
    Vm(VmView),
    /// A VM's desired state and restart in progress.
    VmWork {
        uuid: String,
        work: VmWork,
    },
    DeleteVm {
        uuid: String,
    },
    DeleteHost {
        host: String,
    },
    VmXml {
        uuid: String,
        xml: String,
    },
    Event(NewEvent),
    Operation {
        op: Operation,
        epoch: u64,
    },
    OperationRunning(Uuid),
    OperationProgress {
        id: Uuid,
        total: u64,
        processed: u64,
        remaining: u64,
    },
    OperationFinished {
        id: Uuid,
        outcome: OperationOutcome,
    },
    /// The cluster's CRL (`vmha ca publish`), and who published it.
    Crl {
        number: u64,
        der: Vec<u8>,
        by: String,
    },
    /// For the outage history, with the time it was marked (writes may wait for the database).
    Outage {
        mark: OutageMark,
        at: chrono::DateTime<chrono::Utc>,
    },
}

impl Write {
    /// A VM's observed state and sizes; its domain XML, written on its own, is not copied.
    pub fn vm(vm: &VmView) -> Write {
        Write::Vm(VmView { xml: String::new(), ..vm.clone() })
    }

    /// The writes that keep the hosts and VMs a step's `Persist` names, as `s` has them after
    /// the step, in the order the state changed. Not registrations: the agent API writes those
    /// with a fact the engine does not keep (the hypervisor's version). Not operations either:
    /// see `Write::operation`. The one translation of the engine's restart contract
    /// (`vmha_engine::persist`) into rows, shared with the test that holds the two together.
    pub fn persisted(s: &ClusterState, p: &Persist) -> Vec<Write> {
        let mut writes = Vec::new();
        for host in &p.watchdog {
            if let Some(h) = s.hosts.get(host) {
                writes.push(Write::Watchdog { host: host.clone(), watchdog: h.watchdog.clone() });
            }
        }
        for (host, work) in &p.host_work {
            writes.push(Write::HostWork { host: host.clone(), work: work.clone() });
        }
        for uuid in &p.vms {
            // The hosts table is the foreign key's target; a report can name a host that
            // registered after this controller loaded its state.
            if let Some(vm) =
                s.vms.get(uuid).filter(|v| v.host.as_ref().is_none_or(|h| s.hosts.contains_key(h)))
            {
                writes.push(Write::vm(vm));
            }
        }
        for uuid in &p.forgotten {
            writes.push(Write::DeleteVm { uuid: uuid.clone() });
        }
        for host in &p.removed_hosts {
            writes.push(Write::DeleteHost { host: host.clone() });
        }
        for (uuid, work) in &p.vm_work {
            writes.push(Write::VmWork { uuid: uuid.clone(), work: work.clone() });
        }
        for uuid in &p.xml {
            if let Some(vm) = s.vms.get(uuid) {
                writes.push(Write::VmXml { uuid: uuid.clone(), xml: vm.xml.clone() });
            }
        }
        writes
    }

    /// The write that keeps an operation's row as `op` now stands, for the leader of `epoch`:
    /// a new one is inserted (to be waited for: its command goes out only once it is written),
    /// a sent one marked running, an ended one finished.
    pub fn operation(op: &Operation, epoch: u64) -> Write {
        let id = op_uuid(op.id);
        match op.state {
            OpState::Recording => Write::Operation { op: op.clone(), epoch },
            OpState::Running => Write::OperationRunning(id),
            OpState::Succeeded | OpState::Failed | OpState::Aborted | OpState::Cancelled => {
                let outcome = OperationOutcome {
                    state: op.state.as_str(),
                    error: op.error.clone(),
                    elapsed_ms: op.done.elapsed_ms,
                    downtime_ms: op.done.downtime_ms,
                    bytes: op.done.bytes,
                };
                Write::OperationFinished { id, outcome }
            }
        }
    }

    async fn apply(&self, db: &mut PgConnection) -> Result<(), StoreError> {
        match self {
            Write::Host { host, hypervisor_version } => {
                Store::upsert_host(db, host, hypervisor_version).await
            }
            Write::HostWork { host, work } => Store::set_host_work(db, host, work).await,
            Write::Watchdog { host, watchdog } => Store::set_watchdog(db, host, watchdog).await,
            Write::Vm(vm) => Store::upsert_vm(db, vm).await,
            Write::VmWork { uuid, work } => Store::set_vm_work(db, uuid, work).await,
            Write::DeleteVm { uuid } => Store::delete_vm(db, uuid).await,
            Write::DeleteHost { host } => Store::delete_host(db, host).await,
            Write::VmXml { uuid, xml } => Store::set_vm_xml(db, uuid, xml).await,
            Write::Event(e) => Store::append_event(db, e).await.map(|_| ()),
            Write::Operation { op, epoch } => Store::insert_operation(db, op, *epoch).await,
            Write::OperationRunning(id) => Store::set_operation_running(db, *id).await,
            Write::OperationProgress { id, total, processed, remaining } => {
                Store::set_operation_progress(db, *id, *total, *processed, *remaining).await
            }
            Write::OperationFinished { id, outcome } => Store::finish_operation(db, *id, outcome).await,
            Write::Outage { mark, at } => Store::mark_outage(db, mark, *at).await,
            Write::Crl { number, der, by } => Store::set_crl(db, *number, der, by).await,
        }
    }
}

struct Entry {
    write: Write,
    /// When it was queued: how long it then waited is the window in which a takeover would
    /// not find it (`vmha_database_write_lag_seconds`).
    queued: Instant,
    /// Told when the write is done, for a caller that may not act before it is.
    written: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// What the queue's users and `vmha status` see of the writer.
#[derive(Default)]
struct Shared {
    /// Entries queued since the start, and entries taken by the writer since the start.
    pushed: AtomicU64,
    taken: watch::Sender<u64>,
    queued: AtomicUsize,
    /// Callers of `record` still waiting: actions held until they are written down.
    held: AtomicUsize,
    /// Since when, and why, the database has not taken the write at the head of the queue.
    unreachable: Mutex<Option<(Instant, String)>>,
}

impl Shared {
    fn waiting(&self, e: &StoreError, pause: Duration) {
        let mut slot = self.unreachable.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::warn!(
                error = %e,
                queued = self.queued.load(Ordering::SeqCst),
                "PostgreSQL is unreachable: leases and heartbeats go on from memory, writes are \
                 queued and retried (next in {pause:?}); restarts and migrations wait for it"
            );
        }
        let since = slot.as_ref().map_or_else(Instant::now, |(since, _)| *since);
        *slot = Some((since, e.to_string()));
    }

    fn reachable(&self) {
        if let Some((since, _)) = self.unreachable.lock().unwrap_or_else(|p| p.into_inner()).take() {
            tracing::info!(
                after = ?since.elapsed(),
                queued = self.queued.load(Ordering::SeqCst),
                "PostgreSQL takes writes again; writing what was queued"
            );
        }
    }
}

/// The ordered write-behind queue, and its one writer.
pub struct Journal {
    queue: mpsc::UnboundedSender<Entry>,
    shared: Arc<Shared>,
}

impl Journal {
    /// Starts the writer; it runs until the journal is dropped and its queue written.
    pub fn start(store: Store) -> Journal {
        let (queue, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        tokio::spawn(run(store, rx, shared.clone()));
        Journal { queue, shared }
    }

    /// Queues a write; it reaches the database after everything queued before it.
    pub fn write(&self, write: Write) {
        self.push(Entry { write, queued: Instant::now(), written: None });
    }

    /// Queues a write and waits until it is written, however long the database is
    /// unreachable: for what must be on record before it is done. An error means the database
    /// refused the write.
    /// The write is queued at the call, in order with the writes queued before and after it.
    pub fn record(&self, write: Write) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        self.shared.held.fetch_add(1, Ordering::SeqCst);
        self.push(Entry { write, queued: Instant::now(), written: Some(tx) });
        let shared = self.shared.clone();
        async move {
            // A writer that stopped (the controller is going down) answers nothing: refused.
            let result = rx.await.unwrap_or(Err(StoreError::WriterStopped));
            shared.held.fetch_sub(1, Ordering::SeqCst);
            result
        }
    }

    fn push(&self, entry: Entry) {
        self.shared.pushed.fetch_add(1, Ordering::SeqCst);
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        if let Err(lost) = self.queue.send(entry) {
            tracing::error!(write = ?lost.0.write, "the database writer has stopped; this write is lost");
        }
    }

    /// Returns once everything queued before the call is written (or refused): for a reader
    /// who expects to see what this controller just did.
    pub async fn caught_up(&self) {
        let target = self.shared.pushed.load(Ordering::SeqCst);
        let _ = self.shared.taken.subscribe().wait_for(|taken| *taken >= target).await;
    }

    /// Why writes are not reaching the database, for `vmha status`; `None` while they are.
    pub fn trouble(&self) -> Option<String> {
        let slot = self.shared.unreachable.lock().unwrap_or_else(|p| p.into_inner());
        let (since, error) = slot.as_ref()?;
        let mut why = format!(
            "waiting for the database for {} s: {error}; {} writes queued",
            since.elapsed().as_secs(),
            self.shared.queued.load(Ordering::SeqCst)
        );
        match self.shared.held.load(Ordering::SeqCst) {
            0 => {}
            n => why += &format!(", {n} restarts or migrations held until they can be recorded"),
        }
        Some(why)
    }
}

/// The most entries one transaction writes: enough that commits (a flush to disk each) are
/// not what limits a burst of writes (1000 hosts registering queue 75,000), few enough that a
/// transaction stays short, and that a refused entry costs little to write around.
pub const BATCH: usize = 500;

async fn run(store: Store, mut queue: mpsc::UnboundedReceiver<Entry>, shared: Arc<Shared>) {
    let mut batch = Vec::with_capacity(BATCH);
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        let results = write_batch(&store, &batch, &shared).await;
        shared.queued.fetch_sub(batch.len(), Ordering::SeqCst);
        shared.taken.send_modify(|taken| *taken += batch.len() as u64);
        for (Entry { write, queued, written }, result) in batch.drain(..).zip(results) {
            if result.is_ok() {
                crate::metrics::METRICS.write_lag(queued.elapsed());
            }
            match (result, written) {
                (result, Some(tx)) => {
                    let _ = tx.send(result);
                }
                (Err(e), None) => {
                    tracing::error!(error = %e, ?write, "PostgreSQL refused a write; it is skipped")
                }
                (Ok(()), None) => {}
            }
        }
    }
}

/// Writes `entries` in their order and returns what became of each: in one transaction if the
/// database takes them all. If it refuses one, that transaction is rolled back (nothing of it
/// was written) and the others are written again without it. If it refuses a transaction as a
/// whole (its commit), they are written one transaction each, so only what is refused is lost.
async fn write_batch(store: &Store, entries: &[Entry], shared: &Shared) -> Vec<Result<(), StoreError>> {
    let mut results: Vec<Option<Result<(), StoreError>>> = entries.iter().map(|_| None).collect();
    let mut alone = false;
    loop {
        let left: Vec<usize> = (0..entries.len()).filter(|&i| results[i].is_none()).collect();
        let now = match (alone, left.first()) {
            (_, None) => break,
            (true, Some(_)) => &left[..1],
            (false, Some(_)) => &left[..],
        };
        let in_doubt = Mutex::new(None);
        let outcome = retry_while_unreachable(
            || transaction(store, entries, now, &in_doubt),
            |e, pause| shared.waiting(e, pause),
        )
        .await;
        shared.reachable();
        if let Ok(Err((_, e))) | Err(e) = &outcome
            && e.is_deposed()
        {
            // Every later write would be refused as well: none is tried.
            crate::leadership::depose(&format!("PostgreSQL refused this controller's write: {e}"));
        }
        match outcome {
            Ok(Ok(())) => now.iter().for_each(|&i| results[i] = Some(Ok(()))),
            Ok(Err((i, e))) => results[i] = Some(Err(e)),
            Err(e) if now.len() == 1 => results[now[0]] = Some(Err(e)),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    writes = now.len(),
                    "PostgreSQL refused a transaction's commit; writing its writes one by one"
                );
                alone = true;
            }
        }
    }
    // Each entry has its result: the loop ends when none is left without one.
    results.into_iter().flatten().collect()
}

/// One attempt at writing `entries[now]` in one transaction. `Ok(Err((i, e)))`: the database
/// refused entry `i`, and nothing was written; `Err`: the database was not reached (retried) or
/// refused the commit.
///
/// A connection lost while the commit was under way leaves the transaction in doubt, and
/// writing it again could write it twice (events appended twice, an operation's insert refused
/// as a duplicate): the next attempt first asks the database whether it committed.
async fn transaction(
    store: &Store,
    entries: &[Entry],
    now: &[usize],
    in_doubt: &Mutex<Option<(i64, i32)>>,
) -> Result<Result<(), (usize, StoreError)>, StoreError> {
    let doubt = *in_doubt.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((xid, pid)) = doubt {
        if store.committed(xid, pid).await? {
            return Ok(Ok(()));
        }
        *in_doubt.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
    let mut tx = store.begin().await?;
    let id = Store::transaction_id(&mut tx).await?;
    for &i in now {
        match entries[i].write.apply(&mut tx).await {
            Err(e) if !e.is_unavailable() => return Ok(Err((i, e))),
            done => done?,
        }
    }
    *in_doubt.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
    let committed = tx.commit().await.map_err(crate::store::q("commit"));
    if !committed.as_ref().is_err_and(StoreError::is_unavailable) {
        // Committed, or refused for certain: nothing to ask later.
        *in_doubt.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
    committed.map(Ok)
}
