//! The agent's settings: a TOML file (`--config`), overridden by flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

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
    /// Controller endpoint, e.g. http://10.0.0.1:7400; repeat or comma-separate to list
    /// standbys, tried in order.
    #[arg(long = "controller", value_delimiter = ',')]
    pub controllers: Vec<String>,
    /// How often to report to the controller [default: 1s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Address to answer peer agents' lease polls on [default: 0.0.0.0:7401].
    #[arg(long)]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// host:port peers use to reach this agent's poll endpoint [default: the host name and
    /// the --peer-listen port].
    #[arg(long)]
    pub peer_address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    host_name: Option<String>,
    libvirt_uri: Option<String>,
    migration_uri: Option<String>,
    #[serde(default)]
    controllers: Vec<String>,
    #[serde(default, with = "humantime_serde_opt")]
    heartbeat_interval: Option<Duration>,
    peer_listen: Option<std::net::SocketAddr>,
    peer_address: Option<String>,
}

mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom)).transpose()
    }
}

/// Settings after merging file and flags, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub host_name: String,
    pub libvirt_uri: String,
    pub migration_uri: String,
    pub controllers: Vec<String>,
    pub heartbeat_interval: Duration,
    pub peer_listen: std::net::SocketAddr,
    pub peer_address: String,
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
                "no controller endpoint: pass --controller http://HOST:7400 or set `controllers` in the config file".into(),
            ));
        }
        for c in &controllers {
            if !(c.starts_with("http://") || c.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "controller endpoint '{c}' must start with http:// or https://"
                )));
            }
        }
        let migration_uri = flags
            .migration_uri
            .or(file.migration_uri)
            .unwrap_or_else(|| format!("qemu+tls://{host_name}/system"));
        let heartbeat_interval =
            flags.heartbeat_interval.or(file.heartbeat_interval).unwrap_or(Duration::from_secs(1));
        if heartbeat_interval < Duration::from_millis(100) || heartbeat_interval > Duration::from_secs(60) {
            return Err(ConfigError::Invalid(format!(
                "heartbeat interval {heartbeat_interval:?} is out of range (100ms to 60s)"
            )));
        }
        let peer_listen =
            flags.peer_listen.or(file.peer_listen).unwrap_or_else(|| ([0, 0, 0, 0], 7401).into());
        let peer_address = flags.peer_address.or(file.peer_address).unwrap_or_else(|| {
            if peer_listen.ip().is_unspecified() {
                format!("{host_name}:{}", peer_listen.port())
            } else {
                peer_listen.to_string()
            }
        });
        Ok(Config {
            peer_listen,
            peer_address,
            libvirt_uri: flags.libvirt_uri.or(file.libvirt_uri).unwrap_or_else(|| "qemu:///system".into()),
            host_name,
            migration_uri,
            controllers,
            heartbeat_interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "host_name = \"kvm1\"\ncontrollers = [\"http://c1:7400\"]\nheartbeat_interval = \"2s\"\n",
        )
        .unwrap();
        let cfg = Config::load(
            flags(&["--config", path.to_str().unwrap(), "--controller", "http://a:1,http://b:2"]),
            || None,
        )
        .unwrap();
        assert_eq!(cfg.host_name, "kvm1");
        assert_eq!(cfg.controllers, ["http://a:1", "http://b:2"]);
        assert_eq!(cfg.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(cfg.libvirt_uri, "qemu:///system");
        assert_eq!(cfg.migration_uri, "qemu+tls://kvm1/system");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_input_is_refused_with_what_to_do() {
        let e = Config::load(flags(&["--host-name", "kvm1"]), || None).unwrap_err();
        assert!(e.to_string().contains("--controller"), "{e}");
        let e = Config::load(flags(&["--host-name", "bad host", "--controller", "http://c:1"]), || None)
            .unwrap_err();
        assert!(e.to_string().contains("'bad host'"), "{e}");
        let e = Config::load(flags(&["--host-name", "h", "--controller", "c:1"]), || None).unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
        let e = Config::load(
            flags(&["--host-name", "h", "--controller", "http://c:1", "--heartbeat-interval", "5ms"]),
            || None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
    }
}
