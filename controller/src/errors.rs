//! The one place the engine's refusals and the store's failures become gRPC status codes.

use tonic::Status;
use vmha_engine::Refusal;
use vmha_engine::step::Reply;

pub fn refusal(r: Refusal) -> Status {
    match r {
        Refusal::UnknownVm(_) | Refusal::UnknownHost(_) | Refusal::UnknownOperation(_) => {
            Status::not_found(r.to_string())
        }
        Refusal::AmbiguousVm { .. } => Status::invalid_argument(r.to_string()),
        Refusal::NotExecutor { .. } => Status::permission_denied(r.to_string()),
        Refusal::AlreadyOnTarget { .. }
        | Refusal::NotPlaced { .. }
        | Refusal::NotRunning { .. }
        | Refusal::Busy { .. }
        | Refusal::HostDown { .. }
        | Refusal::HostNotActive { .. }
        | Refusal::NoRoom { .. }
        | Refusal::HostOnline(_)
        | Refusal::NotRegistered(_) => Status::failed_precondition(r.to_string()),
    }
}

/// A reply of another kind than the request's: a bug, reported as such instead of a panic.
pub fn unexpected(request: &str, reply: &Reply) -> Status {
    tracing::error!(?reply, "the engine answered {request} with an unexpected reply");
    Status::internal(format!("the controller answered {request} unexpectedly; see its log"))
}
