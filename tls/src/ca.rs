//! The cluster CA (`vmha ca init`), the certificates it issues (`vmha ca issue`) and the ones it
//! revokes (`vmha ca revoke`). Keys are written 0600 and certificates 0644, each through a
//! temporary file and a rename, so that a process reloading its certificate never reads half
//! of one. The CA's directory holds only what is the CA's: `ca.key`, `ca.pem`, the record of
//! what it issued (`issued.txt`, so that every certificate a name ever had can be revoked,
//! renewed ones included) and its CRL (`crl.pem`). Keys for other machines are written
//! elsewhere: a directory copied to a host must never carry the CA's key.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::TlsError;
use crate::identity::{Identity, Role, bad_certificate, check_name, first_certificate};
use crate::revocation::serial_key;

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
/// One line per certificate issued: `<serial hex> <file stem> <notAfter>`.
pub const CA_INDEX: &str = "issued.txt";
pub const CA_CRL: &str = "crl.pem";

/// How long a CRL says it stays current. Revocations are pushed, not fetched, so nothing
/// waits for this date; it is far off because GnuTLS (libvirt) may treat a CRL past it as
/// stale.
const CRL_VALID: Duration = Duration::days(3650);
/// Clocks on a cluster's machines differ a little: a certificate is valid from a few minutes
/// before it was made.
pub const BACKDATE_S: i64 = 300;
const BACKDATE: Duration = Duration::seconds(BACKDATE_S);

/// What `vmha ca issue` makes.
#[derive(Clone, Debug)]
pub struct Request {
    pub role: Role,
    pub name: String,
    /// More names a server certificate answers to (a host's or a controller's FQDN).
    pub dns: Vec<String>,
    /// Addresses a server certificate answers to, e.g. the host's migration address for
    /// libvirt's TLS, which checks it.
    pub ips: Vec<IpAddr>,
    pub days: u32,
}

/// The files an issued certificate was written to.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub identity: Identity,
}

/// The file names (without extension) of an issued certificate: `host-kvm1`,
/// `controller-ctl1`, `operator-alice`.
pub fn file_stem(role: Role, name: &str) -> String {
    let kind = match role {
        Role::Host => "host",
        Role::Controller => "controller",
        Role::Operator(_) => "operator",
    };
    format!("{kind}-{name}")
}

