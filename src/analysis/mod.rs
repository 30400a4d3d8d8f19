//! Looking inside trained models, as the official `analysis/` folder does: what the [CLS] token
//! attends to (`attention`, and over a folder of video frames, `video`), dense patch
//! correspondences between two images (`correspondence`), and the part-level patterns that
//! the teacher head's prototypes collect (`patterns`).

pub mod attention;
pub mod correspondence;
pub mod patterns;
pub mod video;
pub mod visualize;

use std::path::Path;

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use crate::data::ops::Rgb8;

/// Writes `img` as a PNG so that readers only ever see a complete file (encoded in memory,
/// then [`crate::util::atomic_write`]).
pub fn save_png(img: &Rgb8, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(
            &img.data,
            img.width as u32,
            img.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .with_context(|| format!("encoding {}", path.display()))?;
    crate::util::atomic_write(path, &bytes)
}

use image::ImageEncoder as _;

/// A normalised image tensor `[3, H, W]` back to 8 bits as the official scripts show it:
/// `torchvision.utils.make_grid(x, normalize=True, scale_each=True)` (the image's own minimum
/// and maximum over all channels stretched to 0..1), then `mul(255).add_(0.5).clamp_(0, 255)`
/// and the cast to uint8.
pub fn display_image(x: &Tensor) -> Result<Rgb8> {
    let size = x.size();
    anyhow::ensure!(
        size.len() == 3 && size[0] == 3,
        "an image tensor must be [3, H, W], not {size:?}"
    );
    let x = x.to_kind(Kind::Float).to_device(tch::Device::Cpu);
    let (lo, hi) = (x.min(), x.max());
    let span = (&hi - &lo).clamp_min(1e-5);
    let v = ((x.clamp_tensor(Some(&lo), Some(&hi)) - &lo) / span)
        .g_mul_scalar(255.0)
        .g_add_scalar(0.5)
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([1, 2, 0])
        .contiguous();
    let data = Vec::<u8>::try_from(v.flatten(0, -1))?;
    Ok(Rgb8::new(size[2] as usize, size[1] as usize, data))
}

/// Pictures of equal height placed left to right (the official `Image.new` + `paste` strips).
pub fn side_by_side(pics: &[Rgb8]) -> Rgb8 {
    let h = pics.iter().map(|p| p.height).max().unwrap_or(0);
    let w: usize = pics.iter().map(|p| p.width).sum();
    let mut data = vec![0u8; w * h * 3];
    let mut x0 = 0;
    for p in pics {
        for y in 0..p.height {
            let dst = (y * w + x0) * 3;
            data[dst..dst + p.width * 3]
                .copy_from_slice(&p.data[y * p.width * 3..(y + 1) * p.width * 3]);
        }
        x0 += p.width;
    }
    Rgb8::new(w, h, data)
}

/// Pastes `src` into `dst` with its top-left corner at (`x0`, `y0`), clipped to `dst` (PIL's
/// `paste` at a position).
pub fn paste(dst: &mut Rgb8, src: &Rgb8, x0: i64, y0: i64) {
    for y in 0..src.height as i64 {
        let ty = y0 + y;
        if ty < 0 || ty >= dst.height as i64 {
            continue;
        }
        for x in 0..src.width as i64 {
            let tx = x0 + x;
            if tx < 0 || tx >= dst.width as i64 {
                continue;
            }
            let s = ((y as usize) * src.width + x as usize) * 3;
            let d = ((ty as usize) * dst.width + tx as usize) * 3;
            dst.data[d..d + 3].copy_from_slice(&src.data[s..s + 3]);
        }
    }
}

/// A one-pixel line from (x0, y0) to (x1, y1), both ends included (Bresenham, as Pillow's
/// `ImageDraw.line` with width 1), clipped to the picture.
pub fn draw_line(img: &mut Rgb8, (x0, y0): (i64, i64), (x1, y1): (i64, i64), colour: [u8; 3]) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        if x >= 0 && y >= 0 && (x as usize) < img.width && (y as usize) < img.height {
            let i = (y as usize * img.width + x as usize) * 3;
            img.data[i..i + 3].copy_from_slice(&colour);
        }
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}
