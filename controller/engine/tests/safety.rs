//! The safety rule under random fault schedules: the leader's engine and every agent's lease
//! state machine run together on simulated time, over a simulated network that delays, loses
//! and cuts messages, with host deaths and revivals, network cuts (whole hosts, or only their
//! link to the controller: the controller cut off from most hosts), partial heals, leader
//! pauses (SIGSTOP), leader restarts (a new epoch), agent crashes, restarts and hangs, libvirt
//! hangs, database outages, and each host's watchdog; under the default and the fast timings.
//!
//! Invariant: a VM is never started while another copy of it may still be running. A copy may
//! be running until its host destroyed it (self-fence), died, or was reset by its watchdog.
//!
//! `VMHA_SAFETY_CASES=N` sets how many random schedules run (default 20,000); `bench/safety N`
//! runs it on demand and prints schedules per second.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use vmha_engine::cluster::HostResources;
use vmha_engine::inventory::{self, ReportedDomain};
use vmha_engine::lease::{self, Echo, LeaseAnswer};
use vmha_engine::recovery::{self, Action, Recovery};
use vmha_engine::selffence::{Decision, LeaseKeeper, PeerAnswer, Phase, Poll};
use vmha_engine::{ClusterState, HostView, Millis, RunState, Timings, VmView, Watchdog};

const STEP: u64 = 10;
const LEADER_TICK: u64 = 100;

/// The timings the leader runs, and the watchdog timeout every host's agent arms.
#[derive(Clone, Copy, Debug)]
enum Profile {
    Default,
    Fast,
}

impl Profile {
    fn timings(self) -> Timings {
        match self {
            Profile::Default => Timings::default(),
            Profile::Fast => Timings::fast(),
        }
    }

    fn watchdog_ms(self) -> u64 {
        match self {
            Profile::Default => 3_000,
            Profile::Fast => 1_000,
        }
    }
}

#[derive(Clone, Debug)]
enum Fault {
    /// Power pulled: its VMs and agent die at once.
    Kill(usize),
    /// Boots again: a fresh agent, no VMs running.
    Revive(usize),
    /// Its network goes away entirely (controller and peers), everything on it keeps running.
    Cut(usize),
    Heal(usize),
    /// Only its link to the controller goes away; peers still reach it.
    CutLeaderLink(usize),
    HealLeaderLink(usize),
    /// The controller is stopped for a while (SIGSTOP), then runs on with what queued up.
    PauseLeader(u64),
    /// The controller restarts: a new epoch, observed state lost.
    RestartLeader,
    /// `kill -9` of the agent (an OOM kill, a crash): its VMs keep running, its watchdog is
    /// no longer fed.
    KillAgent(usize),
    /// The agent comes back (systemd restarts it) on a host that still runs.
    RestartAgent(usize),
    /// The agent is stopped (SIGSTOP) for a while.
    HangAgent(usize, u64),
    /// libvirtd hangs for a while: reports go on without the domain list, and starts sent to
    /// the host happen (or not) only when it answers again.
    HangLibvirt(usize, u64),
    /// PostgreSQL is down for a while: leases go on from memory; starts wait for the database.
    DbOutage(u64),
    /// An operator unprotects a VM, or protects it (again).
    Unprotect(usize),
    Protect(usize),
}

#[derive(Clone, Debug)]
enum Event {
    Fault(Fault),
    /// A heartbeat reaches the leader. `stale`: its agent could not list its domains;
    /// `armed`: its watchdog is armed.
    Heartbeat {
        host: usize,
        sent_at: u64,
        echo: Option<Echo>,
        life: u64,
        stale: bool,
        armed: bool,
    },
    /// The leader's answer reaches the agent.
    Answer {
        host: usize,
        sent_at: u64,
        answer: LeaseAnswer,
        epoch: u64,
        hosts: usize,
        next_in: u64,
        life: u64,
        protected: BTreeSet<usize>,
    },
    /// A peer answers a poll (computed when it arrives at the peer).
    PeerAsked {
        asker: usize,
        peer: usize,
        poll: u64,
        back_delay: u64,
        life: u64,
    },
    PeerAnswered {
        asker: usize,
        poll: u64,
        answer: PeerAnswer,
        life: u64,
    },
    PollDone {
        host: usize,
        poll: u64,
        life: u64,
    },
    /// A start command reaches the agent of `host` (on the command stream of agent process
    /// `life`: a restarted agent never sees what was sent to the one before).
    StartCommand {
        host: usize,
        vm: usize,
        life: u64,
    },
    /// The agent's result reaches the leader.
    StartResult {
        host: usize,
        vm: usize,
        ok: Result<(), String>,
    },
    /// A destroy of a stale copy reaches the agent of `host`.
    DestroyCommand {
        host: usize,
        vm: usize,
        life: u64,
    },
    /// A start the leader decided while the database was down, once it is back.
    DeferredStart {
        host: usize,
        vm: usize,
        epoch: u64,
    },
}

