//! The official multi-crop augmentation (`main_ibot.py: DataAugmentationiBOT`).
//!
//! Per crop: RandomResizedCrop (bicubic) → horizontal flip (p 0.5) → ColorJitter(0.4, 0.4, 0.2,
//! 0.1) in a random order (p 0.8) → grayscale (p 0.2) → Gaussian blur (p 1.0 for global crop 1,
//! 0.1 for the other global crops, 0.5 for local crops; radius U(0.1, 2)) → solarisation (p 0.2,
//! global crops after the first) → ToTensor + ImageNet normalisation. The random draws come from
//! a per-image generator, so results do not depend on threading.

use anyhow::{ensure, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::ops::{self, Rgb8};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AugmentConfig {
    pub global_crops_number: usize,
    pub local_crops_number: usize,
    pub global_crops_size: usize,
    pub local_crops_size: usize,
    pub global_crops_scale: (f64, f64),
    pub local_crops_scale: (f64, f64),
    /// Aspect-ratio range of RandomResizedCrop.
    pub ratio: (f64, f64),
    pub flip_p: f64,
    pub jitter_p: f64,
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
    pub grayscale_p: f64,
    /// Blur probability of global crop 1, of the other global crops, of local crops.
    pub blur_p: (f64, f64, f64),
    pub blur_radius: (f64, f64),
    pub solarize_p: f64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for AugmentConfig {
    /// The official defaults (main_ibot.py), with 0 local crops as its `--local_crops_number`.
    fn default() -> Self {
        Self {
            global_crops_number: 2,
            local_crops_number: 0,
            global_crops_size: 224,
            local_crops_size: 96,
            global_crops_scale: (0.14, 1.0),
            local_crops_scale: (0.05, 0.4),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_p: 0.5,
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
            grayscale_p: 0.2,
            blur_p: (1.0, 0.1, 0.5),
            blur_radius: (0.1, 2.0),
            solarize_p: 0.2,
            mean: ops::IMAGENET_MEAN,
            std: ops::IMAGENET_STD,
        }
    }
}

impl AugmentConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.global_crops_number >= 1,
            "at least one global crop is needed"
        );
        ensure!(
            self.global_crops_size > 0 && self.local_crops_size > 0,
            "--global_crops_size and --local_crops_size must be at least 1"
        );
        for (name, (a, b)) in [
            ("global_crops_scale", self.global_crops_scale),
            ("local_crops_scale", self.local_crops_scale),
        ] {
            ensure!(
                0.0 < a && a <= b && b <= 1.0,
                "--{name} must satisfy 0 < min <= max <= 1, got ({a}, {b})"
            );
        }
        ensure!(
            0.0 <= self.hue && self.hue <= 0.5,
            "hue jitter must be in [0, 0.5]"
        );
        Ok(())
    }

    pub fn num_crops(&self) -> usize {
        self.global_crops_number + self.local_crops_number
    }

    /// Side of crop `i` (global crops first).
    pub fn crop_size(&self, i: usize) -> usize {
        if i < self.global_crops_number {
            self.global_crops_size
        } else {
            self.local_crops_size
        }
    }
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 draws of area and log-uniform aspect
/// ratio, then a centre crop. Returns `(top, left, height, width)`.
pub fn random_resized_crop_params(
    h: usize,
    w: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> (usize, usize, usize, usize) {
    let area = (h * w) as f64;
    let (lr0, lr1) = ((ratio.0 as f32).ln() as f64, (ratio.1 as f32).ln() as f64);
    for _ in 0..10 {
        let target_area = area * rng.gen_range_incl(scale.0, scale.1);
        let aspect = rng.gen_range_incl(lr0, lr1).exp();
        let cw = (target_area * aspect).sqrt().round_ties_even();
        let ch = (target_area / aspect).sqrt().round_ties_even();
        if cw > 0.0 && ch > 0.0 && cw <= w as f64 && ch <= h as f64 {
            let (cw, ch) = (cw as usize, ch as usize);
            let top = rng.gen_range(0..=h - ch);
            let left = rng.gen_range(0..=w - cw);
            return (top, left, ch, cw);
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (ch, cw) = if in_ratio < ratio.0.min(ratio.1) {
        (
            (w as f64 / ratio.0.min(ratio.1)).round_ties_even() as usize,
            w,
        )
    } else if in_ratio > ratio.0.max(ratio.1) {
        (
            h,
            (h as f64 * ratio.0.max(ratio.1)).round_ties_even() as usize,
        )
    } else {
        (h, w)
    };
    let (ch, cw) = (ch.clamp(1, h), cw.clamp(1, w));
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

/// Uniform draws on a closed range that is allowed to be empty (a == b), like `random.uniform`.
trait UniformIncl {
    fn gen_range_incl(&mut self, a: f64, b: f64) -> f64;
}

impl<R: Rng + ?Sized> UniformIncl for R {
    fn gen_range_incl(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * self.gen::<f64>()
    }
}

/// ColorJitter with factors drawn from [1-b, 1+b], [1-c, 1+c], [1-s, 1+s], [-h, h], applied
/// in a random order.
pub fn color_jitter(img: &mut Rgb8, cfg: &AugmentConfig, rng: &mut impl Rng) {
    let mut order = [0usize, 1, 2, 3];
    for i in (1..4).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    let b = rng.gen_range_incl((1.0 - cfg.brightness).max(0.0), 1.0 + cfg.brightness);
    let c = rng.gen_range_incl((1.0 - cfg.contrast).max(0.0), 1.0 + cfg.contrast);
    let s = rng.gen_range_incl((1.0 - cfg.saturation).max(0.0), 1.0 + cfg.saturation);
    let h = rng.gen_range_incl(-cfg.hue, cfg.hue);
    for op in order {
        match op {
            0 if cfg.brightness > 0.0 => ops::adjust_brightness_in_place(img, b),
            1 if cfg.contrast > 0.0 => ops::adjust_contrast_in_place(img, c),
            2 if cfg.saturation > 0.0 => ops::adjust_saturation_in_place(img, s),
            3 if cfg.hue > 0.0 => ops::adjust_hue_in_place(img, h),
            _ => {}
        }
    }
}

/// One augmented crop as uint8 (before normalisation). `index` is the crop number (global crops
/// first), which selects the size, scale range, blur probability and solarisation.
pub fn augment_crop(img: &Rgb8, cfg: &AugmentConfig, index: usize, rng: &mut impl Rng) -> Rgb8 {
    let global = index < cfg.global_crops_number;
    let (size, scale) = if global {
        (cfg.global_crops_size, cfg.global_crops_scale)
    } else {
        (cfg.local_crops_size, cfg.local_crops_scale)
    };
    let (top, left, h, w) =
        random_resized_crop_params(img.height, img.width, scale, cfg.ratio, rng);
    let mut out = ops::resized_crop(img, top, left, h, w, size, size);
    if rng.gen::<f64>() < cfg.flip_p {
        ops::hflip_in_place(&mut out);
    }
    if rng.gen::<f64>() < cfg.jitter_p {
        color_jitter(&mut out, cfg, rng);
    }
    if rng.gen::<f64>() < cfg.grayscale_p {
        ops::grayscale_in_place(&mut out);
    }
    let blur_p = match (global, index) {
        (true, 0) => cfg.blur_p.0,
        (true, _) => cfg.blur_p.1,
        (false, _) => cfg.blur_p.2,
    };
    if rng.gen::<f64>() <= blur_p {
        let r = rng.gen_range_incl(cfg.blur_radius.0, cfg.blur_radius.1);
        ops::gaussian_blur_in_place(&mut out, r);
    }
    if global && index > 0 && rng.gen::<f64>() < cfg.solarize_p {
        ops::solarize_in_place(&mut out);
    }
    out
}
