//! Image operations of the official augmentation pipeline, with Pillow's own arithmetic.
//!
//! The official pipeline runs torchvision on PIL images, so each op here reproduces the
//! integer / fixed-point / float32 rules of Pillow's C code (documented in
//! `../shared/fixtures/augment/README.md`) and is checked bit-exact against Pillow's outputs.
//! Written by hand because no image crate implements Pillow's rounding rules (e.g. `image`'s
//! resize uses float weights without uint8 rounding between the passes, up to 17 levels off).
//!
//! Speed: the two filters (resampling and box blur) run each 1-D pass over whole rows at once,
//! so that the per-byte arithmetic vectorises (AVX2 chosen at run time); passes along the other
//! axis work on a transposed copy, as Pillow itself does for the blur. Colour ops work in place.
//! The arithmetic per sample is exactly Pillow's, only the loop order differs.

use multiversion::multiversion;

/// An 8-bit RGB image, row-major HWC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Rgb8 {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Self {
        assert_eq!(
            data.len(),
            width * height * 3,
            "RGB buffer size does not match {width}x{height}"
        );
        Self {
            width,
            height,
            data,
        }
    }

    /// Gray values replicated to R, G and B (PIL `convert('RGB')` of an `L` image).
    pub fn from_gray(width: usize, height: usize, gray: &[u8]) -> Self {
        let data = gray.iter().flat_map(|&g| [g, g, g]).collect();
        Self::new(width, height, data)
    }
}

/// Copies the `rows x cols` block of 3-byte pixels at `src` (row stride `stride` pixels) to
/// `dst` transposed (`cols x rows`, contiguous). Blocked so both sides stay in cache.
fn transpose_rgb(src: &[u8], stride: usize, rows: usize, cols: usize, dst: &mut [u8]) {
    const B: usize = 16;
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        stride >= cols
            && src.len() >= ((rows - 1) * stride + cols) * 3
            && dst.len() >= rows * cols * 3,
        "transpose out of bounds"
    );
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for c in c0..(c0 + B).min(cols) {
                for r in r0..(r0 + B).min(rows) {
                    // SAFETY: r < rows and c < cols, so both 3-byte ranges lie inside the
                    // lengths asserted above. (Checked indexing costs a third of the time of
                    // this hot loop.)
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            s.add((r * stride + c) * 3),
                            d.add((c * rows + r) * 3),
                            3,
                        )
                    };
                }
            }
        }
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

/// Pillow's triangle (bilinear) kernel.
fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Resampling filter: torchvision's `InterpolationMode.BICUBIC` (the iBOT pre-training and
/// evaluation resizes) or `BILINEAR` (the default of `RandomResizedCrop`, used by the official
/// linear-probe training transform).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Bicubic,
    Bilinear,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bicubic => 2.0,
            Filter::Bilinear => 1.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bicubic => bicubic(x),
            Filter::Bilinear => triangle(x),
        }
    }
}

/// A resampling kernel: one of the [`Filter`]s, or Pillow's `LANCZOS` (`ANTIALIAS`: sinc
/// windowed by sinc, support 3), which only the retrieval protocol's `thumbnail` uses.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    Pil(Filter),
    Lanczos,
}

impl Kernel {
    fn support(self) -> f64 {
        match self {
            Kernel::Pil(f) => f.support(),
            Kernel::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Kernel::Pil(f) => f.weight(x),
            Kernel::Lanczos => lanczos(x),
        }
    }
}

/// Pillow's `sinc_filter`.
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Pillow's `lanczos_filter`: the truncated sinc of support 3.
fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
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
/// resampled to `out_size`.
#[cfg(test)]
fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    coeffs_kernel(in_size, out_size, Kernel::Pil(filter))
}

