//! Calibration of escalation thresholds from validation records.
//!
//! For one exit, each validation token gives a [`Record`]: the exit's confidence (higher =
//! more confident, whatever the [`ConfidenceMeasure`]) and whether the exit's token agrees
//! with the deepest exit's. Accepting the tokens with `confidence >= t` gives, for every
//! threshold `t`, an *agreement* (fraction of accepted tokens that agree) and an
//! *escalation* rate (fraction not accepted): [`agreement_curve`].
//!
//! [`calibrate_exit`] picks the threshold with the least escalation whose agreement meets
//! the target. With `delta` set, agreement must hold for a one-sided lower confidence bound
//! at level `delta` (Clopper–Pearson, exact, or Hoeffding), and thresholds are tested in
//! fixed sequence from the most conservative down, stopping at the first failure — the
//! Learn-then-Test procedure used by CALM — so that with probability at least `1 − delta`
//! the agreement among accepted tokens at the chosen threshold is at least the target
//! (for exchangeable validation and test tokens). The sequence starts at the first
//! threshold accepting enough tokens for the test to have power (it would pass if the true
//! disagreement were half the allowed one); that start depends on counts only, so the
//! guarantee is kept, and one unlucky token among the most confident few cannot end the
//! sequence before it starts.

use serde::{Deserialize, Serialize};

use crate::error::{check_finite, check_unit, Error, Result};

/// Which confidence measure the records use; all are "higher is more confident".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfidenceMeasure {
    /// Largest softmax probability.
    MaxProb,
    /// Top-1 minus top-2 probability.
    Margin,
    /// Negative entropy of the softmax.
    NegEntropy,
}

impl ConfidenceMeasure {
    /// The serde / CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::MaxProb => "max_prob",
            Self::Margin => "margin",
            Self::NegEntropy => "neg_entropy",
        }
    }
}

/// One validation token at one exit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Confidence of the exit (higher = more confident).
    pub confidence: f64,
    /// Whether the exit's token equals the deepest exit's token.
    pub agrees: bool,
}

/// One point of an agreement-versus-threshold curve: accept when `confidence >= threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Confidence threshold.
    pub threshold: f64,
    /// Agreement with the deepest exit among accepted tokens (empirical, or its lower
    /// bound when the curve was built with one).
    pub agreement: f64,
    /// Fraction of tokens not accepted (escalated).
    pub escalation: f64,
}

/// Lower confidence bound on a binomial proportion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoundKind {
    /// Exact one-sided Clopper–Pearson bound.
    ClopperPearson,
    /// Hoeffding: `k/n − sqrt(ln(1/δ)/(2n))`.
    Hoeffding,
}

/// A bound and its level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bound {
    /// Which bound.
    pub kind: BoundKind,
    /// Risk level `δ` in `(0, 1)`: the bound holds with probability `1 − δ`.
    pub delta: f64,
}

impl Bound {
    /// Lower bound on the proportion from `k` successes out of `n` (0 when `n == 0`).
    pub fn lower(&self, k: u64, n: u64) -> f64 {
        match self.kind {
            BoundKind::ClopperPearson => clopper_pearson_lower(k, n, self.delta),
            BoundKind::Hoeffding => hoeffding_lower(k, n, self.delta),
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.delta.is_finite() && self.delta > 0.0 && self.delta < 1.0) {
            return Err(Error::InvalidInput {
                field: "bound.delta".into(),
                reason: format!("must be in (0, 1), got {}", self.delta),
            });
        }
        Ok(())
    }
}

/// What [`calibrate_exit`] needs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CalibrationConfig {
    /// Required agreement among accepted tokens, e.g. 0.97.
    pub target_agreement: f64,
    /// `None`: empirical agreement only; `Some`: the bound must meet the target.
    pub bound: Option<Bound>,
    /// Thresholds accepting fewer tokens than this are not considered.
    pub min_accepted: usize,
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        Self {
            target_agreement: 0.97,
            bound: Some(Bound {
                kind: BoundKind::ClopperPearson,
                delta: 0.05,
            }),
            min_accepted: 1,
        }
    }
}

