//! What a step changed, compared with what was last handed out for persisting.

use std::collections::BTreeSet;

use super::{Engine, HostWork, Output, VmWork};
use crate::drain_record;

impl Engine {
    pub(super) fn mark_saved(&mut self) {
        self.saved_hosts = self.cluster.hosts.iter().map(|(n, h)| (n.clone(), HostWork::of(h))).collect();
        self.saved_vms = self.cluster.vms.iter().map(|(u, v)| (u.clone(), VmWork::of(v))).collect();
    }

    /// Whether every host's and VM's work was handed out for persisting (the narrow scopes of
    /// `collect_persist` missed nothing): checked by the simulator after every step.
    pub fn check_persisted(&self) -> Result<(), String> {
        for (name, h) in &self.cluster.hosts {
            let (was, is) = (self.saved_hosts.get(name), HostWork::of(h));
            if was != Some(&is) {
                return Err(format!("host {name}'s work changed but was not persisted: {was:?} -> {is:?}"));
            }
        }
        for (uuid, vm) in &self.cluster.vms {
            let (was, is) = (self.saved_vms.get(uuid), VmWork::of(vm));
            if was != Some(&is) {
                return Err(format!("VM {uuid}'s work changed but was not persisted: {was:?} -> {is:?}"));
            }
        }
        Ok(())
    }

    /// Names what changed since it was last persisted, comparing what `scope` may have touched.
    pub(super) fn collect_persist(&mut self, scope: Scope, out: &mut Output) {
        let all_hosts = || self.cluster.hosts.keys().cloned().collect();
        let (hosts, vms): (Vec<String>, Vec<String>) = match scope {
            // A report may also end a migration, and so move a drain of another host on.
            Scope::Report(host, mut vms) => {
                vms.extend(out.persist.vms.iter().cloned());
                let draining = self
                    .saved_hosts
                    .iter()
                    .filter(|(_, w)| {
                        w.drain.as_ref().is_some_and(|d| d.state == drain_record::DrainState::Draining)
                    })
                    .map(|(n, _)| n.clone());
                (std::iter::once(host).chain(draining).collect(), vms)
            }
            // A tick changes a VM's work only through its restart (`recovery`) or its guest's
            // resets (`guest_reset`): the VMs with one now, or with one when last persisted.
            Scope::Tick => {
                let now = (self.cluster.vms.values())
                    .filter(|v| v.recovery.is_some() || !v.guest_care.is_default())
                    .map(|v| v.uuid.clone());
                let before = (self.saved_vms.iter())
                    .filter(|(_, w)| w.recovery.is_some() || !w.guest_care.is_default())
                    .map(|(u, _)| u.clone());
                (all_hosts(), now.chain(before).chain(out.persist.vms.iter().cloned()).collect())
            }
            Scope::Vms(vms) => (Vec::new(), vms),
            Scope::Host(host) => (vec![host], Vec::new()),
            Scope::Operations => (Vec::new(), Vec::new()),
            Scope::Everything => (all_hosts(), self.cluster.vms.keys().cloned().collect()),
        };
        for name in hosts {
            let Some(h) = self.cluster.hosts.get(&name) else { continue };
            let now = HostWork::of(h);
            if self.saved_hosts.get(&name) != Some(&now) {
                self.saved_hosts.insert(name.clone(), now.clone());
                out.persist.host_work.push((name, now));
            }
        }
        let vms: BTreeSet<String> = vms.into_iter().collect();
        for uuid in vms {
            let Some(vm) = self.cluster.vms.get(&uuid) else {
                self.saved_vms.remove(&uuid);
                continue;
            };
            let now = VmWork::of(vm);
            if self.saved_vms.get(&uuid) != Some(&now) {
                self.saved_vms.insert(uuid.clone(), now.clone());
                out.persist.vm_work.push((uuid, now));
            }
        }
        out.persist.vms.sort();
        out.persist.vms.dedup();
    }
}

/// What one step may have changed, for `collect_persist`.
pub(super) enum Scope {
    /// A report: its host, and the VMs it listed or changed.
    Report(String, Vec<String>),
    /// These VMs' settings.
    Vms(Vec<String>),
    /// A registration: its host alone. At 1000 hosts, comparing every VM for each of them
    /// starved the heartbeats of a controller's start, and agents that lost their lease
    /// registered again: a collapse that fed itself.
    Host(String),
    /// A recorded operation: only its own row changes.
    Operations,
    Tick,
    Everything,
}
