//! The network: what the hosts and the controller send each other, when it arrives (see
//! `Clock`), and which links are up.

use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::sync::Arc;

use vmha_engine::cluster::HostResources;
use vmha_engine::health::Probe;
use vmha_engine::inventory::ReportedDomain;
use vmha_engine::lease::{Echo, LeaseAnswer};
use vmha_engine::operation::OpId;
use vmha_engine::roster::{Roster, RosterUpdate};
use vmha_engine::selffence::{PeerAnswer, Poll};
use vmha_engine::step::Command;
use vmha_engine::{Input, Millis};

use super::agent::OpenPoll;
use super::{Clock, World};

pub(super) enum Event {
    /// What a test does at its time (a fault, an operator's request).
    Act(Box<dyn FnOnce(&mut World)>),
    /// A heartbeat reaches the controller. `arrived`: when it was received; it is decided a
    /// little later, after the heartbeats queued before it (`None`: still on the wire).
    Heartbeat {
        host: usize,
        report: Report,
        arrived: Option<u64>,
    },
    Answer {
        host: usize,
        answer: Answer,
    },
    /// A poll's question reaches a peer, whose answer takes `back_delay` to come back.
    PeerAsked {
        asker: usize,
        peer: usize,
        poll: u64,
        back_delay: u64,
        conn: u64,
    },
    PeerAnswered {
        asker: usize,
        poll: u64,
        answer: PeerAnswer,
        conn: u64,
    },
    /// Every peer answered, or the poll timed out.
    PollDone {
        host: usize,
        poll: u64,
        conn: u64,
    },
    /// A command reaches the agent of `host` (sent on connection `conn`).
    Command {
        host: usize,
        conn: u64,
        command: Command,
    },
    /// An agent's result reaches the controller (whichever runs then).
    Result(Input),
    /// A live migration of `host` ends (on the sudden libvirt).
    JobDone {
        host: usize,
        op: OpId,
    },
    /// An operation the controller of `epoch` began while the database was down is on record.
    Recorded {
        op: OpId,
        epoch: u64,
    },
}

/// What the controller has to do next, in turn.
pub(super) enum Followup {
    Input(Input),
    Command(Command),
}

/// A heartbeat as its agent sent it.
pub(super) struct Report {
    pub sent_at: u64,
    pub conn: u64,
    pub echo: Option<Echo>,
    /// `None`: libvirt did not answer the agent.
    pub domains: Option<Vec<ReportedDomain>>,
    pub seq: u64,
    pub armed: bool,
    pub probes: Vec<Probe>,
    pub resources: HostResources,
}

/// The controller's answer to a heartbeat.
pub(super) struct Answer {
    /// When the heartbeat it answers was sent: the lease runs from then.
    pub sent_at: u64,
    pub conn: u64,
    pub answer: LeaseAnswer,
    pub epoch: u64,
    pub hosts: usize,
    /// What it says of the roster, and the controller's whole roster then, to check that the
    /// agent ends with exactly it.
    pub roster: (RosterUpdate, Arc<Roster>),
    pub next_in_ms: u64,
}

impl World {
    pub(super) fn at(&mut self, t: u64, e: Event) {
        self.seq += 1;
        self.payloads.push(Some(e));
        self.events.push(Reverse((t, self.seq, self.payloads.len() - 1)));
    }

    /// How long a message takes.
    fn delay(&mut self) -> u64 {
        let clock = self.config.clock;
        match clock {
            Clock::Tick => 0,
            Clock::Jittered { slow } if slow && self.rand(10) == 0 => 100 + self.rand(600),
            Clock::Jittered { .. } => 1 + self.rand(20),
        }
    }

    pub(super) fn deliver_due(&mut self) {
        while let Some(Reverse((t, _, idx))) = self.events.peek().copied() {
            if t > self.now {
                break;
            }
            self.events.pop();
            let e = self.payloads[idx].take().expect("each event once");
            self.handle(e);
        }
    }