struct Agent {
    /// The host has power.
    host_up: bool,
    /// The agent process runs.
    agent_up: bool,
    /// Bumped at every agent (re)start so messages to a previous process are dropped.
    life: u64,
    hung_until: u64,
    libvirt_hung_until: u64,
    /// Starts waiting in a hung libvirtd.
    pending_starts: Vec<usize>,
    keeper: LeaseKeeper,
    /// The protected VMs as the leader last said: what a self-fence destroys (kept across
    /// agent restarts, in its state directory).
    protected: BTreeSet<usize>,
    last_answer: Option<(u64, Millis, u64)>,
    next_hb: u64,
    polls: Vec<(u64, Vec<PeerAnswer>)>,
    fenced: u64,
    /// When the watchdog resets the host unless fed; `None`: not armed.
    watchdog_deadline: Option<u64>,
    resets: u64,
}

struct Sim {
    now: u64,
    rng: u64,
    slow_network: bool,
    profile: Profile,
    events: BinaryHeap<Reverse<(u64, u64, usize)>>,
    payloads: Vec<Option<Event>>,
    seq: u64,
    leader: ClusterState,
    paused_until: u64,
    db_down_until: u64,
    agents: Vec<Agent>,
    leader_link: Vec<bool>,
    peer_link: Vec<bool>,
    /// Hosts where each VM may be running.
    copies: Vec<BTreeSet<usize>>,
    /// Hosts where each VM is defined (reported shut off when not running).
    defined: Vec<BTreeSet<usize>>,
    restarts: usize,
    violations: Vec<String>,
    trace: bool,
}

fn host_name(i: usize) -> String {
    format!("kvm{i}")
}

fn host_index(name: &str) -> usize {
    name.trim_start_matches("kvm").parse().expect("kvmN")
}

fn vm_uuid(v: usize) -> String {
    format!("00000000-0000-0000-0000-{v:012}")
}

fn vm_index(uuid: &str) -> usize {
    uuid.rsplit('-').next().and_then(|n| n.parse().ok()).expect("a sim VM")
}

impl Sim {
    fn new(hosts: usize, seed: u64, slow_network: bool, profile: Profile) -> Sim {
        let timings = profile.timings();
        let mut leader = ClusterState { timings, epoch: 1, ..Default::default() };
        for i in 0..hosts {
            leader.hosts.insert(host_name(i), sim_host(i));
            let mut vm = VmView::new(&vm_uuid(i), &format!("vm{i}"));
            vm.host = Some(host_name(i));
            vm.state = RunState::Running;
            vm.memory_kib = 65_536;
            vm.vcpus = 1;
            vm.protected = true;
            vm.priority = i as i32;
            vm.xml = "<domain/>".into();
            leader.vms.insert(vm.uuid.clone(), vm);
        }
        let mut sim = Sim {
            now: 0,
            rng: seed | 1,
            slow_network,
            profile,
            events: BinaryHeap::new(),
            payloads: Vec::new(),
            seq: 0,
            leader,
            paused_until: 0,
            db_down_until: 0,
            agents: Vec::new(),
            leader_link: vec![true; hosts],
            peer_link: vec![true; hosts],
            copies: (0..hosts).map(|i| BTreeSet::from([i])).collect(),
            defined: (0..hosts).map(|i| BTreeSet::from([i])).collect(),
            restarts: 0,
            violations: Vec::new(),
            trace: std::env::var_os("SIM_TRACE").is_some(),
        };
        for i in 0..hosts {
            let stamp = lease::issue_stamp(&mut sim.leader, &host_name(i), Millis(0));
            let phase = sim.rand(timings.heartbeat_interval_ms);
            sim.agents.push(Agent {
                host_up: true,
                agent_up: true,
                life: 0,
                hung_until: 0,
                libvirt_hung_until: 0,
                pending_starts: Vec::new(),
                keeper: LeaseKeeper::new(timings, Millis(0)),
                protected: (0..hosts).collect(),
                last_answer: Some((1, stamp, 0)),
                next_hb: phase,
                polls: Vec::new(),
                fenced: 0,
                watchdog_deadline: None,
                resets: 0,
            });
        }
        sim
    }

    fn timings(&self) -> Timings {
        self.profile.timings()
    }

    fn rand(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n.max(1)
    }

    /// A network delay: mostly short, sometimes (on a slow network) longer than max_transit.
    fn delay(&mut self) -> u64 {
        if self.slow_network && self.rand(10) == 0 { 100 + self.rand(600) } else { 1 + self.rand(20) }
    }

    fn at(&mut self, t: u64, e: Event) {
        self.seq += 1;
        self.payloads.push(Some(e));
        self.events.push(Reverse((t, self.seq, self.payloads.len() - 1)));
    }

    fn leader_reachable(&self, h: usize) -> bool {
        self.leader_link[h] && self.peer_link[h]
    }

    fn peers_reachable(&self, a: usize, b: usize) -> bool {
        self.peer_link[a] && self.peer_link[b]
    }