/// The result of calibrating one exit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Accept when `confidence >= threshold`; `None`: no threshold meets the target, the
    /// exit should always escalate.
    pub threshold: Option<f64>,
    /// Records used.
    pub total: usize,
    /// Records accepted at the threshold.
    pub accepted: usize,
    /// Empirical agreement among accepted (1 when none is accepted).
    pub empirical_agreement: f64,
    /// Lower bound on agreement among accepted (= empirical without a bound).
    pub bounded_agreement: f64,
    /// Fraction escalated.
    pub escalation: f64,
}

/// Thresholds in decreasing order with cumulative (accepted, agreeing) counts.
fn cumulative(records: &[Record]) -> Result<Vec<(f64, u64, u64)>> {
    for (i, r) in records.iter().enumerate() {
        check_finite(format!("records[{i}].confidence"), r.confidence)?;
    }
    let mut sorted: Vec<Record> = records.to_vec();
    sorted.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    let mut out: Vec<(f64, u64, u64)> = Vec::new();
    let (mut acc, mut agr) = (0u64, 0u64);
    for (i, r) in sorted.iter().enumerate() {
        acc += 1;
        agr += u64::from(r.agrees);
        let last_of_value = sorted
            .get(i + 1)
            .is_none_or(|n| n.confidence != r.confidence);
        if last_of_value {
            out.push((r.confidence, acc, agr));
        }
    }
    Ok(out)
}

/// The agreement-versus-threshold curve of one exit, thresholds in decreasing order (one
/// point per distinct confidence value, downsampled evenly to at most `max_points` when
/// `max_points > 0`; the lowest threshold — accept all — is always kept). With `bound`,
/// `agreement` is the lower bound instead of the empirical value (conservative planning).
pub fn agreement_curve(
    records: &[Record],
    max_points: usize,
    bound: Option<Bound>,
) -> Result<Vec<CurvePoint>> {
    if let Some(b) = bound {
        b.validate()?;
    }
    if records.is_empty() {
        return Err(Error::TooFewSamples {
            what: "an agreement curve".into(),
            needed: 1,
            got: 0,
        });
    }
    let cum = cumulative(records)?;
    let n = records.len() as f64;
    let mut pts: Vec<CurvePoint> = cum
        .iter()
        .map(|&(t, acc, agr)| CurvePoint {
            threshold: t,
            agreement: match bound {
                Some(b) => b.lower(agr, acc),
                None => agr as f64 / acc as f64,
            },
            escalation: 1.0 - acc as f64 / n,
        })
        .collect();
    if max_points > 0 && pts.len() > max_points {
        let len = pts.len();
        let picked: Vec<CurvePoint> = (1..=max_points)
            .map(|i| pts[(i * len).div_ceil(max_points) - 1])
            .collect();
        pts = picked;
    }
    Ok(pts)
}

/// Picks the threshold of one exit (see the module docs). Errors: no records, a NaN
/// confidence, a target or delta out of range. A target no threshold meets is not an
/// error: the result has `threshold: None` (always escalate).
pub fn calibrate_exit(records: &[Record], config: &CalibrationConfig) -> Result<Calibration> {
    check_unit("target_agreement", config.target_agreement)?;
    if let Some(b) = config.bound {
        b.validate()?;
    }
    if records.is_empty() {
        return Err(Error::TooFewSamples {
            what: "calibrating an exit".into(),
            needed: 1,
            got: 0,
        });
    }
    let cum = cumulative(records)?;
    let n = records.len();
    let start = config
        .bound
        .map_or(0, |b| sequence_start(&b, config.target_agreement, n as u64));
    let mut best: Option<(f64, u64, u64, f64)> = None;
    for &(t, acc, agr) in &cum {
        if (acc as usize) < config.min_accepted || acc < start {
            continue;
        }
        let lower = match config.bound {
            Some(b) => b.lower(agr, acc),
            None => agr as f64 / acc as f64,
        };
        if lower >= config.target_agreement {
            best = Some((t, acc, agr, lower));
        } else if config.bound.is_some() {
            // Fixed-sequence testing: stop at the first failure.
            break;
        }
    }
    Ok(match best {
        Some((t, acc, agr, lower)) => Calibration {
            threshold: Some(t),
            total: n,
            accepted: acc as usize,
            empirical_agreement: agr as f64 / acc as f64,
            bounded_agreement: lower,
            escalation: 1.0 - acc as f64 / n as f64,
        },
        None => Calibration {
            threshold: None,
            total: n,
            accepted: 0,
            empirical_agreement: 1.0,
            bounded_agreement: 1.0,
            escalation: 1.0,
        },
    })
}

