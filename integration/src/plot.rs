//! The benches' scale curves as an SVG: panels side by side, one line per store, sizes
//! on a log axis. No font files are read: the SVG names a font family for the viewer.

use std::path::Path;

use plotters::prelude::*;

/// One panel: a title, the y axis's unit, and one named line of (size, value) points
/// per store.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Drawn above the panel.
    pub title: String,
    /// The y axis's description.
    pub unit: String,
    /// (store, points), drawn in this order and colour.
    pub lines: Vec<(String, Vec<(f64, f64)>)>,
}

/// A figure of one store at one size, for [`per_store`]: `(figures, size)` to a value
/// (NaN: no point).
pub type Metric<R> = fn(&R, f64) -> f64;

/// One panel per `(title, unit, metric)`, one line per store: `rows[i][j]` holds store
/// `j`'s figures at `sizes[i]`.
pub fn per_store<R, A: AsRef<[R]>>(
    specs: &[(&str, &str, Metric<R>)],
    stores: &[&str],
    sizes: &[usize],
    rows: &[A],
) -> Vec<Panel> {
    specs
        .iter()
        .map(|&(title, unit, metric)| Panel {
            title: title.to_owned(),
            unit: unit.to_owned(),
            lines: stores
                .iter()
                .enumerate()
                .map(|(j, store)| {
                    let points = sizes
                        .iter()
                        .zip(rows)
                        .map(|(&n, row)| (n as f64, metric(&row.as_ref()[j], n as f64)))
                        .collect();
                    (store.to_string(), points)
                })
                .collect(),
        })
        .collect()
}

/// Draws `panels` side by side into `path`, sizes (`x_desc`) on a log axis from the
/// smallest size / 1.5 to the largest × 1.5. Refuses panels with no positive finite
/// size (plotters would loop on an empty log range).
pub fn svg(path: &Path, x_desc: &str, panels: &[Panel]) -> Result<(), Box<dyn std::error::Error>> {
    let colors = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    let root = SVGBackend::new(path, (350 * panels.len() as u32, 380)).into_drawing_area();
    root.fill(&WHITE)?;
    let xs = || {
        panels
            .iter()
            .flat_map(|p| &p.lines)
            .flat_map(|l| &l.1)
            .map(|p| p.0)
            .filter(|x| x.is_finite() && *x > 0.0)
    };
    if xs().next().is_none() {
        return Err("nothing to plot: no positive finite size".into());
    }
    let (x0, x1) = (
        xs().fold(f64::INFINITY, f64::min) / 1.5,
        xs().fold(0.0, f64::max) * 1.5,
    );
    for (area, panel) in root.split_evenly((1, panels.len())).iter().zip(panels) {
        let ymax = panel
            .lines
            .iter()
            .flat_map(|l| &l.1)
            .map(|p| p.1)
            .filter(|y| y.is_finite())
            .fold(0.0, f64::max)
            .max(f64::MIN_POSITIVE)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(52)
            .build_cartesian_2d((x0..x1).log_scale(), 0.0..ymax)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(&panel.unit)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()?;
        for ((name, line), color) in panel.lines.iter().zip(colors.iter().cycle()) {
            let color = *color;
            let line: Vec<(f64, f64)> = line.iter().copied().filter(|p| p.1.is_finite()).collect();
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            chart.draw_series(line.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