    /// The agent runs and is not stopped.
    fn agent_running(&self, h: usize) -> bool {
        let a = &self.agents[h];
        a.host_up && a.agent_up && self.now >= a.hung_until
    }

    /// Whether an event for agent `h` (of process `life`) must wait until it runs again;
    /// `None` when it is dropped (dead agent, another process, host off).
    fn agent_wait(&self, h: usize, life: u64) -> Option<u64> {
        let a = &self.agents[h];
        if !a.host_up || !a.agent_up || a.life != life {
            return None;
        }
        Some(a.hung_until.max(self.now))
    }

    fn run(&mut self, until: u64) {
        while self.now <= until {
            while let Some(Reverse((t, _, idx))) = self.events.peek().copied() {
                if t > self.now {
                    break;
                }
                self.events.pop();
                let e = self.payloads[idx].take().expect("each event once");
                self.handle(e);
            }
            for h in 0..self.agents.len() {
                self.libvirt_step(h);
                self.agent_step(h);
                self.watchdog_step(h);
            }
            if self.now >= self.paused_until && self.now.is_multiple_of(LEADER_TICK) {
                let now = Millis(self.now);
                let actions = recovery::tick(&mut self.leader, now);
                self.perform(actions);
            }
            self.now += STEP;
        }
    }

    fn watchdog_step(&mut self, h: usize) {
        let a = &mut self.agents[h];
        if a.host_up && a.watchdog_deadline.is_some_and(|d| self.now > d) {
            if self.trace {
                eprintln!("t={} kvm{h} reset by its watchdog", self.now);
            }
            a.resets += 1;
            self.power_off(h);
        }
    }

    fn power_off(&mut self, h: usize) {
        let a = &mut self.agents[h];
        a.host_up = false;
        a.agent_up = false;
        a.watchdog_deadline = None;
        a.pending_starts.clear();
        for c in &mut self.copies {
            c.remove(&h);
        }
    }

    /// libvirtd answers again: the starts it held go ahead now, whatever became of the agent
    /// that asked (its result is lost if that agent is gone), through libvirt's start hook,
    /// which lets a protected VM start only while the host's lease (as its agent last wrote
    /// it down) is valid.
    fn libvirt_step(&mut self, h: usize) {
        let a = &self.agents[h];
        if !a.host_up || self.now < a.libvirt_hung_until || a.pending_starts.is_empty() {
            return;
        }
        for vm in std::mem::take(&mut self.agents[h].pending_starts) {
            let ok = match self.agents[h].keeper.may_start(Millis(self.now)) {
                Ok(()) => self.start_here(h, vm),
                Err(why) => Err(format!("refused by the lease hook: {why}")),
            };
            if self.agents[h].agent_up {
                self.send_result(h, vm, ok);
            }
        }
    }

    fn agent_step(&mut self, h: usize) {
        if !self.agent_running(h) {
            return;
        }
        let now = self.now;
        let t = self.timings();
        if now >= self.agents[h].next_hb {
            let a = &mut self.agents[h];
            a.next_hb = now + t.heartbeat_interval_ms;
            let echo = a.last_answer.map(|(epoch, stamp, at)| Echo { epoch, stamp, held_ms: now - at });
            let life = a.life;
            let stale = now < a.libvirt_hung_until;
            let armed = a.watchdog_deadline.is_some();
            if self.leader_reachable(h) {
                let d = self.delay();
                self.at(now + d, Event::Heartbeat { host: h, sent_at: now, echo, life, stale, armed });
            }
        }
        let decision = self.agents[h].keeper.tick(Millis(now));
        match decision {
            Decision::Nothing | Decision::Keep { .. } => {}
            Decision::PollPeers => {
                let life = self.agents[h].life;
                for p in 0..self.agents.len() {
                    if p != h && self.peers_reachable(h, p) {
                        let (d1, d2) = (self.delay(), self.delay());
                        self.at(
                            now + d1,
                            Event::PeerAsked { asker: h, peer: p, poll: now, back_delay: d2, life },
                        );
                    }
                }
                self.agents[h].polls.push((now, Vec::new()));
                let timeout = t.poll_every_ms() * 3 / 4;
                self.at(now + timeout, Event::PollDone { host: h, poll: now, life });
            }
            Decision::Fence { reason } => {
                if self.trace {
                    eprintln!("t={now} kvm{h} fences: {reason}");
                }
                self.agents[h].fenced += 1;
            }
        }
        // A fenced agent keeps its host free of protected VMs (it kills their QEMU processes
        // directly when libvirt does not answer), then tells the keeper so.
        if matches!(self.agents[h].keeper.phase(), Phase::Fenced { .. }) {
            for v in &self.agents[h].protected {
                self.copies[*v].remove(&h);
            }
            self.agents[h].keeper.fence_completed();
        }
        if self.agents[h].keeper.may_feed(Millis(now), self.profile.watchdog_ms()) {
            self.agents[h].watchdog_deadline = Some(now + self.profile.watchdog_ms());
        }
    }

