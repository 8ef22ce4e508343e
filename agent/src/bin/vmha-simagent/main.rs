//! Simulated vmha agents for `bench/scale`: N hosts in one process, each with its own gRPC
//! connection to the controller, registering, heartbeating with M running VMs on the leader's
//! schedule and echoing its stamps as the real agent does. Each runs the agent's real lease
//! state machine (`LeaseShell`, with peer polls over real gRPC to the other simulated hosts'
//! real peer endpoints, 127.0.0.1:20001 and up) on a fake hypervisor, and carries out the
//! controller's start and destroy commands on it. No libvirt, no watchdog: what is measured is
//! the controller's cost, and what the agents' peer polls cost each other.
//!
//! Prints, every `--report` period (or when asked with `stats`), the heartbeats sent and answered, the share that earned a
//! lease, the answer latency (p50/p99), the bytes per answer, peer polls per second and the
//! hosts that have self-fenced. Takes commands on its standard input, one per line:
//! - `kill N`: N more hosts lose power (their agents, VMs and peer endpoints stop); once the
//!   controller has sent a start for each of their protected VMs (or after 120 s) it prints
//!   when their leases ended and when the last start came;
//! - `mark`: starts counting peer polls and self-fences; `polls` prints them since the mark.
//!
//! With `--shards K` the hosts are spread over K processes of this program (`shards`).

mod reports;
mod shards;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use reports::{Killed, Leased, Polls, Protected, Report, Stats};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use vmha_agent::fd_limit::Limit;
use vmha_agent::hypervisor::Hypervisor;
use vmha_agent::hypervisor::fake::FakeHypervisor;
use vmha_agent::lease::{LeaseShell, roster_update};
use vmha_agent::peer::PeerApi;
use vmha_engine::{Millis, Timings};
use vmha_proto::v1::agent_service_client::AgentServiceClient;
use vmha_proto::v1::command::Kind;
use vmha_proto::v1::operator_service_client::OperatorServiceClient;
use vmha_proto::v1::peer_service_server::PeerServiceServer;
use vmha_proto::v1::{
    CommandsRequest, DomainState, HeartbeatRequest, HostFacts, OperationResult, RegisterRequest,
    SetProtectionRequest, WatchdogStatus,
};
use vmha_tls::Transport;

/// Simulated vmha agents against a controller started with --insecure-dev (the hosts are
/// named in a header; TLS is measured by bench/mtls).
#[derive(Debug, Parser)]
#[command(version, about, args_override_self = true)]
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
    /// Of those, how many to protect on each host (through the operator API, once every host
    /// holds a lease).
    #[arg(long, default_value_t = 4)]
    protect_per_host: usize,
    /// How long to run.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How often to print figures (0: only when asked with `stats`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    report: Duration,
    /// The first simulated host's peer port (the others follow).
    #[arg(long, default_value_t = 20001)]
    peer_port: u16,
    /// Spread the hosts over this many processes (this one starts them and adds up what they
    /// report): peer polls then cross processes over TCP, and no one process's file limit or
    /// threads bound the run.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    shards: u16,
    /// Which of the shards this process is (set by the parent).
    #[arg(long, hide = true)]
    shard: Option<u16>,
}

/// What all simulated hosts saw in the current report period.
struct Tally {
    sent: AtomicU64,
    answered: AtomicU64,
    leased: AtomicU64,
    reply_bytes: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    /// Peer polls answered by any simulated host: in this period, and since `mark`.
    peer_polls: AtomicU64,
    peer_polls_marked: AtomicU64,
    /// The most file descriptors this process held at once since `mark`: all the simulated
    /// hosts' peer connections, both ends, share one process's limit.
    open_files_marked: AtomicU64,
    /// When the current report period began.
    period: Mutex<Instant>,
    /// How late this process's own 50 ms ticks came, in this period and since `mark`.
    tick_late_us: Mutex<Vec<u64>>,
    tick_late_marked_us: Mutex<Vec<u64>>,
}

/// One simulated host.
struct SimHost {
    name: String,
    lease: Arc<LeaseShell>,
    hv: FakeHypervisor,
    protected: Vec<String>,
    /// Unix ms at which its newest lease ends, in its own view.
    lease_end_unix_ms: AtomicU64,
    ever_fenced: AtomicBool,
    /// Its agent, lease loop and peer endpoint, aborted when it loses power.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    alive: AtomicBool,
}

