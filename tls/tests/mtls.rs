//! Mutual TLS end to end on loopback, with certificates made by `ca` as an operator makes them:
//! who is let in, who is told apart, and a renewal taking effect without a restart.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use vmha_proto::v1::peer_service_client::PeerServiceClient;
use vmha_proto::v1::peer_service_server::{PeerService, PeerServiceServer};
use vmha_proto::v1::{LeaseStatusReply, LeaseStatusRequest};
use vmha_tls::transport::{Expect, caller, incoming};
use vmha_tls::{Credentials, Level, Paths, Role, Transport, ca};

/// Answers with who called: the caller's name, and its certificate's notAfter.
struct WhoCalls;

#[tonic::async_trait]
impl PeerService for WhoCalls {
    async fn lease_status(
        &self,
        req: Request<LeaseStatusRequest>,
    ) -> Result<Response<LeaseStatusReply>, Status> {
        let id = caller(&req).map_err(|e| Status::unauthenticated(e.to_string()))?;
        Ok(Response::new(LeaseStatusReply {
            host: id.name,
            upper_remaining_ms: id.not_after,
            ..LeaseStatusReply::default()
        }))
    }
}

/// Issues from the CA in `dir` into `dir/pki` (never next to the CA's key).
fn issue(dir: &Path, role: Role, name: &str, days: u32) -> Paths {
    let out = dir.join("pki");
    let issued =
        ca::issue(dir, &out, &ca::Request { role, name: name.into(), dns: vec![], ips: vec![], days })
            .unwrap();
    Paths { ca: dir.join(ca::CA_CERT), cert: issued.cert, key: issued.key }
}

/// A server with `creds` on a loopback port; its endpoint.
async fn serve(creds: &Arc<Credentials>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("https://{}", listener.local_addr().unwrap());
    let incoming = incoming(listener, creds).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PeerServiceServer::new(WhoCalls))
            .serve_with_incoming(incoming),
    );
    endpoint
}

async fn ask(transport: &Transport, endpoint: &str, expect: Expect) -> Result<LeaseStatusReply, String> {
    let channel =
        transport.channel(endpoint, expect, Duration::from_secs(3)).await.map_err(|e| e.to_string())?;
    let reply = PeerServiceClient::new(channel).lease_status(LeaseStatusRequest {}).await;
    reply.map(|r| r.into_inner()).map_err(|s| vmha_tls::error_chain(&s))
}

#[tokio::test]
async fn each_side_is_who_its_certificate_says_and_nobody_else() {
    let dir = tempfile::tempdir().unwrap();
    ca::init(dir.path(), 1).unwrap();
    let kvm2 = Credentials::load(issue(dir.path(), Role::Host, "kvm2", 1)).unwrap();
    let endpoint = serve(&kvm2).await;
    let kvm1 = Transport::Mtls(Credentials::load(issue(dir.path(), Role::Host, "kvm1", 1)).unwrap());

    let reply = ask(&kvm1, &endpoint, Expect::Host("kvm2".into())).await.unwrap();
    assert_eq!(reply.host, "kvm1", "the server reads the caller from its certificate");

    let err = ask(&kvm1, &endpoint, Expect::Host("kvm3".into())).await.unwrap_err();
    assert!(err.contains("expected host kvm3, but its certificate names host kvm2"), "{err}");
    let err = ask(&kvm1, &endpoint, Expect::Controller).await.unwrap_err();
    assert!(err.contains("expected a controller"), "{err}");

    // A certificate naming kvm1 from a CA of its own is no certificate of this cluster.
    let rogue = tempfile::tempdir().unwrap();
    ca::init(rogue.path(), 1).unwrap();
    let mut forged = issue(rogue.path(), Role::Host, "kvm1", 1);
    forged.ca = dir.path().join(ca::CA_CERT);
    let forged = Transport::Mtls(Credentials::load(forged).unwrap());
    assert!(
        ask(&forged, &endpoint, Expect::Host("kvm2".into())).await.is_err(),
        "a rogue CA's kvm1 is let in"
    );

    // Nor does a client that trusts another CA accept this cluster's server.
    let stranger = issue(rogue.path(), Role::Operator(Level::Admin), "eve", 1);
    let stranger = Transport::Mtls(Credentials::load(stranger).unwrap());
    assert!(ask(&stranger, &endpoint, Expect::Host("kvm2".into())).await.is_err());

    let plaintext = Transport::InsecureDev;
    let http = endpoint.replace("https://", "http://");
    assert!(ask(&plaintext, &http, Expect::Host("kvm2".into())).await.is_err(), "plaintext is let in");
    let err = ask(&kvm1, &http, Expect::Host("kvm2".into())).await.unwrap_err();
    assert!(err.contains("plaintext"), "{err}");
}

