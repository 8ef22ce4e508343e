//! What operators see: the operator API's messages, built from engine state and store rows.

use vmha_engine::availability::{self, Outage};
use vmha_engine::drain_record::{Drain, DrainStep, StepState};
use vmha_engine::recovery::explain;
use vmha_engine::{AdminState, ClusterState, FencingMode, HostLiveness, Millis, VmView, Watchdog};
use vmha_proto::v1 as pb;

use crate::store::{EventRow, OperationRow};

pub fn host(s: &ClusterState, name: &str, now: Millis) -> pb::Host {
    let running = s.vms.values().filter(|v| v.host.as_deref() == Some(name) && v.state.has_process()).count();
    host_running(s, name, now, running as u32)
}

/// Every host, in one pass over the VMs (not one per host: at 1000 hosts that was 25 million
/// visits for one `vmha host ls`, on the loop that answers heartbeats).
pub fn hosts(s: &ClusterState, now: Millis) -> Vec<pb::Host> {
    let mut running: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    for v in s.vms.values().filter(|v| v.state.has_process()) {
        if let Some(h) = v.host.as_deref() {
            *running.entry(h).or_default() += 1;
        }
    }
    s.hosts.keys().map(|h| host_running(s, h, now, running.get(h.as_str()).copied().unwrap_or(0))).collect()
}

/// `host`, with the number of VMs running there.
fn host_running(s: &ClusterState, name: &str, now: Millis, vms_running: u32) -> pb::Host {
    let h = &s.hosts[name];
    let liveness = s.liveness(name, now);
    let state = match (liveness, h.admin) {
        (HostLiveness::Dead, _) => "dead",
        (_, AdminState::Maintenance) => "maintenance",
        (l, _) => l.as_str(),
    };
    let note = match (&h.dead, liveness) {
        (Some(d), _) => d.cause.clone(),
        (None, _) if h.self_fenced => {
            "its agent self-fenced: it destroyed its protected VMs and starts none until \
                                       it holds a lease again"
                .into()
        }
        (None, HostLiveness::Suspect) => {
            match s.vms.values().find(|v| v.host.as_deref() == Some(name) && v.protected) {
                Some(v) => explain(s, &v.uuid, now).unwrap_or_default(),
                None => "no lease; it runs no protected VM".into(),
            }
        }
        (None, _) => String::new(),
    };
    pb::Host {
        name: h.name.clone(),
        state: state.into(),
        admin_state: h.admin.as_str().into(),
        migration_uri: h.migration_uri.clone(),
        cpus: h.resources.cpus,
        memory_total_mib: h.resources.memory_total_kib / 1024,
        memory_free_mib: h.resources.memory_free_kib / 1024,
        cpu_model: h.resources.cpu_model.clone(),
        libvirt_version: h.libvirt_version.clone(),
        heartbeat_age_s: h.last_heartbeat.map(|t| now.since(t) as f64 / 1000.0),
        vms_running,
        lease_left_s: h.lease.end(&s.timings).map(|e| (e.0 as f64 - now.0 as f64) / 1000.0),
        fencing: h.fencing.as_str().into(),
        note,
        health: h.health.as_str().into(),
        probes: h
            .health
            .probes
            .iter()
            .map(|p| pb::Probe { name: p.name.clone(), ok: p.ok, detail: p.detail.clone() })
            .collect(),
        drain: h.drain.as_ref().map(|d| drain(name, d)),
        memory_limit_mib: h.memory_limit_kib.map_or(0, |m| m / 1024),
        lock_manager: if h.lock_manager.is_empty() { "unknown".into() } else { h.lock_manager.clone() },
        // The shell fills it in: the engine does not see certificates.
        cert_not_after: 0,
        watchdog: h.watchdog.as_str().into(),
        watchdog_detail: match &h.watchdog {
            Watchdog::Armed { device, timeout_ms } => {
                format!("{device}, {:.1} s", *timeout_ms as f64 / 1000.0)
            }
            Watchdog::Missing(why) => why.clone(),
            Watchdog::Unknown => "its agent has not reported since this controller started".into(),
        },
    }
}

