//! The cache on disk: its root, entry paths, listing, and the atomic install of an entry.
//!
//! Layout: `<root>/<name>/model.gguf` and `<root>/<name>/manifest.json`. An entry is built
//! in `<root>/.tmp-<name>-<host>-<pid>-<nonce>/` and renamed into place only once verified,
//! so a failure at any step leaves no half-written entry. Host and nonce keep pulls apart
//! when several containers (each its own pid 1) share one cache volume.

use std::path::{Path, PathBuf};

use super::error::{Result, StoreError};
use super::manifest::Manifest;

/// File name of an entry's model.
pub const MODEL_FILE: &str = "model.gguf";

/// Prefix of the directories entries are built in.
const TMP_PREFIX: &str = ".tmp-";

/// The local model cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    root: PathBuf,
}

/// One cache entry, as [`Store::list`] finds it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The entry's name.
    pub name: String,
    /// `<root>/<name>/model.gguf`.
    pub model: PathBuf,
    /// Size of the model file.
    pub bytes: u64,
    /// The manifest, if it is present and readable.
    pub manifest: Option<Manifest>,
}

/// Check that `name` can be a cache entry: ASCII letters, digits, `-`, `_`, `.`, not
/// starting with `.`, at most 128 characters.
pub fn check_name(name: &str) -> Result<()> {
    let bad = |why| {
        Err(StoreError::BadName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 128 {
        return bad("longer than 128 characters");
    }
    if name.starts_with('.') {
        return bad("starts with `.`");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return bad("has characters other than letters, digits, `-`, `_` and `.`");
    }
    Ok(())
}

impl Store {
    /// The cache at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    /// The cache at `$AIFLOW_HOME`, else `$HOME/.cache/aiflow/models`.
    /// (One rule with family overlays, which find their base there:
    /// [`flow_familial::family::default_model_cache`].)
    pub fn from_env() -> Result<Store> {
        flow_familial::family::default_model_cache()
            .map(Store::at)
            .ok_or(StoreError::NoHome)
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<name>`.
    pub fn entry_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// `<root>/<name>/model.gguf`.
    pub fn model_path(&self, name: &str) -> PathBuf {
        self.entry_dir(name).join(MODEL_FILE)
    }

    /// The model file of entry `name`, if the cache holds one.
    pub fn lookup(&self, name: &str) -> Option<PathBuf> {
        check_name(name).ok()?;
        let p = self.model_path(name);
        p.is_file().then_some(p)
    }

    /// Every entry with a model file, sorted by name. A missing root is an empty cache.
    pub fn list(&self) -> Result<Vec<Entry>> {
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io("reading", &self.root, e)),
        };
        let mut out = Vec::new();
        for de in rd {
            let de = de.map_err(|e| StoreError::io("reading", &self.root, e))?;
            let Some(name) = de.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if check_name(&name).is_err() {
                continue;
            }
            let model = self.model_path(&name);
            let Ok(meta) = std::fs::metadata(&model) else {
                continue;
            };
            out.push(Entry {
                manifest: Manifest::read(&self.entry_dir(&name)).ok(),
                name,
                model,
                bytes: meta.len(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Names of the cached entries.
    pub fn names(&self) -> Vec<String> {
        self.list()
            .map(|v| v.into_iter().map(|e| e.name).collect())
            .unwrap_or_default()
    }

    /// Remove `.tmp-*` directories left by pulls that died; returns how many. A directory
    /// of this host is stale when its process is gone (Linux: no `/proc/<pid>`); one of
    /// another host sharing the volume (or of this very pid: a restarted container) only
    /// when untouched for [`STALE_FOREIGN`], since its owner cannot be asked.
    pub fn clean_stale_tmp(&self) -> Result<usize> {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return Ok(0);
        };
        let (host, me) = (host_tag(), std::process::id());
        let mut removed = 0;
        for de in rd.flatten() {
            let name = de.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(TMP_PREFIX) else {
                continue;
            };
            let (owner_host, pid) = tmp_owner(rest);
            let ours = owner_host.as_deref().is_none_or(|h| h == host);
            let stale = match pid {
                Some(p) if ours && p != me => !Path::new(&format!("/proc/{p}")).exists(),
                _ => de
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= STALE_FOREIGN),
            };
            if stale {
                std::fs::remove_dir_all(de.path())
                    .map_err(|e| StoreError::io("removing the stale", de.path(), e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Build entry `name` atomically: `fill` writes the model file into a fresh temporary
    /// directory and returns its manifest; the manifest is written there, and only then the
    /// directory is renamed to `<root>/<name>`, replacing an existing entry. If `fill` (or
    /// anything after it) fails, the temporary directory is removed and the cache is as it
    /// was. `fill` returning `None` installs nothing (and so does this, returning `None`).
    pub fn install<F>(&self, name: &str, fill: F) -> Result<Option<Manifest>>
    where
        F: FnOnce(&Path) -> Result<Option<Manifest>>,
    {
        check_name(name)?;
        std::fs::create_dir_all(&self.root)
            .map_err(|e| StoreError::io("creating", &self.root, e))?;
        self.clean_stale_tmp()?;
        let tag = format!(
            "{}-{}-{:08x}",
            host_tag(),
            std::process::id(),
            rand::random::<u32>()
        );
        let tmp = TmpDir(self.root.join(format!("{TMP_PREFIX}{name}-{tag}")));
        if tmp.0.exists() {
            std::fs::remove_dir_all(&tmp.0).map_err(|e| StoreError::io("removing", &tmp.0, e))?;
        }
        std::fs::create_dir(&tmp.0).map_err(|e| StoreError::io("creating", &tmp.0, e))?;
        let Some(manifest) = fill(&tmp.0)? else {
            return Ok(None);
        };
        manifest.write(&tmp.0)?;
        let dest = self.entry_dir(name);
        if dest.exists() {
            // A directory cannot be renamed over a non-empty one: move the old entry aside,
            // put the new one in place, then delete the old one.
            let old = TmpDir(self.root.join(format!("{TMP_PREFIX}{name}-{tag}-old")));
            std::fs::rename(&dest, &old.0)
                .map_err(|e| StoreError::io("moving aside the old entry", &dest, e))?;
            if let Err(e) = std::fs::rename(&tmp.0, &dest) {
                let _ = std::fs::rename(&old.0, &dest);
                return Err(StoreError::io("renaming into", &dest, e));
            }
        } else {
            std::fs::rename(&tmp.0, &dest)
                .map_err(|e| StoreError::io("renaming into", &dest, e))?;
        }
        Ok(Some(manifest))
    }
}

/// How long another host's build directory must sit untouched before it counts as stale.
pub const STALE_FOREIGN: std::time::Duration = std::time::Duration::from_secs(3600);

/// This host's name as it appears in build directory names (alphanumerics only).
fn host_tag() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let tag: String = raw
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(32)
        .collect();
    if tag.is_empty() {
        "host".into()
    } else {
        tag
    }
}

/// Owner of a build directory (`rest` = its name after the prefix): `(host, pid)` from
/// `<name>-<host>-<pid>-<nonce>[-old]`; the old `<name>-<pid>` form has no host (this one).
fn tmp_owner(rest: &str) -> (Option<String>, Option<u32>) {
    let rest = rest.strip_suffix("-old").unwrap_or(rest);
    let parts: Vec<&str> = rest.rsplitn(4, '-').collect();
    if let [nonce, pid, host, _name] = parts[..] {
        if nonce.len() == 8 && nonce.chars().all(|c| c.is_ascii_hexdigit()) {
            if let Ok(pid) = pid.parse() {
                return (Some(host.to_string()), Some(pid));
            }
        }
    }
    (None, rest.rsplit('-').next().and_then(|p| p.parse().ok()))
}

/// A directory removed when dropped (if it still exists).
struct TmpDir(PathBuf);

impl Drop for TmpDir {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
