//! What hosts' agents say: registrations, and heartbeats with their reports.

use std::collections::BTreeSet;

use super::{Engine, Heartbeat, LeaseReply, Output, Registration, Reply};
use crate::Refusal;
use crate::action::Action;
use crate::availability::OutageMark;
use crate::drain;
use crate::event::{Event, EventKind};
use crate::inventory::{self, InventoryChange};
use crate::lease::{self, LeaseAnswer};
use crate::recovery;
use crate::{HostView, Millis, Watchdog};

/// At most one `agent_connected` event per host in this long, unless its address changes.
pub const CONNECTED_EVENT_EVERY_MS: u64 = 60_000;

impl Engine {
    pub(super) fn register(&mut self, r: Registration, now: Millis, out: &mut Output) {
        let s = &mut self.cluster;
        // A host the cluster knows always comes back; only new ones count against the cap.
        if !s.hosts.contains_key(&r.host) && s.hosts.len() >= s.policy.max_hosts {
            out.reply = Reply::Refused(Refusal::TooManyHosts { host: r.host, hosts: s.hosts.len() });
            return;
        }
        lease::observe_quorum(s, now);
        let h = s.hosts.entry(r.host.clone()).or_insert_with(|| HostView::new(&r.host));
        // An agent that registers again and again while it is heard from (a crash loop, or a
        // hostile host) is logged once a minute with a count, not at every registration: the
        // event log must not grow at the pace a host chooses. A host back after an absence (a
        // lease's length without a word) or at a new address is always said at once.
        let moved = h.migration_uri != r.migration_uri || h.peer_address != r.peer_address;
        let ttl = s.timings.lease_ttl_ms;
        let away = h.last_heartbeat.is_none_or(|t| now.0.saturating_sub(t.0) >= ttl);
        let logged = match h.connected_logged {
            Some((at, unsaid))
                if !moved && !away && now.0 < at.0.saturating_add(CONNECTED_EVENT_EVERY_MS) =>
            {
                h.connected_logged = Some((at, unsaid.saturating_add(1)));
                None
            }
            previous => {
                h.connected_logged = Some((now, 0));
                Some(previous.map_or(0, |(_, unsaid)| unsaid))
            }
        };
        h.migration_uri = r.migration_uri.clone();
        h.peer_address = r.peer_address;
        h.resources = r.resources;
        h.libvirt_version = r.libvirt_version;
        h.lock_manager = r.lock_manager;
        h.last_heartbeat = Some(now);
        // A new run of the agent counts its heartbeats from 1 again.
        h.report_seq = 0;
        let stamp = lease::issue_stamp(s, &r.host, now);
        out.persist.registered.push(r.host.clone());
        if let Some(unsaid) = logged {
            let before = match unsaid {
                0 => String::new(),
                n => format!(" ({n} more registrations since the last one logged)"),
            };
            out.events.push(
                Event::host(
                    &r.host,
                    EventKind::AgentConnected,
                    format!(
                        "agent on {} connected ({}); migrations to it use {}{before}",
                        r.host, r.describe, r.migration_uri
                    ),
                )
                .by(&r.host),
            );
        }
        out.reply = Reply::Registered { stamp };
    }

