//! Each host's agent: its lease state machine, heartbeats and what it does with their answers,
//! peer polls, self-fence and the watchdog it feeds.

use std::collections::BTreeSet;

use vmha_engine::health::Probe;
use vmha_engine::lease::{Echo, LeaseAnswer};
use vmha_engine::roster::{self, Roster};
use vmha_engine::selffence::{Decision, LeaseKeeper, PeerAnswer, Phase, Poll, RelayedFact};
use vmha_engine::step::Registration;
use vmha_engine::{Millis, Reply};

use super::libvirt::Job;
use super::network::{Answer, Event, Report};
use super::{AgentFault, Clock, Config, HostSpec, World, name_seed};

pub struct Host {
    pub spec: HostSpec,
    pub powered: bool,
    /// The agent process runs.
    pub agent_up: bool,
    pub link_controller: bool,
    /// Its whole network: to the controller and to its peers.
    pub link_network: bool,
    /// Renewed at each registration: a message for an earlier one is dropped, as a restarted
    /// agent never sees what was sent to the process before.
    pub conn: u64,
    pub registered: bool,
    /// Until then the agent is stopped (SIGSTOP).
    pub hung_until: u64,
    pub libvirt_hung_until: u64,
    pub keeper: LeaseKeeper,
    /// The controller's roster as the agent holds it (version 0 after a restart: not kept).
    pub roster: Roster,
    /// The protected VMs as the controller last said: what a self-fence destroys (kept across
    /// agent restarts, in its state directory).
    pub protected: BTreeSet<usize>,
    /// The newest answer: its epoch, stamp and arrival, echoed by the next heartbeat.
    pub last_answer: Option<(u64, Millis, u64)>,
    pub next_heartbeat: u64,
    /// Heartbeats sent by this run of the agent (their `seq`).
    pub heartbeats: u64,
    /// Polls under way (the agent reports their answers every half period, and ends them once
    /// every peer answered, at their end, or once the keeper wants no more).
    pub(super) polls: Vec<OpenPoll>,

    pub fenced: u64,
    /// When the watchdog resets the host unless fed; `None`: not armed.
    pub watchdog_deadline: Option<u64>,
    pub resets: u64,
    /// Answers peer polls with epoch 2^63 (a host with a valid certificate that lies).
    pub lies_about_epoch: bool,
    /// The questions of its next direct poll are lost.
    pub loses_next_proof: bool,
    /// Answers peer polls 100 to 600 ms late (a loaded host).
    pub slow_answers: bool,
    /// Until then the controller's answers to its heartbeats come 1 to 3 s late.
    pub late_renewals_until: u64,
    pub(super) jobs: Vec<Job>,
    pub faults: BTreeSet<AgentFault>,
    pub probes: Vec<Probe>,
}

/// A poll under way: its start, the answers not yet reported, how many peers have not
/// answered, and until when answers count.
pub(super) struct OpenPoll {
    pub started: u64,
    pub unreported: Vec<PeerAnswer>,
    pub waiting: usize,
    pub until: u64,
}

impl Host {
    pub(super) fn new(spec: HostSpec, config: &Config, protected: BTreeSet<usize>) -> Host {
        Host {
            keeper: LeaseKeeper::new(&spec.name, config.timings, Millis(0), name_seed(&spec.name)),
            spec,
            powered: true,
            agent_up: true,
            link_controller: true,
            link_network: true,
            conn: 0,
            registered: false,
            hung_until: 0,
            libvirt_hung_until: 0,
            roster: Roster::default(),
            protected,
            last_answer: None,
            next_heartbeat: 0,
            heartbeats: 0,
            polls: Vec::new(),

            fenced: 0,
            watchdog_deadline: None,
            resets: 0,
            lies_about_epoch: false,
            slow_answers: false,
            loses_next_proof: false,
            late_renewals_until: 0,
            jobs: Vec::new(),
            faults: BTreeSet::new(),
            probes: Vec::new(),
        }
    }
}