/// What `vmha status` puts first: what an operator must know or do now.
/// What no controller leading can know, said so: a host as a standby shows it, from the
/// database's record.
pub fn as_recorded_host(mut h: pb::Host) -> pb::Host {
    h.state = "unknown".into();
    h.note = format!("no controller leads: {} as last recorded", h.admin_state);
    h.lease_left_s = None;
    h.heartbeat_age_s = None;
    h
}

/// A VM as a standby shows it, from the database's record.
pub fn as_recorded_vm(mut v: pb::Vm) -> pb::Vm {
    v.why_not_running = if v.state == vmha_engine::RunState::Running.as_str() {
        String::new()
    } else {
        "no controller leads: nothing is restarted until one does".into()
    };
    v
}

/// Hosts' certificates expire together when they were issued together, and a host whose
/// certificate lapses can reach neither the controllers nor its peers: it loses its lease and
/// self-fences, all of them at once. So `vmha status` warns from `CERT_WARN_DAYS` before, and
/// raises an alarm from `CERT_ALARM_DAYS`.
pub const CERT_WARN_DAYS: i64 = 30;
pub const CERT_ALARM_DAYS: i64 = 7;

/// The warnings for hosts' certificates (`expiries`: by host, seconds since the Unix epoch)
/// at `now` (the same clock).
pub fn certificate_warnings(expiries: &[(String, i64)], now: i64) -> Vec<String> {
    let when = |t: i64| {
        chrono::DateTime::from_timestamp(t, 0)
            .map_or(t.to_string(), |d| d.format("%Y-%m-%d %H:%M UTC").to_string())
    };
    let renew = |h: &str| {
        format!(
            "renew it (`vmha ca issue host {h} --ip ADDRESS`, copy the files to {h}, `systemctl reload vmha-agent` \
             there; or `vmha ca renew-all`)"
        )
    };
    expiries
        .iter()
        .filter_map(|(h, t)| {
            let days = (t - now).div_euclid(86400);
            let at = when(*t);
            if *t <= now {
                Some(format!("CERTIFICATE EXPIRED: host {h}'s certificate expired at {at}; {}", renew(h)))
            } else if days < CERT_ALARM_DAYS {
                Some(format!(
                    "CERTIFICATE EXPIRES IN {days} DAYS: host {h}'s certificate ends at {at}, and then {h} loses its \
                     lease and self-fences; {}",
                    renew(h)
                ))
            } else if days < CERT_WARN_DAYS {
                Some(format!("host {h}'s certificate expires in {days} days ({at}); {}", renew(h)))
            } else {
                None
            }
        })
        .collect()
}

pub fn warnings(s: &ClusterState, now: Millis) -> Vec<String> {
    let mut out = Vec::new();
    let k = s.policy.reserve_hosts;
    for short in vmha_engine::admission::below_reserve(s, k, now) {
        out.push(format!("BELOW THE {k}-HOST RESERVE: {}", short.shortfall()));
    }
    for vm in s.vms.values().filter(|v| v.protected) {
        if let Some(o) = &vm.admission_override {
            out.push(format!("{} was protected with --force beyond the host reserve by {o}", vm.name));
        }
        if let Some(evidence) = &vm.guest_care.alarm {
            out.push(format!(
                "{} HANGS and its reset budget is spent ({}): {evidence}; vmha leaves it as it is on {} until the \
                 window has room (`vmha vm show {}`, `vmha events`)",
                vm.name,
                vmha_engine::guest_reset::resets_summary(&s.policy, &vm.guest_care, now),
                vm.host.as_deref().unwrap_or("its host"),
                vm.name
            ));
        }
    }
    if s.policy.accept_no_watchdog {
        out.push(
            "this controller runs with --accept-no-watchdog: a host without a working watchdog is declared dead \
             on its lease alone, and a killed or hung agent there can leave a second copy of its VMs running"
                .into(),
        );
    }
    for h in s.hosts.values().filter(|h| h.fencing == FencingMode::SelfFence && !h.watchdog.works()) {
        let why = match &h.watchdog {
            Watchdog::Missing(why) => why.as_str(),
            _ => "not reported yet",
        };
        let then = if s.policy.accept_no_watchdog {
            "its VMs are restarted elsewhere on its lease alone (--accept-no-watchdog)".to_string()
        } else {
            format!("if it fails, its VMs wait for `vmha host confirm-down {}`", h.name)
        };
        out.push(format!("{} has no working watchdog ({why}): {then}", h.name));
    }
    for h in s.hosts.values().filter(|h| h.self_fenced) {
        out.insert(
            0,
            format!(
                "{} SELF-FENCED: its agent destroyed its protected VMs (its lease ran out with no proof that the \
                 leader lacked quorum); the agent's log on {} says why",
                h.name, h.name
            ),
        );
    }
    for vm in s.vms.values() {
        if let Some(locked) = vm.recovery.as_ref().and_then(|r| r.disk_locked.as_ref()) {
            out.insert(
                0,
                format!(
                    "{}: DISK LOCKED, another copy may run (last seen on {}); vmha starts it nowhere else until \
                     the lock is gone",
                    vm.name, locked.last_seen
                ),
            );
        }
        if let (Some(second), Some(placed)) = (&vm.second_copy, &vm.host) {
            out.insert(
                0,
                format!(
                    "{} RUNS ON TWO HOSTS: {placed} (placed by vmha) and {}; the copy on {} is being destroyed",
                    vm.name, second.host, second.host
                ),
            );
        }
    }
    out
}

