//! The shell around the pure lease state machine (`vmha_engine::selffence`): feeds it the
//! clock, grants and peer polls, and carries out its decisions, destroying this host's
//! protected VMs when it must self-fence.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmha_engine::Millis;
use vmha_engine::selffence::{Decision, LeaseKeeper, PeerAnswer, Phase, Poll, SelfFenceConfig};
use vmha_proto::v1::peer_service_client::PeerServiceClient;
use vmha_proto::v1::{LeaseStatusRequest, Peer};

use crate::hypervisor::Hypervisor;

/// How often the state machine is asked what to do.
const TICK: Duration = Duration::from_millis(50);

pub struct LeaseShell {
    origin: Instant,
    pub cfg: SelfFenceConfig,
    host: String,
    keeper: Mutex<LeaseKeeper>,
    peers: Mutex<Vec<Peer>>,
    protected: Mutex<BTreeSet<String>>,
    /// Where the protected list is kept across restarts: an agent restarted while cut off from
    /// the controller must still know what to destroy if it has to self-fence.
    state_file: Mutex<Option<PathBuf>>,
}

impl LeaseShell {
    pub fn new(host: &str, cfg: SelfFenceConfig) -> Arc<LeaseShell> {
        Arc::new(LeaseShell {
            origin: Instant::now(),
            cfg,
            host: host.into(),
            keeper: Mutex::new(LeaseKeeper::new(cfg, Millis(0))),
            peers: Mutex::default(),
            protected: Mutex::default(),
            state_file: Mutex::default(),
        })
    }

    /// Keeps the protected list in `file`, starting from what it holds.
    pub fn remember_in(&self, file: PathBuf) {
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let known: BTreeSet<String> =
                    text.lines().filter(|l| !l.is_empty()).map(String::from).collect();
                tracing::info!(file = %file.display(), protected = known.len(), "protected VMs as last known");
                *self.protected.lock().unwrap_or_else(|p| p.into_inner()) = known;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = %file.display(), error = %e, "cannot read the protected VM list"),
        }
        *self.state_file.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
    }

    fn save_protected(&self, protected: &BTreeSet<String>) {
        let Some(file) = self.state_file.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return };
        let text: String = protected.iter().map(|u| format!("{u}\n")).collect();
        let tmp = file.with_extension("tmp");
        // Written aside and renamed, so a crash never leaves half a list.
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &file));
        if let Err(e) = written {
            tracing::warn!(file = %file.display(), error = %e, "cannot save the protected VM list");
        }
    }

    pub fn now(&self) -> Millis {
        Millis(self.origin.elapsed().as_millis() as u64)
    }

    fn keeper(&self) -> std::sync::MutexGuard<'_, LeaseKeeper> {
        self.keeper.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the leader said in a heartbeat answer; `ttl_ms` 0 means no lease this time.
    pub fn answered(
        &self,
        sent_at: Millis,
        ttl_ms: u64,
        cluster_hosts: usize,
        peers: Vec<Peer>,
        protected: Vec<String>,
    ) {
        let mut k = self.keeper();
        if ttl_ms > 0 {
            if matches!(k.phase(), Phase::Fenced { .. } | Phase::Keeping { .. }) {
                tracing::warn!("lease regained");
            }
            k.granted(sent_at, ttl_ms, cluster_hosts);
        } else {
            k.set_cluster_hosts(cluster_hosts);
        }
        drop(k);
        *self.peers.lock().unwrap_or_else(|p| p.into_inner()) =
            peers.into_iter().filter(|p| p.host != self.host).collect();
        let protected: BTreeSet<String> = protected.into_iter().collect();
        let mut known = self.protected.lock().unwrap_or_else(|p| p.into_inner());
        if *known != protected {
            self.save_protected(&protected);
            *known = protected;
        }
    }

    pub fn self_fenced(&self) -> bool {
        matches!(self.keeper().phase(), Phase::Fenced { .. })
    }

    /// What this agent tells a polling peer.
    pub fn upper_remaining_ms(&self) -> i64 {
        let now = self.now();
        self.keeper().upper_remaining_ms(now)
    }

    /// Runs the state machine forever.
    pub async fn run(self: Arc<Self>, hv: Arc<dyn Hypervisor>) {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            let now = self.now();
            let decision = self.keeper().tick(now);
            match decision {
                Decision::Nothing => {}
                Decision::PollPeers => {
                    tokio::spawn(self.clone().poll(now));
                }
                Decision::Keep { reason } => {
                    tracing::warn!(%reason, "lease expired; keeping VMs: the leader cannot have quorum");
                }
                Decision::Fence { reason } => {
                    tracing::error!(%reason, "SELF-FENCING: destroying every protected VM on this host");
                    let uuids: Vec<String> =
                        self.protected.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
                    let hv = hv.clone();
                    let _ = tokio::task::spawn_blocking(move || fence(hv.as_ref(), &uuids)).await;
                }
            }
        }
    }

    async fn poll(self: Arc<Self>, started: Millis) {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let timeout = Duration::from_millis(self.cfg.poll_every_ms * 3 / 4);
        let mut asks = tokio::task::JoinSet::new();
        for p in peers {
            let shell = self.clone();
            asks.spawn(async move {
                let answer = tokio::time::timeout(timeout, async {
                    let mut c = PeerServiceClient::connect(format!("http://{}", p.address)).await.ok()?;
                    c.lease_status(LeaseStatusRequest {}).await.ok().map(|r| r.into_inner())
                })
                .await
                .ok()
                .flatten()?;
                Some(PeerAnswer {
                    host: p.host,
                    upper_remaining_ms: answer.upper_remaining_ms,
                    received_at: shell.now(),
                })
            });
        }
        let answers = asks.join_all().await.into_iter().flatten().collect();
        self.keeper().polled(Poll { started, answers });
    }
}

/// Destroys the running protected domains; what fails is logged, the rest still goes.
fn fence(hv: &dyn Hypervisor, protected: &[String]) {
    let running: Vec<String> = match hv.domains() {
        Ok(d) => d.into_iter().filter(|d| protected.contains(&d.uuid)).map(|d| d.uuid).collect(),
        // libvirtd not answering: try every protected one anyway.
        Err(_) => protected.to_vec(),
    };
    for uuid in running {
        match hv.destroy(&uuid) {
            Ok(()) => tracing::error!(domain = %uuid, "self-fence: destroyed"),
            Err(e) => tracing::error!(domain = %uuid, error = %e, "self-fence: destroy failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protected_list_survives_an_agent_restart() {
        let dir = std::env::temp_dir().join(format!("vmha-lease-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("protected");
        let first = LeaseShell::new("kvm1", SelfFenceConfig::default());
        first.remember_in(file.clone());
        first.answered(Millis(0), 5_000, 3, vec![], vec!["u1".into(), "u2".into()]);
        let restarted = LeaseShell::new("kvm1", SelfFenceConfig::default());
        restarted.remember_in(file);
        let known = restarted.protected.lock().unwrap().clone();
        assert_eq!(known, BTreeSet::from(["u1".to_string(), "u2".to_string()]));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
