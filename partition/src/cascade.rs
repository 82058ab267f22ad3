//! Calibration of a *cascade*: several deciding exits composed into one policy.
//!
//! At serving time a token is answered by the first deciding exit (shallowest first) whose
//! confidence reaches its threshold, else by the deepest exit. What a user sees is the
//! agreement of that *composed* answer with the deepest exit, over all tokens, on the
//! contexts the cascade itself generated. Per-exit calibration on teacher-forced contexts
//! (the deepest exit's own continuation) does not carry over: once a shallow exit has
//! answered, later contexts are the cascade's, and the planner's composition of marginal
//! curves assumes the hard examples nest.
//!
//! [`calibrate_cascade`] takes one [`CascadeToken`] per token of the cascade's own decode
//! (every deciding exit's confidence and agreement on that context) and picks, over a grid
//! of thresholds per deciding exit, the combination with the least expected escalation
//! cost ([`CascadeConfig::costs`]) whose composed agreement meets the target. With a bound,
//! the composed agreement's lower bound (Clopper–Pearson or Hoeffding) must meet it at level
//! `delta / candidates` (Bonferroni over the grid), so the guarantee survives the search on
//! the records the choice was made on. Because the records depend on the thresholds used to
//! decode, the caller iterates (decode with the last choice, choose again) and checks the
//! final thresholds on held-out, on-policy decodes ([`composed_agreement`]).
//!
//! [`cascade_curves`] turns the same records into the planner's per-exit curves, exact for
//! the chosen thresholds of the shallower exits: exit `k`'s curve is measured on the tokens
//! that reach it, and its escalation is the fraction of *all* tokens escalating past it.

use serde::{Deserialize, Serialize};

use crate::calibrate::{agreement_curve, Bound, CurvePoint, Record};
use crate::error::{check_unit, Error, Result};

/// One token of a cascade's decode: per deciding exit (shallowest first), its confidence
/// and whether its token equals the deepest exit's on this context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CascadeToken {
    /// One record per deciding exit.
    pub exits: Vec<Record>,
}

/// What [`calibrate_cascade`] needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CascadeConfig {
    /// Required composed agreement with the deepest exit over all tokens, e.g. 0.97.
    pub target_agreement: f64,
    /// `None`: the empirical composed agreement must meet the target (no guarantee).
    pub bound: Option<Bound>,
    /// Cost of a token escalating past deciding exit `i` (one per deciding exit), e.g. the
    /// latency of the next link and tier. The choice minimises the mean cost per token.
    pub costs: Vec<f64>,
    /// Candidate thresholds per deciding exit (distinct confidences, evenly downsampled),
    /// plus "never answer here".
    pub grid: usize,
}

/// The chosen thresholds and what they gave on the records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CascadeCalibration {
    /// Per deciding exit: answer when confidence `>= threshold`; `None`: always escalate.
    pub thresholds: Vec<Option<f64>>,
    /// Tokens.
    pub tokens: usize,
    /// Tokens whose composed answer agrees with the deepest exit.
    pub agreeing: usize,
    /// `agreeing / tokens`.
    pub empirical_agreement: f64,
    /// Lower bound at `delta / candidates` (= empirical without a bound).
    pub bounded_agreement: f64,
    /// Per deciding exit, then the deepest exit: tokens answered there.
    pub answered: Vec<usize>,
    /// Mean escalation cost per token.
    pub cost: f64,
    /// Threshold combinations searched (the Bonferroni factor).
    pub candidates: usize,
}

/// Composed outcome of `thresholds` on `tokens`: `(agreeing, answered per stage, cost)`.
pub fn composed_agreement(
    tokens: &[CascadeToken],
    thresholds: &[Option<f64>],
    costs: &[f64],
) -> (usize, Vec<usize>, f64) {
    let k = thresholds.len();
    let mut answered = vec![0usize; k + 1];
    let (mut agreeing, mut cost) = (0usize, 0.0f64);
    for t in tokens {
        let mut stage = k;
        for (i, (r, th)) in t.exits.iter().zip(thresholds).enumerate() {
            if th.is_some_and(|th| r.confidence >= th) {
                stage = i;
                break;
            }
        }
        answered[stage] += 1;
        agreeing += usize::from(stage == k || t.exits[stage].agrees);
        cost += costs.iter().take(stage).sum::<f64>();
    }
    (agreeing, answered, cost / tokens.len().max(1) as f64)
}

