//! Service probes between the API's messages and the engine's: an operator's (`vmha vm
//! probe`), checked before the engine keeps them, and the ones an agent is sent.

use vmha_engine::service_probe::{ProbeKind, ServiceProbe};
use vmha_proto::v1 as pb;

/// An operator's probe as the engine keeps it; why not, when it cannot be (the engine checks
/// the rest: `service_probe::check_all`).
pub fn from_api(p: &pb::ServiceProbe) -> Result<ServiceProbe, String> {
    use pb::service_probe::Kind;
    let kind = match &p.kind {
        None => return Err(format!("probe '{}' says nothing to check (dns, tcp, http or exec)", p.name)),
        Some(Kind::Dns(d)) => {
            ProbeKind::Dns { name: d.name.clone(), expect: (!d.expect.is_empty()).then(|| d.expect.clone()) }
        }
        Some(Kind::Tcp(t)) => ProbeKind::Tcp {
            port: u16::try_from(t.port)
                .map_err(|_| format!("probe '{}': port {} is not a port", p.name, t.port))?,
        },
        Some(Kind::Http(h)) => ProbeKind::Http {
            url: h.url.clone(),
            status: u16::try_from(h.status)
                .map_err(|_| format!("probe '{}': {} is not an HTTP status", p.name, h.status))?,
        },
        Some(Kind::Exec(e)) => ProbeKind::Exec { command: e.command.clone() },
    };
    Ok(ServiceProbe {
        name: p.name.clone(),
        kind,
        address: p.address.clone(),
        interval_ms: p.interval_ms,
        timeout_ms: p.timeout_ms,
        failures: p.failures,
    })
}

pub fn to_api(p: &ServiceProbe) -> pb::ServiceProbe {
    use pb::service_probe::Kind;
    let kind = match &p.kind {
        ProbeKind::Dns { name, expect } => {
            Kind::Dns(pb::DnsProbe { name: name.clone(), expect: expect.clone().unwrap_or_default() })
        }
        ProbeKind::Tcp { port } => Kind::Tcp(pb::TcpProbe { port: u32::from(*port) }),
        ProbeKind::Http { url, status } => {
            Kind::Http(pb::HttpProbe { url: url.clone(), status: u32::from(*status) })
        }
        ProbeKind::Exec { command } => Kind::Exec(pb::ExecProbe { command: command.clone() }),
    };
    pb::ServiceProbe {
        name: p.name.clone(),
        kind: Some(kind),
        address: p.address.clone(),
        interval_ms: p.interval_ms,
        timeout_ms: p.timeout_ms,
        failures: p.failures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_goes_through_the_api_and_back_unchanged() {
        let p = ServiceProbe {
            name: "dns".into(),
            kind: ProbeKind::Dns { name: "lab.vmha".into(), expect: Some("10.0.0.9".into()) },
            address: "10.0.0.5".into(),
            interval_ms: 2_000,
            timeout_ms: 1_000,
            failures: 3,
        };
        assert_eq!(from_api(&to_api(&p)), Ok(p));
        let tcp = pb::ServiceProbe {
            name: "t".into(),
            kind: Some(pb::service_probe::Kind::Tcp(pb::TcpProbe { port: 70_000 })),
            ..Default::default()
        };
        assert_eq!(from_api(&tcp), Err("probe 't': port 70000 is not a port".into()));
        let empty = pb::ServiceProbe { name: "x".into(), ..Default::default() };
        assert!(from_api(&empty).unwrap_err().contains("says nothing to check"));
    }
}
