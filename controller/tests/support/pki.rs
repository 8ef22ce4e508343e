//! A cluster CA for tests, made once per test binary in a temporary directory, and
//! certificates from it on demand: the control path runs over the same mutual TLS as a
//! cluster does.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use vmha_proto::v1::operator_service_client::OperatorServiceClient;
use vmha_tls::transport::Expect;
use vmha_tls::{Credentials, Level, Paths, Role, Transport, ca};

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fn dir() -> PathBuf {
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().expect("a temporary directory");
        ca::init(d.path(), 1).expect("a test CA");
        d
    })
    .path()
    .to_path_buf()
}

/// Credentials of `role` `name`, issued by the test CA (again at each call: each is fresh).
/// One at a time: tests run in parallel, and two issuing the same name would replace the files
/// under each other's load.
pub fn creds(role: Role, name: &str) -> Arc<Credentials> {
    static ISSUING: Mutex<()> = Mutex::new(());
    let _one = ISSUING.lock().unwrap_or_else(|p| p.into_inner());
    let dir = dir();
    let req = ca::Request { role, name: name.into(), dns: vec![], ips: vec![], days: 1 };
    let issued = ca::issue(&dir, &dir.join("pki"), &req).expect("a test certificate");
    Credentials::load(Paths { ca: dir.join(ca::CA_CERT), cert: issued.cert, key: issued.key })
        .expect("loadable")
}

pub fn transport(role: Role, name: &str) -> Transport {
    Transport::Mtls(creds(role, name))
}

/// An operator's client with role `level`, named after it ("admin", "viewer", ...).
pub async fn operator(endpoint: &str, level: Level) -> OperatorServiceClient<tonic::transport::Channel> {
    let channel = transport(Role::Operator(level), level.as_str())
        .channel(endpoint, Expect::Controller, Duration::from_secs(3))
        .await
        .expect("the controller accepts an operator of the cluster CA");
    OperatorServiceClient::new(channel)
}
