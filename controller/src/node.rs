//! This process among the controllers: a standby until it wins the election (`leadership`),
//! then the leader for the rest of its life (a deposed leader starts over as a new process).
//! The APIs ask it for the leader's `Controller`; a standby refuses every call that would act
//! with `Unavailable`, naming the leader in the `x-vmha-leader` header (agents and the CLI go
//! there), and answers reads from what the database last recorded (`recorded`).

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
    pub fn new(name: String, endpoint: String) -> Arc<Node> {
        Arc::new(Node {
            name,
            endpoint,
            leader: OnceLock::new(),
            store: OnceLock::new(),
            elected: Default::default(),
            seen: Mutex::default(),
        })
    }

    /// A node that leads from the start (tests of one controller).
    pub fn sole(controller: Arc<Controller>) -> Arc<Node> {
        let node = Node::new("ctl".into(), String::new());
        node.lead(controller);
        node
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
            (None, None) => format!(
                "no controller leads right now (a new leader takes over within seconds); vmha-controller {} stands \
                 by",
                self.name
            ),
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

    /// `f` on the cluster's state: the leader's, from memory; on a standby, the state the
    /// database last recorded (then `true`), or a refusal naming the leader or why none leads
    /// when the database cannot be read either.
    pub async fn state<R: Send + 'static>(
        &self,
        f: impl FnOnce(&ClusterState, Millis) -> R + Send + 'static,
    ) -> Result<(R, bool), Error> {
        match self.leader() {
            Ok(c) => {
                let now = c.now();
                Ok((c.read(move |s| f(s, now)).await?, false))
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
                store.controllers(FORGOTTEN_AFTER).await
            };
            match read.await {
                Ok((rows, newest_epoch)) => *self.seen() = Seen { rows, newest_epoch, trouble: None },
                Err(e) => self.seen().trouble = Some(e.to_string()),
            }
        }
    }
}
