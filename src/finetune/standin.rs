//! stand-in until ft-aug lands: minimal versions of `crate::data::cls` (timm's transforms and
//! Mixup) under the same names, so that the lead can swap `use super::standin as cls` for
//! `use crate::data::cls` at merge. Only what `finetune` calls is here: RandomResizedCrop
//! (bicubic) + flip + normalisation (no RandAugment, no random erasing), the official evaluation
//! resize + centre crop, and a Mixup that returns the images unchanged with label-smoothed
//! one-hot targets.

use anyhow::{bail, ensure, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::data::augment::random_resized_crop_params;
use crate::data::ops::{self, Filter, Rgb8};

// stand-in until ft-aug lands
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Bicubic,
    Bilinear,
}

impl Interpolation {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "bicubic" => Self::Bicubic,
            "bilinear" => Self::Bilinear,
            other => bail!("unknown interpolation '{other}' (bicubic or bilinear)"),
        })
    }
    fn filter(self) -> Filter {
        match self {
            Self::Bicubic => Filter::Bicubic,
            Self::Bilinear => Filter::Bilinear,
        }
    }
}

// stand-in until ft-aug lands
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EraseMode {
    Const,
    Rand,
    Pixel,
}

impl EraseMode {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "const" => Self::Const,
            "rand" => Self::Rand,
            "pixel" => Self::Pixel,
            other => bail!("unknown random-erasing mode '{other}' (const, rand or pixel)"),
        })
    }
}

// stand-in until ft-aug lands
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClsAugConfig {
    pub input_size: usize,
    pub color_jitter: f64,
    pub aa: Option<String>,
    pub train_interpolation: Interpolation,
    pub reprob: f64,
    pub remode: EraseMode,
    pub recount: usize,
    pub crop_pct: Option<f64>,
    pub eval_interpolation: Interpolation,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub scale: (f64, f64),
    pub ratio: (f64, f64),
    pub hflip: f64,
}

impl Default for ClsAugConfig {
    fn default() -> Self {
        Self {
            input_size: 224,
            color_jitter: 0.4,
            aa: Some("rand-m9-mstd0.5-inc1".into()),
            train_interpolation: Interpolation::Bicubic,
            reprob: 0.25,
            remode: EraseMode::Pixel,
            recount: 1,
            crop_pct: None,
            eval_interpolation: Interpolation::Bilinear,
            mean: ops::IMAGENET_MEAN,
            std: ops::IMAGENET_STD,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: 0.5,
        }
    }
}

impl ClsAugConfig {
    pub fn deit_transfer() -> Self {
        Self {
            crop_pct: Some(224.0 / 256.0),
            eval_interpolation: Interpolation::Bicubic,
            ..Self::default()
        }
    }
    pub fn resize_im(&self) -> bool {
        self.input_size > 32
    }
    pub fn eval_crop_pct(&self) -> f64 {
        self.crop_pct
            .unwrap_or(if self.input_size < 384 { 224.0 / 256.0 } else { 1.0 })
    }
    pub fn eval_resize_size(&self) -> usize {
        (self.input_size as f64 / self.eval_crop_pct()) as usize
    }
    pub fn validate(&self) -> Result<()> {
        ensure!(self.input_size > 0, "input_size must be positive");
        ensure!((0.0..=1.0).contains(&self.reprob), "reprob must be in [0, 1]");
        Ok(())
    }
}

fn normalise(img: &Rgb8, cfg: &ClsAugConfig) -> Vec<f32> {
    let mut out = vec![0f32; 3 * img.width * img.height];
    ops::to_tensor_normalize_into(img, cfg.mean, cfg.std, &mut out);
    out
}

// stand-in until ft-aug lands
pub struct TrainTransform {
    cfg: ClsAugConfig,
}

