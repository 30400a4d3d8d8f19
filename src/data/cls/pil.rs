//! The Pillow operations RandAugment and the evaluation transform call, with Pillow's own
//! arithmetic (Pillow 13: `ImageOps`, `ImageEnhance.Sharpness`' 3x3 SMOOTH filter,
//! `Image.transform(AFFINE)` / `Image.rotate` with BILINEAR / BICUBIC sampling and a fill
//! colour, torchvision's CenterCrop / Resize / pad). Written by hand for the same reason as
//! `data::ops`: bit-exactness against Pillow, checked by tests/cls_data.rs. The colour blends
//! (brightness, contrast, colour) are `data::ops`'.

use crate::data::ops::{self, Filter, Rgb8};

fn apply_lut(img: &mut Rgb8, lut: &[[u8; 256]; 3]) {
    for p in img.data.chunks_exact_mut(3) {
        for c in 0..3 {
            p[c] = lut[c][p[c] as usize];
        }
    }
}

fn same_lut(f: impl Fn(u8) -> u8) -> [[u8; 256]; 3] {
    let l: [u8; 256] = std::array::from_fn(|i| f(i as u8));
    [l; 3]
}

fn histograms(img: &Rgb8) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for p in img.data.chunks_exact(3) {
        for c in 0..3 {
            h[c][p[c] as usize] += 1;
        }
    }
    h
}

/// `ImageOps.autocontrast(img)` (no cutoff): each band stretched from its lowest to its highest
/// value, `int(ix * scale + offset)` clipped.
pub fn autocontrast(img: &Rgb8) -> Rgb8 {
    let h = histograms(img);
    let lut: [[u8; 256]; 3] = std::array::from_fn(|c| {
        let lo = (0..256).find(|&i| h[c][i] != 0);
        let hi = (0..256).rev().find(|&i| h[c][i] != 0);
        match (lo, hi) {
            (Some(lo), Some(hi)) if hi > lo => {
                let scale = 255.0 / (hi - lo) as f64;
                let offset = -(lo as f64) * scale;
                std::array::from_fn(|ix| ((ix as f64 * scale + offset) as i64).clamp(0, 255) as u8)
            }
            _ => std::array::from_fn(|i| i as u8),
        }
    });
    let mut out = img.clone();
    apply_lut(&mut out, &lut);
    out
}

/// `ImageOps.equalize(img)`: Pillow 13's per-band LUT (`step = (sum - last) // 255`).
pub fn equalize(img: &Rgb8) -> Rgb8 {
    let h = histograms(img);
    let lut: [[u8; 256]; 3] = std::array::from_fn(|c| {
        let nonzero: Vec<u64> = h[c].iter().copied().filter(|&v| v != 0).collect();
        let identity = std::array::from_fn(|i| i as u8);
        if nonzero.len() <= 1 {
            return identity;
        }
        let step = (nonzero.iter().sum::<u64>() - nonzero[nonzero.len() - 1]) / 255;
        if step == 0 {
            return identity;
        }
        let mut n = step / 2;
        let mut l = [0u8; 256];
        for (i, v) in l.iter_mut().enumerate() {
            // Pillow's `_lut` takes the value modulo 256 (`n // step` never exceeds 255 here).
            *v = (n / step).min(255) as u8;
            n += h[c][i];
        }
        l
    });
    let mut out = img.clone();
    apply_lut(&mut out, &lut);
    out
}

/// `ImageOps.invert(img)`.
pub fn invert(img: &Rgb8) -> Rgb8 {
    let mut out = img.clone();
    out.data.iter_mut().for_each(|v| *v = 255 - *v);
    out
}

/// `ImageOps.posterize(img, bits)` (timm returns the image unchanged from 8 bits on; 0 bits
/// gives black, as Pillow's mask does).
pub fn posterize(img: &Rgb8, bits: u32) -> Rgb8 {
    if bits >= 8 {
        return img.clone();
    }
    let mask = !((1u32 << (8 - bits)) - 1) as u8;
    let mut out = img.clone();
    out.data.iter_mut().for_each(|v| *v &= mask);
    out
}

