//! The training and evaluation transforms of the official fine-tuning scripts
//! (`build_transform` of classification_layer_decay/run_class_finetuning.py and eval_cls.py).

use anyhow::{bail, ensure, Result};
use rand::Rng;

use super::config::{ClsAugConfig, Interpolation};
use super::draws::{Draws, RngDraws};
use super::pil;
use super::rand_augment::{RandAugment, RandAugmentConfig};
use super::random_erasing::RandomErasing;
use crate::data::ops::{self, Filter, Rgb8};

/// timm's `RandomResizedCropAndInterpolation.get_params`: up to 10 tries of
/// `uniform(scale) · area` and `exp(uniform(ln ratio))` (math.log, double precision), sides
/// rounded half to even, accepted when they fit (no positivity check, unlike torchvision);
/// else the centre crop of the clamped aspect ratio. Returns `(top, left, height, width)`.
pub fn rrc_params(
    h: usize,
    w: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    draws: &mut impl Draws,
) -> (usize, usize, usize, usize) {
    let area = (w * h) as f64;
    for _ in 0..10 {
        let target_area = draws.uniform(scale.0, scale.1) * area;
        let aspect = draws.uniform(ratio.0.ln(), ratio.1.ln()).exp();
        let tw = (target_area * aspect).sqrt().round_ties_even() as usize;
        let th = (target_area / aspect).sqrt().round_ties_even() as usize;
        if tw <= w && th <= h {
            let i = draws.randint(0, (h - th) as i64) as usize;
            let j = draws.randint(0, (w - tw) as i64) as usize;
            return (i, j, th, tw);
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (lo, hi) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let (th, tw) = if in_ratio < lo {
        ((w as f64 / lo).round_ties_even() as usize, w)
    } else if in_ratio > hi {
        (h, (h as f64 * hi).round_ties_even() as usize)
    } else {
        (h, w)
    };
    ((h - th.min(h)) / 2, (w - tw.min(w)) / 2, th, tw)
}

/// torchvision's `ColorJitter(b, c, s)` (timm's scalar `color_jitter`: no hue) given its draws:
/// `randperm(4)`, then one `uniform` per non-zero factor in the order brightness, contrast,
/// saturation.
pub fn color_jitter_with(img: &mut Rgb8, strength: (f64, f64, f64), draws: &mut impl Draws) {
    let order = draws.permutation(4);
    let mut factor = |s: f64| (s > 0.0).then(|| draws.uniform((1.0 - s).max(0.0), 1.0 + s));
    let b = factor(strength.0);
    let c = factor(strength.1);
    let s = factor(strength.2);
    for op in order {
        match (op, b, c, s) {
            (0, Some(b), _, _) => ops::adjust_brightness_in_place(img, b),
            (1, _, Some(c), _) => ops::adjust_contrast_in_place(img, c),
            (2, _, _, Some(s)) => ops::adjust_saturation_in_place(img, s),
            _ => {}
        }
    }
}

/// The training transform: timm's `transforms_imagenet_train` as the official scripts call
/// `create_transform` — RandomResizedCropAndInterpolation (scale, ratio, interpolation;
/// replaced by RandomCrop(size, padding=4) at 32 px and below, as the scripts do), horizontal
/// flip, RandAugment (or ColorJitter without `aa`), ToTensor + Normalize, RandomErasing.
#[derive(Debug, Clone)]
pub struct TrainTransform {
    cfg: ClsAugConfig,
    rand_augment: Option<RandAugment>,
    erasing: Option<RandomErasing>,
}

impl TrainTransform {
    pub fn new(cfg: &ClsAugConfig) -> Result<Self> {
        cfg.validate()?;
        let rand_augment = match cfg.auto_augment() {
            Some(s) => Some(RandAugment {
                config: RandAugmentConfig::parse(s)?,
                fill: cfg.img_mean_fill(),
                interpolation: cfg.train_interpolation,
                translate_pct: 0.45,
            }),
            None => None,
        };
        let erasing = (cfg.reprob > 0.0)
            .then(|| RandomErasing::new(cfg.reprob, cfg.remode, cfg.recount))
            .transpose()?;
        Ok(Self {
            cfg: cfg.clone(),
            rand_augment,
            erasing,
        })
    }

    pub fn config(&self) -> &ClsAugConfig {
        &self.cfg
    }

    /// Floats per output image (`3 · input_size²`).
    pub fn output_len(&self) -> usize {
        3 * self.cfg.input_size * self.cfg.input_size
    }

    /// The uint8 image after the Pillow stages (crop, flip, RandAugment / ColorJitter).
    pub fn augment_u8(&self, img: &Rgb8, draws: &mut impl Draws) -> Result<Rgb8> {
        let s = self.cfg.input_size;
        ensure!(
            img.width > 0 && img.height > 0,
            "cannot augment an empty image"
        );
        let mut out = if self.cfg.resize_im() {
            let (top, left, h, w) =
                rrc_params(img.height, img.width, self.cfg.scale, self.cfg.ratio, draws);
            if h == 0 || w == 0 {
                bail!(
                    "image of {}x{} is too small for RandomResizedCrop (a {w}x{h} crop was drawn)",
                    img.width,
                    img.height
                );
            }
            let filter = self.cfg.train_interpolation.pick(draws);
            ops::resized_crop_with(img, top, left, h, w, s, s, filter)
        } else {
            // torchvision RandomCrop(s, padding=4): zero padding, then randint offsets
            // (none drawn when the padded image is exactly s x s).
            let p = pil::pad(img, 4, 4, 4, 4);
            ensure!(
                p.width >= s && p.height >= s,
                "image of {}x{} is smaller than the {s}x{s} crop even after 4 px padding",
                img.width,
                img.height
            );
            if p.width == s && p.height == s {
                p
            } else {
                let i = draws.randint(0, (p.height - s) as i64) as usize;
                let j = draws.randint(0, (p.width - s) as i64) as usize;
                pil::crop(&p, i, j, s, s)
            }
        };
        if self.cfg.hflip > 0.0 && draws.random() < self.cfg.hflip {
            ops::hflip_in_place(&mut out);
        }
        match &self.rand_augment {
            Some(ra) => out = ra.apply_with(&out, draws),
            None => {
                let j = self.cfg.color_jitter;
                color_jitter_with(&mut out, (j, j, j), draws);
            }
        }
        Ok(out)
    }

    /// The whole transform into `out` (`3 · input_size²` floats, CHW, normalised, erased).
    pub fn apply_with(&self, img: &Rgb8, draws: &mut impl Draws, out: &mut [f32]) -> Result<()> {
        ensure!(
            out.len() == self.output_len(),
            "output buffer holds {} floats, the transform writes {}",
            out.len(),
            self.output_len()
        );
        let aug = self.augment_u8(img, draws)?;
        ops::to_tensor_normalize_into(&aug, self.cfg.mean, self.cfg.std, out);
        if let Some(e) = &self.erasing {
            let s = self.cfg.input_size;
            e.apply_with(out, 3, s, s, draws);
        }
        Ok(())
    }

    /// [`TrainTransform::apply_with`] drawing from `rng`, into `out`.
    pub fn apply_into(&self, img: &Rgb8, rng: &mut impl Rng, out: &mut [f32]) -> Result<()> {
        self.apply_with(img, &mut RngDraws(rng), out)
    }

    /// [`TrainTransform::apply_with`] drawing from `rng`, into a new buffer.
    pub fn apply(&self, img: &Rgb8, rng: &mut impl Rng) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.output_len()];
        self.apply_into(img, rng, &mut out)?;
        Ok(out)
    }
}