impl TrainTransform {
    pub fn new(cfg: &ClsAugConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg: cfg.clone() })
    }
    pub fn apply(&self, img: &Rgb8, rng: &mut impl Rng) -> Result<Vec<f32>> {
        let s = self.cfg.input_size;
        let mut v = if self.cfg.resize_im() {
            let (top, left, h, w) = random_resized_crop_params(
                img.height,
                img.width,
                self.cfg.scale,
                self.cfg.ratio,
                rng,
            );
            ops::resized_crop_with(img, top, left, h, w, s, s, self.cfg.train_interpolation.filter())
        } else {
            // RandomCrop(size, padding=4): zero padding, then a uniform crop.
            let (pw, ph) = (img.width + 8, img.height + 8);
            ensure!(pw >= s && ph >= s, "images of {}x{} are too small for RandomCrop({s}, padding=4)", img.width, img.height);
            let mut padded = Rgb8::new(pw, ph, vec![0; pw * ph * 3]);
            for y in 0..img.height {
                let src = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
                let o = ((y + 4) * pw + 4) * 3;
                padded.data[o..o + src.len()].copy_from_slice(src);
            }
            let top = rng.gen_range(0..=ph - s);
            let left = rng.gen_range(0..=pw - s);
            ops::resized_crop(&padded, top, left, s, s, s, s)
        };
        if rng.gen::<f64>() < self.cfg.hflip {
            ops::hflip_in_place(&mut v);
        }
        Ok(normalise(&v, &self.cfg))
    }
}

// stand-in until ft-aug lands
pub struct EvalTransform {
    cfg: ClsAugConfig,
}

impl EvalTransform {
    pub fn new(cfg: &ClsAugConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg: cfg.clone() })
    }
    pub fn apply(&self, img: &Rgb8) -> Result<Vec<f32>> {
        let size = self.cfg.input_size;
        if !self.cfg.resize_im() {
            ensure!(
                img.width == size && img.height == size,
                "with --input_size {size} (32 or less) images are not resized, as officially; this image is {}x{}",
                img.width,
                img.height
            );
            return Ok(normalise(img, &self.cfg));
        }
        let short = self.cfg.eval_resize_size();
        let (w, h) = (img.width, img.height);
        let (nw, nh) = if w <= h {
            (short, short * h / w)
        } else {
            (short * w / h, short)
        };
        let f = self.cfg.eval_interpolation.filter();
        let resized = ops::resized_crop_with(img, 0, 0, h, w, nh, nw, f);
        let top = ((nh - size) as f64 / 2.0).round_ties_even() as usize;
        let left = ((nw - size) as f64 / 2.0).round_ties_even() as usize;
        let c = ops::resized_crop(&resized, top, left, size, size, size, size);
        Ok(normalise(&c, &self.cfg))
    }
}

// stand-in until ft-aug lands
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixupMode {
    Batch,
    Pair,
    Elem,
}

impl MixupMode {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "batch" => Self::Batch,
            "pair" => Self::Pair,
            "elem" => Self::Elem,
            other => bail!("unknown mixup mode '{other}' (batch, pair or elem)"),
        })
    }
}

// stand-in until ft-aug lands
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MixupConfig {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    pub cutmix_minmax: Option<(f64, f64)>,
    pub prob: f64,
    pub switch_prob: f64,
    pub mode: MixupMode,
    pub correct_lam: bool,
    pub label_smoothing: f64,
    pub num_classes: usize,
}

impl Default for MixupConfig {
    fn default() -> Self {
        Self {
            mixup_alpha: 0.8,
            cutmix_alpha: 1.0,
            cutmix_minmax: None,
            prob: 1.0,
            switch_prob: 0.5,
            mode: MixupMode::Batch,
            correct_lam: true,
            label_smoothing: 0.1,
            num_classes: 1000,
        }
    }
}

impl MixupConfig {
    pub fn active(&self) -> bool {
        self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0 || self.cutmix_minmax.is_some()
    }
}

// stand-in until ft-aug lands
pub struct Mixup {
    cfg: MixupConfig,
}

impl Mixup {
    pub fn new(cfg: &MixupConfig) -> Result<Self> {
        Ok(Self { cfg: cfg.clone() })
    }
    /// stand-in: the images unchanged and `one_hot * (1 - s + s/K) + s/K` targets.
    pub fn apply(
        &self,
        images: &Tensor,
        targets: &Tensor,
        _rng: &mut impl Rng,
    ) -> Result<(Tensor, Tensor)> {
        let k = self.cfg.num_classes as i64;
        let off = self.cfg.label_smoothing / k as f64;
        let on = 1.0 - self.cfg.label_smoothing + off;
        let oh = targets.to_kind(Kind::Int64).one_hot(k).to_kind(Kind::Float);
        Ok((images.shallow_clone(), oh * (on - off) + off))
    }
}
