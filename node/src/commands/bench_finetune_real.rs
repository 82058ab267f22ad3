//! `flow-node bench finetune --model smollm2-135m-instruct`: the schemes against full
//! fine-tuning of a pretrained model on `word-category` (same data, steps and schedule).

use anyhow::{bail, Context};
use candle_core::DType;
use flow_familial::weights::Stacked;
use flow_familial::{FamilialModel, Mode};
use flow_finetune::delta::Delta;
use flow_finetune::mem::{counting, PeakScope};
use flow_finetune::scheme::member_part;
use flow_finetune::words::Split;
use flow_finetune::Scheme;
use serde::Serialize;

use super::bench_finetune::BenchFinetuneArgs;
use super::bench_model::{loadavg, median};
use super::finetune::run_steps;
use super::finetune_real::{Pretrained, BATCH, FULL_LR, LR, STEPS};
use super::OsInstant;

/// Schemes compared by default on a pretrained model (full is always added).
pub(crate) const SCHEMES: &str = "bias-norm:30,lora:4:8,blocks:1,blocks:2";

#[derive(Debug, Serialize)]
struct Row {
    scheme: String,
    lr: f64,
    trainable: usize,
    est_mb: f64,
    peak_mb: f64,
    rss_mb: f64,
    step_ms: f64,
    exact_before: f64,
    exact_after: f64,
    lenient_before: f64,
    lenient_after: f64,
    final_loss: f64,
    delta_mb: f64,
    apply_ms: f64,
}

