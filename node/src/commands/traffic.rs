//! `flow-node traffic ...`: the edge traffic-management app (crate `flow-traffic`).
//!
//! - `traffic run`: the closed loop against SUMO: cameras → detection → signal controller
//!   → TraCI, with tripinfo-based metrics;
//! - `traffic dataset`: a labelled dataset of rendered camera frames.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use flow_traffic::controller::{Mode, Timing};
use flow_traffic::dataset::{self, DatasetSpec};
use flow_traffic::edge::{EdgeService, RemoteDetector};
use flow_traffic::scene::{Camera, Condition};
use flow_traffic::sumo::{self, ClassicalDetector, Detector, RunOptions, RunReport, Scenario};
use flow_traffic::vision::{ModelDetector, VisionFamily};
use indicatif::{ProgressBar, ProgressStyle};

/// `flow-node traffic ...`
#[derive(Subcommand, Debug)]
pub enum TrafficCmd {
    /// Run a SUMO scenario headless with cameras, detection and a signal controller.
    Run(Box<RunArgs>),
    /// Write a labelled dataset of rendered camera frames (PPM + labels.jsonl).
    Dataset(DatasetArgs),
    /// Train the familial vision model (device + edge exits) on rendered frames.
    Train(super::traffic_bench::TrainArgs),
    /// Fit a monotone calibration of the model's congestion index on SUMO frames of the
    /// training seeds and write it next to the model (ci_calibration.json).
    Calibrate(super::traffic_bench::CalibrateArgs),
}

pub fn run(cmd: TrafficCmd) -> anyhow::Result<()> {
    match cmd {
        TrafficCmd::Run(a) => run_scenario(*a),
        TrafficCmd::Dataset(a) => write_dataset(a),
        TrafficCmd::Train(a) => super::traffic_bench::train(a),
        TrafficCmd::Calibrate(a) => super::traffic_bench::calibrate(a),
    }
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::parse(s).map_err(|e| e.to_string())
}

