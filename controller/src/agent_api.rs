//! The agents' side of the gRPC API. Every handler takes the host from the connection
//! (`Access::agent_host`: the agent's certificate), validates the message, and hands it to the engine as one input.
//! Register and heartbeat answer from memory and never wait for PostgreSQL: an agent must not
//! lose its lease because the database is away (what they change is queued, see `journal`).

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use vmha_engine::cluster::HostResources;
use vmha_engine::drain::Probe;
use vmha_engine::lease::{Echo, LeaseAnswer};
use vmha_engine::operation::{Done, OpId};
use vmha_engine::roster::RosterUpdate;
use vmha_engine::step::{Heartbeat, Input, Registration, Reply};
use vmha_engine::{Millis, Watchdog};
use vmha_proto::v1::agent_service_server::AgentService;
use vmha_proto::v1::*;

use crate::access::Access;
use crate::controller::Controller;
use crate::domain_xml::DomainRules;
use crate::errors::{Error, refusal, unexpected};
use crate::journal::Write;
use crate::node::Node;
use crate::rate_limit::AgentLimits;
use crate::validate;

pub struct AgentApi {
    /// A standby refuses every call, naming the leader: the agent goes there.
    node: Arc<Node>,
    /// What a domain definition may contain (the controller's flags).
    definitions: DomainRules,
    /// How it knows which host calls.
    access: Access,
    limits: AgentLimits,
}

impl AgentApi {
    pub fn new(node: Arc<Node>, definitions: DomainRules, access: Access) -> AgentApi {
        AgentApi { node, definitions, access, limits: AgentLimits::default() }
    }

    fn controller(&self) -> Result<&Arc<Controller>, Error> {
        self.node.leader()
    }
}

