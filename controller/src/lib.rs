//! vmha controller: the shell around `vmha-engine`.

pub mod access;
pub mod agent_api;
pub mod config;
pub mod controller;
pub mod domain_xml;
pub mod errors;
pub mod host_message;
pub mod http;
pub mod journal;
pub mod leadership;
pub mod metrics;
pub mod node;
pub mod operator_api;
pub mod rate_limit;
pub mod service_probes;
pub mod status_page;
pub mod store;
pub mod validate;
pub mod views;
