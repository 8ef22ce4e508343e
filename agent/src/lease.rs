//! The shell around the pure lease state machine (`vmha_engine::selffence`): feeds it the
//! clock, grants and peer polls, and carries out its decisions: destroying this host's
//! protected VMs when it must self-fence (through libvirt, and by killing their QEMU
//! processes directly when libvirt does not answer), and feeding the host's watchdog only
//! while the machine says it may.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use vmha_engine::roster::{Roster as EngineRoster, RosterUpdate};
use vmha_engine::selffence::{Decision, LeaseKeeper, PeerAnswer, Phase, Poll, RelayedFact, StaleEpoch};
use vmha_engine::{Millis, Timings};
use vmha_proto::v1::peer_service_client::PeerServiceClient;
use vmha_proto::v1::{LeaseStatusRequest, Peer, WatchdogStatus};
use vmha_tls::Transport;
use vmha_tls::transport::Expect;

use crate::config::WatchdogConfig;
use crate::hypervisor::Hypervisor;
use crate::{qemu, watchdog};

/// How often the state machine is asked what to do (and the watchdog fed).
const TICK: Duration = Duration::from_millis(50);
/// How long a self-fence waits for libvirt before killing QEMU processes itself.
const LIBVIRT_FENCE_TIMEOUT: Duration = Duration::from_millis(500);
/// Connections kept for peer polls are closed once no poll went out for this long: they serve
/// the rounds of one outage (seconds apart), and kept forever every agent would end up holding
/// one to every peer.
const IDLE_CHANNELS: Duration = Duration::from_secs(30);
/// How many connections an agent makes in a second to the peers it keeps them to
/// (`keep_warm`): handshakes cost CPU that the heartbeats need too.
const WARMED_PER_SECOND: usize = 50;

pub struct LeaseShell {
    origin: Instant,
    /// `origin` on CLOCK_MONOTONIC, for the lease file libvirt's hook reads (`hook`).
    origin_ns: u64,
    host: String,
    keeper: Mutex<LeaseKeeper>,
    peers: Mutex<Vec<Peer>>,
    /// One connection per peer (by host and address), kept across polls: a poll is a few
    /// RPCs, not a few TLS handshakes. Dropped when a call on it fails, the peer is no longer
    /// listed at that address, or polls stopped (`IDLE_CHANNELS`).
    channels: Mutex<HashMap<(String, String), Channel>>,
    protected: Mutex<BTreeSet<String>>,
    /// The leader's roster as this agent holds it (version 0: none yet in this run), from
    /// which `peers` and `protected` are taken.
    roster: Mutex<EngineRoster>,
    /// Where the protected list and the leader's timings are kept across restarts: an agent
    /// restarted while cut off from the controller must still know what to destroy, and on
    /// which timings, if it has to self-fence.
    state_dir: Mutex<Option<PathBuf>>,
    watchdog_cfg: Option<WatchdogConfig>,
    /// Opened (armed) at the first moment it may be fed, so that a host whose agent never got a
    /// lease is not reset by a watchdog nobody could feed.
    watchdog: Mutex<Option<watchdog::Device>>,
    watchdog_problem: Mutex<Option<String>>,
    /// Whether this host's guests are QEMU processes to look for in /proc when fenced: not
    /// for the simulated hosts of `vmha-simagent`, hundreds of which share one machine.
    qemu_processes: std::sync::atomic::AtomicBool,
}

impl LeaseShell {
    pub fn new(host: &str, timings: Timings, watchdog_cfg: Option<WatchdogConfig>) -> Arc<LeaseShell> {
        Arc::new(LeaseShell {
            origin: Instant::now(),
            origin_ns: crate::hook::monotonic_ns(),
            host: host.into(),
            // A seed of its own per agent: it spreads the agents' polls over time and peers.
            keeper: Mutex::new(LeaseKeeper::new(host, timings, Millis(0), RandomState::new().hash_one(host))),
            peers: Mutex::default(),
            channels: Mutex::default(),
            protected: Mutex::default(),
            roster: Mutex::default(),
            state_dir: Mutex::default(),
            watchdog_cfg,
            watchdog: Mutex::default(),
            watchdog_problem: Mutex::default(),
            qemu_processes: true.into(),
        })
    }