pub fn drain(host: &str, d: &Drain) -> pb::DrainPlan {
    pb::DrainPlan {
        host: host.into(),
        state: d.state.as_str().into(),
        message: d.message.clone(),
        steps: d.steps.iter().map(drain_step).collect(),
        warnings: Vec::new(),
    }
}

pub fn drain_step(s: &DrainStep) -> pb::DrainStep {
    let (target, error) = match &s.state {
        StepState::Migrating { target }
        | StepState::Migrated { target }
        | StepState::Restarting { target }
        | StepState::Restarted { target } => (target.clone(), String::new()),
        StepState::Failed { error } => (s.planned.clone().unwrap_or_default(), error.clone()),
        StepState::Stuck { reason } => (String::new(), reason.clone()),
        StepState::Pending => (s.planned.clone().unwrap_or_default(), String::new()),
    };
    pb::DrainStep {
        vm: s.vm_name.clone(),
        target,
        why: s.why.clone(),
        state: s.state.as_str().into(),
        operation_id: String::new(),
        error,
        protected: s.protected,
    }
}

pub fn vm(s: &ClusterState, v: &VmView, now: Millis) -> pb::Vm {
    pb::Vm {
        uuid: v.uuid.clone(),
        name: v.name.clone(),
        host: v.host.clone().unwrap_or_default(),
        state: v.state.as_str().into(),
        memory_mib: v.memory_kib / 1024,
        vcpus: v.vcpus,
        protected: v.protected,
        priority: v.priority,
        anti_affinity: v.anti_affinity.clone().unwrap_or_default(),
        allowed_hosts: v.allowed_hosts.clone(),
        preferred_host: v.preferred_host.clone().unwrap_or_default(),
        admission_override: v.admission_override.clone().unwrap_or_default(),
        failback_waits: failback_waits(s, v, now),
        stopped_by: v.stopped_by.clone().unwrap_or_default(),
        elsewhere: Vec::new(),
        guest: s.guests.get(&v.uuid).map(|g| g.describe(now)).unwrap_or_default(),
        guest_resets: vmha_engine::guest_reset::resets_summary(&s.policy, &v.guest_care, now),
        guest_alarm: v.guest_care.alarm.clone().unwrap_or_default(),
        probes: vmha_engine::service_probe::status(
            &v.probes,
            s.guests.get(&v.uuid).map_or(&[][..], |g| &g.probes[..]),
        ),
        probe_specs: v.probes.iter().map(crate::service_probes::to_api).collect(),
        why_not_running: if v.protected || v.stopped_by.is_some() {
            explain(s, &v.uuid, now).unwrap_or_default()
        } else {
            String::new()
        },
    }
}

