//! Checks on everything that arrives from the network, before anything acts on it. Each error
//! names the offending value and becomes an `InvalidArgument` status. (Who may send what is
//! `access`.)

use crate::errors::Error;
use uuid::Uuid;
use vmha_engine::guest::GuestSeen;
use vmha_engine::service_probe::ProbeSeen;
use vmha_engine::{ReportedDomain, RunState};
use vmha_proto::v1::{Domain, DomainState};

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

/// Caps on what one message may carry; beyond them it is refused whole, saying which cap.
pub mod caps {
    /// Domains in one host's report (libvirt hosts run hundreds, not thousands).
    pub const DOMAINS_PER_REPORT: usize = 4096;
    /// One domain's XML: real definitions are a few KiB.
    pub const XML_BYTES: usize = 256 << 10;
    /// Domain names (libvirt's own limit is lower in practice).
    pub const NAME_BYTES: usize = 255;
    /// Health probes in one heartbeat, and their names and details.
    pub const PROBES: usize = 64;
    pub const PROBE_TEXT_BYTES: usize = 1024;
    /// Addresses, URIs, versions and other short strings.
    pub const SHORT_TEXT_BYTES: usize = 1024;
    /// A whole gRPC message from a host (the controller refuses bigger ones before decoding
    /// them): a report of every domain with its definition.
    pub const MESSAGE_BYTES: usize = 64 << 20;
    /// A whole gRPC message from an operator's tool: names, numbers, host lists.
    pub const OPERATOR_MESSAGE_BYTES: usize = 1 << 20;
    /// Requests under way at once on one connection, and HTTP/2 streams open on it: an agent
    /// keeps a command stream and a heartbeat, a `vmha` a few watches.
    pub const REQUESTS_PER_CONNECTION: usize = 32;
    pub const STREAMS_PER_CONNECTION: u32 = 64;
    /// A migration's timeout and bandwidth an operator may ask for.
    pub const MIGRATION_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
    /// How long a `vmha vm stop` may wait for a clean shutdown.
    pub const SHUTDOWN_TIMEOUT_MS: u64 = 3600 * 1000;
    /// How far back `vmha report` looks: ten years.
    pub const REPORT_WINDOW_S: u64 = 10 * 366 * 86_400;
    pub const BANDWIDTH_MIB_S: u64 = 1 << 20;
    /// A host's memory cap.
    pub const MEMORY_LIMIT_MIB: u64 = 1 << 32;
}

/// A short string of a message, at most `caps::SHORT_TEXT_BYTES`.
pub fn short_text<'a>(what: &str, s: &'a str) -> Result<&'a str, Error> {
    if s.len() <= caps::SHORT_TEXT_BYTES {
        Ok(s)
    } else {
        Err(Error::Invalid(format!(
            "{what} is {} bytes, more than the {} allowed",
            s.len(),
            caps::SHORT_TEXT_BYTES
        )))
    }
}

/// A number from a message within `0..=max`, named for the refusal.
pub fn at_most(what: &str, value: u64, max: u64) -> Result<u64, Error> {
    if value <= max { Ok(value) } else { Err(Error::Invalid(format!("{what} {value} is more than {max}"))) }
}

/// A host's facts: short strings only.
pub fn facts(f: &vmha_proto::v1::HostFacts) -> Result<(), Error> {
    short_text("the CPU model", &f.cpu_model)?;
    short_text("the libvirt version", &f.libvirt_version)?;
    short_text("the hypervisor version", &f.hypervisor_version)?;
    short_text("the lock manager", &f.lock_manager)?;
    Ok(())
}

/// A heartbeat's health probes: at most `caps::PROBES`, short names and details.
pub fn probes(probes: &[vmha_proto::v1::ProbeResult]) -> Result<(), Error> {
    if probes.len() > caps::PROBES {
        return Err(Error::Invalid(format!(
            "{} probes in one heartbeat, more than {}",
            probes.len(),
            caps::PROBES
        )));
    }
    match probes
        .iter()
        .find(|p| p.name.len() > caps::PROBE_TEXT_BYTES || p.detail.len() > caps::PROBE_TEXT_BYTES)
    {
        Some(p) => Err(Error::Invalid(format!(
            "probe '{}' has a name or detail longer than {} bytes",
            p.name.chars().take(64).collect::<String>(),
            caps::PROBE_TEXT_BYTES
        ))),
        None => Ok(()),
    }
}

/// An agent's domain list: at most `caps::DOMAINS_PER_REPORT`, valid UUIDs (normalised),
/// non-empty names, XML within `caps::XML_BYTES`, no UUID twice.
pub fn reported_domains(domains: &[Domain]) -> Result<Vec<ReportedDomain>, Error> {
    if domains.len() > caps::DOMAINS_PER_REPORT {
        return Err(Error::Invalid(format!(
            "{} domains in one report, more than {}",
            domains.len(),
            caps::DOMAINS_PER_REPORT
        )));
    }
    let mut out: Vec<ReportedDomain> = Vec::with_capacity(domains.len());
    let mut seen = std::collections::HashSet::with_capacity(domains.len());
    for d in domains {
        let uuid = domain_uuid(&d.uuid)?.to_string();
        if d.name.is_empty() || d.name.len() > caps::NAME_BYTES {
            return Err(Error::Invalid(format!("domain {uuid} has no valid name")));
        }
        if d.xml.len() > caps::XML_BYTES {
            return Err(Error::Invalid(format!(
                "domain {uuid}'s XML is {} bytes, more than {}",
                d.xml.len(),
                caps::XML_BYTES
            )));
        }
        if !seen.insert(uuid.clone()) {
            return Err(Error::Invalid(format!("domain {uuid} is reported twice")));
        }
        out.push(ReportedDomain {
            uuid,
            name: d.name.clone(),
            state: run_state(d.state),
            memory_kib: d.memory_kib,
            vcpus: d.vcpus,
            guest: d.guest.as_ref().and_then(guest_seen),
            probes: d.guest.as_ref().map(probes_seen).unwrap_or_default(),
        });
    }
    Ok(out)
}

