//! The cascade's own decode: [`cascade_decode`] (deciding exits answer when confident, else
//! the deepest exit), [`calibrate_on_policy`] (thresholds chosen jointly, re-decoding with
//! each choice), the held-out [`CascadeCheck`] and [`layers_per_token`].

use super::*;

/// What [`cascade_decode`] recorded.
pub struct CascadeDecode {
    /// One per generated token: the deciding exits' records.
    pub tokens: Vec<CascadeToken>,
    /// Every non-deepest exit's records on the same tokens, shallowest first.
    pub exits: Vec<ExitTokens>,
    /// Point of the deepest exit.
    pub deepest: usize,
}

/// Decodes `examples` greedily with the cascade `deciders` (indices into the exit points)
/// at `thresholds`: a token is the first deciding exit's whose confidence reaches its
/// threshold, else the deepest exit's. Every exit runs on every token (what a split
/// deployment computes once it has back-filled), so each token records, per exit, its
/// confidence and whether its token equals the deepest exit's on this context.
pub fn cascade_decode(
    model: &FamilialModel,
    examples: &[Prompt],
    measure: Measure,
    deciders: &[usize],
    thresholds: &[Option<f64>],
) -> anyhow::Result<CascadeDecode> {
    let cfg = model.config();
    let (points, deepest, mut exits) = empty_records(cfg)?;
    let eos: Vec<u32> = if cfg.eos_token_ids.is_empty() {
        vec![flow_familial::tokenizer::BYTE_EOS]
    } else {
        cfg.eos_token_ids.clone()
    };
    let mut tokens = Vec::new();
    const CHUNK: usize = 32;
    for chunk in examples.chunks(CHUNK) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.tokens.clone()).collect();
        let max_new = chunk.iter().map(|e| e.max_new).max().unwrap_or(1);
        let mut caches: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
        let mut done = vec![false; prompts.len()];
        let mut segs: Vec<Seg> = prompts.iter().map(|p| Seg::new(0, p.len())).collect();
        let mut input: Vec<u32> = prompts.concat();
        for _ in 0..max_new {
            let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
            let mut h = model.embed(&input)?;
            let mut at = 0usize;
            let mut conf: Vec<Vec<Confidence>> = Vec::new(); // [exit][sequence]
            for &p in &points {
                h = model.run_layers(&h, at..p, &segs, &mut refs)?;
                at = p;
                let logits: Vec<Vec<f32>> =
                    model.exit(&h, p, &segs, &mut refs, Rows::Last)?.to_vec2()?;
                conf.push(logits.iter().map(|r| Confidence::of_row(r)).collect());
            }
            let mut next = Vec::with_capacity(prompts.len());
            for s in 0..prompts.len() {
                let deep = conf[points.len() - 1][s].token;
                let record = |i: usize| Record {
                    confidence: f64::from(conf[i][s].score(measure)),
                    agrees: conf[i][s].token == deep,
                };
                let answer = deciders
                    .iter()
                    .zip(thresholds)
                    .find(|(&i, t)| t.is_some_and(|t| record(i).confidence >= t))
                    .map_or(deep, |(&i, _)| conf[i][s].token);
                next.push(answer);
                if done[s] {
                    continue;
                }
                for (i, e) in exits.iter_mut().enumerate() {
                    e.records.push(record(i));
                }
                tokens.push(CascadeToken {
                    exits: deciders.iter().map(|&i| record(i)).collect(),
                });
                done[s] = eos.contains(&answer);
            }
            if done.iter().all(|d| *d) {
                break;
            }
            segs = segs.iter().map(|s| Seg::new(s.start + s.len, 1)).collect();
            input = next;
        }
    }
    Ok(CascadeDecode {
        tokens,
        exits,
        deepest,
    })
}

