//! The agent's settings: a TOML file (`--config`), overridden by flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::probes::{Check, ProbeConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// vmha node agent: reports this KVM host and its VMs to the vmha controller and carries out
/// the controller's commands (start, stop, live-migrate) through libvirt.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Flags {
    /// TOML config file; flags given on the command line win over its values.
    #[arg(long, env = "VMHA_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log lines as text (for journalctl: colour only on a terminal) or JSON (for log
    /// shippers). Levels: RUST_LOG.
    #[arg(long, value_enum, env = "VMHA_LOG_FORMAT", default_value = "text")]
    pub log_format: vmha_logging::LogFormat,
    /// This host's name in the cluster (default: the system hostname).
    #[arg(long)]
    pub host_name: Option<String>,
    /// libvirt URI of the local hypervisor [default: qemu:///system].
    #[arg(long)]
    pub libvirt_uri: Option<String>,
    /// libvirt URI that other hosts' libvirtd use to migrate VMs to this host, e.g.
    /// qemu+tls://kvm1.example.net/system.
    #[arg(long)]
    pub migration_uri: Option<String>,
    /// Controller endpoint, e.g. https://10.0.0.1:7400; repeat or comma-separate to list every
    /// controller. The agent follows the leader: a standby names it, and the others are tried
    /// in turn while none answers.
    #[arg(long = "controller", value_delimiter = ',')]
    pub controllers: Vec<String>,
    /// Watchdog device the agent arms and feeds only while its host may keep its VMs: if the
    /// agent dies or hangs, the host is reset before the controller may restart its VMs
    /// elsewhere [default: /dev/watchdog; `modprobe softdog` where there is no hardware one].
    #[arg(long, value_name = "PATH")]
    pub watchdog_device: Option<PathBuf>,
    /// Watchdog timeout; set on the device (WDIOC_SETTIMEOUT) when it takes it, assumed
    /// otherwise. Must fit the controller's timings (at most lease TTL + fence margin - 2
    /// heartbeat intervals - guard/2: 3.75 s with the defaults) [default: 3s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub watchdog_timeout: Option<Duration>,
    /// Run without a watchdog. The controller then never restarts this host's VMs elsewhere on
    /// its lease alone (a killed agent would leave them running): only after a fence device or
    /// `vmha host confirm-down`, unless it runs with --accept-no-watchdog.
    #[arg(long)]
    pub no_watchdog: bool,
    /// Directory for what the agent must remember across restarts (the protected VMs)
    /// [default: /var/lib/vmha-agent].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Address to answer peer agents' lease polls on [default: 0.0.0.0:7401].
    #[arg(long)]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// host:port peers use to reach this agent's poll endpoint [default: the host name and
    /// the --peer-listen port].
    #[arg(long)]
    pub peer_address: Option<String>,
    /// Serve Prometheus metrics on http://ADDR/metrics (plaintext; off unless given), e.g.
    /// 127.0.0.1:9741: lease remaining, watchdog feeds, probe results, libvirt call latency.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Operator health check, run every probe interval with `sh -c COMMAND`: the host reports
    /// check:NAME not ok while it exits non-zero (or outlives probes.check_timeout, 10s by
    /// default, and is killed). NAME: letters, digits, '-', '_', '.'. Repeatable; adds to the
    /// config file's [[probes.check]] entries and replaces one with the same NAME.
    #[arg(long = "check", value_name = "NAME=COMMAND", value_parser = parse_check_flag)]
    pub checks: Vec<Check>,
    /// Directory whose filesystem holds VM disks: the host reports storage:PATH not ok while
    /// it has less than probes.storage_min_free_percent (5% by default) free. Repeatable; adds
    /// to the config file's probes.storage_paths.
    #[arg(long = "storage-path", value_name = "PATH")]
    pub storage_paths: Vec<PathBuf>,
    /// Network interface the host needs (e.g. the migration or storage link): the host reports
    /// link:NIC not ok while it is down; for a bond, each member is checked too. Repeatable;
    /// adds to the config file's probes.nics.
    #[arg(long = "nic", value_name = "NIC")]
    pub nics: Vec<String>,
    /// How often the health probes run (libvirtd, memory, storage, links, md RAID, load,
    /// checks); their latest results go with every heartbeat [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub probe_interval: Option<Duration>,
    /// How often the agent pings the QEMU guest agent of each protected VM running here
    /// (guest-ping through libvirt, answered within a second) and reads its vCPU time and I/O:
    /// the guest's heartbeat, reported with every heartbeat [default: 2s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub guest_ping_interval: Option<Duration>,
    /// Run the `exec` service probes operators declare (`vmha vm probe VM exec ...`): shell
    /// commands run as this agent's user on this host, with VMHA_VM and VMHA_ADDRESS set. Off
    /// by default: an admin of the cluster could otherwise run anything on every hypervisor.
    #[arg(long)]
    pub allow_exec_probes: bool,
    /// The cluster CA's certificate [default: /etc/vmha/pki/ca.pem].
    #[arg(long, value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
    /// This host's certificate, from `vmha ca issue host NAME`; it must name this host
    /// [default: /etc/vmha/pki/host-NAME.pem]. Renewed in place, it is reloaded on SIGHUP.
    #[arg(long, value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// This host's private key [default: /etc/vmha/pki/host-NAME.key].
    #[arg(long, value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// Where libvirtd reads its CRL (libvirtd.conf's `crl_file`): the agent writes the
    /// cluster's CRL there when the controller hands it a new one, and has libvirtd reload it,
    /// so that revoked host certificates no longer reach this hypervisor
    /// [default: /etc/pki/CA/cacrl.pem, libvirt's own default].
    #[arg(long, value_name = "PATH")]
    pub libvirt_crl: Option<PathBuf>,
    /// Development only: talk plaintext to the controller and to peers, and answer any peer.
    /// Only works with a controller that runs with --insecure-dev too.
    #[arg(long)]
    pub insecure_dev: bool,
}