    /// The agent of `h` starts `vm` (it checked its lease when the command came).
    fn start_here(&mut self, h: usize, vm: usize) -> Result<(), String> {
        if let Some(other) = self.copies[vm].iter().find(|o| **o != h) {
            self.violations
                .push(format!("t={}: vm{vm} started on kvm{h} while a copy may run on kvm{other}", self.now));
        }
        self.copies[vm].insert(h);
        self.defined[vm].insert(h);
        self.restarts += 1;
        Ok(())
    }

    fn send_result(&mut self, h: usize, vm: usize, ok: Result<(), String>) {
        if self.leader_reachable(h) {
            let d = self.delay();
            let t = self.now + d;
            self.at(t, Event::StartResult { host: h, vm, ok });
        }
    }

    fn handle(&mut self, e: Event) {
        match e {
            Event::Fault(f) => self.fault(f),
            Event::Heartbeat { host, sent_at, echo, life, stale, armed } => {
                if self.now < self.paused_until {
                    // A stopped controller reads it when it runs again.
                    let t = self.paused_until;
                    self.at(t, Event::Heartbeat { host, sent_at, echo, life, stale, armed });
                    return;
                }
                if !self.leader_reachable(host) {
                    return;
                }
                let now = Millis(self.now);
                let name = host_name(host);
                if let Some(h) = self.leader.hosts.get_mut(&name) {
                    h.watchdog = if armed {
                        Watchdog::Armed {
                            device: "/dev/watchdog".into(),
                            timeout_ms: self.profile.watchdog_ms(),
                        }
                    } else {
                        Watchdog::Missing("not armed yet".into())
                    };
                }
                if !stale {
                    let domains: Vec<ReportedDomain> = (0..self.copies.len())
                        .filter(|v| self.defined[*v].contains(&host))
                        .map(|v| ReportedDomain {
                            uuid: vm_uuid(v),
                            name: format!("vm{v}"),
                            state: if self.copies[v].contains(&host) {
                                RunState::Running
                            } else {
                                RunState::ShutOff
                            },
                            memory_kib: 65_536,
                            vcpus: 1,
                        })
                        .collect();
                    let (mut actions, stale_copies) =
                        recovery::on_report(&mut self.leader, &name, &domains, now);
                    let kept: Vec<_> =
                        domains.into_iter().filter(|d| !stale_copies.contains(&d.uuid)).collect();
                    let changes = inventory::apply_report(&mut self.leader, &name, &kept, now);
                    actions.extend(recovery::after_report(&mut self.leader, &name, &changes, now));
                    self.perform(actions);
                }
                // As the controller does: the lease after the report, which may end a death.
                let answer = lease::on_heartbeat(&mut self.leader, &name, echo, now);
                let interval = self.timings().heartbeat_interval_ms;
                let mut next_in = interval - self.now % interval;
                if next_in < interval / 4 {
                    next_in += interval;
                }
                let d = self.delay();
                let (epoch, hosts) = (self.leader.epoch, self.leader.hosts.len());
                let t = self.now + d;
                let protected =
                    self.leader.vms.values().filter(|v| v.protected).map(|v| vm_index(&v.uuid)).collect();
                self.at(t, Event::Answer { host, sent_at, answer, epoch, hosts, next_in, life, protected });
            }
            Event::Answer { host, sent_at, answer, epoch, hosts, next_in, life, protected } => {
                if !self.leader_reachable(host) {
                    return;
                }
                match self.agent_wait(host, life) {
                    None => {}
                    Some(t) if t > self.now => self.at(
                        t,
                        Event::Answer { host, sent_at, answer, epoch, hosts, next_in, life, protected },
                    ),
                    Some(_) => {
                        let a = &mut self.agents[host];
                        a.protected = protected;
                        a.last_answer = Some((epoch, answer.stamp(), self.now));
                        match answer {
                            LeaseAnswer::Granted { ttl_ms, .. } => {
                                a.keeper.granted(Millis(sent_at), ttl_ms, hosts)
                            }
                            LeaseAnswer::Refused { .. } => a.keeper.set_cluster_hosts(hosts),
                        }
                        a.next_hb = self.now + next_in;
                    }
                }
            }
            Event::PeerAsked { asker, peer, poll, back_delay, life } => {
                if !self.peers_reachable(asker, peer) {
                    return;
                }
                let peer_life = self.agents[peer].life;
                match self.agent_wait(peer, peer_life) {
                    None => {}
                    Some(t) if t > self.now => {
                        self.at(t, Event::PeerAsked { asker, peer, poll, back_delay, life });
                    }
                    Some(_) => {
                        let upper = self.agents[peer].keeper.upper_remaining_ms(Millis(self.now));
                        let t = self.now + back_delay;
                        let answer = PeerAnswer {
                            host: host_name(peer),
                            upper_remaining_ms: upper,
                            received_at: Millis(t),
                        };
                        self.at(t, Event::PeerAnswered { asker, poll, answer, life });
                    }
                }
            }
            Event::PeerAnswered { asker, poll, answer, life } => {
                let timeout = self.timings().poll_every_ms() * 3 / 4;
                let a = &mut self.agents[asker];
                if a.life == life
                    && answer.received_at.0 <= poll + timeout
                    && let Some((_, answers)) = a.polls.iter_mut().find(|(p, _)| *p == poll)
                {
                    answers.push(answer);
                }
            }
            Event::PollDone { host, poll, life } => match self.agent_wait(host, life) {
                None => {}
                Some(t) if t > self.now => self.at(t, Event::PollDone { host, poll, life }),
                Some(_) => {
                    let a = &mut self.agents[host];
                    if let Some(i) = a.polls.iter().position(|(p, _)| *p == poll) {
                        let (started, answers) = a.polls.remove(i);
                        a.keeper.polled(Poll { started: Millis(started), answers });
                    }
                }
            },
            Event::StartCommand { host, vm, life } => match self.agent_wait(host, life) {
                None => {}
                Some(t) if t > self.now => self.at(t, Event::StartCommand { host, vm, life }),
                Some(_) => {
                    let a = &mut self.agents[host];
                    if let Err(why) = a.keeper.may_start(Millis(self.now)) {
                        self.send_result(host, vm, Err(why));
                    } else if self.now < a.libvirt_hung_until {
                        a.pending_starts.push(vm);
                    } else {
                        let ok = self.start_here(host, vm);
                        self.send_result(host, vm, ok);
                    }
                }
            },
            Event::StartResult { host, vm, ok } => {
                if self.trace {
                    eprintln!("t={} result of vm{vm} on kvm{host}: {ok:?}", self.now);
                }
                if self.now < self.paused_until {
                    let t = self.paused_until;
                    self.at(t, Event::StartResult { host, vm, ok });
                    return;
                }
                // A later leader takes the result too: it loaded the start as in doubt.
                let now = Millis(self.now);
                let actions =
                    recovery::start_finished(&mut self.leader, &vm_uuid(vm), &host_name(host), ok, now);
                self.perform(actions);
            }
            Event::DestroyCommand { host, vm, life } => match self.agent_wait(host, life) {
                None => {}
                Some(t) if t > self.now => self.at(t, Event::DestroyCommand { host, vm, life }),
                // The agent's destroy goes through libvirt; a hung one loses it.
                Some(_) if self.now < self.agents[host].libvirt_hung_until => {}
                Some(_) => {
                    self.copies[vm].remove(&host);
                }
            },
            Event::DeferredStart { host, vm, epoch } => {
                if epoch != self.leader.epoch {
                    return;
                }
                self.send_start(host, vm);
            }
        }
    }