/// [`coeffs`] for any [`Kernel`].
fn coeffs_kernel(in_size: usize, out_size: usize, filter: Kernel) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut total = 0.0;
        for x in 0..n {
            let v = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            w[x] = v;
            total += v;
        }
        for x in 0..n {
            let v = if total != 0.0 { w[x] / total } else { w[x] };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            k[xx * ksize + x] = if v < 0.0 {
                (f - 0.5) as i32
            } else {
                (f + 0.5) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs { bounds, ksize, k }
}

/// One resampling pass along the row axis: output row `j` is the weighted sum of input rows
/// `xmin_j ..` with Pillow's rounding (`+ 2^21`, `>> 22`, clip to uint8), for every byte of
/// the row at once. `src` holds whole rows of `row_len` bytes.
#[multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn resample_rows(src: &[u8], row_len: usize, c: &Coeffs, dst: &mut [u8]) {
    let mut acc = vec![0i32; row_len];
    for (j, &(start, n)) in c.bounds.iter().enumerate() {
        acc.fill(1 << (PRECISION_BITS - 1));
        for (t, &w) in c.k[j * c.ksize..j * c.ksize + n].iter().enumerate() {
            let row = &src[(start + t) * row_len..(start + t + 1) * row_len];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * w;
            }
        }
        // Pillow's clip8: >= 2^30 → 255, <= 0 → 0, else the top byte; the same as a clamp
        // of the arithmetic shift.
        for (d, &a) in dst[j * row_len..(j + 1) * row_len].iter_mut().zip(&acc) {
            *d = (a >> PRECISION_BITS).clamp(0, 255) as u8;
        }
    }
}

/// `img.crop((left, top, left+width, top+height)).resize((out_w, out_h), BICUBIC)` as Pillow
/// computes it: horizontal pass first (skipped when the width does not change), result stored
/// as uint8, then the vertical pass (skipped when the height does not change).
pub fn resized_crop(
    img: &Rgb8,
    top: usize,
    left: usize,
    height: usize,
    width: usize,
    out_h: usize,
    out_w: usize,
) -> Rgb8 {
    resized_crop_with(img, top, left, height, width, out_h, out_w, Filter::Bicubic)
}

/// [`resized_crop`] with another resampling filter.
#[allow(clippy::too_many_arguments)]
pub fn resized_crop_with(
    img: &Rgb8,
    top: usize,
    left: usize,
    height: usize,
    width: usize,
    out_h: usize,
    out_w: usize,
    filter: Filter,
) -> Rgb8 {
    resized_crop_kernel(
        img,
        top,
        left,
        height,
        width,
        out_h,
        out_w,
        Kernel::Pil(filter),
    )
}

/// `img.resize((out_w, out_h), LANCZOS)` as Pillow computes it (horizontal pass first).
pub fn resize_lanczos(img: &Rgb8, out_w: usize, out_h: usize) -> Rgb8 {
    resized_crop_kernel(
        img,
        0,
        0,
        img.height,
        img.width,
        out_h,
        out_w,
        Kernel::Lanczos,
    )
}

#[allow(clippy::too_many_arguments)]
fn resized_crop_kernel(
    img: &Rgb8,
    top: usize,
    left: usize,
    height: usize,
    width: usize,
    out_h: usize,
    out_w: usize,
    filter: Kernel,
) -> Rgb8 {
    assert!(
        top + height <= img.height && left + width <= img.width && height > 0 && width > 0,
        "crop box outside the image"
    );
    let region = &img.data[(top * img.width + left) * 3..];
    // After the horizontal pass: [height, out_w].
    let mut rows = vec![0u8; height * out_w * 3];
    if out_w == width {
        for y in 0..height {
            let s = y * img.width * 3;
            rows[y * width * 3..(y + 1) * width * 3].copy_from_slice(&region[s..s + width * 3]);
        }
    } else {
        // The horizontal pass runs on the transposed crop ([width, height]) so that it is a
        // pass over whole rows, then the result ([out_w, height]) is transposed back.
        let mut t = vec![0u8; width * height * 3];
        transpose_rgb(region, img.width, height, width, &mut t);
        let mut u = vec![0u8; out_w * height * 3];
        resample_rows(&t, height * 3, &coeffs_kernel(width, out_w, filter), &mut u);
        transpose_rgb(&u, height, out_w, height, &mut rows);
    }
    if out_h == height {
        return Rgb8::new(out_w, out_h, rows);
    }
    let mut out = vec![0u8; out_h * out_w * 3];
    resample_rows(
        &rows,
        out_w * 3,
        &coeffs_kernel(height, out_h, filter),
        &mut out,
    );
    Rgb8::new(out_w, out_h, out)
}

// ---------------------------------------------------------------- geometric / LUT ops