/// The evaluation transform: Resize(int(size / crop_pct)) of the shorter side + CenterCrop(size)
/// (neither at 32 px and below, as the official scripts) + ToTensor + Normalize.
#[derive(Debug, Clone)]
pub struct EvalTransform {
    cfg: ClsAugConfig,
    filter: Filter,
}

impl EvalTransform {
    pub fn new(cfg: &ClsAugConfig) -> Result<Self> {
        cfg.validate()?;
        let filter = match cfg.eval_interpolation {
            Interpolation::Bicubic => Filter::Bicubic,
            Interpolation::Bilinear => Filter::Bilinear,
            Interpolation::Random => bail!("the evaluation resize needs a fixed interpolation"),
        };
        Ok(Self {
            cfg: cfg.clone(),
            filter,
        })
    }

    pub fn output_len(&self) -> usize {
        3 * self.cfg.input_size * self.cfg.input_size
    }

    /// The uint8 image after resize and crop.
    pub fn resize_crop(&self, img: &Rgb8) -> Result<Rgb8> {
        ensure!(
            img.width > 0 && img.height > 0,
            "cannot transform an empty image"
        );
        let s = self.cfg.input_size;
        let out = if self.cfg.resize_im() {
            let r = pil::resize_shorter(img, self.cfg.eval_resize_size(), self.filter);
            pil::center_crop(&r, s)
        } else {
            img.clone()
        };
        ensure!(
            out.width == s && out.height == s,
            "a {}x{} image gives {}x{} at input_size {s}: below 33 px the official evaluation \
             transform does not resize, so the images must already be {s}x{s}",
            img.width,
            img.height,
            out.width,
            out.height
        );
        Ok(out)
    }

    pub fn apply_into(&self, img: &Rgb8, out: &mut [f32]) -> Result<()> {
        ensure!(
            out.len() == self.output_len(),
            "output buffer holds {} floats, the transform writes {}",
            out.len(),
            self.output_len()
        );
        let r = self.resize_crop(img)?;
        ops::to_tensor_normalize_into(&r, self.cfg.mean, self.cfg.std, out);
        Ok(())
    }

    pub fn apply(&self, img: &Rgb8) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.output_len()];
        self.apply_into(img, &mut out)?;
        Ok(out)
    }
}
