//! The agent's half of the safety rule: its own lease, the peer polls, and the decision to
//! destroy its protected VMs (self-fence) or to keep them. Pure: the agent's shell feeds it the
//! time, a random seed, lease grants and poll answers, and carries out what `tick` decides.
//!
//! The rule (engine/SAFETY.md): when its lease expires, an agent keeps its
//! VMs only if its latest poll shows so many votes that the leader cannot count (itself
//! included, once the leader cannot count it either) that the votes left are fewer than the
//! majority. A peer's vote cannot be counted if the newest lease the leader could count for it
//! ends by the *deadline*: `fence_margin - guard` after this agent's own lease ended (before the
//! leader may declare this host dead), or the start of the poll, whichever is later. Or it keeps
//! them within the grace after a *fact*: an instant at which the leader lacked quorum, shown by
//! its own poll or passed on by a peer; the leader cannot declare anybody dead before that
//! instant plus `lease_ttl + fence_margin`.
//!
//! Which peers are asked, and when, only decides how often a needless fence happens and what
//! the polls cost, never whether a VM can run twice: that is decided by `judge` and by what a
//! fact is. At scale an agent asks few peers: a few at random for a fact they hold (cheap
//! polls); a few agents (the provers) ask as many as can show the leader lacks quorum (direct
//! polls), and more join them, doubling every period, only while no fact comes. A prover whose
//! poll fell short asks only the peers that have not answered yet, for as many lapses as are
//! missing (SAFETY.md, 4b).

use std::collections::{BTreeMap, BTreeSet};

use crate::{Millis, Timings};

/// How many peers a cheap poll asks: a fact known to a fraction `f` of the hosts reaches about
/// `2 f` more with every poll round. Four spread it a round or two sooner, at a third more
/// RPCs in the round's busiest second (17 per host at 1000 hosts, against 13).
const CHEAP_ASKS: usize = 2;
/// The peers an agent's cheap polls choose from: the first of its own order of them
/// (`LeaseKeeper::order`). Its connections to them are kept once made, so a cheap poll rarely
/// costs a handshake, and no agent keeps more than this many beyond what it proves with.
/// Random neighbourhoods of this size pass a fact on about as fast as the whole cluster would.
pub const NEIGHBOURS: usize = 16;
/// How many agents prove a fact directly in every round of polls; the others learn it from them
/// (cheap polls). More make a round's first fact come sooner, at about `hosts / 2` asks each.
/// The standing ones are the same members every round (those whose names hash lowest), so a
/// round never lacks a volunteer by chance; the others, on average, are drawn anew, so a round
/// still has one when the standing ones are down. (Drawn alone, three on average, no agent of
/// 100 volunteered in one round in twenty: every agent then polled directly at once.) In a
/// cluster of up to four hosts every agent volunteers.
const STANDING_VOLUNTEERS: usize = 2;
const DRAWN_VOLUNTEERS: u64 = 3;
/// While a round has no fact, this many more agents on average become provers in its first
/// period of escalation, twice as many in the next, and so on: one fact from any of them
/// reaches the others by cheap polls, so more provers only help when the first ones' polls
/// fail, and cluster-wide a period costs a few direct polls, not one per agent.
const ESCALATION_BASE: u64 = 5;

/// A fact a peer holds: the leader lacked quorum at an instant `age_ms` before its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayedFact {
    pub age_ms: u64,
    /// The newest leader epoch the peer had seen when it took note of the fact.
    pub epoch: u64,
    /// The membership the votes were counted in (`LeaseKeeper::membership`).
    pub membership: u64,
}

/// One peer's answer to "until when could the leader count your lease?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAnswer {
    pub host: String,
    /// From the moment it answered; negative: that long ago.
    pub upper_remaining_ms: i64,
    /// When the answer arrived here.
    pub received_at: Millis,
    /// The newest leader epoch the peer has seen.
    pub epoch: u64,
    /// The newest fact the peer holds, if any.
    pub fact: Option<RelayedFact>,
}

/// Something from a leader older than the newest this agent has seen: a deposed leader's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "epoch {got} is older than epoch {newest}, the newest this agent has seen: it comes from a deposed leader"
)]
pub struct StaleEpoch {
    pub got: u64,
    pub newest: u64,
}

/// A finished poll of the peers `PollPeers` named; peers that did not answer in time are
/// simply absent. `started` is no later than the send of any of its questions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Poll {
    pub started: Millis,
    pub answers: Vec<PeerAnswer>,
}

/// Where the agent stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Holds an unexpired lease.
    Leased,
    /// Just started, no lease yet: a short grace to get one before the rule applies.
    Starting,
    /// No lease, but its peers confirm the leader cannot have quorum: VMs kept.
    Keeping { reason: String },
    /// Destroyed its protected VMs; stays so until a lease comes back.
    Fenced { reason: String },
}

/// What the shell must do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    /// Ask these peers, waiting for answers until `until` (connections included), and report
    /// back with `polled`: the answers so far, as often as every quarter period (a direct poll
    /// may prove a fact before every peer answered), then `poll_ended`. Stop early once
    /// `wants_answers` says no.
    PollPeers {
        ask: Vec<String>,
        until: Millis,
        /// A prover's poll: it may need a connection to most peers, where a cheap one keeps
        /// to a few.
        direct: bool,
    },
    /// Destroy every protected VM at once, and record why.
    Fence {
        reason: String,
    },
    /// Log that the VMs are kept without a lease, and why.
    Keep {
        reason: String,
    },
}

/// When the polls of one round go out: a round ends when a fact moves the need for a proof
/// past it.
#[derive(Clone, Debug)]
struct Round {
    /// The instant by which a newer proof is needed (`LeaseKeeper::need`).
    need: Millis,
    /// A volunteer proves a fact directly at once; `None` once done, or for the others.
    volunteer_at: Option<Millis>,
    /// From then on cheap polls, one after the other, until a fact ends the round.
    cheap_from: Millis,
    /// From then on, every period without a fact, more agents become provers.
    escalate_from: Millis,
    /// The escalation periods this agent has drawn in so far.
    drawn: u64,
    /// This agent proves in this round: a direct poll every period until a fact ends it.
    prover: bool,
    /// When its latest direct poll of this round went out.
    direct_at: Option<Millis>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OpenPoll {
    started: Millis,
    direct: bool,
    until: Millis,
}

/// The answers of a prover's direct polls in one round, merged: a peer's lapse counts at
/// `started`, the first poll's start, since every answer was given after it (SAFETY.md, 4b).
#[derive(Clone, Debug)]
struct Proving {
    started: Millis,
    answers: BTreeMap<String, PeerAnswer>,
}

impl Proving {
    fn poll(&self) -> Poll {
        Poll { started: self.started, answers: self.answers.values().cloned().collect() }
    }

