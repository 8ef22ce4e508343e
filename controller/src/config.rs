//! The controller's flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// vmha controller: keeps desired VM placement in PostgreSQL, serves the operator API used by
/// `vmha`, and sends commands to the node agents.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Flags {
    /// Log lines as text (for journalctl: colour only on a terminal) or JSON (for log
    /// shippers). Levels: RUST_LOG.
    #[arg(long, value_enum, env = "VMHA_LOG_FORMAT", default_value = "text")]
    pub log_format: vmha_logging::LogFormat,
    /// Serve Prometheus metrics on http://ADDR/metrics and the read-only status page on
    /// http://ADDR/ (plaintext; off unless given), e.g. 127.0.0.1:9740.
    #[arg(long, env = "VMHA_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Address to serve agents and operators on.
    #[arg(long, env = "VMHA_LISTEN", default_value = "0.0.0.0:7400")]
    pub listen: SocketAddr,
    /// Where agents and operators reach this controller, as the other controllers tell them
    /// (run several on one database: one leads, the others stand by and name the leader)
    /// [default: https://HOSTNAME:PORT of --listen, or its address when it is not 0.0.0.0].
    #[arg(long, env = "VMHA_ADVERTISE", value_name = "URL")]
    pub advertise: Option<String>,
    /// This controller's name among the controllers [default: the name in its certificate,
    /// or the host name with --insecure-dev].
    #[arg(long, env = "VMHA_NAME")]
    pub name: Option<String>,
    /// The cluster CA's certificate (`vmha ca init`): agents and operators must present a
    /// certificate it issued, and the role in it decides what they may do.
    #[arg(long, env = "VMHA_TLS_CA", default_value = "/etc/vmha/pki/ca.pem", value_name = "PATH")]
    pub tls_ca: std::path::PathBuf,
    /// This controller's certificate, from `vmha ca issue controller NAME`. Renewed in place,
    /// it is reloaded on SIGHUP (`systemctl reload vmha-controller`).
    #[arg(long, env = "VMHA_TLS_CERT", value_name = "PATH", required_unless_present = "insecure_dev")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// This controller's private key (written 0600 by `vmha ca issue`).
    #[arg(long, env = "VMHA_TLS_KEY", value_name = "PATH", required_unless_present = "insecure_dev")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Development only: serve plaintext and check nobody. Any process that reaches the port can
    /// then speak for any host or operator (and make the controller start a second copy of a
    /// VM). `vmha status` says so loudly.
    #[arg(long)]
    pub insecure_dev: bool,
    /// PostgreSQL URL, e.g. postgres://vmha:PASSWORD@db.example.net/vmha.
    #[arg(long, env = "VMHA_DATABASE_URL")]
    pub database_url: String,
    /// Expected interval between an agent's heartbeats.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// How long a heartbeat keeps a host counted as alive.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// Live migrations still running after this long are aborted; the VM stays on its source.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub migration_timeout: Duration,
    /// Bandwidth cap for live migrations in MiB/s (0: none).
    #[arg(long, default_value_t = 0)]
    pub migration_bandwidth: u64,
    /// How long after its lease expired a host may be declared dead (self-fencing hosts).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub fence_margin: Duration,
    /// Time kept back from the fence margin for an agent's last peer poll, its destroy and a
    /// watchdog reset [default: half the fence margin, at most 500ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub guard: Option<Duration>,
    /// Longest a heartbeat may spend in flight and still earn a lease.
    #[arg(long, default_value = "150ms", value_parser = humantime::parse_duration)]
    pub max_transit: Duration,
    /// Command that powers a host off (fencing mode `external`), called with the host name;
    /// exit 0 means confirmed off.
    #[arg(long)]
    pub fence_command: Option<std::path::PathBuf>,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub fence_timeout: Duration,
    /// A failed restart after a host failure is retried on another host this many times.
    #[arg(long, default_value_t = 2)]
    pub max_relocate: u32,
    /// Move VMs back to their preferred host (`vmha protect --prefer`) once it has been healthy
    /// this long, by live migration; off unless given.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub failback_after: Option<Duration>,
    /// Restarts in flight at once after a host failure.
    #[arg(long, default_value_t = 4)]
    pub max_parallel_starts: usize,
    /// Admission control (N+k): `vmha protect` is refused (unless --force) when losing the VM's
    /// host and the K-1 others that run the most protected memory would leave a protected VM
    /// with nowhere to restart, and `vmha status` warns while the cluster is short. 0: no check.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub reserve_hosts: usize,
    /// Let a live migration that does not converge switch to post-copy (the guest runs on the
    /// target while the rest of its memory follows; a network failure then loses the guest).
    #[arg(long)]
    pub postcopy: bool,
    /// Longest pause of the guest at the end of a live migration, in ms (0: libvirt's default).
    #[arg(long, default_value_t = 0)]
    pub max_downtime_ms: u64,
    /// Live migrations at once from one host, and in the whole cluster.
    #[arg(long, default_value_t = 2)]
    pub migrations_per_host: usize,
    #[arg(long, default_value_t = 4)]
    pub migrations_per_cluster: usize,
    /// A host whose health probes fail this long is degraded: its VMs are moved away.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub degraded_after: Duration,
    /// A degraded host whose probes pass this long is healthy again.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub recover_after: Duration,
    /// A protected guest whose qemu-guest-agent answered, then stays silent this long with no
    /// disk or network I/O of its own, is hung and reset in place (vSphere's "high"
    /// sensitivity is 30 s). A guest without the agent is never judged by pings.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub guest_failure_interval: Duration,
    /// How long a guest vmha reset has to answer again; if it does not, the next reset is a
    /// destroy and start on the same host.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub guest_boot_grace: Duration,
    /// Resets in place per VM within --guest-reset-window; past them vmha raises an alarm and
    /// leaves the guest as it is (0: never reset a guest).
    #[arg(long, default_value_t = 3)]
    pub guest_resets: u32,
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub guest_reset_window: Duration,
    /// Declare self-fencing hosts that report no working watchdog dead on their lease alone,
    /// as if they had one. A killed or hung agent on such a host can then leave a second copy
    /// of its VMs running; `vmha status` says so while this is on.
    #[arg(long)]
    pub accept_no_watchdog: bool,
    /// Lead even when PostgreSQL streams to replicas asynchronously. By default no controller
    /// leads then: a failover of PostgreSQL to such a replica could lose the newest epoch (two
    /// leaders with one epoch) or a recorded restart. Only when no replica is ever promoted.
    #[arg(long, env = "VMHA_ALLOW_ASYNC_REPLICATION")]
    pub allow_async_replication: bool,
    /// A directory on storage every host mounts at the same path (repeatable, or ':'-separated
    /// in the variable). The domain XML agents report is what the controller defines on
    /// another host when a VM's host dies, so it is checked first: a file disk, a filesystem's
    /// directory, a kernel or initrd must lie under one of these (paths compared normalised,
    /// '..' refused). With none configured, every definition with a file disk is refused and
    /// such VMs cannot be restarted elsewhere. A refused definition is not kept; the host's
    /// heartbeat goes on and `vmha events` says why (definition_refused).
    #[arg(long = "shared-storage", value_name = "DIR", env = "VMHA_SHARED_STORAGE", value_delimiter = ':')]
    pub shared_storage: Vec<PathBuf>,
    /// A block device a definition may use as a disk (repeatable, ':'-separated in the
    /// variable); a `<disk type='block'>` of any other device is refused. Name it by a path
    /// that is the same device on every host (/dev/disk/by-id/..., a multipath or LVM name).
    #[arg(
        long = "allow-block-device",
        value_name = "PATH",
        env = "VMHA_ALLOW_BLOCK_DEVICE",
        value_delimiter = ':'
    )]
    pub allow_block_device: Vec<PathBuf>,
    /// Accept `<disk type='network'>` (Ceph RBD, iSCSI, NBD, ...) in definitions; refused
    /// unless given.
    #[arg(long, env = "VMHA_ALLOW_NETWORK_DISKS")]
    pub allow_network_disks: bool,
    /// An emulator a definition may name, besides /usr/bin/qemu-system-x86_64, /usr/bin/kvm
    /// and /usr/libexec/qemu-kvm (repeatable).
    #[arg(long = "allow-emulator", value_name = "PATH", env = "VMHA_ALLOW_EMULATOR", value_delimiter = ':')]
    pub allow_emulator: Vec<PathBuf>,
    /// A directory a definition's firmware (`<loader>`, an NVRAM template) may come from,
    /// besides the shared storage and /usr/share/{OVMF,edk2,AAVMF,qemu,seabios} (repeatable).
    /// An `<nvram>` may be under the shared storage or /var/lib/libvirt/qemu/nvram.
    #[arg(long = "firmware-dir", value_name = "DIR", env = "VMHA_FIRMWARE_DIR", value_delimiter = ':')]
    pub firmware_dir: Vec<PathBuf>,
    /// Hosts the cluster admits: a host registering for the first time beyond this many is
    /// refused (hosts already known always come back).
    #[arg(long, env = "VMHA_MAX_HOSTS", default_value_t = 2000)]
    pub max_hosts: usize,
    /// VMs one host's reports may add to the inventory per minute; more are added from its
    /// later reports (VMs already known, protected ones included, are never held back).
    #[arg(long, env = "VMHA_NEW_VMS_PER_MINUTE", default_value_t = 600, value_parser = clap::value_parser!(u32).range(1..))]
    pub new_vms_per_minute: u32,
    /// Turn off libvirt's auto-converge (throttling a guest that dirties memory faster than
    /// the network can copy it).
    #[arg(long)]
    pub no_auto_converge: bool,
}
