//! Exhaustive search over candidates, selection and error reporting.

use super::cost::{Cand, Eval, Prepared};
use super::input::{PlanInput, MAX_CANDIDATES};
use super::plan::{Alternative, Plan, PlanMode, Verdict};
use crate::error::{Error, Result};

/// Calls `f` on every combination of `options[k][..]` (odometer order, last fastest).
fn for_each_product(options: &[Vec<usize>], mut f: impl FnMut(&[usize])) {
    if options.iter().any(|o| o.is_empty()) {
        return;
    }
    let mut idx = vec![0usize; options.len()];
    let mut cur: Vec<usize> = options.iter().map(|o| o[0]).collect();
    loop {
        f(&cur);
        let mut k = options.len();
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            idx[k] += 1;
            if idx[k] < options[k].len() {
                cur[k] = options[k][idx[k]];
                break;
            }
            idx[k] = 0;
            cur[k] = options[k][0];
        }
    }
}

/// Every non-decreasing `bounds` of length `n + 1` for `mode`.
fn splits(p: &Prepared<'_>, mode: PlanMode) -> Vec<Vec<usize>> {
    let (n, l) = (p.n, p.l);
    match mode {
        PlanMode::CloudOnly => {
            let mut b = vec![0; n + 1];
            b[n] = l;
            vec![b]
        }
        PlanMode::DeviceOnly => p
            .input
            .model
            .exits
            .iter()
            .map(|e| {
                let mut b = vec![e.depth; n + 1];
                b[0] = 0;
                b
            })
            .collect(),
        PlanMode::Adaptive | PlanMode::StaticSplit => {
            let mut out = Vec::new();
            let mut b = vec![0usize; n + 1];
            b[n] = l;
            fn rec(b: &mut Vec<usize>, k: usize, n: usize, l: usize, out: &mut Vec<Vec<usize>>) {
                if k == n {
                    out.push(b.clone());
                    return;
                }
                for v in b[k - 1]..=l {
                    b[k] = v;
                    rec(b, k + 1, n, l, out);
                }
            }
            if n == 1 {
                out.push(b);
            } else {
                rec(&mut b, 1, n, l, &mut out);
            }
            let allowed = &p.input.config.allowed_cuts;
            out.retain(|b| {
                allowed
                    .iter()
                    .enumerate()
                    .all(|(k, cuts)| cuts.is_empty() || cuts.contains(&b[k + 1]))
            });
            out
        }
    }
}

/// Sort key: lower is better. Feasible candidates are ranked by score, then by higher
/// agreement; enumeration order breaks exact ties.
fn better(a: &Eval, b: &Eval) -> bool {
    a.score < b.score || (a.score == b.score && a.agreement > b.agreement)
}

/// Device-only ranking: meeting the target first, then score; below target, agreement.
fn device_only_key(e: &Eval, target: f64) -> (u8, f64, f64) {
    if e.agreement >= target - 1e-12 {
        (0, e.score, -e.agreement)
    } else {
        (1, -e.agreement, e.score)
    }
}

/// The choices of one split, per position of a candidate: the decision of each tier
/// (0 = none, k + 1 = curve point k), then the encoding of each link.
fn options_of(p: &Prepared<'_>, mode: PlanMode, bounds: &[usize]) -> Vec<Vec<usize>> {
    let (n, input) = (p.n, p.input);
    let answer = bounds[n];
    let top = (0..n)
        .rev()
        .find(|&i| bounds[i] < bounds[i + 1])
        .unwrap_or(0);
    let mut options: Vec<Vec<usize>> = Vec::with_capacity(2 * n);
    for i in 0..n {
        let mut o = vec![0usize];
        let active = bounds[i] < bounds[i + 1];
        if mode == PlanMode::Adaptive && active && i < top && bounds[i + 1] < answer {
            if let Some(e) = p.exit_at[bounds[i + 1]] {
                o.extend(1..=input.model.exits[e].curve.len());
            }
        }
        options.push(o);
    }
    for j in 0..n.saturating_sub(1) {
        if j < top && bounds[j + 1] > 0 {
            options.push((0..p.encs.len()).collect());
        } else {
            options.push(vec![0]);
        }
    }
    options
}

