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
The CA (ca.key, ca.pem, issued.txt, crl.pem) lives in /etc/vmha/ca (--dir); certificates and
keys for others go to /etc/vmha/pki (--out), never beside ca.key. Keys are written 0600.
Revoking (a retired or compromised host, a person who left):
  vmha ca revoke host kvm9                       # every certificate kvm9 was ever issued
  vmha ca publish                                # controllers, agents and libvirtd refuse them
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
        #[arg(long, default_value = CA_DIR)]
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
        #[arg(long, default_value = CA_DIR)]
        dir: PathBuf,
        /// Where to write NAME's files (and a copy of ca.pem); never the CA's directory.
        #[arg(long, default_value = PKI_DIR)]
        out: PathBuf,
    },
    /// Renew every certificate issued into a directory at once (the same roles, names,
    /// DNS names and addresses, new keys): certificates issued together expire together, and
    /// a host whose certificate lapses loses its lease and self-fences. Then copy each host's
    /// and controller's files to it and reload (`systemctl reload vmha-agent`,
    /// `systemctl reload vmha-controller`); nothing restarts and no VM is touched.
    RenewAll {
        /// The CA's directory (ca.pem and ca.key).
        #[arg(long, default_value = CA_DIR)]
        dir: PathBuf,
        /// Where the certificates to renew are.
        #[arg(long, default_value = PKI_DIR)]
        certs: PathBuf,
        /// Validity of the renewed certificates.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Revoke every certificate the CA issued to a name (renewed ones too: `issued.txt` keeps
    /// them all), or the certificates in given files, and write the CA's new CRL (crl.pem).
    /// Then `vmha ca publish` hands it to the cluster.
    #[command(after_help = CA_HELP)]
    Revoke {
        /// What the certificates are for.
        kind: Option<Kind>,
        /// Whose.
        #[arg(requires = "kind")]
        name: Option<String>,
        /// A certificate file to revoke (repeatable), e.g. one issued before the CA kept
        /// issued.txt.
        #[arg(long = "file", value_name = "FILE")]
        certs: Vec<PathBuf>,
        /// The CA's directory (ca.pem and ca.key).
        #[arg(long, default_value = CA_DIR)]
        dir: PathBuf,
    },
    /// Hand the CA's CRL to the cluster (admin): the controllers keep it in the database and
    /// refuse the certificates it revokes, and every agent takes it with its next heartbeat
    /// answer, refuses them too, and has its libvirtd reload it.
    Publish {
        /// The CRL `vmha ca revoke` wrote.
        #[arg(long, default_value = "/etc/vmha/ca/crl.pem")]
        crl: PathBuf,
    },
    /// Who a certificate names, its role and when it expires.
    Show { file: PathBuf },
}

/// Where the CA lives, and where the certificates it issues go (and every party reads its own
/// from).
const CA_DIR: &str = "/etc/vmha/ca";
const PKI_DIR: &str = "/etc/vmha/pki";

impl CaVerb {
    /// Whether it talks to a controller (the others work on files only).
    pub fn needs_controller(&self) -> bool {
        matches!(self, CaVerb::Publish { .. })
    }
}

/// The CRL in `path`, as DER, for `vmha ca publish`.
pub fn read_crl(path: &Path) -> Result<Vec<u8>, Failure> {
    vmha_tls::revocation::read_pem(path)
        .map_err(|e| Failure { message: format!("{e}: make one with `vmha ca revoke`"), exit_code: 2 })
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
    let mut message = e.to_string();
    // Before the CA had a directory of its own, `vmha ca init` made it in /etc/vmha/pki.
    if message.contains(&format!("{CA_DIR}/{}", ca::CA_KEY)) && Path::new(PKI_DIR).join(ca::CA_KEY).exists() {
        message.push_str(&format!(
            "; the CA is in {PKI_DIR}, where an older vmha made it: move ca.key, ca.pem (keep a copy of ca.pem \
             in {PKI_DIR}) to {CA_DIR}, or pass --dir {PKI_DIR} --out ANOTHER_DIR"
        ));
    }
    Failure { message, exit_code }
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
            let role = role_of(kind, role);
            let issued =
                ca::issue(&dir, &out, &ca::Request { role, name, dns, ips: ip, days }).map_err(failed)?;
            show_issued(fmt, &issued, &dir);
        }
        CaVerb::RenewAll { dir, certs, days } => {
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
        CaVerb::Revoke { kind, name, certs, dir } => {
            let stem = match (kind, &name) {
                (Some(kind), Some(name)) => Some(ca::file_stem(role_of(kind, None), name)),
                (Some(_), None) => {
                    return Err(Failure {
                        message: "name whose certificates to revoke".into(),
                        exit_code: 2,
                    });
                }
                _ => None,
            };
            let r = ca::revoke(&dir, stem.as_deref(), &certs).map_err(failed)?;
            match fmt {
                Format::Json => output::json(&serde_json::json!({
                    "crl": r.crl, "number": r.number, "added": r.added, "revoked": r.total
                })),
                Format::Table | Format::Csv => {
                    println!(
                        "wrote CRL {} to {}: {} certificate(s) newly revoked, {} in all",
                        r.number,
                        r.crl.display(),
                        r.added,
                        r.total
                    );
                    println!(
                        "next: vmha ca publish --crl {} (until then, nobody refuses them)",
                        r.crl.display()
                    );
                }
            }
        }
        CaVerb::Publish { .. } => unreachable!("publishing needs a controller: see commands.rs"),
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

fn role_of(kind: Kind, level: Option<LevelArg>) -> Role {
    match kind {
        Kind::Host => Role::Host,
        Kind::Controller => Role::Controller,
        Kind::Operator => Role::Operator(level.map(Level::from).unwrap_or(Level::Viewer)),
    }
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