/// Makes a new cluster CA in `dir`: `ca.pem` (give it to every host, controller and operator)
/// and `ca.key` (keep it on the machine that issues certificates). Refuses to replace one.
pub fn init(dir: &Path, days: u32) -> Result<PathBuf, TlsError> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(TlsError::Exists(p.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| TlsError::io("create the directory", dir, e))?;
    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = names("vmha cluster CA", "ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
    write(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(cert_path)
}

/// Issues a certificate signed by the CA in `ca_dir` and writes it to `out_dir` as
/// `<stem>.pem` and `<stem>.key` (see `file_stem`). Issuing again for the same name renews it:
/// the old files are replaced, and the processes using them reload on SIGHUP.
pub fn issue(ca_dir: &Path, out_dir: &Path, req: &Request) -> Result<Issued, TlsError> {
    check_name(&req.name)?;
    if same_dir(ca_dir, out_dir) {
        return Err(TlsError::Usage(format!(
            "keys for other machines are not written next to the CA's key in {}: a copy of that \
             directory would carry ca.key; write them elsewhere (--out, e.g. /etc/vmha/pki)",
            ca_dir.display()
        )));
    }
    let issuer = load_issuer(ca_dir)?;

    let mut params = CertificateParams::default();
    params.distinguished_name = names(&req.name, &file_stem(req.role, &req.name));
    params.is_ca = IsCa::ExplicitNoCa;
    // keyEncipherment as well: libvirt's TLS (GnuTLS) refuses host certificates without it.
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let san = |s: String| s.try_into().map_err(TlsError::Generate);
    params.subject_alt_names.push(SanType::URI(san(Identity::san(req.role, &req.name))?));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if matches!(req.role, Role::Host | Role::Controller) {
        // Servers too: a host answers its peers' polls, a controller its agents and operators.
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        for dns in std::iter::once(&req.name).chain(&req.dns) {
            params.subject_alt_names.push(SanType::DnsName(san(dns.clone())?));
        }
        params.subject_alt_names.extend(req.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    } else if !req.dns.is_empty() || !req.ips.is_empty() {
        return Err(TlsError::Usage("an operator certificate names no servers: drop --dns and --ip".into()));
    }
    validity(&mut params, req.days);
    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let cert = params.signed_by(&key, &issuer).map_err(TlsError::Generate)?;
    let identity = Identity::from_der(cert.der())?;
    std::fs::create_dir_all(out_dir).map_err(|e| TlsError::io("create the directory", out_dir, e))?;
    let stem = file_stem(req.role, &req.name);
    // Recorded before the files are written: a certificate that exists is one `revoke` finds.
    let serial = crate::revocation::serial_of(cert.der()).expect("rcgen made a readable certificate");
    append_line(&ca_dir.join(CA_INDEX), &format!("{} {stem} {}\n", hex(&serial), identity.not_after))?;
    // What every party also needs, beside its own files.
    let ca_copy = out_dir.join(CA_CERT);
    if !ca_copy.exists() {
        let pem = std::fs::read(ca_dir.join(CA_CERT))
            .map_err(|e| TlsError::io("read the CA certificate", &ca_dir.join(CA_CERT), e))?;
        write(&ca_copy, &pem, 0o644)?;
    }
    let (cert_path, key_path) = (out_dir.join(format!("{stem}.pem")), out_dir.join(format!("{stem}.key")));
    write(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Issued { cert: cert_path, key: key_path, identity })
}

/// What `revoke` did.
#[derive(Clone, Debug)]
pub struct Revoked {
    pub crl: PathBuf,
    /// The new CRL's number.
    pub number: u64,
    /// Certificates it revokes that the last one did not.
    pub added: usize,
    /// Certificates it revokes.
    pub total: usize,
}

/// Revokes every certificate the CA issued to `stem` (`host-kvm9`, see `file_stem`) and the
/// certificates in `files`, writing a new `crl.pem` (the old revocations kept, the CRL number
/// one higher) in `ca_dir`. Publishing it is the caller's part (`vmha ca publish`).
pub fn revoke(ca_dir: &Path, stem: Option<&str>, files: &[PathBuf]) -> Result<Revoked, TlsError> {
    let issuer = load_issuer(ca_dir)?;
    let mut serials = Vec::new();
    if let Some(stem) = stem {
        let index = ca_dir.join(CA_INDEX);
        let text = match std::fs::read_to_string(&index) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(TlsError::io("read", &index, e)),
        };
        let before = serials.len();
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            if let (Some(serial), Some(s)) = (fields.next(), fields.next())
                && s == stem
            {
                serials.push(unhex(serial).ok_or_else(|| TlsError::BadFile {
                    path: index.clone(),
                    what: "index of issued certificates",
                    detail: format!("bad serial '{serial}'"),
                })?);
            }
        }
        if serials.len() == before {
            return Err(TlsError::Usage(format!(
                "the CA has no record of a certificate for {stem} ({} lists what it issued): name the \
                 certificate's file with --file",
                index.display()
            )));
        }
    }
    for f in files {
        let der = first_certificate(f)?;
        serials
            .push(crate::revocation::serial_of(&der).ok_or_else(|| bad_certificate(f, "unreadable".into()))?);
    }
    if serials.is_empty() {
        return Err(TlsError::Usage(
            "nothing to revoke: name a certificate (KIND NAME, or --file FILE)".into(),
        ));
    }

    let crl_path = ca_dir.join(CA_CRL);
    let (mut revoked, number) = previous_crl(&crl_path, ca_dir)?;
    let mut known: std::collections::HashSet<Vec<u8>> =
        revoked.iter().map(|r| r.serial_number.to_bytes()).collect();
    let now = OffsetDateTime::now_utc();
    let mut added = 0;
    for serial in serials {
        let serial = serial_key(&serial);
        if known.insert(serial.clone()) {
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            });
            added += 1;
        }
    }
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + CRL_VALID,
        crl_number: SerialNumber::from(number + 1),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let total = params.revoked_certs.len();
    let crl = params.signed_by(&issuer).map_err(TlsError::Generate)?;
    write(&crl_path, crl.pem().map_err(TlsError::Generate)?.as_bytes(), 0o644)?;
    Ok(Revoked { crl: crl_path, number: number + 1, added, total })
}

