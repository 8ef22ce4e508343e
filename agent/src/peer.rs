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
    /// With mutual TLS, only hosts of the cluster may ask.
    pub mtls: bool,
}

#[tonic::async_trait]
impl PeerService for PeerApi {
    async fn lease_status(
        &self,
        req: Request<LeaseStatusRequest>,
    ) -> Result<Response<LeaseStatusReply>, Status> {
        if self.mtls {
            let id = vmha_tls::transport::caller(&req).map_err(|e| Status::unauthenticated(e.to_string()))?;
            if id.role != vmha_tls::Role::Host {
                return Err(Status::permission_denied(format!(
                    "only hosts poll a host's lease; this is {id}"
                )));
            }
        }
        let fact = self.lease.fact();
        Ok(Response::new(LeaseStatusReply {
            host: self.host.clone(),
            upper_remaining_ms: self.lease.upper_remaining_ms(),
            epoch: self.lease.newest_epoch(),
            fact_age_ms: fact.map(|f| f.age_ms),
            fact_epoch: fact.map_or(0, |f| f.epoch),
            fact_membership: fact.map_or(0, |f| f.membership),
        }))
    }
}
