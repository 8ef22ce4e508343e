//! The cluster's CRL on this host. It arrives with a heartbeat answer when the controller holds
//! a newer one than this agent said it has; it is taken only if the cluster CA signed it and its
//! number is higher (see `vmha_tls::revocation`). Once taken:
//! - this agent's TLS refuses the certificates it lists: a revoked peer's polls, a revoked
//!   controller;
//! - it is kept in the state directory, so that it holds from the agent's next start;
//! - it is written where libvirtd reads its CRL (`crl_file`, by default libvirt's own
//!   `/etc/pki/CA/cacrl.pem`) and libvirtd is told to reload it (`virt-admin
//!   server-update-tls libvirtd`), so that a revoked host key no longer opens this hypervisor
//!   (live migration connects libvirtd to libvirtd with the host certificates).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmha_tls::Credentials;

const SAVED: &str = "crl.der";
/// libvirtd answers its admin socket at once; one that does not is reported, not waited for.
const LIBVIRT_RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Revocation {
    creds: Arc<Credentials>,
    saved: Option<PathBuf>,
    libvirt_crl: PathBuf,
    /// One hand-over at a time, each of the CRL in use then: the files end with the newest.
    handing_over: tokio::sync::Mutex<()>,
}

impl Revocation {
    /// Takes the CRL saved in `state_dir` by an earlier run, if any.
    pub fn new(creds: Arc<Credentials>, state_dir: Option<&Path>, libvirt_crl: PathBuf) -> Revocation {
        let saved = state_dir.map(|d| d.join(SAVED));
        if let Some(path) = &saved
            && let Ok(der) = std::fs::read(path)
        {
            match creds.accept_crl(&der) {
                Ok(_) => tracing::info!(
                    number = creds.crl_number(),
                    "revoked certificates: the CRL kept from the last run"
                ),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "ignoring the saved CRL"),
            }
        }
        Revocation { creds, saved, libvirt_crl, handing_over: tokio::sync::Mutex::new(()) }
    }

    /// The number of the CRL in use (0: none), for the heartbeat.
    pub fn number(&self) -> u64 {
        self.creds.crl_number()
    }

    /// A CRL from the controller: taken if the CA signed it and it is newer, then kept and
    /// handed to libvirtd. Run beside the heartbeats, never in their way (libvirtd may be slow
    /// to answer); a CRL that is refused is logged.
    pub async fn offered(&self, der: &[u8]) {
        match self.creds.accept_crl(der) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!(error = %e, "the controller sent a CRL that is not the cluster CA's; ignored");
                return;
            }
        }
        let _one = self.handing_over.lock().await;
        let Some(crl) = self.creds.crl() else { return };
        tracing::info!(
            number = crl.number,
            revoked = crl.len(),
            "took a new CRL: its certificates are refused"
        );
        if let Some(path) = &self.saved
            && let Err(e) = write_whole(path, crl.der())
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep the CRL for the next start");
        }
        if let Err(e) = write_whole(&self.libvirt_crl, crl.pem().as_bytes()) {
            tracing::error!(
                path = %self.libvirt_crl.display(), error = %e,
                "cannot write libvirt's CRL: libvirtd still lets the revoked certificates in"
            );
            return;
        }
        match reload_libvirt_tls().await {
            Ok(()) => {
                tracing::info!(path = %self.libvirt_crl.display(), "libvirtd reloaded its TLS files with the CRL")
            }
            Err(e) => tracing::error!(
                error = %e,
                "libvirtd did not reload its TLS files: it lets the revoked certificates in until it restarts \
                 (run `virt-admin server-update-tls libvirtd`)"
            ),
        }
    }
}

async fn reload_libvirt_tls() -> Result<(), String> {
    let mut cmd = tokio::process::Command::new("virt-admin");
    cmd.args(["server-update-tls", "libvirtd"]).kill_on_drop(true);
    let out = tokio::time::timeout(LIBVIRT_RELOAD_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("virt-admin did not answer in {LIBVIRT_RELOAD_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot run virt-admin: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("virt-admin server-update-tls: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Writes `path` whole or not at all.
fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}
