//! `vmha host drain`: the plan, then progress bars (one per migration and one overall) until
//! the drain ends; or detach and re-attach.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use vmha_proto::v1::{DrainPlan, DrainRequest, ListHostsRequest, Operation, StatusRequest};

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
}

/// The exit code of a controller (or its database) that cannot be reached.
const UNAVAILABLE: u8 = 5;

/// How long a drain is followed while the controller cannot be reached.
const GIVE_UP: Duration = Duration::from_secs(120);

/// The drain of `host` and the operations in flight.
async fn poll(c: &mut Client, host: &str) -> Result<(DrainPlan, Vec<Operation>), Failure> {
    let d = current(c, host).await?.unwrap_or_default();
    let ops = c.status(StatusRequest {}).await?.into_inner().active_operations;
    Ok((d, ops))
}

async fn current(c: &mut Client, host: &str) -> Result<Option<DrainPlan>, Failure> {
    let hosts = c.list_hosts(ListHostsRequest {}).await?.into_inner().hosts;
    let h = hosts.into_iter().find(|h| h.name == host).ok_or_else(|| Failure {
        message: format!("no host named '{host}' is known; `vmha host ls` lists the hosts"),
        exit_code: 3,
    })?;
    Ok(h.drain)
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
            Format::Table => {
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
    let last = loop {
        let (d, ops) = match poll(c, &host).await {
            Ok(polled) => {
                unreachable_since = None;
                polled
            }
            // A controller restarting (a crash, an upgrade), or a standby taking over, resumes the
            // drain: wait for it.
            Err(e)
                if e.exit_code == UNAVAILABLE && unreachable_since.is_none_or(|t| t.elapsed() < GIVE_UP) =>
            {
                if unreachable_since.is_none() {
                    let _ = bars.println(format!(
                        "{}; waiting for it (the drain goes on without it and resumes when it is back)",
                        e.message
                    ));
                }
                unreachable_since.get_or_insert_with(Instant::now);
                tokio::time::sleep(Duration::from_millis(500)).await;
                // Another controller may lead by now.
                if let Ok(leader) = controllers.connect().await {
                    *c = leader;
                }
                continue;
            }
            Err(e) => return Err(e),
        };
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
        if d.state != "draining" {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    overall.finish_and_clear();
    match fmt {
        Format::Json => output::json(&last),
        Format::Table => {
            plan_table(&last);
            println!("drain of {host} {}: {}", last.state, last.message);
        }
    }
    Ok(if last.state == "done" { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
