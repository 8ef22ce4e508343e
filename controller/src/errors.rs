//! The controller's one error type, and the one place it (and the engine's refusals) become
//! gRPC status codes.

use tonic::Status;
use vmha_engine::Refusal;
use vmha_engine::step::Reply;

use crate::store::StoreError;

/// What an operator is told to do while the database is away.
const RETRY_LATER: &str =
    "vmha keeps retrying on its own; try again once `vmha status` no longer shows a database problem";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine will not do it, and says why.
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A request that needs the database while it is known to be away; nothing was changed.
    #[error("database unavailable ({why}); {what} needs it, so nothing was done; {RETRY_LATER}")]
    DatabaseAway { what: String, why: String },
    /// A malformed request, naming the offending value.
    #[error("{0}")]
    Invalid(String),
    /// An agent that does not say (or cannot prove) which host it speaks for.
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// A caller over its rate limit (`rate_limit`); nothing was done.
    #[error("{0}")]
    TooMany(String),
    /// The cluster is not in a state that allows it.
    #[error("{0}")]
    Precondition(String),
    #[error("the controller is shutting down (its decision loop stopped); retry once it is back")]
    LoopGone,
    /// This controller does not lead; `leader`: the endpoint of the one that does, if known.
    #[error("{message}")]
    NotLeader { message: String, leader: Option<String> },
    /// A reply of another kind than the request's: a bug, reported as such instead of a panic.
    #[error("the controller answered {request} unexpectedly; see its log")]
    Unexpected { request: &'static str, reply: String },
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let message = e.to_string();
        match e {
            Error::Refused(r) => refusal(r),
            Error::Store(s) if s.is_unavailable() => {
                tracing::warn!(error = %s, "store");
                Status::unavailable(format!("database unavailable: {s}; {RETRY_LATER}"))
            }
            Error::Store(s) => {
                tracing::error!(error = %s, "store");
                Status::internal(format!("{s}; see the controller's log"))
            }
            Error::DatabaseAway { .. } | Error::LoopGone => Status::unavailable(message),
            Error::NotLeader { leader, .. } => {
                let mut status = Status::unavailable(message);
                if let Some(value) = leader.and_then(|l| l.parse().ok()) {
                    status.metadata_mut().insert(vmha_proto::LEADER_HEADER, value);
                }
                status
            }
            Error::Invalid(_) => Status::invalid_argument(message),
            Error::Unauthenticated(_) => Status::unauthenticated(message),
            Error::NotFound(_) => Status::not_found(message),
            Error::PermissionDenied(_) => Status::permission_denied(message),
            Error::Precondition(_) => Status::failed_precondition(message),
            Error::TooMany(_) => Status::resource_exhausted(message),
            Error::Unexpected { request, reply } => {
                tracing::error!(%reply, "the engine answered {request} with an unexpected reply");
                Status::internal(message)
            }
        }
    }
}

/// The status of an engine refusal.
pub fn refusal(r: Refusal) -> Status {
    match r {
        Refusal::UnknownVm(_)
        | Refusal::UnknownHost(_)
        | Refusal::UnknownOperation(_)
        | Refusal::NothingToCancel(_) => Status::not_found(r.to_string()),
        Refusal::AmbiguousVm { .. } | Refusal::BadProbes { .. } => Status::invalid_argument(r.to_string()),
        Refusal::TooManyHosts { .. } => Status::resource_exhausted(r.to_string()),
        Refusal::NotExecutor { .. } => Status::permission_denied(r.to_string()),
        Refusal::BeyondReserve { .. } => Status::failed_precondition(r.to_string()),
        Refusal::AlreadyOnTarget { .. }
        | Refusal::NotPlaced { .. }
        | Refusal::NotRunning { .. }
        | Refusal::Busy { .. }
        | Refusal::HostDown { .. }
        | Refusal::HostNotActive { .. }
        | Refusal::NoRoom { .. }
        | Refusal::HostOnline(_)
        | Refusal::HostInUse { .. }
        | Refusal::CannotStart { .. }
        | Refusal::CannotCancel { .. }
        | Refusal::CannotStop { .. }
        | Refusal::NotRegistered(_) => Status::failed_precondition(r.to_string()),
    }
}

/// A reply of another kind than `request`'s.
pub fn unexpected(request: &'static str, reply: &Reply) -> Error {
    Error::Unexpected { request, reply: format!("{reply:?}") }
}