    /// For a simulated host: its guests are no processes, its hypervisor's destroy is the fence.
    pub fn without_qemu_processes(&self) {
        self.qemu_processes.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Keeps the protected list and the timings in `dir`, starting from what it holds.
    pub fn remember_in(&self, dir: PathBuf) {
        let file = dir.join("protected");
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let known: BTreeSet<String> =
                    text.lines().filter(|l| !l.is_empty()).map(String::from).collect();
                tracing::info!(file = %file.display(), protected = known.len(), "protected VMs as last known");
                *lock(&self.protected) = known;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = %file.display(), error = %e, "cannot read the protected VM list"),
        }
        match std::fs::read_to_string(dir.join("timings")).map(|t| parse_timings(&t)) {
            Ok(Some(t)) => {
                tracing::info!(?t, "the leader's timings as last known");
                self.keeper().set_timings(t);
            }
            Ok(None) => tracing::warn!(dir = %dir.display(), "the saved timings are not readable; ignored"),
            Err(_) => {}
        }
        *lock(&self.state_dir) = Some(dir);
        // This run holds no lease yet, whatever an earlier one wrote.
        self.save(crate::hook::LEASE_FILE, "none\n".into());
    }

    /// Writes `text` to `name` in the state directory, aside and renamed, so a crash never
    /// leaves half a file.
    fn save(&self, name: &str, text: String) {
        let Some(dir) = lock(&self.state_dir).clone() else { return };
        let file = dir.join(name);
        let tmp = file.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &file)) {
            tracing::warn!(file = %file.display(), error = %e, "cannot save agent state");
        }
    }

    pub fn now(&self) -> Millis {
        Millis(self.origin.elapsed().as_millis() as u64)
    }

    fn keeper(&self) -> std::sync::MutexGuard<'_, LeaseKeeper> {
        lock(&self.keeper)
    }

    pub fn timings(&self) -> Timings {
        self.keeper().timings()
    }

    /// Takes the leader's timings (at registration), or refuses them when this host's
    /// watchdog cannot keep the rule under them.
    pub fn adopt_timings(&self, t: Timings) -> Result<(), String> {
        t.validate().map_err(|e| format!("the controller's timings are not valid: {e}"))?;
        if let Some(timeout) = self.watchdog_timeout() {
            t.check_watchdog(timeout.as_millis() as u64).map_err(|e| e.to_string())?;
        }
        let mut k = self.keeper();
        if k.timings() != t {
            tracing::info!(?t, "running on the leader's timings");
            k.set_timings(t);
            drop(k);
            // A device opened on the timings an earlier leader sent is judged again on these
            // (else a host keeps reporting "does not fit" after the leader changed timings).
            if let Some(d) = lock(&self.watchdog).as_ref() {
                *lock(&self.watchdog_problem) =
                    t.check_watchdog(d.timeout().as_millis() as u64).err().map(|e| e.to_string());
            }
            self.save(
                "timings",
                format!(
                    "heartbeat_interval_ms = {}\nlease_ttl_ms = {}\nfence_margin_ms = {}\nmax_transit_ms = {}\nguard_ms = {}\n",
                    t.heartbeat_interval_ms, t.lease_ttl_ms, t.fence_margin_ms, t.max_transit_ms, t.guard_ms
                ),
            );
        }
        Ok(())
    }

    /// The timeout the watchdog has (once armed) or will be asked for.
    fn watchdog_timeout(&self) -> Option<Duration> {
        let armed = lock(&self.watchdog).as_ref().map(|d| d.timeout());
        armed.or(self.watchdog_cfg.as_ref().map(|c| c.timeout))
    }

    /// The newest leader epoch this agent has seen.
    pub fn newest_epoch(&self) -> u64 {
        self.keeper().newest_epoch()
    }

    /// Takes note of a leader's epoch (registration, command); refused when it is older than
    /// the newest seen.
    pub fn see_epoch(&self, epoch: u64) -> Result<(), StaleEpoch> {
        self.keeper().see_epoch(epoch)
    }

    /// The leader's version of the roster this agent holds, for the next heartbeat.
    pub fn roster_version(&self) -> u64 {
        lock(&self.roster).version
    }

    /// What the leader of `epoch` said in a heartbeat answer; `ttl_ms` 0 means no lease this
    /// time. A deposed leader's answer is refused whole, and so is one whose roster changes
    /// start from another version than the one held (the next answer then brings the whole
    /// roster): its stamp must not be echoed, since the leader takes an echo to mean the agent
    /// knows every VM that answer listed as protected.
    pub fn answered(
        &self,
        epoch: u64,
        sent_at: Millis,
        ttl_ms: u64,
        cluster_hosts: usize,
        update: RosterUpdate,
    ) -> Result<(), AnswerRefused> {
        let mut held = lock(&self.roster);
        let mut k = self.keeper();
        // Before the roster: a deposed leader's list must not replace the current one's.
        k.see_epoch(epoch)?;
        let base = held.version;
        if !vmha_engine::roster::apply(&mut held, &update) {
            held.version = 0;
            return Err(AnswerRefused::RosterBase { held: base });
        }
        if ttl_ms > 0 {
            if matches!(k.phase(), Phase::Fenced { .. } | Phase::Keeping { .. }) {
                tracing::warn!("lease regained");
            }
            let before = k.lease_end();
            k.granted(sent_at, ttl_ms, cluster_hosts, epoch)?;
            let end = k.lease_end().filter(|e| Some(*e) != before);
            drop(k);
            // Written for libvirt's hook: it lets protected VMs start only until then.
            if let Some(end) = end {
                self.save(
                    crate::hook::LEASE_FILE,
                    crate::hook::lease_text(self.origin_ns + end.0 * 1_000_000),
                );
            }
        } else {
            k.set_cluster_hosts(cluster_hosts);
            drop(k);
        }
        let (peers_changed, protected_changed) = match &update {
            RosterUpdate::Unchanged { .. } => (false, false),
            RosterUpdate::Whole(_) => (true, true),
            RosterUpdate::Changes {
                peers_set, peers_removed, protected_added, protected_removed, ..
            } => (
                !peers_set.is_empty() || !peers_removed.is_empty(),
                !protected_added.is_empty() || !protected_removed.is_empty(),
            ),
        };
        if peers_changed {
            let peers: Vec<Peer> = (held.peers.iter())
                .filter(|(host, _)| *host != self.host)
                .map(|(host, address)| Peer { host: host.clone(), address: address.clone() })
                .collect();
            self.keeper().set_peers(peers.iter().map(|p| p.host.clone()));
            *lock(&self.peers) = peers;
        }
        if !protected_changed {
            return Ok(());
        }
        // Changes are applied as changes: at 4,000 protected VMs, copying the whole list on
        // every answer was most of what a thousand simulated agents cost.
        let mut known = lock(&self.protected);
        match &update {
            RosterUpdate::Changes { protected_added, protected_removed, .. } => {
                for u in protected_removed {
                    known.remove(u);
                }
                known.extend(protected_added.iter().cloned());
            }
            _ if known.iter().eq(held.protected.iter()) => return Ok(()),
            _ => *known = held.protected.iter().cloned().collect(),
        }
        if lock(&self.state_dir).is_some() {
            self.save("protected", known.iter().map(|u| format!("{u}\n")).collect());
        }
        Ok(())
    }

    pub fn self_fenced(&self) -> bool {
        matches!(self.keeper().phase(), Phase::Fenced { .. })
    }

    /// Whether this host may start a VM now (it holds a lease); the reason when not.
    pub fn may_start(&self) -> Result<(), vmha_engine::selffence::NoLease> {
        let now = self.now();
        self.keeper().may_start(now)
    }

    /// This agent's own lease, from now (for its metrics).
    pub fn lease_remaining_ms(&self) -> Option<i64> {
        let now = self.now();
        self.keeper().lease_remaining_ms(now)
    }

    /// What this agent tells a polling peer.
    pub fn upper_remaining_ms(&self) -> i64 {
        let now = self.now();
        self.keeper().upper_remaining_ms(now)
    }

    /// The newest fact this agent holds, for a polling peer.
    pub fn fact(&self) -> Option<RelayedFact> {
        let now = self.now();
        self.keeper().fact(now)
    }

    /// The watchdog as the heartbeat reports it.
    pub fn watchdog_status(&self) -> WatchdogStatus {
        let device = lock(&self.watchdog);
        let problem = lock(&self.watchdog_problem);
        watchdog::status(
            self.watchdog_cfg.as_ref().map(|c| c.device.as_path()),
            device.as_ref(),
            problem.as_deref(),
        )
    }

    pub fn protected_list(&self) -> Vec<String> {
        lock(&self.protected).iter().cloned().collect()
    }

    /// Runs the state machine forever.
    pub async fn run(self: Arc<Self>, hv: Arc<dyn Hypervisor>, transport: Transport) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_poll = Instant::now();
        let mut ticks = 0u64;
        loop {
            tick.tick().await;
            ticks += 1;
            if ticks.is_multiple_of(20) {
                self.keep_warm(&transport);
            }
            let now = self.now();
            let decision = self.keeper().tick(now);
            match decision {
                Decision::Nothing => {}
                Decision::PollPeers { ask, until, .. } => {
                    last_poll = Instant::now();
                    tokio::spawn(self.clone().poll(now, ask, until, transport.clone()));
                }
                Decision::Keep { reason } => {
                    tracing::warn!(%reason, "lease expired; keeping VMs: the leader cannot have quorum");
                }
                Decision::Fence { reason } => {
                    tracing::error!(%reason, "SELF-FENCING: destroying every protected VM on this host");
                    let uuids = self.protected_list();
                    let hv = hv.clone();
                    let destroy =
                        tokio::task::spawn_blocking(move || destroy_through_libvirt(hv.as_ref(), &uuids));
                    if tokio::time::timeout(LIBVIRT_FENCE_TIMEOUT, destroy).await.is_err() {
                        tracing::error!(
                            "self-fence: libvirt does not answer; killing the QEMU processes directly"
                        );
                    }
                }
            }
            if last_poll.elapsed() > IDLE_CHANNELS {
                self.drop_unkept_channels();
            }
            if self.self_fenced() {
                self.enforce_fence();
            }
            self.feed_watchdog(now);
            // systemd's WatchdogSec: this loop still runs.
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }

    /// While fenced, no protected VM may run here: one a hung libvirtd starts late, or one
    /// libvirt failed to destroy, is killed at once. Once none is left the keeper knows, and
    /// the watchdog may be fed again; while one cannot be killed, it is not.
    fn enforce_fence(&self) {
        if !self.qemu_processes.load(std::sync::atomic::Ordering::Relaxed) {
            return self.keeper().fence_completed();
        }
        let left = qemu::kill(&self.protected_list());
        if left.is_empty() {
            self.keeper().fence_completed();
        } else {
            tracing::error!(
                ?left,
                "self-fence: QEMU processes of protected VMs survive SIGKILL; the watchdog is no longer fed"
            );
        }
    }

    fn feed_watchdog(&self, now: Millis) {
        let Some(cfg) = &self.watchdog_cfg else { return };
        let timeout = self.watchdog_timeout().unwrap_or(cfg.timeout);
        if !self.keeper().may_feed(now, timeout.as_millis() as u64) {
            return;
        }
        let mut device = lock(&self.watchdog);
        let mut problem = lock(&self.watchdog_problem);
        if device.is_none() {
            let holder = lock(&self.state_dir)
                .as_ref()
                .zip(std::env::current_exe().ok())
                .map(|(dir, exe)| watchdog::HolderSpec { exe, pid_file: dir.join("watchdog-holder.pid") });
            match watchdog::Device::open(&cfg.device, cfg.timeout, holder.as_ref()) {
                Ok(d) => {
                    // A device may set another timeout than asked. Armed, it is fed all the
                    // same, but the host is reported as without a working watchdog.
                    let fits = self.keeper().timings().check_watchdog(d.timeout().as_millis() as u64);
                    if let Err(e) = &fits {
                        tracing::error!(error = %e, "the watchdog's timeout does not fit");
                    }
                    *problem = fits.err().map(|e| e.to_string());
                    *device = Some(d);
                }
                Err(e) => {
                    if problem.as_deref() != Some(&e.to_string()) {
                        tracing::error!(error = %e, "no watchdog: this host's VMs will need a fence or confirm-down if it fails");
                        *problem = Some(e.to_string());
                    }
                    return;
                }
            }
        }
        let Some(d) = device.as_mut() else { return };
        let fed = d.feed();
        crate::metrics::METRICS.watchdog_fed(fed.is_ok());
        if let Err(e) = fed {
            tracing::error!(error = %e, "watchdog");
            *problem = Some(e.to_string());
            // Reopened at the next feed; the kernel keeps the old one armed meanwhile.
            *device = None;
        }
    }

    /// The agent is stopping (SIGTERM). With no protected VM running here the watchdog is
    /// disarmed; with one, it stays armed: the host is reset unless an agent is back and holds
    /// a lease within the watchdog's timeout (a restart is), because a host whose agent is gone
    /// would otherwise keep VMs the controller restarts elsewhere. Drain the host first to stop
    /// its agent for good.
    pub fn leave(&self) {
        let Some(device) = lock(&self.watchdog).take() else { return };
        let running = qemu::find(&self.protected_list());
        if running.is_empty() {
            if let Err(e) = device.disarm() {
                tracing::warn!(error = %e, "could not disarm the watchdog");
            }
        } else {
            let now = self.now();
            let timeout = device.timeout();
            if self.keeper().may_feed(now, timeout.as_millis() as u64) {
                let mut device = device;
                let _ = device.feed();
            }
            tracing::warn!(
                protected_running = running.len(),
                "stopping with protected VMs running: the watchdog stays armed and resets this host in {timeout:?} \
                 unless the agent is back by then (drain the host before stopping the agent for good)"
            );
        }
    }

    /// A standing volunteer makes its connections to the peers it proves with before a round
    /// needs them, a few more every second: at 1000 hosts handshakes are most of what a proof
    /// over new connections costs (bench/peerpoll).
    fn keep_warm(self: &Arc<Self>, transport: &Transport) {
        let kept: HashSet<String> = self.keeper().warm_peers().iter().cloned().collect();
        if kept.is_empty() {
            return;
        }
        // The peers' lock first, as everywhere (`poll`).
        let listed: Vec<Peer> =
            lock(&self.peers).iter().filter(|p| kept.contains(&p.host)).cloned().collect();
        let missing: Vec<Peer> = {
            let channels = lock(&self.channels);
            (listed.into_iter())
                .filter(|p| !channels.contains_key(&(p.host.clone(), p.address.clone())))
                .take(WARMED_PER_SECOND)
                .collect()
        };
        let timeout = self.connect_timeout();
        for p in missing {
            let (shell, transport) = (self.clone(), transport.clone());
            tokio::spawn(async move { shell.channel(&p, &transport, timeout).await });
        }
    }

    /// Closes the connections to peers this agent does not keep (`LeaseKeeper::kept_peers`):
    /// those a direct poll or a shortfall made. A thousand kept by every host would be a
    /// million across the cluster.
    fn drop_unkept_channels(&self) {
        let kept: HashSet<String> = self.keeper().kept_peers().iter().cloned().collect();
        lock(&self.channels).retain(|(host, _), _| kept.contains(host));
    }

    /// How long a connection to a peer may take: longer than a poll (a loaded peer), but not
    /// for ever, since a poll that keeps asking a dead peer keeps starting new ones.
    fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.timings().heartbeat_interval_ms)
    }

    /// The kept connection to `p`, or a new one. A peer is reached over mutual TLS and must
    /// present the certificate of the host it is listed as.
    async fn channel(&self, p: &Peer, transport: &Transport, timeout: Duration) -> Option<Channel> {
        let key = (p.host.clone(), p.address.clone());
        if let Some(c) = lock(&self.channels).get(&key) {
            return Some(c.clone());
        }
        let endpoint = match transport {
            Transport::Mtls(_) => format!("https://{}", p.address),
            Transport::InsecureDev => format!("http://{}", p.address),
        };
        let channel = transport.channel(&endpoint, Expect::Host(p.host.clone()), timeout).await;
        let channel =
            channel.inspect_err(|e| tracing::debug!(peer = %p.host, error = %e, "peer poll")).ok()?;
        lock(&self.channels).insert(key, channel.clone());
        Some(channel)
    }

    /// Asks the peers `ask` names for their lease (and the fact they hold), until `until`,
    /// reporting the answers so far every quarter period: a direct poll may prove a fact before
    /// its slowest peers answer, and then asks no more. The answer must name the host asked:
    /// nobody else can answer for it.
    async fn poll(self: Arc<Self>, started: Millis, ask: Vec<String>, until: Millis, transport: Transport) {
        let ask: HashSet<String> = ask.into_iter().collect();
        let peers: Vec<Peer> = {
            let peers = lock(&self.peers);
            let listed: HashSet<(&str, &str)> =
                peers.iter().map(|p| (p.host.as_str(), p.address.as_str())).collect();
            lock(&self.channels)
                .retain(|(host, address), _| listed.contains(&(host.as_str(), address.as_str())));
            peers.iter().filter(|p| ask.contains(&p.host)).cloned().collect()
        };
        let wait = Duration::from_millis(until.since(self.now()));
        let until_at = tokio::time::Instant::now() + wait;
        let connect_timeout = self.connect_timeout();
        let mut asks = tokio::task::JoinSet::new();
        for p in peers {
            let (shell, transport) = (self.clone(), transport.clone());
            asks.spawn(async move {
                // The connection is made in a task of its own: a poll that gives up on it
                // does not throw away a handshake half done, and the next poll finds it kept.
                let connect = {
                    let (shell, p, transport) = (shell.clone(), p.clone(), transport.clone());
                    tokio::spawn(async move { shell.channel(&p, &transport, connect_timeout).await })
                };
                let answer = tokio::time::timeout(wait, async {
                    let channel = connect.await.ok()??;
                    Some(PeerServiceClient::new(channel).lease_status(LeaseStatusRequest {}).await)
                })
                .await;
                let answer = match answer {
                    Ok(Some(Ok(answer))) => answer.into_inner(),
                    // A peer that answers late is busy, not gone: its connection is kept (tonic
                    // reconnects a broken one by itself). Dropping it made every slow answer cost
                    // a new connection, and under load the polls fed on themselves.
                    Err(_) | Ok(None) => return None,
                    Ok(Some(Err(_))) => {
                        lock(&shell.channels).remove(&(p.host.clone(), p.address.clone()));
                        return None;
                    }
                };
                if answer.host != p.host {
                    tracing::warn!(peer = %p.host, answered_for = %answer.host, "ignoring a peer's answer for another host");
                    return None;
                }
                Some(PeerAnswer {
                    host: p.host,
                    upper_remaining_ms: answer.upper_remaining_ms,
                    received_at: shell.now(),
                    epoch: answer.epoch,
                    fact: answer.fact_age_ms.map(|age_ms| RelayedFact {
                        age_ms,
                        epoch: answer.fact_epoch,
                        membership: answer.fact_membership,
                    }),
                })
            });
        }
        let report_every = Duration::from_millis(self.timings().poll_every_ms() / 4);
        let (asked, mut answered) = (asks.len(), 0);
        let mut answers = Vec::new();
        let mut report_at = tokio::time::Instant::now() + report_every;
        loop {
            let (done, due) = tokio::select! {
                joined = asks.join_next() => match joined {
                    Some(answer) => {
                        if let Some(a) = answer.ok().flatten() {
                            answers.push(a);
                            answered += 1;
                        }
                        (false, false)
                    }
                    None => (true, true),
                },
                () = tokio::time::sleep_until(report_at.min(until_at)) => {
                    report_at += report_every;
                    (tokio::time::Instant::now() >= until_at, true)
                }
            };
            let last = done || !self.keeper().wants_answers(started, self.now());
            // The last report goes even with no answer: the keeper judges on the latest poll.
            if last || (due && !answers.is_empty()) {
                self.report(started, std::mem::take(&mut answers));
            }
            if last {
                break;
            }
        }
        // Questions still open are dropped with the set: their answers are no longer wanted.
        self.keeper().poll_ended(started);
        tracing::debug!(
            asked,
            answered,
            took_ms = self.now().since(started),
            fact_age_ms = self.fact().map(|f| f.age_ms),
            "peer poll ended"
        );
        self.drop_unkept_channels();
    }

    fn report(&self, started: Millis, answers: Vec<PeerAnswer>) {
        let other = self.keeper().polled(Poll { started, answers });
        if !other.is_empty() {
            tracing::warn!(
                peers = ?other,
                newest_epoch = self.newest_epoch(),
                "not counting peer answers of another leader epoch than this agent's: an older one is a deposed \
                 leader's, a newer one a leader this agent has not heard from yet (or a host that lies)"
            );
        }
    }
}

