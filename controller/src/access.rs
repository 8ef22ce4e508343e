//! Who is calling, and what they may do. With mutual TLS (the default) a caller is the
//! identity in its verified certificate: an agent speaks only for the host its certificate
//! names, and an operator acts with the role its certificate carries. With `--insecure-dev`
//! nobody is checked: an agent names its host in a header, and every operator is an admin.

use vmha_tls::{Identity, Level, Role};

use crate::errors::Error;

/// How this controller knows its callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Mtls,
    InsecureDev,
}

/// The name events record for operators of an `--insecure-dev` controller.
pub const INSECURE_OPERATOR: &str = "unauthenticated (--insecure-dev)";

/// An operator's request, as it is allowed and recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator {
    /// What events record as the actor: the certificate's name.
    pub name: String,
    pub level: Level,
}

impl Access {
    /// The host an agent speaks for, taken from the connection, never from a message body, and
    /// the certificate it came with (`None` without mutual TLS).
    pub fn agent<T>(self, req: &tonic::Request<T>) -> Result<(String, Option<Identity>), Error> {
        match self {
            Access::Mtls => {
                let id = identity(req)?;
                if id.role != Role::Host {
                    return Err(Error::PermissionDenied(format!(
                        "only a host's agent may call the agent API; the certificate names {id}"
                    )));
                }
                // The old way to name a host, from before certificates: one that names another
                // host than the certificate is an impersonation attempt, and said so.
                if let Some(claimed) = req.metadata().get(vmha_proto::HOST_HEADER)
                    && claimed.as_bytes() != id.name.as_bytes()
                {
                    return Err(Error::PermissionDenied(format!(
                        "the certificate names host {}, but the request claims to be from '{}': a host \
                         speaks only for itself",
                        id.name,
                        String::from_utf8_lossy(claimed.as_bytes())
                    )));
                }
                if !vmha_proto::is_host_name(&id.name) {
                    return Err(Error::Unauthenticated(format!(
                        "the certificate names host '{}', which is not a valid host name",
                        id.name
                    )));
                }
                Ok((id.name.clone(), Some(id)))
            }
            Access::InsecureDev => Ok((header_host(req)?, None)),
        }
    }

    /// The operator behind `req`, if its role allows `what` (which needs `needed`).
    pub fn operator<T>(self, req: &tonic::Request<T>, needed: Level, what: &str) -> Result<Operator, Error> {
        let id = match self {
            Access::Mtls => identity(req)?,
            Access::InsecureDev => {
                return Ok(Operator { name: INSECURE_OPERATOR.into(), level: Level::Admin });
            }
        };
        let Role::Operator(level) = id.role else {
            return Err(Error::PermissionDenied(format!(
                "{what} is for operators; the certificate names {id} (use an operator certificate: \
                 `vmha ca issue operator NAME --role {needed}`)"
            )));
        };
        if level < needed {
            return Err(Error::PermissionDenied(format!(
                "{what} needs the {needed} role; {}'s certificate has the {level} role \
                 (an admin can issue one with `vmha ca issue operator {} --role {needed}`)",
                id.name, id.name
            )));
        }
        Ok(Operator { name: id.name, level })
    }
}

fn identity<T>(req: &tonic::Request<T>) -> Result<Identity, Error> {
    vmha_tls::transport::caller(req).map_err(|e| Error::Unauthenticated(e.to_string()))
}

/// `--insecure-dev` only: the host an agent says it is.
fn header_host<T>(req: &tonic::Request<T>) -> Result<String, Error> {
    let value = req
        .metadata()
        .get(vmha_proto::HOST_HEADER)
        .ok_or_else(|| Error::Unauthenticated("the agent did not identify its host".into()))?;
    let host =
        value.to_str().map_err(|_| Error::Unauthenticated("the agent's host name is not ASCII".into()))?;
    if !vmha_proto::is_host_name(host) {
        return Err(Error::Unauthenticated(format!("'{host}' is not a valid host name")));
    }
    Ok(host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_certificate_nobody_is_anybody() {
        let req = tonic::Request::new(());
        let e = Access::Mtls.agent(&req).unwrap_err();
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unauthenticated);
        let e = Access::Mtls.operator(&req, Level::Viewer, "status").unwrap_err();
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn a_header_names_a_host_only_in_insecure_dev_mode() {
        let mut req = tonic::Request::new(());
        assert_eq!(tonic::Status::from(header_host(&req).unwrap_err()).code(), tonic::Code::Unauthenticated);
        req.metadata_mut().insert(vmha_proto::HOST_HEADER, "kvm 1".parse().unwrap());
        assert_eq!(tonic::Status::from(header_host(&req).unwrap_err()).code(), tonic::Code::Unauthenticated);
        req.metadata_mut().insert(vmha_proto::HOST_HEADER, "kvm1".parse().unwrap());
        assert_eq!(Access::InsecureDev.agent(&req).unwrap().0, "kvm1");
        assert!(Access::Mtls.agent(&req).is_err(), "mTLS never reads the header");
    }
}
