//! Admission control (N+k): could every protected VM still restart somewhere if the worst `k`
//! hosts failed now? `vmha protect` asks it for the VM's host (protecting a VM adds a restart
//! only when its own host fails: it already takes its room where it runs), and `vmha status`
//! for every host that runs protected VMs.
//!
//! "The worst `k` hosts" with a given host are that host and the `k - 1` others that run the
//! most protected memory: trying every set of `k` among a thousand hosts is out of reach, and
//! those are the ones whose VMs need the most room. The restarts are planned as the controller
//! would place them (`placement::choose`: memory, the memory limit, the vCPU overcommit,
//! anti-affinity, allowed hosts, health), highest priority first, each taking its room before
//! the next is placed.

use crate::placement::{self, Usage};
use crate::{AdminState, ClusterState, HostLiveness, Millis, VmView};

/// What losing `lost` at once would leave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WhatIf {
    pub lost: Vec<String>,
    /// Each protected VM running there, highest priority first, with the host it would restart
    /// on, or why none could take it.
    pub restarts: Vec<(String, Result<String, crate::placement::NoHost>)>,
    /// Every other host that holds a lease and takes VMs, with the memory (KiB) it would have
    /// left after those restarts.
    pub headroom: Vec<(String, u64)>,
}

impl WhatIf {
    /// Whether every protected VM of the lost hosts would find a host.
    pub fn covered(&self) -> bool {
        self.stranded() == 0
    }

    /// How many would not.
    pub fn stranded(&self) -> usize {
        self.restarts.iter().filter(|(_, r)| r.is_err()).count()
    }

    /// "if kvm1 failed, 1 of its 3 protected VMs would have nowhere to restart: dns3 (no host
    /// can take it: ...)"
    pub fn shortfall(&self) -> String {
        let stranded: Vec<String> = (self.restarts.iter())
            .filter_map(|(vm, r)| r.as_ref().err().map(|why| format!("{vm} ({why})")))
            .collect();
        format!(
            "if {} failed, {} of {} protected VMs would have nowhere to restart: {}",
            self.lost.join(" and "),
            stranded.len(),
            self.restarts.len(),
            stranded.join("; ")
        )
    }
}

/// `host` and the `k - 1` other hosts that run the most protected memory.
pub fn worst_with(state: &ClusterState, host: &str, k: usize) -> Vec<String> {
    // Only a reserve above one host needs the others ranked.
    let ranked = if k > 1 { ranked(state) } else { Vec::new() };
    worst_among(&ranked, host, k)
}

/// Every host with the protected memory it runs, most first (ties by name).
fn ranked(state: &ClusterState) -> Vec<(u64, &str)> {
    let mut r: Vec<(u64, &str)> =
        state.hosts.keys().map(|h| (protected_memory(state, h), h.as_str())).collect();
    r.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    r
}

/// `host` and the first `k - 1` others of `ranked`.
fn worst_among(ranked: &[(u64, &str)], host: &str, k: usize) -> Vec<String> {
    let others = ranked.iter().map(|(_, h)| *h).filter(|h| *h != host).take(k.saturating_sub(1));
    std::iter::once(host).chain(others).map(str::to_string).collect()
}

fn protected_memory(state: &ClusterState, host: &str) -> u64 {
    state
        .vms_placed_on(host)
        .iter()
        .filter(|v| v.protected && v.state.has_process())
        .fold(0u64, |sum, v| sum.saturating_add(v.memory_kib))
}

/// Where the VMs running on `lost` that `counted` picks (the protected ones, or those as they
/// would be with one VM's protection changed) would restart if those hosts failed now. `usage`
/// is `Usage::of(state)`, taken once by a caller that asks about many hosts.
pub fn what_if(
    state: &ClusterState,
    usage: &Usage,
    lost: &[String],
    counted: &dyn Fn(&VmView) -> bool,
    now: Millis,
) -> WhatIf {
    let mut usage = usage.clone();
    let mut vms: Vec<&VmView> = (lost.iter())
        .flat_map(|h| state.vms_placed_on(h))
        .filter(|v| counted(v) && v.state.has_process())
        .collect();
    vms.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
    let gone = |h: &str| lost.iter().any(|l| l == h).then(|| "lost in this check".to_string());
    let mut restarts = Vec::new();
    for vm in vms {
        let chosen = placement::choose(state, &usage, vm, now, &gone);
        if let Some((host, _)) = chosen.as_ref().ok().and_then(|h| state.hosts.get_key_value(h)) {
            usage.promise(host, vm);
        }
        restarts.push((vm.name.clone(), chosen));
    }
    let headroom = (state.hosts.values())
        .filter(|h| !lost.contains(&h.name) && h.admin == AdminState::Active)
        .filter(|h| state.liveness(&h.name, now) == HostLiveness::Online)
        .map(|h| (h.name.clone(), placement::memory_left(state, &usage, &h.name)))
        .collect();
    WhatIf { lost: lost.to_vec(), restarts, headroom }
}

