//! RSS growth after warm-up, per node process.
//!
//! A node that was restarted is a new process whose memory starts over, so samples are
//! split into incarnations (by the process start time) and the longest one is measured.
//! Within it, the first `warmup` fraction of the samples is warm-up and ignored; the
//! baseline is the median of the next `window` fraction, the end the median of the last
//! `window` fraction, and growth = end / baseline − 1. Medians make one GC-like spike or
//! one slow sample harmless; a leak moves the whole last window.

use serde::{Deserialize, Serialize};

/// Fractions of an incarnation's samples (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GrowthWindows {
    /// Warm-up share, ignored (default 0.2).
    pub warmup: f64,
    /// Share of the baseline window after warm-up and of the end window (default 0.2).
    pub window: f64,
}

impl Default for GrowthWindows {
    fn default() -> Self {
        Self {
            warmup: 0.2,
            window: 0.2,
        }
    }
}

/// RSS growth of one incarnation of a node process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RssGrowth {
    /// Samples in the measured incarnation.
    pub samples: usize,
    /// Incarnations seen (1 = never restarted).
    pub incarnations: usize,
    /// Time span of the measured incarnation's samples, seconds.
    pub span_s: f64,
    /// Median RSS of the window right after warm-up, KiB.
    pub baseline_kb: f64,
    /// Median RSS of the last window, KiB.
    pub end_kb: f64,
    /// Highest RSS in the incarnation, KiB.
    pub max_kb: u64,
    /// `end_kb / baseline_kb - 1`.
    pub growth: f64,
}

/// Median of a non-empty slice (mean of the two middle values for even lengths).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// One reading: (seconds, process start ticks, RSS KiB).
pub type RssPoint = (f64, Option<u64>, u64);

/// Growth over the longest incarnation in `points` (time-ordered). `None` when it has
/// fewer than 5 samples (too few for three windows) or a zero baseline.
pub fn rss_growth(points: &[RssPoint], w: GrowthWindows) -> Option<RssGrowth> {
    // split where the start time changes; a reading without a start time joins the current run
    let mut runs: Vec<&[RssPoint]> = Vec::new();
    let mut begin = 0;
    let mut current: Option<u64> = None;
    for (i, p) in points.iter().enumerate() {
        if let Some(s) = p.1 {
            if current.is_some_and(|c| c != s) {
                runs.push(&points[begin..i]);
                begin = i;
            }
            current = Some(s);
        }
    }
    if begin < points.len() {
        runs.push(&points[begin..]);
    }
    let incarnations = runs.len();
    let run = runs.iter().max_by_key(|r| r.len())?;
    let n = run.len();
    if n < 5 {
        return None;
    }
    let count = |frac: f64| ((frac.clamp(0.0, 1.0) * n as f64).round() as usize).max(1);
    let skip = count(w.warmup).min(n - 2);
    let win = count(w.window);
    let rss: Vec<f64> = run.iter().map(|p| p.2 as f64).collect();
    let base = &rss[skip..(skip + win).min(n)];
    let end = &rss[n.saturating_sub(win).max(skip)..];
    let baseline_kb = median(base)?;
    let end_kb = median(end)?;
    if baseline_kb <= 0.0 {
        return None;
    }
    Some(RssGrowth {
        samples: n,
        incarnations,
        span_s: run[n - 1].0 - run[0].0,
        baseline_kb,
        end_kb,
        max_kb: run.iter().map(|p| p.2).max().unwrap_or(0),
        growth: end_kb / baseline_kb - 1.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(rss: &[u64], start: u64) -> Vec<RssPoint> {
        rss.iter()
            .enumerate()
            .map(|(i, &r)| (i as f64, Some(start), r))
            .collect()
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn warm_up_is_ignored_and_a_flat_plateau_is_zero_growth() {
        // fast growth during warm-up, then flat with one spike
        let mut rss = vec![10, 50, 80, 100];
        rss.extend([100; 15]);
        rss[12] = 400;
        rss.push(100);
        let g = rss_growth(&series(&rss, 7), GrowthWindows::default()).unwrap();
        assert_eq!((g.samples, g.incarnations, g.max_kb), (20, 1, 400));
        assert_eq!((g.baseline_kb, g.end_kb), (100.0, 100.0));
        assert_eq!(g.growth, 0.0);
        assert_eq!(g.span_s, 19.0);
    }

    #[test]
    fn a_steady_leak_shows() {
        let rss: Vec<u64> = (0..50).map(|i| 1000 + 10 * i).collect();
        let g = rss_growth(&series(&rss, 1), GrowthWindows::default()).unwrap();
        // baseline = median of samples 10..20 (1145), end = median of 40..50 (1445)
        assert_eq!((g.baseline_kb, g.end_kb), (1145.0, 1445.0));
        assert!((g.growth - 300.0 / 1145.0).abs() < 1e-12, "{g:?}");
    }

    #[test]
    fn restarts_split_incarnations_and_the_longest_is_measured() {
        let mut pts = series(&[500, 900, 900, 900], 1); // killed early
        let mut second = series(&[100, 200, 200, 200, 200, 200, 200, 200, 200, 210], 2);
        for p in &mut second {
            p.0 += 10.0;
        }
        pts.extend(second);
        pts.push((30.0, None, 210)); // a reading without a start time stays in its run
        let g = rss_growth(&pts, GrowthWindows::default()).unwrap();
        assert_eq!((g.incarnations, g.samples, g.max_kb), (2, 11, 210));
        assert_eq!(g.baseline_kb, 200.0);
        assert_eq!(g.end_kb, 210.0);
        assert!((g.growth - 0.05).abs() < 1e-12);
    }

    #[test]
    fn too_few_samples_or_zero_rss_give_none() {
        assert!(rss_growth(&series(&[1, 2, 3, 4], 1), GrowthWindows::default()).is_none());
        assert!(rss_growth(&series(&[0; 10], 1), GrowthWindows::default()).is_none());
        assert!(rss_growth(&[], GrowthWindows::default()).is_none());
    }
}
