//! `bench/peerpoll`: what one prover's peer poll costs a host at scale, over mutual TLS. The
//! peers are real peer endpoints (`PeerApi` on a `LeaseShell` each, with its own host
//! certificate and port), spread over a few processes; the prover is the real agent's lease
//! loop (`LeaseShell::run`) on the host that stands as a volunteer, given a lease that is about
//! to end while no peer holds one. It prints how long its poll took to prove the leader lacks
//! quorum, with new connections (handshakes included) and again with the ones it kept, and
//! what it cost the prover: CPU time and file descriptors.
//!
//! - `certs --dir D --hosts N`: a CA and a certificate for each of N hosts; prints the name of
//!   the host that stands as a volunteer (the prover);
//! - `peers --dir D --hosts N --first A --last B --port P --skip PROVER`: serves hosts A..=B
//!   (host i on port P + i - 1); prints `ready`;
//! - `prove --dir D --hosts N --port P --prover PROVER`: runs the prover and prints figures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use vmha_agent::hypervisor::fake::FakeHypervisor;
use vmha_agent::lease::LeaseShell;
use vmha_agent::peer::PeerApi;
use vmha_engine::roster::{Roster, RosterUpdate};
use vmha_engine::selffence::LeaseKeeper;
use vmha_engine::{Millis, Timings};
use vmha_proto::v1::peer_service_server::PeerServiceServer;
use vmha_tls::transport::Expect;
use vmha_tls::{Credentials, Paths, Role, Transport};

/// The leader epoch every simulated host has seen: peers' answers of another epoch do not count.
const EPOCH: u64 = 1;

#[derive(Debug, Parser)]
#[command(version, about)]
enum Cmd {
    /// Writes a CA and a host certificate for each host; prints the prover's name.
    Certs {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        hosts: usize,
    },
    /// Serves the peer endpoints of hosts FIRST..=LAST, but the prover's.
    Peers {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        hosts: usize,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        last: usize,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        skip: String,
    },
    /// Runs the prover's lease loop through two rounds and prints what they cost.
    Prove {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        hosts: usize,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        prover: String,
    },
}

fn host_name(i: usize) -> String {
    format!("peer{i:04}")
}

fn transport(dir: &Path, name: &str) -> anyhow::Result<Transport> {
    let paths = Paths {
        ca: dir.join("ca").join("ca.pem"),
        cert: dir.join("pki").join(format!("host-{name}.pem")),
        key: dir.join("pki").join(format!("host-{name}.key")),
    };
    let creds = Credentials::load_as(paths, &Expect::Host(name.to_string()))
        .with_context(|| format!("load {name}'s certificate"))?;
    Ok(Transport::Mtls(creds))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The prover's lease loop says why it fenced, if it did.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMHA_PEERPOLL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = vmha_agent::fd_limit::raise_soft_to_hard() {
        eprintln!("peerpoll: {e}");
    }
    match Cmd::parse() {
        Cmd::Certs { dir, hosts } => certs(&dir, hosts),
        Cmd::Peers { dir, hosts, first, last, port, skip } => {
            peers(&dir, hosts, first..=last, port, &skip).await
        }
        Cmd::Prove { dir, hosts, port, prover } => prove(&dir, hosts, port, &prover).await,
    }
}

fn certs(dir: &Path, hosts: usize) -> anyhow::Result<()> {
    let ca = dir.join("ca");
    vmha_tls::ca::init(&ca, 30)?;
    for i in 1..=hosts {
        let req = vmha_tls::ca::Request {
            role: Role::Host,
            name: host_name(i),
            dns: vec![],
            ips: vec!["127.0.0.1".parse()?],
            days: 30,
        };
        vmha_tls::ca::issue(&ca, &dir.join("pki"), &req)?;
    }
    // The prover: a standing volunteer, which proves in every round.
    let names: Vec<String> = (1..=hosts).map(host_name).collect();
    let prover = names
        .iter()
        .find(|name| {
            let mut k = LeaseKeeper::new(name, Timings::default(), Millis(0), 0);
            k.set_peers(names.iter().filter(|p| p != name).cloned());
            k.stands_as_volunteer()
        })
        .context("no host stands as a volunteer")?;
    println!("{prover}");
    Ok(())
}