/// The engine's view of what an agent says of its watchdog.
fn watchdog(w: Option<&WatchdogStatus>) -> Watchdog {
    match w {
        None => Watchdog::Missing("the agent does not report one (an older agent?)".into()),
        Some(w) if w.armed => Watchdog::Armed { device: w.device.clone(), timeout_ms: w.timeout_ms },
        Some(w) => Watchdog::Missing(w.problem.clone()),
    }
}

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
        let (host, cert_not_after) = self.access.agent(&req)?;
        let r = req.into_inner();
        validate::migration_uri(validate::short_text("the migration URI", &r.migration_uri)?)?;
        validate::peer_address(validate::short_text("the peer address", &r.peer_address)?)?;
        validate::short_text("the agent version", &r.agent_version)?;
        let facts = r.facts.ok_or_else(|| Error::Invalid("register without host facts".into()))?;
        validate::facts(&facts)?;
        let c = self.controller()?;
        // Counted only here, where a registration is taken: the attempts an agent makes while
        // no controller leads (a takeover) must not spend the allowance it needs once one does.
        self.limits.register.admit(&host)?;
        let registration = Registration {
            host: host.clone(),
            migration_uri: r.migration_uri.clone(),
            peer_address: r.peer_address.clone(),
            resources: resources(&facts),
            libvirt_version: facts.libvirt_version.clone(),
            lock_manager: facts.lock_manager.clone(),
            describe: format!(
                "vmha-agent {}, libvirt {}, {} CPUs, {} MiB",
                r.agent_version,
                facts.libvirt_version,
                facts.cpus,
                facts.memory_total_kib / 1024
            ),
        };
        let stamp = match c.step(Input::Register(registration)).await? {
            Reply::Registered { stamp } => stamp,
            Reply::Refused(r) => {
                tracing::warn!(host = %host, "registration refused: {r}");
                return Err(refusal(r));
            }
            other => return Err(unexpected("register", &other).into()),
        };
        if let Some(t) = cert_not_after {
            c.set_host_cert_expiry(&host, t);
        }
        let named = host.clone();
        if let Some(view) = c.read(move |s| s.hosts.get(&named).cloned()).await? {
            c.write(Write::Host { host: view, hypervisor_version: facts.hypervisor_version.clone() });
        }
        let t = c.timings;
        Ok(Response::new(RegisterResponse {
            epoch: c.epoch,
            heartbeat_interval_ms: t.heartbeat_interval_ms,
            stamp_ms: stamp.0,
            timings: Some(Timings {
                heartbeat_interval_ms: t.heartbeat_interval_ms,
                lease_ttl_ms: t.lease_ttl_ms,
                fence_margin_ms: t.fence_margin_ms,
                max_transit_ms: t.max_transit_ms,
                guard_ms: t.guard_ms,
            }),
        }))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        // A standby refuses before it reads anything: what a host sends is untrusted, and a
        // standby must outlive whatever a heartbeat holds. Transit is measured to here.
        let c = self.controller()?;
        let arrived = Some(c.now());
        let host = self.access.agent_host(&req)?;
        self.limits.heartbeat.admit(&host)?;
        let r = req.into_inner();
        let domains = validate::reported_domains(&r.domains)?;
        validate::probes(&r.probes)?;
        if let Some(f) = &r.facts {
            validate::facts(f)?;
        }
        if let Some(w) = &r.watchdog {
            validate::short_text("the watchdog device", &w.device)?;
            validate::short_text("the watchdog problem", &w.problem)?;
        }
        // A definition that fails the checks is not kept, and the heartbeat goes on: a VM with
        // a passthrough device must not cost its host its lease. The engine says it once.
        let (mut xml, mut xml_refused) = (Vec::new(), Vec::new());
        for d in r.domains.iter().filter(|d| !d.xml.is_empty()) {
            let uuid = d.uuid.to_lowercase();
            match self.definitions.check(&d.xml, &uuid) {
                Ok(disks) => xml.push((uuid, d.xml.clone(), disks)),
                Err(refused) => xml_refused.push((uuid, refused.to_string())),
            }
        }
        let hb = Heartbeat {
            host,
            echo: (r.echo_stamp_ms > 0).then_some(Echo {
                epoch: r.echo_epoch,
                stamp: Millis(r.echo_stamp_ms),
                held_ms: r.echo_held_ms,
            }),
            resources: r.facts.as_ref().map(|f| (resources(f), f.lock_manager.clone())),
            watchdog: watchdog(r.watchdog.as_ref()),
            probes: r
                .probes
                .iter()
                .map(|p| Probe { name: p.name.clone(), ok: p.ok, detail: p.detail.clone() })
                .collect(),
            domains: (!r.domains_unknown).then_some(domains),
            xml,
            xml_refused,
            roster_known: r.roster_version,
            self_fenced: r.self_fenced,
            arrived,
            seq: r.seq,
        };
        let lease = match c.step(Input::Heartbeat(hb)).await? {
            Reply::Lease(l) => l,
            Reply::Refused(r) => return Err(refusal(r)),
            other => return Err(unexpected("heartbeat", &other).into()),
        };
        // At 1000 hosts the whole roster is ~40 kB, and ~400 kB with 10,000 protected VMs: an
        // agent gets only what changed since the version it holds.
        let peer = |(host, address): &(String, String)| Peer { host: host.clone(), address: address.clone() };
        let mut answer = HeartbeatResponse { roster_version: lease.roster.version, ..Default::default() };
        match &lease.roster_update {
            RosterUpdate::Unchanged { .. } => answer.roster_unchanged = true,
            RosterUpdate::Whole(r) => {
                answer.peers = r.peers.iter().map(peer).collect();
                answer.protected_uuids = r.protected.clone();
            }
            RosterUpdate::Changes {
                from,
                to: _,
                peers_set,
                peers_removed,
                protected_added,
                protected_removed,
            } => {
                answer.roster_changes = true;
                answer.roster_base = *from;
                answer.peers = peers_set.iter().map(peer).collect();
                answer.peers_removed = peers_removed.clone();
                answer.protected_uuids = protected_added.clone();
                answer.protected_removed = protected_removed.clone();
            }
        }
        let (lease_ttl_ms, refused) = match lease.answer {
            LeaseAnswer::Granted { ttl_ms, .. } => (ttl_ms, String::new()),
            LeaseAnswer::Refused { reason, .. } => (0, reason.to_string()),
        };
        Ok(Response::new(HeartbeatResponse {
            epoch: c.epoch,
            lease_ttl_ms,
            stamp_ms: lease.answer.stamp().0,
            refused,
            next_heartbeat_in_ms: lease.next_in_ms,
            cluster_hosts: lease.cluster_hosts,
            xml_not_taken: lease.xml_not_taken,
            ..answer
        }))
    }

    type CommandsStream = Pin<Box<dyn Stream<Item = Result<Command, Status>> + Send + 'static>>;

    async fn commands(
        &self,
        req: Request<CommandsRequest>,
    ) -> Result<Response<Self::CommandsStream>, Status> {
        let host = self.access.agent_host(&req)?;
        let named = host.clone();
        if !self.controller()?.read(move |s| s.hosts.contains_key(&named)).await? {
            return Err(
                Error::Precondition(format!("host {host} has not registered with this controller")).into()
            );
        }
        let rx = self.controller()?.connect_agent(&host);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_progress(&self, req: Request<OperationProgress>) -> Result<Response<Ack>, Status> {
        let host = self.access.agent_host(&req)?;
        self.controller()?.progress(&host, req.into_inner())?;
        Ok(Response::new(Ack {}))
    }

    async fn report_result(&self, req: Request<OperationResult>) -> Result<Response<Ack>, Status> {
        let host = self.access.agent_host(&req)?;
        let r = req.into_inner();
        validate::short_text("the operation's error", &r.error)?;
        let id = OpId::parse(&r.operation_id)
            .ok_or_else(|| Error::Invalid(format!("'{}' is not an operation id", r.operation_id)))?;
        let result = if r.ok {
            Ok(Done { elapsed_ms: r.elapsed_ms, downtime_ms: r.downtime_ms, bytes: r.bytes })
        } else {
            Err(r.error)
        };
        match self.controller()?.step(Input::Result { host, id, result }).await? {
            Reply::Refused(r) => Err(refusal(r)),
            _ => Ok(Response::new(Ack {})),
        }
    }
}