    /// The controller sends a start it has recorded, if the engine still wants it.
    fn send_start(&mut self, host: usize, vm: usize) {
        if !self.leader.vms[&vm_uuid(vm)].awaits_start_on(&host_name(host)) {
            return;
        }
        if !self.leader_reachable(host) {
            let now = Millis(self.now);
            let actions = recovery::start_finished(
                &mut self.leader,
                &vm_uuid(vm),
                &host_name(host),
                Err("no command stream".into()),
                now,
            );
            self.perform(actions);
            return;
        }
        let d = self.delay();
        let (t, life) = (self.now + d, self.agents[host].life);
        self.at(t, Event::StartCommand { host, vm, life });
    }

    fn perform(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            if self.trace {
                eprintln!("t={} leader: {a:?}", self.now);
            }
            let (vm_uuid, host) = match a {
                Action::Start { vm_uuid, host, .. } => (vm_uuid, host),
                Action::DestroyStale { vm_uuid, host, .. } => {
                    let (vm, host) = (vm_index(&vm_uuid), host_index(&host));
                    if self.leader_reachable(host) {
                        let (t, life) = (self.now + self.delay(), self.agents[host].life);
                        self.at(t, Event::DestroyCommand { host, vm, life });
                    }
                    continue;
                }
                _ => continue,
            };
            let (vm, host) = (vm_index(&vm_uuid), host_index(&host));
            if self.now < self.db_down_until {
                // Written down before it is sent: waits for the database.
                let (t, epoch) = (self.db_down_until, self.leader.epoch);
                self.at(t, Event::DeferredStart { host, vm, epoch });
            } else {
                self.send_start(host, vm);
            }
        }
    }

    fn fault(&mut self, f: Fault) {
        match f {
            Fault::Kill(h) => self.power_off(h),
            Fault::Revive(h) => {
                if self.agents[h].host_up {
                    return;
                }
                self.agents[h].host_up = true;
                self.start_agent(h);
            }
            Fault::Cut(h) => self.peer_link[h] = false,
            Fault::Heal(h) => {
                self.peer_link[h] = true;
                self.leader_link[h] = true;
            }
            Fault::CutLeaderLink(h) => self.leader_link[h] = false,
            Fault::HealLeaderLink(h) => self.leader_link[h] = true,
            Fault::PauseLeader(ms) => self.paused_until = self.paused_until.max(self.now + ms),
            Fault::RestartLeader => {
                let old = std::mem::take(&mut self.leader);
                let mut fresh = ClusterState {
                    timings: old.timings,
                    policy: old.policy,
                    epoch: old.epoch + 1,
                    started: Millis(self.now),
                    ..Default::default()
                };
                for (name, h) in old.hosts {
                    let mut n = HostView::new(&name);
                    n.resources = h.resources;
                    n.watchdog = h.watchdog;
                    fresh.hosts.insert(name, n);
                }
                for (uuid, vm) in old.vms {
                    // The database keeps desired state and the last known host.
                    let mut n = VmView::new(&uuid, &vm.name);
                    n.host = vm.host;
                    n.memory_kib = vm.memory_kib;
                    n.vcpus = vm.vcpus;
                    n.protected = vm.protected;
                    n.protected_since = Millis(self.now);
                    n.priority = vm.priority;
                    n.xml = vm.xml;
                    // Operations are written down before they are sent: a start without a
                    // result is in doubt for the new leader.
                    if let Some(h) = vm.recovery.and_then(|r| r.starting_on) {
                        n.recovery = Some(Recovery::in_doubt(&h, Millis(self.now)));
                    }
                    fresh.vms.insert(uuid, n);
                }
                self.leader = fresh;
            }
            Fault::KillAgent(h) => self.agents[h].agent_up = false,
            Fault::RestartAgent(h) => {
                if self.agents[h].host_up && !self.agents[h].agent_up {
                    self.start_agent(h);
                }
            }
            Fault::HangAgent(h, ms) => {
                let a = &mut self.agents[h];
                a.hung_until = a.hung_until.max(self.now + ms);
            }
            Fault::HangLibvirt(h, ms) => {
                let a = &mut self.agents[h];
                a.libvirt_hung_until = a.libvirt_hung_until.max(self.now + ms);
            }
            Fault::DbOutage(ms) => self.db_down_until = self.db_down_until.max(self.now + ms),
            Fault::Unprotect(v) => {
                if let Some(vm) = self.leader.vms.get_mut(&vm_uuid(v)) {
                    vm.protected = false;
                    vm.recovery = None;
                }
            }
            Fault::Protect(v) => {
                if let Some(vm) = self.leader.vms.get_mut(&vm_uuid(v))
                    && !vm.protected
                {
                    vm.protected = true;
                    vm.protected_since = Millis(self.now);
                }
            }
        }
    }

    /// A fresh agent process on a running host; it registers with the leader at once.
    fn start_agent(&mut self, h: usize) {
        let now = self.now;
        let a = &mut self.agents[h];
        a.agent_up = true;
        a.life += 1;
        a.hung_until = 0;
        a.keeper = LeaseKeeper::new(self.profile.timings(), Millis(now));
        a.polls.clear();
        a.next_hb = now;
        let stamp = lease::issue_stamp(&mut self.leader, &host_name(h), Millis(now));
        self.agents[h].last_answer = Some((self.leader.epoch, stamp, now));
    }
}