    fn handle(&mut self, e: Event) {
        match e {
            Event::Act(act) => act(self),
            Event::Heartbeat { host, report, arrived } => self.heartbeat_arrives(host, report, arrived),
            Event::Answer { host, answer } => self.answer_arrives(host, answer),
            Event::PeerAsked { asker, peer, poll, back_delay, conn } => {
                if !self.linked(asker, peer) {
                    return;
                }
                match self.agent_wait(peer, self.hosts[peer].conn) {
                    None => {}
                    Some(t) if t > self.now => {
                        self.at(t, Event::PeerAsked { asker, peer, poll, back_delay, conn })
                    }
                    Some(_) => {
                        let slow = if self.hosts[peer].slow_answers { 100 + self.rand(500) } else { 0 };
                        let t = self.now + back_delay + slow;
                        let answer = self.peer_answer(peer, t);
                        self.at(t, Event::PeerAnswered { asker, poll, answer, conn });
                    }
                }
            }
            Event::PeerAnswered { asker, poll, answer, conn } => {
                let a = &mut self.hosts[asker];
                if a.conn == conn
                    && let Some(open) = a.polls.iter_mut().find(|o| o.started == poll)
                    && answer.received_at.0 <= open.until
                {
                    open.unreported.push(answer);
                    open.waiting -= 1;
                    if open.waiting == 0 {
                        let t = self.now;
                        self.at(t, Event::PollDone { host: asker, poll, conn });
                    }
                }
            }
            Event::PollDone { host, poll, conn } => match self.agent_wait(host, conn) {
                None => {}
                Some(t) if t > self.now => self.at(t, Event::PollDone { host, poll, conn }),
                Some(_) => self.report_poll(host, poll, conn),
            },
            Event::Command { host, conn, command } => self.command_arrives(host, conn, command),
            Event::Result(input) => {
                if self.now < self.paused_until {
                    // A stopped controller reads it when it runs again.
                    let t = self.paused_until;
                    self.at(t, Event::Result(input));
                } else {
                    self.step(input);
                }
            }
            Event::JobDone { host, op } => self.job_done(host, op),
            Event::Recorded { op, epoch } => {
                if epoch == self.engine.cluster.epoch {
                    self.step(Input::Recorded(op));
                }
            }
        }
    }

    /// The agent of `h` reports the answers of its poll so far, as the real one does every
    /// quarter period; the poll ends once every peer answered, at its end, or once the keeper
    /// wants no more.
    fn report_poll(&mut self, h: usize, poll: u64, conn: u64) {
        let now = self.now;
        let quarter = self.config.timings.poll_every_ms() / 4;
        let a = &mut self.hosts[h];
        let Some(i) = a.polls.iter().position(|o| o.started == poll) else { return };
        let answers = std::mem::take(&mut a.polls[i].unreported);
        a.keeper.polled(Poll { started: Millis(poll), answers });
        let open = &a.polls[i];
        if open.waiting == 0 || now >= open.until || !a.keeper.wants_answers(Millis(poll), Millis(now)) {
            a.polls.remove(i);
            a.keeper.poll_ended(Millis(poll));
        } else {
            let t = (now + quarter).min(open.until);
            self.at(t, Event::PollDone { host: h, poll, conn });
        }
    }

    pub(super) fn send_heartbeat(&mut self, h: usize, report: Report) {
        match self.config.clock {
            Clock::Tick => {
                if let Some(answer) = self.take_heartbeat(h, report, self.now) {
                    self.answer_arrives(h, answer);
                }
            }
            Clock::Jittered { .. } => {
                let t = self.now + self.delay();
                self.at(t, Event::Heartbeat { host: h, report, arrived: None });
            }
        }
    }

