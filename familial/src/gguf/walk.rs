//! A second look at a GGUF header that candle's reader refused or read ambiguously: walk
//! the key/value and tensor-info tables without building values, to say **which** key or
//! tensor is at fault (candle's messages do not name it) and to find duplicated names
//! (candle's maps keep the last silently).

use std::collections::HashSet;

/// Type ids of ggml tensor types candle (and so this crate) can hold.
const KNOWN_GGML_TYPES: &[u32] = &[0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];
/// Deepest array nesting candle's reader accepts: a header this walk cannot read, the
/// reader cannot either (see [`alignment`]).
const MAX_DEPTH: usize = 64;

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let n = usize::try_from(n).map_err(|_| "length overflows".to_string())?;
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                format!(
                    "needs {n} bytes at offset {}, the file has {} (truncated or a lying length)",
                    self.at,
                    self.b.len()
                )
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    /// Skip one value of type `t` (arrays recursively, to a bounded depth).
    fn skip_value(&mut self, t: u32, depth: usize) -> Result<(), String> {
        match t {
            0 | 1 | 7 => self.take(1).map(drop),
            2 | 3 => self.take(2).map(drop),
            4..=6 => self.take(4).map(drop),
            10..=12 => self.take(8).map(drop),
            8 => self.string().map(drop),
            9 if depth <= MAX_DEPTH => {
                let et = self.u32()?;
                let n = self.u64()?;
                if !matches!(et, 0..=12) {
                    return Err(format!("array element type {et} is unknown"));
                }
                for _ in 0..n {
                    self.skip_value(et, depth + 1)?;
                }
                Ok(())
            }
            9 => Err("arrays nested too deeply".into()),
            other => Err(format!("value type {other} is unknown")),
        }
    }

    /// The next metadata entry `i`: its key, value type id and the value's bytes.
    fn entry(&mut self, i: u64) -> Result<(String, u32, &'a [u8]), String> {
        let key = self
            .string()
            .map_err(|e| format!("metadata entry {i}: key: {e}"))?;
        let r = self.u32().and_then(|t| {
            let start = self.at;
            self.skip_value(t, 0).map(|()| (t, start))
        });
        match r {
            Ok((t, start)) => Ok((key, t, &self.b[start..self.at])),
            Err(e) => Err(format!("metadata key `{key}`: {e}")),
        }
    }
}

/// What is wrong with the header in `bytes`, naming the key or tensor, if anything.
pub(crate) fn diagnose(bytes: &[u8]) -> Option<String> {
    let mut c = Cursor { b: bytes, at: 8 };
    let n_tensors = c.u64().ok()?;
    let n_kv = c.u64().ok()?;
    let mut keys = HashSet::new();
    for i in 0..n_kv {
        let key = match c.entry(i) {
            Ok((key, _, _)) => key,
            Err(e) => return Some(e),
        };
        if !keys.insert(key.clone()) {
            return Some(format!("metadata key `{key}` appears twice"));
        }
    }
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let name = match c.string() {
            Ok(k) => k,
            Err(e) => return Some(format!("tensor info {i}: name: {e}")),
        };
        let r = (|| -> Result<(), String> {
            let nd = c.u32()?;
            if nd > 4 {
                return Err(format!("{nd} dimensions (at most 4)"));
            }
            for _ in 0..nd {
                c.u64()?;
            }
            let t = c.u32()?;
            if !KNOWN_GGML_TYPES.contains(&t) {
                return Err(format!("ggml type id {t} is unknown or unsupported"));
            }
            c.u64().map(drop)
        })();
        if let Err(e) = r {
            return Some(format!("tensor `{name}`: {e}"));
        }
        if !names.insert(name.clone()) {
            return Some(format!("tensor `{name}` appears twice"));
        }
    }
    None
}

/// Check every `general.alignment` entry of the header in `bytes` before candle's reader
/// computes the data offset with it: the reader divides by the value (zero panics) and
/// silently falls back to 32 for types other than u8/u16/u32/i8/i16/i32, which would put
/// every tensor at the wrong offset. Returns the alignment (`None`: absent); a header that
/// cannot be walked is left to the reader, which refuses it too (this walk accepts all the
/// reader does).
pub(crate) fn alignment(bytes: &[u8]) -> Result<Option<u64>, String> {
    let mut c = Cursor { b: bytes, at: 8 };
    let (Ok(_), Ok(n_kv)) = (c.u64(), c.u64()) else {
        return Ok(None);
    };
    let mut found = None;
    for i in 0..n_kv {
        let Ok((key, t, v)) = c.entry(i) else {
            return Ok(None);
        };
        if key != "general.alignment" {
            continue;
        }
        let value: i64 = match (t, v) {
            (0, &[a]) => a.into(),
            (1, &[a]) => i8::from_le_bytes([a]).into(),
            (2, &[a, b]) => u16::from_le_bytes([a, b]).into(),
            (3, &[a, b]) => i16::from_le_bytes([a, b]).into(),
            (4, &[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]).into(),
            (5, &[a, b, c, d]) => i32::from_le_bytes([a, b, c, d]).into(),
            _ => {
                return Err(format!(
                    "metadata key `general.alignment` has value type {t}; it must be a uint32 \
                     (the reader ignores other types)"
                ))
            }
        };
        match u64::try_from(value) {
            Ok(a) if a.is_power_of_two() => found = Some(a),
            _ => {
                return Err(format!(
                    "metadata key `general.alignment` = {value} must be a power of two"
                ))
            }
        }
    }
    Ok(found)
}
