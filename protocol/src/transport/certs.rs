//! Cluster certificates: a CA per cluster, one certificate per node with its role bound in.
//!
//! - [`init_ca`] writes `ca.pem` (certificate) and `ca.key` (PKCS#8 private key, mode 0600).
//! - [`issue`] writes `NAME.pem` and `NAME.key`, signed by that CA.
//!
//! A node certificate carries:
//! - the node name as its DNS subject alternative name (what peers pass as `server_name`)
//!   and as the subject common name;
//! - its **role** as a URI SAN `aiflow:role:<device|edge|cloud>` ([`ROLE_URI_PREFIX`]);
//!   [`role_of`] reads it back, and the transport refuses a peer whose role is not one it
//!   accepts (a device certificate cannot register as an edge);
//! - both `serverAuth` and `clientAuth` extended key usages (an edge is a server to its
//!   devices and a client of its cloud).
//!
//! Keys are ECDSA P-256 (rcgen's default, ring backend).
//!
//! Certificates are valid from 2024-01-01 to 2099-01-01 unless issued with
//! [`issue_with_validity`] (`flow-node certs issue --days N`). Files are written under a
//! temporary name and renamed into place, so a running node that re-reads them (see
//! `identity`) never sees a half-written file: reissuing a node's certificate into the
//! same directory rotates it without a restart.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};
use crate::message::Role;

/// Prefix of the URI SAN that binds a role into a node certificate.
pub const ROLE_URI_PREFIX: &str = "aiflow:role:";
/// CA certificate file name inside a CA directory.
pub const CA_CERT: &str = "ca.pem";
/// CA private key file name inside a CA directory.
pub const CA_KEY: &str = "ca.key";

/// Paths of a written certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM PKCS#8 private key.
    pub key: PathBuf,
}

fn tls(what: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |e| Error::Tls(format!("{what}: {e}"))
}

/// Write `contents` to `path` through a temporary file in the same directory and a
/// rename, so readers see the old file or the new one, never a part. `private` files are
/// created with mode 0600.
fn write_replacing(path: &Path, contents: &str, private: bool) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid("path", format!("{} names no file", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        if private {
            opts.mode(0o600);
        }
    }
    #[cfg(not(unix))]
    let _ = private;
    let written = opts
        .open(&tmp)
        .and_then(|mut f| f.write_all(contents.as_bytes()).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    Ok(written?)
}

fn write_key(path: &Path, pem: &str) -> Result<()> {
    write_replacing(path, pem, true)
}

/// When a node certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// First moment it is valid.
    pub not_before: SystemTime,
    /// Last moment it is valid.
    pub not_after: SystemTime,
}

impl Validity {
    /// The default of `flow-node certs issue`: 2024-01-01 to 2099-01-01.
    pub fn long() -> Self {
        let ymd = |y: u64| UNIX_EPOCH + Duration::from_secs(days_from_epoch(y) * 86_400);
        Validity {
            not_before: ymd(2024),
            not_after: ymd(2099),
        }
    }

    /// Valid for `days` days from now (from an hour ago, for clocks slightly behind).
    pub fn days(days: u64) -> Result<Self> {
        let now = SystemTime::now();
        let not_after = Duration::from_secs(days.saturating_mul(86_400));
        Ok(Validity {
            not_before: now.checked_sub(Duration::from_secs(3600)).unwrap_or(now),
            not_after: now
                .checked_add(not_after)
                .ok_or_else(|| Error::invalid("validity", format!("{days} days is too long")))?,
        })
    }
}

/// Days from 1970-01-01 to January 1st of `year` (≥ 1970).
fn days_from_epoch(year: u64) -> u64 {
    let leaps = |y: u64| y / 4 - y / 100 + y / 400;
    (year - 1970) * 365 + leaps(year - 1) - leaps(1969)
}

/// Time since 1970 of `t`; refuses times before 1970 or after the year 9999 (the last
/// X.509 GeneralizedTime can hold).
fn since_epoch(what: &str, t: SystemTime) -> Result<Duration> {
    let since = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| Error::invalid("validity", format!("{what} is before 1970")))?;
    if since.as_secs() >= days_from_epoch(10_000) * 86_400 {
        return Err(Error::invalid(
            "validity",
            format!("{what} is after the year 9999; use fewer days"),
        ));
    }
    Ok(since)
}

fn set_validity(params: &mut CertificateParams, validity: Validity) -> Result<()> {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch("not_before", validity.not_before)?;
    params.not_after = epoch + since_epoch("not_after", validity.not_after)?;
    Ok(())
}

/// Create a cluster CA in `dir` (created if missing). Refuses to overwrite an existing CA.
pub fn init_ca(dir: &Path) -> Result<CertFiles> {
    fs::create_dir_all(dir)?;
    let files = CertFiles {
        cert: dir.join(CA_CERT),
        key: dir.join(CA_KEY),
    };
    if files.cert.exists() || files.key.exists() {
        return Err(Error::invalid(
            "ca dir",
            format!(
                "{} already holds a CA; remove it first to create a new one",
                dir.display()
            ),
        ));
    }
    let key = KeyPair::generate().map_err(tls("CA key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls("CA parameters"))?;
    let mut dn = DistinguishedName::new();
    // A per-CA suffix so certificates from another cluster fail as "unknown issuer".
    let id: String = key
        .public_key_raw()
        .iter()
        .rev()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    dn.push(DnType::CommonName, format!("aiflow cluster CA {id}"));
    dn.push(DnType::OrganizationName, "aiflow");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let cert = params.self_signed(&key).map_err(tls("CA certificate"))?;
    fs::write(&files.cert, cert.pem())?;
    write_key(&files.key, &key.serialize_pem())?;
    Ok(files)
}

/// Check a node name is usable as a DNS SAN (letters, digits, `-`, `.`; 1..=253 chars).
pub fn check_node_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "name",
            format!(
                "{name:?} is not a valid DNS name (use letters, digits, '-' and '.', e.g. edge-1)"
            ),
        ))
    }
}