/// Candidate thresholds of exit `i`: up to `grid` distinct confidences, decreasing, evenly
/// spread over the accepted counts, then `None`.
fn candidates(tokens: &[CascadeToken], i: usize, grid: usize) -> Vec<Option<f64>> {
    let mut c: Vec<f64> = tokens.iter().map(|t| t.exits[i].confidence).collect();
    c.sort_by(|a, b| b.total_cmp(a));
    c.dedup();
    let mut out: Vec<Option<f64>> = if c.len() > grid {
        (1..=grid)
            .map(|j| Some(c[(j * c.len()).div_ceil(grid) - 1]))
            .collect()
    } else {
        c.into_iter().map(Some).collect()
    };
    out.push(None);
    out
}

/// Picks the cascade's thresholds (see the module docs). Errors: no tokens, tokens with a
/// different number of exits than `costs`, a NaN confidence, a target or delta out of
/// range. When no combination meets the target, every exit escalates (the deepest exit
/// answers everything: agreement 1).
pub fn calibrate_cascade(
    tokens: &[CascadeToken],
    config: &CascadeConfig,
) -> Result<CascadeCalibration> {
    check_unit("target_agreement", config.target_agreement)?;
    let k = config.costs.len();
    if tokens.is_empty() {
        return Err(Error::TooFewSamples {
            what: "calibrating a cascade".into(),
            needed: 1,
            got: 0,
        });
    }
    for (j, t) in tokens.iter().enumerate() {
        if t.exits.len() != k {
            return Err(Error::InvalidInput {
                field: format!("tokens[{j}].exits"),
                reason: format!(
                    "{} records, but {k} deciding exits have costs",
                    t.exits.len()
                ),
            });
        }
        for (i, r) in t.exits.iter().enumerate() {
            crate::error::check_finite(format!("tokens[{j}].exits[{i}].confidence"), r.confidence)?;
        }
    }
    for (i, &c) in config.costs.iter().enumerate() {
        crate::error::check_non_negative(format!("costs[{i}]"), c)?;
    }
    let grids: Vec<Vec<Option<f64>>> = (0..k)
        .map(|i| candidates(tokens, i, config.grid.max(1)))
        .collect();
    let total: usize = grids.iter().map(Vec::len).product();
    let bound = config.bound.map(|b| Bound {
        delta: b.delta / total as f64,
        ..b
    });
    let n = tokens.len();
    let lower = |agreeing: usize| match bound {
        Some(b) => b.lower(agreeing as u64, n as u64),
        None => agreeing as f64 / n as f64,
    };
    // (cost, agreeing, thresholds, answered) of the best combination so far.
    type Best = (f64, usize, Vec<Option<f64>>, Vec<usize>);
    let mut best: Option<Best> = None;
    let mut idx = vec![0usize; k];
    loop {
        let th: Vec<Option<f64>> = idx.iter().zip(&grids).map(|(&j, g)| g[j]).collect();
        let (agreeing, answered, cost) = composed_agreement(tokens, &th, &config.costs);
        if lower(agreeing) >= config.target_agreement {
            let better = best
                .as_ref()
                .is_none_or(|(c, a, _, _)| cost < *c || (cost == *c && agreeing > *a));
            if better {
                best = Some((cost, agreeing, th, answered));
            }
        }
        // Next combination (odometer).
        let mut i = 0;
        while i < k {
            idx[i] += 1;
            if idx[i] < grids[i].len() {
                break;
            }
            idx[i] = 0;
            i += 1;
        }
        if i == k {
            break;
        }
    }
    let (cost, agreeing, thresholds, answered) = best.unwrap_or_else(|| {
        let mut answered = vec![0; k + 1];
        answered[k] = n;
        (config.costs.iter().sum(), n, vec![None; k], answered)
    });
    Ok(CascadeCalibration {
        thresholds,
        tokens: n,
        agreeing,
        empirical_agreement: agreeing as f64 / n as f64,
        bounded_agreement: lower(agreeing),
        answered,
        cost,
        candidates: total,
    })
}

