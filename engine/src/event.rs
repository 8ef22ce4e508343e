//! What the event log says happened: every decision the engine takes and every change it
//! observes is one typed event with its reason, written to the log and shown by `vmha events`.

/// Declares `EventKind` with the name each kind has in the event log.
macro_rules! event_kinds {
    ($($variant:ident => $name:literal,)*) => {
        /// The kinds of events, one per thing an operator may want to find in the log.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventKind {
            $($variant,)*
        }

        impl EventKind {
            /// Its name in the event log (`vmha events`), stable across versions.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(EventKind::$variant => $name,)*
                }
            }

            pub fn parse(s: &str) -> Option<EventKind> {
                match s {
                    $($name => Some(EventKind::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

event_kinds! {
    ControllerStarted => "controller_started",
    AgentConnected => "agent_connected",
    Watchdog => "watchdog",
    HostDead => "host_dead",
    SelfFenced => "self_fenced",
    SelfFenceLifted => "self_fence_lifted",
    Fencing => "fencing",
    FenceFailed => "fence_failed",
    ConfirmDownNeeded => "confirm_down_needed",
    ConfirmedDown => "confirmed_down",
    HostReturned => "host_returned",
    HostDegraded => "host_degraded",
    HostRecovered => "host_recovered",
    FencingSet => "fencing_set",
    MemoryLimit => "memory_limit",
    HostRemoved => "host_removed",
    CrlPublished => "crl_published",
    DrainStarted => "drain_started",
    DrainDone => "drain_done",
    DrainIncomplete => "drain_incomplete",
    DrainResumed => "drain_resumed",
    HostUndrained => "host_undrained",
    VmDiscovered => "vm_discovered",
    VmMoved => "vm_moved",
    VmState => "vm_state",
    VmVanished => "vm_vanished",
    VmForgotten => "vm_forgotten",
    DefinitionRefused => "definition_refused",
    DiscoveryDeferred => "discovery_deferred",
    VmProtected => "vm_protected",
    VmUnprotected => "vm_unprotected",
    ProtectionUnconfirmed => "protection_unconfirmed",
    VmDown => "vm_down",
    VmStopped => "vm_stopped",
    VmStoppedByOperator => "vm_stopped_by_operator",
    VmStartRequested => "vm_start_requested",
    RestartUnsafe => "restart_unsafe",
    RestartStarted => "restart_started",
    RestartWaiting => "restart_waiting",
    RestartRetry => "restart_retry",
    RestartFailed => "restart_failed",
    RestartCancelled => "restart_cancelled",
    VmRestarted => "vm_restarted",
    DiskLocked => "disk_locked",
    StaleCopy => "stale_copy",
    TwoCopies => "two_copies",
    SecondCopySeen => "second_copy_seen",
    MigrationRequested => "migration_requested",
    MigrationSucceeded => "migration_succeeded",
    MigrationFailed => "migration_failed",
    MigrationCancelRequested => "migration_cancel_requested",
    MigrationCancelled => "migration_cancelled",
    Failback => "failback",
    ColdRestart => "cold_restart",
    GuestHung => "guest_hung",
    GuestNotJudged => "guest_not_judged",
    GuestAlarm => "guest_alarm",
    GuestRecovered => "guest_recovered",
    GuestBudget => "guest_budget",
    ProbesSet => "probes_set",
    OperationDone => "operation_done",
    OperationAborted => "operation_aborted",
    OperationExpired => "operation_expired",
    OperationReconciled => "operation_reconciled",
}

/// What an event is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Host(String),
    /// By name: what operators search the log for.
    Vm(String),
    Operation(String),
    Controller(String),
}

impl Subject {
    /// "host", "vm", "operation", "controller": the event log's subject kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Subject::Host(_) => "host",
            Subject::Vm(_) => "vm",
            Subject::Operation(_) => "operation",
            Subject::Controller(_) => "controller",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Subject::Host(s) | Subject::Vm(s) | Subject::Operation(s) | Subject::Controller(s) => s,
        }
    }
}

/// One entry of the event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub subject: Subject,
    pub kind: EventKind,
    pub message: String,
    /// Who caused it: "controller", a host's name, or an operator.
    pub actor: String,
}

impl Event {
    pub fn host(host: &str, kind: EventKind, message: String) -> Event {
        Event { subject: Subject::Host(host.into()), kind, message, actor: "controller".into() }
    }

    pub fn vm(vm: &str, kind: EventKind, message: String) -> Event {
        Event { subject: Subject::Vm(vm.into()), kind, message, actor: "controller".into() }
    }

    pub fn controller(name: &str, kind: EventKind, message: String) -> Event {
        Event { subject: Subject::Controller(name.into()), kind, message, actor: "controller".into() }
    }

    pub fn by(mut self, actor: &str) -> Event {
        self.actor = actor.into();
        self
    }
}
