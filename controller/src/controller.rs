//! The controller's shell: holds the observed cluster state for the engine, persists what the
//! engine decides or observes, and talks to connected agents. The gRPC handlers call into it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tonic::Status;
use uuid::Uuid;
use vmha_engine::inventory::{self, InventoryChange};
use vmha_engine::{ClusterState, MigrationPlan, Millis, Timings};
use vmha_proto::v1::{Command, MigrateDomain, Operation, OperationProgress, OperationResult, command};

use crate::store::{NewEvent, OperationOutcome, OperationRow, Store, StoreError};
use crate::views;

/// Defaults for live migrations the controller starts.
#[derive(Clone, Debug)]
pub struct MigrationSettings {
    pub auto_converge: bool,
    pub bandwidth_mib_s: u64,
    pub timeout: Duration,
}

type AgentSender = mpsc::Sender<Result<Command, Status>>;

pub struct Controller {
    pub store: Store,
    pub epoch: u64,
    pub migration: MigrationSettings,
    origin: Instant,
    /// The engine's input. A std mutex: never held across an await.
    state: Mutex<ClusterState>,
    /// Command streams of connected agents, by host.
    agents: Mutex<HashMap<String, AgentSender>>,
    /// Operations in flight, for `WatchOperation` followers.
    ops: Mutex<HashMap<Uuid, watch::Sender<Operation>>>,
    /// Serialises inventory writes so that the database sees VM records in the order the
    /// state changed, never an older snapshot after a newer one.
    persist: tokio::sync::Mutex<()>,
}

pub fn internal(e: StoreError) -> Status {
    tracing::error!(error = %e, "store");
    Status::internal(e.to_string())
}

