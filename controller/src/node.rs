//! This process among the controllers: a standby until it wins the election (`leadership`),
//! then the leader for the rest of its life (a deposed leader starts over as a new process).
//! The APIs ask it for the leader's `Controller`; a standby refuses every call that would act
//! with `Unavailable`, naming the leader in the `x-vmha-leader` header (agents and the CLI go
//! there), and answers reads from what the database last recorded (`recorded`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use vmha_engine::{ClusterState, Millis, RunState};
use vmha_proto::v1 as pb;

use crate::controller::Controller;
use crate::errors::Error;
use crate::store::{ControllerRow, Store, retry_while_unreachable};
use crate::views;

/// How often each controller says it is alive, and reads who else is.
const PRESENCE: Duration = Duration::from_secs(1);
/// A controller not seen for this long is not listed.
const FORGOTTEN_AFTER: Duration = Duration::from_secs(5);

pub struct Node {
    /// This controller's name (from its certificate, or `--name`).
    pub name: String,
    /// Where agents and operators reach it (`--advertise`).
    pub endpoint: String,
    leader: OnceLock<Arc<Controller>>,
    /// The database, once reachable: a standby reads the event log from it.
    store: OnceLock<Store>,
    /// Won the lock, and waits out the takeover before leading.
    elected: std::sync::atomic::AtomicBool,
    seen: Mutex<Seen>,
    /// This controller's TLS (`None` with --insecure-dev): the CRL it goes by is kept there.
    tls: Option<Arc<vmha_tls::Credentials>>,
    /// When each removed host was removed (seconds since the Unix epoch), as on record.
    removed: Mutex<HashMap<String, i64>>,
    /// Why this process does not stand for leader right now, if not only because another one
    /// leads (see `leadership::campaign`).
    cannot_lead: Mutex<Option<String>>,
}

/// The controllers as the database last listed them.
#[derive(Default)]
struct Seen {
    rows: Vec<ControllerRow>,
    newest_epoch: u64,
    /// Why the database could not be read, while it cannot.
    trouble: Option<String>,
}

impl Node {
    pub fn new(name: String, endpoint: String, tls: Option<Arc<vmha_tls::Credentials>>) -> Arc<Node> {
        Arc::new(Node {
            name,
            endpoint,
            leader: OnceLock::new(),
            store: OnceLock::new(),
            elected: Default::default(),
            seen: Mutex::default(),
            tls,
            removed: Mutex::default(),
            cannot_lead: Mutex::default(),
        })
    }

    /// A node that leads from the start (tests of one controller).
    pub fn sole(controller: Arc<Controller>) -> Arc<Node> {
        let node = Node::new("ctl".into(), String::new(), None);
        node.lead(controller);
        node
    }

    /// How the campaign for leader goes: `why` this process cannot lead, if not only because
    /// another one does.
    pub fn standing_by(&self, why: Option<&str>) {
        *self.cannot_lead.lock().unwrap_or_else(|p| p.into_inner()) = why.map(str::to_string);
    }

