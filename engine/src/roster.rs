//! What every agent must know of the cluster, and how each heartbeat answer brings an agent's
//! copy up to date: its peers (whom to poll when its lease lapses) and the protected VMs (what a
//! self-fence destroys). At 1000 hosts and 10,000 protected VMs the whole roster is ~400 kB,
//! so an answer carries nothing when the agent's copy is current, the changes since its
//! version when this leader still remembers them, and the whole roster only otherwise.
//!
//! Whatever an answer carries, the agent ends with exactly the roster the leader had when it
//! answered (tested below against random histories): `HostView::roster_acked` relies on the
//! agent holding every protection the acknowledged version listed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use crate::ClusterState;

/// The roster as of one version. `version` names the content within this leader's epoch (its
/// upper half), so versions of different leaders never meet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Roster {
    pub version: u64,
    /// Every host and where it answers peer polls, by name.
    pub peers: Vec<(String, String)>,
    /// The protected VMs' UUIDs, sorted.
    pub protected: Vec<String>,
}

/// What one answer tells an agent that holds roster version `known`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RosterUpdate {
    /// Its copy, of this version, is current.
    Unchanged { version: u64 },
    /// The changes from version `from` to `to`.
    Changes {
        from: u64,
        to: u64,
        /// Peers new or at a new address.
        peers_set: Vec<(String, String)>,
        peers_removed: Vec<String>,
        protected_added: Vec<String>,
        protected_removed: Vec<String>,
    },
    /// All of it (an agent that holds none, or one this leader no longer remembers).
    Whole(Arc<Roster>),
}

/// How many versions' changes are remembered: an agent further behind gets the whole roster.
/// A script protecting thousands of VMs makes dozens of versions a second; an agent a
/// heartbeat behind must still get changes, or every answer carries the whole roster.
const KEPT: usize = 1024;

/// One version's changes from the one before.
#[derive(Clone, Debug)]
struct Edit {
    to: u64,
    peers: Vec<(String, Option<String>)>,
    protected: Vec<(String, bool)>,
}

/// The leader's roster: the current one, rebuilt only after a step that may have changed it,
/// and the latest versions' changes.
#[derive(Clone, Debug, Default)]
pub struct RosterBook {
    current: Arc<Roster>,
    stale: bool,
    built: u64,
    edits: VecDeque<Edit>,
    listed: Vec<String>,
}

impl RosterBook {
    /// A book that builds its first roster at the first answer.
    pub fn new() -> RosterBook {
        RosterBook { stale: true, ..Default::default() }
    }

    /// A step may have changed the hosts or the protected VMs.
    pub fn may_have_changed(&mut self) {
        self.stale = true;
    }

    /// The current roster; a new version only when its content changed. Every protected VM
    /// not yet listed by a version (`VmView::protected_in`) is marked as listed by this one;
    /// `take_listed` says which.
    pub fn current(&mut self, s: &mut ClusterState) -> Arc<Roster> {
        if !self.stale {
            return self.current.clone();
        }
        self.stale = false;
        let peers: Vec<(String, String)> =
            s.hosts.values().map(|h| (h.name.clone(), h.peer_address.clone())).collect();
        let protected: Vec<String> = s.vms.values().filter(|v| v.protected).map(|v| v.uuid.clone()).collect();
        let last = self.current.clone();
        if last.version != 0 && (&last.peers, &last.protected) == (&peers, &protected) {
            self.mark_listed(s, last.version);
            return last;
        }
        self.built += 1;
        let fresh = Roster { version: (s.epoch << 32) | self.built, peers, protected };
        self.mark_listed(s, fresh.version);
        if last.version != 0 {
            self.edits.push_back(Edit {
                to: fresh.version,
                peers: changed(&last.peers, &fresh.peers),
                protected: changed(
                    &last.protected.iter().map(|u| (u.clone(), true)).collect::<Vec<_>>(),
                    &fresh.protected.iter().map(|u| (u.clone(), true)).collect::<Vec<_>>(),
                )
                .into_iter()
                .map(|(u, now)| (u, now.is_some()))
                .collect(),
            });
            while self.edits.len() > KEPT {
                self.edits.pop_front();
            }
        }
        self.current = Arc::new(fresh);
        self.current.clone()
    }

    fn mark_listed(&mut self, s: &mut ClusterState, version: u64) {
        for vm in s.vms.values_mut().filter(|v| v.protected && v.protected_in.is_none()) {
            vm.protected_in = Some(version);
            self.listed.push(vm.uuid.clone());
        }
    }

    /// The VMs whose `protected_in` was set since the last call: their work is to persist.
    pub fn take_listed(&mut self) -> Vec<String> {
        std::mem::take(&mut self.listed)
    }

