//! Version and model negotiation for [`Hello`] (sans-IO).
//!
//! Both ends send a `Hello` first on the control stream and call [`negotiate`] on the
//! peer's. A refusal becomes an `Error` frame with the returned code and message, then the
//! connection closes.

use crate::error::{Error, Result};
use crate::message::{ErrorCode, Hello, Role};

/// The protocol version both sides will use, or a refusal saying which check failed.
///
/// Checks, in order: protocol version ranges overlap; the model family digest is equal;
/// the peer's role is in `accept_roles` (skip with an empty slice).
pub fn negotiate(local: &Hello, remote: &Hello, accept_roles: &[Role]) -> Result<u16> {
    let lo = local.min_protocol_version.max(remote.min_protocol_version);
    let hi = local.protocol_version.min(remote.protocol_version);
    if lo > hi {
        return Err(Error::Refused {
            code: ErrorCode::VersionMismatch,
            message: format!(
                "protocol version mismatch: {} speaks {}..={}, {} speaks {}..={}; upgrade the older node",
                local.node_id,
                local.min_protocol_version,
                local.protocol_version,
                remote.node_id,
                remote.min_protocol_version,
                remote.protocol_version
            ),
        });
    }
    if local.model.digest != remote.model.digest {
        return Err(Error::Refused {
            code: ErrorCode::ModelMismatch,
            message: format!(
                "model fingerprint mismatch: {} serves {} ({}), {} serves {} ({}); both tiers must load the same family checkpoint",
                local.node_id,
                local.model.family,
                short_hex(&local.model.digest),
                remote.node_id,
                remote.model.family,
                short_hex(&remote.model.digest)
            ),
        });
    }
    if !accept_roles.is_empty() && !accept_roles.contains(&remote.role) {
        return Err(Error::Refused {
            code: ErrorCode::RoleMismatch,
            message: format!(
                "role mismatch: {} ({}) accepts {:?}, but {} says it is {}",
                local.node_id, local.role, accept_roles, remote.node_id, remote.role
            ),
        });
    }
    Ok(hi)
}

/// First 8 bytes of a digest in hex.
pub fn short_hex(d: &[u8]) -> String {
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Capacity, ModelFingerprint, PROTOCOL_VERSION};

    fn hello(id: &str, role: Role, v: (u16, u16), digest: u8) -> Hello {
        Hello {
            node_id: id.into(),
            role,
            protocol_version: v.1,
            min_protocol_version: v.0,
            model: ModelFingerprint {
                family: "fam".into(),
                digest: [digest; 32],
            },
            hosted: vec![],
            capacity: Capacity::default(),
        }
    }

    #[test]
    fn compatible() {
        let a = hello("a", Role::Edge, (1, PROTOCOL_VERSION), 1);
        let b = hello("b", Role::Device, (1, PROTOCOL_VERSION), 1);
        assert_eq!(
            negotiate(&a, &b, &[Role::Device]).unwrap(),
            PROTOCOL_VERSION
        );
    }

    #[test]
    fn version_mismatch_names_versions() {
        let a = hello("a", Role::Edge, (1, 1), 1);
        let b = hello("b", Role::Device, (2, 3), 1);
        let e = negotiate(&a, &b, &[]).unwrap_err();
        assert!(matches!(
            e,
            Error::Refused {
                code: ErrorCode::VersionMismatch,
                ..
            }
        ));
        assert!(e.to_string().contains("protocol version mismatch"), "{e}");
    }

    #[test]
    fn a_protocol_3_peer_is_refused_naming_both_versions() {
        use crate::message::MIN_PROTOCOL_VERSION;
        let new = hello(
            "edge-4",
            Role::Edge,
            (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            1,
        );
        let old = hello("device-3", Role::Device, (2, 3), 1);
        for (a, b) in [(&new, &old), (&old, &new)] {
            let e = negotiate(a, b, &[]).unwrap_err();
            assert_eq!(e.code(), ErrorCode::VersionMismatch);
            let msg = e.to_string();
            assert!(msg.contains("edge-4 speaks 4..=4"), "{msg}");
            assert!(msg.contains("device-3 speaks 2..=3"), "{msg}");
            assert!(msg.contains("upgrade the older node"), "{msg}");
        }
    }

    #[test]
    fn model_mismatch() {
        let e = negotiate(
            &hello("a", Role::Edge, (1, 1), 1),
            &hello("b", Role::Device, (1, 1), 2),
            &[],
        )
        .unwrap_err();
        assert!(matches!(
            e,
            Error::Refused {
                code: ErrorCode::ModelMismatch,
                ..
            }
        ));
        assert!(e.to_string().contains("model fingerprint mismatch"), "{e}");
    }

    #[test]
    fn role_mismatch() {
        let e = negotiate(
            &hello("a", Role::Cloud, (1, 1), 1),
            &hello("b", Role::Device, (1, 1), 1),
            &[Role::Edge],
        )
        .unwrap_err();
        assert!(matches!(
            e,
            Error::Refused {
                code: ErrorCode::RoleMismatch,
                ..
            }
        ));
    }
}