/// Where the fixed sequence starts: the smallest accepted count at which the bound would
/// pass if the true disagreement were half the allowed one (a power rule that depends on
/// counts only, never on the labels, so the guarantee holds). When the validation set is
/// too small for that, the smallest count at which perfect agreement would pass.
fn sequence_start(b: &Bound, target: f64, n: u64) -> u64 {
    let half = 1.0 - (1.0 - target) / 2.0;
    let powered = |m: u64| b.lower((m as f64 * half).floor() as u64, m) >= target;
    let perfect = |m: u64| b.lower(m, m) >= target;
    first_true(n, powered)
        .or_else(|| first_true(n, perfect))
        .unwrap_or(n + 1)
}

/// Smallest `m` in `1..=n` with `f(m)`, by bisection for an (almost) monotone `f`: the
/// answer depends on `n` and `f` only, which is all the guarantee needs.
fn first_true(n: u64, f: impl Fn(u64) -> bool) -> Option<u64> {
    if n == 0 || !f(n) {
        return None;
    }
    let (mut lo, mut hi) = (0u64, n);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if f(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

/// Validation records of one exit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitRecords {
    /// Depth of the exit.
    pub depth: usize,
    /// Its records (confidence with the family's measure, agreement with the deepest exit).
    pub records: Vec<Record>,
}

/// Calibration of one exit, with the curve the planner uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitCalibration {
    /// Depth of the exit.
    pub depth: usize,
    /// The confidence measure the records were taken with.
    pub measure: ConfidenceMeasure,
    /// The threshold meeting the per-exit target with the least escalation.
    pub calibration: Calibration,
    /// Agreement-versus-threshold curve (agreement = the lower bound when the config has
    /// one: conservative planning).
    pub curve: Vec<CurvePoint>,
}

impl ExitCalibration {
    /// The planner's view of this exit.
    pub fn to_exit_spec(&self) -> crate::planner::ExitSpec {
        crate::planner::ExitSpec {
            depth: self.depth,
            curve: self.curve.clone(),
        }
    }
}