/// The revocations in the CA's current CRL, and its number (none: 0).
fn previous_crl(path: &Path, ca_dir: &Path) -> Result<(Vec<RevokedCertParams>, u64), TlsError> {
    if !path.exists() {
        return Ok((Vec::new(), 0));
    }
    let bad = |detail: String| TlsError::BadFile { path: path.to_path_buf(), what: "CRL", detail };
    let der = crate::revocation::read_pem(path)?;
    let ca = first_certificate(&ca_dir.join(CA_CERT))?;
    let crl = crate::revocation::Crl::verified(&der, &[ca]).map_err(|e| bad(e.to_string()))?;
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
        .map_err(|e| bad(e.to_string()))?;
    let revoked = parsed
        .iter_revoked_certificates()
        .map(|r| RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial_key(r.raw_serial())),
            revocation_time: r.revocation_date.to_datetime(),
            reason_code: None,
            invalidity_date: None,
        })
        .collect();
    Ok((revoked, crl.number))
}

fn load_issuer(ca_dir: &Path) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_cert_path = ca_dir.join(CA_CERT);
    let ca_key_pem = std::fs::read_to_string(&ca_key_path)
        .map_err(|e| TlsError::io("read the CA key", &ca_key_path, e))?;
    let ca_cert_pem = std::fs::read_to_string(&ca_cert_path)
        .map_err(|e| TlsError::io("read the CA certificate", &ca_cert_path, e))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(TlsError::Generate)?;
    Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key).map_err(TlsError::Generate)
}

/// Whether `a` and `b` are one directory (`b` need not exist yet).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn append_line(path: &Path, line: &str) -> Result<(), TlsError> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| TlsError::io("open", path, e))?;
    f.write_all(line.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| TlsError::io("append to", path, e))
}

/// Renews every certificate in `certs_dir` (the `*.pem` files `issue` wrote, not the CA's):
/// the same role, name, DNS names and addresses, valid `days` from now, with a new key. For a
/// cluster whose certificates were issued together and so expire together. Every file is read
/// first: one that is not a vmha certificate stops it, naming the file, before anything is
/// renewed.
pub fn renew_all(ca_dir: &Path, certs_dir: &Path, days: u32) -> Result<Vec<Issued>, TlsError> {
    let entries =
        std::fs::read_dir(certs_dir).map_err(|e| TlsError::io("list the certificates in", certs_dir, e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pem") && p.file_name().is_some_and(|n| n != CA_CERT))
        .collect();
    files.sort();
    let requests = files.iter().map(|f| renewal_of(f, days)).collect::<Result<Vec<_>, _>>()?;
    requests.iter().map(|req| issue(ca_dir, certs_dir, req)).collect()
}

/// What renews the certificate in `path`: its identity, and the DNS names (besides its own
/// name) and addresses it answers to.
fn renewal_of(path: &Path, days: u32) -> Result<Request, TlsError> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let bad = |detail: String| bad_certificate(path, detail);
    let der = first_certificate(path)?;
    let identity = Identity::from_der(&der).map_err(|e| bad(e.to_string()))?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| bad(e.to_string()))?;
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    let sans = cert.subject_alternative_name().map_err(|e| bad(e.to_string()))?;
    for name in sans.iter().flat_map(|s| s.value.general_names.iter()) {
        match name {
            GeneralName::DNSName(d) if *d != identity.name => dns.push(d.to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).expect("4 bytes"))),
                16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).expect("16 bytes"))),
                _ => return Err(bad(format!("an IP address of {} bytes", b.len()))),
            },
            _ => {}
        }
    }
    Ok(Request { role: identity.role, name: identity.name, dns, ips, days })
}

fn names(common_name: &str, unit: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "vmha");
    dn.push(DnType::OrganizationalUnitName, unit);
    dn.push(DnType::CommonName, common_name);
    dn
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(i64::from(days));
}