#[tokio::test]
async fn a_renewed_certificate_is_used_after_a_reload_and_must_keep_its_name() {
    let dir = tempfile::tempdir().unwrap();
    ca::init(dir.path(), 30).unwrap();
    let server = Credentials::load(issue(dir.path(), Role::Controller, "ctl1", 30)).unwrap();
    let endpoint = serve(&server).await;
    let creds = Credentials::load(issue(dir.path(), Role::Host, "kvm1", 1)).unwrap();
    let client = Transport::Mtls(creds.clone());
    let before = ask(&client, &endpoint, Expect::Controller).await.unwrap().upper_remaining_ms;

    // `vmha ca issue host kvm1` again, over the same files: nothing changes until the reload.
    issue(dir.path(), Role::Host, "kvm1", 20);
    assert_eq!(ask(&client, &endpoint, Expect::Controller).await.unwrap().upper_remaining_ms, before);
    let renewed = creds.reload().unwrap();
    let after = ask(&client, &endpoint, Expect::Controller).await.unwrap().upper_remaining_ms;
    assert_eq!(after, renewed.not_after);
    assert!((after - before - 19 * 86400).abs() < 120, "{before} -> {after}");

    // A certificate of another host put in its place is refused; the one in use stays.
    let other = issue(dir.path(), Role::Host, "kvm9", 1);
    std::fs::copy(&other.cert, dir.path().join("pki/host-kvm1.pem")).unwrap();
    std::fs::copy(&other.key, dir.path().join("pki/host-kvm1.key")).unwrap();
    let err = creds.reload().unwrap_err().to_string();
    assert!(err.contains("now names host kvm9, not host kvm1"), "{err}");
    assert_eq!(creds.identity().name, "kvm1");
    assert_eq!(ask(&client, &endpoint, Expect::Controller).await.unwrap().host, "kvm1");

    // An expired certificate is refused too, saying how to renew it; the one in use stays.
    issue(dir.path(), Role::Host, "kvm1", 0);
    let err = creds.reload().unwrap_err().to_string();
    assert!(err.contains("expired 0 days ago: renew it (`vmha ca issue host kvm1`"), "{err}");
    assert_eq!(creds.identity().not_after, renewed.not_after);
    assert_eq!(ask(&client, &endpoint, Expect::Controller).await.unwrap().host, "kvm1");
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_both_ways_once_the_crl_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    ca::init(dir.path(), 30).unwrap();
    let kvm2 = Credentials::load(issue(dir.path(), Role::Host, "kvm2", 30)).unwrap();
    let endpoint = serve(&kvm2).await;
    // kvm9's first certificate, renewed since: both are revoked, the old one too.
    let old = issue(dir.path(), Role::Host, "kvm9", 30);
    let old_copy = dir.path().join("old-kvm9.pem");
    std::fs::copy(&old.cert, &old_copy).unwrap();
    std::fs::copy(&old.key, dir.path().join("old-kvm9.key")).unwrap();
    let kvm9 = Transport::Mtls(Credentials::load(issue(dir.path(), Role::Host, "kvm9", 30)).unwrap());
    let kvm9_old = Transport::Mtls(
        Credentials::load(Paths { ca: old.ca.clone(), cert: old_copy, key: dir.path().join("old-kvm9.key") })
            .unwrap(),
    );
    ask(&kvm9, &endpoint, Expect::Host("kvm2".into())).await.unwrap();

    let revoked = ca::revoke(dir.path(), Some("host-kvm9"), &[]).unwrap();
    assert_eq!((revoked.number, revoked.added, revoked.total), (1, 2, 2));
    let pem = std::fs::read(&revoked.crl).unwrap();
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateRevocationListDer::from_pem_slice(&pem).unwrap();
    assert!(kvm2.accept_crl(&der).unwrap(), "a CRL of the cluster CA is taken");
    assert!(!kvm2.accept_crl(&der).unwrap(), "the same CRL again changes nothing");
    for who in [&kvm9, &kvm9_old] {
        let err = ask(who, &endpoint, Expect::Host("kvm2".into())).await.unwrap_err();
        assert!(err.to_lowercase().contains("revoked") || err.contains("handshake"), "{err}");
    }

    // The other way: kvm9 as a server, once its client holds the CRL, is refused too.
    let kvm9_server = Credentials::load(issue(dir.path(), Role::Host, "kvm9", 30)).unwrap();
    let endpoint9 = serve(&kvm9_server).await;
    let kvm1 = Credentials::load(issue(dir.path(), Role::Host, "kvm1", 30)).unwrap();
    let as_kvm1 = Transport::Mtls(kvm1.clone());
    ask(&as_kvm1, &endpoint9, Expect::Host("kvm9".into())).await.unwrap();
    // kvm9 was issued again after the revocation: revoke again to cover it, as the README says.
    let again = ca::revoke(dir.path(), Some("host-kvm9"), &[]).unwrap();
    assert_eq!((again.number, again.added, again.total), (2, 1, 3));
    let der2 = rustls::pki_types::CertificateRevocationListDer::from_pem_file(&again.crl).unwrap();
    assert!(kvm1.accept_crl(&der2).unwrap());
    let err = ask(&as_kvm1, &endpoint9, Expect::Host("kvm9".into())).await.unwrap_err();
    assert!(err.to_lowercase().contains("revoked"), "{err}");
    // An older CRL never replaces a newer one: a host cannot hand its peers one that forgets it.
    assert!(!kvm1.accept_crl(&der).unwrap());
    assert_eq!(kvm1.crl_number(), 2);

    // A CRL signed by another CA is refused.
    let rogue = tempfile::tempdir().unwrap();
    ca::init(rogue.path(), 1).unwrap();
    issue(rogue.path(), Role::Host, "kvm1", 1);
    let forged = ca::revoke(rogue.path(), Some("host-kvm1"), &[]).unwrap();
    let forged = rustls::pki_types::CertificateRevocationListDer::from_pem_file(&forged.crl).unwrap();
    let err = kvm2.accept_crl(&forged).unwrap_err().to_string();
    assert!(err.contains("not the cluster CA's"), "{err}");
}
