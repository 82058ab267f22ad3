//! The on-disk pattern store and task retrieval (PreMoe's TAER idea).
//!
//! A store is a directory with one `<task>.json` per [`TaskPattern`] (a few hundred bytes
//! per task: one score vector and one ranking per MoE layer, plus the retrieval key).
//! Retrieval goes through the [`PatternIndex`] trait; [`ExactIndex`] is exact
//! nearest-neighbour search (squared Euclidean distance), plenty at this scale.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::profile::TaskPattern;

/// Nearest-pattern search over retrieval keys.
pub trait PatternIndex {
    /// Add a key for pattern number `id`.
    fn insert(&mut self, id: usize, key: Vec<f32>) -> Result<()>;
    /// The closest stored pattern to `query` and its distance, `None` when empty.
    fn nearest(&self, query: &[f32]) -> Option<(usize, f32)>;
}

/// Exact nearest neighbour by squared Euclidean distance.
#[derive(Debug, Default, Clone)]
pub struct ExactIndex {
    keys: Vec<(usize, Vec<f32>)>,
}

impl PatternIndex for ExactIndex {
    fn insert(&mut self, id: usize, key: Vec<f32>) -> Result<()> {
        if let Some((_, k)) = self.keys.first() {
            if k.len() != key.len() {
                return Err(Error::Invalid(format!(
                    "key of length {} does not match the index's {}",
                    key.len(),
                    k.len()
                )));
            }
        }
        self.keys.push((id, key));
        Ok(())
    }

    fn nearest(&self, query: &[f32]) -> Option<(usize, f32)> {
        self.keys
            .iter()
            .filter(|(_, k)| k.len() == query.len())
            .map(|(id, k)| {
                let d: f32 = k.iter().zip(query).map(|(a, b)| (a - b) * (a - b)).sum();
                (*id, d)
            })
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
    }
}

/// Task patterns on disk plus an index over their keys.
pub struct PatternStore<I: PatternIndex = ExactIndex> {
    dir: PathBuf,
    patterns: Vec<TaskPattern>,
    index: I,
}

impl<I: PatternIndex> std::fmt::Debug for PatternStore<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatternStore")
            .field("dir", &self.dir)
            .field("tasks", &self.tasks())
            .finish()
    }
}

fn valid_task_name(task: &str) -> bool {
    !task.is_empty()
        && task.len() <= 64
        && task
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Write `pattern` to `dir/<task>.json` (atomically: temp file, then rename).
pub fn save_pattern(dir: &Path, pattern: &TaskPattern) -> Result<PathBuf> {
    if !valid_task_name(&pattern.task) {
        return Err(Error::Invalid(format!(
            "task name `{}` must be 1-64 characters of [A-Za-z0-9_-]",
            pattern.task
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(format!("{}.json", pattern.task));
    let tmp = dir.join(format!(".{}.json.tmp", pattern.task));
    let text = serde_json::to_string(pattern)
        .map_err(|e| Error::Invalid(format!("pattern serialisation: {e}")))?;
    std::fs::write(&tmp, text + "\n").map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

fn check_pattern(p: &TaskPattern, path: &Path) -> Result<()> {
    let bad = |msg: String| Error::Pattern {
        path: path.to_path_buf(),
        msg,
    };
    if p.layers.is_empty() || p.key.is_empty() {
        return Err(bad("no layers or empty key".into()));
    }
    for l in &p.layers {
        let n = l.scores.len();
        let mut seen = vec![false; n];
        for &r in &l.ranking {
            if r >= n || std::mem::replace(&mut seen[r], true) {
                return Err(bad(format!(
                    "layer {}: ranking is not a permutation of 0..{n}",
                    l.layer
                )));
            }
        }
        if l.ranking.len() != n {
            return Err(bad(format!("layer {}: ranking length != experts", l.layer)));
        }
    }
    Ok(())
}

impl PatternStore<ExactIndex> {
    /// Load every `*.json` pattern of `dir` into an [`ExactIndex`].
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, ExactIndex::default())
    }
}

impl<I: PatternIndex> PatternStore<I> {
    /// Load every `*.json` pattern of `dir` into `index`.
    pub fn open_with(dir: &Path, mut index: I) -> Result<Self> {
        let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        let mut patterns = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| Error::io(&f, e))?;
            let p: TaskPattern = serde_json::from_str(&text).map_err(|e| Error::Pattern {
                path: f.clone(),
                msg: format!("not a task pattern: {e}"),
            })?;
            check_pattern(&p, &f)?;
            index.insert(patterns.len(), p.key.clone())?;
            patterns.push(p);
        }
        if patterns.is_empty() {
            return Err(Error::Invalid(format!(
                "pattern store {} holds no patterns; run `flow-node moe profile` first",
                dir.display()
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            patterns,
            index,
        })
    }

    /// Task names, in store order.
    pub fn tasks(&self) -> Vec<&str> {
        self.patterns.iter().map(|p| p.task.as_str()).collect()
    }

    /// Every pattern.
    pub fn patterns(&self) -> &[TaskPattern] {
        &self.patterns
    }

    /// The pattern of `task`.
    pub fn get(&self, task: &str) -> Option<&TaskPattern> {
        self.patterns.iter().find(|p| p.task == task)
    }

    /// The stored pattern nearest to a request `signature`.
    pub fn retrieve(&self, signature: &[f32]) -> Result<&TaskPattern> {
        let (id, _) = self.index.nearest(signature).ok_or_else(|| {
            Error::Invalid(format!(
                "no stored pattern has a key of length {} (was the store profiled on another model?)",
                signature.len()
            ))
        })?;
        self.patterns
            .get(id)
            .ok_or_else(|| Error::Invalid(format!("index returned unknown pattern {id}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::LayerPattern;

    fn pat(task: &str, key: Vec<f32>) -> TaskPattern {
        TaskPattern {
            task: task.into(),
            prompts: 1,
            tokens: 3,
            key,
            keys: Default::default(),
            layers: vec![LayerPattern {
                layer: 4,
                scores: vec![0.7, 0.2, 0.1],
                ranking: vec![0, 1, 2],
            }],
        }
    }

    #[test]
    fn store_round_trip_and_nearest() {
        let dir = tempfile::tempdir().unwrap();
        save_pattern(dir.path(), &pat("add", vec![1.0, 0.0])).unwrap();
        save_pattern(dir.path(), &pat("rev", vec![0.0, 1.0])).unwrap();
        assert!(save_pattern(dir.path(), &pat("../x", vec![0.0, 1.0])).is_err());
        let s = PatternStore::open(dir.path()).unwrap();
        assert_eq!(s.tasks(), vec!["add", "rev"]);
        assert_eq!(s.retrieve(&[0.9, 0.2]).unwrap().task, "add");
        assert_eq!(s.retrieve(&[0.2, 0.7]).unwrap().task, "rev");
        assert!(s.retrieve(&[0.2]).is_err());
        assert_eq!(s.get("add").unwrap().layers[0].ranking, vec![0, 1, 2]);
    }

    #[test]
    fn corrupt_patterns_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = pat("add", vec![1.0]);
        p.layers[0].ranking = vec![0, 0, 1];
        std::fs::write(
            dir.path().join("add.json"),
            serde_json::to_string(&p).unwrap(),
        )
        .unwrap();
        let e = PatternStore::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("add.json") && e.contains("permutation"), "{e}");
        std::fs::write(dir.path().join("add.json"), "{").unwrap();
        assert!(PatternStore::open(dir.path()).is_err());
        let empty = tempfile::tempdir().unwrap();
        assert!(PatternStore::open(empty.path()).is_err());
    }
}
