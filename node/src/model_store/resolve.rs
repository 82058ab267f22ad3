//! Resolving a `--model` argument: an HF checkpoint directory, a GGUF file, or a cache name.

use std::path::{Path, PathBuf};

use super::cache::{check_name, Store};
use super::error::{Result, StoreError};
use super::hash::has_gguf_magic;
use super::registry::{known, known_names};

/// Where a model's weights are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    /// An HF-layout checkpoint directory (`config.json`, safetensors, `tokenizer.json`).
    HfDir(PathBuf),
    /// A GGUF file (given as a path, or a cache entry's `model.gguf`).
    Gguf(PathBuf),
}

impl ModelLocation {
    /// The directory or file.
    pub fn path(&self) -> &Path {
        match self {
            ModelLocation::HfDir(p) | ModelLocation::Gguf(p) => p,
        }
    }
}

/// Resolve `arg` against the cache at `$AIFLOW_HOME` (else `~/.cache/aiflow/models`); see
/// [`resolve_in`]. Paths resolve without a cache location.
pub fn resolve_model(arg: &str) -> Result<ModelLocation> {
    if let Some(loc) = resolve_path(Path::new(arg))? {
        return Ok(loc);
    }
    resolve_in(&Store::from_env()?, arg)
}

/// Resolve `arg`, in this order:
/// - an existing directory → [`ModelLocation::HfDir`];
/// - an existing file named `*.gguf` or starting with the GGUF magic →
///   [`ModelLocation::Gguf`] (another existing file is an error);
/// - the name of a cache entry → [`ModelLocation::Gguf`] of `<root>/<name>/model.gguf`;
/// - a known name not pulled yet → [`StoreError::NotPulled`] (run `flow-node model pull`);
/// - anything else → [`StoreError::NotFound`], listing cached and known names.
pub fn resolve_in(store: &Store, arg: &str) -> Result<ModelLocation> {
    if let Some(loc) = resolve_path(Path::new(arg))? {
        return Ok(loc);
    }
    if let Some(p) = store.lookup(arg) {
        return Ok(ModelLocation::Gguf(p));
    }
    if check_name(arg).is_ok() && known(arg).is_some() {
        return Err(StoreError::NotPulled {
            name: arg.into(),
            root: store.root().into(),
        });
    }
    Err(StoreError::NotFound {
        arg: arg.into(),
        cached: store.names(),
        known: known_names(),
    })
}

fn resolve_path(p: &Path) -> Result<Option<ModelLocation>> {
    if p.is_dir() {
        return Ok(Some(ModelLocation::HfDir(p.into())));
    }
    if !p.is_file() {
        return Ok(None);
    }
    let gguf_ext = p
        .extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("gguf"));
    if gguf_ext || has_gguf_magic(p) {
        return Ok(Some(ModelLocation::Gguf(p.into())));
    }
    Err(StoreError::NotGguf {
        path: p.into(),
        detail: "a file without the .gguf extension or the GGUF magic; pass a checkpoint \
                 directory, a GGUF file or a model name"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_store::cache::MODEL_FILE;

    fn setup() -> std::io::Result<(tempfile::TempDir, Store)> {
        let dir = tempfile::tempdir()?;
        let store = Store::at(dir.path().join("cache"));
        let entry = store.entry_dir("mine");
        std::fs::create_dir_all(&entry)?;
        std::fs::write(entry.join(MODEL_FILE), b"GGUF\x03\0\0\0")?;
        Ok((dir, store))
    }

    #[test]
    fn resolve_rules() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let (dir, store) = setup()?;
        let s = |p: &Path| p.display().to_string();
        // A directory.
        let hf = dir.path().join("hf");
        std::fs::create_dir(&hf)?;
        assert_eq!(resolve_in(&store, &s(&hf))?, ModelLocation::HfDir(hf));
        // A GGUF path, by extension or by magic.
        let g = dir.path().join("X.GGUF");
        std::fs::write(&g, b"anything")?;
        assert_eq!(resolve_in(&store, &s(&g))?, ModelLocation::Gguf(g));
        let m = dir.path().join("weights.bin");
        std::fs::write(&m, b"GGUF\x02\0\0\0")?;
        assert_eq!(resolve_in(&store, &s(&m))?, ModelLocation::Gguf(m));
        // Another file.
        let t = dir.path().join("notes.txt");
        std::fs::write(&t, b"hello")?;
        assert!(matches!(
            resolve_in(&store, &s(&t)),
            Err(StoreError::NotGguf { .. })
        ));
        // A cached name.
        assert_eq!(
            resolve_in(&store, "mine")?,
            ModelLocation::Gguf(store.model_path("mine"))
        );
        // Known but not pulled.
        let e = resolve_in(&store, "smollm2-135m-instruct")
            .map(|_| ())
            .err();
        assert!(matches!(e, Some(StoreError::NotPulled { .. })), "{e:?}");
        let msg = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("flow-node model pull smollm2-135m-instruct"),
            "{msg}"
        );
        // Unknown: lists the cached and known names.
        for arg in ["nope", "../escape", "", "dir/missing.gguf"] {
            let e = resolve_in(&store, arg).map(|_| ()).err();
            assert!(
                matches!(e, Some(StoreError::NotFound { .. })),
                "{arg}: {e:?}"
            );
            let msg = e.map(|e| e.to_string()).unwrap_or_default();
            assert!(
                msg.contains("mine") && msg.contains("smollm2-135m-instruct"),
                "{msg}"
            );
        }
        Ok(())
    }
}
