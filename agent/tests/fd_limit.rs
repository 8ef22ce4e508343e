//! The fd-limit raise, tested on a child process: the real agent, started with a soft limit on
//! open files far under its hard limit (as systemd's default 1024 would be), raises the soft
//! limit to the hard one and says so. Read from /proc/PID/limits while it runs (libvirt's
//! in-process test driver, no controller reachable).

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The soft and hard "Max open files" of a running process.
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].to_string(), f[4].to_string())
}

#[test]
fn the_agent_raises_its_soft_open_file_limit_to_the_hard_one() {
    let mut ours = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid out-parameter.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours) }, 0);
    let hard = ours.rlim_max.min(4096);
    let soft = 256.min(hard / 2);
    let dir = std::env::temp_dir().join(format!("vmha-fd-limit-{}", std::process::id()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmha-agent"));
    cmd.args(["--host-name", "kvm9", "--controller", "http://127.0.0.1:9"])
        .args(["--libvirt-uri", "test:///default", "--insecure-dev", "--peer-listen", "127.0.0.1:0"])
        .args(["--no-watchdog", "--state-dir"])
        .arg(&dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let lowered = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let agent = cmd.spawn().unwrap();
    let pid = agent.id();
    let (want_soft, want_hard) = (soft.to_string(), hard.to_string());
    let started = Instant::now();
    let mut seen = open_files_limits(pid);
    // Checked as soon as it runs: the lowered limits are those the agent was started with.
    assert_eq!(seen.1, want_hard, "the child's hard limit");
    while seen.0 != want_hard && started.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
        seen = open_files_limits(pid);
    }
    // SIGTERM, then what it logged.
    Command::new("kill").arg(pid.to_string()).status().unwrap();
    let out = agent.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(seen, (want_hard.clone(), want_hard.clone()), "soft limit not raised from {want_soft}: {log}");
    assert!(log.contains(&format!("open files allowed: {want_hard}")), "{log}");
}
