//! What the controller keeps in PostgreSQL, as a model: which fields of a step's state survive
//! a restart, and how a new controller is built from them. The controller's store writes and
//! loads exactly these (in SQL); the simulator and the scenario tests keep them in memory, so a
//! restart in a test loses what a real restart loses and keeps what it keeps
//! (controller/tests/restart_contract.rs holds the two to each other).

use std::collections::BTreeMap;

use crate::cluster::RunCause;
use crate::event::Event;
use crate::operation::{OpId, Operation};
use crate::step::{Engine, HostWork, Persist, VmWork};
use crate::{ClusterState, Death, HostView, Millis, RunState, VmView};

/// The database's contents, as far as a restart goes.
#[derive(Clone, Debug, Default)]
pub struct Db {
    /// Registration and facts, with the host's work in progress.
    pub hosts: BTreeMap<String, HostView>,
    pub vms: BTreeMap<String, VmView>,
    /// Operations not ended.
    pub ops: BTreeMap<OpId, Operation>,
}

impl Db {
    /// Writes what a step's `Persist` names, as `engine` has it now.
    pub fn apply(&mut self, engine: &Engine, p: &Persist) {
        let s = &engine.cluster;
        for name in &p.registered {
            if let Some(h) = s.hosts.get(name) {
                let row = self.hosts.entry(name.clone()).or_insert_with(|| HostView::new(name));
                row.migration_uri = h.migration_uri.clone();
                row.peer_address = h.peer_address.clone();
                row.resources = h.resources.clone();
                row.libvirt_version = h.libvirt_version.clone();
            }
        }
        // Only the watchdog: what heartbeats changed of the host's facts since it registered
        // (its resources) is not kept, and the next registration brings it again.
        for name in &p.watchdog {
            if let (Some(h), Some(row)) = (s.hosts.get(name), self.hosts.get_mut(name)) {
                row.watchdog = h.watchdog.clone();
            }
        }
        for (name, work) in &p.host_work {
            if let Some(row) = self.hosts.get_mut(name) {
                set_host_work(row, work);
            }
        }
        for uuid in p.vms.iter().chain(&p.xml) {
            if let Some(vm) = s.vms.get(uuid) {
                let row = self.vms.entry(uuid.clone()).or_insert_with(|| VmView::new(uuid, &vm.name));
                row.name = vm.name.clone();
                row.host = vm.host.clone();
                row.memory_kib = vm.memory_kib;
                row.vcpus = vm.vcpus;
                row.xml = vm.xml.clone();
                // The controller reads a definition's disks again when it loads it; the engine
                // parses no XML, so the model keeps them with the definition they were read from.
                row.disks = vm.disks.clone();
                // Unknown (a new leader before the first report) keeps the last state a report
                // showed: the next leader needs it to tell a VM that stopped meanwhile.
                if vm.state != RunState::Unknown {
                    row.state = vm.state;
                }
            }
        }
        for uuid in &p.forgotten {
            self.vms.remove(uuid);
        }
        for name in &p.removed_hosts {
            self.hosts.remove(name);
        }
        for (uuid, work) in &p.vm_work {
            if let Some(row) = self.vms.get_mut(uuid) {
                work.apply_to(row);
            }
        }
        for op in &p.ops {
            if op.state.ended() {
                self.ops.remove(&op.id);
            } else {
                self.ops.insert(op.id, op.clone());
            }
        }
    }

    /// A new controller (epoch `epoch`, started at `now`) from what is stored.
    pub fn load(&self, base: &ClusterState, epoch: u64, now: Millis) -> (Engine, Vec<Event>) {
        let mut cluster = ClusterState {
            timings: base.timings,
            policy: base.policy,
            epoch,
            started: now,
            ..Default::default()
        };
        for (name, h) in &self.hosts {
            cluster.hosts.insert(name.clone(), loaded_host(h, now));
        }
        for (uuid, vm) in &self.vms {
            cluster.vms.insert(uuid.clone(), loaded_vm(vm));
        }
        Engine::restore(cluster, self.ops.values().cloned().collect(), now)
    }
}

fn set_host_work(row: &mut HostView, w: &HostWork) {
    row.admin = w.admin;
    row.fencing = w.fencing.clone();
    row.memory_limit_kib = w.memory_limit_kib;
    row.dead = w.dead.clone().map(|cause| Death { at: Millis(0), cause });
    row.drain = w.drain.clone();
    row.roster_acked = w.roster_acked;
    // Stamped before any answer of the loading leader: all of those must list it too.
    row.lease.acked_members = w.members_acked.map(|m| (Millis(0), m));
}

/// A host as a new controller starts with it: what was stored, no lease, nothing heard yet.
pub fn loaded_host(row: &HostView, now: Millis) -> HostView {
    let mut h = HostView::new(&row.name);
    h.migration_uri = row.migration_uri.clone();
    h.peer_address = row.peer_address.clone();
    h.resources = crate::cluster::HostResources { memory_free_kib: 0, ..row.resources.clone() };
    h.libvirt_version = row.libvirt_version.clone();
    h.watchdog = row.watchdog.clone();
    set_host_work(&mut h, &HostWork::of(row));
    if let Some(d) = &mut h.dead {
        d.at = now;
    }
    h
}

/// A VM as a new controller starts with it: its observed state is rebuilt from reports, so
/// until then nobody knows whether it runs.
pub fn loaded_vm(row: &VmView) -> VmView {
    let mut vm = VmView::new(&row.uuid, &row.name);
    vm.change_run(RunState::Unknown, RunCause::Unreported);
    vm.recorded_running = row.state.has_process();
    vm.host = row.host.clone();
    vm.memory_kib = row.memory_kib;
    vm.vcpus = row.vcpus;
    vm.xml = row.xml.clone();
    vm.disks = row.disks.clone();
    VmWork::of(row).apply_to(&mut vm);
    vm
}