struct Sim {
    flags: Flags,
    tally: Tally,
    hosts: Vec<Arc<SimHost>>,
    /// Unix ms of the latest start command for each VM.
    starts: Mutex<HashMap<String, u64>>,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    if flags.shards > 1 && flags.shard.is_none() {
        return shards::run(usize::from(flags.shards), flags.report, flags.duration).await;
    }
    // The lease state machines' own lines (why a host self-fenced) go to the log; only errors
    // unless VMHA_SIM_LOG says more (a filter like RUST_LOG): a thousand hosts' warnings
    // would drown it.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMHA_SIM_LOG").unwrap_or_else(|_| "error".into()),
        )
        .with_ansi(false)
        .init();
    // All the simulated hosts' peer connections, both ends, share this process's limit: raised
    // as the agent raises its own.
    if let Err(e) = vmha_agent::fd_limit::raise_soft_to_hard() {
        eprintln!("simagent: {e}");
    }
    let facts = HostFacts {
        cpus: 64,
        memory_total_kib: 512 << 20,
        memory_free_kib: 256 << 20,
        cpu_model: "sim".into(),
        libvirt_version: "9.0.0".into(),
        hypervisor_version: "sim".into(),
        lock_manager: "lockd".into(),
    };
    // A shard simulates its slice of the hosts, named and numbered as in one process.
    let (shard, of) = (usize::from(flags.shard.unwrap_or(0)), usize::from(flags.shards));
    let mine = shard * flags.hosts / of + 1..=(shard + 1) * flags.hosts / of;
    let first = *mine.start();
    let hosts = mine
        .map(|i| {
            let name = format!("sim{i:04}");
            let hv = FakeHypervisor::default();
            hv.set_facts(facts.clone());
            let uuids: Vec<String> =
                (0..flags.vms_per_host).map(|v| format!("{i:08x}-0000-4000-8000-{v:012x}")).collect();
            for (v, uuid) in uuids.iter().enumerate() {
                hv.add_running(uuid, &format!("{name}-vm{v:02}"));
            }
            let lease = LeaseShell::new(&name, Timings::default(), None);
            lease.without_qemu_processes();
            Arc::new(SimHost {
                lease,
                name,
                hv,
                protected: uuids.into_iter().take(flags.protect_per_host).collect(),
                lease_end_unix_ms: AtomicU64::new(0),
                ever_fenced: AtomicBool::new(false),
                tasks: Mutex::default(),
                alive: AtomicBool::new(true),
            })
        })
        .collect();
    let tally = Tally {
        sent: AtomicU64::default(),
        answered: AtomicU64::default(),
        leased: AtomicU64::default(),
        reply_bytes: AtomicU64::default(),
        latencies_us: Mutex::default(),
        peer_polls: AtomicU64::default(),
        peer_polls_marked: AtomicU64::default(),
        open_files_marked: AtomicU64::default(),
        period: Mutex::new(Instant::now()),
        tick_late_us: Mutex::default(),
        tick_late_marked_us: Mutex::default(),
    };
    let sim = Arc::new(Sim { flags, tally, hosts, starts: Mutex::default() });
    let end = Instant::now() + sim.flags.duration;
    for (i, host) in sim.hosts.iter().enumerate() {
        start_host(&sim, host, sim.flags.peer_port + (first - 1 + i) as u16)?;
        // A hundred hosts a second, as agents starting over a rolling restart would.
        if (i + 1) % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tokio::spawn(protect(sim.clone()));
    tokio::spawn(commands_from_stdin(sim.clone()));
    tokio::spawn(watch_fences(sim.clone()));
    tokio::spawn(watch_ticks(sim.clone()));
    if sim.flags.report.is_zero() {
        tokio::time::sleep_until(end.into()).await;
        return Ok(());
    }
    let mut tick = tokio::time::interval(sim.flags.report);
    tick.tick().await;
    while Instant::now() < end {
        tick.tick().await;
        report(&sim);
    }
    Ok(())
}

