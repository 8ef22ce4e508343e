//! `--shards K`: the simulated hosts spread over K processes, which this one starts and speaks
//! for. One process holds every simulated host's peer connections (both ends) under one
//! file-descriptor limit and runs every lease loop on its own threads; spread over several,
//! peer polls cross processes over real TCP as they cross hosts. The parent passes its
//! commands on (a `kill N` split between the shards), and prints what they report, added up,
//! in the lines one process prints.

use std::collections::HashMap;
use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::ChildStdin;

use crate::reports::{Killed, Report};

/// What a shard prints before a report's JSON.
pub const PREFIX: &str = "shard: ";

/// Runs `shards` processes of this program, each with `--shard I` added to this one's
/// arguments, until `duration` is over; asks them for figures every `report` (0: only when
/// told `stats`).
pub async fn run(shards: usize, report: Duration, duration: Duration) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("find this program")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel::<Report>();
    let mut children = Vec::new();
    let mut stdins = Vec::new();
    for shard in 0..shards {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(&args).args(["--shard", &shard.to_string(), "--report", "0"]);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the shard when
        // this process dies, so that a bench that kills the parent leaves no shard behind.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start shard {shard}"))?;
        stdins.push(child.stdin.take().context("shard stdin")?);
        let out = child.stdout.take().context("shard stdout")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match line.strip_prefix(PREFIX).map(serde_json::from_str::<Report>) {
                    Some(Ok(r)) => {
                        let _ = tx.send(r);
                    }
                    Some(Err(e)) => {
                        eprintln!("simagent: shard {shard} printed a report that does not parse: {e}")
                    }
                    None => println!("{line}"),
                }
            }
        });
        children.push(child);
    }
    let (cmd_tx, mut commands) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if cmd_tx.send(line).is_err() {
                return;
            }
        }
    });
    let end = tokio::time::Instant::now() + duration;
    let mut ticks = tokio::time::interval(if report.is_zero() { duration } else { report });
    ticks.tick().await;
    let mut pending: HashMap<&'static str, Vec<Report>> = HashMap::new();
    // Hosts killed: their VMs' starts are looked for on every shard, every 100 ms, for 120 s.
    let mut killed: Option<(Killed, tokio::time::Instant)> = None;
    let mut ask_starts = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = ask_starts.tick(), if killed.is_some() => {
                let since = killed.as_ref().map_or(0, |(k, _)| k.killed_at);
                broadcast(&mut stdins, &format!("starts {since}")).await;
            }
            () = tokio::time::sleep_until(end) => return Ok(()),
            _ = ticks.tick(), if !report.is_zero() => broadcast(&mut stdins, "stats").await,
            Some(line) = commands.recv() => match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["kill", n] => match n.parse::<usize>() {
                    Ok(n) => {
                        for (i, stdin) in stdins.iter_mut().enumerate() {
                            let share = n / shards + usize::from(i < n % shards);
                            send(stdin, &format!("kill {share}")).await;
                        }
                    }
                    Err(_) => eprintln!("simagent: kill N: '{n}' is not a number"),
                },
                _ => broadcast(&mut stdins, &line).await,
            },
            Some(r) = reports.recv() => {
                let kind = r.kind();
                let held = pending.entry(kind).or_default();
                held.push(r);
                if held.len() == shards
                    && let Some(sum) = Report::merge(std::mem::take(held))
                {
                    match (sum, killed.take()) {
                        (Report::Killed(k), _) => {
                            killed = Some((k, tokio::time::Instant::now() + Duration::from_secs(120)));
                        }
                        (Report::Starts(starts), Some((mut k, deadline))) => {
                            k.count_starts(&starts);
                            if k.started == k.total || tokio::time::Instant::now() > deadline {
                                println!("{}", Report::Killed(k));
                            } else {
                                killed = Some((k, deadline));
                            }
                        }
                        (Report::Starts(_), None) => {}
                        (sum, waiting) => {
                            killed = waiting;
                            println!("{sum}");
                        }
                    }
                }
            }
        }
    }
}

async fn broadcast(stdins: &mut [ChildStdin], line: &str) {
    for stdin in stdins {
        send(stdin, line).await;
    }
}

async fn send(stdin: &mut ChildStdin, line: &str) {
    if let Err(e) = stdin.write_all(format!("{line}\n").as_bytes()).await {
        eprintln!("simagent: a shard did not take '{line}': {e}");
    }
}