    /// Returns the VMs the heartbeat may have changed.
    pub(super) fn heartbeat(
        &mut self,
        hb: Heartbeat,
        now: Millis,
        out: &mut Output,
        actions: &mut Vec<Action>,
    ) -> Vec<String> {
        let host = hb.host;
        let (roster_known, probes_known) = (hb.roster_known, hb.probes_known);
        let s = &mut self.cluster;
        let Some(h) = s.hosts.get_mut(&host) else {
            out.reply = Reply::Refused(Refusal::NotRegistered(host));
            return Vec::new();
        };
        h.last_heartbeat = Some(now);
        if let Some((resources, lock_manager)) = hb.resources {
            h.resources = resources;
            h.lock_manager = lock_manager;
        }
        if h.watchdog != hb.watchdog {
            out.events.push(Event::host(&host, EventKind::Watchdog, watchdog_message(&host, &hb.watchdog)));
            h.watchdog = hb.watchdog;
            out.persist.watchdog.push(host.clone());
        }
        if h.self_fenced != hb.self_fenced {
            h.self_fenced = hb.self_fenced;
            out.events.push(self_fence_event(&host, hb.self_fenced));
        }
        let overtaken = hb.seq != 0 && hb.seq <= h.report_seq;
        if hb.domains.is_some() && !overtaken {
            h.report_seq = h.report_seq.max(hb.seq);
        }
        drain::on_probes(s, &host, hb.probes, now);
        let mut touched: Vec<String> = Vec::new();
        // Without its domain list a report says nothing about the VMs: the last one stands. Nor
        // does one a later report of the same agent overtook.
        let domains = hb.domains.filter(|_| !overtaken);
        let reported = domains.is_some();
        // The report was sent after the agent received the answer it echoes: on this leader's
        // clock, after that answer's stamp. (Nothing is known of an echo of another leader's.)
        let sent_after = hb.echo.filter(|e| e.epoch == s.epoch).map_or(Millis(0), |e| e.stamp);
        let mut deferred = BTreeSet::new();
        if let Some(domains) = domains {
            touched.extend(domains.iter().map(|d| d.uuid.clone()));
            touched.extend(recovery::lock_holder_reported(s, &host, &domains, now));
            let (first, stale) = recovery::on_report(s, &host, &domains, now);
            actions.extend(first);
            let kept: Vec<_> = domains.into_iter().filter(|d| !stale.contains(&d.uuid)).collect();
            let admitted = inventory::admit_new(s, &host, kept, now);
            if let Some(message) = admitted.message {
                out.events.push(Event::host(&host, EventKind::DiscoveryDeferred, message).by(&host));
            }
            deferred = admitted.deferred.into_iter().collect();
            let kept = admitted.domains;
            let changes = inventory::apply_report(s, &host, &kept, sent_after, now);
            crate::guest::on_report(s, &host, &kept, now);
            let after = recovery::after_report(s, &host, &changes, now);
            if !after.is_empty() {
                // It placed the waiting restarts again: any of them may wait for another reason,
                // or have ended (another live host reports the VM running), which leaves no
                // recovery behind to find it by.
                touched.extend(s.vms.values().filter(|v| v.recovery.is_some()).map(|v| v.uuid.clone()));
                touched.extend(after.iter().filter_map(|a| match a {
                    Action::Outage(OutageMark::Ended { vm_uuid }) => Some(vm_uuid.clone()),
                    _ => None,
                }));
            }
            actions.extend(after);
            touched.extend(changes.iter().map(|c| c.uuid().to_string()));
            self.inventory_changes(changes, &host, out);
            self.settle_inherited_from_report(&host, now, out, actions);
        }
        let s = &mut self.cluster;
        // After the report: a host declared dead earns a lease again only with a report of its
        // domains, and this one may be it.
        // The roster this answer carries (built now if a step changed it): an echo of the answer
        // later tells that the agent holds that version.
        let roster = self.roster.current(s);
        touched.extend(self.roster.take_listed());
        let answer = lease::on_heartbeat(s, &host, hb.echo, roster.version, hb.arrived.unwrap_or(now), now);
        if let (LeaseAnswer::Granted { .. }, true, Some(h)) = (&answer, reported, s.hosts.get_mut(&host)) {
            h.reported_at = Some(now);
        }
        // Only for its own domains: a host cannot rewrite the definition of another's VM.
        let xml_not_taken: Vec<String> = (hb.xml.iter().map(|(uuid, ..)| uuid))
            .chain(hb.xml_refused.iter().map(|(uuid, _)| uuid))
            .filter(|u| deferred.contains(*u))
            .cloned()
            .collect();
        let mut refused = hb.xml_refused;
        for (uuid, xml, disks) in hb.xml {
            if s.vms.get(&uuid).is_none_or(|vm| vm.host.as_deref() != Some(&host)) {
                continue;
            }
            // A second writer on a disk corrupts it: a definition that names another VM's disk
            // is refused, so that no failover starts it beside that VM.
            if let Some((disk, other)) = s.disk_taken(&uuid, &disks) {
                refused.push((
                    uuid,
                    format!("disk {disk} belongs to VM {other} (a writable disk belongs to one VM)"),
                ));
                continue;
            }
            let Some(vm) = s.vms.get_mut(&uuid) else { continue };
            vm.definition_refused = None;
            if vm.xml != xml {
                vm.xml = xml;
                out.persist.xml.push(uuid.clone());
            }
            s.set_disks(&uuid, disks);
        }
        for (uuid, why) in refused {
            let Some(vm) = s.vms.get_mut(&uuid).filter(|vm| vm.host.as_deref() == Some(&host)) else {
                continue;
            };
            if vm.definition_refused.as_deref() == Some(why.as_str()) {
                continue;
            }
            let name = vm.name.clone();
            let then = if vm.xml.is_empty() {
                format!(
                    "{name} cannot be restarted elsewhere until {host} reports a definition that passes \
                     the controller's checks"
                )
            } else {
                format!(
                    "a restart elsewhere uses the definition accepted before, until {host} reports one \
                     that passes the controller's checks"
                )
            };
            out.events.push(
                Event::vm(
                    &name,
                    EventKind::DefinitionRefused,
                    format!("definition of VM {name} reported by host {host} refused: {why}; {then}"),
                )
                .by(&host),
            );
            vm.definition_refused = Some(why);
        }
        let interval = s.timings.heartbeat_interval_ms;
        // Align every host's heartbeats on the leader's clock, so that their leases end
        // together if the leader goes away (see SAFETY.md).
        let mut next_in_ms = interval - now.0 % interval;
        if next_in_ms < interval / 4 {
            next_in_ms += interval;
        }
        let cluster_hosts = s.hosts.len() as u32;
        out.reply = Reply::Lease(LeaseReply {
            answer,
            next_in_ms,
            cluster_hosts,
            roster_update: self.roster.update_for(s, roster_known.unwrap_or(0)),
            roster,
            xml_not_taken,
            service_probes: crate::service_probe::for_host(s, &host, probes_known),
        });
        touched
    }

