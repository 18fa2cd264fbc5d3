//! `--plot FILE.svg`: throughput (top) and p99 latency (bottom) per second of each measured
//! phase, one line per phase, drawn with plotters' SVG backend (no fonts or bitmaps needed).

use std::path::Path;

use plotters::prelude::*;

use super::{BenchError, Series};

/// Line colours, in series order.
const COLOURS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// Draws `series` to `path` under `title`; `unit` names what is counted per second.
pub fn draw(path: &Path, title: &str, unit: &str, series: &[Series]) -> Result<(), BenchError> {
    let fail = |e: String| BenchError::io(path, std::io::Error::other(e));
    let root = SVGBackend::new(path, (900, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| fail(e.to_string()))?;
    let (top, bottom) = root.split_vertically(340);
    let t_max = series
        .iter()
        .flat_map(|s| s.points.last())
        .map(|p| p.t + 1.0)
        .fold(1.0, f64::max);
    let max_of = |f: fn(&super::Point) -> f64| {
        series
            .iter()
            .flat_map(|s| s.points.iter().map(f))
            .fold(1.0, f64::max)
            * 1.1
    };
    for (area, y_label, y_max, value) in [
        (
            &top,
            format!("{unit}/s"),
            max_of(|p| p.per_second),
            (|p: &super::Point| p.per_second) as fn(&super::Point) -> f64,
        ),
        (
            &bottom,
            "p99 latency, ms".to_string(),
            max_of(|p| p.p99_ms),
            |p: &super::Point| p.p99_ms,
        ),
    ] {
        let mut chart = ChartBuilder::on(area)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(y_label)
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        for (i, s) in series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().map(|p| (p.t, value(p))),
                    colour.stroke_width(2),
                ))
                .map_err(|e| fail(e.to_string()))?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| fail(e.to_string()))?;
    }
    root.present().map_err(|e| fail(e.to_string()))
}
