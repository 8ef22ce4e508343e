//! vmha node agent: the KVM host's side of vmha.

pub mod config;
pub mod executor;
pub mod hypervisor;
pub mod session;
