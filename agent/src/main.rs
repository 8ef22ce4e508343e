use std::sync::Arc;

use clap::Parser;
use vmha_agent::config::{Config, Flags};
use vmha_agent::hypervisor::libvirt::Libvirt;
use vmha_agent::session::Agent;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cfg = Config::load(Flags::parse(), || {
        std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_string())
    })?;
    tracing::info!(host = %cfg.host_name, libvirt = %cfg.libvirt_uri, controllers = ?cfg.controllers, "vmha-agent starting");
    let hv = Arc::new(Libvirt::new(cfg.libvirt_uri.clone()));
    tokio::select! {
        _ = Agent::new(cfg, hv).run() => Ok(()),
        _ = tokio::signal::ctrl_c() => {
            // Leaving never touches the VMs: they keep running without an agent.
            tracing::info!("vmha-agent stopping; VMs keep running");
            Ok(())
        }
    }
}
