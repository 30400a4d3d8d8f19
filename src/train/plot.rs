//! `loss.png` in the output directory, redrawn after every epoch: total, [CLS] and patch loss
//! per epoch (from `log.txt`) over the total loss per iteration (smoothed, this run's
//! iterations), and below it the schedules so far — learning rate, weight decay, teacher
//! momentum and teacher temperatures — each in its own panel.
//!
//! Drawn with `plotters` into memory and written atomically as PNG with `image`. Text needs a
//! TrueType font, which plotters does not bundle: the first of a few usual system fonts
//! (DejaVu Sans, Liberation Sans, …; `bash scripts/bootstrap.sh` installs DejaVu when run as
//! root) is used, and without one the curves are drawn with no labels.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a system font once; false when there is none.
fn font_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        FONT_PATHS.iter().any(|p| match std::fs::read(p) {
            // The font lives for the whole process (plotters keeps a 'static reference).
            Ok(bytes) => plotters::style::register_font(
                "sans-serif",
                FontStyle::Normal,
                Box::leak(bytes.into_boxed_slice()),
            )
            .is_ok(),
            Err(_) => false,
        })
    })
}

/// One point per epoch.
#[derive(Debug, Clone, Copy)]
pub struct EpochLoss {
    pub epoch: f64,
    pub loss: f64,
    pub cls: f64,
    pub patch: f64,
}

/// Reads the per-epoch losses of an official-format `log.txt` (lines that do not parse or lack
/// the keys are skipped).
pub fn read_log(path: &Path) -> Result<Vec<EpochLoss>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
        if let (Some(epoch), Some(loss), Some(cls), Some(patch)) = (
            f("epoch"),
            f("train_loss"),
            f("train_cls"),
            f("train_patch"),
        ) {
            out.push(EpochLoss {
                epoch,
                loss,
                cls,
                patch,
            });
        }
    }
    Ok(out)
}

const W: u32 = 800;
const H: u32 = 480;
/// Height of the schedule panels under the loss chart.
const H_SCHED: u32 = 300;

/// Everything `loss.png` shows.
#[derive(Debug, Default, Clone, Copy)]
pub struct Curves<'a> {
    /// Per-epoch losses (log.txt).
    pub epochs: &'a [EpochLoss],
    /// Total loss per iteration of this run, x in epochs (epoch e's iterations spread over
    /// e - 0.5 .. e + 0.5, so that the epoch's average sits among them).
    pub iters: &'a [(f64, f64)],
    /// Named schedules up to now, x in epochs (at most four panels are drawn).
    pub schedules: &'a [(&'a str, Vec<(f64, f64)>)],
}

/// Draws the per-epoch curves alone and writes `path` (PNG) atomically.
pub fn write_loss_png(points: &[EpochLoss], path: &Path) -> Result<()> {
    write_training_png(
        &Curves {
            epochs: points,
            ..Default::default()
        },
        path,
    )
}

/// Draws `curves` and writes `path` (PNG) atomically.
pub fn write_training_png(curves: &Curves, path: &Path) -> Result<()> {
    let h = if curves.schedules.is_empty() {
        H
    } else {
        H + H_SCHED
    };
    let mut buf = vec![0u8; (W * h * 3) as usize];
    draw(curves, &mut buf, h, font_available())
        .map_err(|e| anyhow!("drawing the loss curve: {e}"))?;
    let img =
        image::RgbImage::from_raw(W, h, buf).context("loss-curve buffer has the wrong size")?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .context("encoding the loss curve")?;
    crate::util::atomic_write(path, &png)
}

/// The y range to draw: the values' range from 0 (or below, for negative values), padded so
/// that a flat curve (e.g. an all-zero run) still gets distinct tick labels.
fn y_range(ys: &[f64]) -> (f64, f64) {
    let (lo, hi) = ys
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let span = hi - lo;
    let scale = lo.abs().max(hi.abs());
    if span <= 1e-12 * scale.max(1.0) {
        // Flat at 0 (or at one value): one unit of the value's own size around it.
        let pad = if scale > 0.0 { scale * 0.5 } else { 1.0 };
        return (lo - if lo < 0.0 { pad } else { 0.0 }, hi + pad);
    }
    (
        if lo < 0.0 { lo - 0.05 * span } else { lo },
        hi + 0.05 * span,
    )
}

/// Width of the legend column on the right of the chart.
const LEGEND_W: u32 = 150;

/// A trailing moving average over about a fiftieth of the points (at least one).
fn smoothed(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let w = (pts.len() / 50).max(1);
    let mut sum = 0.0;
    let mut out = Vec::with_capacity(pts.len());
    for (i, &(x, y)) in pts.iter().enumerate() {
        sum += y;
        if i >= w {
            sum -= pts[i - w].1;
        }
        out.push((x, sum / (i + 1).min(w) as f64));
    }
    out
}

const GREY: RGBColor = RGBColor(150, 150, 150);