impl World {
    /// The agent of `h` as the world starts: without sessions it registered already; with
    /// jitter its heartbeats start at a random phase.
    pub(super) fn boot(&mut self, h: usize) {
        // Its keeper starts after the registration, so it has seen no epoch yet: in this
        // order every seed still plays the schedule it played when the safety run found it.
        if !self.config.sessions {
            self.register(h);
        }
        let phase = match self.config.clock {
            Clock::Tick => 0,
            Clock::Jittered { .. } => self.rand(self.config.timings.heartbeat_interval_ms),
        };
        let seed = self.keeper_seed(h);
        let a = &mut self.hosts[h];
        a.keeper = LeaseKeeper::new(&a.spec.name, self.config.timings, Millis(0), seed);
        a.next_heartbeat = phase;
    }

    fn keeper_seed(&mut self, h: usize) -> u64 {
        match self.config.clock {
            Clock::Tick => name_seed(&self.hosts[h].spec.name),
            Clock::Jittered { .. } => self.rand(u64::MAX),
        }
    }

    /// Power comes back: a fresh agent, no VM running.
    pub fn revive(&mut self, h: usize) {
        if !self.hosts[h].powered {
            self.hosts[h].powered = true;
            self.start_agent(h);
        }
    }

    /// `kill -9` of the agent (an OOM kill, a crash): its VMs keep running, its watchdog is
    /// no longer fed.
    pub fn kill_agent(&mut self, h: usize) {
        self.hosts[h].agent_up = false;
    }

    /// systemd starts the agent again on a host that still runs.
    pub fn restart_agent(&mut self, h: usize) {
        if self.hosts[h].powered && !self.hosts[h].agent_up {
            self.start_agent(h);
        }
    }

    /// The agent is stopped (SIGSTOP) for `ms`.
    pub fn hang_agent(&mut self, h: usize, ms: u64) {
        let a = &mut self.hosts[h];
        a.hung_until = a.hung_until.max(self.now + ms);
    }

    /// Its network comes back whole.
    pub fn heal(&mut self, h: usize) {
        let a = &mut self.hosts[h];
        (a.link_network, a.link_controller) = (true, true);
    }

    /// A fresh agent process: what it kept in memory is gone, its state directory is not.
    fn start_agent(&mut self, h: usize) {
        let now = self.now;
        self.hosts[h].agent_up = true;
        self.hosts[h].hung_until = 0;
        let seed = self.keeper_seed(h);
        let a = &mut self.hosts[h];
        a.keeper = LeaseKeeper::new(&a.spec.name, self.config.timings, Millis(now), seed);
        a.roster = Roster::default();
        a.polls.clear();
        a.next_heartbeat = now;
        a.heartbeats = 0;
        a.registered = false;
        if !self.config.sessions {
            self.register(h);
        }
    }

    /// The agent runs and is not stopped.
    pub(super) fn agent_running(&self, h: usize) -> bool {
        let a = &self.hosts[h];
        a.powered && a.agent_up && self.now >= a.hung_until
    }

    /// When a message for agent `h` on connection `conn` is taken: now, or once the agent
    /// runs again; `None` when it is lost (a dead agent, another process, the host off).
    pub(super) fn agent_wait(&self, h: usize, conn: u64) -> Option<u64> {
        let a = &self.hosts[h];
        (a.powered && a.agent_up && a.conn == conn).then(|| a.hung_until.max(self.now))
    }

