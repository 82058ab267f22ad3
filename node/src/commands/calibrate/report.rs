//! What `model calibrate` prints, and `--check` (a calibration file on a held-out split).

use super::*;

pub(super) fn show_thresholds(t: &[Option<f64>]) -> String {
    let v: Vec<String> = t
        .iter()
        .map(|t| t.map_or_else(|| "escalate".to_string(), |t| format!("{t:.4}")))
        .collect();
    format!("[{}]", v.join(", "))
}

/// Prints the cascade of a calibration file (its own decode's outcome).
pub(super) fn print_cascade(c: &CascadeEntry) {
    println!(
        "cascade: deciding exits {:?} at {} ({} rounds, {}), escalation cost {:?}, {} combinations searched",
        c.deciders,
        show_thresholds(&c.thresholds),
        c.rounds,
        if c.converged { "converged" } else { "not converged: last choice decoded once more" },
        c.escalation_cost,
        c.candidates
    );
    println!(
        "  on its own decode: {} tokens, composed agreement {:.4} (lower bound {:.4}), answered per stage {:?}, mean cost {:.2}",
        c.tokens, c.agreement, c.bounded_agreement, c.answered, c.cost
    );
}

/// Held-out check of one exit.
#[derive(Debug, Clone, Serialize)]
pub struct CheckEntry {
    pub point: usize,
    pub threshold: Option<f64>,
    pub tokens: usize,
    pub accepted: usize,
    /// Agreement among accepted tokens (1 when none is accepted).
    pub agreement: f64,
    pub escalation: f64,
}

/// Report of `--check`.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub calibration: PathBuf,
    pub measure: ConfidenceMeasure,
    pub target_agreement: f64,
    pub task: String,
    pub examples_per_task: usize,
    pub split: u64,
    pub calibrated_on_split: u64,
    pub exits: Vec<CheckEntry>,
    /// The file's cascade on its own decode of this split: tokens, agreeing tokens,
    /// composed agreement, its lower bound at the file's delta (thresholds fixed before
    /// this split was seen: a valid held-out bound), tokens answered per stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cascade: Option<CascadeCheck>,
}

pub(super) fn print_header(a: &CalibrateArgs, f: &CalibrationFile) {
    let bound = match f.bound {
        Some(b) => format!(
            "{} lower bound at delta {}",
            match b.kind {
                BoundKind::ClopperPearson => "Clopper-Pearson",
                BoundKind::Hoeffding => "Hoeffding",
            },
            b.delta
        ),
        None => "empirical agreement (no bound)".into(),
    };
    println!(
        "calibrated {}: measure {}, target agreement {:.3}, {bound}",
        a.dir.display(),
        f.measure.name(),
        f.target_agreement
    );
}

/// Per exit: threshold, accepted tokens, agreement, bound, escalation.
pub(super) fn print_exits(f: &CalibrationFile) {
    println!(
        "{:>5}  {:>10}  {:>13}  {:>10}  {:>11}  {:>10}",
        "exit", "threshold", "accepted", "agreement", "lower bound", "escalation"
    );
    for e in &f.exits {
        if e.point == f.deepest_exit {
            println!(
                "{:>5}  {:>10}  {:>13}  {:>10}  {:>11}  {:>10}",
                e.point, "-", "all", "1 (ref)", "-", "0.0%"
            );
            continue;
        }
        match e.threshold {
            Some(t) => println!(
                "{:>5}  {:>10.4}  {:>13}  {:>10.4}  {:>11.4}  {:>9.1}%",
                e.point,
                t,
                format!("{}/{}", e.accepted, e.tokens),
                e.empirical_agreement,
                e.bounded_agreement,
                e.escalation * 100.0
            ),
            None => println!(
                "{:>5}  {:>10}  {:>13}  {:>10}  {:>11}  {:>9.1}%",
                e.point,
                "none",
                format!("0/{}", e.tokens),
                "-",
                "-",
                100.0
            ),
        }
    }
}

