use std::sync::Arc;

use clap::Parser;
use vmha_agent::config::{Config, Flags};
use vmha_agent::hypervisor::libvirt::Libvirt;
use vmha_agent::lease::LeaseShell;
use vmha_agent::peer::PeerApi;
use vmha_agent::session::Agent;
use vmha_agent::{guest_watch, probes, service_probes};
use vmha_engine::Timings;
use vmha_proto::v1::peer_service_server::PeerServiceServer;
use vmha_tls::Transport;
use vmha_tls::transport::Expect;

fn main() -> anyhow::Result<()> {
    // The watchdog's holder (see `watchdog::HolderSpec`) and libvirt's hook (`hook`) are this
    // binary too, without a runtime.
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some(vmha_agent::watchdog::HOLD_FLAG) => vmha_agent::watchdog::hold(),
        Some(vmha_agent::hook::HOOK_FLAG) => std::process::exit(vmha_agent::hook::run(&args[2..])),
        // The package's man page (deploy/deb/build), from the same definitions as --help.
        Some("--manpage") => {
            let cmd = <Flags as clap::CommandFactory>::command();
            return Ok(clap_mangen::Man::new(cmd).section("8").render(&mut std::io::stdout())?);
        }
        _ => {}
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let flags = Flags::parse();
    vmha_logging::init(flags.log_format);
    let cfg = Config::load(flags, || {
        std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_string())
    })?;
    tracing::info!(host = %cfg.host_name, libvirt = %cfg.libvirt_uri, controllers = ?cfg.controllers, "vmha-agent starting");
    // A connection per peer poll: systemd's default soft limit of 1024 is too few at scale.
    vmha_agent::fd_limit::raise_at_start();
    tokio::spawn(vmha_agent::fd_limit::watch(std::time::Duration::from_secs(10)));
    let hv: Arc<dyn vmha_agent::hypervisor::Hypervisor> =
        Arc::new(vmha_agent::metrics::Timed(Libvirt::new(cfg.libvirt_uri.clone())));
    // Until the leader sends its timings (at registration), those it sent last time.
    let lease = LeaseShell::new(&cfg.host_name, Timings::default(), cfg.watchdog.clone());
    if let Some(dir) = &cfg.state_dir {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!("cannot create the state directory {}: {e}; pass --state-dir", dir.display())
        })?;
        lease.remember_in(dir.clone());
    }
    if let Some(addr) = cfg.metrics_listen {
        let lease = lease.clone();
        tokio::spawn(async move {
            if let Err(e) = vmha_agent::metrics::serve(addr, lease).await {
                tracing::error!("{e:#}; no metrics are served");
            }
        });
    }
    let transport = transport(&cfg)?;
    let peer_api =
        PeerApi { host: cfg.host_name.clone(), lease: lease.clone(), mtls: !transport.is_insecure() };
    let peers = tonic::transport::Server::builder().add_service(PeerServiceServer::new(peer_api));
    let peer_listen = cfg.peer_listen;
    let peers = vmha_tls::transport::serve(peers, peer_listen, &transport, std::future::pending());
    let probe_cfg = cfg.probes.clone();
    let (guest_ping_interval, allow_exec_probes) = (cfg.guest_ping_interval, cfg.allow_exec_probes);
    let agent = Agent::new(cfg, hv.clone(), lease.clone(), transport.clone());
    if let Transport::Mtls(creds) = &transport {
        let agent = agent.clone();
        vmha_tls::credentials::reload_on_sighup(creds.clone(), move || agent.reconnect());
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let r = tokio::select! {
        _ = probes::run(probe_cfg, hv.clone(), agent.probes.clone()) => Ok(()),
        _ = guest_watch::run(guest_ping_interval, hv.clone(), lease.clone(), agent.guests.clone()) => Ok(()),
        _ = service_probes::run(agent.guests.clone(), allow_exec_probes) => Ok(()),
        _ = agent.run() => Ok(()),
        _ = lease.clone().run(hv, transport.clone()) => Ok(()),
        r = peers => r.map_err(|e| anyhow::anyhow!("the peer endpoint: {e}")),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    };
    // Leaving never touches the VMs: they keep running without an agent. The watchdog is
    // disarmed only if no protected one runs here (see `LeaseShell::leave`).
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    lease.leave();
    r
}

/// This host's credentials, which must name this host; plaintext only with --insecure-dev.
fn transport(cfg: &Config) -> anyhow::Result<Transport> {
    let Some(paths) = &cfg.tls else {
        tracing::warn!("--insecure-dev: plaintext to the controller and peers; anyone can answer for them");
        return Ok(Transport::InsecureDev);
    };
    let creds = vmha_tls::Credentials::load_as(paths.clone(), &Expect::Host(cfg.host_name.clone()))?;
    Ok(Transport::Mtls(creds))
}
