//! The agents' side of the gRPC API. Every handler takes the host from the connection
//! (`validate::agent_host`), validates the message, and hands it to the controller.
//! Register and heartbeat answer from memory and never wait for PostgreSQL: an agent must not
//! lose its lease because the database is away (what they change is queued, see `journal`).

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use vmha_engine::cluster::HostResources;
use vmha_engine::drain::{self, Probe};
use vmha_engine::lease::{self, Echo, LeaseAnswer};
use vmha_engine::{HostView, Millis, Watchdog, inventory, recovery};
use vmha_proto::v1::agent_service_server::AgentService;
use vmha_proto::v1::*;

use crate::controller::Controller;
use crate::journal::Write;
use crate::validate;

pub struct AgentApi(pub Arc<Controller>);

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
        let host = validate::agent_host(&req)?;
        let r = req.into_inner();
        validate::migration_uri(&r.migration_uri)?;
        validate::peer_address(&r.peer_address)?;
        let facts = r.facts.ok_or_else(|| Status::invalid_argument("register without host facts"))?;
        let c = &self.0;
        let now = c.now();
        let (view, stamp) = c.update(|s| {
            lease::observe_quorum(s, now);
            let h = s.hosts.entry(host.clone()).or_insert_with(|| HostView::new(&host));
            h.migration_uri = r.migration_uri.clone();
            h.peer_address = r.peer_address.clone();
            h.resources = resources(&facts);
            h.libvirt_version = facts.libvirt_version.clone();
            h.lock_manager = facts.lock_manager.clone();
            h.last_heartbeat = Some(now);
            let view = h.clone();
            (view, lease::issue_stamp(s, &host, now))
        });
        c.write(Write::Host { host: view, hypervisor_version: facts.hypervisor_version.clone() });
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
        );
        let t = c.timings();
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
        let host = validate::agent_host(&req)?;
        let r = req.into_inner();
        let domains = validate::reported_domains(&r.domains)?;
        let echo = (r.echo_stamp_ms > 0).then_some(Echo {
            epoch: r.echo_epoch,
            stamp: Millis(r.echo_stamp_ms),
            held_ms: r.echo_held_ms,
        });
        let c = &self.0;
        let now = c.now();
        let outcome = c.update(|s| {
            let Some(h) = s.hosts.get_mut(&host) else {
                return Err(Status::failed_precondition(format!(
                    "host {host} has not registered with this controller"
                )));
            };
            h.last_heartbeat = Some(now);
            if let Some(f) = &r.facts {
                h.resources = resources(f);
                h.lock_manager = f.lock_manager.clone();
            }
            let wd = watchdog(r.watchdog.as_ref());
            let wd_changed = (h.watchdog != wd).then(|| wd.clone());
            h.watchdog = wd;
            let probes =
                r.probes.iter().map(|p| Probe { name: p.name.clone(), ok: p.ok, detail: p.detail.clone() });
            drain::on_probes(s, &host, probes.collect(), now);
            // Without its domain list (libvirt did not answer the agent) a report says nothing
            // about the VMs: the last one stands.
            let (actions, changes) = if r.domains_unknown {
                (Vec::new(), Vec::new())
            } else {
                let (mut actions, stale) = recovery::on_report(s, &host, &domains, now);
                let kept: Vec<_> = domains.iter().filter(|d| !stale.contains(&d.uuid)).cloned().collect();
                let changes = inventory::apply_report(s, &host, &kept, now);
                actions.extend(recovery::after_report(s, &host, &changes, now));
                (actions, changes)
            };
            // After the report: a host declared dead earns a lease again only with a report of
            // its domains, and this one may be it.
            let answer = lease::on_heartbeat(s, &host, echo, now);
            let mut new_xml = Vec::new();
            for d in r.domains.iter().filter(|d| !d.xml.is_empty()) {
                let uuid = d.uuid.to_lowercase();
                if let Some(vm) = s.vms.get_mut(&uuid).filter(|vm| vm.xml != d.xml) {
                    vm.xml = d.xml.clone();
                    new_xml.push((uuid, d.xml.clone()));
                }
            }
            let peers = s
                .hosts
                .values()
                .map(|h| Peer { host: h.name.clone(), address: h.peer_address.clone() })
                .collect();
            let protected = s.vms.values().filter(|v| v.protected).map(|v| v.uuid.clone()).collect();
            Ok((answer, changes, actions, new_xml, peers, protected, s.hosts.len() as u32, wd_changed))
        })?;
        let (answer, changes, actions, new_xml, peers, protected_uuids, cluster_hosts, wd_changed) = outcome;
        if let Some(wd) = wd_changed {
            let message = match &wd {
                Watchdog::Armed { device, timeout_ms } => {
                    format!(
                        "{host}'s watchdog is armed ({device}, {timeout_ms} ms): a dead or hung agent gets the host reset"
                    )
                }
                Watchdog::Missing(why) => format!(
                    "{host} has no working watchdog ({why}): if it fails, its VMs wait for a fence or `vmha host \
                     confirm-down {host}`"
                ),
                Watchdog::Unknown => format!("{host}'s watchdog is unknown"),
            };
            c.event("host", &host, "watchdog", message, "controller");
            c.write(Write::Watchdog { host: host.clone(), watchdog: wd });
        }
        c.persist_inventory(changes, &host);
        for (uuid, xml) in new_xml {
            c.write(Write::VmXml { uuid, xml });
        }
        if !actions.is_empty() {
            // Not awaited: an action may wait for the database, the answer must not.
            let c = c.clone();
            tokio::spawn(async move { c.perform(actions).await });
        }
        let interval = c.timings().heartbeat_interval_ms;
        // Align every host's heartbeats on the leader's clock, so that their leases end
        // together if the leader goes away (see controller/engine/SAFETY.md).
        let mut next = interval - now.0 % interval;
        if next < interval / 4 {
            next += interval;
        }
        let (lease_ttl_ms, refused) = match answer {
            LeaseAnswer::Granted { ttl_ms, .. } => (ttl_ms, String::new()),
            LeaseAnswer::Refused { reason, .. } => (0, reason.to_string()),
        };
        Ok(Response::new(HeartbeatResponse {
            epoch: c.epoch,
            lease_ttl_ms,
            stamp_ms: answer.stamp().0,
            refused,
            next_heartbeat_in_ms: next,
            cluster_hosts,
            peers,
            protected_uuids,
        }))
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