/// A host as the database knows it; its watchdog is what its agent reports.
fn sim_host(i: usize) -> HostView {
    let mut h = HostView::new(&host_name(i));
    h.resources =
        HostResources { cpus: 8, memory_total_kib: 8 << 20, memory_free_kib: 4 << 20, cpu_model: "x".into() };
    h
}

fn fault_strategy(hosts: usize) -> impl Strategy<Value = Fault> {
    let h = 0..hosts;
    prop_oneof![
        2 => h.clone().prop_map(Fault::Kill),
        2 => h.clone().prop_map(Fault::Revive),
        3 => h.clone().prop_map(Fault::Cut),
        3 => h.clone().prop_map(Fault::Heal),
        3 => h.clone().prop_map(Fault::CutLeaderLink),
        2 => h.clone().prop_map(Fault::HealLeaderLink),
        2 => (1_000u64..20_000).prop_map(Fault::PauseLeader),
        1 => Just(Fault::RestartLeader),
        2 => h.clone().prop_map(Fault::KillAgent),
        2 => h.clone().prop_map(Fault::RestartAgent),
        2 => (h.clone(), 100u64..20_000).prop_map(|(h, ms)| Fault::HangAgent(h, ms)),
        2 => (h.clone(), 100u64..20_000).prop_map(|(h, ms)| Fault::HangLibvirt(h, ms)),
        1 => (1_000u64..20_000).prop_map(Fault::DbOutage),
        1 => h.clone().prop_map(Fault::Unprotect),
        2 => h.clone().prop_map(Fault::Protect),
    ]
}

type Schedule = (usize, u64, bool, bool, Vec<(u64, Fault)>);