/// `ImageOps.solarize(img, threshold)`: values >= threshold inverted.
pub fn solarize(img: &Rgb8, threshold: i64) -> Rgb8 {
    let mut out = img.clone();
    apply_lut(
        &mut out,
        &same_lut(|i| if (i as i64) < threshold { i } else { 255 - i }),
    );
    out
}

/// timm's `solarize_add(img, add, thresh=128)`: `min(255, i + add)` below the threshold.
pub fn solarize_add(img: &Rgb8, add: i64, threshold: i64) -> Rgb8 {
    let mut out = img.clone();
    apply_lut(
        &mut out,
        &same_lut(|i| {
            if (i as i64) < threshold {
                (i as i64 + add).clamp(0, 255) as u8
            } else {
                i
            }
        }),
    );
    out
}

/// `img.filter(ImageFilter.SMOOTH)`: Pillow's 3x3 float32 convolution (kernel 1,1,1 / 1,5,1 /
/// 1,1,1 each divided by 13 in float32), rows summed bottom to top, `+ 0.5`, clipped and
/// truncated; the border rows and columns are copied. Images under 3x3 are copied.
pub fn smooth(img: &Rgb8) -> Rgb8 {
    let (w, h) = (img.width, img.height);
    if w < 3 || h < 3 {
        return img.clone();
    }
    let k1 = 1.0f32 / 13.0;
    let k5 = 5.0f32 / 13.0;
    let mut out = img.clone();
    let stride = w * 3;
    for y in 1..h - 1 {
        let (up, mid, down) = (
            &img.data[(y - 1) * stride..y * stride],
            &img.data[y * stride..(y + 1) * stride],
            &img.data[(y + 1) * stride..(y + 2) * stride],
        );
        let dst = &mut out.data[y * stride..(y + 1) * stride];
        for i in 3..stride - 3 {
            let line =
                |r: &[u8], k: f32| r[i - 3] as f32 * k1 + r[i] as f32 * k + r[i + 3] as f32 * k1;
            // Pillow's order: the row below first (the kernel is applied flipped).
            let mut ss = 0.5f32;
            ss += line(down, k1);
            ss += line(mid, k5);
            ss += line(up, k1);
            dst[i] = ss.clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// `ImageEnhance.Sharpness(img).enhance(factor)`: blend of the SMOOTH image and the image.
pub fn sharpness(img: &Rgb8, factor: f64) -> Rgb8 {
    let degenerate = smooth(img);
    let mut out = img.clone();
    ops::blend_with_image(&mut out, &degenerate, factor);
    out
}

/// Pillow's `FLOOR` of Geometry.c (truncation for non-negative values).
#[inline]
fn pil_floor(v: f64) -> i64 {
    if v < 0.0 {
        v.floor() as i64
    } else {
        v as i64
    }
}

/// `img.transform(img.size, Image.AFFINE, a, resample, fillcolor=fill)` for BILINEAR and
/// BICUBIC: each output pixel samples the input at `(a0·x + a1·y + a2, a3·x + a4·y + a5)` of its
/// centre (`x + 0.5`, `y + 0.5`) with Pillow's double-precision filters (edge pixels clamped,
/// truncation to uint8; bicubic clipped to [0, 255] first); pixels whose sample point lies
/// outside the input keep the fill colour.
pub fn affine(img: &Rgb8, a: [f64; 6], filter: Filter, fill: [u8; 3]) -> Rgb8 {
    let (w, h) = (img.width, img.height);
    let mut out = Rgb8::new(w, h, fill.repeat(w * h));
    let (wi, hi) = (w as i64, h as i64);
    let (data, stride) = (&img.data, w * 3);
    // Byte offsets of a clamped column / row (Pillow's XCLIP / YCLIP).
    let col = |x: i64| x.clamp(0, wi - 1) as usize * 3;
    let row = |y: i64| y.clamp(0, hi - 1) as usize * stride;
    let inside = |y: i64| y >= 0 && y < hi;
    let cubic = |v1: f64, v2: f64, v3: f64, v4: f64, d: f64| {
        let p1 = v2;
        let p2 = -v1 + v3;
        let p3 = 2.0 * (v1 - v2) + v3 - v4;
        let p4 = -v1 + v2 - v3 + v4;
        p1 + d * (p2 + d * (p3 + d * p4))
    };
    let lerp = |a: f64, b: f64, d: f64| a + (b - a) * d;
    for y in 0..h {
        for x in 0..w {
            let (xin, yin) = (x as f64 + 0.5, y as f64 + 0.5);
            let xs = a[0] * xin + a[1] * yin + a[2];
            let ys = a[3] * xin + a[4] * yin + a[5];
            if xs < 0.0 || xs >= w as f64 || ys < 0.0 || ys >= h as f64 {
                continue;
            }
            let (xs, ys) = (xs - 0.5, ys - 0.5);
            let (fx, fy) = (pil_floor(xs), pil_floor(ys));
            let (dx, dy) = (xs - fx as f64, ys - fy as f64);
            let o = &mut out.data[(y * w + x) * 3..(y * w + x) * 3 + 3];
            match filter {
                Filter::Bilinear => {
                    let (x0, x1) = (col(fx), col(fx + 1));
                    let r0 = row(fy);
                    // Rows past the edge repeat the previous row (Pillow's `v2 = v1`).
                    let r1 = inside(fy + 1).then(|| row(fy + 1));
                    for (c, oc) in o.iter_mut().enumerate() {
                        let px = |r: usize, xo: usize| data[r + xo + c] as f64;
                        let v1 = lerp(px(r0, x0), px(r0, x1), dx);
                        let v2 = match r1 {
                            Some(r1) => lerp(px(r1, x0), px(r1, x1), dx),
                            None => v1,
                        };
                        *oc = lerp(v1, v2, dy) as u8;
                    }
                }
                Filter::Bicubic => {
                    let (bx, by) = (fx - 1, fy - 1);
                    let xo = [col(bx), col(bx + 1), col(bx + 2), col(bx + 3)];
                    // Rows past an edge repeat the previous row's value (Pillow's `v2 = v1` …),
                    // which is the previous row itself.
                    let mut rs = [row(by); 4];
                    for k in 1..4 {
                        rs[k] = if inside(by + k as i64) {
                            row(by + k as i64)
                        } else {
                            rs[k - 1]
                        };
                    }
                    // The 4x4 patch of each channel, as f64.
                    let mut p = [[[0f64; 4]; 4]; 3];
                    for (k, &r) in rs.iter().enumerate() {
                        let line = &data[r..r + stride];
                        for (j, &xj) in xo.iter().enumerate() {
                            let px = &line[xj..xj + 3];
                            p[0][k][j] = px[0] as f64;
                            p[1][k][j] = px[1] as f64;
                            p[2][k][j] = px[2] as f64;
                        }
                    }
                    for (oc, pc) in o.iter_mut().zip(&p) {
                        let v = |k: usize| cubic(pc[k][0], pc[k][1], pc[k][2], pc[k][3], dx);
                        let v = cubic(v(0), v(1), v(2), v(3), dy);
                        *oc = if v <= 0.0 {
                            0
                        } else if v >= 255.0 {
                            255
                        } else {
                            v as u8
                        };
                    }
                }
            }
        }
    }
    out
}

/// Python's `round(x, 15)` (correctly rounded through the shortest decimal text).
fn round15(x: f64) -> f64 {
    format!("{x:.15}").parse().unwrap_or(x)
}

/// `img.rotate(degrees, resample, fillcolor=fill)` (no expand, centre of the image): Pillow's
/// matrix (`round(cos, 15)` …) and its shortcuts for 0 and 180 degrees (and 90/270 on square
/// images).
pub fn rotate(img: &Rgb8, degrees: f64, filter: Filter, fill: [u8; 3]) -> Rgb8 {
    let angle = degrees.rem_euclid(360.0);
    if angle == 0.0 {
        return img.clone();
    }
    if angle == 180.0 {
        let mut out = img.clone();
        ops::hflip_in_place(&mut out);
        out.data = out
            .data
            .chunks_exact(img.width * 3)
            .rev()
            .flatten()
            .copied()
            .collect();
        return out;
    }
    if (angle == 90.0 || angle == 270.0) && img.width == img.height {
        let n = img.width;
        let mut out = img.clone();
        for y in 0..n {
            for x in 0..n {
                // ROTATE_90 (counter-clockwise): out[n-1-x][y] = in[y][x].
                let (ox, oy) = if angle == 90.0 {
                    (y, n - 1 - x)
                } else {
                    (n - 1 - y, x)
                };
                let (s, d) = ((y * n + x) * 3, (oy * n + ox) * 3);
                out.data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
            }
        }
        return out;
    }
    let (cx, cy) = (img.width as f64 / 2.0, img.height as f64 / 2.0);
    let angle = -angle.to_radians();
    let mut m = [
        round15(angle.cos()),
        round15(angle.sin()),
        0.0,
        round15(-angle.sin()),
        round15(angle.cos()),
        0.0,
    ];
    let (x, y) = (-cx - 0.0, -cy - 0.0);
    // Pillow's `a * x + b * y + c`, in that order.
    #[allow(clippy::assign_op_pattern)]
    {
        m[2] = m[0] * x + m[1] * y + m[2];
        m[5] = m[3] * x + m[4] * y + m[5];
    }
    m[2] += cx;
    m[5] += cy;
    affine(img, m, filter, fill)
}

/// torchvision's `F.pad(img, [left, top, right, bottom], fill=0)` on a PIL image.
pub fn pad(img: &Rgb8, left: usize, top: usize, right: usize, bottom: usize) -> Rgb8 {
    let (w, h) = (img.width + left + right, img.height + top + bottom);
    let mut out = Rgb8::new(w, h, vec![0; w * h * 3]);
    for y in 0..img.height {
        let s = y * img.width * 3;
        let d = ((y + top) * w + left) * 3;
        out.data[d..d + img.width * 3].copy_from_slice(&img.data[s..s + img.width * 3]);
    }
    out
}

/// `img.crop((left, top, left + width, top + height))` inside the image.
pub fn crop(img: &Rgb8, top: usize, left: usize, height: usize, width: usize) -> Rgb8 {
    let mut data = Vec::with_capacity(width * height * 3);
    for y in top..top + height {
        let s = (y * img.width + left) * 3;
        data.extend_from_slice(&img.data[s..s + width * 3]);
    }
    Rgb8::new(width, height, data)
}

/// torchvision's `F.center_crop(img, size)`: zero padding first when the crop is larger, then
/// the crop at `int(round((H - h) / 2))` (half to even), `int(round((W - w) / 2))`.
pub fn center_crop(img: &Rgb8, size: usize) -> Rgb8 {
    let (cw, ch) = (size, size);
    let mut img = std::borrow::Cow::Borrowed(img);
    if cw > img.width || ch > img.height {
        let (w, h) = (img.width, img.height);
        let l = if cw > w { (cw - w) / 2 } else { 0 };
        let t = if ch > h { (ch - h) / 2 } else { 0 };
        let r = if cw > w { (cw - w).div_ceil(2) } else { 0 };
        let b = if ch > h { (ch - h).div_ceil(2) } else { 0 };
        img = std::borrow::Cow::Owned(pad(&img, l, t, r, b));
        if img.width == cw && img.height == ch {
            return img.into_owned();
        }
    }
    let top = ((img.height - ch) as f64 / 2.0).round_ties_even() as usize;
    let left = ((img.width - cw) as f64 / 2.0).round_ties_even() as usize;
    crop(&img, top, left, ch, cw)
}

/// torchvision's `Resize(size)` (int size: the shorter side becomes `size`, the longer
/// `int(size * long / short)`), on a PIL image with `filter`; unchanged when already that size.
pub fn resize_shorter(img: &Rgb8, size: usize, filter: Filter) -> Rgb8 {
    let (w, h) = (img.width, img.height);
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = ((size * long) as f64 / short as f64) as usize;
    let (nw, nh) = if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    };
    if (nw, nh) == (w, h) {
        return img.clone();
    }
    ops::resized_crop_with(img, 0, 0, h, w, nh, nw, filter)
}
