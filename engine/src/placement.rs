//! Where a VM may start: filter the hosts, then take the one left with the most free memory.
//!
//! What is running on and heading to every host is summed once per decision (`Usage`), so one
//! placement costs O(VMs + hosts): a 50-host rack's 1250 restarts at 1000 hosts must not cost
//! a scan of every VM for every host for every VM.

use std::collections::HashMap;

use crate::{AdminState, ClusterState, HostLiveness, Millis, VmView};

/// What every host runs and is promised, as of one decision.
#[derive(Clone)]
pub struct Usage<'a> {
    /// By host: vCPUs and memory (KiB) of the VMs with a process there.
    running: HashMap<&'a str, (u32, u64)>,
    /// By host: vCPUs and memory promised by restarts and migrations in flight, which its
    /// agent's reports do not show yet.
    promised: HashMap<&'a str, (u32, u64)>,
    /// Where each VM in flight is heading.
    heading: HashMap<&'a str, &'a str>,
    /// By host and anti-affinity group: the first two VMs (in UUID order) there or heading
    /// there (two, so that one other than the VM being placed is always at hand).
    groups: HashMap<(&'a str, &'a str), Vec<&'a VmView>>,
}

impl<'a> Usage<'a> {
    pub fn of(state: &'a ClusterState) -> Usage<'a> {
        let mut drains: HashMap<&str, &str> = HashMap::new();
        for d in state.hosts.values().filter_map(|h| h.drain.as_ref()) {
            for step in &d.steps {
                if let Some(target) = d.heading_to(&step.vm_uuid) {
                    drains.entry(step.vm_uuid.as_str()).or_insert(target);
                }
            }
        }
        let mut u = Usage {
            running: HashMap::new(),
            promised: HashMap::new(),
            heading: HashMap::new(),
            groups: HashMap::new(),
        };
        for v in state.vms.values() {
            // A restart in flight first, else a drain's migration.
            let heading = v
                .recovery
                .as_ref()
                .and_then(|r| r.starting_on.as_deref())
                .or_else(|| drains.get(v.uuid.as_str()).copied());
            if let Some(h) = v.host.as_deref().filter(|_| v.state.has_process()) {
                let r = u.running.entry(h).or_default();
                *r = (r.0.saturating_add(v.vcpus), r.1.saturating_add(v.memory_kib));
                u.note_group(h, v);
            }
            if let Some(h) = heading {
                u.promise(h, v);
            }
        }
        u
    }

    /// Notes `vm` in its anti-affinity group on `host`, once.
    fn note_group(&mut self, host: &'a str, vm: &'a VmView) {
        let Some(group) = &vm.anti_affinity else { return };
        let seen = self.groups.entry((host, group.as_str())).or_default();
        if seen.len() < 2 && !seen.iter().any(|o| o.uuid == vm.uuid) {
            seen.push(vm);
        }
    }

    /// Counts `vm` as heading to `host`: a restart or migration in flight, or one admission
    /// control plans as it places one lost VM after the other.
    pub fn promise(&mut self, host: &'a str, vm: &'a VmView) {
        self.heading.insert(&vm.uuid, host);
        let p = self.promised.entry(host).or_default();
        *p = (p.0.saturating_add(vm.vcpus), p.1.saturating_add(vm.memory_kib));
        self.note_group(host, vm);
    }

    /// Memory and vCPUs promised on `host` to VMs other than `vm`.
    fn promised_to_others(&self, host: &str, vm: &VmView) -> (u64, u32) {
        let (cpus, mem) = self.promised.get(host).copied().unwrap_or_default();
        if self.heading.get(vm.uuid.as_str()) == Some(&host) {
            (mem.saturating_sub(vm.memory_kib), cpus.saturating_sub(vm.vcpus))
        } else {
            (mem, cpus)
        }
    }
}

/// Why `host` cannot take `vm` now, or `None` if it can. `excluded` says why a host is out of
/// the question for this decision (a start there failed already, it is lost in a what-if).
fn unfit(
    state: &ClusterState,
    usage: &Usage,
    vm: &VmView,
    host: &str,
    now: Millis,
    excluded: &dyn Fn(&str) -> Option<String>,
) -> Option<String> {
    let h = &state.hosts[host];
    if let Some(why) = excluded(host) {
        return Some(format!("{host}: {why}"));
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
        let there = usage.groups.get(&(host, group.as_str()));
        if let Some(o) = there.and_then(|vms| vms.iter().find(|o| o.uuid != vm.uuid)) {
            return Some(format!("{host}: anti-affinity group {group} ({} is there)", o.name));
        }
    }
    let (mem_reserved, cpu_reserved) = usage.promised_to_others(host, vm);
    let free = h.resources.memory_free_kib.saturating_sub(mem_reserved);
    if free < vm.memory_kib {
        return Some(format!("{host}: {} MiB free, needs {} MiB", free / 1024, vm.memory_kib.div_ceil(1024)));
    }
    let (cpus_running, mem_running) = usage.running.get(host).copied().unwrap_or_default();
    if let Some(limit) = h.memory_limit_kib {
        let own = if vm.host.as_deref() == Some(host) && vm.state.has_process() { vm.memory_kib } else { 0 };
        let used = mem_running.saturating_sub(own).saturating_add(mem_reserved);
        if used.saturating_add(vm.memory_kib) > limit {
            return Some(format!(
                "{host}: {} of its {} MiB limit in use, needs {} MiB",
                used / 1024,
                limit / 1024,
                vm.memory_kib.div_ceil(1024)
            ));
        }
    }
    // Agent-supplied: saturating, as every sum of what hosts report.
    let capacity = h.resources.cpus.saturating_mul(state.policy.vcpu_overcommit);
    let used = cpus_running.saturating_add(cpu_reserved);
    if used.saturating_add(vm.vcpus) > capacity {
        return Some(format!("{host}: {used} of {capacity} vCPUs allocated, needs {}", vm.vcpus));
    }
    None
}

/// The memory (KiB) `host` could still take: what it has free less what is promised to it, and
/// within its memory limit.
pub fn memory_left(state: &ClusterState, usage: &Usage, host: &str) -> u64 {
    let Some(h) = state.hosts.get(host) else { return 0 };
    let (_, promised) = usage.promised.get(host).copied().unwrap_or_default();
    let free = h.resources.memory_free_kib.saturating_sub(promised);
    match h.memory_limit_kib {
        Some(limit) => {
            let (_, running) = usage.running.get(host).copied().unwrap_or_default();
            free.min(limit.saturating_sub(running.saturating_add(promised)))
        }
        None => free,
    }
}

/// Whether `host` can take `vm` now; `usage` is `Usage::of(state)`, taken once by a caller that
/// asks about many VMs.
pub fn fits(state: &ClusterState, usage: &Usage, vm: &VmView, host: &str, now: Millis) -> bool {
    why_not(state, usage, vm, host, now).is_none()
}

/// Why `host` cannot take `vm` now, or `None` if it can.
pub fn why_not(state: &ClusterState, usage: &Usage, vm: &VmView, host: &str, now: Millis) -> Option<String> {
    if !state.hosts.contains_key(host) {
        return Some(format!("{host}: unknown"));
    }
    unfit(state, usage, vm, host, now, &|_| None)
}

/// Why no host can take a VM.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoHost {
    #[error("no hosts")]
    NoHosts,
    /// One clause per host: "kvm2: suspect".
    #[error("no host can take it: {}", .0.join("; "))]
    NoneFits(Vec<String>),
}

