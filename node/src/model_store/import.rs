//! `model pull --file PATH [--name NAME]`: import a local GGUF file into the cache.

use std::path::Path;
use std::time::SystemTime;

use super::cache::{check_name, Store, MODEL_FILE};
use super::error::{Result, StoreError};
use super::hash::{byte_bar, check_gguf_header, sha256_file, HashingWriter};
use super::manifest::{rfc3339_utc, Manifest, ManifestSource};
use super::pull::{PullOutcome, PullReport};
use super::registry::known;

/// Options of [`import_file`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The entry name; default: the file stem, lowercased.
    pub name: Option<String>,
    /// Replace an entry holding a different file.
    pub force: bool,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// The default entry name of `path`: its file stem, lowercased.
pub fn default_name(path: &Path) -> Result<String> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_lowercase();
    check_name(&stem)?;
    Ok(stem)
}

/// Import the GGUF file at `path`: check its header, then hard-link it (same file system)
/// or copy it into a new entry, with its SHA-256 computed. A name of the registry accepts
/// only the registry's file. An entry with the same hash is left as it is; one with another
/// hash is replaced only with `force`.
pub fn import_file(store: &Store, path: &Path, opts: &ImportOptions) -> Result<PullReport> {
    check_gguf_header(path)?;
    let name = match &opts.name {
        Some(n) => {
            check_name(n)?;
            n.clone()
        }
        None => default_name(path)?,
    };
    let src = std::fs::canonicalize(path).map_err(|e| StoreError::io("resolving", path, e))?;
    let size = std::fs::metadata(&src)
        .map_err(|e| StoreError::io("reading", &src, e))?
        .len();
    let mut outcome = PullOutcome::Pulled;
    let installed = store.install(&name, |tmp| {
        let dest = tmp.join(MODEL_FILE);
        let bar = byte_bar(opts.progress, size, "import+sha256");
        let (bytes, sha) = match std::fs::hard_link(&src, &dest) {
            Ok(()) => sha256_file(&dest, &bar)?,
            Err(_) => copy_hashing(&src, &dest, &bar)?,
        };
        bar.finish_and_clear();
        if let Some(km) = known(&name) {
            if sha != km.sha256 {
                return Err(StoreError::NotRegistryFile {
                    name: name.clone(),
                    path: src.clone(),
                    expected: km.sha256.into(),
                    got: sha,
                });
            }
        }
        if let Some(existing) = existing_sha(store, &name)? {
            if existing == sha {
                outcome = PullOutcome::AlreadyPresent;
                return Ok(None);
            }
            if !opts.force {
                return Err(StoreError::Exists {
                    name: name.clone(),
                    existing,
                });
            }
        }
        Ok(Some(Manifest {
            name: name.clone(),
            file: MODEL_FILE.into(),
            bytes,
            sha256: sha,
            source: ManifestSource::File {
                path: src.display().to_string(),
            },
            pulled_at: rfc3339_utc(SystemTime::now()),
        }))
    })?;
    let manifest = match installed {
        Some(m) => m,
        None => Manifest::read(&store.entry_dir(&name))?,
    };
    Ok(PullReport {
        outcome,
        model: store.model_path(&name),
        manifest,
    })
}

/// SHA-256 of the entry `name` in the cache (from its manifest, else by hashing), if any.
fn existing_sha(store: &Store, name: &str) -> Result<Option<String>> {
    let Some(model) = store.lookup(name) else {
        return Ok(None);
    };
    if let Ok(m) = Manifest::read(&store.entry_dir(name)) {
        return Ok(Some(m.sha256));
    }
    let (_, sha) = sha256_file(&model, &indicatif::ProgressBar::hidden())?;
    Ok(Some(sha))
}

/// Copy `src` to `dest`, hashing on the way.
fn copy_hashing(src: &Path, dest: &Path, bar: &indicatif::ProgressBar) -> Result<(u64, String)> {
    let mut from = std::fs::File::open(src).map_err(|e| StoreError::io("opening", src, e))?;
    let to = std::fs::File::create(dest).map_err(|e| StoreError::io("creating", dest, e))?;
    let mut w = HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, to), bar.clone());
    std::io::copy(&mut from, &mut w).map_err(|e| StoreError::io("copying into", dest, e))?;
    let (bw, n, sha) = w.finish().map_err(|e| StoreError::io("writing", dest, e))?;
    bw.get_ref()
        .sync_all()
        .map_err(|e| StoreError::io("syncing", dest, e))?;
    Ok((n, sha))
}
