//! Whether an operator's `vmha migrate VM --to HOST` may start, and with what.

use crate::{AdminState, ClusterState, HostLiveness, Millis, Refusal, RunState};

/// A migration the shell may write down and send to the source agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationPlan {
    pub vm_uuid: String,
    pub vm_name: String,
    pub source: String,
    pub target: String,
    /// The libvirt URI the source's libvirtd connects to (peer-to-peer).
    pub target_uri: String,
}

/// Checks an operator's live-migration request against what the controller sees at `now`.
pub fn plan_migration(
    state: &ClusterState,
    vm_key: &str,
    target: &str,
    now: Millis,
) -> Result<MigrationPlan, Refusal> {
    let vm = state.find_vm(vm_key)?;
    let target_host = state.hosts.get(target).ok_or_else(|| Refusal::UnknownHost(target.into()))?;
    let Some(source) = vm.host.as_deref() else {
        return Err(Refusal::NotPlaced { vm: vm.name.clone(), state: vm.state.as_str() });
    };
    if source == target {
        return Err(Refusal::AlreadyOnTarget { vm: vm.name.clone(), host: target.into() });
    }
    if vm.state != RunState::Running {
        return Err(Refusal::NotRunning {
            vm: vm.name.clone(),
            host: source.into(),
            state: vm.state.as_str(),
        });
    }
    if let Some(op) = &vm.busy_with {
        return Err(Refusal::Busy { vm: vm.name.clone(), operation: op.clone() });
    }
    for host in [source, target] {
        match state.liveness(host, now) {
            HostLiveness::Online => {}
            l @ (HostLiveness::Suspect | HostLiveness::Dead) => {
                return Err(Refusal::HostDown { host: host.into(), liveness: l.as_str() });
            }
        }
    }
    match target_host.admin {
        AdminState::Active => {}
        a @ (AdminState::Draining | AdminState::Maintenance) => {
            return Err(Refusal::HostNotActive { host: target.into(), admin: a.as_str() });
        }
    }
    // The agent's free-memory figure already excludes its running guests; the controller's
    // own accounting is not needed for an operator's explicit move.
    let free = target_host.resources.memory_free_kib;
    if free < vm.memory_kib {
        return Err(Refusal::NoRoom {
            vm: vm.name.clone(),
            host: target.into(),
            free_mib: free / 1024,
            need_mib: vm.memory_kib.div_ceil(1024),
        });
    }
    Ok(MigrationPlan {
        vm_uuid: vm.uuid.clone(),
        vm_name: vm.name.clone(),
        source: source.into(),
        target: target.into(),
        target_uri: target_host.migration_uri.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::{three_hosts, vm_on};

    fn cluster() -> ClusterState {
        let mut s = three_hosts();
        for h in s.hosts.values_mut() {
            h.lease.granted_at = Some(Millis(1_000));
        }
        let mut vm = vm_on(&mut s, "u-dns1", "dns1", "kvm1");
        vm.protected = true;
        s.vms.insert(vm.uuid.clone(), vm);
        s
    }

    const NOW: Millis = Millis(2_000);

    #[test]
    fn plans_a_move_to_an_online_active_host_by_name_or_uuid() {
        let s = cluster();
        let plan = plan_migration(&s, "dns1", "kvm2", NOW).unwrap();
        assert_eq!(plan.source, "kvm1");
        assert_eq!(plan.target_uri, "qemu+tcp://kvm2/system");
        assert_eq!(plan_migration(&s, "u-dns1", "kvm2", NOW), Ok(plan));
    }

    #[test]
    fn refuses_unknown_names_with_what_to_do() {
        let s = cluster();
        let e = plan_migration(&s, "nope", "kvm2", NOW).unwrap_err();
        assert_eq!(e, Refusal::UnknownVm("nope".into()));
        assert!(e.to_string().contains("vmha vm ls"));
        let e = plan_migration(&s, "dns1", "kvm9", NOW).unwrap_err();
        assert_eq!(e, Refusal::UnknownHost("kvm9".into()));
    }

    #[test]
    fn refuses_the_host_it_is_already_on() {
        let e = plan_migration(&cluster(), "dns1", "kvm1", NOW).unwrap_err();
        assert!(matches!(e, Refusal::AlreadyOnTarget { .. }), "{e}");
    }

    #[test]
    fn refuses_a_silent_target_or_source() {
        let mut s = cluster();
        s.hosts.get_mut("kvm2").unwrap().lease.granted_at = Some(Millis(0));
        let now = Millis(5_001 + 1);
        s.hosts.get_mut("kvm1").unwrap().lease.granted_at = Some(now);
        let e = plan_migration(&s, "dns1", "kvm2", now).unwrap_err();
        assert_eq!(e, Refusal::HostDown { host: "kvm2".into(), liveness: "suspect" });
        s.hosts.get_mut("kvm1").unwrap().dead = Some(crate::Death { at: now, cause: "test".into() });
        let e = plan_migration(&s, "dns1", "kvm3", now).unwrap_err();
        assert_eq!(e, Refusal::HostDown { host: "kvm1".into(), liveness: "dead" });
    }

    #[test]
    fn refuses_hosts_in_maintenance_and_without_room() {
        let mut s = cluster();
        s.hosts.get_mut("kvm2").unwrap().admin = AdminState::Maintenance;
        let e = plan_migration(&s, "dns1", "kvm2", NOW).unwrap_err();
        assert!(e.to_string().contains("vmha host undrain kvm2"), "{e}");
        s.hosts.get_mut("kvm3").unwrap().resources.memory_free_kib = 1024;
        let e = plan_migration(&s, "dns1", "kvm3", NOW).unwrap_err();
        assert_eq!(e, Refusal::NoRoom { vm: "dns1".into(), host: "kvm3".into(), free_mib: 1, need_mib: 64 });
    }

    #[test]
    fn refuses_a_vm_that_is_not_running_or_busy() {
        let mut s = cluster();
        s.vms.get_mut("u-dns1").unwrap().busy_with = Some("op-1".into());
        assert!(matches!(plan_migration(&s, "dns1", "kvm2", NOW), Err(Refusal::Busy { .. })));
        let vm = s.vms.get_mut("u-dns1").unwrap();
        vm.busy_with = None;
        vm.state = RunState::ShutOff;
        assert!(matches!(plan_migration(&s, "dns1", "kvm2", NOW), Err(Refusal::NotRunning { .. })));
        let vm = s.vms.get_mut("u-dns1").unwrap();
        vm.host = None;
        vm.state = RunState::Unknown;
        assert!(matches!(plan_migration(&s, "dns1", "kvm2", NOW), Err(Refusal::NotPlaced { .. })));
    }

    #[test]
    fn a_name_shared_by_two_vms_is_ambiguous() {
        let mut s = cluster();
        let mut twin = s.vms["u-dns1"].clone();
        twin.uuid = "u-dns1-b".into();
        s.vms.insert(twin.uuid.clone(), twin);
        assert!(matches!(plan_migration(&s, "dns1", "kvm2", NOW), Err(Refusal::AmbiguousVm { .. })));
    }
}
