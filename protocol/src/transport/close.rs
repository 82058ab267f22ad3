//! What a QUIC connection's end means to a node: a refusal (ours: `CLOSE_REFUSED`), a normal
//! close (the peer shut down), a peer that gave up during the handshake, a TLS alert (where
//! the certificate hint belongs), an idle timeout. Read and write errors carry the same.

use quinn::VarInt;

use super::CLOSE_REFUSED;
use crate::error::Error;
use crate::message::ErrorCode;

pub(super) fn conn_err(e: quinn::ConnectionError) -> Error {
    match e {
        // our own refusals (a role, a name, a version) close with CLOSE_REFUSED
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(CLOSE_REFUSED) =>
        {
            Error::Refused {
                code: ErrorCode::Unauthorized,
                message: format!(
                    "peer refused the connection: {}",
                    String::from_utf8_lossy(&c.reason)
                ),
            }
        }
        // a normal close: the peer shut down (or dropped this connection)
        quinn::ConnectionError::ApplicationClosed(c) => Error::Closed(format!(
            "the peer closed the connection: {}",
            String::from_utf8_lossy(&c.reason)
        )),
        // the peer's application closed while the handshake ran: it gave up (a dial
        // timeout) or shut down — not a certificate problem
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::APPLICATION_ERROR =>
        {
            Error::Closed("the peer closed the connection during the handshake (it gave up or shut down)".into())
        }
        quinn::ConnectionError::ConnectionClosed(c) if is_tls_alert(c.error_code) => Error::Tls(format!(
            "peer closed the connection ({}): {} — check that both nodes use certificates from the same cluster CA",
            c.error_code,
            String::from_utf8_lossy(&c.reason)
        )),
        quinn::ConnectionError::ConnectionClosed(c) => Error::Quic(format!(
            "peer closed the connection ({}): {}",
            c.error_code,
            String::from_utf8_lossy(&c.reason)
        )),
        quinn::ConnectionError::TransportError(t) => Error::Tls(format!("handshake failed: {t}")),
        quinn::ConnectionError::TimedOut => Error::Timeout("QUIC connection idle timeout"),
        other => Error::Quic(other.to_string()),
    }
}

/// A TLS alert carried as a QUIC transport error (`CRYPTO_ERROR`, 0x100–0x1ff, RFC 9000
/// §20.1): a certificate the peer did not accept, among others.
fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

pub(super) fn read_err(e: quinn::ReadError) -> Error {
    match e {
        quinn::ReadError::ConnectionLost(c) => conn_err(c),
        other => Error::Quic(format!("read: {other}")),
    }
}

pub(super) fn write_err(e: quinn::WriteError) -> Error {
    match e {
        quinn::WriteError::ConnectionLost(c) => conn_err(c),
        other => Error::Quic(format!("write: {other}")),
    }
}