struct SplitBest {
    cand: Cand,
    eval: Eval,
}

/// Searches `mode`'s space and returns the best plan with its alternatives.
pub(crate) fn search(input: &PlanInput, mode: PlanMode) -> Result<Plan> {
    input.validate()?;
    let p = Prepared::new(input);
    let n = p.n;
    let enforce = mode != PlanMode::CloudOnly;
    let target = input.config.accuracy_target;

    let mut best: Option<(Cand, Eval)> = None;
    let mut per_split: Vec<SplitBest> = Vec::new();
    // For error reporting.
    let mut least_overflow: Option<(u64, Cand)> = None;
    // The fastest candidate rejected for memory, link saturation and accuracy.
    let mut fastest_rejected: [Option<SplitBest>; 3] = [None, None, None];
    let mut best_fitting_agreement: Option<(f64, Cand)> = None;
    let mut any_unsaturated = false;
    let mut saturated_example: Option<Cand> = None;

    let all = splits(&p, mode);
    let candidates = all
        .iter()
        .map(|b| {
            options_of(&p, mode, b)
                .iter()
                .fold(1u64, |c, o| c.saturating_mul(o.len() as u64))
        })
        .fold(0u64, u64::saturating_add);
    if candidates > MAX_CANDIDATES {
        return Err(Error::InvalidInput {
            field: "model.exits".into(),
            reason: format!(
                "{} splits with the exits' curve points and {} encodings make {candidates} \
                 candidates to search, over the planner's limit of {MAX_CANDIDATES}: store \
                 fewer curve points (`flow-node model calibrate --curve-points`), plan with \
                 fewer tiers or encodings",
                all.len(),
                p.encs.len()
            ),
        });
    }
    for bounds in all {
        let options = options_of(&p, mode, &bounds);
        let mut split_best: Option<SplitBest> = None;
        for_each_product(&options, |choice| {
            let decisions = (0..n)
                .map(|i| {
                    (choice[i] > 0).then(|| (p.exit_at[bounds[i + 1]].unwrap_or(0), choice[i] - 1))
                })
                .collect();
            let cand = Cand {
                bounds: bounds.clone(),
                decisions,
                encs: choice[n..].to_vec(),
            };
            let ev = p.evaluate(&cand, false, enforce);
            match &ev.verdict {
                Some(Verdict::OverMemory { .. }) => {
                    if least_overflow
                        .as_ref()
                        .is_none_or(|(o, _)| ev.overflow < *o)
                    {
                        least_overflow = Some((ev.overflow, cand.clone()));
                    }
                }
                Some(Verdict::LinkSaturated { .. }) => {
                    if saturated_example.is_none() {
                        saturated_example = Some(cand.clone());
                    }
                }
                Some(Verdict::BelowAccuracy { .. }) | None => {
                    any_unsaturated = true;
                    if best_fitting_agreement
                        .as_ref()
                        .is_none_or(|(a, _)| ev.agreement > *a)
                    {
                        best_fitting_agreement = Some((ev.agreement, cand.clone()));
                    }
                }
                Some(Verdict::Slower { .. }) => {}
            }
            let slot = match &ev.verdict {
                Some(Verdict::OverMemory { .. }) => Some(0),
                Some(Verdict::LinkSaturated { .. }) => Some(1),
                Some(Verdict::BelowAccuracy { .. }) => Some(2),
                _ => None,
            };
            if let Some(k) = slot {
                if fastest_rejected[k]
                    .as_ref()
                    .is_none_or(|r| ev.score < r.eval.score)
                {
                    fastest_rejected[k] = Some(SplitBest {
                        cand: cand.clone(),
                        eval: ev.clone(),
                    });
                }
            }
            let feasible = ev.verdict.is_none();
            let eligible = if mode == PlanMode::DeviceOnly {
                matches!(ev.verdict, None | Some(Verdict::BelowAccuracy { .. }))
            } else {
                feasible
            };
            let wins = eligible
                && match &best {
                    None => true,
                    Some((_, b)) if mode == PlanMode::DeviceOnly => {
                        device_only_key(&ev, target) < device_only_key(b, target)
                    }
                    Some((_, b)) => better(&ev, b),
                };
            if wins {
                best = Some((cand.clone(), ev.clone()));
            }
            let replace = match &split_best {
                None => true,
                Some(sb) => {
                    let (f_new, f_old) = (feasible, sb.eval.verdict.is_none());
                    (f_new && !f_old) || (f_new == f_old && better(&ev, &sb.eval))
                }
            };
            if replace {
                split_best = Some(SplitBest { cand, eval: ev });
            }
        });
        if let Some(sb) = split_best {
            per_split.push(sb);
        }
    }

    let Some((cand, _)) = best else {
        return Err(no_plan_error(
            &p,
            least_overflow,
            best_fitting_agreement,
            any_unsaturated,
            saturated_example,
        ));
    };
    let ev = p.evaluate(&cand, true, enforce);
    let mut plan = to_plan(mode, &p, ev);

    // Alternatives: the best candidate of every other split, and the fastest candidate
    // rejected for each constraint when it would have beaten the plan, by score.
    per_split.retain(|sb| sb.cand.bounds != cand.bounds);
    for r in fastest_rejected.into_iter().flatten() {
        if r.eval.score < plan.score && !per_split.iter().any(|sb| sb.cand == r.cand) {
            per_split.push(r);
        }
    }
    per_split.sort_by(|a, b| {
        a.eval
            .score
            .total_cmp(&b.eval.score)
            .then_with(|| b.eval.agreement.total_cmp(&a.eval.agreement))
            .then_with(|| a.cand.bounds.cmp(&b.cand.bounds))
            .then_with(|| a.cand.decisions.cmp(&b.cand.decisions))
            .then_with(|| a.cand.encs.cmp(&b.cand.encs))
    });
    plan.alternatives = per_split
        .iter()
        .take(input.config.alternatives)
        .map(|sb| {
            let detail = p.evaluate(&sb.cand, true, enforce);
            let summary = to_plan(mode, &p, detail).summary();
            Alternative {
                summary,
                predicted_latency_ms: sb.eval.latency,
                score: sb.eval.score,
                predicted_agreement: sb.eval.agreement,
                verdict: sb.eval.verdict.clone().unwrap_or(Verdict::Slower {
                    by_ms: sb.eval.score - plan.score,
                }),
            }
        })
        .collect();
    Ok(plan)
}