/// The reserve as it would stand once `host` is drained (in maintenance) and its VMs run where
/// `moves` (VM UUID, target) says: what `vmha host drain --dry-run` warns of.
pub fn after_drain(state: &ClusterState, host: &str, moves: &[(String, String)], now: Millis) -> Vec<WhatIf> {
    let mut s = state.clone();
    if let Some(h) = s.hosts.get_mut(host) {
        h.admin = AdminState::Maintenance;
    }
    for (uuid, target) in moves {
        let Some(vm) = s.vms.get_mut(uuid) else { continue };
        vm.host = Some(target.clone());
        if let Some(t) = s.hosts.get_mut(target) {
            t.resources.memory_free_kib = t.resources.memory_free_kib.saturating_sub(vm.memory_kib);
        }
    }
    s.index_vms();
    below_reserve(&s, s.policy.reserve_hosts, now)
}

/// What `vmha capacity` shows: for every host that runs protected VMs, and for it with the
/// worst others up to the reserve, where those VMs would restart and the room left.
pub fn capacity(state: &ClusterState, now: Millis) -> Vec<WhatIf> {
    what_ifs(state, &[1, state.policy.reserve_hosts], now)
}

/// The what-ifs of losing each host that runs protected VMs together with the worst others,
/// for each size of `sizes`, each set of lost hosts once.
fn what_ifs(state: &ClusterState, sizes: &[usize], now: Millis) -> Vec<WhatIf> {
    let (usage, ranked) = (Usage::of(state), ranked(state));
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    let mut hosts: Vec<&str> = ranked.iter().filter(|(m, _)| *m > 0).map(|(_, h)| *h).collect();
    hosts.sort();
    for host in hosts {
        for size in sizes {
            let mut lost = worst_among(&ranked, host, (*size).max(1));
            lost.sort();
            if seen.insert(lost.clone()) {
                out.push(what_if(state, &usage, &lost, &|v| v.protected, now));
            }
        }
    }
    out
}

/// Whether VM `uuid` may be protected: if its host (with the worst others, up to the reserve)
/// failed now, would its protection leave more protected VMs with nowhere to restart than
/// without it? A host already short is `below_reserve`'s to warn of; a VM that fits in what is
/// left is not refused for it. A VM that runs nowhere adds no restart to plan.
pub fn admit(state: &ClusterState, uuid: &str, now: Millis) -> Result<(), ReserveShort> {
    let k = state.policy.reserve_hosts;
    let Some(host) = state.vms.get(uuid).filter(|v| v.state.has_process()).and_then(|v| v.host.as_deref())
    else {
        return Ok(());
    };
    if k == 0 {
        return Ok(());
    }
    let (usage, lost) = (Usage::of(state), worst_with(state, host, k));
    let with = what_if(state, &usage, &lost, &|v| v.protected || v.uuid == uuid, now);
    let without = what_if(state, &usage, &lost, &|v| v.protected && v.uuid != uuid, now);
    if with.stranded() <= without.stranded() {
        return Ok(());
    }
    Err(ReserveShort { shortfall: with.shortfall(), reserve_hosts: k })
}

/// A protection that would leave protected VMs with nowhere to restart if the reserve's worth
/// of hosts failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{shortfall}; the reserve is {reserve_hosts} host(s) (--reserve-hosts)")]
pub struct ReserveShort {
    /// Which host's failure strands which VMs, and why.
    pub shortfall: String,
    pub reserve_hosts: usize,
}

