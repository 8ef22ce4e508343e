//! `vmha vm start` and `vmha vm stop`: ask, then follow until the VM runs (or is off).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use vmha_proto::v1::{GetVmRequest, StartVmRequest, StopVmRequest, Vm, WatchOperationRequest};

use crate::commands::{Client, Failure, show_vm};
use crate::output::{self, Format};

fn spinner(fmt: Format, message: String) -> ProgressBar {
    let bar = if fmt == Format::Table { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"));
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Asks for the start, then waits (unless `no_wait`) until the VM runs, its restart gives up,
/// or `wait` has passed. Exit 1 if it does not run by then.
pub async fn start(
    c: &mut Client,
    fmt: Format,
    vm: String,
    on: Option<String>,
    no_wait: bool,
    wait: Duration,
) -> Result<ExitCode, Failure> {
    let mut v = c.start_vm(StartVmRequest { vm, on: on.unwrap_or_default() }).await?.into_inner();
    if no_wait {
        show_vm(fmt, &v);
        return Ok(ExitCode::SUCCESS);
    }
    let bar = spinner(fmt, format!("starting {}", v.name));
    let until = Instant::now() + wait;
    while v.state != "running" && Instant::now() < until {
        if !v.why_not_running.is_empty() {
            bar.set_message(format!("starting {}: {}", v.name, v.why_not_running));
        }
        // A restart that gave up says so and needs the operator again.
        if v.why_not_running.contains("gave up") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        v = c.get_vm(GetVmRequest { vm: v.uuid.clone() }).await?.into_inner();
    }
    bar.finish_and_clear();
    let runs = v.state == "running";
    match fmt {
        Format::Json => output::json(&v),
        Format::Table | Format::Csv if runs => println!("{} runs on {}", v.name, v.host),
        Format::Table | Format::Csv => {
            println!(
                "{} is not running after {}: {}",
                v.name,
                humantime::format_duration(wait),
                v.why_not_running
            );
            println!("follow it with `vmha vm show {}` and `vmha events`", v.name);
        }
    }
    Ok(if runs { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Asks for the stop, then follows the shutdown (unless `no_wait`) to its end. Exit 1 if it
/// failed: the VM then still runs, and vmha keeps it up as before.
pub async fn stop(
    c: &mut Client,
    fmt: Format,
    vm: String,
    timeout: Duration,
    no_wait: bool,
) -> Result<ExitCode, Failure> {
    let reply = c.stop_vm(StopVmRequest { vm, timeout_ms: timeout.as_millis() as u64 }).await?.into_inner();
    let Some(mut op) = reply.operation.filter(|_| !no_wait) else {
        let v = reply.vm.unwrap_or_default();
        match fmt {
            Format::Json => output::json(&v),
            Format::Table | Format::Csv => println!("{}: {}", v.name, stopped_line(&v)),
        }
        return Ok(ExitCode::SUCCESS);
    };
    let bar = spinner(
        fmt,
        format!(
            "shutting {} down on {} (destroyed after {})",
            op.vm,
            op.source,
            humantime::format_duration(timeout)
        ),
    );
    let mut stream = c.watch_operation(WatchOperationRequest { id: op.id.clone() }).await?.into_inner();
    while let Some(update) = stream.message().await? {
        let done = crate::commands::ended(&update.state);
        op = update;
        if done {
            break;
        }
    }
    bar.finish_and_clear();
    let v = c.get_vm(GetVmRequest { vm: op.vm_uuid.clone() }).await?.into_inner();
    let ok = op.state == "succeeded";
    match fmt {
        Format::Json => output::json(&op),
        Format::Table | Format::Csv if ok => println!("{}: {}", v.name, stopped_line(&v)),
        Format::Table | Format::Csv => {
            println!("shutdown of {} on {} {}: {}", op.vm, op.source, op.state, op.error)
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn stopped_line(v: &Vm) -> String {
    if v.why_not_running.is_empty() {
        format!("stopped by {}", v.stopped_by)
    } else {
        v.why_not_running.clone()
    }
}
