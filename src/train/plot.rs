//! `loss.png` in the output directory: total, [CLS] and patch loss per epoch, redrawn after
//! every epoch from `log.txt`.
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

/// Draws the curves and writes `path` (PNG) atomically.
pub fn write_loss_png(points: &[EpochLoss], path: &Path) -> Result<()> {
    let mut buf = vec![0u8; (W * H * 3) as usize];
    draw(points, &mut buf, font_available()).map_err(|e| anyhow!("drawing the loss curve: {e}"))?;
    let img =
        image::RgbImage::from_raw(W, H, buf).context("loss-curve buffer has the wrong size")?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .context("encoding the loss curve")?;
    crate::util::atomic_write(path, &png)
}

fn draw(
    points: &[EpochLoss],
    buf: &mut [u8],
    text: bool,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(buf, (W, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let finite = |v: f64| v.is_finite();
    let ys: Vec<f64> = points
        .iter()
        .flat_map(|p| [p.loss, p.cls, p.patch])
        .filter(|v| finite(*v))
        .collect();
    let (ymin, ymax) = ys
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let (ymin, ymax) = if ymin.is_finite() {
        (ymin.min(0.0), ymax.max(ymin + 1e-6) * 1.05)
    } else {
        (0.0, 1.0)
    };
    let xmax = points
        .iter()
        .map(|p| p.epoch)
        .fold(0.0f64, f64::max)
        .max(1.0);
    let mut b = ChartBuilder::on(&root);
    b.margin(15);
    if text {
        b.caption("iBOT training loss per epoch", ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(55);
    }
    let mut chart = b.build_cartesian_2d(0f64..xmax, ymin..ymax)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("epoch")
            .y_desc("loss")
            .label_style(("sans-serif", 14));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    let series: [(&str, RGBColor, fn(&EpochLoss) -> f64); 3] = [
        ("train_loss", BLACK, |p| p.loss),
        ("train_cls", BLUE, |p| p.cls),
        ("train_patch", RED, |p| p.patch),
    ];
    for (name, color, get) in series {
        let line = points
            .iter()
            .map(|p| (p.epoch, get(p)))
            .filter(|(_, v)| finite(*v));
        let s = chart.draw_series(LineSeries::new(line, color.stroke_width(2)))?;
        if text {
            s.label(name).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