    /// One step of host `h`: libvirt's jobs that are due, then its agent, then its watchdog.
    pub(super) fn host_step(&mut self, h: usize) {
        self.end_due_jobs(h);
        // On the tick clock their results wait in the controller's queue.
        self.drain();
        let now = self.now;
        if self.agent_running(h) {
            if now >= self.hosts[h].next_heartbeat {
                self.heartbeat(h);
            }
            let decision = self.hosts[h].keeper.tick(Millis(now));
            self.decide(h, decision);
            let (watchdog_ms, a) = (self.config.watchdog_ms, &mut self.hosts[h]);
            if a.spec.watchdog && a.keeper.may_feed(Millis(now), watchdog_ms) {
                a.watchdog_deadline = Some(now + watchdog_ms);
            }
        }
        let a = &mut self.hosts[h];
        if a.powered && a.watchdog_deadline.is_some_and(|d| now > d) {
            a.resets += 1;
            let name = a.spec.name.clone();
            self.line(|| {
                format!("sim {name} watchdog_reset: its watchdog was not fed in time; the host is reset")
            });
            self.power_off(h);
        }
    }

    fn heartbeat(&mut self, h: usize) {
        let interval = self.config.timings.heartbeat_interval_ms;
        self.hosts[h].next_heartbeat = self.now + interval;
        if !self.reaches_controller(h) {
            if self.config.sessions {
                self.hosts[h].registered = false;
            }
            return;
        }
        if !self.hosts[h].registered {
            // The first heartbeat follows a step later: were it answered in the same
            // millisecond as the registration, both answers would carry the same stamp.
            self.register(h);
            self.hosts[h].next_heartbeat = self.now + self.step_ms();
            return;
        }
        let report = self.report(h);
        self.send_heartbeat(h, report);
    }

    /// What the heartbeat says, as the agent has it when it sends it.
    fn report(&mut self, h: usize) -> Report {
        let now = self.now;
        let domains = (now >= self.hosts[h].libvirt_hung_until).then(|| self.domains_of(h));
        let resources = self.resources(h);
        let armed_at_boot = self.config.watchdog_armed_at_boot;
        let a = &mut self.hosts[h];
        a.heartbeats += 1;
        Report {
            sent_at: now,
            conn: a.conn,
            echo: a.last_answer.map(|(epoch, stamp, at)| Echo { epoch, stamp, held_ms: now - at }),
            domains,
            seq: a.heartbeats,
            armed: a.spec.watchdog && (armed_at_boot || a.watchdog_deadline.is_some()),
            probes: a.probes.clone(),
            resources,
        }
    }

    fn register(&mut self, h: usize) {
        let name = self.hosts[h].spec.name.clone();
        let r = Registration {
            migration_uri: format!("qemu+tcp://{name}/system"),
            peer_address: format!("{name}:7070"),
            host: name,
            resources: self.resources(h),
            libvirt_version: "9.0.0".into(),
            lock_manager: self.lock_manager().into(),
            describe: "vmha-agent (sim), libvirt 9.0.0".into(),
        };
        if let Reply::Registered { stamp } = self.step(vmha_engine::Input::Register(r)) {
            let (epoch, now) = (self.engine.cluster.epoch, self.now);
            let a = &mut self.hosts[h];
            a.conn += 1;
            a.registered = true;
            a.keeper.see_epoch(epoch).expect("no agent has seen an epoch newer than the controller's");
            a.last_answer = Some((epoch, stamp, now));
        }
    }