async fn peers(
    dir: &Path,
    hosts: usize,
    range: std::ops::RangeInclusive<usize>,
    port: u16,
    skip: &str,
) -> anyhow::Result<()> {
    let mut served = tokio::task::JoinSet::new();
    for i in range.filter(|i| *i <= hosts) {
        let name = host_name(i);
        if name == skip {
            continue;
        }
        // A fresh agent that never held a lease: the leader could count none of its votes
        // from 4 s after its start on (what an earlier run may have held).
        let lease = LeaseShell::new(&name, Timings::default(), None);
        lease.see_epoch(EPOCH)?;
        let transport = transport(dir, &name)?;
        let api = PeerApi { host: name, lease, mtls: true };
        let router = tonic::transport::Server::builder().add_service(PeerServiceServer::new(api));
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port + i as u16 - 1));
        served.spawn(async move {
            if let Err(e) =
                vmha_tls::transport::serve(router, listen, &transport, std::future::pending()).await
            {
                eprintln!("peerpoll: {listen}: {e}");
            }
        });
    }
    println!("ready");
    served.join_all().await;
    Ok(())
}

/// CPU time this process has used.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

async fn prove(dir: &Path, hosts: usize, port: u16, prover: &str) -> anyhow::Result<()> {
    let transport = transport(dir, prover)?;
    let lease = LeaseShell::new(prover, Timings::default(), None);
    lease.without_qemu_processes();
    lease.see_epoch(EPOCH)?;
    let peers: Vec<(String, String)> =
        (1..=hosts).map(|i| (host_name(i), format!("127.0.0.1:{}", port + i as u16 - 1))).collect();
    let roster = Arc::new(Roster { version: 1, peers, protected: vec![] });
    tokio::spawn(lease.clone().run(Arc::new(FakeHypervisor::default()), transport));
    let mut proved_at: Option<Millis> = None;
    // First with new connections: a lease that ends in 1.2 s (the leader stops counting this
    // host's vote in 0.2 s, and the round's polls begin shortly after). Then with the
    // connections a standing volunteer keeps made: a lease of 14 s, in which it makes them (50
    // a second), then the round.
    for (round, ttl_ms) in [("with new connections", 1_200), ("with the connections kept", 14_000)] {
        let update = if ttl_ms == 1_200 {
            RosterUpdate::Whole(roster.clone())
        } else {
            RosterUpdate::Unchanged { version: 1 }
        };
        lease.answered(EPOCH, lease.now(), ttl_ms, hosts, update)?;
        let (cpu, started) = (cpu_time(), Instant::now());
        let mut most_open = 0;
        let fact = loop {
            most_open = most_open.max(vmha_agent::fd_limit::open_files().unwrap_or(0));
            let now = lease.now();
            if let Some(f) = lease.fact().filter(|f| proved_at.is_none_or(|p| now.0 - f.age_ms > p.0)) {
                proved_at = Some(Millis(now.0 - f.age_ms));
                break Some(f);
            }
            if started.elapsed() > Duration::from_millis(ttl_ms + 2_000) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let cpu = cpu_time() - cpu;
        let outcome = match fact {
            Some(f) => format!("the leader's lack of quorum proved {} ms after the poll began", f.age_ms),
            None => "NO FACT before its lease ended: the prover self-fenced".to_string(),
        };
        println!(
            "peerpoll: {hosts} hosts, {round}: {outcome}; the prover used {:.0} ms of CPU over the {:.1} s the \
             round took (its lease loop and connections included) and at most {most_open} file descriptors",
            cpu.as_secs_f64() * 1000.0,
            started.elapsed().as_secs_f64(),
        );
    }
    Ok(())
}