/// `--guest-ping-interval`'s default: a hung guest is seen within a few pings of the
/// controller's failure interval.
pub const GUEST_PING_INTERVAL: Duration = Duration::from_secs(2);

/// `--check NAME=COMMAND`; the name is validated with the file's checks in `Config::load`.
fn parse_check_flag(s: &str) -> Result<Check, String> {
    match s.split_once('=') {
        Some((name, command)) => Ok(Check { name: name.trim().into(), command: command.into() }),
        None => Err(format!("'{s}' is not NAME=COMMAND, e.g. --check 'raid=test -e /run/raid-ok'")),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    host_name: Option<String>,
    libvirt_uri: Option<String>,
    migration_uri: Option<String>,
    #[serde(default)]
    controllers: Vec<String>,
    watchdog_device: Option<PathBuf>,
    #[serde(default, with = "humantime_serde_opt")]
    watchdog_timeout: Option<Duration>,
    #[serde(default)]
    no_watchdog: bool,
    peer_listen: Option<std::net::SocketAddr>,
    peer_address: Option<String>,
    metrics_listen: Option<std::net::SocketAddr>,
    state_dir: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    libvirt_crl: Option<PathBuf>,
    #[serde(default)]
    insecure_dev: bool,
    #[serde(default)]
    probes: FileProbes,
    #[serde(default, with = "humantime_serde_opt")]
    guest_ping_interval: Option<Duration>,
    #[serde(default)]
    allow_exec_probes: bool,
}

/// The `[probes]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProbes {
    #[serde(default, with = "humantime_serde_opt")]
    interval: Option<Duration>,
    memory_min_mib: Option<u64>,
    #[serde(default)]
    storage_paths: Vec<PathBuf>,
    storage_min_free_percent: Option<f64>,
    #[serde(default)]
    nics: Vec<String>,
    load_max: Option<f64>,
    #[serde(default, with = "humantime_serde_opt")]
    libvirt_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    check_timeout: Option<Duration>,
    /// `[[probes.check]]`
    #[serde(default)]
    check: Vec<Check>,
}

mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom)).transpose()
    }
}

/// The watchdog the agent arms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchdogConfig {
    pub device: PathBuf,
    /// Asked of the device; the one assumed when the device cannot be told.
    pub timeout: Duration,
}