/// Starts one host's agent, lease loop and peer endpoint.
fn start_host(sim: &Arc<Sim>, host: &Arc<SimHost>, port: u16) -> anyhow::Result<()> {
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let peer_api = PeerApi { host: host.name.clone(), lease: host.lease.clone(), mtls: false };
    let counter = sim.clone();
    let peers = tonic::transport::Server::builder().add_service(PeerServiceServer::with_interceptor(
        peer_api,
        move |req: tonic::Request<()>| {
            counter.tally.peer_polls.fetch_add(1, Ordering::Relaxed);
            counter.tally.peer_polls_marked.fetch_add(1, Ordering::Relaxed);
            Ok(req)
        },
    ));
    let mut tasks = lock(&host.tasks);
    tasks.push(tokio::spawn(async move {
        if let Err(e) = peers.serve(listen).await {
            eprintln!("simagent: peer endpoint {listen}: {e}");
        }
    }));
    let hv: Arc<dyn Hypervisor> = Arc::new(host.hv.clone());
    let span = tracing::error_span!("sim", host = %host.name);
    tasks.push(tokio::spawn(tracing::Instrument::instrument(
        host.lease.clone().run(hv, Transport::InsecureDev),
        span,
    )));
    let (sim, host_) = (sim.clone(), host.clone());
    tasks.push(tokio::spawn(async move {
        loop {
            if let Err(e) = session(&sim, &host_, port).await {
                eprintln!("{}: {e:#}; reconnecting", host_.name);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }));
    Ok(())
}

/// Names the host in every request, as `--insecure-dev` asks.
#[derive(Clone)]
struct HostHeader(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for HostHeader {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(vmha_proto::HOST_HEADER, self.0.clone());
        Ok(req)
    }
}

type Client = AgentServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, HostHeader>,
>;

/// One host's session with the controller: register, take commands, heartbeat when the
/// leader says.
async fn session(sim: &Arc<Sim>, host: &Arc<SimHost>, port: u16) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(sim.flags.controller.clone())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .context("connect")?;
    let mut client: Client = AgentServiceClient::with_interceptor(channel, HostHeader(host.name.parse()?));
    let facts = host.hv.host_facts()?;
    let reg = client
        .register(RegisterRequest {
            migration_uri: format!("qemu+tls://{}/system", host.name),
            facts: Some(facts.clone()),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            peer_address: format!("127.0.0.1:{port}"),
        })
        .await
        .context("register")?
        .into_inner();
    host.lease.see_epoch(reg.epoch)?;
    if let Some(t) = reg.timings {
        let t = Timings {
            heartbeat_interval_ms: t.heartbeat_interval_ms,
            lease_ttl_ms: t.lease_ttl_ms,
            fence_margin_ms: t.fence_margin_ms,
            max_transit_ms: t.max_transit_ms,
            guard_ms: t.guard_ms,
        };
        host.lease.adopt_timings(t).map_err(anyhow::Error::msg)?;
    }
    let commands = client.commands(CommandsRequest {}).await.context("commands")?.into_inner();
    let carry_out = tokio::spawn(carry_out(sim.clone(), host.clone(), client.clone(), commands));
    let result = heartbeats(sim, host, &mut client, reg.epoch, reg.stamp_ms, reg.heartbeat_interval_ms).await;
    carry_out.abort();
    result
}

/// Heartbeats until one fails.
async fn heartbeats(
    sim: &Sim,
    host: &SimHost,
    client: &mut Client,
    epoch: u64,
    stamp: u64,
    interval_ms: u64,
) -> anyhow::Result<()> {
    let tally = &sim.tally;
    let interval = Duration::from_millis(interval_ms.max(100));
    let (mut epoch, mut stamp, mut at) = (epoch, stamp, Instant::now());
    let mut xml_sent: HashSet<String> = HashSet::new();
    let mut seq = 0;
    loop {
        seq += 1;
        let mut domains = host.hv.domains()?;
        for d in domains.iter_mut().filter(|d| xml_sent.contains(&d.uuid)) {
            d.xml.clear();
        }
        let sending: Vec<String> =
            domains.iter().filter(|d| !d.xml.is_empty()).map(|d| d.uuid.clone()).collect();
        let req = HeartbeatRequest {
            seq,
            facts: Some(host.hv.host_facts()?),
            domains,
            echo_stamp_ms: stamp,
            echo_held_ms: at.elapsed().as_millis() as u64,
            echo_epoch: epoch,
            self_fenced: host.lease.self_fenced(),
            roster_version: Some(host.lease.roster_version()),
            // What the real agent reports once its watchdog is armed: the controller then
            // declares a silent host dead on its lease, with no operator needed.
            watchdog: Some(WatchdogStatus {
                device: "/dev/watchdog".into(),
                armed: true,
                timeout_ms: 3000,
                ..Default::default()
            }),
            ..Default::default()
        };
        let (sent, sent_at, sent_unix) = (Instant::now(), host.lease.now(), unix_ms());
        tally.sent.fetch_add(1, Ordering::Relaxed);
        let mut answer = tokio::time::timeout(interval * 2, client.heartbeat(req))
            .await
            .context("heartbeat timed out")?
            .context("heartbeat")?
            .into_inner();
        // The agent echoes how long it held the answer from here (SAFETY.md, 1).
        let received = Instant::now();
        let took = sent.elapsed();
        tally.answered.fetch_add(1, Ordering::Relaxed);
        tally.reply_bytes.fetch_add(prost::Message::encoded_len(&answer) as u64, Ordering::Relaxed);
        if answer.lease_ttl_ms > 0 {
            tally.leased.fetch_add(1, Ordering::Relaxed);
            host.lease_end_unix_ms.store(sent_unix + answer.lease_ttl_ms, Ordering::Relaxed);
        }
        lock(&tally.latencies_us).push(took.as_micros() as u64);
        let not_taken: HashSet<&String> = answer.xml_not_taken.iter().collect();
        xml_sent.extend(sending.into_iter().filter(|u| !not_taken.contains(u)));
        let roster = roster_update(&mut answer);
        let cluster_hosts = answer.cluster_hosts as usize;
        host.lease.answered(answer.epoch, Millis(sent_at.0), answer.lease_ttl_ms, cluster_hosts, roster)?;
        (epoch, stamp, at) = (answer.epoch, answer.stamp_ms, received);
        let wait = Duration::from_millis(answer.next_heartbeat_in_ms);
        tokio::time::sleep(if wait.is_zero() || wait > interval * 2 { interval } else { wait }).await;
    }
}

/// Carries out the controller's commands on the fake hypervisor, at once.
async fn carry_out(
    sim: Arc<Sim>,
    host: Arc<SimHost>,
    mut client: Client,
    mut commands: tonic::Streaming<vmha_proto::v1::Command>,
) {
    while let Some(Ok(cmd)) = commands.next().await {
        let done = match cmd.kind {
            Some(Kind::Start(s)) => host.hv.define_and_start(&s.xml).map(|uuid| {
                lock(&sim.starts).insert(uuid, unix_ms());
            }),
            Some(Kind::Destroy(d)) => host.hv.destroy(&d.uuid),
            Some(Kind::Shutdown(d)) => host.hv.shutdown(&d.uuid),
            Some(Kind::Reset(r)) => host.hv.reset(&r.uuid),
            // Nothing migrates here, so there is nothing to abort, and a cancel has no result.
            Some(Kind::Cancel(_)) => continue,
            Some(Kind::Migrate(_)) | None => Err(vmha_agent::hypervisor::HypervisorError::Host {
                op: "migrate",
                message: "simulated hosts do not migrate".into(),
            }),
        };
        let result = OperationResult {
            operation_id: cmd.operation_id,
            ok: done.is_ok(),
            error: done.err().map(|e| e.to_string()).unwrap_or_default(),
            elapsed_ms: 1,
            ..Default::default()
        };
        if let Err(e) = client.report_result(result).await {
            eprintln!("{}: reporting a result: {e}", host.name);
        }
    }
}

/// Protects each host's first VMs once every host holds a lease, 32 requests at a time (what the controller serves at once on one connection).
async fn protect(sim: Arc<Sim>) {
    let started = Instant::now();
    while sim.hosts.iter().any(|h| h.lease.may_start().is_err()) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let Ok(channel) = tonic::transport::Endpoint::from_shared(sim.flags.controller.clone()) else { return };
    let client = match channel.connect().await {
        Ok(c) => OperatorServiceClient::new(c),
        Err(e) => return eprintln!("simagent: cannot reach the operator API: {e}"),
    };
    emit(&sim, Report::Leased(Leased { after_s: started.elapsed().as_secs_f64() }));
    let t0 = Instant::now();
    let wanted: Vec<String> = sim.hosts.iter().flat_map(|h| h.protected.clone()).collect();
    let limit = Arc::new(tokio::sync::Semaphore::new(32));
    let mut calls = tokio::task::JoinSet::new();
    for uuid in wanted.clone() {
        let (mut client, limit) = (client.clone(), limit.clone());
        calls.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let req = SetProtectionRequest { vm: uuid.clone(), protected: true, ..Default::default() };
            // Refused for going too fast (the controller's rate limit per caller, which all
            // shards share here): slowed down and asked again, as an operator's script would.
            let mut tries = 0;
            loop {
                match client.set_protection(req.clone()).await {
                    Err(e) if e.code() == tonic::Code::ResourceExhausted && tries < 50 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    done => break done.map(|_| ()).map_err(|e| format!("{uuid}: {}", e.message())),
                }
            }
        });
    }
    let failed: Vec<String> = calls.join_all().await.into_iter().filter_map(Result::err).collect();
    emit(
        &sim,
        Report::Protected(Protected {
            count: wanted.len() - failed.len(),
            secs: t0.elapsed().as_secs_f64(),
            refused: failed.len(),
            example: failed.into_iter().next(),
        }),
    );
}

