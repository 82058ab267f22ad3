//! Plots of a run, drawn with plotters into PNG (via the `png` crate) and SVG.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::{completed_ms, ReportInput};
use crate::error::{Error, Result};
use crate::loadgen::Outcome;

/// File stems of the plots, in the order they are written.
pub(crate) const STEMS: [&str; 5] = [
    "latency_cdf",
    "latency_timeseries",
    "throughput",
    "tiers",
    "link_bytes",
];

const SIZE: (u32, u32) = (1024, 640);
pub(crate) const FONT: &str = "sans-serif";
/// DejaVu Sans Mono (Bitstream Vera license, see `assets/`), embedded so PNG text renders
/// on hosts and images without system fonts.
static FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");

pub(crate) fn ensure_font() -> std::result::Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    ok.then_some(())
        .ok_or_else(|| "the embedded font could not be loaded".to_string())
}

pub(crate) type DrawResult = std::result::Result<(), String>;

/// A chart's axes: title, axis descriptions, ranges and the width of the y labels.
pub(crate) struct Axes<'t> {
    pub(crate) caption: &'t str,
    pub(crate) x_desc: &'t str,
    pub(crate) y_desc: &'t str,
    pub(crate) x: std::ops::Range<f64>,
    pub(crate) y: std::ops::Range<f64>,
    pub(crate) y_label_area: u32,
}

pub(crate) type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The chart's legend box, in the report's style.
pub(crate) fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> DrawResult {
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e2s)
}

/// A linear chart with the report's fonts, margins and tick labels, its mesh drawn.
pub(crate) fn linear_chart<'a, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, Shift>,
    axes: Axes<'_>,
) -> std::result::Result<Chart<'a, DB>, String> {
    let mut chart = ChartBuilder::on(root)
        .caption(axes.caption, (FONT, 26))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(axes.y_label_area)
        .build_cartesian_2d(axes.x, axes.y)
        .map_err(e2s)?;
    chart
        .configure_mesh()
        .x_desc(axes.x_desc)
        .y_desc(axes.y_desc)
        .axis_desc_style((FONT, 18))
        .label_style((FONT, 15))
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .draw()
        .map_err(e2s)?;
    Ok(chart)
}

pub(crate) fn e2s<E: std::fmt::Debug>(e: E) -> String {
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
    /// Answered requests per second by the tier that answered, and escalated / degraded
    /// answers per second (same bins, by completion time).
    tier_bins: std::collections::BTreeMap<String, Vec<f64>>,
    escalated_bins: Vec<f64>,
    degraded_bins: Vec<f64>,
    /// (link, kB towards the parent, kB back) delivered by the shapers.
    link_kb: Vec<(String, f64, f64)>,
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
        let mut tier_bins: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        let (mut escalated_bins, mut degraded_bins) = (vec![0.0; nbins], vec![0.0; nbins]);
        for r in recs {
            match &r.outcome {
                Outcome::Answered => {
                    sent_bins[bin(r.sent_ms.unwrap_or(r.scheduled_ms))] += 1.0;
                    let b = bin(completed_ms(r).unwrap_or(r.scheduled_ms));
                    answered_bins[b] += 1.0;
                    let tier = r.tier.clone().unwrap_or_else(|| "unknown".into());
                    tier_bins.entry(tier).or_insert_with(|| vec![0.0; nbins])[b] += 1.0;
                    escalated_bins[b] += f64::from(u8::from(r.escalated));
                    degraded_bins[b] += f64::from(u8::from(r.degraded));
                }
                Outcome::Error(_) => {
                    sent_bins[bin(r.sent_ms.unwrap_or(r.scheduled_ms))] += 1.0;
                    failed_bins[bin(completed_ms(r).unwrap_or(r.scheduled_ms))] += 1.0;
                }
                Outcome::Shed => failed_bins[bin(r.scheduled_ms)] += 1.0,
            }
        }
        for b in [
            &mut sent_bins,
            &mut answered_bins,
            &mut failed_bins,
            &mut escalated_bins,
            &mut degraded_bins,
        ]
        .into_iter()
        .chain(tier_bins.values_mut())
        {
            for v in b.iter_mut() {
                *v /= bin_s;
            }
        }
        let link_kb = input
            .links
            .iter()
            .map(|l| {
                (
                    l.name.clone(),
                    l.stats.up.bytes_out as f64 / 1e3,
                    l.stats.down.bytes_out as f64 / 1e3,
                )
            })
            .collect();
        Self {
            latency,
            ttft,
            answered_points,
            error_times,
            bin_s,
            sent_bins,
            answered_bins,
            failed_bins,
            tier_bins,
            escalated_bins,
            degraded_bins,
            link_kb,
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

pub(crate) fn nice_max(v: f64) -> f64 {
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
    let mut chart = linear_chart(
        root,
        Axes {
            caption: "Latency CDF (answered requests)",
            x_desc: "latency (ms)",
            y_desc: "fraction of requests",
            x: 0.0..xmax,
            y: 0.0..1.0,
            y_label_area: 70,
        },
    )?;
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
    draw_legend(&mut chart, SeriesLabelPosition::LowerRight)
}

/// Most fault events that get a text label; with more (a soak's repeated cycles) only the
/// lines are drawn, fainter, so the data stays readable.
const MAX_EVENT_LABELS: usize = 12;

/// The scenario's events as vertical lines (labelled when there are few).
pub(crate) fn draw_events<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    events: &[(f64, String)],
    ymax: f64,
) -> DrawResult {
    let labelled = events.len() <= MAX_EVENT_LABELS;
    for (i, (at, label)) in events.iter().enumerate() {
        let color = RED.mix(if labelled { 0.7 } else { 0.25 });
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(*at, 0.0), (*at, ymax)],
                color.stroke_width(1),
            )))
            .map_err(e2s)?;
        if !labelled {
            continue;
        }
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
    let mut chart = linear_chart(
        root,
        Axes {
            caption: "Latency over time",
            x_desc: "send time (s since start)",
            y_desc: "latency (ms)",
            x: 0.0..d.span_s * 1.02,
            y: 0.0..ymax,
            y_label_area: 80,
        },
    )?;
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
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)
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
    let caption = format!("Throughput ({} s bins)", d.bin_s);
    let mut chart = linear_chart(
        root,
        Axes {
            caption: &caption,
            x_desc: "time (s since start)",
            y_desc: "requests per second",
            x: 0.0..d.span_s * 1.02,
            y: 0.0..ymax,
            y_label_area: 70,
        },
    )?;
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
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)
}

