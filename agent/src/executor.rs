//! Carries out one command from the controller and reports how it went.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmha_proto::v1::command::Kind;
use vmha_proto::v1::{Command, DomainState, OperationProgress, OperationResult, ResetDomain, ShutdownDomain};

use crate::hypervisor::{Hypervisor, HypervisorError, MigrateOptions, MigrationStats};
use crate::session::{Agent, Client};

/// Why a command failed. Its text is the operation's error, which operators see (`vmha op`,
/// the event log).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("empty command (a newer controller?)")]
    Empty,
    #[error("refusing to start {vm} on {host}: {why}")]
    StartRefused { vm: String, host: String, why: String },
    #[error(transparent)]
    Libvirt(#[from] HypervisorError),
    #[error(
        "libvirt did not answer the {call} of {vm} within {after:?}; is libvirtd hung? (the call may still complete)"
    )]
    LibvirtHung { call: &'static str, vm: String, after: Duration },
    #[error("libvirt's {call} for {vm} panicked: {source}")]
    Panicked { call: &'static str, vm: String, source: tokio::task::JoinError },
}

/// How long a shutdown or destroy may wait for libvirt.
const LIBVIRT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs libvirt's `call` for VM `vm` off the async runtime: libvirt calls block.
async fn blocking<T: Send + 'static>(
    agent: &Agent,
    call: &'static str,
    vm: &str,
    f: impl FnOnce(&dyn Hypervisor) -> Result<T, HypervisorError> + Send + 'static,
) -> Result<T, CommandError> {
    let hv = agent.hv.clone();
    match tokio::task::spawn_blocking(move || f(hv.as_ref())).await {
        Ok(done) => Ok(done?),
        Err(source) => Err(CommandError::Panicked { call, vm: vm.into(), source }),
    }
}

/// `blocking`, for a call whose failure is safe to report while it may still run.
async fn within(
    agent: &Agent,
    call: &'static str,
    vm: &str,
    f: impl FnOnce(&dyn Hypervisor) -> Result<(), HypervisorError> + Send + 'static,
) -> Result<MigrationStats, CommandError> {
    match tokio::time::timeout(LIBVIRT_TIMEOUT, blocking(agent, call, vm, f)).await {
        Ok(done) => done.map(|()| MigrationStats::default()),
        Err(_) => Err(CommandError::LibvirtHung { call, vm: vm.into(), after: LIBVIRT_TIMEOUT }),
    }
}

/// Whether the definition to start names VM `uuid` (`""`: a controller that does not say).
/// Defining one that names another VM would replace that VM's definition on this host, and
/// start it. The controller checks the same when it takes a definition from a host.
fn names_the_vm(xml: &str, uuid: &str) -> Result<(), String> {
    if uuid.is_empty() {
        return Ok(());
    }
    // The controller refused anything nested deeper than a few dozen levels before keeping it.
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("its definition does not parse: {e}"))?;
    let named = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("uuid"))
        .and_then(|u| u.text())
        .map(str::trim)
        .unwrap_or("");
    if named.eq_ignore_ascii_case(uuid) {
        Ok(())
    } else {
        Err(format!("the definition sent to start VM {uuid} names VM '{named}'"))
    }
}

