//! `vmha host drain`: the plan, then progress bars (one per migration and one overall), fed
//! by the controller's `WatchDrain` stream, until the drain ends; or detach and re-attach.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use vmha_proto::v1::{DrainPlan, DrainRequest, ListHostsRequest, Operation, WatchDrainRequest};

use crate::commands::{Client, Controllers, Failure};
use crate::output::{self, Format};

fn plan_table(plan: &DrainPlan) {
    output::table(
        &["VM", "PROTECTED", "STATE", "TARGET", "WHY"],
        plan.steps
            .iter()
            .map(|s| {
                vec![
                    s.vm.clone(),
                    if s.protected { "yes".into() } else { "no".into() },
                    s.state.clone(),
                    if s.target.is_empty() { "-".into() } else { s.target.clone() },
                    if s.error.is_empty() { s.why.clone() } else { s.error.clone() },
                ]
            })
            .collect(),
    );
    for w in &plan.warnings {
        println!("WARNING: {w}");
    }
}

/// The exit code of a controller (or its database) that cannot be reached.
const UNAVAILABLE: u8 = 5;

/// How long a drain is followed while the controller cannot be reached.
const GIVE_UP: Duration = Duration::from_secs(120);

async fn current(c: &mut Client, host: &str) -> Result<Option<DrainPlan>, Failure> {
    let hosts = c.list_hosts(ListHostsRequest {}).await?.into_inner().hosts;
    let h = hosts.into_iter().find(|h| h.name == host).ok_or_else(|| Failure {
        message: format!("no host named '{host}' is known; `vmha host ls` lists the hosts"),
        exit_code: 3,
    })?;
    Ok(h.drain)
}

/// Draws one update: a bar per migration in flight, and the overall count.
fn show(
    bars: &MultiProgress,
    style: &ProgressStyle,
    overall: &ProgressBar,
    per_vm: &mut BTreeMap<String, ProgressBar>,
    host: &str,
    d: &DrainPlan,
    ops: &[Operation],
) {
    for op in ops.iter().filter(|o| o.kind == "migrate" && o.source == host) {
        let bar = per_vm.entry(op.vm.clone()).or_insert_with(|| {
            let b = bars.add(ProgressBar::new(0));
            b.set_style(style.clone());
            b.set_message(format!("{} -> {}", op.vm, op.target));
            b
        });
        if op.data_total > 0 {
            bar.set_length(op.data_total);
            bar.set_position(op.data_processed);
        }
    }
    for s in d.steps.iter().filter(|s| s.state != "migrating") {
        if let Some(b) = per_vm.remove(&s.vm) {
            b.finish_and_clear();
        }
    }
    overall.set_position(
        d.steps.iter().filter(|s| !matches!(s.state.as_str(), "pending" | "migrating")).count() as u64,
    );
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    controllers: &Controllers,
    c: &mut Client,
    fmt: Format,
    host: String,
    dry_run: bool,
    no_wait: bool,
    wait: bool,
    allow_restart: bool,
) -> Result<ExitCode, Failure> {
    let running = current(c, &host).await?.filter(|d| d.state == "draining");
    let plan = match running {
        Some(p) if wait => p,
        _ => c.drain(DrainRequest { host: host.clone(), dry_run, allow_restart }).await?.into_inner(),
    };
    if dry_run || no_wait {
        match fmt {
            Format::Json => output::json(&plan),
            Format::Table | Format::Csv => {
                plan_table(&plan);
                if no_wait {
                    println!(
                        "draining {host}; `vmha host drain {host} --wait` follows it, `vmha events --follow` too"
                    );
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let bars = if fmt == Format::Table {
        MultiProgress::new()
    } else {
        MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    };
    let overall = bars.add(ProgressBar::new(plan.steps.len() as u64));
    overall.set_style(
        ProgressStyle::with_template("{msg:30} [{bar:30}] {pos}/{len} VMs {elapsed}").expect("template"),
    );
    overall.set_message(format!("draining {host}"));
    let style = ProgressStyle::with_template("  {msg:28} [{bar:30}] {bytes}/{total_bytes}")
        .expect("template")
        .progress_chars("=> ");
    let mut per_vm: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let mut unreachable_since: Option<Instant> = None;
    // The controller pushes each change; a stream that breaks (the controller restarted, or a
    // standby took over) is opened again on whichever controller leads.
    let last = 'follow: loop {
        let failure = match c.watch_drain(WatchDrainRequest { host: host.clone() }).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(p)) => {
                            unreachable_since = None;
                            let d = p.drain.unwrap_or_default();
                            show(&bars, &style, &overall, &mut per_vm, &host, &d, &p.operations);
                            if d.state != "draining" {
                                break 'follow d;
                            }
                        }
                        Ok(None) => {
                            break Failure::from(tonic::Status::unavailable("the drain's stream ended"));
                        }
                        // The controller sends no Unknown of its own: a stream that breaks so
                        // lost its connection (the controller was killed while it streamed).
                        Err(status) if status.code() == tonic::Code::Unknown => {
                            break Failure {
                                message: format!(
                                    "the connection to the controller broke: {}",
                                    status.message()
                                ),
                                exit_code: UNAVAILABLE,
                            };
                        }
                        Err(status) => break Failure::from(status),
                    }
                }
            }
            Err(status) => Failure::from(status),
        };
        // A controller restarting (a crash, an upgrade), or a standby taking over, resumes the
        // drain: wait for it.
        if failure.exit_code != UNAVAILABLE || unreachable_since.is_some_and(|t| t.elapsed() >= GIVE_UP) {
            return Err(failure);
        }
        if unreachable_since.is_none() {
            let _ = bars.println(format!(
                "{}; waiting for it (the drain goes on without it and resumes when it is back)",
                failure.message
            ));
        }
        unreachable_since.get_or_insert_with(Instant::now);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Another controller may lead by now.
        if let Ok(leader) = controllers.connect().await {
            *c = leader;
        }
    };
    overall.finish_and_clear();
    match fmt {
        Format::Json => output::json(&last),
        Format::Table | Format::Csv => {
            plan_table(&last);
            println!("drain of {host} {}: {}", last.state, last.message);
        }
    }
    Ok(if last.state == "done" { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