impl Controller {
    /// Takes a new epoch, loads desired state, and closes what a previous controller left open.
    pub async fn start(
        store: Store,
        timings: Timings,
        migration: MigrationSettings,
    ) -> Result<Arc<Controller>, StoreError> {
        let epoch = store.next_epoch().await?;
        let mut state = ClusterState { timings, ..Default::default() };
        for h in store.load_hosts().await? {
            state.hosts.insert(h.name.clone(), h);
        }
        for vm in store.load_vms().await? {
            state.vms.insert(vm.uuid.clone(), vm);
        }
        for op in store.fail_orphaned_operations(epoch).await? {
            store
                .append_event(&NewEvent {
                    subject_kind: "operation",
                    subject: op.id.to_string(),
                    kind: "operation_orphaned",
                    message: format!(
                        "{} of {} ({} -> {}) was left unfinished by the controller of epoch {}; marked failed",
                        op.kind, op.vm_name, op.source, op.target, op.epoch
                    ),
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
                    "controller started with epoch {epoch}; {} hosts and {} VMs known",
                    state.hosts.len(),
                    state.vms.len()
                ),
                actor: "controller".into(),
            })
            .await?;
        Ok(Arc::new(Controller {
            store,
            epoch,
            migration,
            origin: Instant::now(),
            state: Mutex::new(state),
            agents: Mutex::default(),
            ops: Mutex::default(),
            persist: tokio::sync::Mutex::new(()),
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

    pub async fn event(
        &self,
        subject_kind: &'static str,
        subject: &str,
        kind: &'static str,
        message: String,
        actor: &str,
    ) -> Result<(), Status> {
        tracing::info!(subject = %subject, kind, "{message}");
        self.store
            .append_event(&NewEvent {
                subject_kind,
                subject: subject.into(),
                kind,
                message,
                actor: actor.into(),
            })
            .await
            .map(|_| ())
            .map_err(internal)
    }

    /// Writes the VMs that changed, as they are now, and one event per observable change.
    pub async fn persist_inventory(&self, changes: Vec<InventoryChange>, actor: &str) -> Result<(), Status> {
        if changes.is_empty() {
            return Ok(());
        }
        let _order = self.persist.lock().await;
        for change in changes {
            let Some(vm) = self.read(|s| s.vms.get(change.uuid()).cloned()) else { continue };
            if let Some(h) = &vm.host {
                // The hosts table is the foreign key's target; a report can name a host that
                // registered after this controller loaded its state.
                if !self.read(|s| s.hosts.contains_key(h)) {
                    continue;
                }
            }
            self.store.upsert_vm(&vm).await.map_err(internal)?;
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
                InventoryChange::Updated { .. } => continue,
            };
            self.event("vm", &vm.name, kind, message, actor).await?;
        }
        Ok(())
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

    /// Writes the migration down, then sends it to the source agent.
    pub async fn start_migration(&self, plan: MigrationPlan, actor: &str) -> Result<Operation, Status> {
        let vm_uuid = Uuid::parse_str(&plan.vm_uuid).map_err(|e| Status::internal(e.to_string()))?;
        let row =
            OperationRow::pending("migrate", vm_uuid, &plan.vm_name, &plan.source, &plan.target, self.epoch);
        let id = row.id;
        let claimed = self.update(|s| match s.vms.get_mut(&plan.vm_uuid) {
            Some(vm) if vm.busy_with.is_none() => {
                vm.busy_with = Some(id.to_string());
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
        if let Err(e) = self.store.insert_operation(&row).await {
            self.release(&plan.vm_uuid);
            return Err(internal(e));
        }
        let (tx, _) = watch::channel(views::operation(&row));
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        self.event(
            "vm",
            &plan.vm_name,
            "migration_requested",
            format!(
                "live migration of {} from {} to {} requested (operation {id})",
                plan.vm_name, plan.source, plan.target
            ),
            actor,
        )
        .await?;
        let cmd = Command {
            operation_id: id.to_string(),
            epoch: self.epoch,
            kind: Some(command::Kind::Migrate(MigrateDomain {
                uuid: plan.vm_uuid.clone(),
                dest_uri: plan.target_uri.clone(),
                auto_converge: self.migration.auto_converge,
                bandwidth_mib_s: self.migration.bandwidth_mib_s,
                timeout_ms: self.migration.timeout.as_millis() as u64,
            })),
        };
        if let Err(why) = self.send_command(&plan.source, cmd).await {
            self.finish(
                &plan.source,
                id,
                OperationOutcome { state: "failed", error: why, ..Default::default() },
            )
            .await?;
        } else {
            self.store.set_operation_running(id).await.map_err(internal)?;
            self.modify_op(id, |op| {
                if op.state == "pending" {
                    op.state = "running".into();
                }
            });
        }
        Ok(self.watch_operation(id).map(|rx| rx.borrow().clone()).unwrap_or_else(|| views::operation(&row)))
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

    /// The source of an operation, if `host` may report on it.
    fn check_reporter(&self, host: &str, id: &str) -> Result<Uuid, Status> {
        let id = Uuid::parse_str(id)
            .map_err(|_| Status::invalid_argument(format!("'{id}' is not an operation id")))?;
        let source =
            self.ops.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|tx| tx.borrow().source.clone());
        match source {
            Some(s) if s == host => Ok(id),
            Some(_) => Err(Status::permission_denied(format!("operation {id} does not run on {host}"))),
            None => Err(Status::not_found(format!("operation {id} is not in flight"))),
        }
    }

    pub async fn progress(&self, host: &str, p: OperationProgress) -> Result<(), Status> {
        let id = self.check_reporter(host, &p.operation_id)?;
        self.modify_op(id, |op| {
            op.data_total = p.data_total;
            op.data_processed = p.data_processed;
            op.data_remaining = p.data_remaining;
            op.elapsed_ms = p.elapsed_ms;
        });
        self.store
            .set_operation_progress(id, p.data_total, p.data_processed, p.data_remaining)
            .await
            .map_err(internal)
    }

    pub async fn result(&self, host: &str, r: OperationResult) -> Result<(), Status> {
        let id = self.check_reporter(host, &r.operation_id)?;
        let outcome = OperationOutcome {
            state: if r.ok { "succeeded" } else { "failed" },
            error: r.error,
            elapsed_ms: r.elapsed_ms,
            downtime_ms: r.downtime_ms,
            bytes: r.bytes,
        };
        self.finish(host, id, outcome).await
    }

    /// Records how an operation ended, moves the VM in the inventory, tells followers.
    async fn finish(&self, source: &str, id: Uuid, o: OperationOutcome) -> Result<(), Status> {
        let Some(op) =
            self.ops.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|tx| tx.borrow().clone())
        else {
            return Ok(());
        };
        self.store.finish_operation(id, &o).await.map_err(internal)?;
        let ok = o.state == "succeeded";
        if ok {
            let change = self.update(|s| inventory::apply_migrated(s, &op.vm_uuid, &op.target));
            self.persist_inventory(change.into_iter().collect(), "controller").await?;
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
                "live migration of {} from {} to {} failed: {}; {} stays on {source}",
                op.vm, op.source, op.target, o.error, op.vm
            )
        };
        self.event(
            "vm",
            &op.vm,
            if ok { "migration_succeeded" } else { "migration_failed" },
            message,
            "controller",
        )
        .await?;
        let tx = self.ops.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        if let Some(tx) = tx {
            tx.send_modify(|v| {
                v.state = o.state.into();
                v.error = o.error.clone();
                v.elapsed_ms = o.elapsed_ms;
                v.downtime_ms = o.downtime_ms;
                v.bytes = o.bytes;
            });
        }
        Ok(())
    }
}