async fn commands_from_stdin(sim: Arc<Sim>) {
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut marked = (Instant::now(), 0usize);
    while let Some(line) = lines.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["kill", n] => match n.parse::<usize>() {
                Ok(n) => {
                    tokio::spawn(kill(sim.clone(), n));
                }
                Err(_) => eprintln!("simagent: kill N: '{n}' is not a number"),
            },
            ["stats"] => report(&sim),
            ["starts", since] => {
                let since: u64 = since.parse().unwrap_or(0);
                let starts = lock(&sim.starts)
                    .iter()
                    .filter(|(_, t)| **t >= since)
                    .map(|(u, t)| (u.clone(), *t))
                    .collect();
                emit(&sim, Report::Starts(starts));
            }
            ["mark"] => {
                sim.tally.peer_polls_marked.store(0, Ordering::Relaxed);
                sim.tally.open_files_marked.store(0, Ordering::Relaxed);
                lock(&sim.tally.tick_late_marked_us).clear();
                marked = (Instant::now(), fenced(&sim));
            }
            ["polls"] => {
                let polls = sim.tally.peer_polls_marked.load(Ordering::Relaxed);
                let secs = marked.0.elapsed().as_secs_f64();
                let open = sim.tally.open_files_marked.load(Ordering::Relaxed);
                // The soft limit in force (the one that refuses a connection), not the hard one.
                let limit = match vmha_agent::fd_limit::current() {
                    Ok(l) => l.soft,
                    Err(e) => {
                        eprintln!("simagent: cannot read the open-file limit: {e}");
                        Limit::Unlimited
                    }
                };
                // Past 90% of the limit, peer connections were surely refused somewhere.
                let near = matches!(limit, Limit::Finite(n) if u128::from(open) * 10 >= u128::from(n) * 9);
                let polls = Polls {
                    polls,
                    secs,
                    fenced: fenced(&sim),
                    fenced_before: marked.1,
                    open,
                    limit: limit.to_string(),
                    near,
                    tick_late_p99_ms: p99_ms(&lock(&sim.tally.tick_late_marked_us)),
                };
                emit(&sim, Report::Polls(polls));
            }
            _ => eprintln!("simagent: unknown command '{line}' (kill N, stats, mark, polls)"),
        }
    }
}

