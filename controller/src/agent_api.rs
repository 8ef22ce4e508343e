//! The agents' side of the gRPC API. Every handler takes the host from the connection
//! (`AgentApi::caller`: the agent's certificate), validates the message, and hands it to the engine as one input.
//! Register and heartbeat answer from memory and never wait for PostgreSQL: an agent must not
//! lose its lease because the database is away (what they change is queued, see `journal`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use vmha_engine::lease::{self, LeaseAnswer};
use vmha_engine::roster::RosterUpdate;
use vmha_engine::step::{Input, Reply};
use vmha_proto::v1::agent_service_server::AgentService;
use vmha_proto::v1::*;

use vmha_tls::Identity;

use crate::access::Access;
use crate::controller::Controller;
use crate::domain_xml::DomainRules;
use crate::errors::{Error, refusal, unexpected};
use crate::host_message;
use crate::journal::Write;
use crate::node::Node;
use crate::rate_limit::AgentLimits;

pub struct AgentApi {
    /// A standby refuses every call, naming the leader: the agent goes there.
    node: Arc<Node>,
    /// What a domain definition may contain (the controller's flags).
    definitions: DomainRules,
    /// How it knows which host calls.
    access: Access,
    limits: AgentLimits,
}

/// When a request reached the controller, stamped before its message is decoded or waits for
/// anything: what a heartbeat spends queued in this process is not time in flight.
#[derive(Clone, Copy, Debug)]
pub struct Arrived(pub Instant);

/// Stamps every agent request's arrival (`Arrived`).
pub fn stamp_arrival(mut req: Request<()>) -> Result<Request<()>, Status> {
    req.extensions_mut().insert(Arrived(Instant::now()));
    Ok(req)
}

impl AgentApi {
    pub fn new(node: Arc<Node>, definitions: DomainRules, access: Access) -> AgentApi {
        AgentApi { node, definitions, access, limits: AgentLimits::default() }
    }

    fn controller(&self) -> Result<&Arc<Controller>, Error> {
        self.node.leader()
    }

    /// The host that calls (`Access::agent`) and its certificate, unless the host was removed
    /// after that certificate was issued (`vmha host remove` revokes what the host had).
    fn caller<T>(&self, req: &Request<T>) -> Result<(String, Option<Identity>), Error> {
        let (host, cert) = self.access.agent(req)?;
        if let Some(why) = cert.as_ref().and_then(|c| self.node.removed_since_issued(&host, c.not_before)) {
            return Err(Error::PermissionDenied(why));
        }
        Ok((host, cert))
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let (host, cert) = self.caller(&req)?;
        let r = req.into_inner();
        let registration = host_message::registration(&host, &r)?;
        let c = self.controller()?;
        // Counted only here, where a registration is taken: the attempts an agent makes while
        // no controller leads (a takeover) must not spend the allowance it needs once one does.
        self.limits.register.admit(&host)?;
        let stamp = match c.step(Input::Register(registration)).await? {
            Reply::Registered { stamp } => stamp,
            Reply::Refused(r) => {
                tracing::warn!(host = %host, "registration refused: {r}");
                return Err(refusal(r));
            }
            other => return Err(unexpected("register", &other).into()),
        };
        if let Some(cert) = cert {
            c.set_host_cert_expiry(&host, cert.not_after);
        }
        let named = host.clone();
        if let Some(view) = c.read(move |s| s.hosts.get(&named).cloned()).await? {
            let hypervisor_version = r.facts.map(|f| f.hypervisor_version).unwrap_or_default();
            c.write(Write::Host { host: view, hypervisor_version });
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
        let arrived_at = req.extensions().get::<Arrived>().map_or_else(Instant::now, |a| a.0);
        let arrived = c.millis_at(arrived_at);
        let host = self.caller(&req)?.0;
        self.limits.heartbeat.admit(&host)?;
        let r = req.into_inner();
        let hb = host_message::heartbeat(host, &r, &self.definitions, Some(arrived))?;
        let transit = hb.echo.filter(|e| e.epoch == c.epoch).and_then(|e| lease::transit_bound(arrived, &e));
        let lease = match c.step(Input::Heartbeat(hb)).await? {
            Reply::Lease(l) => l,
            Reply::Refused(r) => return Err(refusal(r)),
            other => return Err(unexpected("heartbeat", &other).into()),
        };
        crate::metrics::METRICS
            .heartbeat(transit.map(std::time::Duration::from_millis), arrived_at.elapsed());
        // At 1000 hosts the whole roster is ~40 kB, and ~400 kB with 10,000 protected VMs: an
        // agent gets only what changed since the version it holds.
        let peer = |(host, address): &(String, String)| Peer { host: host.clone(), address: address.clone() };
        let mut answer = HeartbeatResponse { roster_version: lease.roster.version, ..Default::default() };
        if let Some(crl) = self.node.crl().filter(|crl| crl.number > r.crl_number) {
            answer.crl = crl.der().to_vec();
        }
        if let Some((version, probes)) = &lease.service_probes {
            answer.probes_sent = true;
            answer.probes_version = *version;
            answer.probes = (probes.iter())
                .map(|(uuid, ps)| VmProbes {
                    uuid: uuid.clone(),
                    probes: ps.iter().map(crate::service_probes::to_api).collect(),
                })
                .collect();
        }
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
        let host = self.caller(&req)?.0;
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
        let host = self.caller(&req)?.0;
        self.controller()?.progress(&host, req.into_inner())?;
        Ok(Response::new(Ack {}))
    }

    async fn report_result(&self, req: Request<OperationResult>) -> Result<Response<Ack>, Status> {
        let host = self.caller(&req)?.0;
        let (id, result) = host_message::result(req.into_inner())?;
        match self.controller()?.step(Input::Result { host, id, result }).await? {
            Reply::Refused(r) => Err(refusal(r)),
            _ => Ok(Response::new(Ack {})),
        }
    }
}
