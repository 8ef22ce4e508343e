//! What a host sends, made into the engine's inputs: each message an agent's RPC carries is
//! checked (sizes, counts, names, domain XML) and converted here, with no I/O, so that the
//! fuzz test (`controller/tests/host_messages.rs`) drives exactly what the API does with
//! whatever bytes a host sends. Whatever comes from a host is untrusted, even with a valid
//! certificate: an error here refuses the message, and nothing here may panic.

use vmha_engine::cluster::HostResources;
use vmha_engine::health::Probe;
use vmha_engine::lease::Echo;
use vmha_engine::operation::{Done, OpId};
use vmha_engine::step::{Heartbeat, Registration};
use vmha_engine::{Millis, Watchdog};
use vmha_proto::v1::*;

use crate::domain_xml::DomainRules;
use crate::errors::Error;
use crate::validate;

/// `Register` from `host` (named by its certificate).
pub fn registration(host: &str, r: &RegisterRequest) -> Result<Registration, Error> {
    validate::migration_uri(validate::short_text("the migration URI", &r.migration_uri)?)?;
    validate::peer_address(validate::short_text("the peer address", &r.peer_address)?)?;
    validate::short_text("the agent version", &r.agent_version)?;
    let facts = r.facts.as_ref().ok_or_else(|| Error::Invalid("register without host facts".into()))?;
    validate::facts(facts)?;
    Ok(Registration {
        host: host.to_string(),
        migration_uri: r.migration_uri.clone(),
        peer_address: r.peer_address.clone(),
        resources: resources(facts),
        libvirt_version: facts.libvirt_version.clone(),
        lock_manager: facts.lock_manager.clone(),
        describe: format!(
            "vmha-agent {}, libvirt {}, {} CPUs, {} MiB",
            r.agent_version,
            facts.libvirt_version,
            facts.cpus,
            facts.memory_total_kib / 1024
        ),
    })
}

/// `Heartbeat` from `host`, received at `arrived`. A definition that fails `rules` is not
/// kept, and the heartbeat goes on: a VM with a passthrough device must not cost its host its
/// lease (the engine says so once).
pub fn heartbeat(
    host: String,
    r: &HeartbeatRequest,
    rules: &DomainRules,
    arrived: Option<Millis>,
) -> Result<Heartbeat, Error> {
    let domains = validate::reported_domains(&r.domains)?;
    validate::probes(&r.probes)?;
    if let Some(f) = &r.facts {
        validate::facts(f)?;
    }
    if let Some(w) = &r.watchdog {
        validate::short_text("the watchdog device", &w.device)?;
        validate::short_text("the watchdog problem", &w.problem)?;
    }
    let (mut xml, mut xml_refused) = (Vec::new(), Vec::new());
    for d in r.domains.iter().filter(|d| !d.xml.is_empty()) {
        let uuid = d.uuid.to_lowercase();
        match rules.check(&d.xml, &uuid) {
            Ok(disks) => xml.push((uuid, d.xml.clone(), disks)),
            Err(refused) => xml_refused.push((uuid, refused.to_string())),
        }
    }
    Ok(Heartbeat {
        host,
        echo: (r.echo_stamp_ms > 0).then_some(Echo {
            epoch: r.echo_epoch,
            stamp: Millis(r.echo_stamp_ms),
            held_ms: r.echo_held_ms,
        }),
        resources: r.facts.as_ref().map(|f| (resources(f), f.lock_manager.clone())),
        watchdog: watchdog(r.watchdog.as_ref()),
        probes: r
            .probes
            .iter()
            .map(|p| Probe { name: p.name.clone(), ok: p.ok, detail: p.detail.clone() })
            .collect(),
        domains: (!r.domains_unknown).then_some(domains),
        xml,
        xml_refused,
        roster_known: r.roster_version,
        probes_known: r.probes_version,
        self_fenced: r.self_fenced,
        arrived,
        seq: r.seq,
    })
}

/// `ReportResult`: which operation, and how it ended.
pub fn result(r: OperationResult) -> Result<(OpId, Result<Done, String>), Error> {
    validate::short_text("the operation's error", &r.error)?;
    let id = operation_id(&r.operation_id)?;
    let result = if r.ok {
        Ok(Done { elapsed_ms: r.elapsed_ms, downtime_ms: r.downtime_ms, bytes: r.bytes })
    } else {
        Err(r.error)
    };
    Ok((id, result))
}

/// The operation a `ReportProgress` or `ReportResult` names.
pub fn operation_id(id: &str) -> Result<OpId, Error> {
    // Echoed at most in part: the message is the host's, of any length.
    let shown: String = id.chars().take(64).collect();
    OpId::parse(id).ok_or_else(|| Error::Invalid(format!("'{shown}' is not an operation id")))
}

/// The engine's view of what an agent says of its watchdog.
fn watchdog(w: Option<&WatchdogStatus>) -> Watchdog {
    match w {
        None => Watchdog::Missing("the agent does not report one (an older agent?)".into()),
        Some(w) if w.armed => Watchdog::Armed { device: w.device.clone(), timeout_ms: w.timeout_ms },
        Some(w) => Watchdog::Missing(w.problem.clone()),
    }
}

fn resources(f: &HostFacts) -> HostResources {
    HostResources {
        cpus: f.cpus,
        memory_total_kib: f.memory_total_kib,
        memory_free_kib: f.memory_free_kib,
        cpu_model: f.cpu_model.clone(),
    }
}
