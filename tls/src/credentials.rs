//! One party's credentials: the cluster CA it trusts, and its own certificate and key, which
//! it reloads when they are renewed (SIGHUP) without dropping a connection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::TlsError;
use crate::identity::Identity;
use crate::revocation::{Crl, Revocations};
use crate::transport::Expect;

/// Where a party's credentials live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    /// The cluster CA's certificate (`ca.pem`).
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate this close to its end is reported at every load.
const WARN_BEFORE_S: i64 = 30 * 86400;

#[derive(Debug)]
pub struct Credentials {
    paths: Paths,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    /// The CA's certificates, which sign the CRLs it takes.
    ca: Vec<CertificateDer<'static>>,
    revocations: Arc<Revocations>,
    current: RwLock<(Arc<CertifiedKey>, Identity)>,
}

impl Credentials {
    pub fn load(paths: Paths) -> Result<Arc<Credentials>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        let ca = read_certs(&paths.ca, "CA certificate")?;
        for der in ca.iter().cloned() {
            roots.add(der).map_err(|e| TlsError::BadFile {
                path: paths.ca.clone(),
                what: "CA certificate",
                detail: e.to_string(),
            })?;
        }
        let current = read_own(&paths, &provider)?;
        Ok(Arc::new(Credentials {
            paths,
            provider,
            roots: Arc::new(roots),
            ca,
            revocations: Arc::default(),
            current: RwLock::new(current),
        }))
    }

    /// `load`, for a process that must be `expect`: the controller, or the host it runs on.
    pub fn load_as(paths: Paths, expect: &Expect) -> Result<Arc<Credentials>, TlsError> {
        let creds = Credentials::load(paths)?;
        let id = creds.identity();
        if !expect.matches(&id) {
            let issue = match expect {
                Expect::Controller => "vmha ca issue controller NAME".to_string(),
                Expect::Host(name) => format!("vmha ca issue host {name}"),
            };
            return Err(TlsError::Refused(format!(
                "{} is the certificate of {id}, not of {}: issue one with `{issue}`",
                creds.paths.cert.display(),
                expect.describe()
            )));
        }
        Ok(creds)
    }

    /// Who these credentials speak for.
    pub fn identity(&self) -> Identity {
        self.current.read().unwrap_or_else(|p| p.into_inner()).1.clone()
    }

    /// Reads the certificate and key again (after `vmha ca issue` renewed them). On any error
    /// the credentials in use stay, and the error says why.
    pub fn reload(&self) -> Result<Identity, TlsError> {
        let fresh = read_own(&self.paths, &self.provider)?;
        let was = self.identity();
        if (fresh.1.role, &fresh.1.name) != (was.role, &was.name) {
            return Err(TlsError::Refused(format!(
                "{} now names {}, not {was}: a renewal keeps the name and role (restart to change them)",
                self.paths.cert.display(),
                fresh.1
            )));
        }
        let identity = fresh.1.clone();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(identity)
    }

    /// Takes the CRL in `der` if the cluster CA signed it and it is newer than the one in use
    /// (see `revocation`); says whether it did. From then on, no handshake succeeds with a
    /// certificate it lists.
    pub fn accept_crl(&self, der: &[u8]) -> Result<bool, TlsError> {
        Ok(self.revocations.offer(Crl::verified(der, &self.ca)?))
    }

    /// The CRL in use, if any.
    pub fn crl(&self) -> Option<Arc<Crl>> {
        self.revocations.current()
    }

    /// The number of the CRL in use (0: none).
    pub fn crl_number(&self) -> u64 {
        self.revocations.number()
    }

    fn certified_key(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    /// A server that requires a client certificate issued by the cluster CA. Which role may call
    /// what is the handlers' decision (`transport::caller`).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let chain = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
            .build()
            .map_err(|e| TlsError::Refused(format!("cannot build the client verifier: {e}")))?;
        let verifier = Arc::new(NotRevoked { chain, revocations: self.revocations.clone() });
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Refused(format!("TLS versions: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// A client that presents its certificate and accepts a server whose chain leads to the
    /// cluster CA, whatever address it was reached by: the role and name the server must have
    /// are checked after the handshake (`transport::connect`).
    pub fn client_config(self: &Arc<Self>) -> Arc<ClientConfig> {
        let verifier = ClusterCa {
            roots: self.roots.clone(),
            algs: self.provider.signature_verification_algorithms,
            revocations: self.revocations.clone(),
        };
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring offers TLS 1.2 and 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    }
}

/// Reloads `creds` on every SIGHUP (`systemctl reload`), calling `reloaded` after a success.
pub fn reload_on_sighup(creds: Arc<Credentials>, reloaded: impl Fn() + Send + 'static) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::error!("cannot install a SIGHUP handler: renewed certificates need a restart");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match creds.reload() {
                Ok(id) => {
                    tracing::info!(identity = %id, expires = id.not_after, "reloaded the certificate");
                    reloaded();
                }
                Err(e) => tracing::error!(error = %e, "SIGHUP: kept the certificate in use"),
            }
        }
    });
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |detail: String| TlsError::BadFile { path: path.to_path_buf(), what, detail };
    let pem = std::fs::read(path).map_err(|e| TlsError::io("read", path, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn read_own(paths: &Paths, provider: &CryptoProvider) -> Result<(Arc<CertifiedKey>, Identity), TlsError> {
    let chain = read_certs(&paths.cert, "certificate")?;
    let identity = Identity::from_der(&chain[0]).map_err(|e| TlsError::BadFile {
        path: paths.cert.clone(),
        what: "vmha certificate",
        detail: e.to_string(),
    })?;
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| TlsError::BadFile {
        path: paths.key.clone(),
        what: "private key",
        detail: e.to_string(),
    })?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::BadFile {
        path: paths.key.clone(),
        what: "key for the certificate",
        detail: format!("{e} (is it the key of {}?)", paths.cert.display()),
    })?;
    let left = identity.not_after - time::OffsetDateTime::now_utc().unix_timestamp();
    // No handshake would succeed with it: at start that is an error to fix, and on a reload
    // (SIGHUP) the certificate in use is kept.
    if left <= 0 {
        return Err(TlsError::BadFile {
            path: paths.cert.clone(),
            what: "certificate",
            detail: format!(
                "it expired {} days ago: renew it (`vmha ca issue {} {}` or `vmha ca renew-all`) and copy it here",
                (-left).div_euclid(86400),
                match identity.role {
                    crate::Role::Host => "host",
                    crate::Role::Controller => "controller",
                    crate::Role::Operator(_) => "operator",
                },
                identity.name
            ),
        });
    }
    if left < WARN_BEFORE_S {
        tracing::warn!(
            certificate = %paths.cert.display(),
            days_left = left / 86400,
            "the certificate expires soon: renew it with `vmha ca issue` and reload (SIGHUP)"
        );
    }
    Ok((Arc::new(certified), identity))
}

/// Hands out the credentials in use at each handshake, so a reload takes effect for every
/// connection made after it.
#[derive(Debug)]
struct Resolver(Arc<Credentials>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified_key())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Accepts a server certificate whose chain leads to the cluster CA. Unlike web PKI, the name
/// the server was dialled by does not matter (agents reach controllers and peers by address);
/// what matters is the vmha identity in the certificate, which the caller checks.
#[derive(Debug)]
struct ClusterCa {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    revocations: Arc<Revocations>,
}

impl ServerCertVerifier for ClusterCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&cert, &self.roots, intermediates, now, self.algs.all)?;
        self.revocations.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// rustls' client verifier (a chain to the cluster CA), and then the CRL in use.
#[derive(Debug)]
struct NotRevoked {
    chain: Arc<dyn ClientCertVerifier>,
    revocations: Arc<Revocations>,
}

impl ClientCertVerifier for NotRevoked {
    fn offer_client_auth(&self) -> bool {
        self.chain.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.chain.verify_client_cert(end_entity, intermediates, now)?;
        self.revocations.check(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}
