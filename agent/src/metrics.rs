//! The agent's Prometheus metrics (`--metrics-listen`): its lease (read from the lease state
//! machine at each scrape), watchdog feeds, the health probes' verdicts, how long each
//! libvirt call takes (`Timed`, around the hypervisor), and its open files against their limit
//! (sampled by `fd_limit::watch`). Names follow Prometheus' conventions
//! (`vmha_agent_` prefix, seconds, `_total` counters); labels come from fixed sets: the
//! hypervisor's calls, the probes this host's configuration names, feed results.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use vmha_proto::v1::{Domain, HostFacts};

use crate::hypervisor::{Hypervisor, HypervisorError, JobProgress, MigrateOptions, MigrationStats};
use crate::lease::LeaseShell;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabel {
    probe: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    call: &'static str,
    result: &'static str,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

pub struct Metrics {
    registry: Registry,
    lease_remaining: FloatGauge,
    lease_held: Gauge,
    self_fenced: Gauge,
    watchdog_feeds: Family<ResultLabel, Counter>,
    probe_ok: Family<ProbeLabel, Gauge>,
    probe_failures: Family<ProbeLabel, Counter>,
    libvirt_seconds: Family<CallLabels, Histogram>,
    open_files: Gauge,
    open_files_limit: Gauge,
}

/// The process' metrics: one registry, as a process has one `/metrics`.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vmha_agent");
        let m = Metrics {
            lease_remaining: FloatGauge::default(),
            lease_held: Gauge::default(),
            self_fenced: Gauge::default(),
            watchdog_feeds: Family::default(),
            probe_ok: Family::default(),
            probe_failures: Family::default(),
            // 1 ms to about 4 minutes: a domain listing to a live migration.
            libvirt_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.5, 14))
            }),
            open_files: Gauge::default(),
            open_files_limit: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "lease_remaining_seconds",
            "Seconds left on this host's lease (negative: lapsed that long ago)",
            m.lease_remaining.clone(),
        );
        registry.register(
            "lease_held",
            "1 while this host holds a lease (may start VMs)",
            m.lease_held.clone(),
        );
        registry.register(
            "self_fenced",
            "1 while this agent has self-fenced (its protected VMs destroyed, none started)",
            m.self_fenced.clone(),
        );
        registry.register("watchdog_feeds", "Watchdog feeds, by result", m.watchdog_feeds.clone());
        registry.register(
            "probe_ok",
            "Each health probe's latest verdict (1 ok, 0 failing)",
            m.probe_ok.clone(),
        );
        registry.register("probe_failures", "Failing runs of each health probe", m.probe_failures.clone());
        registry.register(
            "libvirt_call_duration_seconds",
            "How long libvirt calls take, by call and result",
            m.libvirt_seconds.clone(),
        );
        registry.register("open_files", "File descriptors this agent holds open", m.open_files.clone());
        registry.register(
            "open_files_limit",
            "The soft limit on this agent's open files (RLIMIT_NOFILE; -1 if unlimited)",
            m.open_files_limit.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn open_files(&self, open: u64, limit: crate::fd_limit::Limit) {
        self.open_files.set(i64::try_from(open).unwrap_or(i64::MAX));
        self.open_files_limit.set(match limit {
            crate::fd_limit::Limit::Finite(n) => i64::try_from(n).unwrap_or(i64::MAX),
            crate::fd_limit::Limit::Unlimited => -1,
        });
    }

    pub fn watchdog_fed(&self, ok: bool) {
        self.watchdog_feeds.get_or_create(&ResultLabel { result: if ok { "ok" } else { "error" } }).inc();
    }

    pub fn probe(&self, name: &str, ok: bool) {
        let label = ProbeLabel { probe: name.to_string() };
        self.probe_ok.get_or_create(&label).set(i64::from(ok));
        if !ok {
            self.probe_failures.get_or_create(&label).inc();
        }
    }

    fn libvirt_call(&self, call: &'static str, ok: bool, took: Instant) {
        let labels = CallLabels { call, result: if ok { "ok" } else { "error" } };
        self.libvirt_seconds.get_or_create(&labels).observe(took.elapsed().as_secs_f64());
    }

    /// The exposition text, with the lease read now.
    pub fn render(&self, lease: &LeaseShell) -> String {
        let remaining = lease.lease_remaining_ms();
        self.lease_remaining.set(remaining.map_or(0.0, |ms| ms as f64 / 1000.0));
        self.lease_held.set(i64::from(lease.may_start().is_ok()));
        self.self_fenced.set(i64::from(lease.self_fenced()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// Why `/metrics` is not served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot serve metrics on {addr}: {source}; give --metrics-listen (metrics_listen) a free address"
    )]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("serving metrics on {addr} failed: {source}")]
    Serve { addr: SocketAddr, source: std::io::Error },
}

