//! The agent's only way to the hypervisor. Production uses libvirt ([`libvirt::Libvirt`]);
//! tests use [`fake::FakeHypervisor`]. Calls block: the async side runs them on
//! `spawn_blocking`.

pub mod fake;
mod jobstats;
pub mod libvirt;

use std::time::Duration;

use vmha_proto::v1::{Domain, HostFacts};

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot connect to libvirt at {uri}: {message}; is libvirtd running?")]
    Connect { uri: String, message: String },
    #[error("no domain with UUID {0} on this host")]
    NoSuchDomain(String),
    #[error("{op} failed for domain {domain}: {message}")]
    Domain { op: &'static str, domain: String, message: String },
    #[error("{op} failed: {message}")]
    Host { op: &'static str, message: String },
    #[error("migration of {domain} aborted after the {timeout:?} timeout; it still runs here")]
    MigrationTimedOut { domain: String, timeout: Duration },
}

/// How to live-migrate one domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrateOptions {
    /// The destination libvirtd as this host's libvirtd reaches it (peer-to-peer).
    pub dest_uri: String,
    pub auto_converge: bool,
    pub bandwidth_mib_s: Option<u64>,
    pub timeout: Option<Duration>,
    /// Switch to post-copy once half the timeout (or 10 s) has passed without converging.
    pub postcopy: bool,
    pub max_downtime_ms: Option<u64>,
}

/// A sample of a running migration job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobProgress {
    pub data_total: u64,
    pub data_processed: u64,
    pub data_remaining: u64,
    pub elapsed_ms: u64,
}

/// What a finished migration cost, from libvirt's completed-job statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrationStats {
    pub elapsed_ms: u64,
    pub downtime_ms: u64,
    pub bytes: u64,
}

/// What one look at a running guest found (`Hypervisor::guest_look`, and a ping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestCheck {
    /// libvirt's id of the running domain: a new one is a new QEMU process, a guest booted
    /// afresh, whose agent has not answered yet.
    pub instance: u32,
    pub ping: Ping,
    pub activity: Activity,
}

/// A running domain's counters, read without asking the guest anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestLook {
    pub instance: u32,
    /// Its definition has a guest agent channel.
    pub channel: bool,
    pub activity: Activity,
}

/// The guest agent's answer to `guest-ping`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ping {
    Answered,
    /// No answer in time, or nothing listening on the channel.
    Unanswered,
    /// The domain has no guest agent channel.
    NoChannel,
}

/// Counters that only move while a guest works. `io_ops` counts what the guest did itself
/// (disk requests, packets it sent), never packets sent to it: a dead guest still receives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    pub cpu_ns: u64,
    pub io_ops: u64,
}

pub trait Hypervisor: Send + Sync + 'static {
    fn host_facts(&self) -> Result<HostFacts, HypervisorError>;
    /// Every domain, running or only defined.
    fn domains(&self) -> Result<Vec<Domain>, HypervisorError>;
    /// Defines the domain persistently and starts it; returns its UUID.
    fn define_and_start(&self, xml: &str) -> Result<String, HypervisorError>;
    /// Asks the guest OS to shut down (ACPI); returns without waiting.
    fn shutdown(&self, uuid: &str) -> Result<(), HypervisorError>;
    /// Kills the QEMU process at once.
    fn destroy(&self, uuid: &str) -> Result<(), HypervisorError>;
    /// Resets the guest, as its reset button would: the same QEMU process, the guest reboots.
    fn reset(&self, uuid: &str) -> Result<(), HypervisorError>;
    /// Starts a domain defined here that does not run.
    fn start_defined(&self, uuid: &str) -> Result<(), HypervisorError>;
    /// Aborts the domain's job (a live migration in flight): the guest stays here.
    fn abort_job(&self, uuid: &str) -> Result<(), HypervisorError>;
    /// Live-migrates peer-to-peer, persistent on the destination, undefined here on success.
    /// Blocks until the migration ends, calling `progress` with job samples meanwhile.
    fn migrate(
        &self,
        uuid: &str,
        opts: &MigrateOptions,
        progress: &(dyn Fn(JobProgress) + Sync),
    ) -> Result<MigrationStats, HypervisorError>;
    /// A running domain's activity counters and whether it has a guest agent channel; `None`
    /// when it does not run here. Quick: it asks the guest nothing.
    fn guest_look(&self, uuid: &str) -> Result<Option<GuestLook>, HypervisorError>;
    /// Whether the domain's guest agent answers `guest-ping` within `timeout` (libvirt may
    /// take longer to give up on a guest agent that stopped answering).
    fn guest_ping(&self, uuid: &str, timeout: Duration) -> bool;
}