fn to_plan(mode: PlanMode, p: &Prepared<'_>, ev: Eval) -> Plan {
    Plan {
        mode,
        tiers: ev.tiers,
        links: ev.links,
        predicted_latency_ms: ev.latency,
        predicted_agreement: ev.agreement,
        accuracy_target: p.input.config.accuracy_target,
        device_energy_j: ev.energy_j,
        cloud_compute_ms: ev.cloud_ms,
        score: ev.score,
        alternatives: Vec::new(),
    }
}

fn no_plan_error(
    p: &Prepared<'_>,
    least_overflow: Option<(u64, Cand)>,
    best_fitting: Option<(f64, Cand)>,
    any_unsaturated: bool,
    saturated: Option<Cand>,
) -> Error {
    let describe = |c: &Cand| {
        let ev = p.evaluate(c, true, true);
        let plan = to_plan(PlanMode::Adaptive, p, ev);
        (plan.summary(), plan)
    };
    if let Some((agreement, c)) = best_fitting.filter(|_| any_unsaturated) {
        let (summary, _) = describe(&c);
        return Error::AccuracyUnreachable {
            target: p.input.config.accuracy_target,
            best: agreement,
            detail: summary,
        };
    }
    if let Some(c) = saturated {
        let (summary, plan) = describe(&c);
        let worst = plan
            .links
            .iter()
            .max_by(|a, b| a.utilisation.total_cmp(&b.utilisation));
        let detail = match worst {
            Some(l) => format!(
                "{summary}: link {}->{} at {:.0}% of {}",
                l.from.name(),
                l.to.name(),
                l.utilisation * 100.0,
                super::plan::fmt_rate(l.goodput_bps)
            ),
            None => summary,
        };
        return Error::LinkSaturated { detail };
    }
    let detail = match least_overflow {
        Some((_, c)) => {
            let (summary, plan) = describe(&c);
            let over: Vec<String> = plan
                .tiers
                .iter()
                .filter(|t| t.memory_bytes > t.memory_limit_bytes)
                .map(|t| {
                    format!(
                        "{} needs {} bytes for layers {}..{} and exits {:?}, limit {} bytes",
                        t.role.name(),
                        t.memory_bytes,
                        t.layer_start,
                        t.layer_end,
                        t.exits,
                        t.memory_limit_bytes
                    )
                })
                .collect();
            format!("closest placement {summary}: {}", over.join("; "))
        }
        None => "no placement was evaluated".to_string(),
    };
    Error::DoesNotFit { detail }
}