pub(super) fn print_table(
    a: &CalibrateArgs,
    f: &CalibrationFile,
    c: &Collected,
    n_examples: usize,
    secs: f64,
) -> anyhow::Result<()> {
    print_header(a, f);
    println!(
        "validation: task {}, {} examples ({} per task, split {}), {} answer tokens per exit, {:.1} s",
        f.task, n_examples, f.examples_per_task, f.split, c.tokens, secs
    );
    println!(
        "reference: {REFERENCE} ({} teacher-forced mismatches)",
        c.reference_mismatches
    );
    println!();
    print_exits(f);
    println!();
    println!("agreement with the deepest exit vs threshold (empirical; accept when confidence >= threshold):");
    for e in &c.exits {
        let pts = agreement_curve(&e.records, 6, None)?;
        let row: Vec<String> = pts
            .iter()
            .map(|p| {
                format!(
                    ">={:.4}: {:.3} ({:.0}% esc)",
                    p.threshold,
                    p.agreement,
                    p.escalation * 100.0
                )
            })
            .collect();
        println!("  exit {}: {}", e.point, row.join(" | "));
    }
    Ok(())
}

pub(super) fn check(a: &CalibrateArgs, path: &Path) -> anyhow::Result<()> {
    let f = CalibrationFile::read(path)?;
    let fp = fingerprint(&a.dir)?;
    if fp != f.model_fingerprint {
        bail!(
            "{} was calibrated for model {}, but {} is {fp}",
            path.display(),
            f.model_fingerprint,
            a.dir.display()
        );
    }
    let (src, model) = load(&a.dir)?;
    let measure = from_partition_measure(f.measure);
    let Validation {
        prompts: examples,
        task,
    } = validation(a, &src, true)?;
    let collected = collect_records(&model, &examples, measure)?;
    let mut exits = Vec::new();
    for e in &collected.exits {
        let entry = f
            .exits
            .iter()
            .find(|x| x.point == e.point)
            .with_context(|| format!("{} has no entry for exit {}", path.display(), e.point))?;
        let (mut acc, mut agr) = (0usize, 0usize);
        if let Some(t) = entry.threshold {
            for r in e.records.iter().filter(|r| r.confidence >= t) {
                acc += 1;
                agr += usize::from(r.agrees);
            }
        }
        exits.push(CheckEntry {
            point: e.point,
            threshold: entry.threshold,
            tokens: e.records.len(),
            accepted: acc,
            agreement: if acc == 0 {
                1.0
            } else {
                agr as f64 / acc as f64
            },
            escalation: 1.0 - acc as f64 / e.records.len().max(1) as f64,
        });
    }
    let report = CheckReport {
        calibration: path.to_path_buf(),
        measure: f.measure,
        target_agreement: f.target_agreement,
        task,
        examples_per_task: a.examples,
        split: a.split_seed,
        calibrated_on_split: f.split,
        exits,
        cascade: match &f.cascade {
            Some(c) => Some(check_cascade(&model, &examples, measure, &f, c)?),
            None => None,
        },
    };
    println!(
        "held-out check of {} (calibrated on split {}) on task {}, split {}, {} answer tokens per exit; target {:.3}",
        path.display(),
        f.split,
        report.task,
        report.split,
        collected.tokens,
        f.target_agreement
    );
    if f.split == a.split_seed && f.task == report.task {
        println!("warning: this is the calibration split itself, not a held-out set");
    }
    println!(
        "{:>5}  {:>10}  {:>13}  {:>10}  {:>10}",
        "exit", "threshold", "accepted", "agreement", "escalation"
    );
    for e in &report.exits {
        println!(
            "{:>5}  {:>10}  {:>13}  {:>10.4}  {:>9.1}%",
            e.point,
            e.threshold
                .map_or_else(|| "none".to_string(), |t| format!("{t:.4}")),
            format!("{}/{}", e.accepted, e.tokens),
            e.agreement,
            e.escalation * 100.0
        );
    }
    if let Some(c) = &report.cascade {
        println!(
            "cascade {:?} at {} on its own decode: {} tokens, composed agreement {:.4} (lower bound {:.4}), answered per stage {:?}",
            c.deciders,
            show_thresholds(&c.thresholds),
            c.tokens,
            c.agreement,
            c.bounded_agreement,
            c.answered
        );
        println!(
            "  layers per token {:.2} of {} ({:.3}x the full model; exit blocks counted, back-fill not)",
            c.layers_per_token,
            c.full_layers,
            c.layers_per_token / c.full_layers.max(1) as f64
        );
    }
    if let Some(p) = &a.json {
        write_json(p, &report)?;
        println!("report written to {}", p.display());
    }
    Ok(())
}
