//! The soak's plots: one line per node over time (RSS, sessions, KV bytes), broken where a
//! node was down or restarted, with the faults as thin vertical lines.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::plots::{
    draw_events, draw_legend, e2s, ensure_font, linear_chart, nice_max, write_png, write_svg, Axes,
    DrawResult,
};
use crate::error::{Error, Result};

/// Runs of (seconds, value) per node; a node's runs are drawn as separate lines.
pub(crate) type NodeSeries = BTreeMap<String, Vec<Vec<(f64, f64)>>>;

/// One plot of per-node series.
pub(crate) struct NodePlot<'a> {
    /// File stem (`rss`, `sessions`, ...).
    pub stem: &'a str,
    /// Title.
    pub caption: &'a str,
    /// Y axis description.
    pub y_desc: &'a str,
    /// The lines.
    pub series: NodeSeries,
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    p: &NodePlot<'_>,
    events: &[(f64, String)],
) -> DrawResult {
    let points = || p.series.values().flatten().flatten();
    let xmin = points().map(|q| q.0).fold(0.0f64, f64::min);
    let xmax = nice_max(points().map(|q| q.0).fold(0.0f64, f64::max));
    let ymax = nice_max(points().map(|q| q.1).fold(0.0f64, f64::max));
    let mut chart = linear_chart(
        root,
        Axes {
            caption: p.caption,
            x_desc: "time (s since the load started)",
            y_desc: p.y_desc,
            x: xmin..xmax,
            y: 0.0..ymax,
            y_label_area: 80,
        },
    )?;
    draw_events(&mut chart, events, ymax)?;
    for (i, (node, runs)) in p.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        for (k, run) in runs.iter().enumerate() {
            let s = chart
                .draw_series(LineSeries::new(run.iter().copied(), color.stroke_width(2)))
                .map_err(e2s)?;
            if k == 0 {
                s.label(node.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
        }
    }
    draw_legend(&mut chart, SeriesLabelPosition::LowerRight)
}

/// Write each plot as PNG and SVG into `dir`; returns the paths.
pub(crate) fn write_node_plots(
    dir: &Path,
    plots: &[NodePlot<'_>],
    events: &[(f64, String)],
) -> Result<Vec<PathBuf>> {
    ensure_font().map_err(|reason| Error::Plot {
        path: dir.to_path_buf(),
        reason,
    })?;
    let mut out = Vec::new();
    for p in plots {
        let png = dir.join(format!("{}.png", p.stem));
        write_png(&png, |a| draw(a, p, events))?;
        let svg = dir.join(format!("{}.svg", p.stem));
        write_svg(&svg, |a| draw(a, p, events))?;
        out.push(png);
        out.push(svg);
    }
    Ok(out)
}
