//! `family.json`: what an overlay is and which base it belongs to.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The manifest's file name inside an overlay directory.
pub const MANIFEST_FILE: &str = "family.json";
/// The format tag this crate writes and reads.
pub const OVERLAY_FORMAT: &str = "aiflow-family-overlay/1";

/// The base checkpoint an overlay extends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRef {
    /// Cache name (`flow-node model pull NAME`), used to find the base.
    pub name: String,
    /// SHA-256 of the base file (hex), verified on open.
    pub sha256: String,
    /// Size of the base file in bytes.
    pub bytes: u64,
    /// Optional path of the base, relative to the overlay directory (tests, vendored bases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// `family.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FamilyManifest {
    /// [`OVERLAY_FORMAT`].
    pub format: String,
    pub base: BaseRef,
    /// Exit points, ascending; the last is the base's last layer (the full model).
    pub exit_points: Vec<usize>,
    /// Provenance: command, seeds, data, wall time, evaluation (free-form).
    #[serde(default)]
    pub trained: serde_json::Value,
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl FamilyManifest {
    /// Read and check `dir/family.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let m: Self = serde_json::from_str(&text).map_err(|e| bad(&path, format!("{e}")))?;
        if m.format != OVERLAY_FORMAT {
            return Err(bad(
                &path,
                format!(
                    "format `{}` is not supported (this build reads `{OVERLAY_FORMAT}`)",
                    m.format
                ),
            ));
        }
        if m.exit_points.len() < 2 || m.exit_points.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad(
                &path,
                format!(
                    "exit_points {:?} must be at least two strictly increasing layers",
                    m.exit_points
                ),
            ));
        }
        let hex_ok =
            m.base.sha256.len() == 64 && m.base.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_ok {
            return Err(bad(&path, "base.sha256 must be 64 hex digits"));
        }
        Ok(m)
    }

    /// Write `dir/family.json` (pretty, atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Invalid(format!("family manifest: {e}")))?;
        std::fs::write(&tmp, text + "\n").map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }
}
