//! The controller's writes to PostgreSQL, kept off the paths that grant leases: heartbeats
//! and registrations answer from memory, and what they changed is queued here and written by
//! one task, in the order it was queued, retried with backoff for as long as the database is
//! unreachable. A write the database refuses (not one it could not be asked) is logged and
//! skipped, so one bad row cannot hold back the rest.
//!
//! One queue for every write keeps two guarantees without locks: the database never sees an
//! older VM snapshot after a newer one, and a host's row is written before the VMs on it.
//!
//! Memory: the queue holds one entry per change (a VM changed state, an event, a host
//! registered, a migration reported progress), not one per heartbeat: heartbeats that change
//! nothing add nothing. An outage costs memory in proportion to how much the cluster changes
//! meanwhile, a few hundred bytes per change.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::future::Future;
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use vmha_engine::operation::Operation;
use vmha_engine::step::{HostWork, VmWork};
use vmha_engine::{HostView, VmView, Watchdog};

use crate::store::{NewEvent, OperationOutcome, Store, StoreError, retry_while_unreachable};

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
}

impl Write {
    /// A VM's observed state and sizes; its domain XML, written on its own, is not copied.
    pub fn vm(vm: &VmView) -> Write {
        Write::Vm(VmView { xml: String::new(), ..vm.clone() })
    }

    async fn apply(&self, store: &Store) -> Result<(), StoreError> {
        match self {
            Write::Host { host, hypervisor_version } => store.upsert_host(host, hypervisor_version).await,
            Write::HostWork { host, work } => store.set_host_work(host, work).await,
            Write::Watchdog { host, watchdog } => store.set_watchdog(host, watchdog).await,
            Write::Vm(vm) => store.upsert_vm(vm).await,
            Write::VmWork { uuid, work } => store.set_vm_work(uuid, work).await,
            Write::DeleteVm { uuid } => store.delete_vm(uuid).await,
            Write::DeleteHost { host } => store.delete_host(host).await,
            Write::VmXml { uuid, xml } => store.set_vm_xml(uuid, xml).await,
            Write::Event(e) => store.append_event(e).await.map(|_| ()),
            Write::Operation { op, epoch } => store.insert_operation(op, *epoch).await,
            Write::OperationRunning(id) => store.set_operation_running(*id).await,
            Write::OperationProgress { id, total, processed, remaining } => {
                store.set_operation_progress(*id, *total, *processed, *remaining).await
            }
            Write::OperationFinished { id, outcome } => store.finish_operation(*id, outcome).await,
        }
    }
}

struct Entry {
    write: Write,
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
        self.push(Entry { write, written: None });
    }

    /// Queues a write and waits until it is written, however long the database is
    /// unreachable: for what must be on record before it is done. An error means the database
    /// refused the write.
    /// The write is queued at the call, in order with the writes queued before and after it.
    pub fn record(&self, write: Write) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        self.shared.held.fetch_add(1, Ordering::SeqCst);
        self.push(Entry { write, written: Some(tx) });
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

async fn run(store: Store, mut queue: mpsc::UnboundedReceiver<Entry>, shared: Arc<Shared>) {
    while let Some(Entry { write, written }) = queue.recv().await {
        let result =
            retry_while_unreachable(|| write.apply(&store), |e, pause| shared.waiting(e, pause)).await;
        shared.queued.fetch_sub(1, Ordering::SeqCst);
        shared.taken.send_modify(|taken| *taken += 1);
        shared.reachable();
        if let Err(e) = &result
            && e.is_deposed()
        {
            crate::leadership::depose(&format!("PostgreSQL refused this controller's write: {e}"));
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