    /// Keeps, of two answers of one peer, the one that ends its lease sooner: each bounds it.
    fn merge(&mut self, answers: &[PeerAnswer]) {
        let end = |a: &PeerAnswer| a.received_at.0 as i64 + a.upper_remaining_ms;
        for a in answers {
            match self.answers.get(&a.host) {
                Some(held) if end(held) <= end(a) => {}
                _ => {
                    self.answers.insert(a.host.clone(), a.clone());
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct LeaseKeeper {
    /// This host's name: it is among the members a fact is counted in.
    host: String,
    cfg: Timings,
    started: Millis,
    /// Own view of the lease: from the send of the heartbeat that earned it.
    lease_end: Option<Millis>,
    cluster_hosts: usize,
    /// The peers the leader last listed; `None` until an answer listed them.
    peers: Option<BTreeSet<String>>,
    last_poll: Option<Poll>,
    poll_started: Option<Millis>,
    /// The polls under way, until they ended (or their time is up): a cheap one and a direct
    /// one or two, so that a prover waiting on slow peers still learns a fact from others.
    open: Vec<OpenPoll>,
    /// When the latest cheap poll went out.
    cheap_started: Option<Millis>,
    /// The latest direct poll (merged with the earlier ones it builds on): what a prediction
    /// rests on, which a cheap poll of a few peers cannot carry.
    last_direct: Option<Poll>,
    /// The direct poll before it, while the latest has only part of its answers: answers come
    /// in as they arrive, and the first few must not put a poll that showed more out of use.
    prev_direct: Option<Poll>,
    /// This host's rank among the members by name hash: the lowest stand as volunteers.
    rank: usize,
    /// The peers in an order of this host's own (by a hash of both names): a fresh direct poll
    /// asks the first of them, always the same, so that a standing volunteer can keep its
    /// connections to them made (`kept_peers`) and prove without a handshake.
    order: Vec<String>,
    /// A prover's direct polls of this round that have not shown a fact yet.
    proving: Option<Proving>,
    round: Option<Round>,
    /// The latest instant at which the leader is known to have lacked quorum.
    confirmed_at: Option<Millis>,
    /// The newest epoch seen when `confirmed_at` was last moved on.
    confirmed_epoch: u64,
    phase: Phase,
    /// Fenced, and the shell confirmed that no protected VM runs here any more.
    fence_done: bool,
    /// When the peers the latest prediction counts on will all have lapsed.
    fact_poll_at: Option<Millis>,
    /// The newest leader epoch seen, in a lease, a command, a registration or a peer's answer.
    newest_epoch: u64,
    /// xorshift state: which peers are asked, who volunteers, the jitter of a round.
    rng: u64,
}

impl LeaseKeeper {
    /// `seed` must differ between agents: it spreads their polls over time and over peers.
    pub fn new(host: &str, cfg: Timings, now: Millis, seed: u64) -> LeaseKeeper {
        LeaseKeeper {
            host: host.to_string(),
            cfg,
            started: now,
            lease_end: None,
            cluster_hosts: 0,
            peers: None,
            last_poll: None,
            poll_started: None,
            open: Vec::new(),
            cheap_started: None,
            last_direct: None,
            prev_direct: None,
            rank: 0,
            order: Vec::new(),
            proving: None,
            round: None,
            confirmed_at: None,
            confirmed_epoch: 0,
            phase: Phase::Starting,
            fence_done: false,
            fact_poll_at: None,
            newest_epoch: 0,
            // splitmix64 of the seed: close seeds (host indexes) give unrelated streams.
            rng: mix(seed.wrapping_add(0x9E37_79B9_7F4A_7C15)) | 1,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn timings(&self) -> Timings {
        self.cfg
    }

    /// The leader's timings, as it sent them at registration: from now on the rule runs on
    /// them. A lease already held keeps the end it was granted with.
    pub fn set_timings(&mut self, cfg: Timings) {
        self.cfg = cfg;
    }

    /// The end of the lease this agent holds, if any, in its own view.
    pub fn lease_end(&self) -> Option<Millis> {
        self.lease_end
    }

    /// Whether this host may start a VM (or take one by live migration) now: only while it
    /// holds a lease, so that every copy it runs is one its self-fence covers.
    pub fn may_start(&self, now: Millis) -> Result<(), NoLease> {
        match self.lease_end {
            Some(end) if now < end => Ok(()),
            Some(end) => Err(NoLease::Expired { ago_ms: now.since(end) }),
            None => Err(NoLease::NeverHeld),
        }
    }

    /// The shell destroyed every protected VM after a `Fence`: nothing here needs the
    /// watchdog to reset the host any more.
    pub fn fence_completed(&mut self) {
        if matches!(self.phase, Phase::Fenced { .. }) {
            self.fence_done = true;
        }
    }

    /// Until when the leader cannot declare anybody dead after the fact at `c`, less the guard
    /// a destroy needs.
    fn grace_end(&self, c: Millis) -> Millis {
        Millis((c.0 + self.cfg.lease_ttl_ms + self.cfg.fence_margin_ms).saturating_sub(self.cfg.guard_ms))
    }

    /// The earliest instant at which the leader may declare this host dead, as far as this
    /// agent can prove: its own lease end plus the fence margin (the leader's view of the lease
    /// ends no earlier), or later after a fact showed the leader lacked quorum at `c` (it then
    /// needs quorum for `lease_ttl + fence_margin` first). `None`: nothing is proved.
    fn declarable_from(&self) -> Option<Millis> {
        let margin = self.cfg.fence_margin_ms;
        let by_lease = self.lease_end.map(|e| Millis(e.0 + margin));
        let by_fact = self.confirmed_at.map(|c| Millis(c.0 + self.cfg.lease_ttl_ms + margin));
        by_lease.max(by_fact)
    }

    /// Whether the watchdog may be fed at `now`. A feed keeps the host up for `timeout_ms`
    /// more even if this agent dies or hangs right after it, so it is allowed only when the
    /// host would then be reset (`guard / 2` kept for the reset itself) before the leader may
    /// declare it dead, or when no protected VM can run here (fence done, or a one-host
    /// cluster, where nothing is ever restarted elsewhere).
    pub fn may_feed(&self, now: Millis, timeout_ms: u64) -> bool {
        if self.cluster_hosts == 1 || (self.fence_done && matches!(self.phase, Phase::Fenced { .. })) {
            return true;
        }
        self.declarable_from().is_some_and(|d| now.0 + timeout_ms + self.cfg.guard_ms / 2 <= d.0)
    }

    /// The newest leader epoch this agent has seen.
    pub fn newest_epoch(&self) -> u64 {
        self.newest_epoch
    }

    /// Takes note of a leader's epoch (a registration, a command): refused if it is older than
    /// the newest seen, since that leader has been deposed.
    pub fn see_epoch(&mut self, epoch: u64) -> Result<(), StaleEpoch> {
        if epoch < self.newest_epoch {
            return Err(StaleEpoch { got: epoch, newest: self.newest_epoch });
        }
        if epoch > self.newest_epoch {
            // Its answers were of the older epoch.
            self.proving = None;
            self.last_direct = None;
            self.prev_direct = None;
        }
        self.newest_epoch = epoch;
        Ok(())
    }

    /// The leader of `epoch` granted `ttl_ms` to the heartbeat sent at `sent_at`, in a cluster
    /// of `cluster_hosts` hosts. A deposed leader's lease is refused: its successor does not
    /// count it.
    pub fn granted(
        &mut self,
        sent_at: Millis,
        ttl_ms: u64,
        cluster_hosts: usize,
        epoch: u64,
    ) -> Result<(), StaleEpoch> {
        self.see_epoch(epoch)?;
        let end = Millis(sent_at.0 + ttl_ms);
        self.fence_done = false;
        self.lease_end = Some(self.lease_end.map_or(end, |e| e.max(end)));
        self.cluster_hosts = cluster_hosts;
        Ok(())
    }

    /// The size of the cluster as the leader last said, also from answers without a lease.
    pub fn set_cluster_hosts(&mut self, n: usize) {
        self.cluster_hosts = n;
    }

    /// The peers the leader last listed (this host's fellow members). Only their poll answers
    /// count: a host removed from the cluster may still answer, and its lapse says nothing of
    /// the votes the leader counts.
    pub fn set_peers(&mut self, peers: impl IntoIterator<Item = String>) {
        let peers: BTreeSet<String> = peers.into_iter().collect();
        if self.peers.as_ref() != Some(&peers) {
            for poll in self
                .last_poll
                .iter_mut()
                .chain(self.last_direct.iter_mut())
                .chain(self.prev_direct.iter_mut())
            {
                poll.answers.retain(|a| peers.contains(&a.host));
            }
            // Lapses counted in another membership prove nothing in this one.
            self.proving = None;
            // Names, not their sorted order, so that the volunteers of hosts named by rack are
            // not all in one rack.
            let own = (name_hash(&self.host), self.host.as_str());
            self.rank = peers.iter().filter(|p| (name_hash(p), p.as_str()) < own).count();
            self.order = peers.iter().cloned().collect();
            // Mixed, not only XORed: orders that share structure would give hosts whose names
            // hash alike the same neighbours, and a fact would stay among them.
            let pair = |p: &String| mix(name_hash(p) ^ own.0);
            self.order.sort_by_cached_key(|p| (pair(p), p.clone()));
            self.peers = Some(peers);
        }
    }

    /// A fingerprint of the membership this agent counts votes in (itself, its peers, the
    /// cluster's size); `None` before the leader listed its peers. A fact counted in another
    /// membership is not taken from a peer: with a host removed or added in between, it may
    /// not hold in this one (SAFETY.md, 8c).
    fn membership(&self) -> Option<u64> {
        // Summed: the same for any order of the same names.
        let peers = self.peers.as_ref()?;
        let names = peers.iter().fold(name_hash(&self.host), |sum, p| sum.wrapping_add(name_hash(p)));
        Some(names ^ (self.cluster_hosts as u64).rotate_left(32))
    }

    /// The newest fact this agent holds, for a peer that asks, at `now`.
    pub fn fact(&self, now: Millis) -> Option<RelayedFact> {
        let c = self.confirmed_at?;
        Some(RelayedFact {
            age_ms: now.since(c),
            epoch: self.confirmed_epoch,
            membership: self.membership()?,
        })
    }

    /// Until when the leader could count this agent's vote, in its own view. The leader counts
    /// only leases this agent received, each until one interval before its end
    /// (`Timings::quorum_shortfall_ms`), and each ends at most `max_transit` after this agent's
    /// own view of it. Before its first lease, an earlier run of this agent may have held one,
    /// sent before this run started: it ended by `started + lease_ttl` in this agent's view.
    fn upper_end(&self) -> i64 {
        let end = self.lease_end.unwrap_or(Millis(self.started.0 + self.cfg.lease_ttl_ms));
        (end.0 + self.cfg.max_transit_ms) as i64 - self.cfg.quorum_shortfall_ms() as i64
    }

    /// How long this agent's own lease lasts from `now` (negative: lapsed that long ago);
    /// `None` before its first lease.
    pub fn lease_remaining_ms(&self, now: Millis) -> Option<i64> {
        self.lease_end.map(|e| e.0 as i64 - now.0 as i64)
    }

    /// What this agent answers a peer: until when the leader could count its lease, from now
    /// (negative: it could not since that long).
    pub fn upper_remaining_ms(&self, now: Millis) -> i64 {
        self.upper_end() - now.0 as i64
    }

    /// Takes the fact at `c` if it is newer than the one held.
    fn confirm(&mut self, c: Millis) {
        if self.confirmed_at.is_none_or(|held| held < c) {
            self.confirmed_at = Some(c);
            self.confirmed_epoch = self.newest_epoch;
        }
    }

    /// Answers of a poll (all of them, or those so far of the open one: `started` says which).
    /// Only the answers of peers that have seen the same newest epoch as this
    /// agent count; it returns the others, with their epochs, for the log. An older one may
    /// speak of a deposed leader's lease. A newer one is not taken on the peer's word either:
    /// only a leader's own message (a registration, a lease, a command) moves this agent's
    /// epoch on, so a host that lies cannot make its askers refuse the real leader
    /// (SAFETY.md, "Lying hosts"); leaving a current peer's answer out only makes a fence more
    /// likely. A fact a peer passes on is taken at `started - age`: the peer answered after the
    /// question was sent, so after `started`, and the fact is no later than that answer minus
    /// its age.
    pub fn polled(&mut self, mut poll: Poll) -> Vec<(String, u64)> {
        let (current, other): (Vec<PeerAnswer>, Vec<PeerAnswer>) =
            poll.answers.into_iter().partition(|a| a.epoch == self.newest_epoch);
        // Only the answers of the peers the leader last listed count (`set_peers` keeps it so).
        poll.answers =
            current.into_iter().filter(|a| self.peers.as_ref().is_none_or(|p| p.contains(&a.host))).collect();
        let membership = self.membership();
        let relayed = poll
            .answers
            .iter()
            .filter_map(|a| a.fact)
            .filter(|f| f.epoch == self.newest_epoch && Some(f.membership) == membership)
            .filter_map(|f| poll.started.0.checked_sub(f.age_ms))
            .max();
        if let Some(c) = relayed {
            self.confirm(Millis(c));
        }
        let open = self.open.iter().find(|o| o.started == poll.started).copied();
        let poll = match (open, self.proving.as_mut()) {
            (Some(o), Some(proving)) if o.direct && poll.started >= proving.started => {
                proving.merge(&poll.answers);
                let merged = proving.poll();
                self.last_direct = Some(merged.clone());
                merged
            }
            // The rest of a poll's answers (one that ended, or a cheap one): added to what its
            // earlier reports brought, never in their place.
            _ if self.last_poll.as_ref().is_some_and(|l| l.started == poll.started) => {
                let mut last = self.last_poll.take().expect("just seen");
                last.answers.extend(poll.answers);
                last
            }
            _ => poll,
        };
        if self.shows_fact(&poll) {
            self.confirm(poll.started);
            self.proving = None;
        }
        if self.round.as_ref().is_some_and(|r| self.round_need() != r.need) {
            // A fact ended the round: nothing more to ask.
            self.open.clear();
        }
        if self.last_poll.as_ref().is_none_or(|p| p.started <= poll.started) {
            self.last_poll = Some(poll);
        }
        other.into_iter().map(|a| (a.host, a.epoch)).collect()
    }

    /// The shell has reported every answer of the poll that started at `started`.
    pub fn poll_ended(&mut self, started: Millis) {
        self.open.retain(|o| o.started != started);
    }

    /// Whether answers of the poll that started at `started` are still wanted at `now`: not
    /// once it is over, or a fact ended its round.
    pub fn wants_answers(&self, started: Millis, now: Millis) -> bool {
        self.open.iter().any(|o| o.started == started && now < o.until)
    }

    /// The peers of `poll` whose votes the leader could not count at `t`, and whether this
    /// host's own vote was already beyond its count then.
    fn lapsed_by<'p>(&self, poll: &'p Poll, t: Millis) -> (Vec<&'p str>, bool) {
        // received_at + remaining is no earlier than the true end: the answer was given before
        // it arrived.
        let lapsed = poll
            .answers
            .iter()
            .filter(|a| a.received_at.0 as i64 + a.upper_remaining_ms <= t.0 as i64)
            .map(|a| a.host.as_str())
            .collect();
        (lapsed, self.upper_end() <= t.0 as i64)
    }

    /// Whether so many votes are beyond the leader's count that it cannot hold a majority.
    fn blocks(&self, lapsed: &[&str], own: bool) -> bool {
        let total = self.cluster_hosts + 1;
        total.saturating_sub(lapsed.len() + usize::from(own)) < total / 2 + 1
    }

    /// Whether `poll` shows that the leader lacked quorum at its start. Its own vote counts as
    /// lapsed only once the leader could not count it either: a fact is a statement about the
    /// cluster, which peers pass on, not only about what this host may keep.
    fn shows_fact(&self, poll: &Poll) -> bool {
        let (lapsed, own) = self.lapsed_by(poll, poll.started);
        self.cluster_hosts > 0 && self.blocks(&lapsed, own)
    }

    fn rand(&mut self, n: u64) -> u64 {
        xorshift(&mut self.rng, n)
    }

    /// The instant by which this agent needs a newer proof: its lease end (or the end of its
    /// start-up grace), or the end of the grace after the fact it holds, whichever is later.
    fn need(&self) -> Millis {
        let by_lease = self.lease_end.unwrap_or(Millis(self.started.0 + 2 * self.cfg.heartbeat_interval_ms));
        by_lease.max(self.confirmed_at.map_or(Millis(0), |c| self.grace_end(c)))
    }

    /// The need of the round under way, if it is not over: a renewed lease ends it, and so does a
    /// fact from no earlier than two intervals before its need. An older fact (passed on from
    /// an earlier round) moves the need a little, but does not end the round: the watchdog may
    /// be fed after a fact at `c` only until `c + lease_ttl + fence_margin - timeout - guard/2`,
    /// at least `c + 2 * interval` for any timeout the timings allow
    /// (`Timings::max_watchdog_timeout_ms`), so a fact that old would let the feeds stop, and
    /// the host be reset, before the next round.
    fn round_need(&self) -> Millis {
        let need = self.need();
        match &self.round {
            Some(r) if need > r.need => {
                let renewed = self.lease_end.is_some_and(|e| e > r.need);
                let window = 2 * self.cfg.heartbeat_interval_ms;
                let fresh = self.confirmed_at.is_some_and(|c| c.0 + window >= r.need.0);
                if renewed || fresh { need } else { r.need }
            }
            _ => need,
        }
    }

    /// The round of polls before `need`, drawn anew when the need moves. It begins an interval
    /// before the need, but not before the leader stops counting this host's own vote (until
    /// then its own polls cannot show a fact). Volunteers prove at once, jittered; the others
    /// ask a few peers for a fact from half a period later, one poll after the other. From a
    /// period and a half after the start, every period without a fact draws more provers
    /// (`ESCALATION_BASE`, doubling), unless what this agent's polls saw says the leader holds
    /// quorum.
    fn round(&mut self, need: Millis) -> Round {
        if let Some(r) = self.round.as_ref().filter(|r| r.need == need) {
            return r.clone();
        }
        let (p, i) = (self.cfg.poll_every_ms(), self.cfg.heartbeat_interval_ms);
        let own_lapse = u64::try_from(self.upper_end()).unwrap_or(0) + p / 2;
        let start = need.0.saturating_sub(i).max(own_lapse);
        let peers = self.peers.as_ref().map_or(0, |p| p.len()) as u64;
        let volunteer = self.stands_as_volunteer() | (self.rand(peers) < DRAWN_VOLUNTEERS);
        let volunteer_at = volunteer.then(|| Millis(start + self.rand(p / 2)));
        // A fresh agent cannot show a fact of its own before its start-up grace ends (an
        // earlier run's lease may still count): it can only learn one from its peers.
        let cheap_from =
            if start < need.0 { start + p / 2 + self.rand(p / 2) } else { need.0.saturating_sub(i) };
        let escalate_from = Millis(start + p + p / 2 + self.rand(p / 2));
        self.proving = None;
        let round = Round {
            need,
            volunteer_at,
            cheap_from: Millis(cheap_from),
            escalate_from,
            drawn: 0,
            prover: false,
            direct_at: None,
        };
        self.round = Some(round.clone());
        round
    }

    /// Whether this host is one of the standing volunteers: among the members (itself and its
    /// peers) whose names hash lowest.
    pub fn stands_as_volunteer(&self) -> bool {
        self.rank < STANDING_VOLUNTEERS
    }

    /// Whether this agent proves by a direct poll now, in the round before `need`: a prover of
    /// this round every period, or one drawn in this period of escalation. Not once a direct
    /// poll could no longer end before the need, nor while what its polls saw says the leader
    /// holds quorum: a direct poll could not show a fact then.
    fn proves_now(&mut self, now: Millis, need: Millis) -> bool {
        let p = self.cfg.poll_every_ms();
        let Some(r) = self.round.as_ref() else { return false };
        if now.0 + p / 2 > need.0 || self.leader_seems_alive(now, need) {
            return false;
        }
        if r.prover {
            return r.direct_at.is_none_or(|s| now.since(s) >= p);
        }
        if now < r.escalate_from {
            return false;
        }
        let period = (now.0 - r.escalate_from.0) / p;
        if r.drawn > period {
            return false;
        }
        let odds = ESCALATION_BASE.saturating_mul(1 << period.min(32));
        let peers = self.peers.as_ref().map_or(0, |p| p.len()) as u64;
        let drawn = self.rand(peers) < odds;
        let r = self.round.as_mut().expect("seen above");
        r.drawn = period + 1;
        r.prover = drawn;
        drawn
    }

    /// Whether the latest poll (no older than two periods, two answers at least) shows most
    /// of the peers asked with a lease the leader could count past `need` and its margin: the
    /// leader renews them, so it holds quorum. Only saves direct polls: a host that lies about
    /// it can only make this one less likely to keep its VMs.
    fn leader_seems_alive(&self, now: Millis, need: Millis) -> bool {
        let Some(poll) = self.last_poll.as_ref() else { return false };
        if now.since(poll.started) > 2 * self.cfg.poll_every_ms() || poll.answers.len() < 2 {
            return false;
        }
        let past = (need.0 + self.cfg.fence_margin_ms).saturating_sub(self.cfg.guard_ms) as i64;
        let fresh =
            poll.answers.iter().filter(|a| a.received_at.0 as i64 + a.upper_remaining_ms > past).count();
        2 * fresh > poll.answers.len()
    }

    /// The peers a direct poll asks. A prover with nothing to build on asks those whose lapse
    /// shows the leader lacks quorum (`direct_count`). One whose direct polls of the last
    /// interval fell short for want of answers (most of those that answered had lapsed) asks,
    /// of the peers that have not answered them, as many as should make up the lapses still
    /// missing (at the rate the answers showed lapses), and a margin: their answers count with
    /// the earlier ones. When the answers show too few lapses (leases still running at that
    /// instant), it starts afresh instead.
    fn direct_ask(&mut self, now: Millis) -> Vec<String> {
        let i = self.cfg.heartbeat_interval_ms;
        if let Some(proving) = self.proving.as_ref().filter(|p| now.since(p.started) <= i) {
            let merged = proving.poll();
            let (lapsed, own) = self.lapsed_by(&merged, proving.started);
            let total = self.cluster_hosts + 1;
            let missing = (total - total / 2).saturating_sub(lapsed.len() + usize::from(own));
            let unanswered: Vec<&String> =
                self.peers.iter().flatten().filter(|p| !proving.answers.contains_key(*p)).collect();
            // Of `answered` peers, `lapsed` had lapsed: as many more lapses need that many
            // times more peers.
            let (answered, lapsed) = (proving.answers.len(), lapsed.len());
            let wanted = (missing * answered).div_ceil(lapsed.max(1));
            if missing > 0 && answered > 0 && lapsed * 2 >= answered && wanted <= unanswered.len() {
                return pick(&mut self.rng, unanswered, with_margin(wanted));
            }
        }
        self.proving = Some(Proving { started: now, answers: BTreeMap::new() });
        if let Some(done) = self.last_direct.take() {
            self.prev_direct = Some(done);
        }
        self.order.iter().take(self.direct_count()).cloned().collect()
    }

    /// How many peers a direct poll asks: those whose lapse shows the leader lacks quorum (all
    /// votes but a majority, this host's own among them), and some more for peers that are
    /// down or slow.
    fn direct_count(&self) -> usize {
        let total = self.cluster_hosts + 1;
        with_margin(total - (total / 2 + 1))
    }

    /// The peers this agent keeps connections to once made: its neighbours (`NEIGHBOURS`),
    /// and for a standing volunteer those its fresh direct polls ask.
    pub fn kept_peers(&self) -> &[String] {
        let n = if self.stands_as_volunteer() { self.direct_count().max(NEIGHBOURS) } else { NEIGHBOURS };
        &self.order[..n.min(self.order.len())]
    }

    /// The peers a standing volunteer makes connections to before it needs them, so that its
    /// proof costs no handshake: those its fresh direct polls ask. None for the others.
    pub fn warm_peers(&self) -> &[String] {
        if self.stands_as_volunteer() {
            &self.order[..self.direct_count().min(self.order.len())]
        } else {
            &[]
        }
    }

    /// Which peers to ask now, and until when, if a poll is due: see `round`. Past the need
    /// (keeping on a prediction) a direct poll every period, and one as soon as the peers a
    /// prediction counts on have lapsed: that poll turns the prediction into a fact.
    fn poll_due(&mut self, now: Millis) -> Option<(Vec<String>, Millis, bool)> {
        let p = self.cfg.poll_every_ms();
        let since = self.poll_started.map(|s| now.since(s));
        let fact_poll =
            self.fact_poll_at.is_some_and(|f| self.poll_started.is_none_or(|s| s < f) && f <= now);
        // One cheap poll at a time, until it ended or its time is up; a direct one every period
        // at most, the answers of the one before still taken until its end.
        self.open.retain(|o| now < o.until);
        let busy = |direct: bool| {
            self.open.iter().any(|o| o.direct == direct && (!direct || now.since(o.started) < p))
        };
        let (direct_busy, cheap_busy) = (busy(true), busy(false));
        let need = self.round_need();
        let direct = if fact_poll || (now >= need && !direct_busy && since.is_none_or(|d| d >= p)) {
            true
        } else if now >= need {
            return None;
        } else {
            let round = self.round(need);
            if !direct_busy && round.volunteer_at.is_some_and(|v| v <= now) {
                if let Some(r) = self.round.as_mut() {
                    r.volunteer_at = None;
                    r.prover = true;
                }
                true
            } else if !direct_busy && self.proves_now(now, need) {
                true
            } else if !cheap_busy && now >= round.cheap_from {
                false
            } else {
                return None;
            }
        };
        let peers = self.peers.as_ref().map_or(0, |p| p.len());
        // Cheap polls go one after the other (every quarter period at most) while they spread
        // a fact; one that asks every peer anyway goes every period.
        let gap = if CHEAP_ASKS < peers { p / 4 } else { p };
        if !direct && self.cheap_started.is_some_and(|c| now.since(c) < gap) {
            return None;
        }
        let ask = if direct {
            self.direct_ask(now)
        } else {
            let near: Vec<&String> = self.order.iter().take(NEIGHBOURS).collect();
            pick(&mut self.rng, near, CHEAP_ASKS)
        };
        // A direct poll in a round may take until shortly before the need, two periods at
        // most (connections included); the time left then serves a poll of its shortfall.
        let until = if direct && now < need {
            Millis((now.0 + 2 * p).min(need.0.saturating_sub(p / 4)).max(now.0 + p * 3 / 4))
        } else {
            Millis(now.0 + p * 3 / 4)
        };
        self.poll_started = Some(now);
        if !direct {
            self.cheap_started = Some(now);
            self.open.retain(|o| o.direct);
        }
        self.open.push(OpenPoll { started: now, direct, until });
        if let Some(r) = self.round.as_mut().filter(|r| direct && r.need == need) {
            r.direct_at = Some(now);
        }
        Some((ask, until, direct))
    }

    /// What the latest polls show about the leader's quorum: the latest of any kind, the latest
    /// direct one and the one before it, whichever shows more (each judged at its own start,
    /// and none older than two periods and an interval).
    fn judge(&self, own_end: Millis, now: Millis) -> Verdict {
        let rank = |v: &Verdict| match v {
            Verdict::Fact(_) => 0,
            Verdict::Predicted(..) => 1,
            Verdict::No(_) => 2,
        };
        [self.last_poll.as_ref(), self.last_direct.as_ref(), self.prev_direct.as_ref()]
            .into_iter()
            .flatten()
            .map(|poll| self.judge_poll(poll, own_end, now))
            .min_by_key(rank)
            .unwrap_or_else(|| Verdict::No("no peer poll has answered".into()))
    }

    fn judge_poll(&self, poll: &Poll, own_end: Millis, now: Millis) -> Verdict {
        // A poll older than that says nothing about now (a fact it showed is kept as
        // `confirmed_at`, and its grace needs no newer poll).
        if now.since(poll.started) > 2 * self.cfg.poll_every_ms() + self.cfg.heartbeat_interval_ms {
            return Verdict::No("the latest peer poll is too old".into());
        }
        let total = self.cluster_hosts + 1;
        let majority = total / 2 + 1;
        let detail = |lapsed: &[&str], own: bool| {
            let without = lapsed.len() + usize::from(own);
            // A few names say enough; a thousand would fill the log.
            let peers = match lapsed.len() {
                0 => "none of its peers".to_string(),
                1..=5 => lapsed.join(", "),
                n => format!("{} and {} more peers", lapsed[..3].join(", "), n - 3),
            };
            format!(
                "{without} of {} hosts without a lease the leader could count ({}{peers}); the leader can hold \
                 at most {} of {total} votes, majority {majority}",
                self.cluster_hosts,
                if own { "this host and " } else { "" },
                total - without.min(total),
            )
        };
        if self.shows_fact(poll) {
            let (at_start, own) = self.lapsed_by(poll, poll.started);
            return Verdict::Fact(detail(&at_start, own));
        }
        let deadline = Millis((own_end.0 + self.cfg.fence_margin_ms).saturating_sub(self.cfg.guard_ms));
        let (by_deadline, own) = self.lapsed_by(poll, deadline);
        if now < deadline && self.blocks(&by_deadline, own) {
            let last = poll
                .answers
                .iter()
                .map(|a| a.received_at.0 as i64 + a.upper_remaining_ms)
                .filter(|l| *l <= deadline.0 as i64)
                .max()
                .unwrap_or(0);
            return Verdict::Predicted(detail(&by_deadline, own), Millis(last.max(0) as u64 + 1));
        }
        Verdict::No(detail(&by_deadline, own))
    }

    pub fn tick(&mut self, now: Millis) -> Decision {
        let poll = |k: &mut LeaseKeeper| {
            k.poll_due(now).map_or(Decision::Nothing, |(ask, until, direct)| Decision::PollPeers {
                ask,
                until,
                direct,
            })
        };
        if self.lease_end.is_some_and(|e| now < e) {
            self.phase = Phase::Leased;
            return poll(self);
        }
        if matches!(self.phase, Phase::Fenced { .. }) {
            return Decision::Nothing;
        }
        if self.cluster_hosts == 1 {
            return Decision::Nothing; // one host: nowhere to fail over to, never self-fence
        }
        let own_end = self.lease_end.unwrap_or(self.started);
        if self.lease_end.is_none() && now.since(self.started) < 2 * self.cfg.heartbeat_interval_ms {
            // Just started: give the leader a chance to answer before judging.
            return poll(self);
        }
        if self.cluster_hosts == 0 {
            let reason = "no lease, and no leader ever said how big the cluster is: nothing can confirm the \
                          leader lacks quorum"
                .to_string();
            self.phase = Phase::Fenced { reason: reason.clone() };
            return Decision::Fence { reason };
        }
        let keep = match self.judge(own_end, now) {
            // `polled` took it as `confirmed_at`.
            Verdict::Fact(reason) => Ok(reason),
            Verdict::Predicted(reason, lapsed_at) => {
                self.fact_poll_at = Some(lapsed_at);
                Ok(format!("{reason}, once their leases lapse"))
            }
            // At the last confirmed instant the leader lacked quorum: it cannot declare this host
            // dead before holding quorum for lease_ttl + fence_margin after it. Until then keep
            // trying for a lease (the leader may just have come back for another host first).
            Verdict::No(reason) => match self.confirmed_at {
                Some(c) if now < self.grace_end(c) => Ok(format!(
                    "not confirmed by the latest poll ({reason}), but the leader lacked quorum {} ms ago",
                    now.since(c)
                )),
                _ => Err(reason),
            },
        };
        match keep {
            Ok(reason) => {
                let first = !matches!(self.phase, Phase::Keeping { .. });
                self.phase = Phase::Keeping { reason: reason.clone() };
                if first { Decision::Keep { reason } } else { poll(self) }
            }
            Err(reason) => {
                let reason = format!("lease expired and the leader may hold quorum: {reason}");
                self.phase = Phase::Fenced { reason: reason.clone() };
                Decision::Fence { reason }
            }
        }
    }
}

/// `n` peers and some more for peers that are down or slow.
fn with_margin(n: usize) -> usize {
    n + (n / 8).max(2)
}

/// `n` of `among` at random (partial Fisher-Yates).
fn pick(rng: &mut u64, mut among: Vec<&String>, n: usize) -> Vec<String> {
    let n = n.min(among.len());
    for k in 0..n {
        let j = k + xorshift(rng, (among.len() - k) as u64) as usize;
        among.swap(k, j);
    }
    among[..n].iter().map(|s| s.to_string()).collect()
}

/// splitmix64's finalizer: close inputs give unrelated outputs.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a: a hash of a host's name that every agent computes alike.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// A number below `n` from the xorshift state.
fn xorshift(state: &mut u64, n: u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state % n.max(1)
}

/// What a poll shows.
enum Verdict {
    /// At the poll's start the leader lacked quorum.
    Fact(String),
    /// The leader will lack quorum by the deadline unless peers renew, which the next polls see.
    /// Also when the last of the peers it counts on lapses.
    Predicted(String, Millis),
    No(String),
}

/// Why a host may not start a VM now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoLease {
    #[error("this host holds no lease yet")]
    NeverHeld,
    #[error("this host's lease expired {ago_ms} ms ago")]
    Expired { ago_ms: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(host: &str, upper: i64, at: u64) -> PeerAnswer {
        PeerAnswer {
            host: host.into(),
            upper_remaining_ms: upper,
            received_at: Millis(at),
            epoch: 1,
            fact: None,
        }
    }

    fn fresh(seed: u64) -> LeaseKeeper {
        LeaseKeeper::new("kvm1", Timings::default(), Millis(0), seed)
    }

    fn leased(at: u64) -> LeaseKeeper {
        let mut k = fresh(1);
        k.granted(Millis(at), 5_000, 3, 1).unwrap();
        k
    }

    /// kvm1 in a cluster of `hosts`, its lease (epoch 1) to 6_000.
    fn member_of(hosts: usize, seed: u64) -> LeaseKeeper {
        let mut k = fresh(seed);
        k.granted(Millis(1_000), 5_000, hosts, 1).unwrap();
        k.set_peers((2..=hosts).map(|i| format!("kvm{i}")));
        k
    }

    /// Ticks every 50 ms from `from` to `to`; the polls, with when they were due. Nobody
    /// answers: each poll ends at once with no answer.
    fn polls(k: &mut LeaseKeeper, from: u64, to: u64) -> Vec<(u64, Vec<String>)> {
        (from..to)
            .step_by(50)
            .filter_map(|t| match k.tick(Millis(t)) {
                Decision::PollPeers { ask, .. } => {
                    k.polled(Poll { started: Millis(t), answers: vec![] });
                    k.poll_ended(Millis(t));
                    Some((t, ask))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_small_cluster_polls_every_peer_from_shortly_before_its_lease_ends() {
        let mut k = member_of(3, 7); // lease to 6_000: the leader counts it until 5_000
        let early = polls(&mut k, 1_000, 5_100);
        assert!(early.is_empty(), "no poll while a poll cannot show a fact: {early:?}");
        let first = polls(&mut k, 5_100, 5_300);
        assert_eq!(first.len(), 1, "one poll per period: {first:?}");
        assert_eq!(first[0].1.len(), 2, "two peers: every one of them");
        // Then one every period: at expiry the latest is at most a period old, as before.
        let more = polls(&mut k, 5_300, 6_000);
        assert!(more.len() >= 3 && more.iter().all(|(_, ask)| ask.len() == 2), "{more:?}");
    }

    #[test]
    fn a_direct_poll_asks_the_lapses_a_proof_needs_then_only_its_shortfall() {
        let mut k = member_of(1_000, 3);
        // 1_001 votes, majority 501: this host's and 500 peers' lapses prove it.
        assert_eq!(k.direct_ask(Millis(5_200)).len(), 500 + 62);
        assert_eq!(member_of(3, 3).direct_ask(Millis(5_200)).len(), 2);
        assert_eq!(member_of(10, 3).direct_ask(Millis(5_200)).len(), 7, "5 needed and 2 more");
        // kvm1's direct poll at 5_200 heard from 200 of 562 peers, all lapsed: 300 more
        // lapses are missing. The next asks only peers that have not answered, 300 and a margin.
        let mut k = member_of(1_000, 3);
        k.poll_started = Some(Millis(5_200));
        k.open = vec![OpenPoll { started: Millis(5_200), direct: true, until: Millis(5_600) }];
        let first = k.direct_ask(Millis(5_200));
        let answered: Vec<PeerAnswer> = first[..200].iter().map(|h| answer(h, -300, 5_250)).collect();
        k.polled(Poll { started: Millis(5_200), answers: answered });
        k.poll_ended(Millis(5_200));
        assert_eq!(k.confirmed_at, None, "200 lapses prove nothing");
        let second = k.direct_ask(Millis(5_600));
        assert_eq!(second.len(), 300 + 37);
        assert!(second.iter().all(|h| !first[..200].contains(h)), "none of those that answered");
        // Their lapses count at 5_200, with the earlier ones: the fact is from then.
        k.open = vec![OpenPoll { started: Millis(5_600), direct: true, until: Millis(6_000) }];
        let answers: Vec<PeerAnswer> = second[..300].iter().map(|h| answer(h, -700, 5_650)).collect();
        k.polled(Poll { started: Millis(5_600), answers });
        assert_eq!(k.confirmed_at, Some(Millis(5_200)));
        // A poll that lapsed after 5_200 does not count at 5_200: with answers like that the
        // merged poll proves nothing, and the next direct poll starts afresh.
        let mut k = member_of(1_000, 3);
        k.open = vec![OpenPoll { started: Millis(5_200), direct: true, until: Millis(5_600) }];
        let first = k.direct_ask(Millis(5_200));
        let late: Vec<PeerAnswer> = first.iter().map(|h| answer(h, 100, 5_250)).collect();
        k.polled(Poll { started: Millis(5_200), answers: late });
        assert_eq!(k.confirmed_at, None);
        assert_eq!(k.direct_ask(Millis(5_600)).len(), 562, "nothing left to build on: a fresh poll");
        assert_eq!(k.proving.as_ref().map(|p| p.started), Some(Millis(5_600)));
    }

    /// 1000 agents whose leases end together and whose polls nobody answers: the provers come
    /// a few at first, then twice as many every period, never all of them at once.
    #[test]
    fn provers_escalate_geometrically_while_no_fact_comes() {
        let hosts = 1_000;
        let names: Vec<String> = (1..=hosts).map(|i| format!("kvm{i}")).collect();
        let mut provers_by_period = [0usize; 8];
        let mut direct = 0;
        for (i, name) in names.iter().enumerate() {
            let mut k = LeaseKeeper::new(name, Timings::default(), Millis(0), i as u64);
            k.granted(Millis(1_000), 5_000, hosts, 1).unwrap();
            k.set_peers(names.iter().filter(|p| *p != name).cloned());
            let mut first = None;
            for t in (4_000..6_000).step_by(50) {
                if let Decision::PollPeers { ask, .. } = k.tick(Millis(t))
                    && ask.len() > CHEAP_ASKS
                {
                    direct += 1;
                    first.get_or_insert(t);
                    k.polled(Poll { started: Millis(t), answers: vec![] });
                    k.poll_ended(Millis(t));
                }
            }
            if let Some(t) = first {
                provers_by_period[((t - 5_000) / 200) as usize] += 1;
            }
        }
        let provers: usize = provers_by_period.iter().sum();
        eprintln!("provers by the period they began in: {provers_by_period:?}; {direct} direct polls");
        assert!((20..=150).contains(&provers), "{provers} of 1000 agents proved: {provers_by_period:?}");
        // The volunteers first (about five), then more every period.
        assert!(provers_by_period[0] <= 15, "{provers_by_period:?}");
        assert!(provers_by_period[2] + provers_by_period[3] > provers_by_period[0], "{provers_by_period:?}");
    }

    /// Every agent's neighbours are its own draw: each host is the neighbour of about as many
    /// others as it has neighbours, none of a crowd (orders that shared structure gave hosts
    /// whose names hash alike the same neighbours, and the simulator's facts stopped spreading).
    #[test]
    fn neighbourhoods_are_drawn_independently() {
        let names: Vec<String> = (1..=1_000).map(|i| format!("kvm{i}")).collect();
        let mut chosen: BTreeMap<String, usize> = BTreeMap::new();
        for name in &names {
            let mut k = LeaseKeeper::new(name, Timings::default(), Millis(0), 1);
            k.set_peers(names.iter().filter(|p| *p != name).cloned());
            if !k.stands_as_volunteer() {
                assert_eq!(k.kept_peers().len(), NEIGHBOURS, "connections kept by {name}");
            }
            for p in &k.order[..NEIGHBOURS] {
                *chosen.entry(p.clone()).or_default() += 1;
            }
        }
        let most = chosen.values().max().copied().unwrap_or(0);
        assert!(chosen.len() > 990 && most < 4 * NEIGHBOURS, "{} hosts chosen, one by {most}", chosen.len());
    }

    /// A poll that shows most peers with leases the leader renews says it holds quorum: no
    /// agent escalates then.
    #[test]
    fn no_escalation_while_polls_show_the_leader_renewing_leases() {
        let mut escalated = 0;
        for seed in 0..200 {
            let mut k = member_of(1_000, seed);
            k.rank = STANDING_VOLUNTEERS; // not a standing volunteer
            for t in (5_000..6_000).step_by(50) {
                match k.tick(Millis(t)) {
                    Decision::PollPeers { ask, .. } if ask.len() > CHEAP_ASKS => {
                        let volunteered = k.round.as_ref().is_some_and(|r| t < r.escalate_from.0);
                        escalated += usize::from(!volunteered);
                        break;
                    }
                    Decision::PollPeers { ask, .. } => {
                        let answers = ask.iter().map(|h| answer(h, 4_000, t + 10)).collect();
                        k.polled(Poll { started: Millis(t), answers });
                        k.poll_ended(Millis(t));
                    }
                    _ => {}
                }
            }
        }
        assert_eq!(escalated, 0);
    }

    #[test]
    fn every_round_has_the_standing_volunteers_whatever_the_draws() {
        // Each of 100 hosts, with its own view of the members: exactly two stand, whatever the
        // seed, and they volunteer in every round.
        let keeper = |i: usize, seed: u64| {
            let mut k = LeaseKeeper::new(&format!("kvm{i}"), Timings::default(), Millis(0), seed);
            k.granted(Millis(1_000), 5_000, 100, 1).unwrap();
            k.set_peers((1..=100).filter(|j| *j != i).map(|j| format!("kvm{j}")));
            k
        };
        let standing: Vec<usize> = (1..=100).filter(|i| keeper(*i, 1).stands_as_volunteer()).collect();
        assert_eq!(standing.len(), STANDING_VOLUNTEERS, "{standing:?}");
        for seed in 0..50 {
            for i in &standing {
                let mut k = keeper(*i, seed);
                let round = k.round(k.need());
                assert!(round.volunteer_at.is_some(), "kvm{i}, seed {seed}: {round:?}");
            }
        }
        // And the drawn ones come on top: about three more per round.
        let drawn: usize = (0..50u64)
            .map(|seed| {
                (1..=100)
                    .filter(|i| !standing.contains(i))
                    .filter(|i| {
                        let mut k = keeper(*i, seed * 100 + *i as u64);
                        k.round(k.need()).volunteer_at.is_some()
                    })
                    .count()
            })
            .sum();
        assert!((75..=225).contains(&drawn), "{drawn} drawn volunteers in 50 rounds");
    }

    #[test]
    fn a_fact_a_peer_passes_on_is_taken_at_the_question_minus_its_age() {
        let mut k = member_of(3, 1);
        let membership = k.membership().unwrap();
        // kvm2 answers a poll sent at 10_000: it knew the leader lacked quorum 3_000 ms before
        // its answer. Its answer came after 10_000, so the fact is no earlier than 7_000.
        let relayed = RelayedFact { age_ms: 3_000, epoch: 1, membership };
        let answer = PeerAnswer { fact: Some(relayed), ..answer("kvm2", 4_000, 10_020) };
        k.polled(Poll { started: Millis(10_000), answers: vec![answer] });
        assert_eq!(k.confirmed_at, Some(Millis(7_000)));
        assert_eq!(k.fact(Millis(7_500)), Some(RelayedFact { age_ms: 500, epoch: 1, membership }));
        // The leader cannot declare anybody dead before 7_000 + 6_000: fed until then.
        assert!(k.may_feed(Millis(9_750), 3_000));
        assert!(!k.may_feed(Millis(9_751), 3_000));
        // Kept without a lease until the grace ends (less the guard), then fenced.
        assert!(matches!(k.tick(Millis(12_000)), Decision::Keep { .. }));
        assert!(matches!(k.tick(Millis(12_500)), Decision::Fence { .. }));
    }

    #[test]
    fn a_fact_of_an_older_epoch_or_another_membership_is_not_taken() {
        let mut k = member_of(3, 1);
        k.see_epoch(2).unwrap();
        let membership = k.membership().unwrap();
        let old = RelayedFact { age_ms: 100, epoch: 1, membership };
        let other = RelayedFact { age_ms: 100, epoch: 2, membership: membership ^ 1 };
        for fact in [old, other] {
            let answer = PeerAnswer { epoch: 2, fact: Some(fact), ..answer("kvm2", 4_000, 10_020) };
            k.polled(Poll { started: Millis(10_000), answers: vec![answer] });
            assert_eq!(k.confirmed_at, None, "{fact:?}");
        }
        // Nor from a host the leader does not list as a peer.
        let fact = RelayedFact { age_ms: 100, epoch: 2, membership };
        let answer = PeerAnswer { epoch: 2, fact: Some(fact), ..answer("kvm9", 4_000, 10_020) };
        k.polled(Poll { started: Millis(10_000), answers: vec![answer] });
        assert_eq!(k.confirmed_at, None);
    }

    #[test]
    fn no_poll_while_a_fact_holds_its_grace_then_a_round_before_it_ends() {
        let mut k = member_of(1_000, 5);
        let membership = k.membership().unwrap();
        let fact = RelayedFact { age_ms: 0, epoch: 1, membership };
        k.polled(Poll {
            started: Millis(5_500),
            answers: vec![PeerAnswer { fact: Some(fact), ..answer("kvm2", 0, 5_510) }],
        });
        // Grace from the fact at 5_500 to 11_000: no poll of any kind for its first 4.5 s,
        // although the lease ended at 6_000.
        assert!(matches!(k.tick(Millis(6_000)), Decision::Keep { .. }));
        assert!(polls(&mut k, 6_050, 10_000).is_empty());
        // Then a round: cheap polls of a few peers, one after the other, and direct ones only
        // if this agent volunteers or is drawn as a prover.
        let round = polls(&mut k, 10_000, 11_000);
        assert!(round.iter().any(|(_, ask)| ask.len() == CHEAP_ASKS));
        let sizes: Vec<(u64, usize)> = round.iter().map(|(t, a)| (*t, a.len())).collect();
        assert!(sizes.iter().all(|(_, n)| *n == CHEAP_ASKS || *n == 562), "{sizes:?}");
    }

    #[test]
    fn only_a_fresh_fact_ends_a_round() {
        let mut k = member_of(1_000, 5);
        let membership = k.membership().unwrap();
        let relay = |k: &mut LeaseKeeper, started: u64, c: u64| {
            let fact = RelayedFact { age_ms: started - c, epoch: 1, membership };
            let answers = vec![PeerAnswer { fact: Some(fact), ..answer("kvm2", 0, started + 10) }];
            k.polled(Poll { started: Millis(started), answers });
        };
        relay(&mut k, 5_500, 5_500);
        assert_eq!(k.round_need(), Millis(11_000));
        assert!(matches!(k.tick(Millis(10_000)), Decision::Keep { .. }));
        k.tick(Millis(10_050));
        // A peer passes on a fact from the round before: it moves the grace on by 500 ms, but
        // the watchdog could stop being fed at 8_000 after it; the round goes on.
        relay(&mut k, 10_100, 6_000);
        assert_eq!(k.round_need(), Millis(11_000));
        // A fact of this round ends it.
        relay(&mut k, 10_200, 10_000);
        assert_eq!(k.round_need(), Millis(15_500));
    }

    #[test]
    fn a_fact_needs_this_hosts_own_vote_beyond_the_leaders_count() {
        // Lease to 6_000: the leader may count this host until 5_000. At 4_900 both peers had
        // lapsed, but the leader could still count this host and itself: 2 of 4 votes is no
        // majority, yet the fact would tell peers that only 1 was left.
        let mut k = leased(1_000);
        k.polled(Poll { started: Millis(4_900), answers: vec![answer("kvm2", -500, 4_910)] });
        assert_eq!(k.confirmed_at, None);
        k.polled(Poll { started: Millis(5_000), answers: vec![answer("kvm2", -500, 5_010)] });
        assert_eq!(k.confirmed_at, Some(Millis(5_000)));
    }

    #[test]
    fn keeps_vms_when_peers_confirm_the_leader_cannot_have_quorum_and_fences_when_that_ends() {
        let mut k = leased(1_000); // lease to 6_000
        // kvm2 has no lease; kvm3's lease lapses before the deadline (6_000 + 1_000 - 500).
        k.polled(Poll {
            started: Millis(5_900),
            answers: vec![answer("kvm2", 0, 5_910), answer("kvm3", 400, 5_920)],
        });
        assert!(matches!(k.tick(Millis(6_000)), Decision::Keep { .. }));
        assert!(matches!(k.phase(), Phase::Keeping { .. }));
        // The control plane came back for kvm2 and kvm3: they hold fresh leases.
        k.polled(Poll {
            started: Millis(6_200),
            answers: vec![answer("kvm2", 5_000, 6_210), answer("kvm3", 5_000, 6_210)],
        });
        let d = k.tick(Millis(6_250));
        assert!(matches!(&d, Decision::Fence { reason } if reason.contains("none of its peers")), "{d:?}");
        assert_eq!(k.tick(Millis(6_300)), Decision::Nothing, "fenced once");
    }

    #[test]
    fn a_deposed_leaders_lease_and_its_followers_answers_are_not_counted() {
        let mut k = leased(1_000); // epoch 1, lease to 6_000
        k.granted(Millis(1_500), 5_000, 3, 2).unwrap();
        assert_eq!(k.lease_end(), Some(Millis(6_500)));
        // A lease of epoch 1 answered late: refused, the lease is not extended.
        let stale = k.granted(Millis(2_000), 5_000, 3, 1);
        assert_eq!(stale, Err(StaleEpoch { got: 1, newest: 2 }));
        assert_eq!(k.lease_end(), Some(Millis(6_500)));
        assert!(k.see_epoch(1).is_err(), "a command of epoch 1 is refused too");
        // Both peers say they have no lease, but only of epoch 1: not counted, so nothing shows
        // the leader of epoch 2 lacks quorum.
        let stale_peers = k.polled(Poll {
            started: Millis(6_400),
            answers: vec![answer("kvm2", 0, 6_410), answer("kvm3", 0, 6_420)],
        });
        assert_eq!(stale_peers, [("kvm2".to_string(), 1), ("kvm3".to_string(), 1)]);
        assert!(matches!(k.tick(Millis(6_500)), Decision::Fence { .. }));
        // The same answers from peers that know epoch 2 keep the VMs.
        let mut k = leased(1_000);
        k.granted(Millis(1_500), 5_000, 3, 2).unwrap();
        let current = |h: &str, at| PeerAnswer { epoch: 2, ..answer(h, 0, at) };
        let stale_peers = k.polled(Poll {
            started: Millis(6_400),
            answers: vec![current("kvm2", 6_410), current("kvm3", 6_420)],
        });
        assert!(stale_peers.is_empty());
        assert!(matches!(k.tick(Millis(6_500)), Decision::Keep { .. }));
    }

    /// A host with a valid certificate that answers epoch 2^63 (or any newer one) moves
    /// nothing: the real leader's leases are still taken, and its answer is not counted.
    #[test]
    fn a_peer_cannot_move_this_agents_epoch() {
        let mut k = leased(1_000);
        k.set_peers(["kvm2".to_string(), "kvm3".to_string()]);
        let fact = RelayedFact { age_ms: 0, epoch: 1 << 63, membership: k.membership().unwrap() };
        let lie = PeerAnswer { epoch: 1 << 63, fact: Some(fact), ..answer("kvm2", -10_000, 5_910) };
        let ignored = k.polled(Poll { started: Millis(5_900), answers: vec![lie] });
        assert_eq!(ignored, [("kvm2".to_string(), 1 << 63)]);
        assert_eq!(k.fact(Millis(5_950)), None, "its fact was not taken");
        assert_eq!(k.newest_epoch(), 1);
        assert!(k.see_epoch(1).is_ok(), "the leader of epoch 1 still leads");
        assert!(k.granted(Millis(6_000), 5_000, 3, 1).is_ok());
    }

    #[test]
    fn fences_when_a_peer_holds_a_lease_past_the_deadline_or_nobody_answers() {
        let mut k = leased(1_000);
        k.polled(Poll { started: Millis(5_900), answers: vec![answer("kvm2", 4_000, 5_910)] });
        assert!(matches!(k.tick(Millis(6_000)), Decision::Fence { .. }));
        let mut k = leased(1_000);
        k.polled(Poll { started: Millis(5_900), answers: vec![] });
        assert!(matches!(k.tick(Millis(6_000)), Decision::Fence { .. }));
        let mut k = leased(1_000);
        assert!(
            matches!(k.tick(Millis(6_000)), Decision::Fence { reason } if reason.contains("no peer poll"))
        );
    }

    #[test]
    fn a_one_host_cluster_never_fences_and_a_new_lease_ends_a_fence() {
        let mut k = fresh(1);
        k.granted(Millis(0), 5_000, 1, 1).unwrap();
        assert_eq!(k.tick(Millis(60_000)), Decision::Nothing);
        let mut k = leased(0);
        assert!(matches!(k.tick(Millis(5_000)), Decision::Fence { .. }));
        k.granted(Millis(9_000), 5_000, 3, 1).unwrap();
        assert_eq!(k.tick(Millis(9_100)), Decision::Nothing);
        assert_eq!(k.phase(), &Phase::Leased);
    }

    #[test]
    fn what_peers_are_told_covers_the_leaders_longer_view() {
        // Lease to 6_000 in this agent's view; the leader's view may end 150 ms later, and it
        // counts a lease toward quorum until an interval and a transit before its end.
        let k = leased(1_000);
        assert_eq!(k.upper_remaining_ms(Millis(5_000)), 0);
        assert_eq!(k.upper_remaining_ms(Millis(5_200)), -200);
        // A fresh agent: an earlier run's lease may be counted until start + ttl - interval.
        assert_eq!(
            LeaseKeeper::new("kvm1", Timings::default(), Millis(100), 1).upper_remaining_ms(Millis(200)),
            3_900
        );
    }

    #[test]
    fn starts_need_a_lease() {
        let mut k = fresh(1);
        assert_eq!(k.may_start(Millis(10)), Err(NoLease::NeverHeld));
        k.granted(Millis(1_000), 5_000, 3, 1).unwrap();
        assert_eq!(k.may_start(Millis(5_999)), Ok(()));
        assert_eq!(k.may_start(Millis(6_000)).unwrap_err().to_string(), "this host's lease expired 0 ms ago");
    }

    #[test]
    fn the_watchdog_is_fed_only_while_a_reset_would_come_before_the_host_may_be_declared_dead() {
        // Lease to 6_000: the leader may declare the host dead from 7_000 on. A 3 s watchdog
        // fed at t resets the host by t + 3_000 (+ 250 for the reset).
        let mut k = leased(1_000);
        assert!(k.may_feed(Millis(3_750), 3_000));
        assert!(!k.may_feed(Millis(3_751), 3_000));
        assert!(!fresh(1).may_feed(Millis(0), 3_000), "no lease yet");
        // The lease expired, but a poll proved the leader lacked quorum at 6_100: it needs quorum
        // for lease_ttl + fence_margin before it may declare anybody dead (12_100).
        k.polled(Poll {
            started: Millis(6_100),
            answers: vec![answer("kvm2", -100, 6_110), answer("kvm3", -90, 6_110)],
        });
        assert!(matches!(k.tick(Millis(6_150)), Decision::Keep { .. }));
        assert!(k.may_feed(Millis(8_850), 3_000));
        assert!(!k.may_feed(Millis(8_851), 3_000));
        // Fenced: fed again only once the shell confirmed its protected VMs are gone.
        let mut k = leased(1_000);
        assert!(matches!(k.tick(Millis(6_000)), Decision::Fence { .. }));
        assert!(!k.may_feed(Millis(6_000), 3_000));
        k.fence_completed();
        assert!(k.may_feed(Millis(6_050), 3_000));
    }
}