/// An operation in flight as the API shows it (the store's row once it ended: `operation`).
pub fn operation_in_flight(op: &vmha_engine::operation::Operation, epoch: u64) -> pb::Operation {
    pb::Operation {
        id: op.id.to_string(),
        kind: op.kind.as_str().into(),
        vm: op.vm_name.clone(),
        vm_uuid: op.vm_uuid.clone(),
        source: op.source.clone(),
        target: op.target.clone(),
        state: op.state.as_str().into(),
        error: op.error.clone(),
        elapsed_ms: op.done.elapsed_ms,
        downtime_ms: op.done.downtime_ms,
        bytes: op.done.bytes,
        epoch,
        created_at: chrono::Utc::now().to_rfc3339(),
        ..Default::default()
    }
}

pub fn operation(o: &OperationRow) -> pb::Operation {
    pb::Operation {
        id: o.id.to_string(),
        kind: o.kind.clone(),
        vm: o.vm_name.clone(),
        vm_uuid: o.vm_uuid.to_string(),
        source: o.source.clone(),
        target: o.target.clone(),
        state: o.state.clone(),
        data_total: o.data_total as u64,
        data_processed: o.data_processed as u64,
        data_remaining: o.data_remaining as u64,
        elapsed_ms: o.elapsed_ms as u64,
        downtime_ms: o.downtime_ms as u64,
        bytes: o.bytes as u64,
        error: o.error.clone(),
        epoch: o.epoch as u64,
        created_at: o.created_at.to_rfc3339(),
    }
}

pub fn event(e: &EventRow) -> pb::Event {
    pb::Event {
        id: e.id,
        at: e.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        subject_kind: e.subject_kind.clone(),
        subject: e.subject.clone(),
        kind: e.kind.clone(),
        message: e.message.clone(),
        actor: e.actor.clone(),
    }
}

pub fn what_if(w: &vmha_engine::admission::WhatIf) -> pb::WhatIf {
    pb::WhatIf {
        lost: w.lost.clone(),
        restarts: (w.restarts.iter())
            .map(|(vm, r)| pb::PlannedRestart {
                vm: vm.clone(),
                target: r.clone().unwrap_or_default(),
                why_nowhere: r.as_ref().err().map(ToString::to_string).unwrap_or_default(),
            })
            .collect(),
        headroom: (w.headroom.iter())
            .map(|(host, kib)| pb::Headroom { host: host.clone(), memory_left_mib: kib / 1024 })
            .collect(),
        covered: w.covered(),
    }
}

/// Why failback leaves `v` where it is; computed only for a VM away from its preferred host.
fn failback_waits(s: &ClusterState, v: &VmView, now: Millis) -> String {
    if v.preferred_host.is_none() || v.preferred_host == v.host {
        return String::new();
    }
    let busy = s.vms.values().find_map(|o| o.busy_with.as_deref());
    match vmha_engine::recovery::failback(s, &std::cell::OnceCell::new(), v, busy, now) {
        Some(Err(why)) => why.to_string(),
        _ => String::new(),
    }
}

/// `vmha report`: each protected VM's availability over `[from, to)`, from its outages; a VM
/// protected later (`protected_at`, ms since the epoch) counts from then.
pub fn report(
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
    mut vms: Vec<(String, String)>,
    outages: &[(String, Outage)],
    protected_at: &std::collections::HashMap<String, i64>,
) -> pb::ReportReply {
    vms.sort_by(|a, b| a.1.cmp(&b.1));
    let mut by_vm: std::collections::HashMap<&str, Vec<Outage>> = std::collections::HashMap::new();
    for (uuid, o) in outages {
        by_vm.entry(uuid.as_str()).or_default().push(*o);
    }
    let secs = |ms: u64| ms as f64 / 1000.0;
    let rows = vms
        .into_iter()
        .map(|(uuid, name)| {
            let mine = by_vm.get(uuid.as_str()).map_or(&[][..], Vec::as_slice);
            let since = protected_at.get(&uuid).copied().filter(|&p| p > from.timestamp_millis());
            let start = since.unwrap_or(from.timestamp_millis()).min(to.timestamp_millis());
            let a = availability::summarize(start, to.timestamp_millis(), mine);
            pb::VmAvailability {
                vm: name,
                uuid,
                availability_pct: a.availability * 100.0,
                nines: availability::nines(a.availability),
                outages: a.outages,
                unplanned_downtime_s: secs(a.unplanned_ms),
                planned_outages: a.planned_outages,
                planned_downtime_s: secs(a.planned_ms),
                mtbf_s: a.mtbf_ms.map(secs),
                mttr_s: a.mttr_ms.map(secs),
                longest_outage_s: secs(a.longest_ms),
                uptime_s: secs(a.uptime_ms),
                down_now: a.down_now,
                protected_since: since
                    .and_then(chrono::DateTime::from_timestamp_millis)
                    .map_or_else(String::new, |t| t.to_rfc3339()),
            }
        })
        .collect();
    pb::ReportReply { from: from.to_rfc3339(), to: to.to_rfc3339(), vms: rows }
}