/// A guest's service probe results as the engine keeps them: as many as a VM may have
/// probes, with names and messages cut to size (a host may send anything).
fn probes_seen(g: &vmha_proto::v1::GuestHealth) -> Vec<ProbeSeen> {
    let cut = |s: &str, n: usize| s.chars().take(n).collect::<String>();
    (g.probes.iter().take(vmha_engine::service_probe::MAX_PROBES))
        .map(|p| ProbeSeen {
            name: cut(&p.name, 32),
            failures_in_row: p.failures_in_row,
            passed_once: p.passed_once,
            last_error: cut(&p.last_error, 300),
        })
        .collect()
}

/// A guest heartbeat as the engine takes it; `None`: not watched (or a state this controller
/// does not know, from a newer agent).
fn guest_seen(g: &vmha_proto::v1::GuestHealth) -> Option<GuestSeen> {
    use vmha_proto::v1::GuestAgent;
    Some(match GuestAgent::try_from(g.agent).ok()? {
        GuestAgent::Unwatched => return None,
        GuestAgent::None => GuestSeen::NoAgent,
        GuestAgent::Waiting => GuestSeen::Waiting,
        GuestAgent::Answering => GuestSeen::Answering { since_answer_ms: g.since_answer_ms },
        GuestAgent::Silent => {
            GuestSeen::Silent { since_answer_ms: g.since_answer_ms, missed: g.missed, quiet_ms: g.quiet_ms }
        }
    })
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
            guest: None,
        }
    }

    const U: &str = "6f1c1a52-6a3c-4d8e-9d42-0a4f0f7b9a10";

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

/// Arbitrary messages, as a forged or broken agent or client could send them: every check
/// answers (a value or a refusal that says what is wrong) and none panics.
#[cfg(test)]
mod arbitrary_input {
    use proptest::prelude::*;
    use vmha_proto::v1::{Domain, HostFacts, ProbeResult};

    use super::*;

    fn domain() -> impl Strategy<Value = Domain> {
        let uuid = prop_oneof![
            "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
            ".{0,40}",
        ];
        (uuid, ".{0,300}", any::<i32>(), any::<u64>(), any::<u32>(), ".{0,64}").prop_map(
            |(uuid, name, state, memory_kib, vcpus, xml)| Domain {
                uuid,
                name,
                state,
                memory_kib,
                vcpus,
                persistent: true,
                xml,
                guest: Some(vmha_proto::v1::GuestHealth {
                    agent: state,
                    since_answer_ms: memory_kib,
                    quiet_ms: 0,
                    probes: Vec::new(),
                    missed: vcpus,
                }),
            },
        )
    }

    proptest! {
        #[test]
        fn reports_are_accepted_or_refused_with_a_reason(domains in prop::collection::vec(domain(), 0..40)) {
            match reported_domains(&domains) {
                Ok(ok) => prop_assert_eq!(ok.len(), domains.len()),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn strings_and_numbers_are_bounded(s in ".{0,2000}", n in any::<u64>(), p in any::<i32>()) {
            let checks: [Result<(), Error>; 9] = [
                host_name(&s).map(drop),
                migration_uri(&s).map(drop),
                peer_address(&s).map(drop),
                vm_ref(&s).map(drop),
                group(&s).map(drop),
                priority(p).map(drop),
                short_text("x", &s).map(drop),
                at_most("n", n, caps::MIGRATION_TIMEOUT_MS).map(drop),
                domain_uuid(&s).map(drop),
            ];
            for c in checks {
                if let Err(e) = c {
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }

        #[test]
        fn facts_and_probes_are_bounded(s in ".{0,1500}", n in 0usize..80) {
            let f = HostFacts { cpu_model: s.clone(), lock_manager: s.clone(), ..Default::default() };
            prop_assert_eq!(facts(&f).is_ok(), s.len() <= caps::SHORT_TEXT_BYTES);
            let p: Vec<ProbeResult> =
                (0..n).map(|_| ProbeResult { name: "ping".into(), ok: true, detail: s.clone() }).collect();
            prop_assert_eq!(probes(&p).is_ok(), n <= caps::PROBES && (n == 0 || s.len() <= caps::PROBE_TEXT_BYTES));
        }
    }

    #[test]
    fn a_report_over_the_caps_is_refused_saying_which() {
        let many: Vec<Domain> = (0..=caps::DOMAINS_PER_REPORT)
            .map(|i| Domain {
                uuid: format!("00000000-0000-0000-0000-{i:012}"),
                name: "x".into(),
                ..Default::default()
            })
            .collect();
        assert!(reported_domains(&many).unwrap_err().to_string().contains("more than 4096"));
        let big = Domain {
            uuid: "00000000-0000-0000-0000-000000000001".into(),
            name: "x".into(),
            xml: "x".repeat(caps::XML_BYTES + 1),
            ..Default::default()
        };
        assert!(reported_domains(&[big]).unwrap_err().to_string().contains("XML"));
    }
}