/// Why an answer was not taken.
#[derive(Debug, thiserror::Error)]
pub enum AnswerRefused {
    #[error(transparent)]
    StaleEpoch(#[from] StaleEpoch),
    #[error(
        "its roster changes do not start from version {held}, the one held; the next answer brings it whole"
    )]
    RosterBase { held: u64 },
}

/// What a heartbeat's answer says of the roster (the lists are taken out of it).
pub fn roster_update(answer: &mut vmha_proto::v1::HeartbeatResponse) -> RosterUpdate {
    let peers = std::mem::take(&mut answer.peers).into_iter().map(|p| (p.host, p.address)).collect();
    let protected = std::mem::take(&mut answer.protected_uuids);
    if answer.roster_unchanged {
        RosterUpdate::Unchanged { version: answer.roster_version }
    } else if answer.roster_changes {
        RosterUpdate::Changes {
            from: answer.roster_base,
            to: answer.roster_version,
            peers_set: peers,
            peers_removed: std::mem::take(&mut answer.peers_removed),
            protected_added: protected,
            protected_removed: std::mem::take(&mut answer.protected_removed),
        }
    } else {
        RosterUpdate::Whole(std::sync::Arc::new(EngineRoster {
            version: answer.roster_version,
            peers,
            protected,
        }))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn parse_timings(text: &str) -> Option<Timings> {
    let value = |key: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            l.split_once('=').filter(|(k, _)| k.trim() == key).and_then(|(_, v)| v.trim().parse().ok())
        })
    };
    let t = Timings {
        heartbeat_interval_ms: value("heartbeat_interval_ms")?,
        lease_ttl_ms: value("lease_ttl_ms")?,
        fence_margin_ms: value("fence_margin_ms")?,
        max_transit_ms: value("max_transit_ms")?,
        guard_ms: value("guard_ms")?,
    };
    t.validate().ok().map(|()| t)
}