/// The host to start `vm` on, or why none fits (one clause per host).
pub fn place(state: &ClusterState, vm: &VmView, now: Millis, exclude: &[String]) -> Result<String, NoHost> {
    let failed = |h: &str| exclude.iter().any(|e| e == h).then(|| "a start there failed already".to_string());
    choose(state, &Usage::of(state), vm, now, &failed)
}

/// `place` on a given usage, without the hosts `excluded` names.
pub fn choose<'s>(
    state: &'s ClusterState,
    usage: &Usage,
    vm: &VmView,
    now: Millis,
    excluded: &dyn Fn(&str) -> Option<String>,
) -> Result<String, NoHost> {
    let mut reasons = Vec::new();
    let mut best: Option<(u64, &'s str)> = None;
    for name in state.hosts.keys() {
        match unfit(state, usage, vm, name, now, excluded) {
            Some(r) => reasons.push(r),
            None => {
                let free = state.hosts[name]
                    .resources
                    .memory_free_kib
                    .saturating_sub(usage.promised_to_others(name, vm).0);
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
        None if reasons.is_empty() => Err(NoHost::NoHosts),
        None => Err(NoHost::NoneFits(reasons)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Recovery;
    use crate::cluster::tests::{three_hosts, vm_on};

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
        let e = place(&s, &dns1, Millis(1), &["kvm3".into()]).unwrap_err().to_string();
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
        let e = place(&s, &other, Millis(1), &[]).unwrap_err().to_string();
        assert!(e.contains("kvm3: 36 MiB free, needs 64 MiB"), "{e}");
        assert!(e.contains("kvm1: maintenance") && e.contains("kvm2: suspect"), "{e}");
    }

    #[test]
    fn vcpus_are_bounded_by_the_overcommit_ratio() {
        let mut s = online(three_hosts());
        let mut wide = vm_on(&mut s, "a", "wide", "kvm1");
        wide.vcpus = 17;
        let e = place(&s, &wide, Millis(1), &["kvm1".into()]).unwrap_err().to_string();
        assert!(e.contains("kvm2: 0 of 16 vCPUs allocated, needs 17"), "{e}");
    }

    /// What a host reports is untrusted: numbers at their maximum neither panic nor wrap
    /// into room that is not there.
    #[test]
    fn reported_numbers_at_their_maximum_neither_panic_nor_wrap() {
        let mut s = online(three_hosts());
        for h in s.hosts.values_mut() {
            h.resources.cpus = u32::MAX;
            h.resources.memory_free_kib = u64::MAX;
        }
        let mut huge = vm_on(&mut s, "a", "huge", "kvm1");
        huge.vcpus = u32::MAX;
        huge.memory_kib = u64::MAX;
        s.vms.insert(huge.uuid.clone(), huge.clone());
        let usage = Usage::of(&s);
        assert_eq!(memory_left(&s, &usage, "kvm2"), u64::MAX);
        assert!(place(&s, &huge, Millis(1), &["kvm1".into()]).is_ok(), "saturated capacity still fits");
        s.policy.vcpu_overcommit = u32::MAX;
        let e = place(&s, &VmView { vcpus: 1, ..huge.clone() }, Millis(1), &["kvm1".into()]);
        assert!(e.is_ok(), "{e:?}");
    }
}
