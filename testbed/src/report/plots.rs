//! Plots of a run, drawn with plotters into PNG (via the `png` crate) and SVG.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{completed_ms, ReportInput};
use crate::error::{Error, Result};
use crate::loadgen::Outcome;

/// File stems of the plots, in the order they are written.
pub(crate) const STEMS: [&str; 3] = ["latency_cdf", "latency_timeseries", "throughput"];

const SIZE: (u32, u32) = (1024, 640);
const FONT: &str = "sans-serif";
/// DejaVu Sans Mono (Bitstream Vera license, see `assets/`), embedded so PNG text renders
/// on hosts and images without system fonts.
static FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");

fn ensure_font() -> std::result::Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    ok.then_some(())
        .ok_or_else(|| "the embedded font could not be loaded".to_string())
}

type DrawResult = std::result::Result<(), String>;

fn e2s<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

/// The series the plots are made of, prepared once for both backends.
struct PlotData {
    /// Sorted latencies (ms) of answered requests.
    latency: Vec<f64>,
    /// Sorted TTFTs (ms).
    ttft: Vec<f64>,
    /// (send time s, latency ms) of answered requests.
    answered_points: Vec<(f64, f64)>,
    /// (send time s) of errored requests.
    error_times: Vec<f64>,
    /// Bin width (s) and per-bin counts: sent, answered (by completion), errored + shed.
    bin_s: f64,
    sent_bins: Vec<f64>,
    answered_bins: Vec<f64>,
    failed_bins: Vec<f64>,
    /// Scenario events (s, label).
    events: Vec<(f64, String)>,
    span_s: f64,
}

impl PlotData {
    fn new(input: &ReportInput) -> Self {
        let recs = &input.records;
        let mut latency: Vec<f64> = Vec::new();
        let mut ttft: Vec<f64> = Vec::new();
        let mut answered_points = Vec::new();
        let mut error_times = Vec::new();
        let mut span_ms: f64 = 0.0;
        for r in recs {
            span_ms = span_ms.max(completed_ms(r).unwrap_or(r.scheduled_ms));
            let sent = r.sent_ms.unwrap_or(r.scheduled_ms) / 1000.0;
            match &r.outcome {
                Outcome::Answered => {
                    if let Some(l) = r.latency_ms {
                        latency.push(l);
                        answered_points.push((sent, l));
                    }
                    ttft.extend(r.ttft_ms);
                }
                Outcome::Error(_) | Outcome::Shed => error_times.push(sent),
            }
        }
        latency.sort_by(f64::total_cmp);
        ttft.sort_by(f64::total_cmp);
        let events: Vec<(f64, String)> = input
            .scenario
            .iter()
            .flat_map(|s| s.events.iter())
            .map(|e| {
                (
                    e.at.as_secs_f64(),
                    format!("{} {}", super::action_name(&e.action).0, e.target),
                )
            })
            .collect();
        let span_s = (span_ms / 1000.0)
            .max(events.iter().map(|e| e.0).fold(0.0, f64::max))
            .max(1.0);
        let bin_s = (span_s / 120.0).ceil().max(1.0);
        let nbins = (span_s / bin_s).ceil() as usize + 1;
        let (mut sent_bins, mut answered_bins, mut failed_bins) =
            (vec![0.0; nbins], vec![0.0; nbins], vec![0.0; nbins]);
        let bin = |ms: f64| ((ms / 1000.0 / bin_s) as usize).min(nbins - 1);
        for r in recs {
            match &r.outcome {
                Outcome::Answered => {
                    sent_bins[bin(r.sent_ms.unwrap_or(r.scheduled_ms))] += 1.0;
                    answered_bins[bin(completed_ms(r).unwrap_or(r.scheduled_ms))] += 1.0;
                }
                Outcome::Error(_) => {
                    sent_bins[bin(r.sent_ms.unwrap_or(r.scheduled_ms))] += 1.0;
                    failed_bins[bin(completed_ms(r).unwrap_or(r.scheduled_ms))] += 1.0;
                }
                Outcome::Shed => failed_bins[bin(r.scheduled_ms)] += 1.0,
            }
        }
        for b in [&mut sent_bins, &mut answered_bins, &mut failed_bins] {
            for v in b.iter_mut() {
                *v /= bin_s;
            }
        }
        Self {
            latency,
            ttft,
            answered_points,
            error_times,
            bin_s,
            sent_bins,
            answered_bins,
            failed_bins,
            events,
            span_s,
        }
    }
}