/// Destroys the running protected domains through libvirt; what fails is logged (the QEMU
/// processes are then killed directly by `enforce_fence`).
fn destroy_through_libvirt(hv: &dyn Hypervisor, protected: &[String]) {
    // (uuid, name); the name only for the log, and unknown when libvirt does not answer.
    let running: Vec<(String, String)> = match hv.domains() {
        Ok(d) => d.into_iter().filter(|d| protected.contains(&d.uuid)).map(|d| (d.uuid, d.name)).collect(),
        Err(_) => protected.iter().map(|u| (u.clone(), String::new())).collect(),
    };
    for (uuid, vm) in running {
        match hv.destroy(&uuid) {
            Ok(()) => tracing::error!(%vm, domain = %uuid, "self-fence: destroyed"),
            Err(e) => tracing::error!(%vm, domain = %uuid, error = %e, "self-fence: destroy failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protected_list_and_the_timings_survive_an_agent_restart() {
        let dir = std::env::temp_dir().join(format!("vmha-lease-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = LeaseShell::new("kvm1", Timings::default(), None);
        first.remember_in(dir.clone());
        first.adopt_timings(Timings::fast()).unwrap();
        let roster = EngineRoster { version: 7, peers: vec![], protected: vec!["u1".into(), "u2".into()] };
        first.answered(1, Millis(0), 5_000, 3, RosterUpdate::Whole(std::sync::Arc::new(roster))).unwrap();
        assert_eq!(first.roster_version(), 7);
        let lease = std::fs::read_to_string(dir.join("lease")).unwrap();
        assert_eq!(
            lease,
            crate::hook::lease_text(first.origin_ns + 5_000_000_000),
            "the lease file holds this boot and the lease's end on CLOCK_MONOTONIC"
        );
        first.answered(1, Millis(1_000), 5_000, 3, RosterUpdate::Unchanged { version: 7 }).unwrap();
        assert_eq!(first.protected_list(), ["u1", "u2"], "an answer without a roster keeps the one held");
        let restarted = LeaseShell::new("kvm1", Timings::default(), None);
        restarted.remember_in(dir.clone());
        assert_eq!(std::fs::read_to_string(dir.join("lease")).unwrap(), "none\n", "no lease in a new run");
        assert_eq!(restarted.protected_list(), ["u1", "u2"]);
        assert_eq!(restarted.timings(), Timings::fast());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn timings_the_watchdog_cannot_fit_are_refused() {
        let wd = WatchdogConfig { device: "/dev/watchdog".into(), timeout: Duration::from_secs(3) };
        let shell = LeaseShell::new("kvm1", Timings::default(), Some(wd));
        let e = shell.adopt_timings(Timings::fast()).unwrap_err();
        assert!(e.contains("--watchdog-timeout"), "{e}");
        assert_eq!(shell.timings(), Timings::default(), "kept its timings");
        let bad = Timings { lease_ttl_ms: 1_000, ..Timings::default() };
        assert!(shell.adopt_timings(bad).unwrap_err().contains("not valid"));
    }
}
