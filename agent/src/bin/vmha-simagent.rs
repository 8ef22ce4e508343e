//! Simulated agents for `bench/scale`: N hosts, each with its own gRPC connection to the
//! controller, registering, heartbeating with M running VMs on the leader's schedule and
//! echoing its stamps (so that heartbeats can earn leases), as the real agent does. No libvirt,
//! no peer endpoint, no watchdog: what is measured is the controller's cost.
//!
//! Prints, every `--report` period, the heartbeats sent and answered, the share that earned a
//! lease, and the answer latency (p50/p99), and exits after `--duration`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tokio::sync::Mutex;
use vmha_proto::v1::agent_service_client::AgentServiceClient;
use vmha_proto::v1::{Domain, DomainState, HeartbeatRequest, HostFacts, RegisterRequest, WatchdogStatus};

/// Simulated vmha agents against a controller started with --insecure-dev (the hosts are
/// named in a header; TLS is measured by bench/mtls).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Flags {
    /// The controller, e.g. http://127.0.0.1:7490.
    #[arg(long)]
    controller: String,
    /// How many hosts to simulate (named sim0001, sim0002, ...).
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// Running VMs per host.
    #[arg(long, default_value_t = 25)]
    vms_per_host: usize,
    /// How long to run.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How often to print figures.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    report: Duration,
}

/// What all simulated hosts saw in the current report period.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    answered: AtomicU64,
    leased: AtomicU64,
    reply_bytes: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let tally = Arc::new(Tally::default());
    let end = Instant::now() + flags.duration;
    for i in 1..=flags.hosts {
        let (tally, controller, vms) = (tally.clone(), flags.controller.clone(), flags.vms_per_host);
        tokio::spawn(async move {
            let name = format!("sim{i:04}");
            loop {
                if let Err(e) = host(&name, i, vms, &controller, &tally).await {
                    eprintln!("{name}: {e:#}; reconnecting");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        // Connections opened at a few hundred a second, as agents starting over a minute would.
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut tick = tokio::time::interval(flags.report);
    tick.tick().await;
    while Instant::now() < end {
        tick.tick().await;
        let sent = tally.sent.swap(0, Ordering::SeqCst);
        let answered = tally.answered.swap(0, Ordering::SeqCst);
        let leased = tally.leased.swap(0, Ordering::SeqCst);
        let bytes = tally.reply_bytes.swap(0, Ordering::SeqCst);
        let mut lat = std::mem::take(&mut *tally.latencies_us.lock().await);
        lat.sort_unstable();
        let pct =
            |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied();
        let ms = |v: Option<u64>| v.map_or("-".into(), |us| format!("{:.1}", us as f64 / 1000.0));
        println!(
            "simagent: {} hosts: {sent} heartbeats sent, {answered} answered, {:.1}% of those earned a lease; \
             latency p50 {} ms, p99 {} ms; {} bytes per answer",
            flags.hosts,
            if answered == 0 { 0.0 } else { leased as f64 * 100.0 / answered as f64 },
            ms(pct(0.5)),
            ms(pct(0.99)),
            bytes.checked_div(answered).unwrap_or(0),
        );
    }
    Ok(())
}

/// One simulated host's session: register, then heartbeat when the leader says.
async fn host(name: &str, index: usize, vms: usize, controller: &str, tally: &Tally) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(controller.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .context("connect")?;
    let header: tonic::metadata::MetadataValue<_> = name.parse()?;
    let mut client = AgentServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert(vmha_proto::HOST_HEADER, header.clone());
        Ok(req)
    });
    let facts = HostFacts {
        cpus: 64,
        memory_total_kib: 512 << 20,
        memory_free_kib: 256 << 20,
        cpu_model: "sim".into(),
        libvirt_version: "9.0.0".into(),
        hypervisor_version: "sim".into(),
        lock_manager: "lockd".into(),
    };
    let reg = client
        .register(RegisterRequest {
            migration_uri: format!("qemu+tls://{name}/system"),
            facts: Some(facts.clone()),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            peer_address: format!("127.0.0.1:{}", 20000 + index),
        })
        .await
        .context("register")?
        .into_inner();
    let interval = Duration::from_millis(reg.heartbeat_interval_ms.max(100));
    let domains: Vec<Domain> = (0..vms)
        .map(|v| {
            let uuid = format!("{index:08x}-0000-4000-8000-{v:012x}");
            let vm = format!("{name}-vm{v:02}");
            Domain {
                xml: format!(
                    "<domain type='kvm'><name>{vm}</name><uuid>{uuid}</uuid><memory unit='KiB'>1048576</memory>\
                     <vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"
                ),
                uuid,
                name: vm,
                state: DomainState::Running as i32,
                memory_kib: 1 << 20,
                vcpus: 1,
                persistent: true,
            }
        })
        .collect();
    let (mut epoch, mut stamp, mut at) = (reg.epoch, reg.stamp_ms, Instant::now());
    let mut xml_sent = false;
    let mut seq = 0;
    loop {
        seq += 1;
        let mut domains = domains.clone();
        if xml_sent {
            domains.iter_mut().for_each(|d| d.xml.clear());
        }
        let req = HeartbeatRequest {
            seq,
            facts: Some(facts.clone()),
            domains,
            echo_stamp_ms: stamp,
            echo_held_ms: at.elapsed().as_millis() as u64,
            echo_epoch: epoch,
            watchdog: Some(WatchdogStatus {
                device: "/dev/watchdog".into(),
                armed: true,
                timeout_ms: 3000,
                ..Default::default()
            }),
            ..Default::default()
        };
        let sent = Instant::now();
        tally.sent.fetch_add(1, Ordering::SeqCst);
        let answer = tokio::time::timeout(interval * 2, client.heartbeat(req))
            .await
            .context("heartbeat timed out")?
            .context("heartbeat")?
            .into_inner();
        let took = sent.elapsed();
        tally.answered.fetch_add(1, Ordering::SeqCst);
        tally.reply_bytes.fetch_add(prost::Message::encoded_len(&answer) as u64, Ordering::SeqCst);
        if answer.lease_ttl_ms > 0 {
            tally.leased.fetch_add(1, Ordering::SeqCst);
        }
        tally.latencies_us.lock().await.push(took.as_micros() as u64);
        xml_sent = answer.xml_not_taken.is_empty();
        (epoch, stamp, at) = (answer.epoch, answer.stamp_ms, Instant::now());
        let wait = Duration::from_millis(answer.next_heartbeat_in_ms);
        tokio::time::sleep(if wait.is_zero() || wait > interval * 2 { interval } else { wait }).await;
    }
}