/// Writes `path` whole or not at all, with `mode` from its creation.
fn write(path: &Path, content: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| TlsError::io("create", &tmp, e))?;
    f.write_all(content).and_then(|()| f.sync_all()).map_err(|e| TlsError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TlsError::io("replace", path, e))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::identity::Level;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn renew_all_keeps_roles_names_and_addresses_and_moves_the_expiry() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 30).unwrap();
        let host = Request {
            role: Role::Host,
            name: "kvm1".into(),
            dns: vec!["kvm1.example.net".into()],
            ips: vec!["10.0.0.11".parse().unwrap(), "fd00::11".parse().unwrap()],
            days: 2,
        };
        let admin = Request {
            role: Role::Operator(Level::Admin),
            name: "alice".into(),
            dns: vec![],
            ips: vec![],
            days: 2,
        };
        let out = dir.path().join("pki");
        for r in [&host, &admin] {
            issue(dir.path(), &out, r).unwrap();
        }
        let old_key = std::fs::read(out.join("host-kvm1.key")).unwrap();
        let renewed = renew_all(dir.path(), &out, 365).unwrap();
        let names: Vec<(Role, String)> =
            renewed.iter().map(|i| (i.identity.role, i.identity.name.clone())).collect();
        assert_eq!(
            names,
            [(Role::Host, "kvm1".to_string()), (Role::Operator(Level::Admin), "alice".to_string())]
        );
        let year = OffsetDateTime::now_utc().unix_timestamp() + 365 * 86400;
        assert!(renewed.iter().all(|i| (i.identity.not_after - year).abs() < 60));
        let again = renewal_of(&out.join("host-kvm1.pem"), 365).unwrap();
        assert_eq!((again.role, again.name.as_str()), (Role::Host, "kvm1"));
        assert_eq!(again.dns, ["kvm1.example.net"]);
        assert_eq!(again.ips, host.ips);
        assert_ne!(std::fs::read(out.join("host-kvm1.key")).unwrap(), old_key, "a new key");
        assert_eq!(mode(&out.join("host-kvm1.key")), 0o600);
    }

    #[test]
    fn issued_certificates_name_their_role_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init(dir.path(), 30).unwrap();
        assert_eq!(mode(&ca), 0o644);
        assert_eq!(mode(&dir.path().join(CA_KEY)), 0o600);
        assert!(matches!(init(dir.path(), 30), Err(TlsError::Exists(_))), "a CA is never replaced");

        let req = Request {
            role: Role::Operator(Level::Viewer),
            name: "alice".into(),
            dns: vec![],
            ips: vec![],
            days: 7,
        };
        let err = issue(dir.path(), dir.path(), &req).unwrap_err().to_string();
        assert!(err.contains("not written next to the CA's key"), "{err}");
        let out = dir.path().join("pki");
        let issued = issue(dir.path(), &out, &req).unwrap();
        assert_eq!(issued.cert, out.join("operator-alice.pem"));
        assert_eq!(
            std::fs::read(out.join(CA_CERT)).unwrap(),
            std::fs::read(&ca).unwrap(),
            "ca.pem beside it"
        );
        assert_eq!(mode(&issued.key), 0o600);
        assert_eq!(mode(&issued.cert), 0o644);
        assert_eq!(issued.identity.role, Role::Operator(Level::Viewer));
        assert_eq!(issued.identity.name, "alice");
        let week = OffsetDateTime::now_utc().unix_timestamp() + 7 * 86400;
        assert!((issued.identity.not_after - week).abs() < 60);

        let host =
            Request { role: Role::Host, name: "kvm1".into(), ips: vec!["10.0.0.1".parse().unwrap()], ..req };
        let issued = issue(dir.path(), &out, &host).unwrap();
        assert_eq!((issued.identity.role, issued.identity.name.as_str()), (Role::Host, "kvm1"));
    }

    #[test]
    fn bad_names_and_operator_server_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 30).unwrap();
        let req = |role, name: &str, dns: Vec<String>| Request {
            role,
            name: name.into(),
            dns,
            ips: vec![],
            days: 1,
        };
        assert!(matches!(
            issue(dir.path(), &dir.path().join("pki"), &req(Role::Host, "kvm:1", vec![])),
            Err(TlsError::BadName(_))
        ));
        assert!(matches!(
            issue(
                dir.path(),
                &dir.path().join("pki"),
                &req(Role::Operator(Level::Admin), "bob", vec!["x.example".into()])
            ),
            Err(TlsError::Usage(_))
        ));
    }
}
