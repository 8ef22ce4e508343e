//! The agent under systemd (`Type=notify`, `WatchdogSec`): it says READY=1 once started and
//! WATCHDOG=1 while its lease loop runs. Checked the way systemd listens, on a datagram socket
//! named by NOTIFY_SOCKET, with the real binary (libvirt's in-process test driver, no
//! controller reachable).

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_agent_says_ready_and_keeps_saying_its_loop_runs() {
    let dir = std::env::temp_dir().join(format!("vmha-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    vmha_tls::ca::init(&dir, 1).unwrap();
    let req = vmha_tls::ca::Request {
        role: vmha_tls::Role::Host,
        name: "kvm9".into(),
        dns: vec![],
        ips: vec![],
        days: 1,
    };
    let host = vmha_tls::ca::issue(&dir, &dir.join("pki"), &req).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_vmha-agent"))
        .args([
            "--host-name",
            "kvm9",
            "--controller",
            "https://127.0.0.1:9",
            "--libvirt-uri",
            "test:///default",
        ])
        .arg("--tls-ca")
        .arg(dir.join(vmha_tls::ca::CA_CERT))
        .arg("--tls-cert")
        .arg(&host.cert)
        .arg("--tls-key")
        .arg(&host.key)
        .args(["--peer-listen", "127.0.0.1:0", "--no-watchdog", "--state-dir"])
        .arg(dir.join("state"))
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while started.elapsed() < Duration::from_secs(5) {
        let Ok(n) = sock.recv(&mut buf) else { break };
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
        if seen.iter().any(|m| m.contains("READY=1"))
            && seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3
        {
            break;
        }
    }
    agent.kill().unwrap();
    agent.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(seen.iter().any(|m| m.contains("READY=1")), "no READY=1 in {seen:?}");
    assert!(
        seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        "no steady WATCHDOG=1 in {seen:?}"
    );
}
