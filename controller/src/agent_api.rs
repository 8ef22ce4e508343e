//! The agents' side of the gRPC API. Every handler takes the host from the connection
//! (`validate::agent_host`), validates the message, and hands it to the controller.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use vmha_engine::cluster::HostResources;
use vmha_engine::{AdminState, HostView, inventory};
use vmha_proto::v1::agent_service_server::AgentService;
use vmha_proto::v1::*;

use crate::controller::{Controller, internal};
use crate::validate;

pub struct AgentApi(pub Arc<Controller>);

fn resources(f: &HostFacts) -> HostResources {
    HostResources {
        cpus: f.cpus,
        memory_total_kib: f.memory_total_kib,
        memory_free_kib: f.memory_free_kib,
        cpu_model: f.cpu_model.clone(),
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let host = validate::agent_host(&req)?;
        let r = req.into_inner();
        validate::migration_uri(&r.migration_uri)?;
        let facts = r.facts.ok_or_else(|| Status::invalid_argument("register without host facts"))?;
        let c = &self.0;
        let now = c.now();
        let view = c.update(|s| {
            let h = s.hosts.entry(host.clone()).or_insert_with(|| HostView {
                name: host.clone(),
                admin: AdminState::Active,
                migration_uri: String::new(),
                resources: HostResources::default(),
                libvirt_version: String::new(),
                last_heartbeat: None,
            });
            h.migration_uri = r.migration_uri.clone();
            h.resources = resources(&facts);
            h.libvirt_version = facts.libvirt_version.clone();
            h.last_heartbeat = Some(now);
            h.clone()
        });
        c.store.upsert_host(&view, &facts.hypervisor_version).await.map_err(internal)?;
        c.event(
            "host",
            &host,
            "agent_connected",
            format!(
                "agent on {host} connected (vmha-agent {}, libvirt {}, {} CPUs, {} MiB); migrations to it use {}",
                r.agent_version,
                facts.libvirt_version,
                facts.cpus,
                facts.memory_total_kib / 1024,
                r.migration_uri
            ),
            &host,
        )
        .await?;
        Ok(Response::new(RegisterResponse {
            epoch: c.epoch,
            heartbeat_interval_ms: c.timings().heartbeat_interval_ms,
        }))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let host = validate::agent_host(&req)?;
        let r = req.into_inner();
        let domains = validate::reported_domains(&r.domains)?;
        let c = &self.0;
        let now = c.now();
        let changes = c.update(|s| {
            let h = s.hosts.get_mut(&host).ok_or_else(|| {
                Status::failed_precondition(format!("host {host} has not registered with this controller"))
            })?;
            if let Some(f) = &r.facts {
                h.resources = resources(f);
            }
            Ok::<_, Status>(inventory::apply_report(s, &host, &domains, now))
        })?;
        c.persist_inventory(changes, &host).await?;
        Ok(Response::new(HeartbeatResponse { epoch: c.epoch, lease_ttl_ms: c.timings().lease_ttl_ms }))
    }

    type CommandsStream = Pin<Box<dyn Stream<Item = Result<Command, Status>> + Send + 'static>>;

    async fn commands(
        &self,
        req: Request<CommandsRequest>,
    ) -> Result<Response<Self::CommandsStream>, Status> {
        let host = validate::agent_host(&req)?;
        if !self.0.read(|s| s.hosts.contains_key(&host)) {
            return Err(Status::failed_precondition(format!(
                "host {host} has not registered with this controller"
            )));
        }
        let rx = self.0.connect_agent(&host);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_progress(&self, req: Request<OperationProgress>) -> Result<Response<Ack>, Status> {
        let host = validate::agent_host(&req)?;
        self.0.progress(&host, req.into_inner()).await?;
        Ok(Response::new(Ack {}))
    }

    async fn report_result(&self, req: Request<OperationResult>) -> Result<Response<Ack>, Status> {
        let host = validate::agent_host(&req)?;
        self.0.result(&host, req.into_inner()).await?;
        Ok(Response::new(Ack {}))
    }
}
