//! `flow-node traffic train` and `flow-node bench traffic`: the familial vision model of
//! the traffic app, and the benchmark of the whole loop (controllers × conditions in
//! SUMO, detector accuracy per exit and condition, share of frames escalated).

use std::path::PathBuf;

use anyhow::Context;
use flow_traffic::controller::Mode;
use flow_traffic::dataset::{self, DatasetSpec, Sample};
use flow_traffic::scene::{Camera, Condition};
use flow_traffic::sumo::{self, RunOptions, Scenario, TruthInputs};
use flow_traffic::vision::{self, ModelDetector, TrainConfig, VisionConfig, VisionFamily};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::traffic::{
    print_ci_bands, print_passage_summary, print_passages, print_reports, sim_progress,
};
use super::OsInstant;

#[derive(clap::Args, Debug)]
#[command(before_long_help = "\
Train the traffic app's familial vision model (a small ViT with a device exit and an edge
exit) on rendered camera frames, then report each exit's accuracy per condition on held-out
frames.

The model answers two questions per frame: is an emergency vehicle in view, and what is the
approach's congestion index. Every exit is trained jointly (sum of exit losses).

Training frames are random synthetic scenes (--samples: queues from the stop line in every
lane, 40% with an emergency vehicle), optionally mixed with frames of the deployment's own
traffic (--sumo-frames): the scenario is run in SUMO with other seeds than its own
(--sumo-seeds; the scenario's seed is what `bench traffic` measures, so it is refused), under
every controller with exact controller inputs, every step's four approach scenes are kept,
and the frames drawn from them are re-rendered under a random condition each. These hold
what the random scenes lack: empty and sparse cross streets, moving platoons, long queues.

Examples:
  flow-node traffic train --out models/traffic --samples 6000 --steps 600
  flow-node traffic train --out models/traffic --samples 6000 --sumo-frames 3000 --sumo-seeds 1,2,3")]
pub struct TrainArgs {
    /// Output folder (vision.json, vision.safetensors, eval.json).
    #[arg(long, default_value = "models/traffic")]
    pub out: PathBuf,
    /// Training frames (rendered in memory).
    #[arg(long, default_value_t = 6000)]
    pub samples: usize,
    #[arg(long, default_value_t = 600)]
    pub steps: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Held-out frames per condition for the report.
    #[arg(long, default_value_t = 150)]
    pub eval_per_condition: usize,
    /// Extra training frames rendered from SUMO runs of --scenario (0 = none).
    #[arg(long, default_value_t = 0)]
    pub sumo_frames: usize,
    /// SUMO seeds of those runs; must differ from the scenario's own seed.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub sumo_seeds: Vec<u64>,
    #[command(flatten)]
    pub capture: SumoCapture,
}

/// Where captured SUMO scenes come from (`traffic train --sumo-frames`, `traffic calibrate`).
#[derive(Debug, Clone, clap::Args)]
pub struct SumoCapture {
    /// Scenario the SUMO frames come from.
    #[arg(long, default_value = "testbed/traffic/peak-hour")]
    pub scenario: PathBuf,
    /// Simulated seconds per SUMO run.
    #[arg(long, default_value_t = 1800.0)]
    pub sumo_end: f64,
    /// The `sumo` binary to run.
    #[arg(long, default_value = "sumo")]
    pub sumo: String,
}

/// Scenes of the deployment's traffic: `scenario` run with each of `seeds` under every
/// controller (exact inputs, classical detector, which is only scored), every step's
/// approach scenes kept.
fn capture_scenes(
    capture: &SumoCapture,
    seeds: &[u64],
) -> anyhow::Result<Vec<flow_traffic::scene::Scene>> {
    let (end, sumo_bin) = (capture.sumo_end, capture.sumo.as_str());
    let mut scenario = Scenario::load(&capture.scenario)?;
    let own = scenario.file.seed;
    if seeds.is_empty() {
        anyhow::bail!("--sumo-frames needs at least one --sumo-seeds");
    }
    if seeds.contains(&own) {
        anyhow::bail!(
            "--sumo-seeds must not contain the scenario's own seed {own}: that run is the \
             benchmark (`flow-node bench traffic`), and training on it would leak it"
        );
    }
    let mut scenes = Vec::new();
    for &seed in seeds {
        scenario.file.seed = seed;
        for mode in [Mode::Fixed, Mode::Adaptive, Mode::Preempt] {
            let dir = tempfile::tempdir()?;
            let mut opts = RunOptions::new(mode, dir.path().to_path_buf());
            opts.end_s = Some(end);
            opts.truth = TruthInputs::parse("both")?;
            opts.sumo = sumo_bin.to_string();
            opts.capture_scenes_every = 1;
            let pb = sim_progress(&format!("seed {seed} {}", mode.name()), end);
            let mut det = sumo::ClassicalDetector::new(Camera::default());
            let r = sumo::run(&scenario, &opts, &mut det, &mut |now, _| {
                pb.set_position(now as u64)
            })?;
            pb.finish_and_clear();
            scenes.extend(r.scenes);
        }
    }
    Ok(scenes)
}

#[derive(clap::Args, Debug)]
#[command(before_long_help = "\
Fit a monotone (isotonic) calibration of the vision model's congestion index and write it
next to the model as ci_calibration.json; `flow-node traffic run` and `bench traffic` apply
it when the file exists (--no-calibration turns it off).

Why: the model over-reads empty approaches by a few hundredths, enough to stop an empty
approach from gapping out. The fit needs frames whose true index is known: the scenario is
run in SUMO with the training seeds (--seeds; the scenario's own seed is the benchmark and
is refused), every step's approach scenes kept, --frames of them re-rendered under a random
condition preset each, and the split detector (device exit, escalating below --threshold,
exactly what the controller sees) is run on them. The pairs (predicted, true) are pooled by
pool-adjacent-violators into a non-decreasing piecewise-linear map.

Example:
  flow-node traffic calibrate --model models/traffic --frames 4000")]
pub struct CalibrateArgs {
    /// Model folder (vision.json, vision.safetensors); the calibration is written here.
    #[arg(long, default_value = "models/traffic")]
    pub model: PathBuf,
    /// Frames rendered from the captured scenes for the fit.
    #[arg(long, default_value_t = 4000)]
    pub frames: usize,
    /// SUMO seeds to capture scenes from; must differ from the scenario's own seed.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub seeds: Vec<u64>,
    /// Seed of the frame draw and rendering (other than training's, so the frames are new
    /// renders of the training seeds' scenes).
    #[arg(long, default_value_t = 11)]
    pub seed: u64,
    /// Device-exit confidence below which a frame escalates (as in `bench traffic`).
    #[arg(long, default_value_t = 0.9)]
    pub threshold: f32,
    /// Smallest number of frames behind one knot of the map.
    #[arg(long, default_value_t = 40)]
    pub min_block: usize,
    #[command(flatten)]
    pub capture: SumoCapture,
}

pub fn calibrate(a: CalibrateArgs) -> anyhow::Result<()> {
    use flow_traffic::calibration::{CiCalibration, FILE};
    let model = VisionFamily::load(&a.model)
        .with_context(|| format!("loading the vision model {}", a.model.display()))?;
    let scenes = capture_scenes(&a.capture, &a.seeds)?;
    let conditions: Vec<String> = Condition::PRESETS.iter().map(|s| s.to_string()).collect();
    let samples = dataset::from_scenes(&scenes, a.frames, a.seed, &conditions)?;
    let det = ModelDetector {
        model,
        threshold: a.threshold,
    };
    let pb = ProgressBar::new(samples.len() as u64);
    let mut pred = Vec::with_capacity(samples.len());
    let mut truth = Vec::with_capacity(samples.len());
    for s in &samples {
        pred.push(det.infer(&s.frame)?.congestion);
        truth.push(s.labels.congestion);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let mut cal = CiCalibration::fit(&pred, &truth, a.min_block.max(1))?;
    cal.source = format!(
        "{} frames from {} scenes, seeds {:?}, threshold {:.2}, min block {}",
        samples.len(),
        scenes.len(),
        a.seeds,
        a.threshold,
        a.min_block
    );
    let bands = [0.0f32, 0.05, 0.15, 0.30, 0.50, 1.01];
    println!("| true CI band | frames | raw bias / MAE | calibrated bias / MAE |");
    println!("|---|---|---|---|");
    for w in bands.windows(2) {
        let idx: Vec<usize> = (0..truth.len())
            .filter(|&i| truth[i] >= w[0] && truth[i] < w[1])
            .collect();
        if idx.is_empty() {
            continue;
        }
        let n = idx.len() as f64;
        let stat = |f: &dyn Fn(usize) -> f32| {
            let b = idx.iter().map(|&i| (f(i) - truth[i]) as f64).sum::<f64>() / n;
            let m = idx
                .iter()
                .map(|&i| (f(i) - truth[i]).abs() as f64)
                .sum::<f64>()
                / n;
            (b, m)
        };
        let (rb, rm) = stat(&|i| pred[i]);
        let (cb, cm) = stat(&|i| cal.apply(pred[i]));
        println!(
            "| {:.2}-{:.2} | {} | {rb:+.3} / {rm:.3} | {cb:+.3} / {cm:.3} |",
            w[0],
            w[1].min(1.0),
            idx.len()
        );
    }
    println!("{} knots: {:?}", cal.knots.len(), cal.knots);
    cal.save(&a.model)?;
    println!("wrote {}", a.model.join(FILE).display());
    Ok(())
}

/// Accuracy of every exit, and of the escalating split, on one condition.
#[derive(Debug, Serialize)]
pub struct ConditionEval {
    pub condition: String,
    pub exits: Vec<vision::ExitAccuracy>,
    /// Split detector (device exit, escalating below the threshold).
    pub split_recall: f64,
    pub split_accuracy: f64,
    pub escalated_share: f64,
}

fn eval_sets(per_condition: usize, seed: u64) -> anyhow::Result<Vec<(String, Vec<Sample>)>> {
    Condition::PRESETS
        .iter()
        .map(|c| {
            let spec = DatasetSpec {
                samples: per_condition,
                seed: seed.wrapping_add(1_000),
                conditions: vec![c.to_string()],
                emergency_rate: 0.5,
                ..DatasetSpec::default()
            };
            Ok((c.to_string(), dataset::generate(&spec)?))
        })
        .collect()
}

/// Per-condition accuracy of every exit and of the split at `threshold`.
pub fn evaluate_all(
    model: VisionFamily,
    sets: &[(String, Vec<Sample>)],
    threshold: f32,
) -> anyhow::Result<(Vec<ConditionEval>, VisionFamily)> {
    let det = ModelDetector { model, threshold };
    let mut out = Vec::new();
    for (cond, samples) in sets {
        let refs: Vec<&Sample> = samples.iter().collect();
        let exits = vision::evaluate(&det.model, &refs)?;
        let (mut ok, mut evs, mut found, mut esc) = (0usize, 0usize, 0usize, 0usize);
        for s in samples {
            let d = det.infer(&s.frame)?;
            ok += (d.emergency == s.labels.emergency) as usize;
            esc += d.escalated as usize;
            if s.labels.emergency {
                evs += 1;
                found += d.emergency as usize;
            }
        }
        let n = samples.len().max(1) as f64;
        out.push(ConditionEval {
            condition: cond.clone(),
            exits,
            split_recall: found as f64 / evs.max(1) as f64,
            split_accuracy: ok as f64 / n,
            escalated_share: esc as f64 / n,
        });
    }
    Ok((out, det.model))
}

fn print_evals(evals: &[ConditionEval], exits: &[usize], threshold: f32) {
    print!("{:<10}", "condition");
    for e in exits {
        print!(
            " {:>12} {:>10} {:>9}",
            format!("exit{e} acc"),
            "recall",
            "CI MAE"
        );
    }
    println!(
        " {:>14} {:>12} {:>10}",
        format!("split@{threshold:.2} acc"),
        "recall",
        "escalated"
    );
    for c in evals {
        print!("{:<10}", c.condition);
        for a in &c.exits {
            print!(
                " {:>12.3} {:>10.3} {:>9.3}",
                a.accuracy, a.recall, a.congestion_mae
            );
        }
        println!(
            " {:>14.3} {:>12.3} {:>9.1}%",
            c.split_accuracy,
            c.split_recall,
            100.0 * c.escalated_share
        );
    }
}

pub fn train(a: TrainArgs) -> anyhow::Result<()> {
    let camera = Camera::default();
    let spin = ProgressBar::new_spinner();
    spin.set_message(format!("rendering {} training frames", a.samples));
    let mut samples = dataset::generate(&DatasetSpec {
        samples: a.samples,
        seed: a.seed,
        ..DatasetSpec::default()
    })?;
    spin.finish_and_clear();
    if a.sumo_frames > 0 {
        let t = OsInstant::now();
        let scenes = capture_scenes(&a.capture, &a.sumo_seeds)?;
        let conditions: Vec<String> = Condition::PRESETS.iter().map(|s| s.to_string()).collect();
        let extra = dataset::from_scenes(&scenes, a.sumo_frames, a.seed, &conditions)?;
        let evs = extra.iter().filter(|s| s.labels.emergency).count();
        let ci: Vec<f32> = extra.iter().map(|s| s.labels.congestion).collect();
        let below = |x: f32| ci.iter().filter(|&&c| c < x).count();
        println!(
            "{} SUMO frames from {} captured scenes (seeds {:?}, {:.0} s): {} with an emergency vehicle, congestion index < 0.05: {}, < 0.15: {}",
            extra.len(),
            scenes.len(),
            a.sumo_seeds,
            t.elapsed().as_secs_f64(),
            evs,
            below(0.05),
            below(0.15),
        );
        samples.extend(extra);
    }
    let mut model = VisionFamily::new(VisionConfig::small(&camera))?;
    println!(
        "vision family: {} parameters, exits after blocks {:?}, {} training frames",
        model.parameters(),
        model.cfg.exits,
        samples.len()
    );
    let pb = ProgressBar::new(a.steps as u64);
    pb.set_style(
        ProgressStyle::with_template("train [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let cfg = TrainConfig {
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        ..TrainConfig::default()
    };
    let t = OsInstant::now();
    let mut ema = None::<f32>;
    vision::train(&mut model, &samples, &cfg, &mut |step, loss| {
        let e = ema.map_or(loss, |m| 0.95 * m + 0.05 * loss);
        ema = Some(e);
        pb.set_position(step as u64 + 1);
        pb.set_message(format!("loss {e:.3}"));
    })?;
    pb.finish_and_clear();
    println!(
        "trained {} steps in {:.0} s (final loss ~{:.3})",
        a.steps,
        t.elapsed().as_secs_f64(),
        ema.unwrap_or(0.0)
    );
    model.save(&a.out)?;
    let exits = model.cfg.exits.clone();
    let sets = eval_sets(a.eval_per_condition, a.seed)?;
    let (evals, _) = evaluate_all(model, &sets, 0.9)?;
    print_evals(&evals, &exits, 0.9);
    std::fs::write(
        a.out.join("eval.json"),
        serde_json::to_string_pretty(&evals)?,
    )?;
    println!("saved to {}", a.out.display());
    Ok(())
}

fn parse_truth(s: &str) -> Result<TruthInputs, String> {
    TruthInputs::parse(s).map_err(|e| e.to_string())
}

#[derive(clap::Args, Debug)]
#[command(before_long_help = "\
Benchmark the traffic app end to end (cameras reach the edge over QUIC unless --in-process).

1. Detector accuracy per exit and camera condition on held-out rendered frames, and for
   the split detector (device exit, escalating to the edge exit below --threshold), with the
   share of frames escalated.
2. SUMO runs of the scenario for every condition in --conditions and every controller
   (fixed-time, adaptive, adaptive + preemption), all with the split vision detector in the
   loop: emergency-vehicle travel time, mean waiting time of all vehicles, recall of
   emergency vehicles in the loop, share of frames escalated.

Example:
  flow-node bench traffic --model models/traffic --end 1800
  flow-node bench traffic --model models/traffic --conditions fog --truth congestion --ev-trace")]
pub struct BenchTrafficArgs {
    /// Trained vision family (from `flow-node traffic train`).
    #[arg(long, default_value = "models/traffic")]
    pub model: PathBuf,
    #[arg(long, default_value = "testbed/traffic/peak-hour")]
    pub scenario: PathBuf,
    /// Simulated seconds per run.
    #[arg(long, default_value_t = 1800.0)]
    pub end: f64,
    /// Camera conditions of the SUMO runs.
    #[arg(long, value_delimiter = ',', default_value = "clear,fog,night")]
    pub conditions: Vec<String>,
    /// Device exit confidence below which a frame escalates to the edge exit.
    #[arg(long, default_value_t = 0.9)]
    pub threshold: f32,
    /// Held-out frames per condition for the accuracy table.
    #[arg(long, default_value_t = 200)]
    pub eval_per_condition: usize,
    #[arg(long, default_value = "sumo")]
    pub sumo: String,
    #[command(flatten)]
    pub link: super::traffic::LinkArgs,
    /// Feed the controllers the scenes' exact labels instead of the detector's estimate:
    /// none, emergency (the emergency flag), congestion (the congestion index) or both. An
    /// upper bound that tells which estimate's errors cost time; the detector still runs
    /// and its recall and errors are still reported.
    #[arg(long, default_value = "none", value_parser = parse_truth)]
    pub truth: TruthInputs,
    /// Also print every emergency vehicle's passage per run (view, detection, green,
    /// crossing), not only the per-run means.
    #[arg(long)]
    pub ev_trace: bool,
    /// Also print everything as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn bench(a: BenchTrafficArgs) -> anyhow::Result<()> {
    for c in &a.conditions {
        Condition::preset(c)?;
    }
    let model = VisionFamily::load(&a.model).with_context(|| {
        format!(
            "loading {} (train one with `flow-node traffic train`)",
            a.model.display()
        )
    })?;
    let exits = model.cfg.exits.clone();
    let sets = eval_sets(a.eval_per_condition, 77)?;
    let (evals, _) = evaluate_all(model, &sets, a.threshold)?;
    println!(
        "== detector accuracy per exit and condition ({} held-out frames each)",
        a.eval_per_condition
    );
    print_evals(&evals, &exits, a.threshold);

    let scenario = Scenario::load(&a.scenario)?;
    let mut det = super::traffic::model_detector(&a.model, a.threshold, &a.link)?;
    let mut reports = Vec::new();
    for cond in &a.conditions {
        for mode in [Mode::Fixed, Mode::Adaptive, Mode::Preempt] {
            let dir = tempfile::tempdir()?;
            let mut opts = RunOptions::new(mode, dir.path().to_path_buf());
            opts.end_s = Some(a.end);
            opts.condition = Some(cond.clone());
            opts.truth = a.truth;
            opts.sumo = a.sumo.clone();
            let pb = sim_progress(&format!("{cond} {}", mode.name()), a.end);
            let r = sumo::run(&scenario, &opts, det.as_mut(), &mut |now, _| {
                pb.set_position(now as u64)
            })?;
            pb.finish_and_clear();
            reports.push(r);
        }
    }
    println!(
        "\n== SUMO {} ({} s simulated per run), split vision detector @ {:.2}",
        a.scenario.display(),
        a.end,
        a.threshold
    );
    print_reports(&reports);
    println!("\n== congestion index error per band of the true index (bias, MAE, share of frames)");
    print_ci_bands(&reports);
    println!("\n== where the emergency vehicles' time goes (means over the vehicles; view = the camera's visible length)");
    print_passage_summary(&reports);
    if a.ev_trace {
        for r in &reports {
            print_passages(r);
        }
    }
    println!(
        "\n{:<10} {:>22} {:>22} {:>20} {:>18}",
        "condition",
        "EV travel vs fixed",
        "mean wait vs fixed",
        "frames escalated",
        "bytes/escalated"
    );
    for chunk in reports.chunks(3) {
        let (f, p) = (&chunk[0], &chunk[2]);
        println!(
            "{:<10} {:>21.1}% {:>21.2}x {:>19.1}% {:>18.0}",
            f.condition,
            100.0 * (p.emergency_mean_travel_s / f.emergency_mean_travel_s - 1.0),
            p.mean_waiting_s / f.mean_waiting_s.max(1e-9),
            100.0 * p.detection.escalated_share(),
            p.detection.bytes_per_escalated(),
        );
    }
    if a.json {
        #[derive(Serialize)]
        struct All<'a> {
            detector: &'a [ConditionEval],
            runs: &'a [sumo::RunReport],
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&All {
                detector: &evals,
                runs: &reports
            })?
        );
    }
    Ok(())
}