    fn heartbeat_arrives(&mut self, h: usize, report: Report, arrived: Option<u64>) {
        if self.now < self.paused_until {
            let t = self.paused_until;
            return self.at(t, Event::Heartbeat { host: h, report, arrived });
        }
        if !self.reaches_controller(h) {
            return;
        }
        let Some(arrived) = arrived else {
            // Read now, decided once the heartbeats before it are: up to 60 ms later.
            let t = self.now + self.rand(61);
            let arrived = Some(self.now);
            return self.at(t, Event::Heartbeat { host: h, report, arrived });
        };
        if let Some(answer) = self.take_heartbeat(h, report, arrived) {
            let late =
                if self.now < self.hosts[h].late_renewals_until { 2_000 + self.rand(4_000) } else { 0 };
            let t = self.now + self.delay() + late;
            self.at(t, Event::Answer { host: h, answer });
        }
    }

    /// The agent of `h` asks `peers` whether the controller may still hold quorum; the poll
    /// is taken once all answered or at its timeout.
    pub(super) fn ask_peers(&mut self, h: usize, peers: &[usize], until: u64, lost: bool) {
        let (now, conn) = (self.now, self.hosts[h].conn);
        // An agent keeps its connections to the peers it polls (its neighbours; a standing
        // volunteer, those it proves with too, made before a round needs them): any other
        // costs a handshake first, a loaded peer's more. (Neighbours' connections are taken as
        // made: made at a round's first cheap polls, they are kept from then on.)
        let kept: BTreeSet<&str> = self.hosts[h].keeper.kept_peers().iter().map(String::as_str).collect();
        let costs: Vec<u64> = (peers.iter())
            .map(|&p| match () {
                _ if kept.contains(self.hosts[p].spec.name.as_str()) => 0,
                _ if self.hosts[p].slow_answers => 100,
                _ => 2,
            })
            .collect();
        for (&p, cost) in peers.iter().zip(costs) {
            let connect = if cost == 0 { 0 } else { cost + self.rand(if cost == 100 { 500 } else { 8 }) };
            if self.linked(h, p) && !lost {
                let (d1, d2) = (self.delay() + connect, self.delay());
                self.at(now + d1, Event::PeerAsked { asker: h, peer: p, poll: now, back_delay: d2, conn });
            }
        }
        let waiting = peers.len();
        self.hosts[h].polls.push(OpenPoll { started: now, unreported: Vec::new(), waiting, until });
        let t = (now + self.config.timings.poll_every_ms() / 4).min(until);
        self.at(t, Event::PollDone { host: h, poll: now, conn });
    }

    /// A command goes to its host's agent; one that cannot be sent fails at once.
    pub(super) fn send_command(&mut self, c: Command) {
        let h = self.host(&c.host);
        if !self.command_stream(h) {
            let result = Err(format!("could not send it: the agent on {} is not connected", c.host));
            self.outbox.push_back(Followup::Input(Input::Result { host: c.host, id: c.op, result }));
            return;
        }
        let conn = self.hosts[h].conn;
        match self.config.clock {
            Clock::Tick => self.command_arrives(h, conn, c),
            Clock::Jittered { .. } => {
                let t = self.now + self.delay();
                self.at(t, Event::Command { host: h, conn, command: c });
            }
        }
    }

    /// An agent sends a result back to the controller.
    pub(super) fn send_result(&mut self, input: Input) {
        match self.config.clock {
            Clock::Tick => self.outbox.push_back(Followup::Input(input)),
            Clock::Jittered { .. } => {
                let t = self.now + self.delay();
                self.at(t, Event::Result(input));
            }
        }
    }

    /// Whether the controller can send to the agent of `h`: with sessions, over the one its
    /// agent holds; without, whenever the network reaches the host.
    pub(super) fn command_stream(&self, h: usize) -> bool {
        let a = &self.hosts[h];
        self.reaches_controller(h) && (!self.config.sessions || (a.powered && a.agent_up && a.registered))
    }

    pub(super) fn reaches_controller(&self, h: usize) -> bool {
        let a = &self.hosts[h];
        a.link_controller && a.link_network
    }

    /// Whether the network joins two hosts (peer polls and live migrations); whether anyone
    /// answers there is another matter.
    pub(super) fn linked(&self, a: usize, b: usize) -> bool {
        self.hosts[a].link_network && self.hosts[b].link_network
    }
}