/// Issue a certificate for node `name` with `role`, signed by the CA in `ca_dir`; writes
/// `NAME.pem` and `NAME.key` into `out_dir` (created if missing), replacing earlier ones
/// (a rotation). Valid from 2024 to 2099 ([`Validity::long`]).
pub fn issue(ca_dir: &Path, name: &str, role: Role, out_dir: &Path) -> Result<CertFiles> {
    issue_with_validity(ca_dir, name, role, out_dir, Validity::long())
}

/// [`issue`] with an explicit validity period (`flow-node certs issue --days`; tests issue
/// expired certificates with it).
pub fn issue_with_validity(
    ca_dir: &Path,
    name: &str,
    role: Role,
    out_dir: &Path,
    validity: Validity,
) -> Result<CertFiles> {
    check_node_name(name)?;
    if validity.not_after <= validity.not_before {
        return Err(Error::invalid(
            "validity",
            "a certificate must end after it starts",
        ));
    }
    let ca_pem = fs::read_to_string(ca_dir.join(CA_CERT)).map_err(|e| {
        Error::Tls(format!(
            "reading {}: {e} (run `flow-node certs init` first)",
            ca_dir.join(CA_CERT).display()
        ))
    })?;
    let ca_key_pem = fs::read_to_string(ca_dir.join(CA_KEY))
        .map_err(|e| Error::Tls(format!("reading {}: {e}", ca_dir.join(CA_KEY).display())))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(tls("CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(tls("CA certificate"))?;

    let mut params =
        CertificateParams::new(vec![name.to_string()]).map_err(tls("node parameters"))?;
    let uri = format!("{ROLE_URI_PREFIX}{}", role.as_str());
    params.subject_alt_names.push(SanType::URI(
        uri.as_str().try_into().map_err(tls("role URI"))?,
    ));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    set_validity(&mut params, validity)?;
    let key = KeyPair::generate().map_err(tls("node key"))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(tls("node certificate"))?;

    fs::create_dir_all(out_dir)?;
    let files = CertFiles {
        cert: out_dir.join(format!("{name}.pem")),
        key: out_dir.join(format!("{name}.key")),
    };
    // Key first: a node reading between the two renames sees a pair that does not match
    // and keeps its previous one until the certificate follows.
    write_key(&files.key, &key.serialize_pem())?;
    write_replacing(&files.cert, &cert.pem(), false)?;
    Ok(files)
}

/// Read all certificates from a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let data =
        fs::read(path).map_err(|e| Error::Tls(format!("reading {}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("parsing {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// Read the first private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let data =
        fs::read(path).map_err(|e| Error::Tls(format!("reading {}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| Error::Tls(format!("parsing {}: {e}", path.display())))?
        .ok_or_else(|| Error::Tls(format!("{} holds no PEM private key", path.display())))
}

/// The role bound into a node certificate (its `aiflow:role:` URI SAN).
pub fn role_of(cert: &CertificateDer<'_>) -> Result<Role> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| Error::Role(format!("peer certificate does not parse: {e}")))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| Error::Role(format!("peer certificate SAN: {e}")))?
        .ok_or_else(|| {
            Error::Role(
                "peer certificate has no subject alternative names, so no aiflow role".into(),
            )
        })?;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX) {
                return role.parse().map_err(|_| {
                    Error::Role(format!("unknown role {role:?} in peer certificate"))
                });
            }
        }
    }
    Err(Error::Role(format!(
        "peer certificate carries no {ROLE_URI_PREFIX}<role> URI SAN; issue it with `flow-node certs issue --role`"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_binds_role_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        assert!(init_ca(&ca).is_err(), "must not overwrite a CA");
        let files = issue(&ca, "edge-1", Role::Edge, &dir.path().join("nodes")).unwrap();
        let certs = load_certs(&files.cert).unwrap();
        assert_eq!(role_of(&certs[0]).unwrap(), Role::Edge);
        load_key(&files.key).unwrap();
        assert!(issue(&ca, "bad name", Role::Edge, dir.path()).is_err());
    }

    #[test]
    fn validity_is_written_as_given() {
        assert_eq!(days_from_epoch(1970), 0);
        assert_eq!(days_from_epoch(2024), 19_723);
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        let start = UNIX_EPOCH + Duration::from_secs(days_from_epoch(2025) * 86_400);
        let end = start + Duration::from_secs(86_400);
        let v = Validity {
            not_before: start,
            not_after: end,
        };
        let files = issue_with_validity(&ca, "old", Role::Edge, dir.path(), v).unwrap();
        let der = load_certs(&files.cert).unwrap().remove(0);
        let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        assert_eq!(x509.validity().not_before.timestamp(), 1_735_689_600);
        assert_eq!(
            x509.validity().not_after.timestamp(),
            1_735_689_600 + 86_400
        );
        let backwards = Validity {
            not_before: end,
            not_after: start,
        };
        assert!(issue_with_validity(&ca, "x", Role::Edge, dir.path(), backwards).is_err());
        let far = Validity::days(u64::MAX / 86_400)
            .and_then(|v| issue_with_validity(&ca, "x", Role::Edge, dir.path(), v));
        assert!(far.is_err());
        let year = Validity::days(365).unwrap();
        issue_with_validity(&ca, "year", Role::Edge, dir.path(), year).unwrap();
    }
}