    /// This process won the lock: callers are told to stay, it leads in a moment.
    pub fn elect(&self) {
        self.elected.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn lead(&self, controller: Arc<Controller>) {
        if self.leader.set(controller).is_err() {
            crate::leadership::depose("this controller was made leader twice");
        }
    }

    /// The leader's state and decision loop, when this process leads.
    pub fn leader(&self) -> Result<&Arc<Controller>, Error> {
        self.leader.get().ok_or_else(|| self.not_leader())
    }

    pub fn is_leader(&self) -> bool {
        self.leader.get().is_some()
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The leader other than this process, as last seen: its name, endpoint and epoch.
    fn other_leader(&self) -> Option<(String, String, u64)> {
        let seen = self.seen();
        seen.rows
            .iter()
            .find(|r| r.epoch == Some(seen.newest_epoch as i64) && r.name != self.name)
            .map(|r| (r.name.clone(), r.endpoint.clone(), seen.newest_epoch))
    }

    fn not_leader(&self) -> Error {
        if self.elected.load(std::sync::atomic::Ordering::SeqCst) {
            return Error::NotLeader {
                message: format!(
                    "vmha-controller {} takes over as the leader within moments; retry",
                    self.name
                ),
                leader: Some(self.endpoint.clone()),
            };
        }
        let trouble = self.seen().trouble.clone();
        let cannot_lead = self.cannot_lead.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let leader = self.other_leader();
        let message = match (&leader, trouble) {
            // What this standby cannot read, the leader may still: it is named all the same.
            (_, Some(why)) => format!(
                "database unavailable ({why}): no controller can lead without it; vmha-controller {} stands by, \
                 and agents keep their VMs meanwhile",
                self.name
            ),
            (Some((name, endpoint, epoch)), None) => format!(
                "vmha-controller {} is a standby; the leader is {name} at {endpoint} (epoch {epoch})",
                self.name
            ),
            (None, None) => match cannot_lead {
                Some(why) => format!("no controller leads: {why}"),
                None => format!(
                    "no controller leads right now (a new leader takes over within seconds); vmha-controller {} \
                     stands by",
                    self.name
                ),
            },
        };
        Error::NotLeader { message, leader: leader.map(|(_, endpoint, _)| endpoint) }
    }

    /// For `vmha status`: every controller seen lately, the leader first.
    pub fn controllers(&self) -> Vec<pb::ControllerInfo> {
        let seen = self.seen();
        let mut list: Vec<pb::ControllerInfo> = seen
            .rows
            .iter()
            .map(|r| {
                let leads = r.epoch == Some(seen.newest_epoch as i64);
                pb::ControllerInfo {
                    name: r.name.clone(),
                    endpoint: r.endpoint.clone(),
                    role: if leads { "leader" } else { "standby" }.into(),
                    epoch: if leads { seen.newest_epoch } else { 0 },
                    seen_ms_ago: r.seen_ms_ago.max(0) as u64,
                }
            })
            .collect();
        list.sort_by_key(|c| c.role != "leader");
        list
    }

    /// The CRL this controller goes by (`None`: none, or --insecure-dev).
    pub fn crl(&self) -> Option<Arc<vmha_tls::revocation::Crl>> {
        self.tls.as_ref()?.crl()
    }

    /// Takes a CRL the cluster CA signed if it is newer than the one in use (see
    /// `vmha_tls::revocation`); says whether it did.
    pub fn accept_crl(&self, der: &[u8]) -> Result<bool, Error> {
        let tls = self.tls.as_ref().ok_or_else(|| {
            Error::Precondition("this controller runs with --insecure-dev: it checks no certificates".into())
        })?;
        tls.accept_crl(der).map_err(|e| Error::Invalid(e.to_string()))
    }

    /// Why a host's certificate issued at `not_before` (seconds since the Unix epoch) is refused:
    /// the host was removed after it was issued. A certificate issued since is let in (the host
    /// added again).
    pub fn removed_since_issued(&self, host: &str, not_before: i64) -> Option<String> {
        let removed_at = *self.removed.lock().unwrap_or_else(|p| p.into_inner()).get(host)?;
        // `vmha ca issue` dates certificates a few minutes back (clock skew between machines):
        // one issued after the removal starts less than that before it. Both are in whole
        // seconds: one issued in the second of the removal is refused, to be safe.
        (not_before + vmha_tls::ca::BACKDATE_S <= removed_at).then(|| {
            format!(
                "host {host} was removed (`vmha host remove`) after this certificate was issued: it is refused; \
                 to add the host again, issue it a new one (`vmha ca issue host {host}`)"
            )
        })
    }

    /// `host` was removed just now: its certificates so far are refused at once, before the
    /// database's record of it is read back.
    pub fn removed_now(&self, host: &str) {
        let now = chrono::Utc::now().timestamp();
        self.removed.lock().unwrap_or_else(|p| p.into_inner()).insert(host.to_string(), now);
    }

    /// Reads the revocations on record: a newer CRL, and the removed hosts.
    async fn read_revocations(&self, store: &Store) -> Result<(), crate::store::StoreError> {
        if let Some(tls) = &self.tls
            && let Some(der) = store.crl_above(tls.crl_number()).await?
        {
            match tls.accept_crl(&der) {
                Ok(true) => tracing::info!(number = tls.crl_number(), "took the CRL on record"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "the CRL on record is not the cluster CA's; it is ignored")
                }
            }
        }
        let removed = store.removed_hosts().await?;
        let mut known = self.removed.lock().unwrap_or_else(|p| p.into_inner());
        for (host, at) in removed {
            let slot = known.entry(host).or_insert(at);
            *slot = (*slot).max(at);
        }
        Ok(())
    }

    /// The database, for a standby's reads of the event log; `None` until it was reached.
    pub fn store(&self) -> Option<&Store> {
        self.store.get()
    }

    /// The cluster as the database last recorded it: hosts and VMs, without what only a leader
    /// knows (leases, heartbeats, operations in flight). What a standby's reads show.
    pub async fn recorded(&self) -> Option<ClusterState> {
        let store = self.store.get()?;
        let (hosts, vms) = (store.load_hosts().await.ok()?, store.load_vms().await.ok()?);
        let mut s = ClusterState::default();
        s.hosts.extend(hosts.into_iter().map(|h| (h.name.clone(), h)));
        s.vms.extend(vms.into_iter().map(|v| (v.uuid.clone(), v)));
        for (uuid, state) in store.recorded_vm_states().await.ok()? {
            if let (Some(vm), Some(state)) = (s.vms.get_mut(&uuid), RunState::parse(&state)) {
                vm.state = state;
            }
        }
        Some(s)
    }

    /// `f` on the cluster's state: the leader's, from memory (off its decision loop, see
    /// `Controller::view`); on a standby, the state the
    /// database last recorded (then `true`), or a refusal naming the leader or why none leads
    /// when the database cannot be read either.
    pub async fn state<R: Send + 'static>(
        &self,
        f: impl FnOnce(&ClusterState, Millis) -> R + Send + 'static,
    ) -> Result<(R, bool), Error> {
        match self.leader() {
            Ok(c) => {
                let now = c.now();
                Ok((c.view(move |s| f(s, now)).await?, false))
            }
            Err(not_leader) => {
                let s = self.recorded().await.ok_or(not_leader)?;
                Ok((f(&s, Millis(0)), true))
            }
        }
    }

