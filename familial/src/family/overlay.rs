//! [`Family`]: an overlay directory opened together with its verified base.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};

use super::manifest::{BaseRef, FamilyManifest, MANIFEST_FILE};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{FamilialModel, Part};
use crate::source::ModelSource;
use crate::weights::{checkpoint_files, save_safetensors, Checkpoint, Stacked, TensorSource};

/// The model cache `flow-node model pull` fills: `$AIFLOW_HOME`, else
/// `$HOME/.cache/aiflow/models`; `None` when neither is set.
pub fn default_model_cache() -> Option<PathBuf> {
    let var = |k| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(home) = var("AIFLOW_HOME") {
        return Some(PathBuf::from(home));
    }
    var("HOME").map(|h| PathBuf::from(h).join(".cache/aiflow/models"))
}

/// Whether `path` is an overlay directory (holds `family.json`).
pub fn is_family_dir(path: &Path) -> bool {
    path.is_dir() && path.join(MANIFEST_FILE).is_file()
}

/// Names of the tensors an overlay for `cfg` holds: every own exit block and norm.
pub fn exit_tensor_names(cfg: &ModelConfig) -> Result<Vec<String>> {
    let own: Vec<usize> = cfg.exits[..cfg.exits.len() - 1]
        .iter()
        .map(|e| e.point)
        .collect();
    let part = Part {
        embed: false,
        trunk: 0..0,
        exits: own,
    };
    Ok(FamilialModel::tensor_names(cfg, &part)?
        .into_iter()
        .filter(|n| n.starts_with("model.eelayers.") || n.starts_with("model.norms."))
        .collect())
}

/// The exit tensors of a family trained with exits `points` (the last = the deepest, which
/// has no own tensors) restricted to the exits `keep` (a subset, ascending), renumbered as
/// a family with exits `keep` + the deepest names them: what an overlay keeps when only
/// some trained exits are deployed (each exit evaluated costs its block and a head pass).
pub fn select_exits(
    tensors: &HashMap<String, Tensor>,
    points: &[usize],
    keep: &[usize],
) -> Result<HashMap<String, Tensor>> {
    let own = &points[..points.len().saturating_sub(1)];
    let mut out = HashMap::new();
    for (j, k) in keep.iter().enumerate() {
        let i = own.iter().position(|p| p == k).ok_or_else(|| {
            Error::Invalid(format!("exit {k} is not one of the trained exits {own:?}"))
        })?;
        if j > 0 && keep[j - 1] >= *k {
            return Err(Error::Invalid(format!(
                "exits to keep must be ascending (got {keep:?})"
            )));
        }
        for prefix in ["model.eelayers", "model.norms"] {
            let from = format!("{prefix}.{i}.");
            for (name, t) in tensors {
                if let Some(rest) = name.strip_prefix(&from) {
                    out.insert(format!("{prefix}.{j}.{rest}"), t.clone());
                }
            }
        }
    }
    Ok(out)
}

/// SHA-256 (hex) and size of a base: the GGUF file, or the safetensors files of an HF
/// directory read in order.
pub fn base_digest(path: &Path) -> Result<(String, u64)> {
    let files = if path.is_dir() {
        checkpoint_files(path)?
    } else {
        vec![path.to_path_buf()]
    };
    let mut h = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file = std::fs::File::open(&f).map_err(|e| Error::io(&f, e))?;
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::io(&f, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n as u64;
        }
    }
    Ok((hex::encode(h.finalize()), total))
}

fn base_size(path: &Path) -> Result<u64> {
    let files = if path.is_dir() {
        checkpoint_files(path)?
    } else {
        vec![path.to_path_buf()]
    };
    files.iter().try_fold(0u64, |acc, f| {
        Ok(acc + std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len())
    })
}

/// An opened family: overlay tensors first, then the base.
#[derive(Debug)]
pub struct Family {
    dir: PathBuf,
    manifest: FamilyManifest,
    base: ModelSource,
    overlay: Checkpoint,
    cfg: ModelConfig,
}

