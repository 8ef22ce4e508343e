//! vmha node agent: the KVM host's side of vmha.

pub mod bounded;
pub mod config;
pub mod executor;
pub mod fd_limit;
pub mod guest_watch;
pub mod hook;
pub mod hypervisor;
pub mod lease;
pub mod lockmgr;
pub mod metrics;
pub mod peer;
pub mod probe_check;
pub mod probes;
pub mod qemu;
pub mod revocation;
pub mod service_probes;
pub mod session;
pub mod watchdog;
