//! One agent's conversation with the controller: register, heartbeat every interval, take
//! pushed commands and report their outcome. On any failure it moves to the next controller
//! endpoint; a controller that goes away never stops a VM here.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use vmha_engine::Timings;
use vmha_engine::selffence::StaleEpoch;
use vmha_proto::v1::agent_service_client::AgentServiceClient;
use vmha_proto::v1::{CommandsRequest, Domain, HeartbeatRequest, HostFacts, RegisterRequest};
use vmha_tls::Transport;
use vmha_tls::transport::Expect;

use crate::bounded::{Blocking, Outcome};

use crate::config::Config;
use crate::executor;
use crate::hypervisor::Hypervisor;
use crate::lease::{AnswerRefused, LeaseShell, roster_update};
use crate::probes::ProbeBoard;

/// The heartbeat's calls into libvirt, and what they last returned.
#[derive(Default)]
pub struct Reporting {
    seq: u64,
    listing: Blocking<Result<(HostFacts, Vec<Domain>), crate::hypervisor::HypervisorError>>,
    facts_call: Blocking<Result<HostFacts, crate::hypervisor::HypervisorError>>,
    facts: Option<HostFacts>,
}

/// The pause before the next controller endpoint, and after a round of all of them failed.
const NEXT_PAUSE: Duration = Duration::from_millis(100);
const ROUND_PAUSE: Duration = Duration::from_millis(500);

