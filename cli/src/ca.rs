//! `vmha ca`: the cluster CA and its certificates, without a PKI to learn first.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Subcommand, ValueEnum};
use vmha_tls::{Identity, Level, Role, ca};

use crate::commands::Failure;
use crate::output::{self, Format};

const CA_HELP: &str = "\
Setting up a cluster:
  vmha ca init                                   # once, on the admin's machine
  vmha ca issue controller ctl1                  # then copy ca.pem + controller-ctl1.* to ctl1
  vmha ca issue host kvm1 --ip 10.0.0.11         # per hypervisor: ca.pem + host-kvm1.* to kvm1
  vmha ca issue operator alice --role admin      # per person: viewer, operator or admin
Everything goes to /etc/vmha/pki unless --dir says otherwise; keys are written 0600.
Renewing: issue the same name again before it expires (or `vmha ca renew-all` for all of
them), copy the files over the old ones, and reload (`systemctl reload vmha-agent`, which
sends SIGHUP): no restart, no VM touched. `vmha status` warns 30 days before a host's
certificate expires, and raises an alarm 7 days before.
`vmha ca show FILE` tells who a certificate names and when it expires; `vmha host ls`
shows each host's.";

#[derive(Debug, Subcommand)]
#[command(after_help = CA_HELP)]
pub enum CaVerb {
    /// Make the cluster CA: ca.pem (give it to every host, controller and operator) and ca.key
    /// (keep it on this machine only). Never replaces an existing one.
    Init {
        /// Where to write them.
        #[arg(long, default_value = "/etc/vmha/pki")]
        dir: PathBuf,
        /// Validity of the CA.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue (or renew) a certificate: `vmha ca issue host kvm1`, `vmha ca issue controller
    /// ctl1`, `vmha ca issue operator alice --role admin`.
    #[command(after_help = CA_HELP)]
    Issue {
        /// What the certificate is for.
        kind: Kind,
        /// The host's name in the cluster (as its agent's --host-name), the controller's, or
        /// the operator's: events record what operators do under this name.
        name: String,
        /// An operator's role: viewer reads; operator also protects, migrates and drains;
        /// admin also confirms hosts down, changes fencing, drains with restarts, removes hosts.
        #[arg(long, required_if_eq("kind", "operator"))]
        role: Option<LevelArg>,
        /// More DNS names a host or controller answers to (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// Addresses a host or controller answers to (repeatable). A host's migration address
        /// belongs here when libvirt uses these certificates for TLS between hosts.
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Validity.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// The CA's directory (ca.pem and ca.key).
        #[arg(long, default_value = "/etc/vmha/pki")]
        dir: PathBuf,
        /// Where to write NAME's files [default: the CA's directory].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Renew every certificate issued into a directory at once (the same roles, names,
    /// DNS names and addresses, new keys): certificates issued together expire together, and
    /// a host whose certificate lapses loses its lease and self-fences. Then copy each host's
    /// and controller's files to it and reload (`systemctl reload vmha-agent`,
    /// `systemctl reload vmha-controller`); nothing restarts and no VM is touched.
    RenewAll {
        /// The CA's directory (ca.pem and ca.key).
        #[arg(long, default_value = "/etc/vmha/pki")]
        dir: PathBuf,
        /// Where the certificates to renew are [default: the CA's directory].
        #[arg(long)]
        certs: Option<PathBuf>,
        /// Validity of the renewed certificates.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Who a certificate names, its role and when it expires.
    Show { file: PathBuf },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Host,
    Controller,
    Operator,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LevelArg {
    Viewer,
    Operator,
    Admin,
}

impl From<LevelArg> for Level {
    fn from(l: LevelArg) -> Level {
        match l {
            LevelArg::Viewer => Level::Viewer,
            LevelArg::Operator => Level::Operator,
            LevelArg::Admin => Level::Admin,
        }
    }
}

#[derive(serde::Serialize)]
struct Shown {
    role: String,
    name: String,
    not_after: String,
    days_left: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<PathBuf>,
}

impl Shown {
    fn new(id: &Identity) -> Shown {
        let now =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
        Shown {
            role: id.role.to_string(),
            name: id.name.clone(),
            not_after: expiry(id.not_after),
            days_left: (id.not_after - now).div_euclid(86400),
            cert: None,
            key: None,
        }
    }
}

/// A certificate's notAfter for people: `2027-11-27T22:00:00Z`.
pub fn expiry(not_after: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn failed(e: vmha_tls::TlsError) -> Failure {
    let exit_code = match e {
        vmha_tls::TlsError::BadName(_) | vmha_tls::TlsError::Usage(_) => 2,
        vmha_tls::TlsError::Exists(_) => 4,
        _ => 1,
    };
    Failure { message: e.to_string(), exit_code }
}

pub fn run(verb: CaVerb, fmt: Format) -> Result<(), Failure> {
    match verb {
        CaVerb::Init { dir, days } => {
            let cert = ca::init(&dir, days).map_err(failed)?;
            match fmt {
                Format::Json => output::json(&serde_json::json!({ "ca": cert, "key": dir.join(ca::CA_KEY) })),
                Format::Table | Format::Csv => {
                    println!(
                        "made the cluster CA: {} (for everyone) and {} (keep it here, 0600)",
                        cert.display(),
                        dir.join(ca::CA_KEY).display()
                    );
                    println!(
                        "next: vmha ca issue controller NAME, vmha ca issue host NAME, vmha ca issue operator NAME --role admin"
                    );
                }
            }
        }
        CaVerb::Issue { kind, name, role, dns, ip, days, dir, out } => {
            if kind != Kind::Operator && role.is_some() {
                return Err(Failure {
                    message: "--role is for operator certificates only".into(),
                    exit_code: 2,
                });
            }
            let role = match kind {
                Kind::Host => Role::Host,
                Kind::Controller => Role::Controller,
                Kind::Operator => Role::Operator(role.map(Level::from).unwrap_or(Level::Viewer)),
            };
            let out = out.unwrap_or_else(|| dir.clone());
            let issued =
                ca::issue(&dir, &out, &ca::Request { role, name, dns, ips: ip, days }).map_err(failed)?;
            show_issued(fmt, &issued, &dir);
        }
        CaVerb::RenewAll { dir, certs, days } => {
            let certs = certs.unwrap_or_else(|| dir.clone());
            let renewed = ca::renew_all(&dir, &certs, days).map_err(failed)?;
            match fmt {
                Format::Json => output::json(
                    &renewed
                        .iter()
                        .map(|i| Shown {
                            cert: Some(i.cert.clone()),
                            key: Some(i.key.clone()),
                            ..Shown::new(&i.identity)
                        })
                        .collect::<Vec<_>>(),
                ),
                Format::Table | Format::Csv => {
                    for i in &renewed {
                        println!(
                            "renewed {} {}: {}, until {}",
                            i.identity.role,
                            i.identity.name,
                            i.cert.display(),
                            expiry(i.identity.not_after)
                        );
                    }
                    println!(
                        "{} renewed; copy each one's .pem and .key to its machine and reload it (`systemctl reload \
                         vmha-agent` or `vmha-controller`; operators just use the new files)",
                        renewed.len()
                    );
                }
            }
        }
        CaVerb::Show { file } => {
            let id = read_identity(&file)?;
            match fmt {
                Format::Json => output::json(&Shown::new(&id)),
                Format::Table | Format::Csv => {
                    let s = Shown::new(&id);
                    println!(
                        "{}: {} {}, expires {} ({} days left)",
                        file.display(),
                        s.role,
                        s.name,
                        s.not_after,
                        s.days_left
                    );
                }
            }
        }
    }
    Ok(())
}

fn show_issued(fmt: Format, issued: &ca::Issued, ca_dir: &Path) {
    let mut shown = Shown::new(&issued.identity);
    shown.cert = Some(issued.cert.clone());
    shown.key = Some(issued.key.clone());
    match fmt {
        Format::Json => output::json(&shown),
        Format::Table | Format::Csv => {
            println!(
                "issued {} {} until {}: {} and {} (0600)",
                shown.role,
                shown.name,
                shown.not_after,
                issued.cert.display(),
                issued.key.display()
            );
            let ca = ca_dir.join(ca::CA_CERT);
            match issued.identity.role {
                Role::Host => println!(
                    "copy {}, {} and {} to the host's /etc/vmha/pki/, then start (or `systemctl reload`) vmha-agent",
                    ca.display(),
                    issued.cert.display(),
                    issued.key.display()
                ),
                Role::Controller => println!(
                    "on the controller: --tls-ca {} --tls-cert {} --tls-key {} (or VMHA_TLS_CA, VMHA_TLS_CERT, VMHA_TLS_KEY)",
                    ca.display(),
                    issued.cert.display(),
                    issued.key.display()
                ),
                Role::Operator(_) => println!(
                    "for the CLI: export VMHA_CA={} VMHA_CERT={} VMHA_KEY={}",
                    ca.display(),
                    issued.cert.display(),
                    issued.key.display()
                ),
            }
        }
    }
}

fn read_identity(file: &Path) -> Result<Identity, Failure> {
    Identity::from_pem_file(file).map_err(|e| Failure { message: e.to_string(), exit_code: 2 })
}