pub async fn execute(agent: Arc<Agent>, mut client: Client, cmd: Command) {
    let op = cmd.operation_id.clone();
    let vm = cmd.vm_name.clone();
    let started = Instant::now();
    let what = match &cmd.kind {
        None => "nothing",
        Some(Kind::Cancel(_)) => "cancel",
        Some(Kind::Migrate(_)) => "migrate",
        Some(Kind::Start(_)) => "start",
        Some(Kind::Shutdown(_)) => "shutdown",
        Some(Kind::Destroy(_)) => "destroy",
        Some(Kind::Reset(r)) if r.hard => "destroy and start",
        Some(Kind::Reset(_)) => "reset",
    };
    tracing::info!(operation = %op, %vm, command = what, "executing");
    let outcome: Result<MigrationStats, CommandError> = match cmd.kind {
        None => Err(CommandError::Empty),
        // The migration's own result reports how it ended; the cancel has none.
        Some(Kind::Cancel(c)) => {
            let uuid = c.uuid.clone();
            match within(&agent, "abort", &vm, move |hv| hv.abort_job(&uuid)).await {
                Ok(_) => {
                    tracing::info!(operation = %op, %vm, domain = %c.uuid, "asked libvirt to abort the migration")
                }
                Err(e) => {
                    tracing::warn!(operation = %op, %vm, domain = %c.uuid, error = %e, "could not abort the migration (it may have ended)")
                }
            }
            return;
        }
        Some(Kind::Migrate(m)) => {
            let opts = MigrateOptions {
                dest_uri: m.dest_uri,
                auto_converge: m.auto_converge,
                bandwidth_mib_s: (m.bandwidth_mib_s > 0).then_some(m.bandwidth_mib_s),
                timeout: (m.timeout_ms > 0).then(|| Duration::from_millis(m.timeout_ms)),
                postcopy: m.postcopy,
                max_downtime_ms: (m.max_downtime_ms > 0).then_some(m.max_downtime_ms),
            };
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let mut progress_client = client.clone();
            let progress_op = op.clone();
            let forward = tokio::spawn(async move {
                while let Some(p) = rx.recv().await {
                    let p: crate::hypervisor::JobProgress = p;
                    let _ = progress_client
                        .report_progress(OperationProgress {
                            operation_id: progress_op.clone(),
                            data_total: p.data_total,
                            data_processed: p.data_processed,
                            data_remaining: p.data_remaining,
                            elapsed_ms: p.elapsed_ms,
                        })
                        .await;
                }
            });
            let r = blocking(&agent, "migration", &vm, move |hv| {
                hv.migrate(&m.uuid, &opts, &move |p| {
                    let _ = tx.send(p);
                })
            })
            .await;
            let _ = forward.await;
            r
        }
        Some(Kind::Start(s)) => match agent
            .lease
            .may_start()
            .map_err(|no| no.to_string())
            .and_then(|()| names_the_vm(&s.xml, &s.uuid))
        {
            // Every copy this host runs must be one its self-fence covers.
            Err(why) => {
                Err(CommandError::StartRefused { vm: vm.clone(), host: agent.cfg.host_name.clone(), why })
            }
            Ok(()) => {
                blocking(&agent, "start", &vm, move |hv| {
                    hv.define_and_start(&s.xml).map(|_| Default::default())
                })
                .await
            }
        },
        // A hung libvirtd must not hold these for ever: their failure is safe to report (the
        // controller asks again while the VM still runs). A start's is not (it may still
        // happen, and would then be retried elsewhere): it reports only when libvirt answers,
        // and the controller waits for that, for a report, or for the host's death.
        Some(Kind::Shutdown(s)) => shut_down(&agent, &vm, s).await,
        Some(Kind::Destroy(d)) => within(&agent, "destroy", &vm, move |hv| hv.destroy(&d.uuid)).await,
        Some(Kind::Reset(r)) => reset(&agent, &vm, r).await,
    };
    // Report the effect before the result: the controller must never see a result and then a
    // report that predates it (a migrated VM would briefly look back on this host).
    if let Err(e) = agent.heartbeat(&mut client).await {
        tracing::warn!(operation = %op, %vm, error = %e, "report after the command failed");
    }
    let result = match &outcome {
        Ok(s) => OperationResult {
            operation_id: op.clone(),
            ok: true,
            error: String::new(),
            elapsed_ms: if s.elapsed_ms > 0 { s.elapsed_ms } else { started.elapsed().as_millis() as u64 },
            downtime_ms: s.downtime_ms,
            bytes: s.bytes,
        },
        Err(e) => OperationResult {
            operation_id: op.clone(),
            ok: false,
            error: e.to_string(),
            elapsed_ms: started.elapsed().as_millis() as u64,
            downtime_ms: 0,
            bytes: 0,
        },
    };
    match &outcome {
        Ok(_) => tracing::info!(operation = %op, %vm, command = what, elapsed_ms = result.elapsed_ms, "done"),
        Err(e) => tracing::warn!(operation = %op, %vm, command = what, error = %e, "failed"),
    }
    report(&mut client, result).await;
}

