//! The controller's picture of the cluster: desired state loaded from the database plus what
//! agents last reported. Plain data; the engine's functions read and update it.

use std::collections::BTreeMap;

use crate::{HostLiveness, Millis, Timings};

/// What the operator wants a host to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminState {
    /// Takes placements.
    Active,
    /// Being emptied by live migration; takes no placements.
    Draining,
    /// Empty on purpose: no placements, not counted as dead, never fenced.
    Maintenance,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Draining => "draining",
            AdminState::Maintenance => "maintenance",
        }
    }

    pub fn parse(s: &str) -> Option<AdminState> {
        match s {
            "active" => Some(AdminState::Active),
            "draining" => Some(AdminState::Draining),
            "maintenance" => Some(AdminState::Maintenance),
            _ => None,
        }
    }
}

/// A domain's state as libvirt reports it, reduced to what decisions need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Executing (libvirt "running" or "blocked").
    Running,
    /// Paused; also the state of the incoming side of a live migration.
    Paused,
    /// Being shut down by its guest OS.
    ShuttingDown,
    /// Defined but not running.
    ShutOff,
    /// QEMU died under it.
    Crashed,
    /// Suspended to memory by the guest (power management).
    Suspended,
    /// No host reports it.
    Unknown,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::ShuttingDown => "shutting_down",
            RunState::ShutOff => "shut_off",
            RunState::Crashed => "crashed",
            RunState::Suspended => "suspended",
            RunState::Unknown => "unknown",
        }
    }

    /// A QEMU process exists for the domain: the states in which a second copy would corrupt
    /// its disks.
    pub fn has_process(self) -> bool {
        match self {
            RunState::Running | RunState::Paused | RunState::ShuttingDown | RunState::Suspended => true,
            RunState::ShutOff | RunState::Crashed | RunState::Unknown => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HostResources {
    pub cpus: u32,
    pub memory_total_kib: u64,
    pub memory_free_kib: u64,
    /// Placement will only move a VM between hosts whose CPU models are compatible.
    pub cpu_model: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostView {
    pub name: String,
    pub admin: AdminState,
    pub migration_uri: String,
    pub resources: HostResources,
    pub libvirt_version: String,
    /// On this controller's monotonic clock; `None` until the first heartbeat it receives.
    pub last_heartbeat: Option<Millis>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmView {
    /// libvirt domain UUID: the identity (names can change).
    pub uuid: String,
    pub name: String,
    /// The host that last reported the domain; `None` when no host does.
    pub host: Option<String>,
    pub state: RunState,
    pub memory_kib: u64,
    pub vcpus: u32,
    pub protected: bool,
    pub priority: i32,
    /// Set while a migration or other operation owns the VM, so that no second one starts.
    pub busy_with: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub hosts: BTreeMap<String, HostView>,
    /// Keyed by domain UUID.
    pub vms: BTreeMap<String, VmView>,
    pub timings: Timings,
}

impl ClusterState {
    pub fn liveness(&self, host: &str, now: Millis) -> HostLiveness {
        let last = self.hosts.get(host).and_then(|h| h.last_heartbeat);
        HostLiveness::of(last, now, &self.timings)
    }

    /// Finds a VM by UUID or, failing that, by name. Names are unique per host in libvirt but
    /// not across a cluster, so a name that matches two UUIDs is ambiguous.
    pub fn find_vm(&self, key: &str) -> Result<&VmView, crate::Refusal> {
        if let Some(vm) = self.vms.get(key) {
            return Ok(vm);
        }
        let mut by_name = self.vms.values().filter(|vm| vm.name == key);
        match (by_name.next(), by_name.next()) {
            (Some(vm), None) => Ok(vm),
            (Some(a), Some(b)) => Err(crate::Refusal::AmbiguousVm {
                name: key.to_string(),
                uuids: vec![a.uuid.clone(), b.uuid.clone()],
            }),
            (None, _) => Err(crate::Refusal::UnknownVm(key.to_string())),
        }
    }

    /// Memory the VMs placed on a host use, as the controller sees them.
    pub fn memory_used_kib(&self, host: &str) -> u64 {
        self.vms
            .values()
            .filter(|vm| vm.host.as_deref() == Some(host) && vm.state.has_process())
            .map(|vm| vm.memory_kib)
            .sum()
    }
}