/// Horizontal flip (`FLIP_LEFT_RIGHT`).
pub fn hflip_in_place(img: &mut Rgb8) {
    let w = img.width;
    if w == 0 {
        return;
    }
    for row in img.data.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            let (a, b) = (x * 3, (w - 1 - x) * 3);
            for c in 0..3 {
                row.swap(a + c, b + c);
            }
        }
    }
}

/// `ImageOps.solarize(img, 128)`: values >= 128 are inverted.
pub fn solarize_in_place(img: &mut Rgb8) {
    for v in img.data.iter_mut() {
        if *v >= 128 {
            *v = 255 - *v;
        }
    }
}

/// PIL's `convert('L')`: ITU-R 601-2 luma in 16-bit fixed point with rounding.
#[inline]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((19595 * r as u32 + 38470 * g as u32 + 7471 * b as u32 + 0x8000) >> 16) as u8
}

/// `rgb_to_grayscale(img, 3)`: luma copied to the three channels.
pub fn grayscale_in_place(img: &mut Rgb8) {
    for p in img.data.chunks_exact_mut(3) {
        let g = luma(p[0], p[1], p[2]);
        p.fill(g);
    }
}

// ---------------------------------------------------------------- blends (ImageEnhance)

/// Pillow's `ImagingBlend(degenerate, img, alpha)` per byte: `d + alpha·(x - d)` in float32,
/// then truncated and clipped to [0, 255].
#[inline]
fn blend(d: u8, x: u8, alpha: f32) -> u8 {
    let t = (d as i32 as f32 + alpha * (x as i32 - d as i32) as f32).clamp(0.0, 255.0);
    debug_assert!(!t.is_nan(), "blend factor {alpha} gave NaN");
    // SAFETY: callers pass a finite `alpha` (see `blend_alpha`), so the sum is finite or ±inf,
    // never NaN, and the clamp puts it in [0, 255]; truncation as in C. (Rust's saturating
    // `as` would give the same value but does not vectorise.)
    unsafe { t.to_int_unchecked::<i32>() as u8 }
}

/// The float32 blend factor of `factor`, made safe for [`blend`]: NaN gives `None` (the image
/// is left unchanged; Pillow's C arithmetic has no defined result for it), infinities and
/// values beyond float32 become ±`f32::MAX` (their limit: every byte pushed to 0 or 255 away
/// from the degenerate value). With a finite `alpha`, `d + alpha·(x - d)` is never NaN.
fn blend_alpha(factor: f64) -> Option<f32> {
    if factor.is_nan() {
        return None;
    }
    Some(factor.clamp(f32::MIN as f64, f32::MAX as f64) as f32)
}

/// Blend with a constant degenerate image: a function of the byte alone, so a table.
fn blend_const_in_place(img: &mut Rgb8, d: u8, factor: f64) {
    let Some(alpha) = blend_alpha(factor) else {
        return;
    };
    if alpha == 1.0 {
        return;
    }
    let lut: [u8; 256] = std::array::from_fn(|x| blend(d, x as u8, alpha));
    for v in img.data.iter_mut() {
        *v = lut[*v as usize];
    }
}

/// `ImageEnhance.Brightness(img).enhance(f)`: blend with black.
pub fn adjust_brightness_in_place(img: &mut Rgb8, factor: f64) {
    blend_const_in_place(img, 0, factor)
}

/// `ImageEnhance.Contrast(img).enhance(f)`: blend with the rounded mean luma.
pub fn adjust_contrast_in_place(img: &mut Rgb8, factor: f64) {
    let sum: u64 = img
        .data
        .chunks_exact(3)
        .map(|p| luma(p[0], p[1], p[2]) as u64)
        .sum();
    let n = (img.width * img.height).max(1);
    let mean = (sum as f64 / n as f64 + 0.5) as i64 as u8;
    blend_const_in_place(img, mean, factor)
}

/// `ImageEnhance.Color(img).enhance(f)`: blend with the luma image.
pub fn adjust_saturation_in_place(img: &mut Rgb8, factor: f64) {
    let Some(alpha) = blend_alpha(factor) else {
        return;
    };
    if alpha == 1.0 {
        return;
    }
    // Luma replicated per byte first, so that the blend is one flat loop that vectorises.
    let gray3: Vec<u8> = img
        .data
        .chunks_exact(3)
        .flat_map(|p| [luma(p[0], p[1], p[2]); 3])
        .collect();
    blend_bytes(&mut img.data, &gray3, alpha);
}

