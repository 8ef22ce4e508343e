//! `bench/scale` as a smoke test (issue 13): 100 simulated hosts with 25 VMs each against a
//! real controller and the lab's PostgreSQL. It must run through every phase, and the hosts it
//! kills must have all their protected VMs started elsewhere. No timing is asserted: the
//! figures are the benchmark's, printed for the log.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn bench_scale_runs_and_a_dead_hosts_vms_are_started() {
    let out = Command::new(repo().join("bench/scale"))
        .args(["--hosts", "100", "--vms", "25", "--seconds", "20"])
        .output()
        .expect("run bench/scale");
    let down = Command::new(repo().join("deploy/lab/down")).status().map(|s| s.success()).unwrap_or(false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "bench/scale failed:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(down, "deploy/lab/down failed; the lab may still run");
    for line in [
        "discovery: 2500 VMs recorded",
        "steady state over",
        "status page refresh:",
        "controller frozen for 10 s",
    ] {
        assert!(stdout.contains(line), "no '{line}' in the output");
    }
    for lost in ["one host lost:", "a rack of 25 hosts lost:"] {
        let line = stdout.lines().find(|l| l.starts_with(lost)).unwrap_or_else(|| panic!("no '{lost}' line"));
        assert!(line.contains("start commands for all"), "{line}");
    }
}