/// The planner's curve of every deciding exit for `thresholds` (see the module docs):
/// exit `i`'s curve is measured on the tokens that no shallower exit answered at its
/// threshold, keeps the thresholds at or above `thresholds[i]` (the planner may be more
/// careful than the calibration, not less), and states escalation as a fraction of all
/// tokens, so the planner's nested composition is exact at the calibrated thresholds.
/// Agreement is the lower bound when `bound` is set. An exit no token reaches, or one that
/// always escalates, gets an empty curve.
pub fn cascade_curves(
    tokens: &[CascadeToken],
    thresholds: &[Option<f64>],
    max_points: usize,
    bound: Option<Bound>,
) -> Result<Vec<Vec<CurvePoint>>> {
    let n = tokens.len();
    let mut out = Vec::new();
    for (i, th) in thresholds.iter().enumerate() {
        let reached: Vec<Record> = tokens
            .iter()
            .filter(|t| {
                t.exits[..i]
                    .iter()
                    .zip(thresholds)
                    .all(|(r, th)| th.is_none_or(|th| r.confidence < th))
            })
            .map(|t| t.exits[i])
            .collect();
        let Some(th) = th.filter(|_| !reached.is_empty()) else {
            out.push(Vec::new());
            continue;
        };
        let share = reached.len() as f64 / n.max(1) as f64;
        let to_all = |p: CurvePoint| CurvePoint {
            escalation: p.escalation * share,
            ..p
        };
        let mut curve: Vec<CurvePoint> = agreement_curve(&reached, max_points, bound)?
            .into_iter()
            .filter(|p| p.threshold >= th)
            .map(to_all)
            .collect();
        if !curve.iter().any(|p| p.threshold == th) {
            // The calibrated threshold itself, from the full curve.
            if let Some(p) = agreement_curve(&reached, 0, bound)?
                .into_iter()
                .rev()
                .find(|p| p.threshold >= th)
            {
                curve.push(to_all(p));
            }
        }
        out.push(curve);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibrate::BoundKind;

    fn tok(c1: f64, a1: bool, c2: f64, a2: bool) -> CascadeToken {
        CascadeToken {
            exits: vec![
                Record {
                    confidence: c1,
                    agrees: a1,
                },
                Record {
                    confidence: c2,
                    agrees: a2,
                },
            ],
        }
    }

    /// Exit 1 is right when confident (> 0.8), exit 2 when > 0.5; both wrong below.
    fn tokens() -> Vec<CascadeToken> {
        (0..1000)
            .map(|i| {
                let c1 = (i % 100) as f64 / 100.0;
                let c2 = ((i * 37) % 100) as f64 / 100.0;
                tok(c1, c1 > 0.8, c2, c2 > 0.5)
            })
            .collect()
    }

    #[test]
    fn composed_choice_meets_the_target_at_least_cost_and_is_deterministic() {
        let cfg = CascadeConfig {
            target_agreement: 0.97,
            bound: Some(Bound {
                kind: BoundKind::ClopperPearson,
                delta: 0.1,
            }),
            costs: vec![1.0, 2.0],
            grid: 50,
        };
        let t = tokens();
        let c = calibrate_cascade(&t, &cfg).unwrap();
        assert!(c.bounded_agreement >= 0.97, "{c:?}");
        assert_eq!(c, calibrate_cascade(&t, &cfg).unwrap());
        // Exit 1 answers its confident tokens; exit 2 answers some of the rest.
        let t1 = c.thresholds[0].unwrap();
        assert!(t1 > 0.8 - 1e-9, "{c:?}");
        assert!(c.answered[1] > 0, "{c:?}");
        // Recomputing the outcome gives the reported numbers.
        let (agr, ans, cost) = composed_agreement(&t, &c.thresholds, &cfg.costs);
        assert_eq!((agr, &ans), (c.agreeing, &c.answered));
        assert!((cost - c.cost).abs() < 1e-12);
        // Cheaper than always escalating.
        assert!(c.cost < 3.0);
    }

    #[test]
    fn an_impossible_target_escalates_everything_and_bad_input_is_refused() {
        let t = vec![tok(0.9, false, 0.9, false); 20];
        let cfg = CascadeConfig {
            target_agreement: 0.99,
            bound: None,
            costs: vec![1.0, 1.0],
            grid: 8,
        };
        let c = calibrate_cascade(&t, &cfg).unwrap();
        assert_eq!(c.thresholds, vec![None, None]);
        assert_eq!(c.answered, vec![0, 0, 20]);
        assert!(calibrate_cascade(&[], &cfg).is_err());
        let bad = CascadeConfig {
            costs: vec![1.0],
            ..cfg
        };
        assert!(calibrate_cascade(&t, &bad).is_err());
    }

    #[test]
    fn curves_are_exact_at_the_calibrated_thresholds() {
        let t = tokens();
        let th = vec![Some(0.81), Some(0.51)];
        let curves = cascade_curves(&t, &th, 10, None).unwrap();
        let (_, answered, _) = composed_agreement(&t, &th, &[0.0, 0.0]);
        let n = t.len() as f64;
        let at = |i: usize, x: f64| {
            *curves[i]
                .iter()
                .find(|p| (p.threshold - x).abs() < 1e-12)
                .unwrap()
        };
        let p1 = at(0, 0.81);
        assert!((p1.escalation - (1.0 - answered[0] as f64 / n)).abs() < 1e-12);
        let p2 = at(1, 0.51);
        assert!((p2.escalation - answered[2] as f64 / n).abs() < 1e-12);
        assert_eq!(p2.agreement, 1.0);
        assert!(curves.iter().flatten().all(|p| p.threshold >= 0.51));
    }
}