/// Tick labels without trailing ".0" on large values (the monospace "." is wide).
fn tick(v: &f64) -> String {
    if v.abs() >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn cdf_points(sorted: &[f64]) -> Vec<(f64, f64)> {
    let n = sorted.len() as f64;
    sorted
        .iter()
        .enumerate()
        .map(|(i, &v)| (v, (i + 1) as f64 / n))
        .collect()
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        1.0
    } else {
        v * 1.05
    }
}

fn draw_cdf<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, d: &PlotData) -> DrawResult {
    let xmax = nice_max(
        d.latency
            .last()
            .copied()
            .unwrap_or(0.0)
            .max(d.ttft.last().copied().unwrap_or(0.0)),
    );
    let mut chart = ChartBuilder::on(root)
        .caption("Latency CDF (answered requests)", (FONT, 26))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..xmax, 0.0..1.0)
        .map_err(e2s)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms)")
        .y_desc("fraction of requests")
        .axis_desc_style((FONT, 18))
        .label_style((FONT, 15))
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .draw()
        .map_err(e2s)?;
    chart
        .draw_series(LineSeries::new(
            cdf_points(&d.latency),
            BLUE.stroke_width(2),
        ))
        .map_err(e2s)?
        .label(format!("end-to-end latency (n = {})", d.latency.len()))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if !d.ttft.is_empty() {
        chart
            .draw_series(LineSeries::new(cdf_points(&d.ttft), GREEN.stroke_width(2)))
            .map_err(e2s)?
            .label(format!("time to first token (n = {})", d.ttft.len()))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e2s)
}

fn draw_events<DB: DrawingBackend>(
    chart: &mut ChartContext<
        '_,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    events: &[(f64, String)],
    ymax: f64,
) -> DrawResult {
    for (i, (at, label)) in events.iter().enumerate() {
        let color = RED.mix(0.7);
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(*at, 0.0), (*at, ymax)],
                color.stroke_width(1),
            )))
            .map_err(e2s)?;
        // stagger labels so events close in time stay readable
        let y = ymax * (0.97 - 0.06 * (i % 4) as f64);
        chart
            .draw_series(std::iter::once(Text::new(
                format!(" {label}"),
                (*at, y),
                (FONT, 14).into_font().color(&RED),
            )))
            .map_err(e2s)?;
    }
    Ok(())
}

fn draw_timeseries<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, d: &PlotData) -> DrawResult {
    let ymax = nice_max(d.answered_points.iter().map(|p| p.1).fold(0.0, f64::max));
    let mut chart = ChartBuilder::on(root)
        .caption("Latency over time", (FONT, 26))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..d.span_s * 1.02, 0.0..ymax)
        .map_err(e2s)?;
    chart
        .configure_mesh()
        .x_desc("send time (s since start)")
        .y_desc("latency (ms)")
        .axis_desc_style((FONT, 18))
        .label_style((FONT, 15))
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .draw()
        .map_err(e2s)?;
    chart
        .draw_series(
            d.answered_points
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 2, BLUE.filled())),
        )
        .map_err(e2s)?
        .label(format!("answered (n = {})", d.answered_points.len()))
        .legend(|(x, y)| Circle::new((x + 10, y), 3, BLUE.filled()));
    if !d.error_times.is_empty() {
        chart
            .draw_series(
                d.error_times
                    .iter()
                    .map(|&x| Cross::new((x, ymax * 0.02), 4, RED.stroke_width(2))),
            )
            .map_err(e2s)?
            .label(format!("error or shed (n = {})", d.error_times.len()))
            .legend(|(x, y)| Cross::new((x + 10, y), 4, RED.stroke_width(2)));
    }
    draw_events(&mut chart, &d.events, ymax)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e2s)
}