fn tier_color(tier: &str) -> RGBColor {
    match tier {
        "device" => BLUE,
        "edge" => GREEN,
        "cloud" => MAGENTA,
        _ => BLACK,
    }
}

/// Answers per second by tier, escalated and degraded answers per second, over time.
fn draw_tiers<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, d: &PlotData) -> DrawResult {
    let peak = d
        .tier_bins
        .values()
        .flatten()
        .chain(&d.escalated_bins)
        .chain(&d.degraded_bins)
        .copied()
        .fold(0.0, f64::max);
    let ymax = nice_max(peak);
    let caption = format!("Answers by tier, escalated, degraded ({} s bins)", d.bin_s);
    let mut chart = linear_chart(
        root,
        Axes {
            caption: &caption,
            x_desc: "time (s since start, by completion)",
            y_desc: "answers per second",
            x: 0.0..d.span_s * 1.02,
            y: 0.0..ymax,
            y_label_area: 70,
        },
    )?;
    let pts = |v: &[f64]| {
        v.iter()
            .enumerate()
            .map(|(i, &y)| (i as f64 * d.bin_s, y))
            .collect::<Vec<_>>()
    };
    for (tier, bins) in &d.tier_bins {
        let c = tier_color(tier);
        chart
            .draw_series(LineSeries::new(pts(bins), c.stroke_width(2)))
            .map_err(e2s)?
            .label(format!("answered by {tier}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    let grey = RGBColor(120, 120, 120);
    chart
        .draw_series(LineSeries::new(
            pts(&d.escalated_bins),
            grey.stroke_width(1),
        ))
        .map_err(e2s)?
        .label("escalated")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(1)));
    chart
        .draw_series(LineSeries::new(pts(&d.degraded_bins), RED.stroke_width(2)))
        .map_err(e2s)?
        .label("degraded")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    draw_events(&mut chart, &d.events, ymax)?;
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// Bytes each emulated link delivered, per direction (log scale: hidden states up, token
/// ids down differ by orders of magnitude).
fn draw_link_bytes<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, d: &PlotData) -> DrawResult {
    let n = d.link_kb.len().max(1);
    let peak = d
        .link_kb
        .iter()
        .flat_map(|(_, u, dn)| [*u, *dn])
        .fold(1.0, f64::max);
    let names: Vec<String> = d.link_kb.iter().map(|l| l.0.clone()).collect();
    let label = move |x: &f64| {
        let i = x.floor();
        if (x - i - 0.5).abs() < 1e-6 {
            names.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let mut chart = ChartBuilder::on(root)
        .caption("Bytes per link (delivered by the shaper)", (FONT, 24))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..n as f64, (0.1..peak * 2.0).log_scale())
        .map_err(e2s)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(2 * n + 1)
        .x_label_formatter(&label)
        .y_desc("kB (log scale)")
        .axis_desc_style((FONT, 18))
        .label_style((FONT, 14))
        .y_label_formatter(&tick)
        .draw()
        .map_err(e2s)?;
    let bars = |up: bool| {
        d.link_kb.iter().enumerate().map(move |(i, (_, u, dn))| {
            let (x0, v, c) = if up {
                (i as f64 + 0.1, *u, BLUE)
            } else {
                (i as f64 + 0.5, *dn, GREEN)
            };
            Rectangle::new([(x0, 0.1), (x0 + 0.4, v.max(0.1))], c.mix(0.6).filled())
        })
    };
    chart
        .draw_series(bars(true))
        .map_err(e2s)?
        .label("towards the parent")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], BLUE.mix(0.6).filled()));
    chart
        .draw_series(bars(false))
        .map_err(e2s)?
        .label("back to the child")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], GREEN.mix(0.6).filled()));
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)
}

pub(crate) fn write_png(
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

pub(crate) fn write_svg(
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
    both!(STEMS[3], draw_tiers);
    both!(STEMS[4], draw_link_bytes);
    Ok(out)
}