/// `Image.blend(degenerate, img, factor)` with a degenerate image of the same size (e.g.
/// `ImageEnhance.Sharpness`' smoothed image), in place on `img`.
pub fn blend_with_image(img: &mut Rgb8, degenerate: &Rgb8, factor: f64) {
    assert_eq!(
        (img.width, img.height),
        (degenerate.width, degenerate.height),
        "blend of images of different sizes"
    );
    let Some(alpha) = blend_alpha(factor) else {
        return;
    };
    if alpha == 1.0 {
        return;
    }
    blend_bytes(&mut img.data, &degenerate.data, alpha);
}

#[multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn blend_bytes(data: &mut [u8], degenerate: &[u8], alpha: f32) {
    for (x, &d) in data.iter_mut().zip(degenerate) {
        *x = blend(d, *x, alpha);
    }
}

// ---------------------------------------------------------------- hue (PIL 8-bit HSV)

/// Pixels per block of [`hue_block`].
const HUE_BLOCK: usize = 64;

/// `adjust_hue` on up to [`HUE_BLOCK`] pixels: Pillow's `rgb2hsv`, the H byte shift, Pillow's
/// `hsv2rgb`, with their float32/float64 mix step for step. Written as straight-line lane
/// arithmetic with selects instead of Pillow's branches so that it vectorises; the scalar
/// transcription of Pillow kept in the tests checks it on every RGB colour.
#[multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn hue_block(px: &mut [u8], shift: f64) {
    let n = px.len() / 3;
    let (mut r, mut g, mut b) = ([0f32; HUE_BLOCK], [0f32; HUE_BLOCK], [0f32; HUE_BLOCK]);
    for (i, p) in px.chunks_exact(3).enumerate() {
        (r[i], g[i], b[i]) = (p[0] as f32, p[1] as f32, p[2] as f32);
    }
    let mut out = [[0u8; 3]; HUE_BLOCK];
    for i in 0..HUE_BLOCK {
        let (r, g, b) = (r[i], g[i], b[i]);
        // rgb2hsv. On gray pixels (max == min) the divisions give NaN/inf; selected away below.
        let maxc = r.max(g).max(b);
        let minc = r.min(g).min(b);
        let gray = maxc == minc;
        let cr = maxc - minc;
        let s = cr / maxc;
        let rc = (maxc - r) / cr;
        let gc = (maxc - g) / cr;
        let bc = (maxc - b) / cr;
        let h = if r == maxc {
            bc - gc
        } else if g == maxc {
            (2.0 + rc as f64 - bc as f64) as f32
        } else {
            (4.0 + gc as f64 - rc as f64) as f32
        };
        // fmod(h/6 + 1, 1): the argument lies in [5/6, 11/6], where the remainder is the
        // exact subtraction.
        let x = h as f64 / 6.0 + 1.0;
        let h = (if x >= 1.0 { x - 1.0 } else { x }) as f32;
        // From here on integers are kept in f64 (exact) so that no saturating float→int cast
        // breaks the vectorisation: int(h·255) and int(s·255) truncate non-negative values.
        let hh = if gray {
            0.0
        } else {
            (h as f64 * 255.0).trunc().clamp(0.0, 255.0)
        };
        let ss = if gray {
            0.0
        } else {
            (s as f64 * 255.0).trunc().clamp(0.0, 255.0)
        };
        let v = maxc as f64;
        // hsv2rgb on the hue byte shifted modulo 256.
        let h = hh + shift;
        let h = if h >= 256.0 { h - 256.0 } else { h };
        let h6 = h * 6.0 / 255.0;
        let sector = h6.floor();
        let f = (h6 - sector) as f32;
        let sector = if sector >= 6.0 { 0.0 } else { sector };
        let fs = (ss / 255.0) as f32;
        // C's round() (half away from zero) of non-negative values, clipped to a byte.
        let round = |x: f64| {
            let t = x.trunc();
            (if x - t >= 0.5 { t + 1.0 } else { t }).clamp(0.0, 255.0)
        };
        let p = round(v * (1.0 - fs as f64));
        let q = round(v * (1.0 - (fs * f) as f64));
        let t = round(v * (1.0 - fs as f64 * (1.0 - f as f64)));
        // Sectors 0..5 give (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q); no saturation, gray.
        let (ro, go, bo) = if ss == 0.0 {
            (v, v, v)
        } else {
            let ro = if sector == 0.0 || sector == 5.0 {
                v
            } else if sector == 1.0 {
                q
            } else if sector == 4.0 {
                t
            } else {
                p
            };
            let go = if sector == 1.0 || sector == 2.0 {
                v
            } else if sector == 0.0 {
                t
            } else if sector == 3.0 {
                q
            } else {
                p
            };
            let bo = if sector == 3.0 || sector == 4.0 {
                v
            } else if sector == 2.0 {
                t
            } else if sector == 5.0 {
                q
            } else {
                p
            };
            (ro, go, bo)
        };
        // SAFETY: each value is an integer in [0, 255] (clamped above, or a byte's value): `v`
        // is a byte, `shift` an integer in [0, 255] whatever the hue factor (saturating cast),
        // so `f`, `fs` and the rounded products are finite.
        let byte = |x: f64| unsafe { x.to_int_unchecked::<i32>() } as u8;
        out[i] = [byte(ro), byte(go), byte(bo)];
    }
    for (p, o) in px.chunks_exact_mut(3).zip(&out[..n]) {
        p.copy_from_slice(o);
    }
}

