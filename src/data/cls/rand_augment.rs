//! timm's RandAugment (`timm.data.auto_augment.rand_augment_transform`): the config string,
//! the level functions and the ops of `_RAND_INCREASING_TRANSFORMS` / `_RAND_TRANSFORMS`.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::config::Interpolation;
use super::draws::Draws;
use super::pil;
use crate::data::ops::{self, Filter, Rgb8};

/// timm's `_LEVEL_DENOM`: magnitudes are tenths of the full op strength.
pub const LEVEL_DENOM: f64 = 10.0;

/// The ops of timm's RandAugment sets, named as timm names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RandOp {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    PosterizeIncreasing,
    Solarize,
    SolarizeIncreasing,
    SolarizeAdd,
    Color,
    ColorIncreasing,
    Contrast,
    ContrastIncreasing,
    Brightness,
    BrightnessIncreasing,
    Sharpness,
    SharpnessIncreasing,
    ShearX,
    ShearY,
    TranslateXRel,
    TranslateYRel,
}

use RandOp::*;

/// timm's `_RAND_INCREASING_TRANSFORMS` (`inc1`), in timm's order (the order matters: ops
/// are drawn by index).
pub const RAND_INCREASING_TRANSFORMS: [RandOp; 15] = [
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    PosterizeIncreasing,
    SolarizeIncreasing,
    SolarizeAdd,
    ColorIncreasing,
    ContrastIncreasing,
    BrightnessIncreasing,
    SharpnessIncreasing,
    ShearX,
    ShearY,
    TranslateXRel,
    TranslateYRel,
];

/// timm's `_RAND_TRANSFORMS` (`inc0`, the default without `inc`).
pub const RAND_TRANSFORMS: [RandOp; 15] = [
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    Solarize,
    SolarizeAdd,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateXRel,
    TranslateYRel,
];

impl RandOp {
    pub fn name(self) -> &'static str {
        match self {
            AutoContrast => "AutoContrast",
            Equalize => "Equalize",
            Invert => "Invert",
            Rotate => "Rotate",
            Posterize => "Posterize",
            PosterizeIncreasing => "PosterizeIncreasing",
            Solarize => "Solarize",
            SolarizeIncreasing => "SolarizeIncreasing",
            SolarizeAdd => "SolarizeAdd",
            Color => "Color",
            ColorIncreasing => "ColorIncreasing",
            Contrast => "Contrast",
            ContrastIncreasing => "ContrastIncreasing",
            Brightness => "Brightness",
            BrightnessIncreasing => "BrightnessIncreasing",
            Sharpness => "Sharpness",
            SharpnessIncreasing => "SharpnessIncreasing",
            ShearX => "ShearX",
            ShearY => "ShearY",
            TranslateXRel => "TranslateXRel",
            TranslateYRel => "TranslateYRel",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        RAND_INCREASING_TRANSFORMS
            .iter()
            .chain(RAND_TRANSFORMS.iter())
            .copied()
            .find(|o| o.name() == s)
    }

    /// Whether the level function draws a sign (`_randomly_negate`).
    pub fn draws_sign(self) -> bool {
        matches!(
            self,
            Rotate
                | ColorIncreasing
                | ContrastIncreasing
                | BrightnessIncreasing
                | SharpnessIncreasing
                | ShearX
                | ShearY
                | TranslateXRel
                | TranslateYRel
        )
    }

    /// Whether the op resamples (and so draws its filter when the interpolation is random).
    pub fn is_geometric(self) -> bool {
        matches!(
            self,
            Rotate | ShearX | ShearY | TranslateXRel | TranslateYRel
        )
    }
}