fn schedule() -> impl Strategy<Value = Schedule> {
    (2usize..=5).prop_flat_map(|hosts| {
        (
            Just(hosts),
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec((0u64..40_000, fault_strategy(hosts)), 0..14),
        )
    })
}

fn run_schedule((hosts, seed, slow, fast, faults): &Schedule) -> Sim {
    let profile = if *fast { Profile::Fast } else { Profile::Default };
    let mut sim = Sim::new(*hosts, *seed, *slow, profile);
    for (t, f) in faults {
        sim.at(*t, Event::Fault(f.clone()));
    }
    sim.run(60_000);
    sim
}

/// Random schedules; `VMHA_SAFETY_CASES` of them (default 20,000). Prints schedules per
/// second, and the smallest failing schedule found, with its seed, on failure.
#[test]
fn a_vm_is_never_started_while_another_copy_may_run() {
    let cases: u32 = std::env::var("VMHA_SAFETY_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let started = Instant::now();
    let result = runner.run(&schedule(), |s| {
        let sim = run_schedule(&s);
        if sim.violations.is_empty() { Ok(()) } else { Err(TestCaseError::fail(sim.violations.join("; "))) }
    });
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "safety: {cases} random fault schedules in {secs:.1} s ({:.0} schedules/s)",
        cases as f64 / secs
    );
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, (hosts, seed, slow, fast, faults))) => panic!(
            "double run: {why}\n  hosts={hosts} seed={seed} slow_network={slow} fast_profile={fast}\n  faults={faults:?}\n  \
             (re-run with SIM_TRACE=1 in a targeted test to see every fence and reset)"
        ),
        Err(e) => panic!("{e}"),
    }
}

/// Targeted schedules the random search might find only rarely.
fn run(hosts: usize, faults: &[(u64, Fault)], until: u64) -> Sim {
    run_with(hosts, Profile::Default, faults, until)
}

fn run_with(hosts: usize, profile: Profile, faults: &[(u64, Fault)], until: u64) -> Sim {
    let mut sim = Sim::new(hosts, 7, false, profile);
    for (t, f) in faults {
        sim.at(*t, Event::Fault(f.clone()));
    }
    sim.run(until);
    assert!(sim.violations.is_empty(), "{:?}", sim.violations);
    sim
}

/// The host that runs `vm` at the end, asserting there is exactly one.
fn single_copy(sim: &Sim, vm: usize) -> usize {
    assert_eq!(sim.copies[vm].len(), 1, "vm{vm} runs on {:?}", sim.copies[vm]);
    *sim.copies[vm].iter().next().unwrap()
}

#[test]
fn a_dead_host_is_recovered_under_both_profiles() {
    for profile in [Profile::Default, Profile::Fast] {
        let sim = run_with(3, profile, &[(10_000, Fault::Kill(0))], 30_000);
        assert_ne!(single_copy(&sim, 0), 0, "{profile:?}");
    }
}

#[test]
fn an_isolated_host_fences_itself_and_its_vm_runs_elsewhere() {
    for profile in [Profile::Default, Profile::Fast] {
        let sim = run_with(3, profile, &[(10_000, Fault::Cut(1))], 30_000);
        assert!(sim.agents[1].fenced > 0, "kvm1 destroyed its VMs");
        assert_ne!(single_copy(&sim, 1), 1);
    }
}

#[test]
fn the_controller_cut_off_from_most_hosts_restarts_nothing_and_they_keep_their_vms() {
    // kvm0 and kvm1 still reach each other, not the controller; kvm2 does.
    let sim = run(3, &[(10_000, Fault::CutLeaderLink(0)), (10_000, Fault::CutLeaderLink(1))], 40_000);
    assert_eq!(sim.restarts, 0);
    assert_eq!((sim.agents[0].fenced, sim.agents[1].fenced), (0, 0));
    assert_eq!((sim.agents[0].resets, sim.agents[1].resets), (0, 0), "their watchdogs were fed meanwhile");
    assert!(sim.copies[0].contains(&0) && sim.copies[1].contains(&1));
}

/// A controller stopped at any instant of its heartbeat round, even while a round of aligned
/// heartbeats arrives, stops no VM and resets no host: leases count toward quorum one
/// interval short, so the hosts it renewed last lapse with the others in their peers' eyes.
#[test]
fn a_stopped_controller_stops_no_vm() {
    for profile in [Profile::Default, Profile::Fast] {
        let interval = profile.timings().heartbeat_interval_ms;
        for hosts in 2..=5 {
            for offset in (0..interval).step_by(10) {
                let mut sim = Sim::new(hosts, offset * 7919 + hosts as u64, false, profile);
                sim.at(10_000 + offset, Event::Fault(Fault::PauseLeader(20_000)));
                sim.run(45_000);
                assert!(sim.violations.is_empty(), "{:?}", sim.violations);
                let fenced: Vec<u64> = sim.agents.iter().map(|a| a.fenced + a.resets).collect();
                assert!(
                    fenced.iter().all(|f| *f == 0),
                    "{profile:?} hosts={hosts} offset={offset}: fenced or reset {fenced:?}"
                );
                assert_eq!(sim.restarts, 0);
            }
        }
    }
}