/// Indices (into the exit points) of the deciding exits named by `points` (default: the
/// two shallowest non-deepest exits).
pub(super) fn decider_indices(cfg: &ModelConfig, points: &[usize]) -> anyhow::Result<Vec<usize>> {
    let all = cfg.exit_points();
    let shallow = &all[..all.len().saturating_sub(1)];
    if points.is_empty() {
        return Ok((0..shallow.len().min(2)).collect());
    }
    let mut out = Vec::new();
    for &p in points {
        let Some(i) = shallow.iter().position(|&x| x == p) else {
            bail!("--deciders: {p} is no exit point below the deepest (exits: {shallow:?})");
        };
        if out.last().is_some_and(|&l| l >= i) {
            bail!("--deciders must be increasing, got {points:?}");
        }
        out.push(i);
    }
    Ok(out)
}

/// Calibrates the cascade on its own decodes (see the command's help) and builds the file.
pub fn calibrate_on_policy(
    a: &CalibrateArgs,
    model: &FamilialModel,
    examples: &[Prompt],
    task: &str,
) -> anyhow::Result<CalibrationFile> {
    let cfg = model.config();
    let deciders = decider_indices(cfg, &a.deciders)?;
    let points = cfg.exit_points();
    if a.escalation_cost.len() != deciders.len() {
        bail!(
            "--escalation-cost has {} values for {} deciding exits ({:?})",
            a.escalation_cost.len(),
            deciders.len(),
            deciders.iter().map(|&i| points[i]).collect::<Vec<_>>()
        );
    }
    let bound = bound_of(a);
    let ccfg = CascadeConfig {
        target_agreement: a.target,
        bound,
        costs: a.escalation_cost.clone(),
        grid: a.grid,
    };
    let mut thresholds: Vec<Option<f64>> = vec![None; deciders.len()];
    let (mut rounds, mut converged) = (0usize, false);
    let mut dec = cascade_decode(model, examples, a.measure, &deciders, &thresholds)?;
    let mut candidates = 0;
    while rounds < a.rounds.max(1) {
        rounds += 1;
        let c = calibrate_cascade(&dec.tokens, &ccfg)?;
        candidates = c.candidates;
        println!(
            "round {rounds}: decoded {} tokens with {}; chose {} (composed agreement {:.4}, bound {:.4}, cost {:.2})",
            dec.tokens.len(),
            show_thresholds(&thresholds),
            show_thresholds(&c.thresholds),
            c.empirical_agreement,
            c.bounded_agreement,
            c.cost
        );
        if c.thresholds == thresholds {
            converged = true;
            break;
        }
        thresholds = c.thresholds;
        dec = cascade_decode(model, examples, a.measure, &deciders, &thresholds)?;
    }
    // `dec` is the decode with `thresholds`: the on-policy outcome.
    let (agreeing, answered, cost) =
        composed_agreement(&dec.tokens, &thresholds, &a.escalation_cost);
    let n = dec.tokens.len();
    let lower = |k: usize, n: usize| match bound {
        Some(b) => b.lower(k as u64, n as u64),
        None => k as f64 / n.max(1) as f64,
    };
    let curves = cascade_curves(&dec.tokens, &thresholds, a.curve_points, bound)?;
    let config = CalibrationConfig {
        target_agreement: a.target,
        bound,
        min_accepted: 1,
    };
    let mut exits = Vec::new();
    for (i, e) in dec.exits.iter().enumerate() {
        if let Some(j) = deciders.iter().position(|&d| d == i) {
            let th = thresholds[j];
            // Tokens this decider answered, and how many agreed.
            let mut agr = 0usize;
            for t in &dec.tokens {
                let first = t
                    .exits
                    .iter()
                    .zip(&thresholds)
                    .position(|(r, th)| th.is_some_and(|th| r.confidence >= th));
                if first == Some(j) && t.exits[j].agrees {
                    agr += 1;
                }
            }
            let acc = answered[j];
            exits.push(ExitEntry {
                point: e.point,
                depth: e.depth,
                threshold: th,
                tokens: n,
                accepted: acc,
                empirical_agreement: if acc == 0 {
                    1.0
                } else {
                    agr as f64 / acc as f64
                },
                bounded_agreement: if acc == 0 { 1.0 } else { lower(agr, acc) },
                escalation: answered[j + 1..].iter().sum::<usize>() as f64 / n.max(1) as f64,
                curve: curves[j].clone(),
            });
        } else {
            // Not in the cascade: on its own, on the cascade's contexts.
            let c = calibrate_exit(&e.records, &config)?;
            exits.push(ExitEntry {
                point: e.point,
                depth: e.depth,
                threshold: c.threshold,
                tokens: c.total,
                accepted: c.accepted,
                empirical_agreement: c.empirical_agreement,
                bounded_agreement: c.bounded_agreement,
                escalation: c.escalation,
                curve: agreement_curve(&e.records, a.curve_points, bound)?,
            });
        }
    }
    exits.push(deepest_entry(
        cfg,
        dec.deepest,
        n,
        answered.last().copied().unwrap_or(0),
    ));
    Ok(CalibrationFile {
        format: FORMAT.into(),
        measure: to_partition_measure(a.measure),
        target_agreement: a.target,
        bound,
        model_fingerprint: fingerprint(&a.dir)?,
        task: task.into(),
        examples_per_task: a.examples,
        split: a.split_seed,
        reference: REFERENCE_CASCADE.into(),
        deepest_exit: dec.deepest,
        exits,
        cascade: Some(CascadeEntry {
            deciders: deciders.iter().map(|&i| points[i]).collect(),
            thresholds,
            escalation_cost: a.escalation_cost.clone(),
            candidates,
            rounds,
            converged,
            tokens: n,
            agreeing,
            agreement: agreeing as f64 / n.max(1) as f64,
            bounded_agreement: lower(agreeing, n),
            answered,
            cost,
        }),
    })
}