/// Settings after merging file and flags, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub host_name: String,
    pub libvirt_uri: String,
    pub migration_uri: String,
    pub controllers: Vec<String>,
    /// `None`: run without a watchdog.
    pub watchdog: Option<WatchdogConfig>,
    pub peer_listen: std::net::SocketAddr,
    pub peer_address: String,
    /// Where Prometheus metrics are served; `None`: nowhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where the agent keeps what it must remember across restarts; `None`: nowhere (tests).
    pub state_dir: Option<PathBuf>,
    /// What the health probes check and their thresholds (`ProbeConfig::default()`: the
    /// always-on probes with default thresholds, no storage, NIC or operator checks).
    pub probes: ProbeConfig,
    /// This host's credentials; `None`: `--insecure-dev`.
    pub tls: Option<vmha_tls::Paths>,
    /// Where libvirtd reads its CRL (see `revocation`).
    pub libvirt_crl: PathBuf,
    /// How often protected guests are pinged (`guest_watch`).
    pub guest_ping_interval: Duration,
    /// Whether `exec` service probes run here (`service_probes`).
    pub allow_exec_probes: bool,
}

impl Config {
    pub fn load(
        flags: Flags,
        system_hostname: impl FnOnce() -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = match &flags.config {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                toml::from_str(&text)
                    .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.to_string() })?
            }
        };
        let host_name = flags
            .host_name
            .or(file.host_name)
            .or_else(system_hostname)
            .ok_or_else(|| ConfigError::Invalid("no host name: pass --host-name".into()))?;
        if !vmha_proto::is_host_name(&host_name) {
            return Err(ConfigError::Invalid(format!(
                "host name '{host_name}' is not valid: use letters, digits, '-' and '.', at most 63 characters"
            )));
        }
        let controllers = if flags.controllers.is_empty() { file.controllers } else { flags.controllers };
        if controllers.is_empty() {
            return Err(ConfigError::Invalid(
                "no controller endpoint: pass --controller https://HOST:7400 or set `controllers` in the config file".into(),
            ));
        }
        let insecure_dev = flags.insecure_dev || file.insecure_dev;
        for c in &controllers {
            let ok = if insecure_dev {
                c.starts_with("http://")
            } else {
                vmha_tls::transport::authority(c).is_ok()
            };
            if !ok {
                let form =
                    if insecure_dev { "http://HOST:PORT (--insecure-dev)" } else { "https://HOST:PORT" };
                return Err(ConfigError::Invalid(format!(
                    "controller endpoint '{c}' is not of the form {form}"
                )));
            }
        }
        let pki = |name: String| PathBuf::from("/etc/vmha/pki").join(name);
        let tls = (!insecure_dev).then(|| vmha_tls::Paths {
            ca: flags.tls_ca.or(file.tls_ca).unwrap_or_else(|| pki("ca.pem".into())),
            cert: flags.tls_cert.or(file.tls_cert).unwrap_or_else(|| pki(format!("host-{host_name}.pem"))),
            key: flags.tls_key.or(file.tls_key).unwrap_or_else(|| pki(format!("host-{host_name}.key"))),
        });
        let migration_uri = flags
            .migration_uri
            .or(file.migration_uri)
            .unwrap_or_else(|| format!("qemu+tls://{host_name}/system"));
        let watchdog_timeout =
            flags.watchdog_timeout.or(file.watchdog_timeout).unwrap_or(Duration::from_secs(3));
        if watchdog_timeout < Duration::from_millis(500) || watchdog_timeout > Duration::from_secs(60) {
            return Err(ConfigError::Invalid(format!(
                "watchdog timeout {watchdog_timeout:?} is out of range (500ms to 60s)"
            )));
        }
        let watchdog = (!(flags.no_watchdog || file.no_watchdog)).then(|| WatchdogConfig {
            device: flags.watchdog_device.or(file.watchdog_device).unwrap_or_else(|| "/dev/watchdog".into()),
            timeout: watchdog_timeout,
        });
        let peer_listen =
            flags.peer_listen.or(file.peer_listen).unwrap_or_else(|| ([0, 0, 0, 0], 7401).into());
        let peer_address = flags.peer_address.or(file.peer_address).unwrap_or_else(|| {
            if peer_listen.ip().is_unspecified() {
                format!("{host_name}:{}", peer_listen.port())
            } else {
                peer_listen.to_string()
            }
        });
        let probes =
            probe_config(file.probes, flags.checks, flags.storage_paths, flags.nics, flags.probe_interval)?;
        let guest_ping_interval =
            flags.guest_ping_interval.or(file.guest_ping_interval).unwrap_or(GUEST_PING_INTERVAL);
        if !(Duration::from_millis(500)..=Duration::from_secs(60)).contains(&guest_ping_interval) {
            return Err(ConfigError::Invalid(format!(
                "guest ping interval (--guest-ping-interval or guest_ping_interval) {} is out of range (500ms to 1m)",
                humantime::format_duration(guest_ping_interval)
            )));
        }
        Ok(Config {
            guest_ping_interval,
            allow_exec_probes: flags.allow_exec_probes || file.allow_exec_probes,
            tls,
            probes,
            peer_listen,
            state_dir: Some(
                flags
                    .state_dir
                    .clone()
                    .or(file.state_dir.clone())
                    .unwrap_or_else(|| "/var/lib/vmha-agent".into()),
            ),
            peer_address,
            metrics_listen: flags.metrics_listen.or(file.metrics_listen),
            libvirt_uri: flags.libvirt_uri.or(file.libvirt_uri).unwrap_or_else(|| "qemu:///system".into()),
            libvirt_crl: flags
                .libvirt_crl
                .or(file.libvirt_crl)
                .unwrap_or_else(|| "/etc/pki/CA/cacrl.pem".into()),
            host_name,
            migration_uri,
            controllers,
            watchdog,
        })
    }
}

