//! Revoked certificates. The CA signs a CRL (`vmha ca revoke`), an admin hands it to the
//! controllers (`vmha ca publish`), they keep it in the database and pass it to every agent
//! with its heartbeat answers, and every party then refuses a certificate it lists, at the
//! handshake, in both directions: controllers refuse revoked agents and operators, agents
//! refuse revoked peers and controllers, and the agent gives it to its libvirtd so that a
//! revoked host key no longer opens another host's hypervisor.
//!
//! A CRL is taken only when the cluster CA signed it and its number is higher than the one in
//! use: a host cannot hand its peers a CRL that forgets its own revocation.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::TlsError;

/// A CRL the cluster CA signed.
#[derive(Debug)]
pub struct Crl {
    /// Its CRL number: each one the CA signs is higher than the last.
    pub number: u64,
    serials: HashSet<Vec<u8>>,
    der: Vec<u8>,
}

impl Crl {
    /// The CRL in `der`, if one of `ca` signed it.
    pub fn verified(der: &[u8], ca: &[CertificateDer<'_>]) -> Result<Crl, TlsError> {
        let bad = |detail: String| TlsError::Refused(format!("not a CRL of the cluster CA: {detail}"));
        let (rest, crl) = CertificateRevocationList::from_der(der).map_err(|e| bad(e.to_string()))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes after it".into()));
        }
        let signed = ca.iter().any(|c| {
            X509Certificate::from_der(c)
                .is_ok_and(|(_, cert)| crl.verify_signature(cert.public_key()).is_ok())
        });
        if !signed {
            return Err(bad("its signature is not the cluster CA's".into()));
        }
        let number = crl
            .crl_number()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| bad("it carries no CRL number (up to 2^64)".into()))?;
        let serials = crl.iter_revoked_certificates().map(|r| serial_key(r.raw_serial())).collect();
        Ok(Crl { number, serials, der: der.to_vec() })
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// How many certificates it revokes.
    pub fn len(&self) -> usize {
        self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }

    /// Whether it revokes the certificate with this serial (its DER integer's bytes).
    pub fn revokes(&self, serial: &[u8]) -> bool {
        self.serials.contains(&serial_key(serial))
    }

    /// As libvirt (GnuTLS) reads it.
    pub fn pem(&self) -> String {
        pem::encode(&pem::Pem::new("X509 CRL", self.der.clone()))
    }
}

/// A serial as compared: without the sign byte DER puts before a high first bit (rcgen puts
/// it back when it encodes one).
pub(crate) fn serial_key(raw: &[u8]) -> Vec<u8> {
    let start = raw.iter().take_while(|b| **b == 0).count().min(raw.len().saturating_sub(1));
    raw[start..].to_vec()
}

/// The CRL in a PEM file (`crl.pem`), as DER.
pub fn read_pem(path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    use rustls::pki_types::CertificateRevocationListDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| TlsError::io("read", path, e))?;
    CertificateRevocationListDer::from_pem_slice(&pem)
        .map(|d| d.as_ref().to_vec())
        .map_err(|e| TlsError::BadFile { path: path.to_path_buf(), what: "CRL", detail: e.to_string() })
}

/// The serial of a certificate (DER), as `Crl::revokes` takes it.
pub fn serial_of(cert: &[u8]) -> Option<Vec<u8>> {
    X509Certificate::from_der(cert).ok().map(|(_, c)| c.raw_serial().to_vec())
}

/// The CRL a party goes by, shared by its TLS verifiers: replaced whole when a newer one
/// arrives, so a handshake sees the old one or the new one.
#[derive(Debug, Default)]
pub struct Revocations {
    current: RwLock<Option<Arc<Crl>>>,
}

impl Revocations {
    pub fn current(&self) -> Option<Arc<Crl>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The CRL number in use (0: none).
    pub fn number(&self) -> u64 {
        self.current().map_or(0, |c| c.number)
    }

    /// Takes `crl` if it is newer than the one in use; says whether it did.
    pub fn offer(&self, crl: Crl) -> bool {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|c| c.number >= crl.number) {
            return false;
        }
        *current = Some(Arc::new(crl));
        true
    }

    /// Refuses a revoked certificate at the handshake.
    pub(crate) fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let Some(crl) = self.current() else { return Ok(()) };
        match serial_of(end_entity) {
            Some(serial) if !crl.revokes(&serial) => Ok(()),
            Some(_) => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)),
            None => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)),
        }
    }
}
