//! `bench/scale` as a smoke test (issues 13 and 30): 200 simulated hosts with 25 VMs each, in
//! two processes (`--shards 2`: peer polls cross processes over TCP), against a real controller
//! and the lab's PostgreSQL. It must run through every phase, and the hosts it kills must have
//! all their protected VMs started elsewhere. No timing is asserted: the figures are the
//! benchmark's, printed for the log.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn bench_scale_runs_and_a_dead_hosts_vms_are_started() {
    let out = Command::new(repo().join("bench/scale"))
        .args(["--hosts", "200", "--vms", "25", "--seconds", "10", "--shards", "2"])
        .output()
        .expect("run bench/scale");
    let down = Command::new(repo().join("deploy/lab/down")).status().map(|s| s.success()).unwrap_or(false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "bench/scale failed:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(down, "deploy/lab/down failed; the lab may still run");
    for line in [
        "discovery: 5000 VMs recorded",
        "simulated agents in 2 process(es)",
        "protected 800 VMs in",
        "steady state over",
        "simulated agents: CPU",
        "agents: 200 hosts:",
        "status page refresh:",
        "controller frozen for 10 s",
    ] {
        assert!(stdout.contains(line), "no '{line}' in the output");
    }
    let frozen = stdout.lines().find(|l| l.starts_with("controller frozen")).expect("the freeze's line");
    assert!(frozen.contains("peer polls") && frozen.contains("self-fenced"), "{frozen}");
    for lost in ["one host lost:", "a rack of 50 hosts lost:"] {
        let line = stdout.lines().find(|l| l.starts_with(lost)).unwrap_or_else(|| panic!("no '{lost}' line"));
        assert!(line.contains("start commands for all"), "{line}");
    }
}
