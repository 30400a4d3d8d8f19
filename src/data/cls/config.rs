//! The options of the fine-tuning transforms, named as the official scripts' arguments.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

use crate::data::ops::{self, Filter};

/// `--train_interpolation`: timm's `str_to_interp_mode` names that Pillow resamples with here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Bilinear,
    Bicubic,
    /// timm's `'random'`: bilinear or bicubic, chosen per call.
    Random,
}

impl Interpolation {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "bilinear" => Self::Bilinear,
            "bicubic" => Self::Bicubic,
            "random" => Self::Random,
            "nearest" | "box" | "hamming" | "lanczos" => {
                bail!("interpolation '{s}' is not supported (use bicubic, bilinear or random)")
            }
            other => bail!("unknown interpolation '{other}' (bicubic, bilinear or random)"),
        })
    }

    /// The filter of one call: `Random` takes `random.choice((BILINEAR, BICUBIC))`.
    pub fn pick(self, draws: &mut impl super::Draws) -> Filter {
        match self {
            Self::Bilinear => Filter::Bilinear,
            Self::Bicubic => Filter::Bicubic,
            Self::Random => [Filter::Bilinear, Filter::Bicubic][draws.choice(2)],
        }
    }
}

/// `--remode`: what random erasing writes (timm's `RandomErasing(mode=...)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EraseMode {
    /// Zeros (the normalised mean).
    Const,
    /// One standard-normal value per channel.
    Rand,
    /// One standard-normal value per element.
    Pixel,
}

impl EraseMode {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "const" | "" => Self::Const,
            "rand" => Self::Rand,
            "pixel" => Self::Pixel,
            other => bail!("unknown random-erasing mode '{other}' (pixel, rand or const)"),
        })
    }
}

/// The fine-tuning transforms' options. Defaults: the official ImageNet fine-tuning recipe
/// (`run.sh imagenet_cls` → classification_layer_decay/run_class_finetuning.py, which passes
/// `--imagenet_default_mean_and_std`): timm's `create_transform(is_training=True)` with
/// color_jitter 0.4, `rand-m9-mstd0.5-inc1`, bicubic, reprob 0.25 pixel ×1, and for evaluation
/// Resize(int(size / crop_pct), BILINEAR — `interpolation=2` in that script) + CenterCrop, with
/// crop_pct 224/256 below 384 px and 1.0 from 384 on. [`ClsAugConfig::deit_transfer`] is
/// eval_cls.py's (transfer and semi-supervised recipes): the same training transform, and
/// Resize(int(256/224 · size), BICUBIC) for evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClsAugConfig {
    pub input_size: usize,
    /// `--color_jitter`: brightness = contrast = saturation jitter, used only without `aa`.
    pub color_jitter: f64,
    /// `--aa`: a RandAugment string (`rand-m9-mstd0.5-inc1`); `None` (or "none") for ColorJitter.
    pub aa: Option<String>,
    pub train_interpolation: Interpolation,
    /// `--reprob`, `--remode`, `--recount`.
    pub reprob: f64,
    pub remode: EraseMode,
    pub recount: usize,
    /// `--crop_pct` of the evaluation resize; `None`: 224/256 below 384 px, else 1.0.
    pub crop_pct: Option<f64>,
    /// Resampling of the evaluation resize.
    pub eval_interpolation: Interpolation,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// RandomResizedCrop's scale and aspect-ratio ranges.
    pub scale: (f64, f64),
    pub ratio: (f64, f64),
    /// Horizontal flip probability.
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
    /// eval_cls.py (DeiT transfer recipe; also semi_supervised/eval_cls.py): evaluation resize
    /// `int((256 / 224) * input_size)` bicubic. (`int(size / (224/256))` equals it for every
    /// size from 33 to 4095, checked in Python, so it is expressed as that crop_pct.)
    pub fn deit_transfer() -> Self {
        Self {
            crop_pct: Some(224.0 / 256.0),
            eval_interpolation: Interpolation::Bicubic,
            ..Self::default()
        }
    }

    /// The `aa` string, `None` when absent, empty or "none" (eval_cls.py's spelling).
    pub fn auto_augment(&self) -> Option<&str> {
        self.aa
            .as_deref()
            .filter(|s| !s.is_empty() && !s.eq_ignore_ascii_case("none"))
    }

    /// Whether images are resized at all (the official `resize_im = input_size > 32`: at 32 px
    /// and below training uses RandomCrop(size, padding=4) and evaluation no resize).
    pub fn resize_im(&self) -> bool {
        self.input_size > 32
    }

    /// The evaluation crop_pct as the official build_transform sets it.
    pub fn eval_crop_pct(&self) -> f64 {
        self.crop_pct.unwrap_or(if self.input_size < 384 {
            224.0 / 256.0
        } else {
            1.0
        })
    }

    /// The shorter side of the evaluation resize: `int(input_size / crop_pct)`.
    pub fn eval_resize_size(&self) -> usize {
        (self.input_size as f64 / self.eval_crop_pct()) as usize
    }

    /// The fill colour of RandAugment's geometric ops: timm's
    /// `tuple(min(255, round(255 * x)) for x in mean)` (Python rounds half to even).
    pub fn img_mean_fill(&self) -> [u8; 3] {
        self.mean
            .map(|m| (255.0 * m as f64).round_ties_even().clamp(0.0, 255.0) as u8)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.input_size > 0, "input_size must be positive");
        ensure!(
            (0.0..=1.0).contains(&self.reprob),
            "reprob must be in [0, 1], got {}",
            self.reprob
        );
        ensure!(self.recount >= 1, "recount must be at least 1");
        ensure!(
            0.0 < self.scale.0 && self.scale.0 <= self.scale.1,
            "scale must satisfy 0 < min <= max, got {:?}",
            self.scale
        );
        ensure!(
            0.0 < self.ratio.0 && self.ratio.0 <= self.ratio.1,
            "ratio must satisfy 0 < min <= max, got {:?}",
            self.ratio
        );
        ensure!(
            self.color_jitter >= 0.0,
            "color_jitter must be non-negative"
        );
        if let Some(c) = self.crop_pct {
            ensure!(
                c > 0.0 && c.is_finite(),
                "crop_pct must be positive, got {c}"
            );
        }
        ensure!(
            self.eval_interpolation != Interpolation::Random,
            "the evaluation resize needs a fixed interpolation (bicubic or bilinear)"
        );
        ensure!(
            self.std.iter().all(|&s| s != 0.0),
            "std must not contain zeros"
        );
        Ok(())
    }
}