#[test]
fn a_restarted_controller_stops_no_vm() {
    let sim = run(3, &[(10_000, Fault::RestartLeader)], 40_000);
    assert_eq!(sim.restarts, 0);
    assert!(sim.agents.iter().all(|a| a.fenced == 0 && a.resets == 0));
}

/// Found by 100,000 schedules before the start guard: kvm0 fenced at ~11 s, the leader then
/// restarted its VM on kvm0 itself (live again, but without a lease), and kvm0 was cut off.
/// The fenced agent never fenced again, so the leader started vm0 on kvm1 beside it.
#[test]
fn a_fenced_host_cannot_take_a_restart_without_a_lease() {
    for seed in [3820789721141163478u64, 1, 2, 3] {
        let mut sim = Sim::new(2, seed, false, Profile::Default);
        for (t, f) in [(7_011, Fault::CutLeaderLink(0)), (11_011, Fault::Heal(0)), (12_018, Fault::Cut(0))] {
            sim.at(t, Event::Fault(f));
        }
        sim.run(40_000);
        assert!(sim.violations.is_empty(), "seed {seed}: {:?}", sim.violations);
    }
}

#[test]
fn a_killed_agent_gets_its_host_reset_before_its_vm_runs_elsewhere() {
    for profile in [Profile::Default, Profile::Fast] {
        let sim = run_with(3, profile, &[(10_000, Fault::KillAgent(0))], 40_000);
        assert_eq!(sim.agents[0].resets, 1, "{profile:?}: the watchdog reset kvm0");
        assert_ne!(single_copy(&sim, 0), 0);
    }
}

#[test]
fn an_agent_restarted_at_once_keeps_its_host_and_vms() {
    let sim = run(3, &[(10_000, Fault::KillAgent(0)), (10_300, Fault::RestartAgent(0))], 40_000);
    assert_eq!((sim.agents[0].resets, sim.agents[0].fenced), (0, 0));
    assert_eq!(single_copy(&sim, 0), 0);
    assert_eq!(sim.restarts, 0);
}

#[test]
fn a_hung_agent_is_reset_and_its_vm_runs_elsewhere_once() {
    let sim = run(3, &[(10_000, Fault::HangAgent(0, 20_000))], 45_000);
    assert_eq!(sim.agents[0].resets, 1);
    assert_ne!(single_copy(&sim, 0), 0);
}

#[test]
fn a_hung_libvirt_stops_and_moves_nothing() {
    let sim = run(3, &[(10_000, Fault::HangLibvirt(0, 20_000))], 45_000);
    assert_eq!((sim.agents[0].resets, sim.agents[0].fenced), (0, 0));
    assert_eq!(single_copy(&sim, 0), 0);
    assert_eq!(sim.restarts, 0);
}

#[test]
fn a_database_outage_stops_nothing_and_delays_restarts_until_it_ends() {
    let sim = run(3, &[(10_000, Fault::DbOutage(20_000))], 45_000);
    assert!(sim.agents.iter().all(|a| a.fenced == 0 && a.resets == 0));
    assert_eq!(sim.restarts, 0);
    let mut sim = Sim::new(3, 7, false, Profile::Default);
    sim.at(10_000, Event::Fault(Fault::DbOutage(20_000)));
    sim.at(11_000, Event::Fault(Fault::Kill(0)));
    sim.run(25_000);
    assert!(sim.copies[0].is_empty(), "not restarted while the database is down");
    sim.run(40_000);
    assert!(sim.violations.is_empty(), "{:?}", sim.violations);
    assert_ne!(single_copy(&sim, 0), 0);
}

#[test]
fn a_healed_isolated_host_gets_a_lease_again() {
    let sim = run(3, &[(10_000, Fault::Cut(1)), (20_000, Fault::Heal(1))], 30_000);
    assert!(sim.agents[1].fenced > 0);
    assert_eq!(sim.leader.liveness("kvm1", Millis(30_000)), vmha_engine::HostLiveness::Online);
    assert_eq!(sim.agents[1].keeper.may_start(Millis(30_000)), Ok(()));
}

/// Protected just before its host was cut: the agent never learned it, so its self-fence
/// leaves it running; the leader must not start it elsewhere.
#[test]
fn a_vm_protected_just_before_its_host_is_cut_is_not_restarted_beside_itself() {
    let mut sim = Sim::new(3, 7, false, Profile::Default);
    sim.at(1_000, Event::Fault(Fault::Unprotect(1)));
    sim.at(10_000, Event::Fault(Fault::Protect(1)));
    sim.at(10_001, Event::Fault(Fault::Cut(1)));
    sim.run(30_000);
    assert!(sim.violations.is_empty(), "{:?}", sim.violations);
    assert_eq!(single_copy(&sim, 1), 1, "it still runs where it ran, and only there");
}
