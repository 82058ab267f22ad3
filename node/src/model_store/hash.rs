//! SHA-256 while writing or reading, with a byte progress bar; the GGUF header check.

use std::io::{Read, Write};
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use super::error::{Result, StoreError};

/// A writer that hashes and counts what passes through it and advances a progress bar.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
    bar: ProgressBar,
}

impl<W: Write> HashingWriter<W> {
    /// Wrap `inner`; `bar` is advanced by every byte written.
    pub fn new(inner: W, bar: ProgressBar) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
            bar,
        }
    }

    /// Flush and return the inner writer, the byte count and the lowercase hex SHA-256.
    pub fn finish(mut self) -> std::io::Result<(W, u64, String)> {
        self.inner.flush()?;
        Ok((self.inner, self.bytes, hex::encode(self.hasher.finalize())))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        self.bar.inc(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Size and SHA-256 (lowercase hex) of the file at `path`.
pub fn sha256_file(path: &Path, bar: &ProgressBar) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).map_err(|e| StoreError::io("opening", path, e))?;
    let mut w = HashingWriter::new(std::io::sink(), bar.clone());
    std::io::copy(&mut f, &mut w).map_err(|e| StoreError::io("reading", path, e))?;
    let (_, n, sha) = w.finish().map_err(|e| StoreError::io("reading", path, e))?;
    Ok((n, sha))
}

/// A byte progress bar of `total` bytes, or a hidden one when `show` is false.
pub fn byte_bar(show: bool, total: u64, msg: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg.to_string());
    bar
}

/// A spinner showing `msg` and the elapsed time, or a hidden one when `show` is false.
pub fn spinner(show: bool, msg: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        bar.set_style(style);
    }
    bar.set_message(msg.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// The GGUF magic at the start of every GGUF file.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Check that `path` starts with a GGUF header (`GGUF`, then a little-endian u32 version 2
/// or 3) and return the version. A full parse is the loader's job.
pub fn check_gguf_header(path: &Path) -> Result<u32> {
    let mut f = std::fs::File::open(path).map_err(|e| StoreError::io("opening", path, e))?;
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StoreError::io("reading", path, e)),
        }
    }
    let not = |detail: String| StoreError::NotGguf {
        path: path.to_path_buf(),
        detail,
    };
    if got < head.len() {
        return Err(not(format!("only {got} bytes long")));
    }
    if &head[..4] != GGUF_MAGIC {
        return Err(not(format!(
            "it starts with {:?}",
            String::from_utf8_lossy(&head[..4])
        )));
    }
    let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if !(2..=3).contains(&version) {
        return Err(not(format!("unsupported GGUF version {version}")));
    }
    Ok(version)
}

/// Whether `path` starts with the GGUF magic (no error: false when unreadable).
pub fn has_gguf_magic(path: &Path) -> bool {
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == GGUF_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_what_it_writes() -> std::io::Result<()> {
        let mut w = HashingWriter::new(Vec::new(), ProgressBar::hidden());
        w.write_all(b"abc")?;
        let (v, n, sha) = w.finish()?;
        assert_eq!((v.as_slice(), n), (&b"abc"[..], 3));
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        Ok(())
    }

    #[test]
    fn gguf_header_rules() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("x");
        let cases: [(&[u8], Option<u32>); 5] = [
            (b"GGUF\x03\0\0\0rest", Some(3)),
            (b"GGUF\x02\0\0\0", Some(2)),
            (b"GGUF\x04\0\0\0", None),
            (b"GGU", None),
            (b"{\"json\": 1}", None),
        ];
        for (bytes, want) in cases {
            std::fs::write(&p, bytes)?;
            assert_eq!(check_gguf_header(&p).ok(), want, "{bytes:?}");
            assert_eq!(has_gguf_magic(&p), bytes.starts_with(b"GGUF"));
        }
        Ok(())
    }
}