/// A hung guest's reset, in place: nothing moves, so no second copy can come of it. The hard
/// one starts the domain again only through the lease check every start passes. Once done,
/// the guest's heartbeat starts afresh: it must answer again before it can be judged silent.
async fn reset(agent: &Agent, vm: &str, r: ResetDomain) -> Result<MigrationStats, CommandError> {
    let uuid = r.uuid.clone();
    let done = if r.hard {
        within(agent, "destroy", vm, move |hv| hv.destroy(&uuid)).await?;
        match agent.lease.may_start() {
            Err(no) => Err(CommandError::StartRefused {
                vm: vm.into(),
                host: agent.cfg.host_name.clone(),
                why: format!("{no}; it was destroyed for its reset and stays off here"),
            }),
            Ok(()) => {
                let uuid = r.uuid.clone();
                blocking(agent, "start", vm, move |hv| hv.start_defined(&uuid).map(|()| Default::default()))
                    .await
            }
        }
    } else {
        within(agent, "reset", vm, move |hv| hv.reset(&uuid)).await
    };
    if done.is_ok() {
        agent.guests.forget(&r.uuid);
    }
    done
}

/// How often a shutting-down guest is looked at.
const SHUTDOWN_POLL: Duration = Duration::from_millis(500);

/// An operator's stop: the guest is asked to shut down, and destroyed if it still runs once
/// the timeout has passed (a guest without ACPI support ignores the request).
async fn shut_down(agent: &Agent, vm: &str, s: ShutdownDomain) -> Result<MigrationStats, CommandError> {
    let uuid = s.uuid.clone();
    within(agent, "shutdown", vm, move |hv| hv.shutdown(&uuid)).await?;
    if s.timeout_ms == 0 {
        return Ok(Default::default());
    }
    let until = Instant::now() + Duration::from_millis(s.timeout_ms);
    loop {
        let uuid = s.uuid.clone();
        let runs = blocking(agent, "domain listing", vm, move |hv| {
            let state = hv.domains()?.into_iter().find(|d| d.uuid == uuid).map(|d| d.state);
            Ok(state
                .is_some_and(|st| ![DomainState::ShutOff as i32, DomainState::Crashed as i32].contains(&st)))
        })
        .await?;
        if !runs {
            return Ok(Default::default());
        }
        if Instant::now() >= until {
            tracing::warn!(vm, domain = %s.uuid, timeout_ms = s.timeout_ms, "no clean shutdown in time: destroying it");
            let uuid = s.uuid.clone();
            return within(agent, "destroy", vm, move |hv| hv.destroy(&uuid)).await;
        }
        tokio::time::sleep(SHUTDOWN_POLL).await;
    }
}

/// How long a result is offered to a controller that cannot be reached.
const REPORT_FOR: Duration = Duration::from_secs(300);

/// Reports a result, retrying while no controller answers: a controller restarted while the
/// operation ran loads it as in flight and takes the result; without it, the new controller
/// must settle the operation from reports after its deadline.
async fn report(client: &mut Client, result: OperationResult) {
    let op = result.operation_id.clone();
    let deadline = Instant::now() + REPORT_FOR;
    let mut pause = Duration::from_millis(200);
    loop {
        match client.report_result(result.clone()).await {
            Ok(_) => return,
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tracing::info!(operation = %op, error = %e, "the controller is unreachable; reporting the result again in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::warn!(operation = %op, error = %e, "could not report the result");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::names_the_vm;

    #[test]
    fn a_definition_naming_another_vm_is_not_started() {
        let xml =
            "<domain type='kvm'><name>dns1</name><uuid>0D6B3F2E-1C1E-4F7E-9A55-2B8A1F6C0D01</uuid></domain>";
        assert_eq!(names_the_vm(xml, "0d6b3f2e-1c1e-4f7e-9a55-2b8a1f6c0d01"), Ok(()));
        let other = names_the_vm(xml, "0d6b3f2e-1c1e-4f7e-9a55-2b8a1f6c0d02").unwrap_err();
        assert!(other.contains("names VM '0D6B3F2E-1C1E-4F7E-9A55-2B8A1F6C0D01'"), "{other}");
        assert!(names_the_vm("<domain><name>x</name></domain>", "0d6b3f2e").is_err());
        assert_eq!(names_the_vm(xml, ""), Ok(()), "an older controller does not say");
    }
}
