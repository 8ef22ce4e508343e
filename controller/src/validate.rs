//! Checks on everything that arrives from the network, before anything acts on it. Each error
//! names the offending value and becomes an `InvalidArgument` (or `Unauthenticated`) status.

use crate::errors::Error;
use uuid::Uuid;
use vmha_engine::{ReportedDomain, RunState};
use vmha_proto::v1::{Domain, DomainState};

/// The host an agent speaks for, taken from the connection, never from a message body.
/// Today that is the `x-vmha-host` header; with mTLS it becomes the certificate's name.
pub fn agent_host<T>(req: &tonic::Request<T>) -> Result<String, Error> {
    let value = req
        .metadata()
        .get(vmha_proto::HOST_HEADER)
        .ok_or_else(|| Error::Unauthenticated("the agent did not identify its host".into()))?;
    let host =
        value.to_str().map_err(|_| Error::Unauthenticated("the agent's host name is not ASCII".into()))?;
    if !vmha_proto::is_host_name(host) {
        return Err(Error::Unauthenticated(format!("'{host}' is not a valid host name")));
    }
    Ok(host.to_string())
}

pub fn domain_uuid(s: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(s).map_err(|_| Error::Invalid(format!("'{s}' is not a domain UUID")))
}

pub fn host_name(s: &str) -> Result<&str, Error> {
    if vmha_proto::is_host_name(s) {
        Ok(s)
    } else {
        Err(Error::Invalid(format!("'{s}' is not a valid host name")))
    }
}

pub fn migration_uri(s: &str) -> Result<&str, Error> {
    match s.split_once("://") {
        Some((scheme, rest))
            if !scheme.is_empty() && !rest.is_empty() && !s.contains(char::is_whitespace) =>
        {
            Ok(s)
        }
        _ => Err(Error::Invalid(format!(
            "migration URI '{s}' is not a libvirt URI like qemu+tls://HOST/system"
        ))),
    }
}

/// `host:port` where an agent answers peer polls.
pub fn peer_address(s: &str) -> Result<&str, Error> {
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => Ok(s),
        _ => Err(Error::Invalid(format!("peer address '{s}' is not host:port"))),
    }
}

/// A VM reference from an operator: a name or a UUID, never empty.
pub fn vm_ref(s: &str) -> Result<&str, Error> {
    let t = s.trim();
    if t.is_empty() || t.len() > 255 {
        return Err(Error::Invalid("give a VM name or UUID".into()));
    }
    Ok(t)
}

/// An anti-affinity group name ("" clears it).
pub fn group(s: &str) -> Result<&str, Error> {
    if s.len() <= 63 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        Ok(s)
    } else {
        Err(Error::Invalid(format!("anti-affinity group '{s}' may use letters, digits, '-', '_', '.'")))
    }
}

pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;

pub fn priority(p: i32) -> Result<i32, Error> {
    if PRIORITY_RANGE.contains(&p) {
        Ok(p)
    } else {
        Err(Error::Invalid(format!(
            "priority {p} is out of range ({} to {}; higher restarts first)",
            PRIORITY_RANGE.start(),
            PRIORITY_RANGE.end()
        )))
    }
}

pub fn run_state(state: i32) -> RunState {
    match DomainState::try_from(state).unwrap_or(DomainState::Unspecified) {
        DomainState::Running | DomainState::Blocked => RunState::Running,
        DomainState::Paused => RunState::Paused,
        DomainState::ShuttingDown => RunState::ShuttingDown,
        DomainState::ShutOff => RunState::ShutOff,
        DomainState::Crashed => RunState::Crashed,
        DomainState::Suspended => RunState::Suspended,
        DomainState::Unspecified => RunState::Unknown,
    }
}

/// An agent's domain list: valid UUIDs (normalised), non-empty names, no UUID twice.
pub fn reported_domains(domains: &[Domain]) -> Result<Vec<ReportedDomain>, Error> {
    let mut out: Vec<ReportedDomain> = Vec::with_capacity(domains.len());
    for d in domains {
        let uuid = domain_uuid(&d.uuid)?.to_string();
        if d.name.is_empty() || d.name.len() > 255 {
            return Err(Error::Invalid(format!("domain {uuid} has no valid name")));
        }
        if out.iter().any(|o| o.uuid == uuid) {
            return Err(Error::Invalid(format!("domain {uuid} is reported twice")));
        }
        out.push(ReportedDomain {
            uuid,
            name: d.name.clone(),
            state: run_state(d.state),
            memory_kib: d.memory_kib,
            vcpus: d.vcpus,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dom(uuid: &str, name: &str) -> Domain {
        Domain {
            uuid: uuid.into(),
            name: name.into(),
            state: DomainState::Running as i32,
            memory_kib: 1,
            vcpus: 1,
            persistent: true,
            xml: String::new(),
        }
    }

    const U: &str = "6f1c1a52-6a3c-4d8e-9d42-0a4f0f7b9a10";

    #[test]
    fn the_host_comes_from_the_connection_header_only() {
        let mut req = tonic::Request::new(());
        assert_eq!(tonic::Status::from(agent_host(&req).unwrap_err()).code(), tonic::Code::Unauthenticated);
        req.metadata_mut().insert(vmha_proto::HOST_HEADER, "kvm 1".parse().unwrap());
        assert_eq!(tonic::Status::from(agent_host(&req).unwrap_err()).code(), tonic::Code::Unauthenticated);
        req.metadata_mut().insert(vmha_proto::HOST_HEADER, "kvm1".parse().unwrap());
        assert_eq!(agent_host(&req).unwrap(), "kvm1");
    }

    #[test]
    fn domain_reports_are_checked_and_normalised() {
        let upper = U.to_uppercase();
        let ok = reported_domains(&[dom(&upper, "dns1")]).unwrap();
        assert_eq!(ok[0].uuid, U);
        assert_eq!(ok[0].state, RunState::Running);
        let e = reported_domains(&[dom("not-a-uuid", "x")]).unwrap_err();
        assert!(e.to_string().contains("'not-a-uuid'"));
        let e = reported_domains(&[dom(U, "")]).unwrap_err();
        assert!(e.to_string().contains("no valid name"));
        let e = reported_domains(&[dom(U, "a"), dom(&upper, "b")]).unwrap_err();
        assert!(e.to_string().contains("twice"));
    }

    #[test]
    fn operator_input_is_bounded() {
        assert!(priority(100).is_ok());
        assert!(priority(1001).unwrap_err().to_string().contains("out of range"));
        assert!(vm_ref("  ").is_err());
        assert_eq!(vm_ref(" dns1 ").unwrap(), "dns1");
        assert!(host_name("kvm2").is_ok());
        assert!(host_name("kvm/2").is_err());
        assert!(migration_uri("qemu+tcp://10.0.0.2/system").is_ok());
        assert!(migration_uri("kvm2").is_err());
        assert!(migration_uri("qemu+tcp:// x").is_err());
        assert!(peer_address("10.0.0.2:7401").is_ok());
        assert!(
            peer_address("kvm2").is_err()
                && peer_address("kvm2:0").is_err()
                && peer_address(":7401").is_err()
        );
    }

    #[test]
    fn unknown_domain_states_are_unknown_not_running() {
        assert_eq!(run_state(99), RunState::Unknown);
        assert_eq!(run_state(DomainState::Blocked as i32), RunState::Running);
    }
}
