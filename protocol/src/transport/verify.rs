//! How a child verifies its parent: the cluster CA and the role bound in the certificate,
//! with the DNS name as optional pinning.
//!
//! The verifier (crate-private `ParentVerifier`) is a rustls [`ServerCertVerifier`] that wraps rustls'
//! [`WebPkiServerVerifier`]:
//!
//! - **pinned** ([`ParentName::Pinned`], `--parent-name`): the wrapped verifier does
//!   everything (chain to the CA roots, validity period, signatures, key usage, the name);
//! - **any name** ([`ParentName::Any`], the default): the same chain, validity and
//!   signature checks through rustls' [`verify_server_cert_signed_by_trust_anchor`], and no
//!   name check — the cluster CA only issues certificates to the cluster's nodes, and the
//!   role below says which tier a node is;
//! - then, in both cases, the certificate's `aiflow:role:` URI SAN must be one of the
//!   expected parent roles.
//!
//! A refusal is a normal TLS failure for rustls (with the usual alert to the parent), and a
//! [`Error`] that says what to fix is left in the verifier's diagnosis slot, where
//! [`Endpoint::connect`](super::Endpoint::connect) picks it up (quinn only passes the text
//! of a TLS error on, and without the parent's address).

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::certs::{self, ROLE_URI_PREFIX};
use crate::error::Error;
use crate::message::Role;

/// The DNS name a parent's certificate must carry.
///
/// Converts from `&str`/`String` (pinned) and from `Option<String>` (`None` = any name), so
/// `endpoint.connect(addr, "edge-1")` pins and `endpoint.connect(addr, ParentName::Any)`
/// does not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ParentName {
    /// Any name: the parent is verified by the cluster CA and its role alone (default).
    #[default]
    Any,
    /// The certificate must also be valid for this DNS name (`--parent-name`).
    Pinned(String),
}

impl ParentName {
    /// The pinned name, if any.
    pub fn pinned(&self) -> Option<&str> {
        match self {
            ParentName::Any => None,
            ParentName::Pinned(n) => Some(n),
        }
    }
}

impl fmt::Display for ParentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParentName::Any => f.write_str("any name"),
            ParentName::Pinned(n) => f.write_str(n),
        }
    }
}

impl From<&str> for ParentName {
    fn from(name: &str) -> Self {
        ParentName::Pinned(name.to_string())
    }
}

impl From<String> for ParentName {
    fn from(name: String) -> Self {
        ParentName::Pinned(name)
    }
}

impl From<&String> for ParentName {
    fn from(name: &String) -> Self {
        ParentName::Pinned(name.clone())
    }
}

impl From<Option<String>> for ParentName {
    fn from(name: Option<String>) -> Self {
        name.map_or(ParentName::Any, ParentName::Pinned)
    }
}

impl From<&ParentName> for ParentName {
    fn from(name: &ParentName) -> Self {
        name.clone()
    }
}

/// Where a refused parent's explanation is left for the caller.
pub(crate) type Diagnosis = Arc<Mutex<Option<Error>>>;

/// Verifies a parent's certificate: the CA chain and validity always, the name when
/// pinned, the role when roles are expected. See the module docs.
#[derive(Debug)]
pub(crate) struct ParentVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    /// Check the server name rustls passes in (the pin).
    check_name: bool,
    /// Accepted roles (empty = any).
    roles: Vec<Role>,
    /// The parent's address, for messages.
    addr: Option<SocketAddr>,
    diagnosis: Diagnosis,
}

impl ParentVerifier {
    pub(crate) fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        check_name: bool,
        roles: Vec<Role>,
        addr: Option<SocketAddr>,
    ) -> crate::Result<Self> {
        let webpki = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| Error::Tls(format!("server verifier: {e}")))?;
        Ok(ParentVerifier {
            webpki,
            roots,
            provider,
            check_name,
            roles,
            addr,
            diagnosis: Arc::default(),
        })
    }

    /// The slot where a refusal's explanation is left.
    pub(crate) fn diagnosis(&self) -> Diagnosis {
        self.diagnosis.clone()
    }

    fn parent(&self) -> String {
        match self.addr {
            Some(a) => format!("parent {a}"),
            None => "the parent".into(),
        }
    }

    fn refuse(&self, why: Error, err: rustls::Error) -> rustls::Error {
        *self.diagnosis.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        err
    }

    fn check_role(&self, end_entity: &CertificateDer<'_>) -> Result<(), Error> {
        if self.roles.is_empty() {
            return Ok(());
        }
        let wanted = roles_phrase(&self.roles);
        let fix = format!(
            "issue one with `flow-node certs issue --role {}`",
            self.roles[0]
        );
        match certs::role_of(end_entity) {
            Ok(role) if self.roles.contains(&role) => Ok(()),
            Ok(role) => Err(Error::Role(format!(
                "{} presented {} {role} certificate ({ROLE_URI_PREFIX}{role}) — {wanted} certificate is required; {fix}",
                self.parent(),
                article(role)
            ))),
            Err(e) => Err(Error::Role(format!(
                "{} presented a certificate without a usable role ({e}) — {wanted} certificate is required; {fix}",
                self.parent()
            ))),
        }
    }
}