fn probe_config(
    file: FileProbes,
    flag_checks: Vec<Check>,
    flag_paths: Vec<PathBuf>,
    flag_nics: Vec<String>,
    flag_interval: Option<Duration>,
) -> Result<ProbeConfig, ConfigError> {
    let d = ProbeConfig::default();
    let in_range = |key: &str, v: Duration, min: Duration, max: Duration| {
        if v < min || v > max {
            return Err(ConfigError::Invalid(format!(
                "{key} {} is out of range ({} to {})",
                humantime::format_duration(v),
                humantime::format_duration(min),
                humantime::format_duration(max)
            )));
        }
        Ok(v)
    };
    let (ms, min) = (Duration::from_millis(100), Duration::from_secs(60));
    let interval = in_range(
        "probe interval (--probe-interval or probes.interval)",
        flag_interval.or(file.interval).unwrap_or(d.interval),
        ms,
        10 * min,
    )?;
    let libvirt_timeout =
        in_range("probes.libvirt_timeout", file.libvirt_timeout.unwrap_or(d.libvirt_timeout), ms, 10 * min)?;
    let check_timeout =
        in_range("probes.check_timeout", file.check_timeout.unwrap_or(d.check_timeout), ms, 10 * min)?;

    let storage_min_free_percent = file.storage_min_free_percent.unwrap_or(d.storage_min_free_percent);
    if !(0.0..=100.0).contains(&storage_min_free_percent) {
        return Err(ConfigError::Invalid(format!(
            "probes.storage_min_free_percent {storage_min_free_percent} is out of range: give a percentage from 0 to 100"
        )));
    }
    let load_max = file.load_max.unwrap_or(d.load_max);
    if !(load_max.is_finite() && load_max > 0.0) {
        return Err(ConfigError::Invalid(format!(
            "probes.load_max {load_max} is not valid: give the highest acceptable 1-minute load average, e.g. 32 \
             (default: 4 per CPU, here {})",
            d.load_max
        )));
    }

    let mut storage_paths: Vec<PathBuf> = Vec::new();
    for p in file.storage_paths.into_iter().chain(flag_paths) {
        if !p.is_absolute() {
            return Err(ConfigError::Invalid(format!(
                "storage path '{}' is not absolute: give the full path, e.g. /var/lib/libvirt/images",
                p.display()
            )));
        }
        if !storage_paths.contains(&p) {
            storage_paths.push(p);
        }
    }
    let mut nics: Vec<String> = Vec::new();
    for n in file.nics.into_iter().chain(flag_nics) {
        if !is_nic_name(&n) {
            return Err(ConfigError::Invalid(format!(
                "NIC name '{n}' is not valid: give an interface name as `ip link` shows it (1 to 15 \
                 characters, no '/', ':' or spaces), e.g. bond0"
            )));
        }
        if !nics.contains(&n) {
            nics.push(n);
        }
    }

    let mut checks: Vec<Check> = Vec::new();
    for (c, from) in file.check.into_iter().map(|c| (c, "[[probes.check]]")) {
        validate_check(&c, from)?;
        if checks.iter().any(|o| o.name == c.name) {
            return Err(ConfigError::Invalid(format!(
                "check '{}' is defined twice in [[probes.check]]: give each check its own name",
                c.name
            )));
        }
        checks.push(c);
    }
    let mut from_flags: Vec<String> = Vec::new();
    for c in flag_checks {
        validate_check(&c, "--check")?;
        if from_flags.contains(&c.name) {
            return Err(ConfigError::Invalid(format!(
                "--check '{}' is given twice: give each check its own name",
                c.name
            )));
        }
        from_flags.push(c.name.clone());
        // Flags win over the file, as for every other setting.
        match checks.iter_mut().find(|o| o.name == c.name) {
            Some(o) => *o = c,
            None => checks.push(c),
        }
    }

    Ok(ProbeConfig {
        interval,
        memory_min_mib: file.memory_min_mib.unwrap_or(d.memory_min_mib),
        storage_paths,
        storage_min_free_percent,
        nics,
        load_max,
        libvirt_timeout,
        check_timeout,
        checks,
    })
}

