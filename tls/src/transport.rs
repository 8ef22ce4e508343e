//! mTLS under tonic: a server's incoming connections, a client's channel to a party of a
//! given role, and the verified identity of whoever made a request.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Router;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::credentials::Credentials;
use crate::identity::{Identity, Role};
use crate::{TlsError, Transport};

/// A client that connects but never completes its handshake holds a task no longer than this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whom a client accepts at the other end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Any controller of the cluster.
    Controller,
    /// The named host, and no other.
    Host(String),
}

impl Expect {
    /// How the expected party is named: "a controller", "host kvm1".
    pub fn describe(&self) -> String {
        match self {
            Expect::Controller => "a controller".to_string(),
            Expect::Host(name) => format!("host {name}"),
        }
    }

    fn check(&self, id: &Identity) -> Result<(), String> {
        let ok = match self {
            Expect::Controller => id.role == Role::Controller,
            Expect::Host(name) => id.role == Role::Host && &id.name == name,
        };
        if ok { Ok(()) } else { Err(format!("expected {}, but its certificate names {id}", self.describe())) }
    }

    pub(crate) fn matches(&self, id: &Identity) -> bool {
        self.check(id).is_ok()
    }
}

/// The `host:port` of an endpoint given as `https://host:port` or `host:port`. Plaintext
/// (`http://`) is refused: it is only for `--insecure-dev`.
pub fn authority(endpoint: &str) -> Result<String, TlsError> {
    if endpoint.starts_with("http://") {
        return Err(TlsError::Refused(format!(
            "'{endpoint}' is plaintext: vmha speaks only mutual TLS (use https://), unless every party runs with --insecure-dev"
        )));
    }
    let rest = endpoint.strip_prefix("https://").unwrap_or(endpoint).trim_end_matches('/');
    let uri: Uri = format!("https://{rest}")
        .parse()
        .map_err(|e| TlsError::Refused(format!("'{endpoint}' is not a valid endpoint: {e}")))?;
    match (uri.authority(), uri.port_u16(), uri.path()) {
        (Some(a), Some(_), "/") => Ok(a.to_string()),
        _ => Err(TlsError::Refused(format!("'{endpoint}' is not of the form https://HOST:PORT"))),
    }
}

/// A channel to `authority` (`host:port`, see `authority`) over mutual TLS, refusing any party
/// but `expect`. Like tonic's own channels it reconnects on demand; each connection is checked
/// again.
pub async fn connect(
    authority: &str,
    creds: &Arc<Credentials>,
    expect: Expect,
    connect_timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    // tonic sees plain HTTP/2: the connector below does the TLS.
    Endpoint::from_shared(format!("http://{authority}"))?
        .connect_timeout(connect_timeout)
        .connect_with_connector(connector(creds, expect))
        .await
}

fn connector(
    creds: &Arc<Credentials>,
    expect: Expect,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Send
+ 'static {
    let config = creds.client_config();
    tower::service_fn(move |uri: Uri| {
        let (config, expect) = (config.clone(), expect.clone());
        async move {
            let authority = uri.authority().ok_or_else(|| std::io::Error::other("endpoint without host"))?;
            let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
            let tcp = TcpStream::connect(authority.as_str()).await?;
            tcp.set_nodelay(true)?;
            // The name only goes into SNI: the certificate is checked by its vmha identity.
            let server_name = rustls::pki_types::ServerName::try_from(host).unwrap_or_else(|_| {
                rustls::pki_types::ServerName::try_from("vmha").expect("a valid DNS name")
            });
            let tls = TlsConnector::from(config).connect(server_name, tcp).await?;
            let peer =
                tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| Identity::from_der(c));
            match peer {
                Some(Ok(id)) => expect.check(&id).map_err(std::io::Error::other)?,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Err(std::io::Error::other("the server sent no certificate")),
            }
            Ok(TokioIo::new(tls))
        }
    })
}

/// Connections to a server, each once its TLS handshake has succeeded (a client without a
/// certificate of the cluster CA never gets further). Handshakes run concurrently, so one slow
/// client delays no other.
pub fn incoming(
    listener: TcpListener,
    creds: &Arc<Credentials>,
) -> Result<ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>, TlsError> {
    let acceptor = TlsAcceptor::from(creds.server_config()?);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, typically: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                return;
            }
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %addr, error = %e, "refused a connection: TLS handshake failed")
                    }
                    Err(_) => {
                        tracing::warn!(peer = %addr, "refused a connection: no TLS handshake within 10 s")
                    }
                }
            });
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// Serves `router` on `listen` until `shutdown`: over mutual TLS with `transport`'s
/// credentials, or in plaintext with `--insecure-dev`.
pub async fn serve(
    router: Router,
    listen: SocketAddr,
    transport: &Transport,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), TlsError> {
    let failed = |detail: String| TlsError::Serve { listen, detail };
    match transport {
        Transport::Mtls(creds) => {
            let listener = TcpListener::bind(listen).await.map_err(|e| failed(e.to_string()))?;
            router.serve_with_incoming_shutdown(incoming(listener, creds)?, shutdown).await
        }
        Transport::InsecureDev => router.serve_with_shutdown(listen, shutdown).await,
    }
    .map_err(|e| failed(crate::error_chain(&e)))
}

/// The verified identity of whoever sent `req` over mutual TLS.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Identity, TlsError> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| TlsError::Refused("the request came without a client certificate".into()))?;
    let leaf =
        certs.first().ok_or_else(|| TlsError::Refused("the client certificate chain is empty".into()))?;
    Identity::from_der(leaf)
}