/// `adjust_hue(img, h)` on a PIL image: RGB → 8-bit HSV, H byte shifted by
/// `uint8(int32(h·255))` modulo 256, back to RGB.
pub fn adjust_hue_in_place(img: &mut Rgb8, hue_factor: f64) {
    let shift = (((hue_factor * 255.0) as i32) as u8) as f64;
    for block in img.data.chunks_mut(HUE_BLOCK * 3) {
        hue_block(block, shift);
    }
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

/// One extended-box pass along the row axis (Pillow's line blur, edge rows repeated), over
/// every byte of the rows at once. `acc` is scratch of `row_len`.
///
/// The sums are in wrapping 32-bit arithmetic like Pillow's `UINT32`: the accumulator of a
/// radius beyond ~8.4 M rows wraps, but the rounded output `acc·ww + (l + r)·fw + 2^23` is
/// below 2^32 (the weights add up to 2^24), so it comes out right all the same.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn box_rows(
    src: &[u8],
    dst: &mut [u8],
    nrows: usize,
    row_len: usize,
    ri: usize,
    ww: u32,
    fw: u32,
    acc: &mut [u32],
) {
    let row = |j: isize| {
        let j = j.clamp(0, nrows as isize - 1) as usize;
        &src[j * row_len..(j + 1) * row_len]
    };
    let add = |acc: &mut [u32], r: &[u8], times: u32| {
        for (a, &v) in acc.iter_mut().zip(r) {
            *a = a.wrapping_add((v as u32).wrapping_mul(times));
        }
    };
    // The window of row 0, rows -ri..=ri with the edge rows repeated, counted as Pillow
    // does: the first row ri + 1 times, the rows after it, the last row for what is left.
    // (A loop over the window would take ri steps: forever for a huge radius.)
    acc.fill(0);
    let last = nrows - 1;
    add(acc, row(0), (ri as u32).wrapping_add(1));
    for j in 1..=ri.min(last) {
        add(acc, row(j as isize), 1);
    }
    if ri > last {
        add(acc, row(last as isize), (ri - last) as u32);
    }
    let ri = ri as isize;
    for y in 0..nrows as isize {
        if y > 0 {
            for ((a, &add), &sub) in acc.iter_mut().zip(row(y + ri)).zip(row(y - ri - 1)) {
                *a = a.wrapping_add(add as u32).wrapping_sub(sub as u32);
            }
        }
        let (e0, e1) = (row(y - ri - 1), row(y + ri + 1));
        let d = &mut dst[y as usize * row_len..(y as usize + 1) * row_len];
        for (((d, &a), &l), &r) in d.iter_mut().zip(acc.iter()).zip(e0).zip(e1) {
            // At most 255·2^24 + 2^23 < 2^32 (see above).
            *d = (a
                .wrapping_mul(ww)
                .wrapping_add((l as u32 + r as u32) * fw)
                .wrapping_add(1 << 23)
                >> 24) as u8;
        }
    }
}