    /// What an answer must carry to an agent that holds version `known` (0: none).
    pub fn update_for(&mut self, s: &mut ClusterState, known: u64) -> RosterUpdate {
        let current = self.current(s);
        if known == current.version {
            return RosterUpdate::Unchanged { version: known };
        }
        // Versions count up by one, and every version after the first kept its changes.
        let start = self.edits.partition_point(|e| Some(e.to) < known.checked_add(1));
        if self.edits.get(start).is_none_or(|e| Some(e.to) != known.checked_add(1)) {
            return RosterUpdate::Whole(current);
        }
        let mut peers: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut protected: BTreeMap<String, bool> = BTreeMap::new();
        for e in self.edits.iter().skip(start) {
            peers.extend(e.peers.iter().cloned());
            protected.extend(e.protected.iter().cloned());
        }
        let (mut peers_set, mut peers_removed) = (Vec::new(), Vec::new());
        for (host, address) in peers {
            match address {
                Some(a) => peers_set.push((host, a)),
                None => peers_removed.push(host),
            }
        }
        let (added, removed): (Vec<_>, Vec<_>) = protected.into_iter().partition(|(_, now)| *now);
        RosterUpdate::Changes {
            from: known,
            to: current.version,
            peers_set,
            peers_removed,
            protected_added: added.into_iter().map(|(u, _)| u).collect(),
            protected_removed: removed.into_iter().map(|(u, _)| u).collect(),
        }
    }
}

/// The keys whose value differs between two sorted lists: `Some(new value)` or `None` (gone).
fn changed<V: Clone + PartialEq>(old: &[(String, V)], new: &[(String, V)]) -> Vec<(String, Option<V>)> {
    let old: BTreeMap<&String, &V> = old.iter().map(|(k, v)| (k, v)).collect();
    let new_map: BTreeMap<&String, &V> = new.iter().map(|(k, v)| (k, v)).collect();
    let mut out = Vec::new();
    for (k, v) in &new_map {
        if old.get(k) != Some(v) {
            out.push(((*k).clone(), Some((*v).clone())));
        }
    }
    for k in old.keys().filter(|k| !new_map.contains_key(*k)) {
        out.push(((*k).clone(), None));
    }
    out
}

/// Brings an agent's copy to the leader's, in place; `false` (the copy untouched) when the
/// changes start from another version than the one held. An answer whose roster did not change
/// costs nothing, and one with k changes O(k log n + n) moves, no clone of the rest: at 1000
/// hosts with 4000 protected VMs, copying the roster for every answer cost more than the
/// lease itself.
pub fn apply(copy: &mut Roster, update: &RosterUpdate) -> bool {
    match update {
        RosterUpdate::Unchanged { version } => *version == copy.version,
        RosterUpdate::Whole(r) => {
            copy.clone_from(r);
            true
        }
        RosterUpdate::Changes { from, to, peers_set, peers_removed, protected_added, protected_removed } => {
            if *from != copy.version {
                return false;
            }
            // Both lists stay sorted by name: set or insert, then drop the removed.
            for (host, address) in peers_set {
                match copy.peers.binary_search_by(|(h, _)| h.cmp(host)) {
                    Ok(i) => copy.peers[i].1.clone_from(address),
                    Err(i) => copy.peers.insert(i, (host.clone(), address.clone())),
                }
            }
            if !peers_removed.is_empty() {
                let gone: BTreeSet<&String> = peers_removed.iter().collect();
                copy.peers.retain(|(h, _)| !gone.contains(h));
            }
            if !protected_added.is_empty() {
                copy.protected.extend(protected_added.iter().cloned());
                // Two sorted runs: the stable sort merges them in one pass.
                copy.protected.sort();
                copy.protected.dedup();
            }
            if !protected_removed.is_empty() {
                let gone: BTreeSet<&String> = protected_removed.iter().collect();
                copy.protected.retain(|u| !gone.contains(u));
            }
            copy.version = *to;
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{HostView, VmView};

    proptest! {
        /// Whatever version an agent holds, the answer brings it to exactly the leader's roster.
        #[test]
        fn an_agent_always_ends_with_the_leaders_roster(
            changes in proptest::collection::vec((0u8..4, 0usize..6, 0usize..3), 1..120),
            lag in proptest::collection::vec(0usize..90, 1..40),
        ) {
            let mut s = ClusterState { epoch: 3, ..Default::default() };
            let mut book = RosterBook::new();
            let mut history: Vec<Roster> = vec![Roster::default()];
            for (what, i, address) in changes {
                let (host, uuid) = (format!("kvm{i}"), format!("u{i}"));
                match what {
                    0 => {
                        let h = s.hosts.entry(host.clone()).or_insert_with(|| HostView::new(&host));
                        h.peer_address = format!("10.0.0.{address}:7401");
                    }
                    1 => drop(s.hosts.remove(&host)),
                    2 => s.vms.entry(uuid.clone()).or_insert_with(|| VmView::new(&uuid, &uuid)).protected = true,
                    _ => drop(s.vms.remove(&uuid)),
                }
                book.may_have_changed();
                let r = book.current(&mut s);
                if history.last().is_none_or(|h| h.version != r.version) {
                    history.push((*r).clone());
                }
            }
            let now = book.current(&mut s);
            for back in lag {
                let held = &history[history.len().saturating_sub(1 + back)];
                let update = book.update_for(&mut s, held.version);
                let mut got = held.clone();
                prop_assert!(apply(&mut got, &update), "from version {} by {:?}", held.version, update);
                prop_assert_eq!(&got, &*now, "from version {} by {:?}", held.version, update);
            }
        }
    }
}
