//! Masks for masked image modeling, as the official `loader.py: ImageFolderMask`.
//!
//! * `block` (BEiT-style): rectangles of area U(low, remaining) with `low = (min(H, W) // 3)²`
//!   and log-uniform aspect ratio in `pred_aspect_ratio`, 10 attempts each, added until the
//!   target count is reached or an attempt round adds nothing. Never more than the target.
//! * `rand`: exactly `int(ratio·H·W)` patches chosen uniformly.
//!
//! The ratio per image is `U(r - var, r + var)` (or `r` when var is 0); with several ratios one
//! is drawn per image; before `pred_start_epoch` the ratio is 0 (empty masks).

use anyhow::{bail, ensure, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PredShape {
    Block,
    Rand,
}

impl std::str::FromStr for PredShape {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "block" => Ok(Self::Block),
            "rand" => Ok(Self::Rand),
            other => bail!("unknown --pred_shape '{other}' (expected block or rand)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskConfig {
    /// Pixels per mask cell: the patch size for ViT (patch_size·8 for Swin).
    pub patch_size: usize,
    pub pred_ratio: Vec<f64>,
    /// One value, or one per `pred_ratio` entry.
    pub pred_ratio_var: Vec<f64>,
    pub pred_shape: PredShape,
    pub pred_aspect_ratio: (f64, f64),
    pub pred_start_epoch: usize,
}

impl Default for MaskConfig {
    fn default() -> Self {
        Self {
            patch_size: 16,
            pred_ratio: vec![0.3],
            pred_ratio_var: vec![0.0],
            pred_shape: PredShape::Block,
            pred_aspect_ratio: (0.3, 1.0 / 0.3),
            pred_start_epoch: 0,
        }
    }
}

impl MaskConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.patch_size > 0, "mask patch size must be positive");
        ensure!(
            !self.pred_ratio.is_empty(),
            "--pred_ratio needs at least one value"
        );
        ensure!(
            self.pred_ratio_var.len() == 1 || self.pred_ratio_var.len() == self.pred_ratio.len(),
            "--pred_ratio_var needs one value or one per --pred_ratio value"
        );
        for (i, &r) in self.pred_ratio.iter().enumerate() {
            let v = self.var(i);
            ensure!((0.0..=1.0).contains(&r), "pred_ratio {r} is outside [0, 1]");
            ensure!(
                v >= 0.0 && r >= v,
                "pred_ratio {r} must be >= pred_ratio_var {v} >= 0"
            );
            ensure!(
                r + v <= 1.0,
                "pred_ratio + pred_ratio_var must not exceed 1 ({r} + {v})"
            );
        }
        ensure!(
            self.pred_aspect_ratio.0 > 0.0 && self.pred_aspect_ratio.1 > 0.0,
            "mask aspect ratios must be positive"
        );
        Ok(())
    }

    fn var(&self, i: usize) -> f64 {
        if self.pred_ratio_var.len() == 1 {
            self.pred_ratio_var[0]
        } else {
            self.pred_ratio_var[i]
        }
    }

    /// The masking ratio for one image at `epoch`.
    pub fn draw_ratio(&self, epoch: usize, rng: &mut impl Rng) -> f64 {
        if epoch < self.pred_start_epoch {
            return 0.0;
        }
        let drawn: Vec<f64> = self
            .pred_ratio
            .iter()
            .enumerate()
            .map(|(i, &r)| {
                let v = self.var(i);
                if v > 0.0 {
                    (r - v) + 2.0 * v * rng.gen::<f64>()
                } else {
                    r
                }
            })
            .collect();
        if drawn.len() == 1 {
            drawn[0]
        } else {
            drawn[rng.gen_range(0..drawn.len())]
        }
    }

    /// A mask of `h x w` cells (row-major, true = masked) for masking ratio `ratio`.
    pub fn mask(&self, h: usize, w: usize, ratio: f64, rng: &mut impl Rng) -> Vec<bool> {
        let high = ratio * (h * w) as f64;
        match self.pred_shape {
            PredShape::Block => self.block_mask(h, w, high, rng),
            PredShape::Rand => {
                let n = h * w;
                let k = (high as usize).min(n);
                let mut m = vec![false; n];
                m[n - k..].iter_mut().for_each(|v| *v = true);
                for i in (1..n).rev() {
                    m.swap(i, rng.gen_range(0..=i));
                }
                m
            }
        }
    }

    fn block_mask(&self, h: usize, w: usize, high: f64, rng: &mut impl Rng) -> Vec<bool> {
        let mut mask = vec![false; h * w];
        let mut count = 0usize;
        let (la, lb) = (self.pred_aspect_ratio.0.ln(), self.pred_aspect_ratio.1.ln());
        let low = ((h.min(w) / 3) * (h.min(w) / 3)) as f64;
        while (count as f64) < high {
            let max_mask = high - count as f64;
            let mut delta = 0usize;
            for _ in 0..10 {
                let target = low + (max_mask - low) * rng.gen::<f64>();
                let aspect = (la + (lb - la) * rng.gen::<f64>()).exp();
                let bh = (target * aspect).sqrt().round_ties_even() as usize;
                let bw = (target / aspect).sqrt().round_ties_even() as usize;
                if bw < w && bh < h {
                    let top = rng.gen_range(0..=h - bh);
                    let left = rng.gen_range(0..=w - bw);
                    let already: usize = (top..top + bh)
                        .map(|i| (left..left + bw).filter(|&j| mask[i * w + j]).count())
                        .sum();
                    let new = (bh * bw) as f64 - already as f64;
                    if 0.0 < new && new <= max_mask {
                        for i in top..top + bh {
                            for j in left..left + bw {
                                if !mask[i * w + j] {
                                    mask[i * w + j] = true;
                                    delta += 1;
                                }
                            }
                        }
                    }
                }
                if delta > 0 {
                    break;
                }
            }
            if delta == 0 {
                break;
            }
            count += delta;
        }
        mask
    }
}
