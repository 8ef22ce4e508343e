//! The peer endpoint: other agents ask it whether this host holds a lease the leader could
//! count, when they have lost their own.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use vmha_proto::v1::peer_service_server::PeerService;
use vmha_proto::v1::{LeaseStatusReply, LeaseStatusRequest};

use crate::lease::LeaseShell;

pub struct PeerApi {
    pub host: String,
    pub lease: Arc<LeaseShell>,
}

#[tonic::async_trait]
impl PeerService for PeerApi {
    async fn lease_status(
        &self,
        _: Request<LeaseStatusRequest>,
    ) -> Result<Response<LeaseStatusReply>, Status> {
        Ok(Response::new(LeaseStatusReply {
            host: self.host.clone(),
            upper_remaining_ms: self.lease.upper_remaining_ms(),
        }))
    }
}
