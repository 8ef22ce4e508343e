//! Prometheus metrics (`--metrics-listen`): what the cluster looks like now, read from the
//! leader's state at each scrape (hosts, VMs, protected VMs not running, quorum, epoch, each
//! host's heartbeat age), and what happened since this process started, counted as it happens
//! (operations by kind and result, migration time and downtime, failover time from a host's
//! last heartbeat to its VM running again). Names and labels follow Prometheus' conventions:
//! `vmha_` prefix, seconds, `_total` counters; labels take their values from fixed sets (a
//! host's name aside, which the cluster bounds).

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use vmha_engine::availability::OutageMark;
use vmha_engine::event::{Event, EventKind, Subject};
use vmha_engine::operation::{OpKind, OpState, Operation};
use vmha_engine::{ClusterState, Millis, RunState};

use crate::node::Node;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    state: &'static str,
    admin_state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GuestLabels {
    vm: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabel {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FenceLabels {
    mode: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatabaseLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    kind: &'static str,
    result: &'static str,
}

/// Every metric of this process.
pub struct Metrics {
    registry: Registry,
    hosts: Family<HostLabels, Gauge>,
    vms: Family<StateLabel, Gauge>,
    protected_not_running: Gauge,
    leader: Gauge,
    epoch: Gauge,
    quorum: Gauge,
    heartbeat_age: Family<HostLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    lease_remaining: Family<HostLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    cert_expiry: Family<HostLabel, Gauge>,
    guests: Family<GuestLabels, Gauge>,
    guest_resets: Family<VmLabel, Gauge>,
    guest_alarms: Family<VmLabel, Gauge>,
    operations: Family<OpLabels, Counter>,
    migration_seconds: Histogram,
    migration_downtime_seconds: Histogram,
    failover_seconds: Histogram,
    write_lag_seconds: Histogram,
    heartbeat_transit_seconds: Histogram,
    heartbeat_wait_seconds: Histogram,
    fence_actions: Family<FenceLabels, Counter>,
    database_errors: Family<DatabaseLabel, Counter>,
    /// Unplanned outages open, by VM: when they began (for the failover time).
    down_since: Mutex<HashMap<String, Instant>>,
}

/// The process' metrics: one registry, as a process has one `/metrics`.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vmha");
        let m = Metrics {
            hosts: Family::default(),
            vms: Family::default(),
            protected_not_running: Gauge::default(),
            leader: Gauge::default(),
            epoch: Gauge::default(),
            quorum: Gauge::default(),
            heartbeat_age: Family::default(),
            lease_remaining: Family::default(),
            cert_expiry: Family::default(),
            guests: Family::default(),
            guest_resets: Family::default(),
            guest_alarms: Family::default(),
            operations: Family::default(),
            migration_seconds: Histogram::new(exponential_buckets(0.5, 2.0, 10)),
            migration_downtime_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            failover_seconds: Histogram::new(exponential_buckets(1.0, 1.5, 12)),
            write_lag_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            heartbeat_transit_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 12)),
            heartbeat_wait_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            fence_actions: Family::default(),
            database_errors: Family::default(),
            down_since: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register("hosts", "Hosts by liveness and admin state", m.hosts.clone());
        registry.register("vms", "VMs by state", m.vms.clone());
        registry.register(
            "protected_vms_not_running",
            "Protected VMs that do not run",
            m.protected_not_running.clone(),
        );
        registry.register("leader", "1 while this controller leads", m.leader.clone());
        registry.register("epoch", "The leader's epoch", m.epoch.clone());
        registry.register("quorum", "1 while the leader holds a majority of leases", m.quorum.clone());
        registry.register(
            "host_heartbeat_age_seconds",
            "Seconds since each host's last heartbeat",
            m.heartbeat_age.clone(),
        );
        registry.register(
            "host_certificate_expiry_timestamp_seconds",
            "When each registered host's certificate expires (Unix time): alert well before, since a host whose \
             certificate lapses loses its lease and self-fences",
            m.cert_expiry.clone(),
        );
        registry.register(
            "host_lease_remaining_seconds",
            "Seconds left on each host's lease as the leader counts it (negative: lapsed that long ago)",
            m.lease_remaining.clone(),
        );
        registry.register(
            "guest",
            "Each watched protected VM's guest, as its host's agent last saw it (1 for its state): answering, \
             waiting (booting, or no qemu-guest-agent inside yet), no_agent, silent (no I/O of its own: hung once \
             the failure interval has passed), busy (silent but working)",
            m.guests.clone(),
        );
        registry.register(
            "guest_resets_in_window",
            "Resets in place of each protected VM's hung guest within the budget's window",
            m.guest_resets.clone(),
        );
        registry.register(
            "guest_alarm",
            "1 while a protected VM's guest hangs with its reset budget spent: vmha no longer resets it",
            m.guest_alarms.clone(),
        );
        registry.register("operations", "Operations ended, by kind and result", m.operations.clone());
        registry.register(
            "migration_duration_seconds",
            "Live migrations that succeeded: how long they took",
            m.migration_seconds.clone(),
        );
        registry.register(
            "migration_downtime_seconds",
            "Live migrations that succeeded: the guest's pause",
            m.migration_downtime_seconds.clone(),
        );
        registry.register(
            "failover_seconds",
            "Unplanned outages of protected VMs: from the failure (a host's last heartbeat) to running again",
            m.failover_seconds.clone(),
        );
        registry.register(
            "database_write_lag_seconds",
            "Writes to PostgreSQL: from the change in the leader's memory to its commit. A takeover in \
             that window does not find the change (a host's acknowledged roster among them: see SAFETY.md 8d)",
            m.write_lag_seconds.clone(),
        );
        registry.register(
            "heartbeat_transit_seconds",
            "Heartbeats of this leader's agents: the bound on their time in flight (from the answer they echo \
             leaving to the heartbeat's arrival, less what the agent held it); over --max-transit, no lease",
            m.heartbeat_transit_seconds.clone(),
        );
        registry.register(
            "heartbeat_wait_seconds",
            "Heartbeats: from their arrival (stamped before the message is decoded) to their answer, the decision \
             loop's queue included",
            m.heartbeat_wait_seconds.clone(),
        );
        registry.register(
            "fence_actions",
            "Fencing: self (an agent destroyed its protected VMs: fenced; a host declared dead when its lease \
             lapsed: lease_lapsed), external (the fence command: succeeded, failed, timed_out), manual \
             (confirm-down: confirmed)",
            m.fence_actions.clone(),
        );
        registry.register(
            "database_errors",
            "PostgreSQL errors: unavailable (unreachable, retried) or refused (the query failed)",
            m.database_errors.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The fence command's verdict for a host.
    pub fn fence_command(&self, result: &'static str) {
        self.fence_actions.get_or_create(&FenceLabels { mode: "external", result }).inc();
    }

    /// An event of the engine's: some are fence actions.
    pub fn event(&self, s: &ClusterState, e: &Event) {
        let action = match (&e.kind, &e.subject) {
            (EventKind::SelfFenced, _) => ("self", "fenced"),
            (EventKind::ConfirmedDown, _) => ("manual", "confirmed"),
            (EventKind::HostDead, Subject::Host(h)) => match s.hosts.get(h) {
                Some(h) if h.dead.as_ref().is_some_and(|d| !d.proves_off()) => ("self", "lease_lapsed"),
                _ => return,
            },
            _ => return,
        };
        self.fence_actions.get_or_create(&FenceLabels { mode: action.0, result: action.1 }).inc();
    }

    /// A heartbeat spent at most `transit` in flight, and was answered `wait` after it arrived.
    pub fn heartbeat(&self, transit: Option<std::time::Duration>, wait: std::time::Duration) {
        if let Some(t) = transit {
            self.heartbeat_transit_seconds.observe(t.as_secs_f64());
        }
        self.heartbeat_wait_seconds.observe(wait.as_secs_f64());
    }

    /// A write committed `lag` after it was queued.
    pub fn write_lag(&self, lag: std::time::Duration) {
        self.write_lag_seconds.observe(lag.as_secs_f64());
    }

    pub fn database_error(&self, e: &crate::store::StoreError) {
        let kind = if e.is_unavailable() { "unavailable" } else { "refused" };
        self.database_errors.get_or_create(&DatabaseLabel { kind }).inc();
    }

    /// An operation ended.
    pub fn operation_ended(&self, op: &Operation) {
        let kind = op.kind.as_str();
        self.operations.get_or_create(&OpLabels { kind, result: op.state.as_str() }).inc();
        if op.kind == OpKind::Migrate && op.state == OpState::Succeeded && op.done.elapsed_ms > 0 {
            self.migration_seconds.observe(op.done.elapsed_ms as f64 / 1000.0);
            self.migration_downtime_seconds.observe(op.done.downtime_ms as f64 / 1000.0);
        }
    }

    /// An outage mark: an unplanned outage that ends is one failover.
    pub fn outage(&self, mark: &OutageMark) {
        let mut open = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        match mark {
            OutageMark::Began { vm_uuid, ago_ms, planned: false, .. } => {
                let since = Instant::now() - std::time::Duration::from_millis(*ago_ms);
                open.entry(vm_uuid.clone()).or_insert(since);
            }
            OutageMark::Ended { vm_uuid } => {
                if let Some(since) = open.remove(vm_uuid) {
                    self.failover_seconds.observe(since.elapsed().as_secs_f64());
                }
            }
            OutageMark::Began { .. } | OutageMark::Pause { .. } => {}
        }
    }

    /// The gauges, from the leader's state (`None`: this controller does not lead).
    fn set_state(&self, state: Option<(&ClusterState, Millis)>) {
        self.leader.set(i64::from(state.is_some()));
        self.hosts.clear();
        self.vms.clear();
        self.heartbeat_age.clear();
        self.lease_remaining.clear();
        self.guests.clear();
        self.guest_resets.clear();
        self.guest_alarms.clear();
        let Some((s, now)) = state else {
            self.protected_not_running.set(0);
            self.quorum.set(0);
            return;
        };
        self.epoch.set(s.epoch as i64);
        self.quorum.set(i64::from(vmha_engine::lease::has_quorum(s, now)));
        for h in s.hosts.values() {
            let labels =
                HostLabels { state: s.liveness(&h.name, now).as_str(), admin_state: h.admin.as_str() };
            self.hosts.get_or_create(&labels).inc();
            if let Some(t) = h.last_heartbeat {
                let age = now.since(t) as f64 / 1000.0;
                self.heartbeat_age.get_or_create(&HostLabel { host: h.name.clone() }).set(age);
            }
            if let Some(end) = h.lease.end(&s.timings) {
                let left = (end.0 as f64 - now.0 as f64) / 1000.0;
                self.lease_remaining.get_or_create(&HostLabel { host: h.name.clone() }).set(left);
            }
        }
        // One pass: this runs on the leader's decision loop at every scrape.
        let mut down = 0;
        for v in s.vms.values() {
            self.vms.get_or_create(&StateLabel { state: v.state.as_str() }).inc();
            down += i64::from(v.protected && v.state != RunState::Running);
            if !v.protected {
                continue;
            }
            if let Some(g) = s.guests.get(&v.uuid) {
                self.guests.get_or_create(&GuestLabels { vm: v.name.clone(), state: g.seen.as_str() }).set(1);
            }
            let care = &v.guest_care;
            let recent = vmha_engine::guest_reset::recent_resets(&s.policy, care, now).len();
            if recent > 0 {
                self.guest_resets.get_or_create(&VmLabel { vm: v.name.clone() }).set(recent as i64);
            }
            if care.alarm.is_some() {
                self.guest_alarms.get_or_create(&VmLabel { vm: v.name.clone() }).set(1);
            }
        }
        self.protected_not_running.set(down);
    }

    /// The exposition text, as `/metrics` serves it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// The exposition text of `/metrics`, with the gauges read from the leader's state now.
pub async fn scrape(node: &Node) -> String {
    METRICS.cert_expiry.clear();
    let state = match node.leader() {
        Ok(c) => {
            for (host, t) in c.host_cert_expiries() {
                METRICS.cert_expiry.get_or_create(&HostLabel { host }).set(t);
            }
            let now = c.now();
            c.read(move |s| METRICS.set_state(Some((s, now)))).await.ok()
        }
        Err(_) => None,
    };
    if state.is_none() {
        METRICS.set_state(None);
    }
    METRICS.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dashboard shipped in deploy/grafana queries only metrics this controller exports.
    #[test]
    fn the_grafana_dashboard_queries_only_exported_metrics() {
        // A family shows in the text once it has a member: a host, a VM, an operation.
        let mut s = ClusterState::default();
        let mut host = vmha_engine::HostView::new("kvm1");
        host.last_heartbeat = Some(Millis(0));
        host.lease.granted_at = Some(Millis(0));
        s.hosts.insert("kvm1".into(), host);
        let mut vm = vmha_engine::VmView::new("u", "dns1");
        vm.protected = true;
        vm.guest_care.resets = vec![Millis(0)];
        vm.guest_care.alarm = Some("guest agent silent for 10.0 s".into());
        s.vms.insert("u".into(), vm);
        let seen =
            vmha_engine::guest::GuestSeen::Silent { since_answer_ms: 10_000, missed: 5, quiet_ms: 9_000 };
        s.guests.insert(
            "u".into(),
            vmha_engine::guest::GuestReport { host: "kvm1".into(), seen, at: Millis(0), probes: Vec::new() },
        );
        let metrics = Metrics::new();
        metrics.set_state(Some((&s, Millis(0))));
        metrics.operations.get_or_create(&OpLabels { kind: "start", result: "succeeded" }).inc();
        metrics.fence_command("succeeded");
        metrics.database_error(&crate::store::StoreError::WriterStopped);
        // The agents' panels query what agents export.
        use vmha_agent::hypervisor::Hypervisor;
        vmha_agent::metrics::Timed(vmha_agent::hypervisor::fake::FakeHypervisor::default())
            .domains()
            .unwrap();
        vmha_agent::metrics::METRICS.probe("memory", true);
        vmha_agent::metrics::METRICS.watchdog_fed(true);
        let lease = vmha_agent::lease::LeaseShell::new("kvm1", vmha_engine::Timings::default(), None);
        let exported = metrics.render() + &vmha_agent::metrics::METRICS.render(&lease);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/vmha.json");
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut names = Vec::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                let mut rest = expr;
                while let Some(i) = rest.find("vmha_") {
                    let name: String =
                        rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    rest = &rest[i + name.len()..];
                    names.push(name);
                }
            }
        }
        assert!(names.len() >= 15, "{names:?}");
        for name in names {
            let base = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                exported.contains(&format!("# TYPE {base} ")),
                "the dashboard queries {name}, which is not exported"
            );
        }
    }

    /// Fence actions are counted by mode and result from the engine's events: a host declared
    /// dead on its lease, an agent's self-fence, a confirm-down; a death a fence device or an
    /// operator proved is not a lapsed lease.
    #[test]
    fn fence_actions_are_counted_by_mode_and_result() {
        let metrics = Metrics::new();
        let mut s = ClusterState::default();
        for (name, cause) in [
            ("kvm1", "no lease for 1.0 s".to_string()),
            ("kvm2", format!("ipmi {}", vmha_engine::Death::OFF)),
        ] {
            let mut h = vmha_engine::HostView::new(name);
            h.dead = Some(vmha_engine::Death { at: Millis(0), cause });
            s.hosts.insert(name.into(), h);
        }
        let host_event = |name: &str, kind| Event::host(name, kind, String::new());
        metrics.event(&s, &host_event("kvm1", EventKind::HostDead));
        metrics.event(&s, &host_event("kvm2", EventKind::HostDead));
        metrics.event(&s, &host_event("kvm1", EventKind::SelfFenced));
        metrics.event(&s, &host_event("kvm2", EventKind::ConfirmedDown));
        metrics.event(&s, &host_event("kvm2", EventKind::HostReturned));
        metrics.fence_command("timed_out");
        let text = metrics.render();
        for line in [
            r#"vmha_fence_actions_total{mode="self",result="lease_lapsed"} 1"#,
            r#"vmha_fence_actions_total{mode="self",result="fenced"} 1"#,
            r#"vmha_fence_actions_total{mode="manual",result="confirmed"} 1"#,
            r#"vmha_fence_actions_total{mode="external",result="timed_out"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert_eq!(text.matches("vmha_fence_actions_total{").count(), 4, "{text}");
    }
}