/// The op's argument at `magnitude` (already noised and clamped) as timm's `LEVEL_TO_ARG`
/// computes it; `negate` is the outcome of `_randomly_negate` (`random() > 0.5`), ignored by
/// ops without a sign. `translate_pct` is timm's hparam (0.45 unless set).
pub fn level_arg(op: RandOp, magnitude: f64, negate: bool, translate_pct: f64) -> f64 {
    let l = magnitude / LEVEL_DENOM;
    let signed = |v: f64| if negate { -v } else { v };
    match op {
        AutoContrast | Equalize | Invert => 0.0,
        Rotate => signed(l * 30.0),
        Posterize => (l * 4.0) as i64 as f64,
        PosterizeIncreasing => (4 - (l * 4.0) as i64) as f64,
        Solarize => ((l * 256.0) as i64).min(256) as f64,
        SolarizeIncreasing => (256 - ((l * 256.0) as i64).min(256)) as f64,
        SolarizeAdd => ((l * 110.0) as i64).min(128) as f64,
        Color | Contrast | Brightness | Sharpness => l * 1.8 + 0.1,
        ColorIncreasing | ContrastIncreasing | BrightnessIncreasing | SharpnessIncreasing => {
            (1.0 + signed(l * 0.9)).max(0.1)
        }
        ShearX | ShearY => signed(l * 0.3),
        TranslateXRel | TranslateYRel => signed(l * translate_pct),
    }
}

/// The op with its level argument `arg` (see [`level_arg`]), as timm's `NAME_TO_OP`
/// functions call Pillow; `filter` and `fill` are used by the geometric ops.
///
/// One deliberate difference: Posterize with 0 bits (magnitude 10 of PosterizeIncreasing,
/// reached when the magnitude noise pushes past 10) gives a black image, as Pillow did when
/// the official code was written; Pillow ≥ 10.? refuses 0 bits with a ValueError, which would
/// crash timm's pipeline.
pub fn apply_op(img: &Rgb8, op: RandOp, arg: f64, filter: Filter, fill: [u8; 3]) -> Rgb8 {
    match op {
        AutoContrast => pil::autocontrast(img),
        Equalize => pil::equalize(img),
        Invert => pil::invert(img),
        Rotate => pil::rotate(img, arg, filter, fill),
        Posterize | PosterizeIncreasing => pil::posterize(img, arg.max(0.0) as u32),
        Solarize | SolarizeIncreasing => pil::solarize(img, arg as i64),
        SolarizeAdd => pil::solarize_add(img, arg as i64, 128),
        Color | ColorIncreasing => ops::adjust_saturation(img, arg),
        Contrast | ContrastIncreasing => ops::adjust_contrast(img, arg),
        Brightness | BrightnessIncreasing => ops::adjust_brightness(img, arg),
        Sharpness | SharpnessIncreasing => pil::sharpness(img, arg),
        ShearX => pil::affine(img, [1.0, arg, 0.0, 0.0, 1.0, 0.0], filter, fill),
        ShearY => pil::affine(img, [1.0, 0.0, 0.0, arg, 1.0, 0.0], filter, fill),
        TranslateXRel => {
            let pixels = arg * img.width as f64;
            pil::affine(img, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], filter, fill)
        }
        TranslateYRel => {
            let pixels = arg * img.height as f64;
            pil::affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, pixels], filter, fill)
        }
    }
}

/// One RandAugment op at a given magnitude with the given draws: `negate` (the sign draw),
/// `filter` (the resampling filter), `fill` (the fill colour), timm's default translate_pct.
pub fn rand_augment_op(
    img: &Rgb8,
    op: RandOp,
    magnitude: f64,
    negate: bool,
    filter: Filter,
    fill: [u8; 3],
) -> Rgb8 {
    apply_op(
        img,
        op,
        level_arg(op, magnitude, negate, 0.45),
        filter,
        fill,
    )
}

/// A parsed `rand-…` string (timm's `rand_augment_transform`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RandAugmentConfig {
    /// `m`: magnitude (default 10).
    pub magnitude: f64,
    /// `n`: ops per image (default 2).
    pub num_layers: usize,
    /// `p`: probability of each op (default 0.5).
    pub prob: f64,
    /// `mstd`: std of the magnitude noise (infinite: uniform in [0, m]; default 0).
    pub magnitude_std: f64,
    /// `mmax`: upper clamp of the noised magnitude (default 10).
    pub magnitude_max: Option<f64>,
    /// `inc`: the increasing op set.
    pub increasing: bool,
}

