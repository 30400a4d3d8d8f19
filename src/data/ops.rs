//! Image operations of the official augmentation pipeline, with Pillow's own arithmetic.
//!
//! The official pipeline runs torchvision on PIL images, so each op here reproduces the
//! integer / fixed-point / float32 rules of Pillow's C code (documented in
//! `../shared/fixtures/augment/README.md`) and is checked bit-exact against Pillow's outputs.
//! Written by hand because no image crate implements Pillow's rounding rules (e.g. `image`'s
//! resize uses float weights without uint8 rounding between the passes, up to 17 levels off).

/// An 8-bit RGB image, row-major HWC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Rgb8 {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Self {
        assert_eq!(data.len(), width * height * 3, "RGB buffer size does not match {width}x{height}");
        Self { width, height, data }
    }

    /// Gray values replicated to R, G and B (PIL `convert('RGB')` of an `L` image).
    pub fn from_gray(width: usize, height: usize, gray: &[u8]) -> Self {
        let data = gray.iter().flat_map(|&g| [g, g, g]).collect();
        Self::new(width, height, data)
    }
}

// ---------------------------------------------------------------- resize (bicubic, antialiased)

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel (a = -0.5), in Pillow's evaluation order.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output sample: first input index and the 22-bit fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    k: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for an axis of `in_size` samples
/// (starting at `in0`) resampled to `out_size`.
fn coeffs(in0: f64, in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut total = 0.0;
        for x in 0..n {
            let v = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            w[x] = v;
            total += v;
        }
        for x in 0..n {
            let v = if total != 0.0 { w[x] / total } else { w[x] };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            k[xx * ksize + x] = if v < 0.0 { (f - 0.5) as i32 } else { (f + 0.5) as i32 };
        }
        bounds.push((xmin, n));
    }
    Coeffs { bounds, ksize, k }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    if acc >= (1 << PRECISION_BITS << 8) {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

/// `img.crop((left, top, left+width, top+height)).resize((out_w, out_h), BICUBIC)` as Pillow
/// computes it: horizontal pass first (skipped when the width does not change), result stored
/// as uint8, then the vertical pass (skipped when the height does not change).
pub fn resized_crop(img: &Rgb8, top: usize, left: usize, height: usize, width: usize, out_h: usize, out_w: usize) -> Rgb8 {
    assert!(top + height <= img.height && left + width <= img.width && height > 0 && width > 0, "crop box outside the image");
    // Horizontal pass over the crop rows: [height, out_w].
    let mut tmp = vec![0u8; height * out_w * 3];
    if out_w == width {
        for y in 0..height {
            let src = ((top + y) * img.width + left) * 3;
            tmp[y * out_w * 3..(y + 1) * out_w * 3].copy_from_slice(&img.data[src..src + width * 3]);
        }
    } else {
        let c = coeffs(0.0, width, out_w);
        for y in 0..height {
            let row = &img.data[((top + y) * img.width + left) * 3..((top + y) * img.width + left + width) * 3];
            for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
                let k = &c.k[xx * c.ksize..xx * c.ksize + n];
                let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                for (x, &kx) in k.iter().enumerate() {
                    let p = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                    acc[0] += p[0] as i32 * kx;
                    acc[1] += p[1] as i32 * kx;
                    acc[2] += p[2] as i32 * kx;
                }
                let o = (y * out_w + xx) * 3;
                tmp[o] = clip8(acc[0]);
                tmp[o + 1] = clip8(acc[1]);
                tmp[o + 2] = clip8(acc[2]);
            }
        }
    }
    if out_h == height {
        return Rgb8::new(out_w, out_h, tmp);
    }
    let c = coeffs(0.0, height, out_h);
    let mut out = vec![0u8; out_h * out_w * 3];
    let stride = out_w * 3;
    for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
        let k = &c.k[yy * c.ksize..yy * c.ksize + n];
        let dst = &mut out[yy * stride..(yy + 1) * stride];
        for (i, d) in dst.iter_mut().enumerate() {
            let mut acc = 1i32 << (PRECISION_BITS - 1);
            for (y, &ky) in k.iter().enumerate() {
                acc += tmp[(ymin + y) * stride + i] as i32 * ky;
            }
            *d = clip8(acc);
        }
    }
    Rgb8::new(out_w, out_h, out)
}