fn parse_condition(s: &str) -> Result<String, String> {
    Condition::preset(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

#[derive(clap::Args, Debug)]
#[command(before_long_help = "\
Run a traffic scenario in SUMO (headless) with the edge controller in the loop.

Every simulation step, each approach's camera frame is rendered from the vehicles' positions
(read over TraCI), the detector estimates the approach's congestion index and whether an
emergency vehicle is in view, the controller decides the signal, and the signal is set
through TraCI. At the end, SUMO's tripinfo output gives the mean waiting time of all
vehicles and the emergency vehicles' travel time.

With --model, each camera runs the vision family up to its device exit; a frame whose
confidence is below --threshold escalates: its hidden state travels as a flow-protocol
Continue over QUIC to an edge service (started in this process on 127.0.0.1, reached through
the real QUIC stack; mutual TLS with --ca and the certificate flags, insecure-loopback
otherwise), which runs the remaining blocks and answers with a Classification.

Needs the `sumo` binary (Debian: apt-get install -y sumo).

Example:
  flow-node traffic run --scenario testbed/traffic/peak-hour --controller preempt --end 600
  flow-node traffic run --scenario testbed/traffic/peak-hour --model models/traffic --end 300")]
pub struct RunArgs {
    /// Scenario folder (holds scenario.toml, the .net.xml and the routes).
    #[arg(long)]
    pub scenario: PathBuf,
    /// Signal controller: fixed (fixed-time baseline), adaptive (green split from
    /// congestion), preempt (adaptive + emergency-vehicle preemption).
    #[arg(long, default_value = "preempt", value_parser = parse_mode)]
    pub controller: Mode,
    /// Stop after this many simulated seconds (default: the scenario's end_s).
    #[arg(long)]
    pub end: Option<f64>,
    /// Camera condition (clear, haze, fog, rain, night, glare, night-fog); default: the
    /// scenario's.
    #[arg(long, value_parser = parse_condition)]
    pub condition: Option<String>,
    /// Output folder for tripinfo.xml, sumo.log, report.json (default: a temp folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Save every N-th step's camera frames as PPM under OUT/frames (0: none).
    #[arg(long, default_value_t = 0)]
    pub save_frames: u64,
    /// The sumo binary.
    #[arg(long, default_value = "sumo")]
    pub sumo: String,
    /// Detect with this trained vision family (from `flow-node traffic train`) instead of
    /// the classical analyser: device exit, escalating to the edge exit below --threshold.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Device exit confidence below which a frame escalates (with --model).
    #[arg(long, default_value_t = 0.9)]
    pub threshold: f32,
    #[command(flatten)]
    pub link: LinkArgs,
    /// Also print every emergency vehicle's passage: when it came into the camera's view,
    /// was first detected, got its green, crossed (to see where its time goes).
    #[arg(long)]
    pub ev_trace: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Progress bar over simulated seconds.
pub fn sim_progress(label: &str, end_s: f64) -> ProgressBar {
    let pb = ProgressBar::new(end_s.max(1.0) as u64);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{label} [{{bar:30}}] {{pos}}/{{len}} s simulated ({{elapsed}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

fn run_scenario(a: RunArgs) -> anyhow::Result<()> {
    let scenario = Scenario::load(&a.scenario)
        .with_context(|| format!("loading scenario {}", a.scenario.display()))?;
    let tmp;
    let out = match &a.out {
        Some(o) => o.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut opts = RunOptions::new(a.controller, out.clone());
    opts.timing = Timing::default();
    opts.end_s = a.end;
    opts.condition = a.condition.clone();
    opts.sumo = a.sumo.clone();
    opts.save_frames_every = a.save_frames;
    let mut det: Box<dyn Detector> = match &a.model {
        Some(dir) => model_detector(dir, a.threshold, &a.link)?,
        None => Box::new(ClassicalDetector::new(opts.camera)),
    };
    let end_s = a.end.unwrap_or(scenario.file.end_s);
    let pb = sim_progress(a.controller.name(), end_s);
    let report = sumo::run(&scenario, &opts, det.as_mut(), &mut |now, _| {
        pb.set_position(now as u64)
    })?;
    pb.finish_and_clear();
    let json = serde_json::to_string_pretty(&report)?;
    if a.out.is_some() {
        std::fs::write(out.join("report.json"), &json)?;
    }
    if a.json {
        println!("{json}");
    } else {
        print_reports(std::slice::from_ref(&report));
        if a.ev_trace {
            print_passages(&report);
        }
        let d = &report.detection;
        if d.shipped_bytes > 0 {
            println!(
                "escalated {} of {} frames ({:.1}%) to the edge over QUIC, {:.0} bytes per escalated frame",
                d.escalated,
                d.frames,
                100.0 * d.escalated_share(),
                d.bytes_per_escalated()
            );
        }
    }
    Ok(())
}

/// How the cameras reach the edge (`traffic run --model`, `bench traffic`).
#[derive(clap::Args, Debug, Clone)]
pub struct LinkArgs {
    /// Run the edge exit in this process without the protocol (the old path, for
    /// comparison). Default: the edge is a QUIC service (in this process, on 127.0.0.1)
    /// and escalated frames travel to it as flow-protocol `Continue` frames.
    #[arg(long)]
    pub in_process: bool,
    /// Cluster CA for mutual TLS between the cameras and the edge (`flow-node certs
    /// init`); needs the four certificate flags below. Without it the link runs
    /// insecure-loopback (TLS with a throwaway certificate, 127.0.0.1 only).
    #[arg(long, requires_all = ["edge_cert", "edge_key", "camera_cert", "camera_key"])]
    pub ca: Option<PathBuf>,
    /// The edge's certificate (role edge, `flow-node certs issue`); its file stem is the
    /// name the cameras expect.
    #[arg(long)]
    pub edge_cert: Option<PathBuf>,
    #[arg(long)]
    pub edge_key: Option<PathBuf>,
    /// The cameras' certificate (role device).
    #[arg(long)]
    pub camera_cert: Option<PathBuf>,
    #[arg(long)]
    pub camera_key: Option<PathBuf>,
    /// Ignore the model folder's `ci_calibration.json` (written by `flow-node traffic
    /// calibrate`) and hand the controller the model's raw congestion index. By default
    /// the calibration is applied when the file exists.
    #[arg(long)]
    pub no_calibration: bool,
}

/// Cameras + an edge service on a private runtime, as one [`Detector`]. Fields drop in
/// order: the cameras' link, then the edge, then the runtime that drives both.
struct QuicSplit {
    cameras: RemoteDetector,
    edge: EdgeService,
    _rt: tokio::runtime::Runtime,
}

impl Detector for QuicSplit {
    fn detect(
        &mut self,
        approach: flow_traffic::controller::Approach,
        frame: &flow_traffic::render::Frame,
    ) -> flow_traffic::Result<flow_traffic::sumo::Detection> {
        self.cameras.detect(approach, frame)
    }
    fn name(&self) -> String {
        self.cameras.name()
    }
}

impl Drop for QuicSplit {
    fn drop(&mut self) {
        self.edge.close();
    }
}

/// The vision family in `dir` as a split detector: device exit on the cameras, edge exit
/// behind QUIC (or in process with `--in-process`).
pub fn model_detector(
    dir: &std::path::Path,
    threshold: f32,
    link: &LinkArgs,
) -> anyhow::Result<Box<dyn Detector>> {
    let det = raw_model_detector(dir, threshold, link)?;
    if link.no_calibration {
        return Ok(det);
    }
    match flow_traffic::calibration::CiCalibration::load(dir)? {
        None => Ok(det),
        Some(calibration) => {
            tracing::info!(
                knots = calibration.knots.len(),
                "applying the congestion-index calibration"
            );
            Ok(Box::new(flow_traffic::calibration::Calibrated {
                inner: det,
                calibration,
            }))
        }
    }
}

fn raw_model_detector(
    dir: &std::path::Path,
    threshold: f32,
    link: &LinkArgs,
) -> anyhow::Result<Box<dyn Detector>> {
    let load = || {
        VisionFamily::load(dir).with_context(|| {
            format!(
                "loading the vision model {} (train one with `flow-node traffic train`)",
                dir.display()
            )
        })
    };
    if link.in_process {
        return Ok(Box::new(ModelDetector {
            model: load()?,
            threshold,
        }));
    }
    use flow_protocol::transport::Security;
    let (edge_sec, cam_sec, edge_name) = match &link.ca {
        None => (
            Security::InsecureLoopback,
            Security::InsecureLoopback,
            "edge".to_string(),
        ),
        Some(ca) => {
            let need = |p: &Option<PathBuf>, flag: &str| {
                p.clone()
                    .with_context(|| format!("--ca needs {flag} as well"))
            };
            let edge_cert = need(&link.edge_cert, "--edge-cert")?;
            let name = edge_cert
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "edge".into());
            (
                Security::Mtls {
                    ca: ca.clone(),
                    cert: edge_cert,
                    key: need(&link.edge_key, "--edge-key")?,
                },
                Security::Mtls {
                    ca: ca.clone(),
                    cert: need(&link.camera_cert, "--camera-cert")?,
                    key: need(&link.camera_key, "--camera-key")?,
                },
                name,
            )
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("traffic-edge")
        .enable_all()
        .build()?;
    let bind = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let edge = rt
        .block_on(EdgeService::start(
            std::sync::Arc::new(load()?),
            edge_sec,
            bind,
            &edge_name,
        ))
        .context("starting the traffic edge service")?;
    let cameras = RemoteDetector::connect(
        rt.handle().clone(),
        load()?,
        threshold,
        cam_sec,
        edge.addr(),
        &edge_name,
        "cameras",
    )
    .context("connecting the cameras to the edge")?;
    Ok(Box::new(QuicSplit {
        cameras,
        edge,
        _rt: rt,
    }))
}

/// One table row per run.
/// Per emergency vehicle: times relative to coming into the camera's view (seconds).
pub fn print_passages(r: &RunReport) {
    println!(
        "\n{} / {}: emergency vehicles (t = SUMO time entering the view; other times relative to it)",
        r.controller, r.condition
    );
    println!(
        "{:<8} {:<6} {:>8} {:>10} {:>9} {:>9} {:>9} {:>8} {:>10} {:>9} {:>7}",
        "id",
        "from",
        "t view",
        "stop pre",
        "detect",
        "at m",
        "green",
        "cross",
        "stop view",
        "missed",
        "travel"
    );
    let rel = |x: Option<f64>, base: Option<f64>| match (x, base) {
        (Some(x), Some(b)) => format!("{:+.0}", x - b),
        _ => "-".into(),
    };
    for p in &r.emergency_passages {
        println!(
            "{:<8} {:<6} {:>8} {:>10.0} {:>9} {:>9} {:>9} {:>8} {:>10.0} {:>9} {:>7}",
            p.id,
            p.approach,
            p.in_view_s.map_or("-".into(), |t| format!("{t:.0}")),
            p.stopped_before_view_s,
            rel(p.detected_s, p.in_view_s),
            p.detected_along_m.map_or("-".into(), |m| format!("{m:.1}")),
            rel(p.green_s, p.in_view_s),
            rel(p.crossed_s, p.in_view_s),
            p.stopped_in_view_s,
            p.missed_frames_in_view,
            rel(p.crossed_s, Some(p.on_approach_s)),
        );
    }
}

/// One line per run: mean seconds of each part of the emergency vehicles' approach.
pub fn print_passage_summary(reports: &[RunReport]) {
    use sumo::mean_gap;
    println!(
        "{:<9} {:<10} {:>13} {:>10} {:>13} {:>11} {:>12} {:>12} {:>13}",
        "control",
        "condition",
        "to view s",
        "stop pre s",
        "view→det s",
        "det at m",
        "view→green s",
        "view→cross s",
        "stop in view s"
    );
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
    for r in reports {
        let ps = &r.emergency_passages;
        let n = ps.len().max(1) as f64;
        let along: Vec<f64> = ps.iter().filter_map(|p| p.detected_along_m).collect();
        println!(
            "{:<9} {:<10} {:>13} {:>10.1} {:>13} {:>11} {:>12} {:>12} {:>13.1}",
            r.controller,
            r.condition,
            f(mean_gap(ps, |p| Some(p.on_approach_s), |p| p.in_view_s)),
            ps.iter().map(|p| p.stopped_before_view_s).sum::<f64>() / n,
            f(mean_gap(ps, |p| p.in_view_s, |p| p.detected_s)),
            f((!along.is_empty()).then(|| along.iter().sum::<f64>() / along.len() as f64)),
            f(mean_gap(ps, |p| p.in_view_s, |p| p.green_s)),
            f(mean_gap(ps, |p| p.in_view_s, |p| p.crossed_s)),
            ps.iter().map(|p| p.stopped_in_view_s).sum::<f64>() / n,
        );
    }
}

/// Congestion-index error per band of the true index, per run: bias (signed mean) / MAE
/// and the share of frames in the band.
pub fn print_ci_bands(reports: &[RunReport]) {
    use flow_traffic::sumo::CI_BAND_EDGES;
    print!("{:<9} {:<10}", "ctrl", "condition");
    for (i, lo) in CI_BAND_EDGES.iter().enumerate() {
        let band = match CI_BAND_EDGES.get(i + 1) {
            Some(hi) => format!("CI {lo:.2}-{hi:.2}"),
            None => format!("CI >= {lo:.2}"),
        };
        print!(" {band:>21}");
    }
    println!();
    for r in reports {
        print!("{:<9} {:<10}", r.controller, r.condition);
        let n = r.detection.frames.max(1) as f64;
        for b in &r.detection.ci_bands {
            print!(
                " {:>+7.3} {:>5.3} {:>5.1}%",
                b.bias(),
                b.mae(),
                100.0 * b.frames as f64 / n
            );
        }
        println!();
    }
}

pub fn print_reports(reports: &[RunReport]) {
    println!(
        "{:<9} {:<10} {:<10} {:>8} {:>9} {:>9} {:>4} {:>9} {:>9} {:>8} {:>7} {:>7} {:>7}",
        "control",
        "detector",
        "condition",
        "vehicles",
        "wait s",
        "travel s",
        "EVs",
        "EV trav s",
        "EV wait s",
        "EV recl",
        "false",
        "CI MAE",
        "CI bias"
    );
    for r in reports {
        println!(
            "{:<9} {:<10} {:<10} {:>8} {:>9.1} {:>9.1} {:>4} {:>9.1} {:>9.1} {:>8.3} {:>7.4} {:>7.3} {:>+7.3}",
            r.controller,
            r.detector,
            r.condition,
            r.vehicles,
            r.mean_waiting_s,
            r.mean_travel_s,
            r.emergency_vehicles,
            r.emergency_mean_travel_s,
            r.emergency_mean_waiting_s,
            r.detection.recall(),
            r.detection.false_alarm_rate(),
            r.detection.congestion_mae(),
            r.detection.congestion_bias(),
        );
    }
}

#[derive(clap::Args, Debug)]
#[command(before_long_help = "\
Write a labelled dataset of rendered top-down camera frames.

Each frame shows one approach (two lanes, 51.2 m) with random queues of cars, buses, trucks
and sometimes an emergency vehicle, under a random condition preset with jittered strength.
labels.jsonl holds per frame: count and occupancy per lane, the congestion index,
whether an emergency vehicle is in view and in which lane, and the condition.

Example:
  flow-node traffic dataset --out /tmp/frames --samples 200 --conditions fog,night")]
pub struct DatasetArgs {
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 200)]
    pub samples: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Comma-separated condition presets (default: all).
    #[arg(long, value_delimiter = ',', value_parser = parse_condition)]
    pub conditions: Vec<String>,
    /// Share of frames with an emergency vehicle.
    #[arg(long, default_value_t = 0.4)]
    pub emergency_rate: f32,
}

fn write_dataset(a: DatasetArgs) -> anyhow::Result<()> {
    let mut spec = DatasetSpec {
        camera: Camera::default(),
        samples: a.samples,
        seed: a.seed,
        emergency_rate: a.emergency_rate.clamp(0.0, 1.0),
        ..DatasetSpec::default()
    };
    if !a.conditions.is_empty() {
        spec.conditions = a.conditions.clone();
    }
    let samples = dataset::generate(&spec)?;
    dataset::write(&a.out, &samples)?;
    let evs = samples.iter().filter(|s| s.labels.emergency).count();
    println!(
        "wrote {} frames ({} with an emergency vehicle) and labels.jsonl to {}",
        samples.len(),
        evs,
        a.out.display()
    );
    Ok(())
}