    /// Every host as operators see it (a standby: as recorded, without what only a leader knows).
    pub async fn hosts(&self) -> Result<Vec<pb::Host>, Error> {
        let (hosts, recorded) = self.state(views::hosts).await?;
        Ok(self.shown_hosts(hosts, recorded))
    }

    /// `views::hosts` of a `state` read as operators see them: with their certificates' expiry,
    /// which only the leader knows, or as `recorded`.
    pub fn shown_hosts(&self, hosts: Vec<pb::Host>, recorded: bool) -> Vec<pb::Host> {
        match self.leader() {
            Ok(c) if !recorded => hosts
                .into_iter()
                .map(|mut h| {
                    h.cert_not_after = c.host_cert_expiry(&h.name).unwrap_or_default();
                    h
                })
                .collect(),
            _ => hosts.into_iter().map(views::as_recorded_host).collect(),
        }
    }

    /// Why the database cannot be read, while it cannot (a standby's `vmha status`).
    pub fn database_trouble(&self) -> Option<String> {
        self.seen().trouble.clone()
    }

    pub fn who_leads(&self) -> pb::LeaderReply {
        if let Some(c) = self.leader.get() {
            return pb::LeaderReply {
                name: self.name.clone(),
                leading: true,
                leader_name: self.name.clone(),
                leader_endpoint: self.endpoint.clone(),
                epoch: c.epoch,
                why_no_leader: String::new(),
            };
        }
        match self.other_leader() {
            Some((leader_name, leader_endpoint, epoch)) => pb::LeaderReply {
                name: self.name.clone(),
                leading: false,
                leader_name,
                leader_endpoint,
                epoch,
                why_no_leader: String::new(),
            },
            None => pb::LeaderReply {
                name: self.name.clone(),
                why_no_leader: self.not_leader().to_string(),
                ..Default::default()
            },
        }
    }

    /// Runs for the process's life: opens the database (bringing the schema up to date), then
    /// every `PRESENCE` says this controller is alive (and the epoch it leads with) and reads
    /// who else is.
    pub async fn keep_presence(self: Arc<Self>, database_url: String) {
        let waiting = |e: &crate::store::StoreError, _pause: Duration| {
            self.seen().trouble = Some(e.to_string());
        };
        let store = match retry_while_unreachable(|| Store::open(&database_url), waiting).await {
            Ok(s) => s,
            // What waiting cannot fix (a schema newer than this build): stop, and say why.
            Err(e) => {
                tracing::error!(error = %e, "cannot use the database; exiting");
                eprintln!("vmha-controller: {e}");
                std::process::exit(78);
            }
        };
        let _ = self.store.set(store.clone());
        let mut tick = tokio::time::interval(PRESENCE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let epoch = self.leader.get().map(|c| c.epoch);
            let read = async {
                store.controller_seen(&self.name, &self.endpoint, epoch).await?;
                self.read_revocations(&store).await?;
                store.controllers(FORGOTTEN_AFTER).await
            };
            match read.await {
                Ok((rows, newest_epoch)) => *self.seen() = Seen { rows, newest_epoch, trouble: None },
                Err(e) => self.seen().trouble = Some(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_host_is_refused_with_the_certificates_it_had_and_let_in_with_a_new_one() {
        let node = Node::new("ctl1".into(), String::new(), None);
        let now = chrono::Utc::now().timestamp();
        // `vmha ca issue` dates a certificate BACKDATE_S back: one issued an hour ago, and
        // one issued right after the removal.
        let (old, new) = (now - 3600 - vmha_tls::ca::BACKDATE_S, now + 1 - vmha_tls::ca::BACKDATE_S);
        assert_eq!(node.removed_since_issued("kvm9", old), None, "not removed yet");
        node.removed_now("kvm9");
        let why = node.removed_since_issued("kvm9", old).expect("refused");
        assert!(why.contains("vmha ca issue host kvm9"), "{why}");
        assert_eq!(node.removed_since_issued("kvm9", new), None, "a certificate issued since adds it again");
        assert_eq!(node.removed_since_issued("kvm1", old), None, "another host");
    }
}