// ---------------------------------------------------------------- geometric / LUT ops

/// Horizontal flip (`FLIP_LEFT_RIGHT`).
pub fn hflip(img: &Rgb8) -> Rgb8 {
    let mut out = vec![0u8; img.data.len()];
    let w = img.width;
    for y in 0..img.height {
        for x in 0..w {
            let s = (y * w + (w - 1 - x)) * 3;
            let d = (y * w + x) * 3;
            out[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    Rgb8::new(img.width, img.height, out)
}

/// `ImageOps.solarize(img, 128)`: values >= 128 are inverted.
pub fn solarize(img: &Rgb8) -> Rgb8 {
    let data = img.data.iter().map(|&v| if v < 128 { v } else { 255 - v }).collect();
    Rgb8::new(img.width, img.height, data)
}

/// PIL's `convert('L')`: ITU-R 601-2 luma in 16-bit fixed point with rounding.
#[inline]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((19595 * r as u32 + 38470 * g as u32 + 7471 * b as u32 + 0x8000) >> 16) as u8
}

fn gray_plane(img: &Rgb8) -> Vec<u8> {
    img.data.chunks_exact(3).map(|p| luma(p[0], p[1], p[2])).collect()
}

/// `rgb_to_grayscale(img, 3)`: luma copied to the three channels.
pub fn grayscale(img: &Rgb8) -> Rgb8 {
    Rgb8::from_gray(img.width, img.height, &gray_plane(img))
}

// ---------------------------------------------------------------- blends (ImageEnhance)

/// Pillow's `ImagingBlend(degenerate, img, alpha)` per byte in float32 with truncation.
#[inline]
fn blend(d: u8, x: u8, alpha: f32) -> u8 {
    let t = d as i32 as f32 + alpha * (x as i32 - d as i32) as f32;
    if (0.0..=1.0).contains(&alpha) {
        t as u8
    } else if t <= 0.0 {
        0
    } else if t >= 255.0 {
        255
    } else {
        t as u8
    }
}

fn blend_image(img: &Rgb8, degenerate: impl Fn(usize) -> u8, factor: f64) -> Rgb8 {
    let alpha = factor as f32;
    let data = if alpha == 1.0 {
        img.data.clone()
    } else if alpha == 0.0 {
        (0..img.data.len()).map(&degenerate).collect()
    } else {
        img.data.iter().enumerate().map(|(i, &x)| blend(degenerate(i), x, alpha)).collect()
    };
    Rgb8::new(img.width, img.height, data)
}

/// `ImageEnhance.Brightness(img).enhance(f)`: blend with black.
pub fn adjust_brightness(img: &Rgb8, factor: f64) -> Rgb8 {
    blend_image(img, |_| 0, factor)
}

/// `ImageEnhance.Contrast(img).enhance(f)`: blend with the rounded mean luma.
pub fn adjust_contrast(img: &Rgb8, factor: f64) -> Rgb8 {
    let gray = gray_plane(img);
    let sum: u64 = gray.iter().map(|&v| v as u64).sum();
    let mean = (sum as f64 / gray.len().max(1) as f64 + 0.5) as i64 as u8;
    blend_image(img, |_| mean, factor)
}

/// `ImageEnhance.Color(img).enhance(f)`: blend with the luma image.
pub fn adjust_saturation(img: &Rgb8, factor: f64) -> Rgb8 {
    let gray = gray_plane(img);
    blend_image(img, |i| gray[i / 3], factor)
}

// ---------------------------------------------------------------- hue (PIL 8-bit HSV)

fn rgb_to_hsv(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        return (0, 0, maxc);
    }
    let cr = (maxc - minc) as f32;
    let s = cr / maxc as f32;
    let rc = (maxc - r) as f32 / cr;
    let gc = (maxc - g) as f32 / cr;
    let bc = (maxc - b) as f32 / cr;
    let h: f32 = if r == maxc {
        bc - gc
    } else if g == maxc {
        (2.0 + rc as f64 - bc as f64) as f32
    } else {
        (4.0 + gc as f64 - rc as f64) as f32
    };
    let h = ((h as f64 / 6.0 + 1.0) % 1.0) as f32;
    let hh = ((h as f64 * 255.0) as i64).clamp(0, 255) as u8;
    let ss = ((s as f64 * 255.0) as i64).clamp(0, 255) as u8;
    (hh, ss, maxc)
}

fn hsv_to_rgb(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    if s == 0 {
        return (v, v, v);
    }
    let h6 = h as f64 * 6.0 / 255.0;
    let i = h6.floor();
    let f = (h6 - i) as f32;
    let fs = (s as f64 / 255.0) as f32;
    let vv = v as f64;
    let c = |x: f64| x.round().clamp(0.0, 255.0) as u8; // C round(): half away from zero
    let p = c(vv * (1.0 - fs as f64));
    let q = c(vv * (1.0 - (fs * f) as f64));
    let t = c(vv * (1.0 - fs as f64 * (1.0 - f as f64)));
    match (i as i64).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// `adjust_hue(img, h)` on a PIL image: RGB → 8-bit HSV, H byte shifted by
/// `uint8(int32(h·255))` modulo 256, back to RGB.
pub fn adjust_hue(img: &Rgb8, hue_factor: f64) -> Rgb8 {
    let shift = ((hue_factor * 255.0) as i32) as u8;
    let mut data = Vec::with_capacity(img.data.len());
    for p in img.data.chunks_exact(3) {
        let (h, s, v) = rgb_to_hsv(p[0], p[1], p[2]);
        let (r, g, b) = hsv_to_rgb(h.wrapping_add(shift), s, v);
        data.extend_from_slice(&[r, g, b]);
    }
    Rgb8::new(img.width, img.height, data)
}

// ---------------------------------------------------------------- Gaussian blur (box blur)

/// Pillow's `_gaussian_blur_radius(radius, 3)`: the extended-box radius for 3 passes.
pub fn box_radius(radius: f32) -> f32 {
    let sigma2 = radius * radius / 3.0;
    let big_l = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l = ((big_l as f64 - 1.0) / 2.0).floor() as f32;
    let mut a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    l + a
}

/// One extended-box pass over a line of `n` samples `stride` apart (edge samples repeated).
fn box_line(src: &[u8], dst: &mut [u8], n: usize, stride: usize, ri: usize, ww: u32, fw: u32) {
    let at = |j: isize| -> u32 { src[(j.clamp(0, n as isize - 1) as usize) * stride] as u32 };
    let ri = ri as isize;
    let mut acc: u32 = (-ri..=ri).map(at).sum();
    for x in 0..n as isize {
        if x > 0 {
            acc = acc + at(x + ri) - at(x - ri - 1);
        }
        let bulk = acc * ww + (at(x - ri - 1) + at(x + ri + 1)) * fw;
        dst[x as usize * stride] = ((bulk + (1 << 23)) >> 24) as u8;
    }
}

/// `img.filter(ImageFilter.GaussianBlur(radius))`: three horizontal then three vertical
/// extended-box passes, each rounding to uint8.
pub fn gaussian_blur(img: &Rgb8, radius: f64) -> Rgb8 {
    let r = box_radius(radius as f32);
    let ri = r as usize;
    let ww = ((1u32 << 24) as f32 / (r * 2.0 + 1.0)) as u32;
    let fw = ((1u32 << 24) - (ri as u32 * 2 + 1) * ww) / 2;
    let (w, h) = (img.width, img.height);
    let mut a = img.data.clone();
    let mut b = vec![0u8; a.len()];
    for _ in 0..3 {
        for y in 0..h {
            for c in 0..3 {
                let off = y * w * 3 + c;
                box_line(&a[off..], &mut b[off..], w, 3, ri, ww, fw);
            }
        }
        std::mem::swap(&mut a, &mut b);
    }
    for _ in 0..3 {
        for x in 0..w {
            for c in 0..3 {
                let off = x * 3 + c;
                box_line(&a[off..], &mut b[off..], h, w * 3, ri, ww, fw);
            }
        }
        std::mem::swap(&mut a, &mut b);
    }
    Rgb8::new(w, h, a)
}

// ---------------------------------------------------------------- to tensor

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// `Normalize(mean, std)(ToTensor()(img))` into `out` (CHW float32, length 3·H·W).
pub fn to_tensor_normalize_into(img: &Rgb8, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let plane = img.width * img.height;
    assert_eq!(out.len(), plane * 3);
    for (i, p) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (p[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
}