impl Family {
    /// Open the overlay in `dir` and find its base: `base.path` of the manifest (relative
    /// to `dir`), else `<model cache>/<base.name>/model.gguf`.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = FamilyManifest::read(dir)?;
        let mut tried = Vec::new();
        if let Some(p) = &manifest.base.path {
            tried.push(dir.join(p));
        }
        if let Some(root) = default_model_cache() {
            tried.push(root.join(&manifest.base.name).join("model.gguf"));
        }
        match tried.iter().find(|p| p.exists()) {
            Some(p) => Self::open_with_base(dir, p),
            None => Err(Error::Config {
                path: dir.join(MANIFEST_FILE),
                msg: format!(
                    "the base `{}` (sha256 {}) of this family is not available (looked at {}); \
                     run `flow-node model pull {}`",
                    manifest.base.name,
                    manifest.base.sha256,
                    tried
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    manifest.base.name
                ),
            }),
        }
    }

    /// Open the overlay in `dir` over the base at `base` (verified by size and sha256).
    pub fn open_with_base(dir: &Path, base: &Path) -> Result<Self> {
        let manifest = FamilyManifest::read(dir)?;
        check_base(dir, &manifest.base, base)?;
        let base_src = ModelSource::open(base)?;
        if matches!(base_src, ModelSource::Family(_)) {
            return Err(Error::Invalid(format!(
                "{}: a family's base must be a plain model, not another overlay",
                base.display()
            )));
        }
        let mut cfg = base_src.config()?;
        cfg.attach_exits(&manifest.exit_points)
            .map_err(|e| Error::Config {
                path: dir.join(MANIFEST_FILE),
                msg: format!("exit_points do not fit the base: {e}"),
            })?;
        let overlay = Checkpoint::open(dir)?;
        let want = exit_tensor_names(&cfg)?;
        let have = overlay.tensor_infos();
        if let Some(extra) = have.keys().find(|n| !want.contains(n)) {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                msg: format!(
                    "tensor `{extra}` does not belong to a family with exits {:?}",
                    manifest.exit_points
                ),
            });
        }
        if let Some(missing) = want.iter().find(|n| !have.contains_key(*n)) {
            return Err(Error::MissingTensor {
                name: missing.clone(),
                expected: vec![],
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            base: base_src,
            overlay,
            cfg,
        })
    }

    /// Write an overlay: `tensors` (exactly [`exit_tensor_names`] of the family) in `dtype`
    /// and `manifest`, into `dir` (created if needed).
    pub fn write(
        dir: &Path,
        manifest: &FamilyManifest,
        tensors: &HashMap<String, Tensor>,
        dtype: DType,
    ) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        save_safetensors(tensors, dtype, &dir.join("model.safetensors"))?;
        manifest.write(dir)
    }

    /// The overlay directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `family.json`.
    pub fn manifest(&self) -> &FamilyManifest {
        &self.manifest
    }

    /// The base model.
    pub fn base(&self) -> &ModelSource {
        &self.base
    }

    /// The family's configuration (base + attached exits).
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Name → (dtype, shape) of every tensor: the base's and the overlay's.
    pub fn tensor_infos(&self) -> BTreeMap<String, (String, Vec<usize>)> {
        let mut m = self.base.tensor_infos();
        m.extend(self.overlay.tensor_infos());
        m
    }

    /// Stored bytes of `name`.
    pub fn stored_bytes(&self, name: &str) -> Option<usize> {
        self.overlay
            .stored_bytes(name)
            .or_else(|| self.base.stored_bytes(name))
    }

    /// SHA-256 over the overlay's and the base's share of `names` (each by its own rule).
    pub fn fingerprint<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<[u8; 32]> {
        let (own, base): (Vec<&str>, Vec<&str>) =
            names.into_iter().partition(|n| self.overlay.contains(n));
        let mut h = Sha256::new();
        h.update(b"aiflow-family");
        h.update(self.base.fingerprint(base)?);
        h.update(self.overlay.fingerprint(own)?);
        Ok(h.finalize().into())
    }
}

fn check_base(dir: &Path, want: &BaseRef, base: &Path) -> Result<()> {
    let refuse = |msg: String| Error::Config {
        path: dir.join(MANIFEST_FILE),
        msg,
    };
    let size = base_size(base)?;
    if size != want.bytes {
        return Err(refuse(format!(
            "{} is not this family's base `{}`: {size} bytes, the overlay was trained on \
             {} bytes (sha256 {})",
            base.display(),
            want.name,
            want.bytes,
            want.sha256
        )));
    }
    let (sha, _) = base_digest(base)?;
    if !sha.eq_ignore_ascii_case(&want.sha256) {
        return Err(refuse(format!(
            "{} is not this family's base `{}`: sha256 {sha}, the overlay was trained on {}",
            base.display(),
            want.name,
            want.sha256
        )));
    }
    Ok(())
}

impl Family {
    fn stacked(&self) -> Stacked<'_> {
        Stacked {
            top: &self.overlay,
            base: self.base.tensors(),
        }
    }
}

impl TensorSource for Family {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.stacked().get(name, shape)
    }

    fn contains(&self, name: &str) -> bool {
        self.stacked().contains(name)
    }

    fn quantized(&self, name: &str, shape: &[usize]) -> Result<Option<crate::quant::QMatrix>> {
        self.stacked().quantized(name, shape)
    }
}