/// `img.filter(ImageFilter.GaussianBlur(radius))`: three horizontal then three vertical
/// extended-box passes, each rounding to uint8.
///
/// A NaN radius leaves the image as it is (Pillow's C arithmetic has no defined result). From
/// an extended-box radius of 2^23 on (longer than the lines of any real image), the box weight
/// `ww` is 0 and every sample becomes the rounded mean of the two edge samples of its line,
/// whatever the radius: larger radii, infinite ones included (whose box radius is NaN in
/// float32, undefined behaviour in Pillow's C), give that limit, in time linear in the image.
pub fn gaussian_blur_in_place(img: &mut Rgb8, radius: f64) {
    if radius.is_nan() {
        return;
    }
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 {
        return;
    }
    let r = box_radius(radius as f32);
    // At least 2^24 and the image's size: the limit above, with the window past both edges.
    let cap = (w.max(h) as f32).max(16777216.0);
    let r = if r <= cap { r } else { cap };
    let ri = r as usize;
    let ww = ((1u32 << 24) as f32 / (r * 2.0 + 1.0)) as u32;
    // Pillow's `(1 << 24) - (radius * 2 + 1) * ww` in unsigned arithmetic.
    let fw = (1u32 << 24).wrapping_sub((ri as u32 * 2 + 1).wrapping_mul(ww)) / 2;
    let mut acc = vec![0u32; w.max(h) * 3];
    // Horizontal passes on the transposed image ([w, h]).
    let mut a = vec![0u8; img.data.len()];
    let mut b = vec![0u8; img.data.len()];
    transpose_rgb(&img.data, w, h, w, &mut a);
    for _ in 0..3 {
        box_rows(&a, &mut b, w, h * 3, ri, ww, fw, &mut acc);
        std::mem::swap(&mut a, &mut b);
    }
    transpose_rgb(&a, h, w, h, &mut img.data);
    for _ in 0..3 {
        box_rows(&img.data, &mut b, h, w * 3, ri, ww, fw, &mut acc);
        std::mem::swap(&mut img.data, &mut b);
    }
}

// ---------------------------------------------------------------- by-value forms

macro_rules! by_value {
    ($(#[$doc:meta] $name:ident => $inner:ident ($($arg:ident: $ty:ty),*);)*) => {$(
        #[$doc]
        pub fn $name(img: &Rgb8 $(, $arg: $ty)*) -> Rgb8 {
            let mut out = img.clone();
            $inner(&mut out $(, $arg)*);
            out
        }
    )*};
}

by_value! {
    /// [`hflip_in_place`] on a copy.
    hflip => hflip_in_place();
    /// [`solarize_in_place`] on a copy.
    solarize => solarize_in_place();
    /// [`grayscale_in_place`] on a copy.
    grayscale => grayscale_in_place();
    /// [`adjust_brightness_in_place`] on a copy.
    adjust_brightness => adjust_brightness_in_place(factor: f64);
    /// [`adjust_contrast_in_place`] on a copy.
    adjust_contrast => adjust_contrast_in_place(factor: f64);
    /// [`adjust_saturation_in_place`] on a copy.
    adjust_saturation => adjust_saturation_in_place(factor: f64);
    /// [`adjust_hue_in_place`] on a copy.
    adjust_hue => adjust_hue_in_place(hue_factor: f64);
    /// [`gaussian_blur_in_place`] on a copy.
    gaussian_blur => gaussian_blur_in_place(radius: f64);
}