    /// Events and writes for what a report changed.
    pub(super) fn inventory_changes(&mut self, changes: Vec<InventoryChange>, actor: &str, out: &mut Output) {
        for change in changes {
            if let InventoryChange::Vanished { uuid, name, from, forgotten: true } = &change {
                out.persist.forgotten.push(uuid.clone());
                out.events.push(
                    Event::vm(
                        name,
                        EventKind::VmForgotten,
                        format!("{name} is no longer defined on {from} nor reported by any host: forgotten"),
                    )
                    .by(actor),
                );
                continue;
            }
            let Some(vm) = self.cluster.vms.get(change.uuid()) else { continue };
            out.persist.vms.push(vm.uuid.clone());
            // Running again (restarted, started, or moved while an outage was open).
            let back = match &change {
                InventoryChange::StateChanged { from, to, .. } => !from.has_process() && to.has_process(),
                InventoryChange::Moved { state, .. } => state.has_process(),
                _ => false,
            };
            if back {
                out.outages.push(OutageMark::Ended { vm_uuid: vm.uuid.clone() });
            }
            let (kind, message) = match &change {
                InventoryChange::Appeared { name, host, state, .. } => {
                    (EventKind::VmDiscovered, format!("{name} found {} on {host}", state.as_str()))
                }
                InventoryChange::Moved { name, from, to, .. } => {
                    (EventKind::VmMoved, format!("{name} now runs on {to} (was on {from})"))
                }
                InventoryChange::StateChanged { name, host, from, to, unwatched, .. } => (
                    EventKind::VmState,
                    format!(
                        "{name} on {host} is now {} (was {}{})",
                        to.as_str(),
                        from.as_str(),
                        if *unwatched { " when the previous leader last saw it" } else { "" }
                    ),
                ),
                InventoryChange::Vanished { name, from, .. } => {
                    (EventKind::VmVanished, format!("{name} is no longer reported by {from}"))
                }
                // after_report writes its event, with what is done about it.
                InventoryChange::Updated { .. } | InventoryChange::TwoCopies { .. } => continue,
            };
            out.events.push(Event::vm(&vm.name, kind, message).by(actor));
        }
    }
}

fn watchdog_message(host: &str, wd: &Watchdog) -> String {
    match wd {
        Watchdog::Armed { device, timeout_ms } => {
            format!(
                "{host}'s watchdog is armed ({device}, {timeout_ms} ms): a dead or hung agent gets the host reset"
            )
        }
        Watchdog::Missing(why) => format!(
            "{host} has no working watchdog ({why}): if it fails, its VMs wait for a fence or `vmha host confirm-down \
             {host}`"
        ),
        Watchdog::Unknown => format!("{host}'s watchdog is unknown"),
    }
}

