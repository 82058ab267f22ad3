//! This node's certificate and key, re-read when their files change (rotation without a
//! restart).
//!
//! `NodeIdentity` is both rustls' server certificate resolver (what a parent presents to
//! its children) and its client certificate resolver (what a child presents to its parent).
//! Before every handshake it looks at the two files' modification time, size and inode; when
//! they changed it loads them again and uses the new pair from then on. Connections that are
//! up keep the certificate they were established with.
//!
//! A pair that does not load (a half-written file, a key that does not match the
//! certificate) is logged and the previous pair stays in use; the next handshake tries
//! again. `flow-node certs issue` writes both files by rename, so readers never see a
//! half-written file. The CA (`--ca`) is read once, at start.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use super::certs;
use crate::error::{Error, Result};

/// What identifies one version of a file: modification time, size, inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let m = fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Some(Stamp {
            modified: m.modified().ok(),
            len: m.len(),
            inode,
        })
    }
}

#[derive(Debug)]
struct Loaded {
    stamps: Stamps,
    key: Arc<CertifiedKey>,
    /// Files that changed but did not load (warned about once).
    failed: Option<Stamps>,
}

/// Stamps of the certificate and the key file (`None`: cannot be read now).
type Stamps = (Option<Stamp>, Option<Stamp>);

/// A node certificate and key that follow their files. See the module docs.
#[derive(Debug)]
pub(crate) struct NodeIdentity {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    loaded: Mutex<Loaded>,
}

impl NodeIdentity {
    /// Load `cert` and `key` (errors name the file and what is wrong).
    pub(crate) fn load(cert: &Path, key: &Path, provider: Arc<CryptoProvider>) -> Result<Self> {
        let stamps = (Stamp::of(cert), Stamp::of(key));
        let pair = read_pair(cert, key, &provider)?;
        Ok(NodeIdentity {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            loaded: Mutex::new(Loaded {
                stamps,
                key: pair,
                failed: None,
            }),
        })
    }

    /// The pair to present now: the files' current contents when they changed and load,
    /// else the last pair that loaded.
    pub(crate) fn current(&self) -> Arc<CertifiedKey> {
        let stamps = (Stamp::of(&self.cert), Stamp::of(&self.key));
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if stamps != loaded.stamps && loaded.failed != Some(stamps) {
            match read_pair(&self.cert, &self.key, &self.provider) {
                Ok(pair) => {
                    tracing::info!(cert = %self.cert.display(), "node certificate changed on disk; new handshakes use it");
                    loaded.key = pair;
                    loaded.stamps = stamps;
                    loaded.failed = None;
                }
                Err(e) => {
                    // Keep the old pair; try again when the files change (they may be
                    // mid-rotation).
                    loaded.failed = Some(stamps);
                    tracing::warn!(cert = %self.cert.display(), error = %e, "node certificate changed on disk but does not load; still using the previous one");
                }
            }
        }
        loaded.key.clone()
    }
}

fn read_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>> {
    let chain = certs::load_certs(cert)?;
    let der = certs::load_key(key)?;
    CertifiedKey::from_der(chain, der, provider)
        .map(Arc::new)
        .map_err(|e| {
            Error::Tls(format!(
                "{} with {}: {e} (is the key the one issued with this certificate?)",
                cert.display(),
                key.display()
            ))
        })
}

impl ResolvesServerCert for NodeIdentity {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for NodeIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Role;

    #[test]
    fn follows_reissued_files_and_keeps_the_old_pair_on_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        certs::init_ca(&ca).unwrap();
        let out = dir.path().join("nodes");
        let files = certs::issue(&ca, "edge-1", Role::Edge, &out).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let id = NodeIdentity::load(&files.cert, &files.key, provider).unwrap();
        let first = id.current().cert[0].clone();
        assert_eq!(id.current().cert[0], first, "unchanged files, same pair");

        certs::issue(&ca, "edge-1", Role::Edge, &out).unwrap();
        let second = id.current().cert[0].clone();
        assert_ne!(second, first, "a reissued certificate is picked up");

        // A key that does not belong to the certificate: keep the last good pair.
        let other = certs::issue(&ca, "edge-2", Role::Edge, &out).unwrap();
        fs::copy(&other.key, &files.key).unwrap();
        assert_eq!(id.current().cert[0], second);
    }
}