fn draw(
    curves: &Curves,
    buf: &mut [u8],
    h: u32,
    text: bool,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let points = curves.epochs;
    let root = BitMapBackend::with_buffer(buf, (W, h)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(H);
    // The legend gets its own column, so it never hides the ends of the curves.
    let (area, legend) = if text {
        top.split_horizontally(W - LEGEND_W)
    } else {
        top.split_horizontally(W)
    };
    let finite_pt = |p: &(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let iters: Vec<(f64, f64)> =
        smoothed(&curves.iter_points().filter(finite_pt).collect::<Vec<_>>());
    let finite = |v: f64| v.is_finite();
    let ys: Vec<f64> = points
        .iter()
        .flat_map(|p| [p.loss, p.cls, p.patch])
        .chain(iters.iter().map(|p| p.1))
        .filter(|v| finite(*v))
        .collect();
    let (ymin, ymax) = y_range(&ys);
    // x from the first to the last epoch, half an epoch of margin: a single epoch is a point in
    // the middle, not on the border.
    let (xlo, xhi) = points
        .iter()
        .map(|p| p.epoch)
        .chain(iters.iter().map(|p| p.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), e| {
            (a.min(e), b.max(e))
        });
    let (xlo, xhi) = if xlo.is_finite() {
        (xlo - 0.5, xhi + 0.5)
    } else {
        (-0.5, 0.5)
    };
    let mut b = ChartBuilder::on(&area);
    b.margin(15);
    if text {
        b.caption("iBOT training loss", ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(60);
    }
    let mut chart = b.build_cartesian_2d(xlo..xhi, ymin..ymax)?;
    let mut mesh = chart.configure_mesh();
    if text {
        // Whole epochs only.
        let n = (xhi - xlo).round().max(1.0) as usize;
        mesh.x_desc("epoch")
            .y_desc("loss")
            .x_labels(n.min(12) + 1)
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-6 {
                    format!("{}", x.round() as i64)
                } else {
                    String::new()
                }
            })
            .label_style(("sans-serif", 14));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    // Per iteration first, underneath the per-epoch curves.
    if !iters.is_empty() {
        chart.draw_series(LineSeries::new(iters.iter().copied(), GREY.stroke_width(1)))?;
    }
    type Series = (&'static str, RGBColor, fn(&EpochLoss) -> f64);
    let series: [Series; 3] = [
        ("train_loss", BLACK, |p| p.loss),
        ("train_cls", BLUE, |p| p.cls),
        ("train_patch", RED, |p| p.patch),
    ];
    for (_, color, get) in series {
        let pts: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.epoch, get(p)))
            .filter(|(_, v)| finite(*v))
            .collect();
        chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
        // Markers: a single epoch is a visible point, not an empty chart.
        chart.draw_series(
            pts.iter()
                .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
        )?;
    }
    if text {
        for (i, (name, color, _)) in series.iter().enumerate() {
            let y = 60 + 26 * i as i32;
            legend.draw(&PathElement::new(
                vec![(8, y), (36, y)],
                color.stroke_width(2),
            ))?;
            legend.draw(&Circle::new((22, y), 4, color.filled()))?;
            legend.draw(&Text::new(
                *name,
                (44, y - 8),
                ("sans-serif", 15).into_font().color(&BLACK),
            ))?;
        }
        if !iters.is_empty() {
            let y = 60 + 26 * 3;
            legend.draw(&PathElement::new(
                vec![(8, y), (36, y)],
                GREY.stroke_width(1),
            ))?;
            legend.draw(&Text::new(
                "per iteration",
                (44, y - 8),
                ("sans-serif", 15).into_font().color(&BLACK),
            ))?;
        }
    }
    if !curves.schedules.is_empty() {
        draw_schedules(curves.schedules, &bottom, xlo..xhi, text)?;
    }
    root.present()?;
    Ok(())
}

/// The schedules, each in its own small panel (their scales differ by orders of magnitude).
fn draw_schedules<DB: DrawingBackend>(
    schedules: &[(&str, Vec<(f64, f64)>)],
    area: &DrawingArea<DB, plotters::coord::Shift>,
    xs: std::ops::Range<f64>,
    text: bool,
) -> std::result::Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let panels = area.split_evenly((2, 2));
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for ((panel, (name, pts)), color) in panels.iter().zip(schedules).zip(colors) {
        let pts: Vec<(f64, f64)> = pts
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        let (lo, hi) = pts
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                (a.min(p.1), b.max(p.1))
            });
        let (lo, hi) = if !lo.is_finite() {
            (0.0, 1.0)
        } else if hi - lo <= 1e-12 * hi.abs().max(1e-12) {
            let pad = hi.abs().max(1e-6) * 0.1;
            (lo - pad, hi + pad)
        } else {
            (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        };
        let mut b = ChartBuilder::on(panel);
        b.margin(8);
        if text {
            b.caption(*name, ("sans-serif", 15))
                .x_label_area_size(22)
                .y_label_area_size(62);
        }
        let mut chart = b.build_cartesian_2d(xs.clone(), lo..hi)?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_labels(6)
                .y_labels(4)
                .y_label_formatter(&|v| format!("{v:.3e}"))
                .label_style(("sans-serif", 11));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw()?;
        chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
        if pts.len() == 1 {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    Ok(())
}

impl Curves<'_> {
    fn iter_points(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.iters.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::y_range;

    #[test]
    fn flat_ranges_are_padded() {
        assert_eq!(y_range(&[0.0, 0.0]), (0.0, 1.0));
        let (lo, hi) = y_range(&[5.0, 5.0]);
        assert!(lo == 0.0 && hi > 5.0, "{lo} {hi}");
        assert_eq!(y_range(&[]), (0.0, 1.0));
    }
}