/// Why a session with a controller ended; the agent then goes on to the next one (or to the
/// leader a standby named).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Connect(#[from] vmha_tls::TlsError),
    #[error("host name '{host}' is not a valid header value: {source}")]
    HostName { host: String, source: tonic::metadata::errors::InvalidMetadataValue },
    #[error("libvirt has not answered since the agent started; is libvirtd running?")]
    NoFacts,
    /// Kept whole: a standby's refusal names the leader in its metadata (`leader_named`).
    #[error("{call}: {source}")]
    Rpc { call: &'static str, source: tonic::Status },
    #[error("the controller at {endpoint} sent no timings (an older controller?)")]
    NoTimings { endpoint: String },
    #[error("refusing the controller at {endpoint}: {why}")]
    Timings { endpoint: String, why: String },
    #[error("refusing the controller at {endpoint}: {source}")]
    Deposed { endpoint: String, source: StaleEpoch },
    #[error("the controller at {endpoint} closed the command stream")]
    StreamClosed { endpoint: String },
    #[error("listing the domains panicked: {0}")]
    ListingPanicked(String),
    #[error("heartbeat timed out after {0:?}")]
    HeartbeatTimedOut(Duration),
    #[error("refusing the heartbeat answer: {0}")]
    Answer(#[from] AnswerRefused),
}

/// `Rpc` for a call to the controller, named `call`.
fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> SessionError {
    move |source| SessionError::Rpc { call, source }
}

/// The leader a standby named in its refusal (see `vmha_proto::LEADER_HEADER`).
fn leader_named(e: &SessionError) -> Option<String> {
    let SessionError::Rpc { source: status, .. } = e else { return None };
    let leader = status.metadata().get(vmha_proto::LEADER_HEADER)?.to_str().ok()?;
    Some(leader.to_string())
}

/// How long a heartbeat waits for libvirt's domain list: half an interval, so that a hung
/// libvirtd delays no heartbeat past its slot.
fn listing_timeout(interval: Duration) -> Duration {
    (interval / 2).min(Duration::from_secs(2))
}

/// With `--insecure-dev` only, stamps every request with this host's name; with mutual TLS
/// the controller reads the host from the certificate and no header is sent.
#[derive(Clone)]
pub struct HostHeader(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for HostHeader {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(host) = &self.0 {
            req.metadata_mut().insert(vmha_proto::HOST_HEADER, host.clone());
        }
        Ok(req)
    }
}

pub type Client = AgentServiceClient<InterceptedService<Channel, HostHeader>>;

pub struct Agent {
    pub cfg: Config,
    pub hv: Arc<dyn Hypervisor>,
    /// Held while a report is taken and sent, so that a report taken before a command's effect
    /// can never reach the controller after the command's result (see `executor`).
    report_lock: tokio::sync::Mutex<Reporting>,
    pub lease: Arc<LeaseShell>,
    /// The newest answer's epoch, stamp and arrival: echoed by the next heartbeat.
    last_answer: Mutex<Option<(u64, u64, Instant)>>,
    /// Hash of each domain's XML as last sent in this session.
    sent_xml: Mutex<HashMap<String, u64>>,
    /// The health probes' latest results, filled by `probes::run` (empty if it is not
    /// running, as in tests that drive an agent without probes).
    pub probes: Arc<ProbeBoard>,
    /// The protected guests' heartbeats, filled by `guest_watch::run` (empty if it is not
    /// running).
    pub guests: Arc<crate::guest_watch::GuestBoard>,
    /// How it reaches the controller: with this host's certificate, accepting only a
    /// controller's.
    transport: Transport,
    /// Set when the certificate was reloaded: the next session presents the new one.
    reconnect: tokio::sync::Notify,
    /// The cluster's CRL (`None` with --insecure-dev).
    revocation: Option<Arc<crate::revocation::Revocation>>,
}

impl Agent {
    pub fn new(
        cfg: Config,
        hv: Arc<dyn Hypervisor>,
        lease: Arc<LeaseShell>,
        transport: Transport,
    ) -> Arc<Agent> {
        let revocation = match &transport {
            Transport::Mtls(creds) => Some(Arc::new(crate::revocation::Revocation::new(
                creds.clone(),
                cfg.state_dir.as_deref(),
                cfg.libvirt_crl.clone(),
            ))),
            Transport::InsecureDev => None,
        };
        Arc::new(Agent {
            revocation,
            transport,
            reconnect: tokio::sync::Notify::new(),
            cfg,
            hv,
            report_lock: tokio::sync::Mutex::new(Reporting::default()),
            lease,
            last_answer: Mutex::default(),
            sent_xml: Mutex::default(),
            probes: Arc::default(),
            guests: Arc::default(),
        })
    }

    /// After a renewed certificate was loaded: the controller reads the host's certificate
    /// (and its expiry) when a connection is made, so make a new one.
    pub fn reconnect(&self) {
        self.reconnect.notify_one();
    }

    fn answer_received(&self, epoch: u64, stamp: u64) {
        *self.last_answer.lock().unwrap_or_else(|p| p.into_inner()) = Some((epoch, stamp, Instant::now()));
    }

    /// Runs forever, following the leader: a standby names it, and the agent goes there;
    /// otherwise it tries the configured endpoints in turn, pausing after each full round.
    pub async fn run(self: Arc<Self>) {
        let configured = &self.cfg.controllers;
        let mut next = 0usize;
        let mut named: Option<String> = None;
        loop {
            let endpoint = named.take().unwrap_or_else(|| {
                next += 1;
                configured[(next - 1) % configured.len()].clone()
            });
            let result = self.clone().session(&endpoint).await;
            if let Err(e) = &result {
                // A controller that names itself is about to lead: stay with it.
                match leader_named(e) {
                    Some(leader) => {
                        if leader != endpoint {
                            tracing::info!(standby = %endpoint, %leader, "following the leader");
                        }
                        named = Some(leader);
                        tokio::time::sleep(NEXT_PAUSE).await;
                        continue;
                    }
                    None => {
                        tracing::warn!(controller = %endpoint, error = %e, "lost the controller; retrying")
                    }
                }
            }
            let pause = if next.is_multiple_of(configured.len()) { ROUND_PAUSE } else { NEXT_PAUSE };
            tokio::time::sleep(pause).await;
        }
    }

    async fn session(self: Arc<Self>, endpoint: &str) -> Result<(), SessionError> {
        let channel = self.transport.channel(endpoint, Expect::Controller, Duration::from_secs(2)).await?;
        let header = match self.transport {
            Transport::Mtls(_) => None,
            Transport::InsecureDev => Some(
                self.cfg
                    .host_name
                    .parse()
                    .map_err(|source| SessionError::HostName { host: self.cfg.host_name.clone(), source })?,
            ),
        };
        let mut client: Client = AgentServiceClient::with_interceptor(channel, HostHeader(header));

        let facts = self.facts().await?;
        let reg = client
            .register(RegisterRequest {
                migration_uri: self.cfg.migration_uri.clone(),
                facts: Some(facts),
                agent_version: env!("CARGO_PKG_VERSION").into(),
                peer_address: self.cfg.peer_address.clone(),
            })
            .await
            .map_err(rpc("register"))?
            .into_inner();
        let t = reg.timings.ok_or_else(|| SessionError::NoTimings { endpoint: endpoint.into() })?;
        let timings = Timings {
            heartbeat_interval_ms: t.heartbeat_interval_ms,
            lease_ttl_ms: t.lease_ttl_ms,
            fence_margin_ms: t.fence_margin_ms,
            max_transit_ms: t.max_transit_ms,
            guard_ms: t.guard_ms,
        };
        self.lease
            .adopt_timings(timings)
            .map_err(|why| SessionError::Timings { endpoint: endpoint.into(), why })?;
        self.lease
            .see_epoch(reg.epoch)
            .map_err(|source| SessionError::Deposed { endpoint: endpoint.into(), source })?;
        self.answer_received(reg.epoch, reg.stamp_ms);
        // A new session may be a new leader: send every definition again.
        self.sent_xml.lock().unwrap_or_else(|p| p.into_inner()).clear();
        tracing::info!(controller = %endpoint, epoch = reg.epoch, "registered");

        let mut commands =
            client.commands(CommandsRequest {}).await.map_err(rpc("open command stream"))?.into_inner();
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {
                    let wait = self.heartbeat(&mut client).await?;
                    next = tokio::time::Instant::now() + wait;
                }
                msg = commands.message() => match msg.map_err(rpc("command stream"))? {
                    Some(cmd) => {
                        if let Err(e) = self.lease.see_epoch(cmd.epoch) {
                            tracing::warn!(operation = %cmd.operation_id, "refusing a command: {e}");
                            continue;
                        }
                        tokio::spawn(executor::execute(self.clone(), client.clone(), cmd));
                    }
                    None => return Err(SessionError::StreamClosed { endpoint: endpoint.into() }),
                },
                () = self.reconnect.notified() => {
                    tracing::info!(controller = %endpoint, "reconnecting with the renewed certificate");
                    return Ok(());
                }
            }
        }
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.lease.timings().heartbeat_interval_ms)
    }

    /// The host's facts for registering; the last ones known if libvirt does not answer, so
    /// that a hung libvirtd never keeps the agent from its controller (and its lease).
    async fn facts(&self) -> Result<HostFacts, SessionError> {
        let mut r = self.report_lock.lock().await;
        let timeout = listing_timeout(self.interval());
        let hv = self.hv.clone();
        if let Outcome::Done(Ok(f)) = r.facts_call.call(timeout, move || hv.host_facts()).await {
            r.facts = Some(f);
        }
        r.facts.clone().ok_or(SessionError::NoFacts)
    }

    /// Takes a full report (facts and every domain) and sends it; returns when the leader
    /// wants the next one. When libvirt does not answer in time, the heartbeat goes anyway,
    /// saying its domain list is unknown: the lease never waits on libvirt.
    pub async fn heartbeat(&self, client: &mut Client) -> Result<Duration, SessionError> {
        let interval = self.interval();
        let mut report = self.report_lock.lock().await;
        let hv = self.hv.clone();
        let listing = report
            .listing
            .call(listing_timeout(interval), move || {
                Ok::<_, crate::hypervisor::HypervisorError>((hv.host_facts()?, hv.domains()?))
            })
            .await;
        let (facts, mut domains, domains_unknown) = match listing {
            Outcome::Done(Ok((facts, domains))) => {
                report.facts = Some(facts.clone());
                (Some(facts), domains, false)
            }
            Outcome::Done(Err(e)) => {
                tracing::warn!(error = %e, "libvirt: cannot list the domains; reporting them as unknown");
                (report.facts.clone(), Vec::new(), true)
            }
            Outcome::Hung(d) => {
                tracing::warn!(
                    for_ms = d.as_millis() as u64,
                    "libvirt does not answer; reporting the domains as unknown"
                );
                (report.facts.clone(), Vec::new(), true)
            }
            Outcome::Panicked(e) => return Err(SessionError::ListingPanicked(e)),
        };
        for d in &mut domains {
            d.guest = self.guests.health(&d.uuid);
        }
        let mut sending = Vec::new();
        {
            let sent = self.sent_xml.lock().unwrap_or_else(|p| p.into_inner());
            for d in &mut domains {
                let mut h = DefaultHasher::new();
                d.xml.hash(&mut h);
                let hash = h.finish();
                if sent.get(&d.uuid) == Some(&hash) {
                    d.xml.clear();
                } else {
                    sending.push((d.uuid.clone(), hash));
                }
            }
        }
        report.seq += 1;
        let last = *self.last_answer.lock().unwrap_or_else(|p| p.into_inner());
        let (echo_epoch, echo_stamp_ms, echo_held_ms) = match last {
            Some((epoch, stamp, at)) => (epoch, stamp, at.elapsed().as_millis() as u64),
            None => (0, 0, 0),
        };
        let req = HeartbeatRequest {
            seq: report.seq,
            facts,
            domains,
            domains_unknown,
            watchdog: Some(self.lease.watchdog_status()),
            echo_epoch,
            echo_stamp_ms,
            echo_held_ms,
            self_fenced: self.lease.self_fenced(),
            probes: self.probes.latest(),
            roster_version: Some(self.lease.roster_version()),
            crl_number: self.revocation.as_ref().map_or(0, |r| r.number()),
            probes_version: self.guests.probes_version(),
        };
        // The lease runs from here: the send, not the answer.
        let sent_at = self.lease.now();
        let mut answer = tokio::time::timeout(interval * 2, client.heartbeat(req))
            .await
            .map_err(|_| SessionError::HeartbeatTimedOut(interval * 2))?
            .map_err(rpc("heartbeat"))?
            .into_inner();
        // What the controller did not take is sent again with the next heartbeat.
        let not_taken: std::collections::HashSet<&str> =
            answer.xml_not_taken.iter().map(String::as_str).collect();
        self.sent_xml
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(sending.into_iter().filter(|(uuid, _)| !not_taken.contains(uuid.as_str())));
        if answer.lease_ttl_ms == 0 {
            tracing::warn!(reason = %answer.refused, "heartbeat earned no lease");
        }
        let roster = roster_update(&mut answer);
        self.lease.answered(
            answer.epoch,
            sent_at,
            answer.lease_ttl_ms,
            answer.cluster_hosts as usize,
            roster,
        )?;
        // Echoed only once taken whole (see `LeaseShell::answered`).
        self.answer_received(answer.epoch, answer.stamp_ms);
        if answer.probes_sent {
            self.guests.set_probes(answer.probes_version, std::mem::take(&mut answer.probes));
        }
        if let Some(r) = self.revocation.clone().filter(|_| !answer.crl.is_empty()) {
            let crl = std::mem::take(&mut answer.crl);
            tokio::spawn(async move { r.offered(&crl).await });
        }
        let wait = Duration::from_millis(answer.next_heartbeat_in_ms);
        Ok(if wait.is_zero() || wait > interval * 2 { interval } else { wait })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standbys_refusal_names_the_leader_to_follow() {
        let mut refusal = tonic::Status::unavailable("this controller stands by");
        refusal.metadata_mut().insert(vmha_proto::LEADER_HEADER, "https://ctl2:7443".parse().unwrap());
        assert_eq!(leader_named(&rpc("register")(refusal)), Some("https://ctl2:7443".into()));
        assert_eq!(leader_named(&rpc("heartbeat")(tonic::Status::unavailable("down"))), None);
        assert_eq!(leader_named(&SessionError::NoFacts), None);
    }
}
