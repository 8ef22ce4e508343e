//! Who a certificate speaks for. Every certificate the cluster CA issues carries one URI SAN,
//! `urn:vmha:<role>:<name>`: a host (`urn:vmha:host:kvm1`), a controller, or an operator with
//! its role (`urn:vmha:admin:alice`). It is read only from a certificate whose chain the TLS
//! handshake has verified against the cluster CA.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::TlsError;

const PREFIX: &str = "urn:vmha:";

/// What an operator may do; each level may do everything the ones below it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Reads: status, hosts, VMs, events, operations.
    Viewer,
    /// Also protects, migrates and drains.
    Operator,
    /// Also confirms hosts down, changes fencing, drains with restarts, removes hosts.
    Admin,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Viewer, Level::Operator, Level::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Viewer => "viewer",
            Level::Operator => "operator",
            Level::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.as_str() == s)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The role a certificate was issued for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A hypervisor's agent: reports its own host, answers its peers.
    Host,
    /// A vmha-controller: the only party an agent takes commands and leases from.
    Controller,
    /// A person (or a script) at the CLI.
    Operator(Level),
}

impl Role {
    fn tag(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Controller => "controller",
            Role::Operator(l) => l.as_str(),
        }
    }

    fn from_tag(tag: &str) -> Option<Role> {
        match tag {
            "host" => Some(Role::Host),
            "controller" => Some(Role::Controller),
            other => Level::parse(other).map(Role::Operator),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Operator(l) => write!(f, "operator ({l})"),
            other => f.write_str(other.tag()),
        }
    }
}

/// A verified party: its role and the name its certificate gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub name: String,
    /// The certificate's notBefore and notAfter, in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

impl Identity {
    /// The identity a vmha certificate (DER) names. Only meaningful for a certificate whose
    /// chain was verified: this reads, it does not check signatures.
    pub fn from_der(der: &[u8]) -> Result<Identity, TlsError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| TlsError::NotVmha(format!("not an X.509 certificate: {e}")))?;
        let (not_before, not_after) =
            (cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp());
        let sans = cert
            .subject_alternative_name()
            .map_err(|e| TlsError::NotVmha(format!("unreadable subject alternative names: {e}")))?;
        let mut found = sans.iter().flat_map(|s| s.value.general_names.iter()).filter_map(|n| match n {
            GeneralName::URI(uri) => uri.strip_prefix(PREFIX),
            _ => None,
        });
        let (Some(tagged), None) = (found.next(), found.next()) else {
            return Err(TlsError::NotVmha(
                "it carries no single vmha identity (urn:vmha:<role>:<name>); issue it with `vmha ca issue`"
                    .into(),
            ));
        };
        let (tag, name) = tagged
            .split_once(':')
            .ok_or_else(|| TlsError::NotVmha(format!("malformed vmha identity '{PREFIX}{tagged}'")))?;
        let role =
            Role::from_tag(tag).ok_or_else(|| TlsError::NotVmha(format!("unknown vmha role '{tag}'")))?;
        check_name(name)?;
        Ok(Identity { role, name: name.to_string(), not_before, not_after })
    }

    /// The identity in the first certificate of a PEM file.
    pub fn from_pem_file(path: &std::path::Path) -> Result<Identity, TlsError> {
        let der = first_certificate(path)?;
        Identity::from_der(&der).map_err(|e| bad_certificate(path, e.to_string()))
    }

    /// The URI SAN that names `role` `name` in a certificate.
    pub(crate) fn san(role: Role, name: &str) -> String {
        format!("{PREFIX}{}:{name}", role.tag())
    }
}

/// Names of hosts, controllers and operators: what fits a hostname or a login, so that a name
/// reads the same in a certificate, a log line and the database.
pub fn check_name(name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric());
    if ok { Ok(()) } else { Err(TlsError::BadName(name.to_string())) }
}

/// The first certificate of a PEM file, as DER.
pub(crate) fn first_certificate(
    path: &std::path::Path,
) -> Result<rustls::pki_types::CertificateDer<'static>, TlsError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| TlsError::io("read", path, e))?;
    CertificateDer::from_pem_slice(&pem).map_err(|e| bad_certificate(path, e.to_string()))
}

pub(crate) fn bad_certificate(path: &std::path::Path, detail: String) -> TlsError {
    TlsError::BadFile { path: path.to_path_buf(), what: "certificate", detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_by_what_they_may_do() {
        assert!(Level::Viewer < Level::Operator && Level::Operator < Level::Admin);
        for l in Level::ALL {
            assert_eq!(Level::parse(l.as_str()), Some(l));
        }
        assert_eq!(Level::parse("root"), None);
    }

    #[test]
    fn names_are_hostname_or_login_shaped() {
        for good in ["kvm1", "kvm1.dc1.example.net", "alice", "bob_smith", "ops@isp"] {
            check_name(good).unwrap();
        }
        for bad in ["", "kvm 1", "a:b", "-x", "x/y", "ä"] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
