//! Runs the service probes the controller gave for the protected guests running here
//! (`vmha vm probe`), each every its interval while its guest is up, and keeps their results on
//! the guest board, which every heartbeat reports. The controller judges them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmha_proto::v1::ServiceProbe;
use vmha_proto::v1::service_probe::Kind;

use crate::guest_watch::GuestBoard;
use crate::probe_check::{ProbeKind, check};

/// How often due probes are looked for: a probe runs within this of its interval.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// What the probe checks, as `probe_check` runs it; `Err`: why it cannot run here.
fn kind(p: &ServiceProbe, allow_exec: bool) -> Result<ProbeKind, String> {
    Ok(match &p.kind {
        None => return Err("the controller sent a probe with nothing to check".into()),
        Some(Kind::Dns(d)) => ProbeKind::Dns {
            name: d.name.clone(),
            expect: (!d.expect.is_empty())
                .then(|| d.expect.parse())
                .transpose()
                .map_err(|_| format!("--expect '{}' is not an address", d.expect))?,
        },
        Some(Kind::Tcp(t)) => {
            ProbeKind::Tcp { port: u16::try_from(t.port).map_err(|_| format!("{} is not a port", t.port))? }
        }
        Some(Kind::Http(h)) => ProbeKind::Http {
            url: h.url.clone(),
            status: u16::try_from(h.status).map_err(|_| format!("{} is not a status", h.status))?,
        },
        Some(Kind::Exec(_)) if !allow_exec => {
            return Err("not run: exec probes are off on this host (vmha-agent --allow-exec-probes)".into());
        }
        Some(Kind::Exec(e)) => ProbeKind::Exec { command: e.command.clone() },
    })
}

/// Forever: every due probe runs in a task of its own; one still running when it is due
/// again is not started twice (its result counts when it comes).
pub async fn run(board: Arc<GuestBoard>, allow_exec: bool) {
    let mut running: HashMap<(String, String), tokio::task::JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(LOOK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        running.retain(|_, h| !h.is_finished());
        for due in board.due_probes(Instant::now()) {
            let key = (due.uuid.clone(), due.probe.name.clone());
            if running.contains_key(&key) {
                continue;
            }
            let board = board.clone();
            running.insert(
                key,
                tokio::spawn(async move {
                    let p = &due.probe;
                    let result = match kind(p, allow_exec) {
                        // A probe that cannot run here is shown, never counted as failing.
                        Err(why) => {
                            tracing::warn!(domain = %due.uuid, probe = %p.name, "{why}");
                            return;
                        }
                        Ok(k) => check(&k, &due.uuid, &p.address, Duration::from_millis(p.timeout_ms)).await,
                    };
                    board.probe_result(&due.uuid, due.instance, &p.name, result);
                }),
            );
        }
    }
}