/// Calibrates every exit of a family (what `flow-node model calibrate` runs on a
/// validation set): per exit, [`calibrate_exit`] and [`agreement_curve`] with at most
/// `max_curve_points` points. Exits are returned in increasing depth.
pub fn calibrate_family(
    measure: ConfidenceMeasure,
    exits: &[ExitRecords],
    config: &CalibrationConfig,
    max_curve_points: usize,
) -> Result<Vec<ExitCalibration>> {
    let mut out = exits
        .iter()
        .map(|e| {
            Ok(ExitCalibration {
                depth: e.depth,
                measure,
                calibration: calibrate_exit(&e.records, config)?,
                curve: agreement_curve(&e.records, max_curve_points, config.bound)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    out.sort_by_key(|e| e.depth);
    Ok(out)
}

/// `k/n − sqrt(ln(1/δ)/(2n))`, clamped to `[0, 1]`; 0 when `n == 0`.
pub fn hoeffding_lower(k: u64, n: u64, delta: f64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let p = k as f64 / n as f64;
    (p - ((1.0 / delta).ln() / (2.0 * n as f64)).sqrt()).clamp(0.0, 1.0)
}

/// One-sided Clopper–Pearson lower bound at level `δ`: the `δ` quantile of
/// `Beta(k, n − k + 1)`; 0 when `k == 0`, `δ^(1/n)` when `k == n`.
pub fn clopper_pearson_lower(k: u64, n: u64, delta: f64) -> f64 {
    if k == 0 || n == 0 {
        return 0.0;
    }
    let k = k.min(n);
    if k == n {
        return delta.powf(1.0 / n as f64);
    }
    let (a, b) = (k as f64, (n - k + 1) as f64);
    let (mut lo, mut hi) = (0.0f64, k as f64 / n as f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if reg_inc_beta(a, b, mid) < delta {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

fn ln_gamma(x: f64) -> f64 {
    // Lanczos, g = 7, n = 9.
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut s = C[0];
    for (i, c) in C.iter().enumerate().skip(1) {
        s += c / (x + i as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + s.ln()
}

/// Regularised incomplete beta `I_x(a, b)` (continued fraction, Numerical Recipes).
fn reg_inc_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_cf(a, b, x) / a
    } else {
        1.0 - ln_front.exp() * beta_cf(b, a, 1.0 - x) / b
    }
}

fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..100_000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic synthetic records: confidence uniform in [0, 1), agrees with
    /// probability `0.6 + 0.4·confidence` (so confidence predicts agreement).
    fn synthetic(n: usize, seed: u64) -> Vec<Record> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let c = next();
                let u = next();
                Record {
                    confidence: c,
                    agrees: u < 0.6 + 0.4 * c,
                }
            })
            .collect()
    }

    fn accepted_agreement(records: &[Record], t: f64) -> f64 {
        let acc: Vec<_> = records.iter().filter(|r| r.confidence >= t).collect();
        acc.iter().filter(|r| r.agrees).count() as f64 / acc.len() as f64
    }

    #[test]
    fn chosen_threshold_holds_on_held_out_data() {
        for kind in [BoundKind::ClopperPearson, BoundKind::Hoeffding] {
            let cal = synthetic(20_000, 1);
            let test = synthetic(20_000, 2);
            let cfg = CalibrationConfig {
                target_agreement: 0.9,
                bound: Some(Bound { kind, delta: 0.05 }),
                min_accepted: 1,
            };
            let c = calibrate_exit(&cal, &cfg).unwrap();
            let t = c.threshold.unwrap();
            assert!(c.bounded_agreement >= 0.9);
            assert!(c.bounded_agreement <= c.empirical_agreement);
            assert!(c.escalation > 0.0 && c.escalation < 1.0, "{c:?}");
            let held_out = accepted_agreement(&test, t);
            assert!(held_out >= 0.9, "{kind:?}: held-out {held_out}, {c:?}");
            // Empirical-only picks a lower (or equal) threshold: less escalation.
            let e = calibrate_exit(&cal, &CalibrationConfig { bound: None, ..cfg }).unwrap();
            assert!(e.escalation <= c.escalation);
        }
    }

    #[test]
    fn degenerate_inputs() {
        let cfg = CalibrationConfig::default();
        assert!(matches!(
            calibrate_exit(&[], &cfg),
            Err(Error::TooFewSamples { .. })
        ));
        let all_agree: Vec<_> = (0..500)
            .map(|i| Record {
                confidence: i as f64 / 500.0,
                agrees: true,
            })
            .collect();
        let c = calibrate_exit(&all_agree, &cfg).unwrap();
        assert_eq!(c.threshold, Some(0.0));
        assert_eq!(c.escalation, 0.0);
        assert_eq!(c.empirical_agreement, 1.0);
        assert!(c.bounded_agreement < 1.0);
        let none_agree: Vec<_> = all_agree
            .iter()
            .map(|r| Record {
                agrees: false,
                ..*r
            })
            .collect();
        let c = calibrate_exit(&none_agree, &cfg).unwrap();
        assert_eq!(c.threshold, None);
        assert_eq!(c.escalation, 1.0);
        let nan = [Record {
            confidence: f64::NAN,
            agrees: true,
        }];
        assert!(calibrate_exit(&nan, &cfg).is_err());
        let bad = CalibrationConfig {
            target_agreement: 1.5,
            ..cfg
        };
        assert!(calibrate_exit(&all_agree, &bad).is_err());
    }

    #[test]
    fn curve_is_monotone_in_escalation_and_downsampled() {
        assert!(agreement_curve(&[], 0, None).is_err());
        let recs = synthetic(1000, 3);
        let full = agreement_curve(&recs, 0, None).unwrap();
        assert_eq!(full.len(), 1000);
        assert!(full
            .windows(2)
            .all(|w| w[0].threshold > w[1].threshold && w[0].escalation > w[1].escalation));
        assert_eq!(full.last().unwrap().escalation, 0.0);
        let small = agreement_curve(&recs, 10, None).unwrap();
        assert_eq!(small.len(), 10);
        assert_eq!(small.last(), full.last());
        let bounded = agreement_curve(
            &recs,
            10,
            Some(Bound {
                kind: BoundKind::ClopperPearson,
                delta: 0.1,
            }),
        )
        .unwrap();
        for (b, e) in bounded.iter().zip(&small) {
            assert!(b.agreement <= e.agreement);
        }
    }

    #[test]
    fn clopper_pearson_known_values() {
        // k = n: closed form.
        assert!((clopper_pearson_lower(10, 10, 0.05) - 0.05f64.powf(0.1)).abs() < 1e-12);
        // k = 1, n = 1 .. : lower = 1 − (1 − δ)^(1/n) for k = 1.
        let v = clopper_pearson_lower(1, 20, 0.05);
        assert!((v - (1.0 - 0.95f64.powf(1.0 / 20.0))).abs() < 1e-9, "{v}");
        // R: binom.test(95, 100, alt = "greater")$conf.int[1] = 0.8975.
        let v = clopper_pearson_lower(95, 100, 0.05);
        assert!((v - 0.8975).abs() < 5e-4, "{v}");
        assert_eq!(clopper_pearson_lower(0, 10, 0.05), 0.0);
    }

    #[test]
    fn family_calibration_feeds_the_planner() {
        let exits = [
            ExitRecords {
                depth: 8,
                records: synthetic(2000, 5),
            },
            ExitRecords {
                depth: 4,
                records: synthetic(2000, 4),
            },
        ];
        let cfg = CalibrationConfig {
            target_agreement: 0.9,
            ..Default::default()
        };
        let cal = calibrate_family(ConfidenceMeasure::Margin, &exits, &cfg, 8).unwrap();
        assert_eq!(cal.iter().map(|c| c.depth).collect::<Vec<_>>(), vec![4, 8]);
        let spec = cal[0].to_exit_spec();
        assert_eq!(spec.curve.len(), 8);
        assert!(cal.iter().all(|c| c.calibration.threshold.is_some()));
        let json = serde_json::to_string(&cal[1]).unwrap();
        assert!(json.contains("\"margin\""), "{json}");
    }

    #[test]
    fn measure_names() {
        assert_eq!(
            serde_json::to_string(&ConfidenceMeasure::NegEntropy).unwrap(),
            "\"neg_entropy\""
        );
        let m: ConfidenceMeasure = serde_json::from_str("\"max_prob\"").unwrap();
        assert_eq!(m.name(), "max_prob");
    }

    proptest! {
        #[test]
        fn bounds_are_below_empirical(k in 0u64..500, extra in 0u64..500, delta in 0.001f64..0.5) {
            let n = k + extra;
            prop_assume!(n > 0);
            let p = k as f64 / n as f64;
            let cp = clopper_pearson_lower(k, n, delta);
            let h = hoeffding_lower(k, n, delta);
            prop_assert!((0.0..=p + 1e-12).contains(&cp), "cp {cp} p {p}");
            prop_assert!((0.0..=p + 1e-12).contains(&h));
        }
    }
}