fn draw_throughput<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, d: &PlotData) -> DrawResult {
    let peak = d
        .sent_bins
        .iter()
        .chain(&d.answered_bins)
        .chain(&d.failed_bins)
        .copied()
        .fold(0.0, f64::max);
    let ymax = nice_max(peak);
    let mut chart = ChartBuilder::on(root)
        .caption(format!("Throughput ({} s bins)", d.bin_s), (FONT, 26))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..d.span_s * 1.02, 0.0..ymax)
        .map_err(e2s)?;
    chart
        .configure_mesh()
        .x_desc("time (s since start)")
        .y_desc("requests per second")
        .axis_desc_style((FONT, 18))
        .label_style((FONT, 15))
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .draw()
        .map_err(e2s)?;
    let pts = |v: &[f64]| {
        v.iter()
            .enumerate()
            .map(|(i, &y)| (i as f64 * d.bin_s, y))
            .collect::<Vec<_>>()
    };
    chart
        .draw_series(
            AreaSeries::new(pts(&d.answered_bins), 0.0, GREEN.mix(0.25))
                .border_style(GREEN.stroke_width(2)),
        )
        .map_err(e2s)?
        .label("answered / s")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], GREEN.mix(0.5).filled()));
    chart
        .draw_series(LineSeries::new(pts(&d.sent_bins), BLUE.stroke_width(2)))
        .map_err(e2s)?
        .label("sent / s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(pts(&d.failed_bins), RED.stroke_width(2)))
        .map_err(e2s)?
        .label("errored + shed / s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    draw_events(&mut chart, &d.events, ymax)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e2s)
}

fn write_png(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> DrawResult,
) -> Result<()> {
    let plot_err = |reason: String| Error::Plot {
        path: path.to_path_buf(),
        reason,
    };
    let (w, h) = SIZE;
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(e2s(e)))?;
        draw(&root).map_err(plot_err)?;
        root.present().map_err(|e| plot_err(e2s(e)))?;
    }
    let file = std::fs::File::create(path).map_err(|e| Error::file("writing", path, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| plot_err(e.to_string()))?;
    writer
        .write_image_data(&buf)
        .map_err(|e| plot_err(e.to_string()))?;
    writer.finish().map_err(|e| plot_err(e.to_string()))
}

fn write_svg(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult,
) -> Result<()> {
    let plot_err = |reason: String| Error::Plot {
        path: path.to_path_buf(),
        reason,
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(e2s(e)))?;
        draw(&root).map_err(plot_err)?;
        root.present().map_err(|e| plot_err(e2s(e)))?;
    }
    std::fs::write(path, svg).map_err(|e| Error::file("writing", path, e))
}

/// Write every plot as PNG and SVG into `dir`; returns the paths.
pub(crate) fn write_all(dir: &Path, input: &ReportInput) -> Result<Vec<PathBuf>> {
    ensure_font().map_err(|reason| Error::Plot {
        path: dir.to_path_buf(),
        reason,
    })?;
    let d = PlotData::new(input);
    let mut out = Vec::new();
    macro_rules! both {
        ($stem:expr, $f:ident) => {{
            let png = dir.join(format!("{}.png", $stem));
            write_png(&png, |a| $f(a, &d))?;
            let svg = dir.join(format!("{}.svg", $stem));
            write_svg(&svg, |a| $f(a, &d))?;
            out.push(png);
            out.push(svg);
        }};
    }
    both!(STEMS[0], draw_cdf);
    both!(STEMS[1], draw_timeseries);
    both!(STEMS[2], draw_throughput);
    Ok(out)
}
