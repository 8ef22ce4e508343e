//! Service probes: checks of a service inside a protected guest (`vmha vm probe`), declared
//! per VM, run by the agent of the host running it, and judged by `guest_reset` like a silent
//! guest agent: a service that fails its probe the declared number of times in a row, after
//! it has worked since the guest started, gets the guest reset in place.

use serde::{Deserialize, Serialize};

use crate::time::secs;

/// The probes of several VMs, by UUID.
pub type ProbesByVm = Vec<(String, Vec<ServiceProbe>)>;

/// At most this many probes per VM: each runs on its host every interval.
pub const MAX_PROBES: usize = 8;

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProbeKind {
    /// A DNS query of `name` (type A) on UDP 53 of the address; `expect`: an address the
    /// answer must hold.
    Dns {
        name: String,
        expect: Option<String>,
    },
    Tcp {
        port: u16,
    },
    /// An HTTP GET (http:// only) that must answer `status`.
    Http {
        url: String,
        status: u16,
    },
    /// `sh -c COMMAND` on the host running the VM (agents run with --allow-exec-probes only).
    Exec {
        command: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceProbe {
    pub name: String,
    pub kind: ProbeKind,
    /// The guest's address.
    pub address: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Failures in a row that make the service failing.
    pub failures: u32,
}

/// What the agent of the VM's host last said of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSeen {
    pub name: String,
    pub failures_in_row: u32,
    /// It passed since the guest started: only then are its failures judged.
    pub passed_once: bool,
    pub last_error: String,
}

impl ServiceProbe {
    /// "dns lab.vmha @10.0.0.5 (expect 10.0.0.9) every 2.0 s, timeout 1.0 s, 3 failures".
    pub fn describe(&self) -> String {
        let what = match &self.kind {
            ProbeKind::Dns { name, expect } => format!(
                "dns {name} @{}{}",
                self.address,
                expect.as_ref().map(|e| format!(" (expect {e})")).unwrap_or_default()
            ),
            ProbeKind::Tcp { port } => format!("tcp {}:{port}", self.address),
            ProbeKind::Http { url, status } => format!("http {url} (status {status})"),
            ProbeKind::Exec { command } => format!("exec `{command}` on its host"),
        };
        let name = if self.name == self.kind_name() { String::new() } else { format!("{}: ", self.name) };
        format!(
            "{name}{what} every {}, timeout {}, {} failures",
            secs(self.interval_ms),
            secs(self.timeout_ms),
            self.failures
        )
    }

    /// The probe's kind as a word, its default name.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            ProbeKind::Dns { .. } => "dns",
            ProbeKind::Tcp { .. } => "tcp",
            ProbeKind::Http { .. } => "http",
            ProbeKind::Exec { .. } => "exec",
        }
    }

    /// Whether an operator's probe can be run as declared; why not, for the operator.
    pub fn check(&self) -> Result<(), String> {
        let bad = |why: String| Err(format!("probe '{}': {why}", self.name));
        if self.name.is_empty()
            || self.name.len() > 32
            || !self.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad("a name is 1 to 32 of a-z, 0-9 and -".into());
        }
        if !(1_000..=600_000).contains(&self.interval_ms) {
            return bad(format!("the interval {} is not between 1 s and 10 min", secs(self.interval_ms)));
        }
        if self.timeout_ms < 100 || self.timeout_ms > self.interval_ms {
            return bad(format!(
                "the timeout {} is not between 0.1 s and the interval ({})",
                secs(self.timeout_ms),
                secs(self.interval_ms)
            ));
        }
        if !(1..=20).contains(&self.failures) {
            return bad(format!("{} failures in a row: 1 to 20", self.failures));
        }
        let address_ok = self.address.parse::<std::net::IpAddr>().is_ok();
        match &self.kind {
            ProbeKind::Dns { .. } | ProbeKind::Tcp { .. } if !address_ok => {
                return bad(format!("'{}' is not the guest's IP address (--address)", self.address));
            }
            ProbeKind::Exec { .. } if !self.address.is_empty() && !address_ok => {
                return bad(format!("'{}' is not an IP address", self.address));
            }
            _ => {}
        }
        match &self.kind {
            ProbeKind::Dns { name, expect } => {
                if name.is_empty() || name.len() > 253 || name.split('.').any(|l| l.len() > 63) {
                    return bad(format!("'{name}' is not a DNS name"));
                }
                if let Some(e) = expect.as_ref().filter(|e| e.parse::<std::net::Ipv4Addr>().is_err()) {
                    return bad(format!("--expect '{e}' is not an IPv4 address"));
                }
            }
            ProbeKind::Tcp { port: 0 } => return bad("port 0".into()),
            ProbeKind::Tcp { .. } => {}
            ProbeKind::Http { url, status } => {
                if !url.starts_with("http://") || url.len() > 512 || url.chars().any(char::is_whitespace) {
                    return bad(format!("'{url}' is not an http:// URL (https is not probed)"));
                }
                if !(100..=599).contains(status) {
                    return bad(format!("status {status} is not an HTTP status"));
                }
            }
            ProbeKind::Exec { command } => {
                if command.trim().is_empty() || command.len() > 1024 || command.contains('\0') {
                    return bad("the command is empty, longer than 1024 bytes, or holds a NUL".into());
                }
            }
        }
        Ok(())
    }
}

/// Checks a VM's whole set: each probe, at most `MAX_PROBES`, names unique.
pub fn check_all(probes: &[ServiceProbe]) -> Result<(), String> {
    if probes.len() > MAX_PROBES {
        return Err(format!("{} probes: at most {MAX_PROBES} per VM", probes.len()));
    }
    for (i, p) in probes.iter().enumerate() {
        p.check()?;
        if probes[..i].iter().any(|q| q.name == p.name) {
            return Err(format!("two probes are named '{}' (--name tells them apart)", p.name));
        }
    }
    Ok(())
}