impl RandAugmentConfig {
    /// Parses e.g. `rand-m9-mstd0.5-inc1` as timm does (sections in any order; each is a key
    /// followed by a number). Unknown sections, transform sets (`t…`) and sections without a
    /// number are refused with the string in the error (timm skips the last silently).
    pub fn parse(s: &str) -> Result<Self> {
        let mut parts = s.split('-');
        if parts.next() != Some("rand") {
            bail!(
                "unsupported auto-augment policy '{s}': only RandAugment strings ('rand-m9-mstd0.5-inc1', \
                 sections m, n, p, mstd, mmax, inc) are implemented"
            );
        }
        let mut c = Self {
            magnitude: LEVEL_DENOM,
            num_layers: 2,
            prob: 0.5,
            magnitude_std: 0.0,
            magnitude_max: None,
            increasing: false,
        };
        for sec in parts {
            let bad = || format!("bad RandAugment section '{sec}' in '{s}'");
            if sec.starts_with('t') {
                bail!("RandAugment transform sets ('{sec}' in '{s}') are not supported");
            }
            let Some(at) = sec.find(|ch: char| ch.is_ascii_digit()) else {
                bail!("RandAugment section '{sec}' in '{s}' has no value");
            };
            let (key, val) = sec.split_at(at);
            let int = || val.parse::<i64>().with_context(bad);
            let float = || val.parse::<f64>().with_context(bad);
            match key {
                "mstd" => {
                    let v = float()?;
                    c.magnitude_std = if v > 100.0 { f64::INFINITY } else { v };
                }
                "mmax" => c.magnitude_max = Some(int()? as f64),
                "inc" => c.increasing = int()? != 0,
                "m" => c.magnitude = int()? as f64,
                "n" => {
                    let n = int()?;
                    ensure!(n >= 0, "{}", bad());
                    c.num_layers = n as usize;
                }
                "p" => c.prob = float()?,
                _ => bail!("unknown RandAugment section '{sec}' in '{s}'"),
            }
        }
        Ok(c)
    }

    pub fn ops(&self) -> &'static [RandOp; 15] {
        if self.increasing {
            &RAND_INCREASING_TRANSFORMS
        } else {
            &RAND_TRANSFORMS
        }
    }
}

/// RandAugment with its hparams as `create_transform` sets them.
#[derive(Debug, Clone)]
pub struct RandAugment {
    pub config: RandAugmentConfig,
    pub fill: [u8; 3],
    pub interpolation: Interpolation,
    pub translate_pct: f64,
}

impl RandAugment {
    /// `RandAugment.__call__`: `n` ops drawn with replacement (`np.random.choice`), then each
    /// applied with probability `p` (`random() > p` skips), magnitude noise
    /// (`gauss(m, mstd)`, or `uniform(0, m)` for infinite mstd), clamp to [0, mmax or 10],
    /// sign draw, filter draw (random interpolation only).
    pub fn apply_with(&self, img: &Rgb8, draws: &mut impl Draws) -> Rgb8 {
        let set = self.config.ops();
        let chosen: Vec<RandOp> = (0..self.config.num_layers)
            .map(|_| set[draws.choice(set.len())])
            .collect();
        let mut img = img.clone();
        for op in chosen {
            if self.config.prob < 1.0 && draws.random() > self.config.prob {
                continue;
            }
            let mut m = self.config.magnitude;
            if self.config.magnitude_std > 0.0 {
                m = if self.config.magnitude_std.is_infinite() {
                    draws.uniform(0.0, m)
                } else {
                    draws.gauss(m, self.config.magnitude_std)
                };
            }
            let upper = match self.config.magnitude_max {
                Some(v) if v != 0.0 => v,
                _ => LEVEL_DENOM,
            };
            let m = m.min(upper).max(0.0);
            let negate = op.draws_sign() && draws.random() > 0.5;
            let filter = if op.is_geometric() {
                self.interpolation.pick(draws)
            } else {
                Filter::Bicubic
            };
            let arg = level_arg(op, m, negate, self.translate_pct);
            img = apply_op(&img, op, arg, filter, self.fill);
        }
        img
    }
}