    pub(super) fn lock_manager(&self) -> &'static str {
        if self.config.disk_locks { "lockd" } else { "none" }
    }

    /// The agent takes the controller's answer to its heartbeat.
    pub(super) fn answer_arrives(&mut self, h: usize, answer: Answer) {
        if !self.reaches_controller(h) {
            return;
        }
        match self.agent_wait(h, answer.conn) {
            None => return,
            Some(t) if t > self.now => return self.at(t, Event::Answer { host: h, answer }),
            Some(_) => {}
        }
        let now = self.now;
        let a = &mut self.hosts[h];
        // A deposed controller's answer is refused whole.
        if a.keeper.see_epoch(answer.epoch).is_err() {
            return;
        }
        // Changes from another version than the one held: the whole answer is refused (not
        // echoed), as the agent does.
        let (update, whole) = answer.roster;
        if !roster::apply(&mut a.roster, &update) {
            a.roster.version = 0;
            return;
        }
        assert_eq!(a.roster, *whole, "the agent's roster is the controller's after {update:?}");
        let protected = a.roster.protected.iter().map(|u| self.vm_index[u]).collect();
        let a = &mut self.hosts[h];
        a.protected = protected;
        let own = &a.spec.name;
        a.keeper.set_peers(a.roster.peers.iter().map(|(p, _)| p.clone()).filter(|p| p != own));
        a.last_answer = Some((answer.epoch, answer.answer.stamp(), now));
        match answer.answer {
            LeaseAnswer::Granted { ttl_ms, .. } => a
                .keeper
                .granted(Millis(answer.sent_at), ttl_ms, answer.hosts, answer.epoch)
                .expect("epoch seen just above"),
            LeaseAnswer::Refused { .. } => a.keeper.set_cluster_hosts(answer.hosts),
        }
        a.next_heartbeat = now + answer.next_in_ms;
    }

    fn decide(&mut self, h: usize, decision: Decision) {
        let fence = match decision {
            Decision::Nothing => None,
            Decision::PollPeers { ask, until, direct } => {
                self.poll_peers(h, &ask, until.0, direct);
                None
            }
            Decision::Keep { reason } => {
                let name = &self.hosts[h].spec.name;
                let line = format!("sim {name} keeps_vms: no lease, but {reason}");
                self.line(|| line);
                None
            }
            Decision::Fence { reason } => {
                self.hosts[h].fenced += 1;
                Some(reason)
            }
        };
        // A fenced agent keeps its host free of protected VMs (it kills their QEMU processes
        // directly when libvirt does not answer), then tells the keeper so.
        if matches!(self.hosts[h].keeper.phase(), Phase::Fenced { .. }) {
            let destroyed = self.destroy_protected(h);
            self.hosts[h].keeper.fence_completed();
            let name = &self.hosts[h].spec.name;
            let line = match (fence, destroyed.is_empty()) {
                (Some(reason), true) => format!("sim {name} self_fence: {reason}; destroyed: nothing"),
                (Some(reason), false) => {
                    format!("sim {name} self_fence: {reason}; destroyed: {}", destroyed.join(", "))
                }
                (None, false) => format!("sim {name} fence_enforced: destroyed: {}", destroyed.join(", ")),
                (None, true) => return,
            };
            self.line(|| line);
        }
    }

    fn poll_peers(&mut self, h: usize, ask: &[String], until: u64, direct: bool) {
        let now = self.now;
        let second = (now / 1_000) as usize;
        if self.asks.len() <= second {
            self.asks.resize(second + 1, 0);
        }
        self.asks[second] += ask.len() as u64;
        let mut peers: Vec<usize> = ask.iter().map(|p| self.host(p)).collect();
        match self.config.clock {
            Clock::Tick => {
                peers.sort_unstable();
                let answers = (peers.into_iter())
                    .filter(|p| self.agent_running(*p) && self.linked(h, *p))
                    .map(|p| self.peer_answer(p, now))
                    .collect();
                let keeper = &mut self.hosts[h].keeper;
                keeper.polled(Poll { started: Millis(now), answers });
                keeper.poll_ended(Millis(now));
            }
            Clock::Jittered { .. } => {
                let lost = direct && std::mem::take(&mut self.hosts[h].loses_next_proof);
                self.ask_peers(h, &peers, until, lost)
            }
        }
    }

    /// What the agent of `peer` answers a poll with, at `received_at` where it asked.
    pub(super) fn peer_answer(&self, peer: usize, received_at: u64) -> PeerAnswer {
        let p = &self.hosts[peer];
        let now = Millis(self.now);
        let lie = |e| if p.lies_about_epoch { 1 << 63 } else { e };
        PeerAnswer {
            host: p.spec.name.clone(),
            upper_remaining_ms: p.keeper.upper_remaining_ms(now),
            received_at: Millis(received_at),
            epoch: lie(p.keeper.newest_epoch()),
            fact: p.keeper.fact(now).map(|f| RelayedFact { epoch: lie(f.epoch), ..f }),
        }
    }
}