/// Resident and peak resident set of this process, MB (Linux; NaN elsewhere).
fn rss_mb() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb * 1024.0 / 1e6)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub(crate) fn run(a: BenchFinetuneArgs) -> anyhow::Result<()> {
    flow_familial::set_compute_threads(a.threads);
    super::train::tune_malloc();
    if !counting() {
        bail!("the counting allocator is not installed; peak memory cannot be measured");
    }
    let p = Pretrained::open(&a.model)?;
    let data = p.data();
    let steps = a.steps.unwrap_or(STEPS);
    let batch = a.batch.unwrap_or(BATCH);
    let (lr, full_lr) = (a.lr.unwrap_or(LR), a.full_lr.unwrap_or(FULL_LR));
    let names: Vec<String> = if a.schemes.is_empty() {
        SCHEMES.split(',').map(str::to_string).collect()
    } else {
        a.schemes.clone()
    };
    let mut schemes: Vec<Scheme> = names
        .iter()
        .map(|s| s.trim().parse::<Scheme>())
        .collect::<Result<_, _>>()?;
    schemes.retain(|s| *s != Scheme::Full);
    if !a.no_full {
        schemes.push(Scheme::Full);
    }
    let test = p.task.examples(Split::Test).len();
    eprintln!("held-out accuracy of the base ({test} test words)...");
    let before = p.accuracy(&p.base_model()?)?;
    let load_start = loadavg();
    let mut out = Vec::new();
    for s in &schemes {
        let rate = if *s == Scheme::Full { full_lr } else { lr };
        let opts = p.options(steps, batch, rate, a.warmup.min(steps / 4), a.seed);
        let est = p.estimate(s, &opts)?;
        let scope = PeakScope::start();
        let mut tr = p.trainer(s, &opts).with_context(|| format!("scheme {s}"))?;
        let (times, last) = run_steps(&mut tr, &data, steps, batch, a.seed, &s.to_string())?;
        let peak = scope.peak_bytes();
        let (_, hwm) = rss_mb();
        let acc = p.accuracy(&tr.infer_model()?)?;
        let trainable = tr.num_trainable();
        // The delta a device would receive (f16), and what applying it costs there:
        // parse, check against the base's fingerprint and shapes, build the model.
        let delta = Delta::diff_source(
            p.base.as_ref(),
            &p.shapes,
            &tr.updated()?,
            DType::F16,
            p.fingerprint,
            1,
            &s.to_string(),
        )?;
        let bytes = delta.to_bytes()?;
        drop(tr);
        let t0 = OsInstant::now();
        let top = Delta::from_bytes(&bytes)?.over(&p.fingerprint, &p.shapes)?;
        let _device = FamilialModel::from_source(
            p.cfg.clone(),
            member_part(&p.cfg, &[p.point])?,
            &Stacked {
                top: &top,
                base: p.base.as_ref(),
            },
            Mode::Infer,
        )?;
        let apply_ms = t0.elapsed().as_secs_f64() * 1e3;
        let row = Row {
            scheme: s.to_string(),
            lr: rate,
            trainable,
            est_mb: est.total() as f64 / 1e6,
            peak_mb: peak as f64 / 1e6,
            rss_mb: hwm,
            step_ms: median(&times),
            exact_before: before.exact,
            exact_after: acc.exact,
            lenient_before: before.lenient,
            lenient_after: acc.lenient,
            final_loss: last,
            delta_mb: bytes.len() as f64 / 1e6,
            apply_ms,
        };
        eprintln!(
            "{}: {:.1} MB peak heap (VmHWM {:.0} MB), {:.0} ms/step, exact {:.1}% -> {:.1}%, lenient {:.1}% -> {:.1}%",
            row.scheme,
            row.peak_mb,
            row.rss_mb,
            row.step_ms,
            before.exact * 100.0,
            acc.exact * 100.0,
            before.lenient * 100.0,
            acc.lenient * 100.0
        );
        out.push(row);
    }
    println!(
        "bench finetune: {} ({:.1} MB GGUF, mapped) -> word-category, {steps} steps x {batch} seqs, warm-up {} + cosine to 0.1x, {test} held-out words; threads {}; load {} -> {}",
        a.model.display(),
        p.file_bytes as f64 / 1e6,
        a.warmup.min(steps / 4),
        a.threads,
        load_start,
        loadavg()
    );
    let full = out.iter().find(|r| r.scheme == "full");
    let vs = |num: f64, den: f64| {
        full.map_or("-".to_string(), |_| format!("{:.1}x", num / den.max(1e-9)))
    };
    println!("| scheme | lr | trainable params | est. MB | peak heap MB | mem vs full | VmHWM MB | ms/step | speed vs full | exact before | after | lenient before | after | final loss | delta MB (% of model) | apply ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &out {
        println!(
            "| {} | {:e} | {} | {:.1} | {:.1} | {} | {:.0} | {:.0} | {} | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.3} | {:.2} ({:.1}%) | {:.0} |",
            r.scheme,
            r.lr,
            r.trainable,
            r.est_mb,
            r.peak_mb,
            vs(full.map_or(0.0, |f| f.peak_mb), r.peak_mb),
            r.rss_mb,
            r.step_ms,
            vs(full.map_or(0.0, |f| f.step_ms), r.step_ms),
            r.exact_before * 100.0,
            r.exact_after * 100.0,
            r.lenient_before * 100.0,
            r.lenient_after * 100.0,
            r.final_loss,
            r.delta_mb,
            100.0 * r.delta_mb * 1e6 / p.file_bytes as f64,
            r.apply_ms
        );
    }
    if let Some(full) = full {
        let met = |r: &&Row| {
            (full.exact_after - r.exact_after) * 100.0 <= 1.0
                && full.peak_mb / r.peak_mb.max(1e-9) >= 3.0
                && full.step_ms / r.step_ms.max(1e-9) >= 2.0
                && r.delta_mb * 1e6 <= 0.05 * p.file_bytes as f64
                && r.apply_ms < 1000.0
        };
        let sparse: Vec<&Row> = out.iter().filter(|r| r.scheme != "full").collect();
        match sparse.iter().copied().find(met) {
            Some(r) => println!(
                "target met by {}: within 1 point of full FT's exact accuracy, >= 3x less peak memory, >= 2x faster steps, delta <= 5% of the model, applied in < 1 s",
                r.scheme
            ),
            None => println!(
                "target NOT met: no sparse scheme is within 1 point of full FT's exact accuracy ({:.1}%) with >= 3x less peak memory, >= 2x faster steps, a delta <= 5% of the model and < 1 s to apply",
                full.exact_after * 100.0
            ),
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