/// The file's cascade decoded on `examples` with its thresholds.
pub(super) fn check_cascade(
    model: &FamilialModel,
    examples: &[Prompt],
    measure: Measure,
    f: &CalibrationFile,
    c: &CascadeEntry,
) -> anyhow::Result<CascadeCheck> {
    let deciders = decider_indices(model.config(), &c.deciders)?;
    if c.thresholds.len() != deciders.len() {
        bail!(
            "the calibration file's cascade has {} thresholds for {} deciders",
            c.thresholds.len(),
            deciders.len()
        );
    }
    let dec = cascade_decode(model, examples, measure, &deciders, &c.thresholds)?;
    let zero = vec![0.0; deciders.len()];
    let (agreeing, answered, _) = composed_agreement(&dec.tokens, &c.thresholds, &zero);
    let n = dec.tokens.len();
    Ok(CascadeCheck {
        deciders: c.deciders.clone(),
        thresholds: c.thresholds.clone(),
        tokens: n,
        agreeing,
        agreement: agreeing as f64 / n.max(1) as f64,
        bounded_agreement: match f.bound {
            Some(b) => b.lower(agreeing as u64, n as u64),
            None => agreeing as f64 / n.max(1) as f64,
        },
        layers_per_token: layers_per_token(&c.deciders, &answered, model.config().num_layers),
        full_layers: model.config().num_layers,
        answered,
    })
}

/// Held-out check of a cascade.
#[derive(Debug, Clone, Serialize)]
pub struct CascadeCheck {
    pub deciders: Vec<usize>,
    pub thresholds: Vec<Option<f64>>,
    pub tokens: usize,
    pub agreeing: usize,
    pub agreement: f64,
    pub bounded_agreement: f64,
    pub answered: Vec<usize>,
    /// Mean layers on a token's path (see [`layers_per_token`]) and the full model's.
    pub layers_per_token: f64,
    pub full_layers: usize,
}

/// Mean layers computed on the path of a generated token: a token answered at decider
/// exit `p` ran trunk layers `[0, p)` and the exit's own block (`p + 1`), one answered by
/// the deepest exit all `num_layers`. The skipped layers' KV that a later escalated token
/// back-fills (in one batched pass with it) is not counted.
pub fn layers_per_token(deciders: &[usize], answered: &[usize], num_layers: usize) -> f64 {
    let n: usize = answered.iter().sum();
    let layers: usize = answered
        .iter()
        .enumerate()
        .map(|(j, a)| a * deciders.get(j).map_or(num_layers, |p| p + 1))
        .sum();
    layers as f64 / n.max(1) as f64
}