/// Re-evaluates an existing plan's placement, exits, thresholds and encodings under a new
/// input (new link estimates, loads or profiles). Returns the re-predicted plan (without
/// alternatives) and why it would now be rejected, if it would.
pub(crate) fn reevaluate(input: &PlanInput, plan: &Plan) -> Result<(Plan, Option<Verdict>)> {
    input.validate()?;
    let p = Prepared::new(input);
    let n = p.n;
    let mismatch = |reason: String| Error::InvalidInput {
        field: "plan".into(),
        reason,
    };
    if plan.tiers.len() != n || plan.links.len() + 1 != n {
        return Err(mismatch(format!(
            "the plan has {} tiers, the input {n}",
            plan.tiers.len()
        )));
    }
    let answer = plan
        .top_tier()
        .and_then(|t| t.answers_with)
        .ok_or_else(|| mismatch("the plan has no answering tier".into()))?;
    let mut bounds: Vec<usize> = plan.tiers.iter().map(|t| t.layer_start).collect();
    bounds.push(answer);
    if bounds[0] != 0 || bounds.windows(2).any(|w| w[0] > w[1]) || answer > p.l {
        return Err(mismatch(format!(
            "layer ranges {bounds:?} are not a placement"
        )));
    }
    let mut decisions = Vec::with_capacity(n);
    for t in &plan.tiers {
        decisions.push(match t.decision {
            None => None,
            Some(d) => {
                let e = p
                    .exit_at
                    .get(d.depth)
                    .copied()
                    .flatten()
                    .ok_or_else(|| mismatch(format!("no exit at depth {}", d.depth)))?;
                let curve = &input.model.exits[e].curve;
                let k = (0..curve.len())
                    .min_by(|&a, &b| {
                        (curve[a].threshold - d.threshold)
                            .abs()
                            .total_cmp(&(curve[b].threshold - d.threshold).abs())
                    })
                    .ok_or_else(|| mismatch(format!("exit {} has no curve", d.depth)))?;
                Some((e, k))
            }
        });
    }
    let encs = plan
        .links
        .iter()
        .map(|l| match l.payload {
            super::plan::Payload::Hidden { encoding, .. } => p
                .encs
                .iter()
                .position(|c| c.encoding == encoding)
                .ok_or_else(|| {
                    mismatch(format!("encoding {} is no longer allowed", encoding.name()))
                }),
            _ => Ok(0),
        })
        .collect::<Result<Vec<_>>>()?;
    let cand = Cand {
        bounds,
        decisions,
        encs,
    };
    let mode = plan.mode;
    let ev = p.evaluate(&cand, true, mode != PlanMode::CloudOnly);
    let verdict = ev.verdict.clone();
    Ok((to_plan(mode, &p, ev), verdict))
}