/// For `vmha vm show`: each probe and how it fares, from its host's last word.
pub fn status(probes: &[ServiceProbe], seen: &[ProbeSeen]) -> Vec<String> {
    probes
        .iter()
        .map(|p| {
            let fares = match seen.iter().find(|s| s.name == p.name) {
                None => "not reported".to_string(),
                Some(s) if s.failures_in_row == 0 && s.passed_once => "passing".into(),
                Some(s) if s.failures_in_row == 0 => "not run yet".into(),
                Some(s) => format!(
                    "FAILING {} in a row{}: {}",
                    s.failures_in_row,
                    if s.passed_once { "" } else { " (not passed since the guest started)" },
                    s.last_error
                ),
            };
            format!("{}: {fares}", p.describe())
        })
        .collect()
}

/// The first probe failing as declared, after it passed since the guest started: its name
/// and the evidence. `after_reset`: the probe a reset by vmha was for, which has not passed
/// since (the reset did not help), counts too.
pub fn failing(
    probes: &[ServiceProbe],
    seen: &[ProbeSeen],
    after_reset: Option<&str>,
) -> Option<(String, String)> {
    probes.iter().find_map(|p| {
        let s = seen.iter().find(|s| s.name == p.name)?;
        let judged = s.passed_once || after_reset == Some(p.name.as_str());
        (judged && s.failures_in_row >= p.failures).then(|| {
            let how = if s.passed_once {
                "failed"
            } else {
                "has not passed since vmha reset the guest for it, and failed"
            };
            let evidence = format!(
                "its {} probe {how} {} times in a row ({}; {})",
                p.name,
                s.failures_in_row,
                p.describe(),
                s.last_error
            );
            (p.name.clone(), evidence)
        })
    })
}

/// What the answer to `host`'s heartbeat carries of the probes: nothing when the agent holds
/// their version (`known`), else the version and the probes of every protected VM placed on
/// the host (none: version 0, an empty list that clears the agent's).
pub fn for_host(s: &crate::ClusterState, host: &str, known: u64) -> Option<(u64, ProbesByVm)> {
    use std::hash::{Hash, Hasher};
    let probes: ProbesByVm = (s.vms_placed_on(host).into_iter())
        .filter(|v| v.protected && !v.probes.is_empty())
        .map(|v| (v.uuid.clone(), v.probes.clone()))
        .collect();
    let version = if probes.is_empty() {
        0
    } else {
        // `DefaultHasher::new()` has fixed keys: the same probes give the same version under
        // any leader of the same build, so a takeover sends nothing again.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        probes.hash(&mut h);
        h.finish() | 1
    };
    (version != known).then_some((version, probes))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn dns(address: &str) -> ServiceProbe {
        ServiceProbe {
            name: "dns".into(),
            kind: ProbeKind::Dns { name: "lab.vmha".into(), expect: None },
            address: address.into(),
            interval_ms: 2_000,
            timeout_ms: 1_000,
            failures: 3,
        }
    }

    #[test]
    fn probes_are_checked_before_they_are_kept() {
        assert_eq!(check_all(&[dns("10.0.0.5")]), Ok(()));
        let e = check_all(&[dns("dns1")]).unwrap_err();
        assert_eq!(e, "probe 'dns': 'dns1' is not the guest's IP address (--address)");
        let mut fast = dns("10.0.0.5");
        fast.interval_ms = 10;
        assert!(check_all(&[fast]).unwrap_err().contains("not between 1 s and 10 min"));
        let e = check_all(&[dns("10.0.0.5"), dns("10.0.0.6")]).unwrap_err();
        assert!(e.contains("two probes are named 'dns'"), "{e}");
        let https = ServiceProbe {
            name: "web".into(),
            kind: ProbeKind::Http { url: "https://x/".into(), status: 200 },
            ..dns("")
        };
        assert!(check_all(&[https]).unwrap_err().contains("not an http:// URL"));
        let many: Vec<ServiceProbe> =
            (0..9).map(|i| ServiceProbe { name: format!("p{i}"), ..dns("10.0.0.5") }).collect();
        assert!(check_all(&many).unwrap_err().contains("at most 8"));
    }

    #[test]
    fn a_probe_counts_only_after_it_passed_and_failed_as_declared() {
        let probes = [dns("10.0.0.5")];
        let seen = |n, passed| ProbeSeen {
            name: "dns".into(),
            failures_in_row: n,
            passed_once: passed,
            last_error: "no DNS answer from 10.0.0.5 within 1.0 s".into(),
        };
        assert_eq!(failing(&probes, &[seen(2, true)], None), None);
        assert_eq!(failing(&probes, &[seen(9, false)], None), None, "never worked since the guest started");
        let (_, not_back) = failing(&probes, &[seen(9, false)], Some("dns")).unwrap();
        assert!(
            not_back.starts_with("its dns probe has not passed since vmha reset the guest for it"),
            "{not_back}"
        );
        let (name, why) = failing(&probes, &[seen(3, true)], None).unwrap();
        assert_eq!(name, "dns");
        assert_eq!(
            why,
            "its dns probe failed 3 times in a row (dns lab.vmha @10.0.0.5 every 2.0 s, timeout 1.0 s, 3 failures; \
             no DNS answer from 10.0.0.5 within 1.0 s)"
        );
        assert_eq!(
            status(&probes, &[seen(0, true)]),
            ["dns lab.vmha @10.0.0.5 every 2.0 s, timeout 1.0 s, 3 failures: passing"]
        );
    }
}
