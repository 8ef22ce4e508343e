//! Where a VM may start: filter the hosts, then take the one left with the most free memory.

use crate::drain::Drain;
use crate::{AdminState, ClusterState, HostLiveness, Millis, VmView};

/// Memory and vCPUs already promised on `host` by restarts and migrations in flight, which its
/// agent's reports do not show yet.
fn reserved(state: &ClusterState, host: &str, except: &str) -> (u64, u32) {
    let drains = drains(state);
    state
        .vms
        .values()
        .filter(|v| v.uuid != except)
        .filter(|v| heading_to(&drains, v) == Some(host))
        .fold((0, 0), |(m, c), v| (m + v.memory_kib, c + v.vcpus))
}

/// The drains under way, looked up once per question rather than once per VM: with a thousand
/// hosts and VMs, a placement otherwise walks every host for every VM for every host.
fn drains(state: &ClusterState) -> Vec<&Drain> {
    state.hosts.values().filter_map(|h| h.drain.as_ref()).collect()
}

/// Where a VM is about to run that its new host's reports do not show yet: a restart in
/// flight, or a drain's live migration in flight.
fn heading_to<'a>(drains: &[&'a Drain], v: &'a VmView) -> Option<&'a str> {
    if let Some(h) = v.recovery.as_ref().and_then(|r| r.starting_on.as_deref()) {
        return Some(h);
    }
    drains.iter().find_map(|d| d.heading_to(&v.uuid))
}

fn vcpus_on(state: &ClusterState, host: &str) -> u32 {
    state
        .vms
        .values()
        .filter(|v| v.host.as_deref() == Some(host) && v.state.has_process())
        .map(|v| v.vcpus)
        .sum()
}

/// Why `host` cannot take `vm` now, or `None` if it can.
fn unfit(state: &ClusterState, vm: &VmView, host: &str, now: Millis, exclude: &[String]) -> Option<String> {
    let h = &state.hosts[host];
    if exclude.iter().any(|e| e == host) {
        return Some(format!("{host}: a start there failed already"));
    }
    match state.liveness(host, now) {
        HostLiveness::Online => {}
        l @ (HostLiveness::Suspect | HostLiveness::Dead) => return Some(format!("{host}: {}", l.as_str())),
    }
    match h.admin {
        AdminState::Active => {}
        a @ (AdminState::Draining | AdminState::Maintenance) => {
            return Some(format!("{host}: {}", a.as_str()));
        }
    }
    if h.health.degraded {
        return Some(format!("{host}: degraded ({})", h.health.failing_summary()));
    }
    if !vm.allowed_hosts.is_empty() && !vm.allowed_hosts.iter().any(|a| a == host) {
        return Some(format!("{host}: not among {}'s allowed hosts", vm.name));
    }
    if let Some(group) = &vm.anti_affinity {
        let drains = drains(state);
        let clash = state.vms.values().find(|o| {
            o.uuid != vm.uuid
                && o.anti_affinity.as_ref() == Some(group)
                && ((o.host.as_deref() == Some(host) && o.state.has_process())
                    || heading_to(&drains, o) == Some(host))
        });
        if let Some(o) = clash {
            return Some(format!("{host}: anti-affinity group {group} ({} is there)", o.name));
        }
    }
    let (mem_reserved, cpu_reserved) = reserved(state, host, &vm.uuid);
    let free = h.resources.memory_free_kib.saturating_sub(mem_reserved);
    if free < vm.memory_kib {
        return Some(format!("{host}: {} MiB free, needs {} MiB", free / 1024, vm.memory_kib.div_ceil(1024)));
    }
    if let Some(limit) = h.memory_limit_kib {
        let used: u64 = state
            .vms
            .values()
            .filter(|v| v.uuid != vm.uuid && v.host.as_deref() == Some(host) && v.state.has_process())
            .map(|v| v.memory_kib)
            .sum::<u64>()
            + mem_reserved;
        if used + vm.memory_kib > limit {
            return Some(format!(
                "{host}: {} of its {} MiB limit in use, needs {} MiB",
                used / 1024,
                limit / 1024,
                vm.memory_kib.div_ceil(1024)
            ));
        }
    }
    let capacity = h.resources.cpus * state.policy.vcpu_overcommit;
    let used = vcpus_on(state, host) + cpu_reserved;
    if used + vm.vcpus > capacity {
        return Some(format!("{host}: {used} of {capacity} vCPUs allocated, needs {}", vm.vcpus));
    }
    None
}

