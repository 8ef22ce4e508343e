//! Mutual TLS for every vmha connection: agent to controller, agent to agent (peer polls), and
//! CLI to controller. One cluster CA issues every certificate (`ca`); a certificate names one
//! party and its role (`identity`); `credentials` loads a party's own certificate, reloads it
//! when renewed, and builds the rustls configurations; `revocation` holds the CRL every
//! handshake is checked against; `transport` puts them under tonic.

pub mod ca;
pub mod credentials;
pub mod identity;
pub mod revocation;
pub mod transport;

use std::path::{Path, PathBuf};

pub use credentials::{Credentials, Paths};
pub use identity::{Identity, Level, Role};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} already exists; a CA is never replaced (move it away first if you really mean to start over)", .0.display())]
    Exists(PathBuf),
    #[error("cannot make the certificate: {0}")]
    Generate(#[source] rcgen::Error),
    #[error(
        "'{0}' is not a valid name: use letters, digits, '.', '-', '_' or '@', starting with a letter or digit"
    )]
    BadName(String),
    #[error("{0}")]
    Usage(String),
    #[error("not a vmha certificate: {0}")]
    NotVmha(String),
    #[error("{} holds no usable {what}: {detail}", path.display())]
    BadFile { path: PathBuf, what: &'static str, detail: String },
    #[error("{0}")]
    Refused(String),
    #[error("cannot connect to {endpoint}: {detail}")]
    Connect { endpoint: String, detail: String },
    #[error("cannot serve on {listen}: {detail}")]
    Serve { listen: std::net::SocketAddr, detail: String },
}

impl TlsError {
    pub(crate) fn io(what: &'static str, path: &Path, source: std::io::Error) -> TlsError {
        TlsError::Io { what, path: path.to_path_buf(), source }
    }
}

/// How a party talks to the others: mutual TLS with its credentials, or, only with
/// `--insecure-dev`, plaintext in which nobody's identity is checked.
#[derive(Clone, Debug)]
pub enum Transport {
    Mtls(std::sync::Arc<Credentials>),
    InsecureDev,
}

impl Transport {
    /// A channel to `endpoint`, which must be `expect` (checked from its certificate).
    pub async fn channel(
        &self,
        endpoint: &str,
        expect: transport::Expect,
        connect_timeout: std::time::Duration,
    ) -> Result<tonic::transport::Channel, TlsError> {
        let connect_error = |e: tonic::transport::Error| TlsError::Connect {
            endpoint: endpoint.to_string(),
            detail: error_chain(&e),
        };
        match self {
            Transport::Mtls(creds) => {
                let authority = transport::authority(endpoint)?;
                transport::connect(&authority, creds, expect, connect_timeout).await.map_err(connect_error)
            }
            Transport::InsecureDev => {
                if !endpoint.starts_with("http://") {
                    return Err(TlsError::Refused(format!(
                        "'{endpoint}': with --insecure-dev, endpoints are plaintext http://HOST:PORT"
                    )));
                }
                tonic::transport::Endpoint::from_shared(endpoint.to_string())
                    .map_err(connect_error)?
                    .connect_timeout(connect_timeout)
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .map_err(connect_error)
            }
        }
    }

    pub fn is_insecure(&self) -> bool {
        matches!(self, Transport::InsecureDev)
    }

    /// Who this side is, by its certificate (`None` with --insecure-dev).
    pub fn identity(&self) -> Option<Identity> {
        match self {
            Transport::Mtls(creds) => Some(creds.identity()),
            Transport::InsecureDev => None,
        }
    }
}

/// An error and its causes on one line: tonic's transport errors say little at the top.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}