// ---------------------------------------------------------------- to tensor

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// `Normalize(mean, std)(ToTensor()(img))` into `out` (CHW float32, length 3·H·W). The value is
/// a function of (byte, channel), so it is tabulated with torchvision's exact float32 steps.
pub fn to_tensor_normalize_into(img: &Rgb8, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let plane = img.width * img.height;
    assert_eq!(out.len(), plane * 3);
    let lut: [[f32; 256]; 3] =
        std::array::from_fn(|c| std::array::from_fn(|v| (v as f32 / 255.0 - mean[c]) / std[c]));
    let (r, gb) = out.split_at_mut(plane);
    let (g, b) = gb.split_at_mut(plane);
    for (i, p) in img.data.chunks_exact(3).enumerate() {
        r[i] = lut[0][p[0] as usize];
        g[i] = lut[1][p[1] as usize];
        b[i] = lut[2][p[2] as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pillow's `rgb2hsv` transcribed branch for branch (the spec for [`hue_block`]).
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

    /// Pillow's `hsv2rgb` transcribed branch for branch.
    fn hsv_to_rgb(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
        if s == 0 {
            return (v, v, v);
        }
        let h6 = h as f64 * 6.0 / 255.0;
        let i = h6.floor();
        let f = (h6 - i) as f32;
        let fs = (s as f64 / 255.0) as f32;
        let vv = v as f64;
        let c = |x: f64| x.round().clamp(0.0, 255.0) as u8;
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

    /// Every one of the 2^24 colours, for shifts covering the hue jitter range and its wrap.
    #[test]
    fn vectorised_hue_equals_pillow_transcription_on_every_colour() {
        let all: Vec<u8> = (0..1u32 << 24)
            .flat_map(|c| [(c >> 16) as u8, (c >> 8) as u8, c as u8])
            .collect();
        for factor in [-0.1, -0.037, 0.0, 0.05, 0.1, 0.5] {
            let mut img = Rgb8::new(1 << 12, 1 << 12, all.clone());
            adjust_hue_in_place(&mut img, factor);
            let shift = ((factor * 255.0) as i32) as u8;
            for (p, o) in all.chunks_exact(3).zip(img.data.chunks_exact(3)) {
                let (h, s, v) = rgb_to_hsv(p[0], p[1], p[2]);
                let (r, g, b) = hsv_to_rgb(h.wrapping_add(shift), s, v);
                assert_eq!([r, g, b], o, "colour {p:?}, hue factor {factor}");
            }
        }
    }

    // The straightforward per-sample loops (Pillow's loop order) that the row-wise passes replaced.
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

    fn resized_crop_ref(
        img: &Rgb8,
        top: usize,
        left: usize,
        height: usize,
        width: usize,
        out_h: usize,
        out_w: usize,
    ) -> Rgb8 {
        assert!(
            top + height <= img.height && left + width <= img.width && height > 0 && width > 0,
            "crop box outside the image"
        );
        // Horizontal pass over the crop rows: [height, out_w].
        let mut tmp = vec![0u8; height * out_w * 3];
        if out_w == width {
            for y in 0..height {
                let src = ((top + y) * img.width + left) * 3;
                tmp[y * out_w * 3..(y + 1) * out_w * 3]
                    .copy_from_slice(&img.data[src..src + width * 3]);
            }
        } else {
            let c = coeffs(width, out_w, Filter::Bicubic);
            for y in 0..height {
                let row = &img.data[((top + y) * img.width + left) * 3
                    ..((top + y) * img.width + left + width) * 3];
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
        let c = coeffs(height, out_h, Filter::Bicubic);
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
    fn gaussian_blur_ref(img: &Rgb8, radius: f64) -> Rgb8 {
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

    /// The row-wise passes against the per-sample loops on random images of awkward sizes
    /// (1 px, odd, up- and down-scaling, blur radii wider than the image).
    #[test]
    fn row_wise_filters_equal_per_sample_loops() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..300 {
            let (w, h) = (rng.gen_range(1..60), rng.gen_range(1..60));
            let img = Rgb8::new(w, h, (0..w * h * 3).map(|_| rng.gen()).collect());
            let (cw, ch) = (rng.gen_range(1..=w), rng.gen_range(1..=h));
            let (left, top) = (rng.gen_range(0..=w - cw), rng.gen_range(0..=h - ch));
            let (ow, oh) = (rng.gen_range(1..80), rng.gen_range(1..80));
            assert_eq!(
                resized_crop(&img, top, left, ch, cw, oh, ow),
                resized_crop_ref(&img, top, left, ch, cw, oh, ow),
                "{w}x{h} crop {cw}x{ch} to {ow}x{oh}"
            );
            let radius = rng.gen_range(0.1..8.0);
            assert_eq!(
                gaussian_blur(&img, radius),
                gaussian_blur_ref(&img, radius),
                "{w}x{h} blur {radius}"
            );
        }
    }
}