/// What an agent's self-fence flag means, when it changes.
fn self_fence_event(host: &str, fenced: bool) -> Event {
    let event = if fenced {
        Event::host(
            host,
            EventKind::SelfFenced,
            format!(
                "{host}'s agent SELF-FENCED: its lease ran out with no proof that this controller lacked quorum, so \
                 it destroyed its protected VMs; they are restarted elsewhere once {host} is declared dead (its \
                 agent's log says why)"
            ),
        )
    } else {
        Event::host(
            host,
            EventKind::SelfFenceLifted,
            format!(
                "{host}'s agent holds a lease again after its self-fence: protected VMs may run there again"
            ),
        )
    };
    event.by(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::HostResources;
    use crate::inventory::ReportedDomain;
    use crate::{ClusterState, Input, RunState};

    fn registration(host: &str) -> Registration {
        Registration {
            host: host.into(),
            migration_uri: format!("qemu+tcp://{host}/system"),
            peer_address: format!("{host}:7401"),
            resources: HostResources::default(),
            libvirt_version: "9".into(),
            lock_manager: "lockd".into(),
            describe: "test".into(),
        }
    }

    #[test]
    fn an_agent_that_registers_in_a_loop_is_logged_once_a_minute_with_a_count() {
        let mut e = Engine::new(ClusterState::default());
        let connected = |out: &Output| {
            out.events
                .iter()
                .filter(|ev| ev.kind == EventKind::AgentConnected)
                .map(|ev| ev.message.clone())
                .collect::<Vec<_>>()
        };
        let mut logged = Vec::new();
        for i in 0..120u64 {
            logged.extend(connected(&e.step(Input::Register(registration("kvm1")), Millis(1000 + i * 500))));
        }
        assert_eq!(logged.len(), 1, "{logged:?}");
        let out = e.step(Input::Register(registration("kvm1")), Millis(1000 + CONNECTED_EVENT_EVERY_MS));
        let said = connected(&out);
        assert_eq!(said.len(), 1);
        assert!(said[0].contains("(119 more registrations since the last one logged)"), "{}", said[0]);
        // A new address is said at once.
        let moved =
            Registration { migration_uri: "qemu+tcp://10.0.0.9/system".into(), ..registration("kvm1") };
        let out = e.step(Input::Register(moved), Millis(2000 + CONNECTED_EVENT_EVERY_MS));
        assert_eq!(connected(&out).len(), 1);
        // Every registration is still taken.
        assert!(matches!(out.reply, Reply::Registered { .. }));
    }

    fn report(host: &str, uuid: &str) -> Heartbeat {
        Heartbeat {
            host: host.into(),
            echo: None,
            resources: None,
            watchdog: Watchdog::Missing("test".into()),
            probes: Vec::new(),
            domains: Some(vec![ReportedDomain {
                uuid: uuid.into(),
                name: "dns1".into(),
                state: RunState::Running,
                memory_kib: 65_536,
                vcpus: 1,
                guest: None,
                probes: Vec::new(),
            }]),
            xml: Vec::new(),
            xml_refused: Vec::new(),
            roster_known: None,
            probes_known: 0,
            self_fenced: false,
            arrived: None,
            seq: 0,
        }
    }

    #[test]
    fn a_new_host_beyond_the_cap_is_refused_and_a_known_one_always_comes_back() {
        let mut e = Engine::new(ClusterState { epoch: 1, ..Default::default() });
        e.cluster.policy.max_hosts = 1;
        let r = e.step(Input::Register(registration("kvm1")), Millis(0));
        assert!(matches!(r.reply, Reply::Registered { .. }));
        let r = e.step(Input::Register(registration("kvm2")), Millis(1));
        let Reply::Refused(refusal) = r.reply else { panic!("{:?}", r.reply) };
        assert!(refusal.to_string().contains("--max-hosts"), "{refusal}");
        assert!(!e.cluster.hosts.contains_key("kvm2") && r.events.is_empty());
        let r = e.step(Input::Register(registration("kvm1")), Millis(2));
        assert!(matches!(r.reply, Reply::Registered { .. }));
    }

    /// A refused definition costs its host nothing (the heartbeat is answered as any other),
    /// is said once per reason, and the VM keeps the definition accepted before.
    #[test]
    fn a_refused_definition_is_said_once_and_the_last_accepted_one_stays() {
        const U: &str = "00000000-0000-0000-0000-000000000001";
        let mut e = Engine::new(ClusterState { epoch: 1, ..Default::default() });
        e.step(Input::Register(registration("kvm1")), Millis(0));
        let refused = |why: &str| {
            let mut hb = report("kvm1", U);
            hb.xml_refused = vec![(U.into(), why.into())];
            Input::Heartbeat(hb)
        };
        let kinds = |o: &Output| o.events.iter().map(|e| e.kind).collect::<Vec<_>>();
        let o = e.step(refused("hostdev: host device passthrough"), Millis(10));
        assert!(matches!(o.reply, Reply::Lease(_)), "{:?}", o.reply);
        assert_eq!(kinds(&o), [EventKind::Watchdog, EventKind::VmDiscovered, EventKind::DefinitionRefused]);
        assert!(o.events[2].message.contains("cannot be restarted elsewhere"), "{}", o.events[1].message);
        assert!(kinds(&e.step(refused("hostdev: host device passthrough"), Millis(20))).is_empty());
        let mut ok = report("kvm1", U);
        ok.xml = vec![(U.into(), "<domain/>".into(), Vec::new())];
        let o = e.step(Input::Heartbeat(ok), Millis(30));
        assert_eq!(o.persist.xml, [U]);
        assert_eq!(e.cluster.vms[U].definition_refused, None);
        let o = e.step(refused("disk vda: outside"), Millis(40));
        assert!(o.events[0].message.contains("uses the definition accepted before"), "{:?}", o.events);
        assert_eq!(e.cluster.vms[U].xml, "<domain/>");
        assert!(o.persist.xml.is_empty());
        // Another host cannot have a VM's definition refused (or accepted) either.
        let o = e.step(Input::Register(registration("kvm2")), Millis(50));
        assert!(matches!(o.reply, Reply::Registered { .. }));
        let mut other = report("kvm2", U);
        other.domains = Some(Vec::new());
        other.xml_refused = vec![(U.into(), "other".into())];
        assert!(!kinds(&e.step(Input::Heartbeat(other), Millis(60))).contains(&EventKind::DefinitionRefused));
        assert_eq!(e.cluster.vms[U].definition_refused.as_deref(), Some("disk vda: outside"));
    }

    /// A definition that names another VM's writable disk is refused, whichever host sends
    /// it: a failover would start it beside that VM, two writers on one disk. The disk is free
    /// again once its VM no longer uses it.
    #[test]
    fn a_disk_belongs_to_one_vm() {
        const A: &str = "00000000-0000-0000-0000-00000000000a";
        const B: &str = "00000000-0000-0000-0000-00000000000b";
        let mut e = Engine::new(ClusterState { epoch: 1, ..Default::default() });
        e.step(Input::Register(registration("kvm1")), Millis(0));
        e.step(Input::Register(registration("kvm2")), Millis(0));
        let define = |host: &str, uuid: &str, disk: &str| {
            let mut hb = report(host, uuid);
            hb.xml = vec![(uuid.into(), format!("<domain>{disk}</domain>"), vec![disk.to_string()])];
            Input::Heartbeat(hb)
        };
        e.step(define("kvm1", A, "/srv/vms/dns1.qcow2"), Millis(10));
        assert_eq!(e.cluster.vms[A].disks, ["/srv/vms/dns1.qcow2"]);
        let o = e.step(define("kvm2", B, "/srv/vms/dns1.qcow2"), Millis(20));
        let refused = o.events.iter().find(|e| e.kind == EventKind::DefinitionRefused).expect("refused");
        assert!(
            refused
                .message
                .contains("disk /srv/vms/dns1.qcow2 belongs to VM dns1 (a writable disk belongs to one VM)"),
            "{}",
            refused.message
        );
        assert!(e.cluster.vms[B].xml.is_empty(), "nothing of it was kept");
        // dns1 moves to another disk: the old one is free for the other VM.
        e.step(define("kvm1", A, "/srv/vms/dns1-new.qcow2"), Millis(30));
        e.step(define("kvm2", B, "/srv/vms/dns1.qcow2"), Millis(40));
        assert_eq!(e.cluster.vms[B].disks, ["/srv/vms/dns1.qcow2"]);
        assert_eq!(e.cluster.vms[B].definition_refused, None);
    }

    /// A deferred VM's XML is handed back, so that its agent sends it again.
    #[test]
    fn the_xml_of_a_vm_not_recorded_yet_is_asked_for_again() {
        let mut e = Engine::new(ClusterState { epoch: 1, ..Default::default() });
        e.cluster.policy.new_vms_per_minute = 1;
        e.step(Input::Register(registration("kvm1")), Millis(0));
        let mut hb = report("kvm1", "a");
        let mut second = hb.domains.as_ref().unwrap()[0].clone();
        second.uuid = "b".into();
        hb.domains.as_mut().unwrap().push(second);
        hb.xml =
            vec![("a".into(), "<domain/>".into(), Vec::new()), ("b".into(), "<domain/>".into(), Vec::new())];
        let o = e.step(Input::Heartbeat(hb.clone()), Millis(10));
        let Reply::Lease(lease) = &o.reply else { panic!("{:?}", o.reply) };
        assert_eq!(lease.xml_not_taken, ["b"]);
        assert!(o.events.iter().any(|e| e.kind == EventKind::DiscoveryDeferred));
        assert!(!e.cluster.vms.contains_key("b"));
        let o = e.step(Input::Heartbeat(hb), Millis(60_010));
        let Reply::Lease(lease) = &o.reply else { panic!("{:?}", o.reply) };
        assert!(lease.xml_not_taken.is_empty());
        assert_eq!(e.cluster.vms["b"].xml, "<domain/>");
    }
}