/// How many live hosts have self-fenced since the start.
fn fenced(sim: &Sim) -> usize {
    sim.hosts
        .iter()
        .filter(|h| h.alive.load(Ordering::Relaxed) && h.ever_fenced.load(Ordering::Relaxed))
        .count()
}

/// Cuts the power of the last `n` live hosts that run protected VMs, then waits for those
/// VMs' starts elsewhere.
async fn kill(sim: Arc<Sim>, n: usize) {
    let killed_at = unix_ms();
    // What runs protected now: a VM protected on one host may have been restarted on another
    // since (its first host self-fenced).
    let all_protected: HashSet<&String> = sim.hosts.iter().flat_map(|h| &h.protected).collect();
    let protected_on = |h: &SimHost| -> Vec<String> {
        (h.hv.domains().unwrap_or_default().into_iter())
            .filter(|d| d.state == DomainState::Running as i32 && all_protected.contains(&d.uuid))
            .map(|d| d.uuid)
            .collect()
    };
    let victims: Vec<(Arc<SimHost>, Vec<String>)> = (sim.hosts.iter().rev())
        .filter(|h| h.alive.load(Ordering::Relaxed))
        .map(|h| (h.clone(), protected_on(h)))
        .filter(|(_, p)| !p.is_empty())
        .take(n)
        .collect();
    for (h, _) in &victims {
        h.alive.store(false, Ordering::Relaxed);
        for t in lock(&h.tasks).drain(..) {
            t.abort();
        }
    }
    let lease_end =
        victims.iter().map(|(h, _)| h.lease_end_unix_ms.load(Ordering::Relaxed)).max().unwrap_or(0);
    let protected: Vec<String> = victims.iter().flat_map(|(_, p)| p.clone()).collect();
    let names: Vec<String> = victims.iter().map(|(h, _)| h.name.clone()).collect();
    let total = protected.len();
    let mut killed = Killed { names, lease_end, started: 0, total, last: 0, protected, killed_at };
    // A shard's dead hosts' VMs may start on another shard's hosts: the parent asks them all.
    if sim.flags.shard.is_none() {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let starts: Vec<(String, u64)> = lock(&sim.starts).iter().map(|(u, t)| (u.clone(), *t)).collect();
            killed.count_starts(&starts);
            if killed.started == total || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    emit(&sim, Report::Killed(killed));
}

/// Notes every host that self-fences, however briefly, and (every second) the files open.
async fn watch_fences(sim: Arc<Sim>) {
    for round in 0u64.. {
        for h in &sim.hosts {
            if h.lease.self_fenced() {
                h.ever_fenced.store(true, Ordering::Relaxed);
            }
        }
        if round % 20 == 0 {
            let open = vmha_agent::fd_limit::open_files().unwrap_or(0);
            sim.tally.open_files_marked.fetch_max(open, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Notes how late this process's own 50 ms ticks come: when they come late, so do the lease
/// loops' and heartbeats' of the hosts it simulates.
async fn watch_ticks(sim: Arc<Sim>) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let due = tick.tick().await;
        let late = due.elapsed().as_micros() as u64;
        lock(&sim.tally.tick_late_us).push(late);
        lock(&sim.tally.tick_late_marked_us).push(late);
    }
}

/// The 99th percentile of microsecond samples, in ms.
fn p99_ms(samples: &[u64]) -> f64 {
    reports::percentile(samples, 0.99).map_or(0.0, |us| us as f64 / 1000.0)
}

/// Prints a report: as text, or for the parent of the shards as JSON.
fn emit(sim: &Sim, report: Report) {
    if sim.flags.shard.is_some() {
        match serde_json::to_string(&report) {
            Ok(json) => println!("{}{json}", shards::PREFIX),
            Err(e) => eprintln!("simagent: cannot encode a {} report: {e}", report.kind()),
        }
    } else {
        println!("{report}");
    }
}

/// Prints the heartbeat figures since the last report, and starts a new period.
fn report(sim: &Sim) {
    let t = &sim.tally;
    let period = lock(&t.period).elapsed().as_secs_f64();
    *lock(&t.period) = Instant::now();
    let late_p99 = p99_ms(&std::mem::take(&mut *lock(&t.tick_late_us)));
    let stats = Stats {
        hosts: sim.hosts.iter().filter(|h| h.alive.load(Ordering::Relaxed)).count(),
        sent: t.sent.swap(0, Ordering::Relaxed),
        answered: t.answered.swap(0, Ordering::Relaxed),
        leased: t.leased.swap(0, Ordering::Relaxed),
        bytes: t.reply_bytes.swap(0, Ordering::Relaxed),
        polls_per_s: t.peer_polls.swap(0, Ordering::Relaxed) as f64 / period,
        fenced: fenced(sim),
        latencies_us: std::mem::take(&mut *lock(&t.latencies_us)),
        tick_late_p99_ms: late_p99,
    };
    emit(sim, Report::Stats(stats));
}
