use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use vmha_controller::access::Access;
use vmha_controller::config::Flags;
use vmha_controller::controller::{Controller, FenceSettings, MigrationSettings};
use vmha_controller::domain_xml::DomainRules;
use vmha_controller::leadership::{self, Leadership};
use vmha_controller::node::Node;
use vmha_controller::{agent_api::AgentApi, operator_api::OperatorApi};
use vmha_engine::{Policy, Timings};
use vmha_proto::v1::agent_service_server::AgentServiceServer;
use vmha_proto::v1::operator_service_server::OperatorServiceServer;
use vmha_tls::Transport;
use vmha_tls::transport::Expect;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The package's man page (deploy/deb/build), from the same definitions as --help.
    if std::env::args().nth(1).as_deref() == Some("--manpage") {
        let cmd = <Flags as clap::CommandFactory>::command();
        return Ok(clap_mangen::Man::new(cmd).section("8").render(&mut std::io::stdout())?);
    }
    let flags = Flags::parse();
    vmha_logging::init(flags.log_format);
    // Crash-only: a panic anywhere (a bug) ends the process, so that systemd restarts it and the
    // new controller resumes from the database; a controller that kept serving without its
    // tick task would never declare a host dead again.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(
            "vmha-controller panicked: {info}; exiting so that it is restarted and resumes from the database"
        );
        eprintln!("vmha-controller panicked: {info}");
        std::process::exit(70);
    }));
    let transport = transport(&flags)?;
    let access = if transport.is_insecure() { Access::InsecureDev } else { Access::Mtls };
    let timings = Timings {
        heartbeat_interval_ms: flags.heartbeat_interval.as_millis() as u64,
        lease_ttl_ms: flags.lease_ttl.as_millis() as u64,
        fence_margin_ms: flags.fence_margin.as_millis() as u64,
        max_transit_ms: flags.max_transit.as_millis() as u64,
        guard_ms: flags
            .guard
            .map_or((flags.fence_margin.as_millis() as u64 / 2).min(500), |g| g.as_millis() as u64),
    };
    timings
        .validate()
        .context("--heartbeat-interval, --lease-ttl and --fence-margin cannot keep the safety rule")?;
    let policy = Policy {
        max_relocate: flags.max_relocate,
        max_parallel_starts: flags.max_parallel_starts,
        reserve_hosts: flags.reserve_hosts,
        failback_after_ms: flags.failback_after.map(|d| d.as_millis() as u64),
        migrations_per_host: flags.migrations_per_host,
        migrations_per_cluster: flags.migrations_per_cluster,
        degraded_after_ms: flags.degraded_after.as_millis() as u64,
        recover_after_ms: flags.recover_after.as_millis() as u64,
        accept_no_watchdog: flags.accept_no_watchdog,
        migration_timeout_ms: flags.migration_timeout.as_millis() as u64,
        max_hosts: flags.max_hosts,
        new_vms_per_minute: flags.new_vms_per_minute,
        guest_failure_ms: flags.guest_failure_interval.as_millis() as u64,
        guest_boot_grace_ms: flags.guest_boot_grace.as_millis() as u64,
        guest_resets: flags.guest_resets,
        guest_reset_window_ms: flags.guest_reset_window.as_millis() as u64,
        ..Policy::default()
    };
    let definitions = DomainRules::new(
        &flags.shared_storage,
        &flags.allow_block_device,
        flags.allow_network_disks,
        &flags.allow_emulator,
        &flags.firmware_dir,
    )?;
    if flags.shared_storage.is_empty() {
        tracing::warn!(
            "no --shared-storage is configured: definitions with file disks are refused, and those VMs cannot be \
             restarted elsewhere"
        );
    }
    let fence = FenceSettings { command: flags.fence_command.clone(), timeout: flags.fence_timeout };
    let migration = MigrationSettings {
        auto_converge: !flags.no_auto_converge,
        bandwidth_mib_s: flags.migration_bandwidth,

        postcopy: flags.postcopy,
        max_downtime_ms: flags.max_downtime_ms,
    };
    // What waiting for the database cannot fix is refused at once.
    sqlx::postgres::PgConnectOptions::from_str(&flags.database_url)
        .map_err(|e| anyhow::anyhow!("--database-url is not a PostgreSQL URL: {e}"))?;
    let name =
        flags.name.clone().or_else(|| transport.identity().map(|i| i.name)).unwrap_or_else(system_hostname);
    let endpoint = flags.advertise.clone().unwrap_or_else(|| advertised(&flags, &transport));
    let tls = match &transport {
        Transport::Mtls(creds) => Some(creds.clone()),
        Transport::InsecureDev => None,
    };
    let node = Node::new(name.clone(), endpoint.clone(), tls);
    use vmha_controller::validate::caps;
    let router = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(caps::REQUESTS_PER_CONNECTION)
        .max_concurrent_streams(Some(caps::STREAMS_PER_CONNECTION))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            AgentServiceServer::new(AgentApi::new(node.clone(), definitions, access))
                .max_decoding_message_size(caps::MESSAGE_BYTES),
            vmha_controller::agent_api::stamp_arrival,
        ))
        .add_service(
            OperatorServiceServer::new(OperatorApi::new(node.clone(), access))
                .max_decoding_message_size(caps::OPERATOR_MESSAGE_BYTES),
        );
    tokio::spawn(node.clone().keep_presence(flags.database_url.clone()));
    if let Some(addr) = flags.metrics_listen {
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = vmha_controller::http::serve(addr, node).await {
                tracing::error!("{e:#}; no metrics or status page are served");
            }
        });
    }
    tracing::info!(listen = %flags.listen, %name, %endpoint, "vmha-controller standing by for leader");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let replication = if flags.allow_async_replication {
        tracing::warn!("--allow-async-replication: leading even if PostgreSQL replicates asynchronously");
        leadership::Replication::AllowAsync
    } else {
        leadership::Replication::SynchronousOnly
    };
    let leading =
        tokio::spawn(lead(node, flags.database_url.clone(), replication, timings, policy, migration, fence));
    // Standbys serve too: they name the leader to agents and operators.
    let serve = vmha_tls::transport::serve(router, flags.listen, &transport, shutdown());
    tokio::select! {
        served = serve => served?,
        ended = leading => anyhow::bail!("the decision loop ended ({ended:?}); exiting so that it is restarted"),
    }
    // Stopping the controller never stops a VM: agents keep them running and reconnect.
    tracing::info!("vmha-controller stopped");
    Ok(())
}

