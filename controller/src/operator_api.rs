//! The operator API behind the `vmha` CLI. Handlers validate, read or change desired state,
//! and return; anything that touches a host goes through the controller as an operation.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;
use vmha_engine::{HostLiveness, Refusal, migration};
use vmha_proto::v1::operator_service_server::OperatorService;
use vmha_proto::v1::*;

use crate::controller::{Controller, internal};
use crate::{validate, views};

pub struct OperatorApi(pub Arc<Controller>);

/// Who asked. Operators authenticate with certificates in a later version; until then every
/// request is "operator".
const ACTOR: &str = "operator";

pub fn refusal(r: Refusal) -> Status {
    match r {
        Refusal::UnknownVm(_) | Refusal::UnknownHost(_) => Status::not_found(r.to_string()),
        Refusal::AmbiguousVm { .. } => Status::invalid_argument(r.to_string()),
        Refusal::AlreadyOnTarget { .. }
        | Refusal::NotPlaced { .. }
        | Refusal::NotRunning { .. }
        | Refusal::Busy { .. }
        | Refusal::HostDown { .. }
        | Refusal::HostNotActive { .. }
        | Refusal::NoRoom { .. } => Status::failed_precondition(r.to_string()),
    }
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "aborted")
}

impl OperatorApi {
    fn hosts(&self) -> Vec<Host> {
        let now = self.0.now();
        self.0.read(|s| {
            s.hosts
                .values()
                .map(|h| {
                    let running = s
                        .vms
                        .values()
                        .filter(|v| v.host.as_deref() == Some(&h.name) && v.state.has_process())
                        .count() as u32;
                    views::host(h, s.liveness(&h.name, now), now, running)
                })
                .collect()
        })
    }
}

#[tonic::async_trait]
impl OperatorService for OperatorApi {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let hosts = self.hosts();
        let (vms_total, vms_running, vms_protected, protected_not_running) = self.0.read(|s| {
            let running = |v: &&vmha_engine::VmView| v.state == vmha_engine::RunState::Running;
            (
                s.vms.len() as u32,
                s.vms.values().filter(running).count() as u32,
                s.vms.values().filter(|v| v.protected).count() as u32,
                s.vms.values().filter(|v| v.protected && !running(v)).count() as u32,
            )
        });
        Ok(Response::new(StatusResponse {
            epoch: self.0.epoch,
            hosts_total: hosts.len() as u32,
            hosts_online: hosts.iter().filter(|h| h.state == HostLiveness::Online.as_str()).count() as u32,
            vms_total,
            vms_running,
            vms_protected,
            protected_not_running,
            hosts,
            active_operations: Vec::new(),
        }))
    }

    async fn list_hosts(&self, _: Request<ListHostsRequest>) -> Result<Response<ListHostsResponse>, Status> {
        Ok(Response::new(ListHostsResponse { hosts: self.hosts() }))
    }

    async fn list_vms(&self, _: Request<ListVmsRequest>) -> Result<Response<ListVmsResponse>, Status> {
        let mut vms: Vec<Vm> = self.0.read(|s| s.vms.values().map(views::vm).collect());
        vms.sort_by(|a, b| (&a.name, &a.uuid).cmp(&(&b.name, &b.uuid)));
        Ok(Response::new(ListVmsResponse { vms }))
    }

    async fn get_vm(&self, req: Request<GetVmRequest>) -> Result<Response<Vm>, Status> {
        let key = validate::vm_ref(&req.get_ref().vm)?;
        self.0.read(|s| s.find_vm(key).map(views::vm)).map(Response::new).map_err(refusal)
    }

    async fn set_protection(&self, req: Request<SetProtectionRequest>) -> Result<Response<Vm>, Status> {
        let r = req.into_inner();
        let key = validate::vm_ref(&r.vm)?;
        let priority = r.priority.map(validate::priority).transpose()?;
        let (vm, before) = self
            .0
            .update(|s| {
                let uuid = s.find_vm(key)?.uuid.clone();
                let vm = s.vms.get_mut(&uuid).expect("found above");
                let before = (vm.protected, vm.priority);
                vm.protected = r.protected;
                if let Some(p) = priority {
                    vm.priority = p;
                }
                Ok((vm.clone(), before))
            })
            .map_err(refusal)?;
        let uuid = Uuid::parse_str(&vm.uuid).map_err(|e| Status::internal(e.to_string()))?;
        // The row may not exist yet if the VM was discovered on a host whose registration the
        // store has not seen; write the observed part first.
        self.0.store.upsert_vm(&vm).await.map_err(internal)?;
        self.0.store.set_protection(uuid, vm.protected, vm.priority).await.map_err(internal)?;
        if before != (vm.protected, vm.priority) {
            let message = if vm.protected {
                format!("{} is protected with priority {} (higher restarts first)", vm.name, vm.priority)
            } else {
                format!("{} is no longer protected: it will not be restarted elsewhere", vm.name)
            };
            let kind = if vm.protected { "vm_protected" } else { "vm_unprotected" };
            self.0.event("vm", &vm.name, kind, message, ACTOR).await?;
        }
        Ok(Response::new(views::vm(&vm)))
    }

    async fn migrate(&self, req: Request<MigrateRequest>) -> Result<Response<Operation>, Status> {
        let r = req.into_inner();
        let key = validate::vm_ref(&r.vm)?;
        let target = validate::host_name(&r.target_host)?;
        let now = self.0.now();
        let plan = self.0.read(|s| migration::plan_migration(s, key, target, now)).map_err(refusal)?;
        Ok(Response::new(self.0.start_migration(plan, ACTOR).await?))
    }

    type WatchOperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send + 'static>>;

    async fn watch_operation(
        &self,
        req: Request<WatchOperationRequest>,
    ) -> Result<Response<Self::WatchOperationStream>, Status> {
        let id = Uuid::parse_str(&req.get_ref().id).map_err(|_| {
            Status::invalid_argument(format!("'{}' is not an operation id", req.get_ref().id))
        })?;
        let live = self.0.watch_operation(id);
        let controller = self.0.clone();
        let stream = async_stream(controller, id, live);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_events(
        &self,
        req: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let r = req.into_inner();
        let limit = if r.limit == 0 { 50 } else { r.limit.min(10_000) };
        let rows = self.0.store.list_events(r.after_id, limit).await.map_err(internal)?;
        Ok(Response::new(ListEventsResponse { events: rows.iter().map(views::event).collect() }))
    }
}

/// The operation's state now, then each change, ending with its final state. An operation
/// that already ended is read from the store.
fn async_stream(
    c: Arc<Controller>,
    id: Uuid,
    live: Option<tokio::sync::watch::Receiver<Operation>>,
) -> impl Stream<Item = Result<Operation, Status>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        if let Some(mut w) = live {
            loop {
                let op = w.borrow_and_update().clone();
                let done = is_terminal(&op.state);
                if tx.send(Ok(op)).await.is_err() || done {
                    return;
                }
                if w.changed().await.is_err() {
                    // The sender is gone: the operation ended; its final state is in the store.
                    break;
                }
            }
        }
        let msg = match c.store.get_operation(id).await {
            Ok(Some(row)) => Ok(views::operation(&row)),
            Ok(None) => Err(Status::not_found(format!("no operation {id}"))),
            Err(e) => Err(internal(e)),
        };
        let _ = tx.send(msg).await;
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