/// For `vmha vm show`: each other host, and why it does not run the VM (what it lacks), or
/// that it could take it. Only for one VM at a time: it sums the cluster's usage.
pub fn elsewhere(s: &ClusterState, v: &VmView, now: Millis) -> Vec<String> {
    let usage = vmha_engine::placement::Usage::of(s);
    (s.hosts.keys())
        .filter(|h| v.host.as_deref() != Some(h.as_str()))
        .map(|h| match vmha_engine::placement::why_not(s, &usage, v, h, now) {
            Some(why) => why,
            None => format!(
                "{h}: could take it (vmha moves a running VM only when asked, by a drain or by failback)"
            ),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn certificates_are_warned_of_a_month_before_and_alarmed_a_week_before() {
        let day = 86_400;
        let now = 1_800_000_000;
        let hosts = [
            ("kvm1".to_string(), now + 90 * day),
            ("kvm2".to_string(), now + 20 * day),
            ("kvm3".to_string(), now + 3 * day + 60),
            ("kvm4".to_string(), now - 60),
        ];
        let w = certificate_warnings(&hosts, now);
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(w[0].starts_with("host kvm2's certificate expires in 20 days (2027-02-04 "), "{}", w[0]);
        assert!(w[1].starts_with("CERTIFICATE EXPIRES IN 3 DAYS: host kvm3's"), "{}", w[1]);
        assert!(w[1].contains("kvm3 loses its lease and self-fences"), "{}", w[1]);
        assert!(w[2].starts_with("CERTIFICATE EXPIRED: host kvm4's certificate expired at"), "{}", w[2]);
        assert!(w.iter().all(|w| w.contains("vmha ca renew-all")));
    }

    /// A VM protected a day before the end of a 30-day window, down for an hour since, is
    /// 95.8% available, not 99.86%: its figures count from its protection.
    #[test]
    fn a_vm_protected_within_the_window_is_counted_from_then() {
        const H: i64 = 3_600_000;
        let to = chrono::DateTime::from_timestamp_millis(1_800_000_000_000).unwrap();
        let from = to - chrono::Duration::days(30);
        let late = to.timestamp_millis() - 24 * H;
        let outage = Outage { start: late + 2 * H, end: Some(late + 3 * H), planned: false };
        let vms = vec![("a".to_string(), "dns1".to_string()), ("b".to_string(), "dns2".to_string())];
        let outages = vec![("a".to_string(), outage), ("b".to_string(), outage)];
        // dns2's protection predates the window: counted over all of it.
        let protected_at =
            HashMap::from([("a".to_string(), late), ("b".to_string(), from.timestamp_millis() - H)]);
        let r = report(from, to, vms, &outages, &protected_at);
        let (dns1, dns2) = (&r.vms[0], &r.vms[1]);
        assert!((dns1.availability_pct - 100.0 * 23.0 / 24.0).abs() < 1e-9, "{dns1:?}");
        assert_eq!(dns1.uptime_s, 23.0 * 3600.0);
        assert_eq!(dns1.protected_since, chrono::DateTime::from_timestamp_millis(late).unwrap().to_rfc3339());
        assert!((dns2.availability_pct - 100.0 * (719.0 / 720.0)).abs() < 1e-9, "{dns2:?}");
        assert_eq!(dns2.protected_since, "");
    }
}
