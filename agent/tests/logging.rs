//! How the agent logs (issue 15): text without ANSI codes when standard error is not a
//! terminal (journald would store them), and JSON lines whose fields stay fields. The real
//! binary, on libvirt's in-process test driver, with no controller reachable.

use std::process::{Command, Stdio};
use std::time::Duration;

fn agent_log(format: &str) -> String {
    let dir = std::env::temp_dir().join(format!("vmha-logging-{format}-{}", std::process::id()));
    let agent = Command::new(env!("CARGO_BIN_EXE_vmha-agent"))
        .args(["--log-format", format, "--host-name", "kvm9", "--controller", "http://127.0.0.1:9"])
        .args(["--libvirt-uri", "test:///default", "--insecure-dev", "--peer-listen", "127.0.0.1:0"])
        .args(["--no-watchdog", "--state-dir"])
        .arg(&dir)
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // SIGTERM, then the output it wrote.
    Command::new("kill").arg(agent.id().to_string()).status().unwrap();
    let out = agent.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn text_logs_have_no_colour_codes_off_a_terminal() {
    let log = agent_log("text");
    assert!(log.contains("vmha-agent starting") && log.contains("host=kvm9"), "{log}");
    assert!(!log.contains('\x1b'), "ANSI escape codes in a log that is not a terminal: {log:?}");
}

#[test]
fn json_logs_are_one_object_per_line_with_the_host_as_a_field() {
    let log = agent_log("json");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let start = lines.iter().find(|l| l["message"] == "vmha-agent starting").expect("the start line");
    assert_eq!(start["host"], "kvm9", "{start}");
    assert_eq!(start["level"], "INFO", "{start}");
}