/// The hosts whose loss (with the worst `k - 1` others) would strand protected VMs now, each
/// once: what `vmha status` warns of.
pub fn below_reserve(state: &ClusterState, k: usize, now: Millis) -> Vec<WhatIf> {
    if k == 0 {
        return Vec::new();
    }
    what_ifs(state, &[k], now).into_iter().filter(|w| !w.covered()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::{three_hosts, vm_on};

    /// Three online hosts with 1 GiB free each, and `vms` (name, host, MiB) running and protected.
    fn cluster(vms: &[(&str, &str, u64)]) -> ClusterState {
        let mut s = three_hosts();
        for h in s.hosts.values_mut() {
            h.lease.granted_at = Some(Millis(0));
            h.resources.memory_free_kib = 1 << 20;
        }
        for (name, host, mib) in vms {
            let mut vm = vm_on(&mut s, name, name, host);
            vm.memory_kib = mib << 10;
            vm.protected = true;
            s.vms.insert(name.to_string(), vm);
        }
        s
    }

    #[test]
    fn a_host_whose_vms_fit_elsewhere_is_covered() {
        let s = cluster(&[("dns1", "kvm1", 512), ("radius1", "kvm1", 256)]);
        let w = what_if(&s, &Usage::of(&s), &worst_with(&s, "kvm1", 1), &|v| v.protected, Millis(1));
        assert!(w.covered(), "{w:?}");
        // Most memory left wins: kvm2 first (a tie by name), then kvm3.
        assert_eq!(w.restarts, [("dns1".into(), Ok("kvm2".into())), ("radius1".into(), Ok("kvm3".into()))]);
        assert_eq!(w.headroom, [("kvm2".into(), 512 << 10), ("kvm3".into(), 768 << 10)]);
        let all: Vec<Vec<String>> = capacity(&s, Millis(1)).into_iter().map(|w| w.lost).collect();
        assert_eq!(all, [["kvm1"]]);
    }

    #[test]
    fn each_restart_takes_its_room_before_the_next_is_placed() {
        let s = cluster(&[("a", "kvm1", 900), ("b", "kvm1", 900), ("c", "kvm1", 900)]);
        let w = what_if(&s, &Usage::of(&s), &["kvm1".into()], &|v| v.protected, Millis(1));
        assert!(!w.covered());
        assert_eq!(
            w.shortfall(),
            "if kvm1 failed, 1 of 3 protected VMs would have nowhere to restart: c (no host can take it: kvm1: \
             lost in this check; kvm2: 124 MiB free, needs 900 MiB; kvm3: 124 MiB free, needs 900 MiB)"
        );
    }

    #[test]
    fn a_vm_about_to_be_protected_counts_and_the_worst_hosts_go_together() {
        let mut s = cluster(&[("a", "kvm1", 600), ("d", "kvm1", 600), ("b", "kvm2", 600)]);
        let mut c = vm_on(&mut s, "c", "c", "kvm1");
        c.memory_kib = 600 << 10;
        s.vms.insert("c".into(), c);
        let usage = Usage::of(&s);
        assert!(what_if(&s, &usage, &["kvm1".into()], &|v| v.protected, Millis(1)).covered());
        assert_eq!(admit(&s, "a", Millis(1)), Ok(()));
        let refused = admit(&s, "c", Millis(1)).unwrap_err().to_string();
        assert!(
            refused.starts_with("if kvm1 failed, 1 of 3 protected VMs would have nowhere to restart: "),
            "{refused}"
        );
        // Two hosts lost: the one asked about and the other one running the most protected memory.
        assert_eq!(worst_with(&s, "kvm3", 2), ["kvm3", "kvm1"]);
        let lost: Vec<Vec<String>> = below_reserve(&s, 2, Millis(1)).into_iter().map(|w| w.lost).collect();
        assert_eq!(lost, [["kvm1", "kvm2"]]);
        assert!(below_reserve(&s, 1, Millis(1)).is_empty());
        assert!(below_reserve(&s, 0, Millis(1)).is_empty());
    }

    #[test]
    fn a_drain_that_would_break_the_reserve_is_foreseen() {
        let s = cluster(&[("a", "kvm1", 600), ("b", "kvm2", 600)]);
        assert!(below_reserve(&s, 1, Millis(1)).is_empty());
        // kvm3 in maintenance: each of kvm1 and kvm2 still has the other for its VM.
        assert!(after_drain(&s, "kvm3", &[], Millis(1)).is_empty());
        // a moved to kvm2 and kvm1 drained: losing kvm2 leaves two 600 MiB VMs for kvm3 alone.
        let short = after_drain(&s, "kvm1", &[("a".into(), "kvm2".into())], Millis(1));
        let lost: Vec<Vec<String>> = short.into_iter().map(|w| w.lost).collect();
        assert_eq!(lost, [["kvm2"]]);
    }
}