/// The controller's certificate, checked to be one; plaintext only with --insecure-dev.
fn transport(flags: &Flags) -> anyhow::Result<Transport> {
    if flags.insecure_dev {
        tracing::warn!(
            "--insecure-dev: serving plaintext and checking nobody; any process that reaches {} can speak \
             for any host or operator",
            flags.listen
        );
        return Ok(Transport::InsecureDev);
    }
    let (Some(cert), Some(key)) = (flags.tls_cert.clone(), flags.tls_key.clone()) else {
        anyhow::bail!(
            "--tls-cert and --tls-key are required (make them with `vmha ca issue controller NAME`)"
        );
    };
    let paths = vmha_tls::Paths { ca: flags.tls_ca.clone(), cert, key };
    let creds = vmha_tls::Credentials::load_as(paths, &Expect::Controller)?;
    tracing::info!(identity = %creds.identity(), "mutual TLS: agents and operators need certificates of the cluster CA");
    vmha_tls::credentials::reload_on_sighup(creds.clone(), || {});
    Ok(Transport::Mtls(creds))
}

/// Stands for leader until this process wins, then leads for the rest of its life (a deposed
/// leader starts over as a new process: `leadership::depose`). Returns only if the decision
/// loop ends.
async fn lead(
    node: Arc<Node>,
    database_url: String,
    replication: leadership::Replication,
    timings: Timings,
    policy: Policy,
    migration: MigrationSettings,
    fence: FenceSettings,
) -> anyhow::Result<()> {
    let lock = leadership::campaign(&database_url, &node.name, replication, |why| {
        node.standing_by(why);
        // systemd's WatchdogSec: a standby is alive while it stands.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
    })
    .await;
    let won = std::time::Instant::now();
    node.elect();
    let right = Leadership::new();
    tokio::spawn(lock.hold(right.clone()));
    tracing::info!(
        "won the leader lock; acting in {} ms, once any earlier leader has surely stopped",
        leadership::TAKEOVER_WAIT.as_millis()
    );
    tokio::time::sleep(leadership::TAKEOVER_WAIT).await;
    let (controller, decisions) =
        Controller::start_when_reachable(&database_url, timings, policy, migration, fence, right).await?;
    tracing::info!(
        epoch = controller.epoch,
        after_ms = won.elapsed().as_millis() as u64,
        "vmha-controller leads"
    );
    node.lead(controller.clone());
    decisions.run(controller).await;
    Ok(())
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "controller".into(), |s| s.trim().to_string())
}

/// The endpoint others are told when no --advertise is given.
fn advertised(flags: &Flags, transport: &Transport) -> String {
    let scheme = if transport.is_insecure() { "http" } else { "https" };
    let port = flags.listen.port();
    if flags.listen.ip().is_unspecified() {
        format!("{scheme}://{}:{port}", system_hostname())
    } else {
        format!("{scheme}://{}", flags.listen)
    }
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