fn validate_check(c: &Check, from: &str) -> Result<(), ConfigError> {
    let name_ok = !c.name.is_empty()
        && c.name.len() <= 63
        && c.name.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'));
    if !name_ok {
        return Err(ConfigError::Invalid(format!(
            "{from}: check name '{}' is not valid: use 1 to 63 letters, digits, '-', '_' and '.'",
            c.name
        )));
    }
    if c.command.trim().is_empty() {
        return Err(ConfigError::Invalid(format!(
            "{from}: check '{}' has no command: give the shell command whose exit status 0 means healthy",
            c.name
        )));
    }
    Ok(())
}

/// What Linux accepts as an interface name (dev_valid_name), less ':' which only ever names
/// an old-style address alias, never something in /sys/class/net.
fn is_nic_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 15
        && n != "."
        && n != ".."
        && !n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/config/agent.toml");
        let cfg = Config::load(flags(&["--config", path]), || None).expect("deploy/config/agent.toml loads");
        assert_eq!(cfg.host_name, "kvm1");
        assert_eq!(cfg.peer_address, "10.0.0.11:7401");
        assert_eq!(cfg.state_dir.as_deref(), Some(std::path::Path::new("/var/lib/vmha-agent")));
    }

    fn flags(args: &[&str]) -> Flags {
        Flags::parse_from(std::iter::once("vmha-agent").chain(args.iter().copied()))
    }

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let dir = std::env::temp_dir().join(format!("vmha-agent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(
            &path,
            "host_name = \"kvm1\"\ncontrollers = [\"https://c1:7400\"]\nwatchdog_timeout = \"2s\"\n",
        )
        .unwrap();
        let cfg = Config::load(
            flags(&[
                "--config",
                path.to_str().unwrap(),
                "--controller",
                "https://a:1,https://b:2",
                "--watchdog-device",
                "/dev/wd1",
            ]),
            || None,
        )
        .unwrap();
        assert_eq!(cfg.host_name, "kvm1");
        assert_eq!(cfg.controllers, ["https://a:1", "https://b:2"]);
        assert_eq!(
            cfg.watchdog,
            Some(WatchdogConfig { device: "/dev/wd1".into(), timeout: Duration::from_secs(2) })
        );
        assert_eq!(cfg.libvirt_uri, "qemu:///system");
        assert_eq!(cfg.migration_uri, "qemu+tls://kvm1/system");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_input_is_refused_with_what_to_do() {
        let e = Config::load(flags(&["--host-name", "kvm1"]), || None).unwrap_err();
        assert!(e.to_string().contains("--controller"), "{e}");
        let e = Config::load(flags(&["--host-name", "bad host", "--controller", "https://c:1"]), || None)
            .unwrap_err();
        assert!(e.to_string().contains("'bad host'"), "{e}");
        let e =
            Config::load(flags(&["--host-name", "h", "--controller", "http://c:1"]), || None).unwrap_err();
        assert!(e.to_string().contains("https://"), "plaintext is refused without --insecure-dev: {e}");
        let cfg = Config::load(
            flags(&["--host-name", "h", "--controller", "http://c:1", "--insecure-dev"]),
            || None,
        )
        .unwrap();
        assert_eq!(cfg.tls, None);
        let e = Config::load(
            flags(&["--host-name", "h", "--controller", "https://c:1", "--watchdog-timeout", "5ms"]),
            || None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
    }

    #[test]
    fn probes_default_without_a_probes_table() {
        let cfg = Config::load(flags(&["--host-name", "h", "--controller", "https://c:1"]), || None).unwrap();
        assert_eq!(cfg.probes, ProbeConfig::default());
        assert_eq!(cfg.probes.interval, Duration::from_secs(5));
        assert_eq!(cfg.probes.memory_min_mib, 256);
        assert!(cfg.probes.load_max >= 4.0);
    }

    #[test]
    fn probes_table_and_flags_merge() {
        let dir = std::env::temp_dir().join(format!("vmha-agent-probes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(
            &path,
            r#"
host_name = "kvm1"
controllers = ["https://c1:7400"]

[probes]
interval = "2s"
memory_min_mib = 512
storage_paths = ["/var/lib/libvirt/images"]
storage_min_free_percent = 10
nics = ["bond0"]
load_max = 32
libvirt_timeout = "5s"
check_timeout = "20s"

[[probes.check]]
name = "multipath"
command = "multipath -ll | grep -q active"

[[probes.check]]
name = "ntp"
command = "chronyc waitsync 1"
"#,
        )
        .unwrap();
        let cfg = Config::load(
            flags(&[
                "--config",
                path.to_str().unwrap(),
                "--check",
                "ntp=true",
                "--check",
                "lab-flag=test ! -e /tmp/x=y",
                "--storage-path",
                "/srv/vms",
                "--storage-path",
                "/var/lib/libvirt/images",
                "--nic",
                "eth2",
                "--probe-interval",
                "1s",
            ]),
            || None,
        )
        .unwrap();
        let p = cfg.probes;
        assert_eq!(p.interval, Duration::from_secs(1));
        assert_eq!(p.memory_min_mib, 512);
        assert_eq!(p.storage_paths, [PathBuf::from("/var/lib/libvirt/images"), PathBuf::from("/srv/vms")]);
        assert_eq!(p.storage_min_free_percent, 10.0);
        assert_eq!(p.nics, ["bond0", "eth2"]);
        assert_eq!(p.load_max, 32.0);
        assert_eq!(p.libvirt_timeout, Duration::from_secs(5));
        assert_eq!(p.check_timeout, Duration::from_secs(20));
        let checks: Vec<(&str, &str)> = p.checks.iter().map(|c| (&*c.name, &*c.command)).collect();
        assert_eq!(
            checks,
            [
                ("multipath", "multipath -ll | grep -q active"),
                ("ntp", "true"),
                ("lab-flag", "test ! -e /tmp/x=y"),
            ]
        );

        std::fs::write(
            &path,
            "host_name = \"kvm1\"\ncontrollers = [\"https://c1:7400\"]\n[probes]\nmemory_min = 1\n",
        )
        .unwrap();
        let e = Config::load(flags(&["--config", path.to_str().unwrap()]), || None).unwrap_err();
        assert!(e.to_string().contains("memory_min"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_probe_settings_are_refused_with_what_to_do() {
        let load = |args: &[&str]| {
            let mut all = vec!["--host-name", "h", "--controller", "https://c:1"];
            all.extend_from_slice(args);
            Config::load(flags(&all), || None).map_err(|e| e.to_string())
        };
        let e = load(&["--check", "bad name=true"]).unwrap_err();
        assert!(e.contains("'bad name'") && e.contains("letters, digits"), "{e}");
        let e = load(&["--check", "x="]).unwrap_err();
        assert!(e.contains("'x' has no command"), "{e}");
        let e = load(&["--check", "a=true", "--check", "a=false"]).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let e = load(&["--storage-path", "images"]).unwrap_err();
        assert!(e.contains("'images' is not absolute"), "{e}");
        let e = load(&["--nic", "eth0/1"]).unwrap_err();
        assert!(e.contains("'eth0/1'"), "{e}");
        let e = load(&["--probe-interval", "1ms"]).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let e = Flags::try_parse_from(["vmha-agent", "--check", "no-equals-sign"]).unwrap_err().to_string();
        assert!(e.contains("NAME=COMMAND"), "{e}");
    }
}