/// Serves `/metrics` on `addr` for the life of the process.
pub async fn serve(addr: SocketAddr, lease: Arc<LeaseShell>) -> Result<(), MetricsError> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let lease = lease.clone();
            async move {
                (
                    [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    METRICS.render(&lease),
                )
            }
        }),
    );
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })?;
    tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    axum::serve(listener, app).await.map_err(|source| MetricsError::Serve { addr, source })
}

/// A hypervisor whose every call is timed into `vmha_agent_libvirt_call_duration_seconds`.
pub struct Timed<H>(pub H);

impl<H: Hypervisor> Timed<H> {
    fn timed<T>(
        &self,
        call: &'static str,
        f: impl FnOnce(&H) -> Result<T, HypervisorError>,
    ) -> Result<T, HypervisorError> {
        let start = Instant::now();
        let r = f(&self.0);
        METRICS.libvirt_call(call, r.is_ok(), start);
        r
    }
}

impl<H: Hypervisor> Hypervisor for Timed<H> {
    fn host_facts(&self) -> Result<HostFacts, HypervisorError> {
        self.timed("host_facts", |h| h.host_facts())
    }

    fn domains(&self) -> Result<Vec<Domain>, HypervisorError> {
        self.timed("domains", |h| h.domains())
    }

    fn define_and_start(&self, xml: &str) -> Result<String, HypervisorError> {
        self.timed("define_and_start", |h| h.define_and_start(xml))
    }

    fn shutdown(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.timed("shutdown", |h| h.shutdown(uuid))
    }

    fn destroy(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.timed("destroy", |h| h.destroy(uuid))
    }

    fn reset(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.timed("reset", |h| h.reset(uuid))
    }

    fn start_defined(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.timed("start_defined", |h| h.start_defined(uuid))
    }

    fn abort_job(&self, uuid: &str) -> Result<(), HypervisorError> {
        self.timed("abort_job", |h| h.abort_job(uuid))
    }

    fn migrate(
        &self,
        uuid: &str,
        opts: &MigrateOptions,
        progress: &(dyn Fn(JobProgress) + Sync),
    ) -> Result<MigrationStats, HypervisorError> {
        self.timed("migrate", |h| h.migrate(uuid, opts, progress))
    }

    fn guest_look(&self, uuid: &str) -> Result<Option<crate::hypervisor::GuestLook>, HypervisorError> {
        self.timed("guest_look", |h| h.guest_look(uuid))
    }

    fn guest_ping(&self, uuid: &str, timeout: std::time::Duration) -> bool {
        let start = std::time::Instant::now();
        let answered = self.0.guest_ping(uuid, timeout);
        METRICS.libvirt_call("guest_ping", answered, start);
        answered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::fake::FakeHypervisor;

    #[test]
    fn libvirt_calls_are_timed_by_call_and_result() {
        let hv = Timed(FakeHypervisor::default());
        hv.domains().unwrap();
        assert!(hv.destroy("no-such-uuid").is_err());
        let lease = LeaseShell::new("kvm1", vmha_engine::Timings::default(), None);
        METRICS.probe("memory", true);
        METRICS.probe("check:raid", false);
        METRICS.open_files(900, crate::fd_limit::Limit::Finite(65536));
        let text = METRICS.render(&lease);
        let has = |line: &str| text.lines().any(|l| l.starts_with(line));
        assert!(
            has(r#"vmha_agent_libvirt_call_duration_seconds_count{call="domains",result="ok"} 1"#),
            "{text}"
        );
        assert!(has(r#"vmha_agent_libvirt_call_duration_seconds_count{call="destroy",result="error"} 1"#));
        assert!(
            has(r#"vmha_agent_probe_ok{probe="memory"} 1"#)
                && has(r#"vmha_agent_probe_ok{probe="check:raid"} 0"#)
        );
        assert!(has(r#"vmha_agent_probe_failures_total{probe="check:raid"} 1"#));
        assert!(has("vmha_agent_open_files 900") && has("vmha_agent_open_files_limit 65536"), "{text}");
        // No lease yet: none held, nothing left.
        assert!(has("vmha_agent_lease_held 0") && has("vmha_agent_lease_remaining_seconds 0.0"), "{text}");
    }
}
