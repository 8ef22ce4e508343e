//! vmha's decision logic.
//!
//! Everything here is a pure function of the cluster state the controller observed, the
//! request at hand and the time, which is always an argument: no I/O, no clock reads, no
//! randomness. The controller's shell feeds it what agents and operators say, and performs what
//! it decides (database writes, commands to agents). That is what lets the same code run in unit
//! tests, property tests over random fault schedules and production.
//!
//! The one entry point is `Engine::step` (`step/mod.rs`): every input goes through it. Each
//! input calls the modules it concerns: `lease` (who holds a lease, quorum), `recovery` (when
//! a host may be declared dead, restarts), `drain` (health, drains), `inventory` (what agents
//! report), `placement`, `migration`, `power`. `recovery` and `drain` say what to do as
//! `action::Action`s, which the step carries out; `persist` says what survives a controller
//! restart. The order a heartbeat takes through them is in ARCHITECTURE.md.

pub mod action;
pub mod admission;
pub mod availability;
pub mod cluster;
pub mod discovery;
pub mod drain;
pub mod drain_record;
pub mod event;
pub mod guest;
pub mod guest_reset;
pub mod health;
pub mod host_lease;
pub mod inventory;
pub mod lease;
pub mod migration;
pub mod operation;
pub mod persist;
pub mod placement;
pub mod power;
pub mod recovery;
pub mod refusal;
pub mod roster;
pub mod selffence;
pub mod service_probe;
pub mod step;
pub mod time;
pub mod timings;
pub mod waits;

pub use cluster::{
    AdminState, ClusterState, Death, FencingMode, HostView, Policy, RunState, VmView, Watchdog,
};
pub use inventory::{InventoryChange, ReportedDomain};
pub use lease::HostLiveness;
pub use migration::MigrationPlan;
pub use refusal::Refusal;
pub use step::{Engine, Input, Output, Reply, Request};
pub use time::Millis;
pub use timings::{Timings, TimingsError};