/// Whether `host` can take `vm` now.
pub fn fits(state: &ClusterState, vm: &VmView, host: &str, now: Millis) -> bool {
    state.hosts.contains_key(host) && unfit(state, vm, host, now, &[]).is_none()
}

/// The host to start `vm` on, or why none fits (one clause per host).
pub fn place(state: &ClusterState, vm: &VmView, now: Millis, exclude: &[String]) -> Result<String, String> {
    let mut reasons = Vec::new();
    let mut best: Option<(u64, &str)> = None;
    for name in state.hosts.keys() {
        match unfit(state, vm, name, now, exclude) {
            Some(r) => reasons.push(r),
            None => {
                let free = state.hosts[name]
                    .resources
                    .memory_free_kib
                    .saturating_sub(reserved(state, name, &vm.uuid).0);
                let left = free - vm.memory_kib;
                // Most memory left after placing wins; ties go to the first name, for stable plans.
                if best.is_none_or(|(b, _)| left > b) {
                    best = Some((left, name));
                }
            }
        }
    }
    match best {
        Some((_, h)) => Ok(h.to_string()),
        None if reasons.is_empty() => Err("no hosts".into()),
        None => Err(format!("no host can take it: {}", reasons.join("; "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::{three_hosts, vm_on};
    use crate::recovery::Recovery;

    fn online(mut s: ClusterState) -> ClusterState {
        for h in s.hosts.values_mut() {
            h.lease.granted_at = Some(Millis(0));
        }
        s
    }

    #[test]
    fn takes_the_host_with_the_most_memory_left() {
        let mut s = online(three_hosts());
        s.hosts.get_mut("kvm3").unwrap().resources.memory_free_kib = 6 << 20;
        let vm = vm_on(&mut s, "a", "dns1", "kvm1");
        assert_eq!(place(&s, &vm, Millis(1), &[]), Ok("kvm3".into()));
    }

    #[test]
    fn respects_anti_affinity_allowed_hosts_liveness_and_exclusions() {
        let mut s = online(three_hosts());
        let mut dns1 = vm_on(&mut s, "a", "dns1", "kvm1");
        let mut dns2 = vm_on(&mut s, "b", "dns2", "kvm2");
        dns1.anti_affinity = Some("dns".into());
        dns2.anti_affinity = Some("dns".into());
        s.vms.insert("a".into(), dns1.clone());
        s.vms.insert("b".into(), dns2);
        s.hosts.get_mut("kvm1").unwrap().dead = Some(crate::Death { at: Millis(0), cause: "t".into() });
        assert_eq!(place(&s, &dns1, Millis(1), &[]), Ok("kvm3".into()));
        let e = place(&s, &dns1, Millis(1), &["kvm3".into()]).unwrap_err();
        assert!(e.contains("kvm2: anti-affinity group dns (dns2 is there)"), "{e}");
        assert!(e.contains("kvm1: dead"), "{e}");
        assert!(e.contains("kvm3: a start there failed already"), "{e}");
        dns1.allowed_hosts = vec!["kvm2".into()];
        assert!(place(&s, &dns1, Millis(1), &[]).is_err());
    }

    #[test]
    fn restarts_in_flight_hold_their_room() {
        let mut s = online(three_hosts());
        for h in s.hosts.values_mut() {
            h.resources.memory_free_kib = 100 << 10;
        }
        s.hosts.get_mut("kvm1").unwrap().admin = AdminState::Maintenance;
        s.hosts.get_mut("kvm2").unwrap().lease.granted_at = None;
        let mut big = vm_on(&mut s, "a", "billing", "kvm1");
        big.memory_kib = 64 << 10;
        let mut r = Recovery::new(Millis(0));
        r.starting_on = Some("kvm3".into());
        big.recovery = Some(r);
        s.vms.insert("a".into(), big);
        let mut other = vm_on(&mut s, "b", "radius1", "kvm1");
        other.memory_kib = 64 << 10;
        let e = place(&s, &other, Millis(1), &[]).unwrap_err();
        assert!(e.contains("kvm3: 36 MiB free, needs 64 MiB"), "{e}");
        assert!(e.contains("kvm1: maintenance") && e.contains("kvm2: suspect"), "{e}");
    }

    #[test]
    fn vcpus_are_bounded_by_the_overcommit_ratio() {
        let mut s = online(three_hosts());
        let mut wide = vm_on(&mut s, "a", "wide", "kvm1");
        wide.vcpus = 17;
        let e = place(&s, &wide, Millis(1), &["kvm1".into()]).unwrap_err();
        assert!(e.contains("kvm2: 0 of 16 vCPUs allocated, needs 17"), "{e}");
    }
}