/// "an edge or cloud".
fn roles_phrase(roles: &[Role]) -> String {
    let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    match roles.first() {
        Some(first) => format!("{} {}", article(*first), names.join(" or ")),
        None => "any".into(),
    }
}

fn article(role: Role) -> &'static str {
    match role {
        Role::Edge => "an",
        Role::Device | Role::Cloud => "a",
    }
}

/// A date for messages, e.g. `2024-01-01 UTC`.
fn date(secs: i64) -> String {
    match x509_parser::time::ASN1Time::from_timestamp(secs) {
        Ok(t) => format!("{} UTC", t.to_datetime().date()),
        Err(_) => format!("UNIX time {secs}"),
    }
}

/// The certificate's names and validity, for messages (empty when it does not parse).
struct Described {
    names: Vec<String>,
    not_before: Option<i64>,
    not_after: Option<i64>,
}

fn describe(cert: &CertificateDer<'_>) -> Described {
    let mut d = Described {
        names: Vec::new(),
        not_before: None,
        not_after: None,
    };
    if let Ok((_, x509)) = x509_parser::parse_x509_certificate(cert.as_ref()) {
        d.not_before = Some(x509.validity().not_before.timestamp());
        d.not_after = Some(x509.validity().not_after.timestamp());
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for n in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(dns) = n {
                    d.names.push((*dns).to_string());
                }
            }
        }
    }
    d
}

/// What to tell the user for a failed chain, validity or name check.
fn explain(
    err: &rustls::Error,
    parent: &str,
    cert: &CertificateDer<'_>,
    pin: &ServerName<'_>,
) -> Error {
    let d = describe(cert);
    let named = if d.names.is_empty() {
        String::new()
    } else {
        format!(" ({})", d.names.join(", "))
    };
    let reissue = "reissue it with `flow-node certs issue` (nodes pick up new certificate files without a restart)";
    let msg = match err {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "certificate of {parent}{named} is not signed by this cluster's CA (unknown issuer) — was it issued with another `--ca` dir? Issue the parent's certificate from the CA whose ca.pem this node is given with --ca"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => {
            let when = d.not_after.map_or_else(|| "an earlier date".into(), date);
            format!("certificate of {parent}{named} expired on {when} — {reissue}")
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => {
            let when = d.not_before.map_or_else(|| "a later date".into(), date);
            format!(
                "certificate of {parent}{named} is not valid before {when} — check the clocks of both machines, or {reissue}"
            )
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => {
            let pin = pin.to_str();
            let has = if d.names.is_empty() {
                "no DNS name".to_string()
            } else {
                d.names.join(", ")
            };
            format!(
                "certificate of {parent} is for {has}, not {pin:?} (--parent-name) — pass the name in its certificate, or leave --parent-name out to accept any name signed by the cluster CA with the expected role"
            )
        }
        rustls::Error::InvalidCertificate(
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. },
        ) => format!(
            "certificate of {parent}{named} does not allow TLS server use ({err}) — {reissue}"
        ),
        other => format!("certificate of {parent}{named} was refused: {other}"),
    };
    Error::Tls(msg)
}

impl ServerCertVerifier for ParentVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let checked = if self.check_name {
            self.webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            )
        } else {
            ParsedCertificate::try_from(end_entity)
                .and_then(|cert| {
                    verify_server_cert_signed_by_trust_anchor(
                        &cert,
                        &self.roots,
                        intermediates,
                        now,
                        self.provider.signature_verification_algorithms.all,
                    )
                })
                .map(|()| ServerCertVerified::assertion())
        };
        if let Err(e) = checked {
            let why = explain(&e, &self.parent(), end_entity, server_name);
            return Err(self.refuse(why, e));
        }
        if let Err(why) = self.check_role(end_entity) {
            return Err(self.refuse(
                why,
                rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure),
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_phrases_read_naturally() {
        assert_eq!(roles_phrase(&[Role::Edge, Role::Cloud]), "an edge or cloud");
        assert_eq!(roles_phrase(&[Role::Cloud]), "a cloud");
        assert_eq!(date(0), "1970-01-01 UTC");
        assert_eq!(ParentName::from(None), ParentName::Any);
        assert_eq!(
            ParentName::from("edge-1").pinned(),
            Some("edge-1"),
            "a &str pins"
        );
    }
}
