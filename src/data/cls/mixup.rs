//! timm's Mixup / CutMix with label smoothing (`timm.data.mixup.Mixup`), on a batch tensor.

use anyhow::{bail, ensure, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::draws::{Draws, RngDraws};

/// `--mixup_mode`: one lambda per batch, per pair (i, B-1-i) or per element.
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

/// The official Mixup arguments (`--mixup`, `--cutmix`, `--cutmix_minmax`, `--mixup_prob`,
/// `--mixup_switch_prob`, `--mixup_mode`, `--smoothing`, `--nb_classes`); defaults of eval_cls.py
/// and of `run.sh imagenet_cls`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MixupConfig {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    pub cutmix_minmax: Option<(f64, f64)>,
    pub prob: f64,
    pub switch_prob: f64,
    pub mode: MixupMode,
    /// timm's `correct_lam` (always true in the official scripts).
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
    /// Whether the official scripts build a Mixup at all (`mixup > 0 or cutmix > 0 or
    /// cutmix_minmax is not None`).
    pub fn active(&self) -> bool {
        self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0 || self.cutmix_minmax.is_some()
    }
}

/// A cutmix box `(yl, yh, xl, xh)`, half-open.
pub type BBox = (i64, i64, i64, i64);

/// timm's `rand_bbox` given its draws: the box of side `int(H·sqrt(1-lam))` × `int(W·sqrt(1-lam))`
/// centred at `(cy, cx)` (numpy's `randint(0, H)` and `randint(0, W)`), clipped to the image.
pub fn rand_bbox_with(img_shape: (i64, i64), lam: f64, cy: i64, cx: i64) -> BBox {
    let (h, w) = img_shape;
    let ratio = (1.0 - lam).sqrt();
    let (cut_h, cut_w) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
    let yl = (cy - cut_h / 2).clamp(0, h);
    let yh = (cy + (cut_h + 1) / 2).clamp(0, h);
    let xl = (cx - cut_w / 2).clamp(0, w);
    let xh = (cx + (cut_w + 1) / 2).clamp(0, w);
    (yl, yh, xl, xh)
}

/// timm's `rand_bbox_minmax` given its draws (`cut_h`, `cut_w` from `randint(int(H·min),
/// int(H·max))`, then `yl`, `xl` from `randint(0, H - cut_h + 1)`).
pub fn rand_bbox_minmax_with(cut_h: i64, cut_w: i64, yl: i64, xl: i64) -> BBox {
    (yl, yl + cut_h, xl, xl + cut_w)
}

/// timm's `cutmix_bbox_and_lam` with draws from `draws`: the box and lambda corrected to the
/// box's real area (`1 - area / (H·W)`) when `correct_lam` or min-max boxes.
pub fn cutmix_bbox_and_lam(
    img_shape: (i64, i64),
    lam: f64,
    minmax: Option<(f64, f64)>,
    correct_lam: bool,
    draws: &mut impl Draws,
) -> (BBox, f64) {
    let (h, w) = img_shape;
    let bbox = match minmax {
        Some((lo, hi)) => {
            let cut_h = draws.randint((h as f64 * lo) as i64, (h as f64 * hi) as i64 - 1);
            let cut_w = draws.randint((w as f64 * lo) as i64, (w as f64 * hi) as i64 - 1);
            let yl = draws.randint(0, h - cut_h);
            let xl = draws.randint(0, w - cut_w);
            rand_bbox_minmax_with(cut_h, cut_w, yl, xl)
        }
        None => {
            let cy = draws.randint(0, h - 1);
            let cx = draws.randint(0, w - 1);
            rand_bbox_with(img_shape, lam, cy, cx)
        }
    };
    let lam = if correct_lam || minmax.is_some() {
        let (yl, yh, xl, xh) = bbox;
        1.0 - ((yh - yl) * (xh - xl)) as f64 / (h * w) as f64
    } else {
        lam
    };
    (bbox, lam)
}

/// The batch-mode mix given lambda and the box: mixup `x·lam + flip(x)·(1-lam)` or the box of
/// the flipped batch pasted in (timm's `_mix_batch` arithmetic, float32 tensors).
pub fn mix_with(images: &Tensor, lam: f64, use_cutmix: bool, bbox: BBox) -> Tensor {
    if lam == 1.0 {
        return images.copy();
    }
    let flipped = images.flip([0]);
    if use_cutmix {
        let (yl, yh, xl, xh) = bbox;
        let out = images.copy();
        if yh > yl && xh > xl {
            let src = flipped.narrow(2, yl, yh - yl).narrow(3, xl, xh - xl);
            out.narrow(2, yl, yh - yl)
                .narrow(3, xl, xh - xl)
                .copy_(&src);
        }
        out
    } else {
        images * lam + flipped * (1.0 - lam)
    }
}

/// timm's `mixup_target`: smoothed one-hot targets (`off = smoothing / classes`, `on = 1 -
/// smoothing + off`) mixed with the flipped batch's by `lam` (a number, or a `[B, 1]` tensor).
pub fn mixup_target(targets: &Tensor, num_classes: usize, lam: &Lam, smoothing: f64) -> Tensor {
    let off = smoothing / num_classes as f64;
    let on = 1.0 - smoothing + off;
    let n = targets.size()[0];
    let y1 = Tensor::full(
        [n, num_classes as i64],
        off,
        (Kind::Float, targets.device()),
    )
    .scatter_value(1, &targets.to_kind(Kind::Int64).view([-1, 1]), on);
    let y2 = y1.flip([0]);
    match lam {
        Lam::Scalar(l) => &y1 * *l + &y2 * (1.0 - *l),
        Lam::PerRow(t) => &y1 * t + &y2 * (1.0 - t),
    }
}

/// A lambda for the whole batch or one per row.
pub enum Lam {
    Scalar(f64),
    PerRow(Tensor),
}

/// timm's `Mixup` (`__call__`): mixed images and soft targets.
#[derive(Debug, Clone)]
pub struct Mixup {
    pub cfg: MixupConfig,
    cutmix_alpha: f64,
}

impl Mixup {
    pub fn new(cfg: &MixupConfig) -> Result<Self> {
        ensure!(cfg.num_classes > 0, "mixup needs the number of classes");
        ensure!(
            cfg.active(),
            "mixup needs mixup > 0, cutmix > 0 or cutmix_minmax"
        );
        ensure!(
            cfg.mixup_alpha >= 0.0 && cfg.cutmix_alpha >= 0.0,
            "mixup and cutmix alphas must be non-negative"
        );
        if let Some((lo, hi)) = cfg.cutmix_minmax {
            ensure!(
                0.0 <= lo && lo < hi && hi <= 1.0,
                "cutmix_minmax must satisfy 0 <= min < max <= 1, got ({lo}, {hi})"
            );
        }
        // timm forces cutmix alpha 1.0 when min-max boxes are used.
        let cutmix_alpha = if cfg.cutmix_minmax.is_some() {
            1.0
        } else {
            cfg.cutmix_alpha
        };
        Ok(Self {
            cfg: cfg.clone(),
            cutmix_alpha,
        })
    }

    /// `_params_per_batch`: (lam, use_cutmix).
    fn params_per_batch(&self, draws: &mut impl Draws) -> (f64, bool) {
        let (ma, ca) = (self.cfg.mixup_alpha, self.cutmix_alpha);
        if draws.random() < self.cfg.prob {
            if ma > 0.0 && ca > 0.0 {
                let use_cutmix = draws.random() < self.cfg.switch_prob;
                let lam = if use_cutmix {
                    draws.beta(ca, ca)
                } else {
                    draws.beta(ma, ma)
                };
                (lam, use_cutmix)
            } else if ma > 0.0 {
                (draws.beta(ma, ma), false)
            } else {
                (draws.beta(ca, ca), true)
            }
        } else {
            (1.0, false)
        }
    }

    /// `_params_per_elem(n)`: float32 lambdas and cutmix flags. numpy draws whole arrays per
    /// call (`rand(n)`, `beta(size=n)` for cutmix then for mixup, `rand(n)`), so the draws
    /// come in that order, element by element within each array.
    fn params_per_elem(&self, n: usize, draws: &mut impl Draws) -> (Vec<f32>, Vec<bool>) {
        let (ma, ca) = (self.cfg.mixup_alpha, self.cutmix_alpha);
        let (use_cutmix, lam_mix): (Vec<bool>, Vec<f64>) = if ma > 0.0 && ca > 0.0 {
            let u: Vec<bool> = (0..n)
                .map(|_| draws.random() < self.cfg.switch_prob)
                .collect();
            let bc: Vec<f64> = (0..n).map(|_| draws.beta(ca, ca)).collect();
            let bm: Vec<f64> = (0..n).map(|_| draws.beta(ma, ma)).collect();
            let l = (0..n).map(|i| if u[i] { bc[i] } else { bm[i] }).collect();
            (u, l)
        } else if ma > 0.0 {
            (vec![false; n], (0..n).map(|_| draws.beta(ma, ma)).collect())
        } else {
            (vec![true; n], (0..n).map(|_| draws.beta(ca, ca)).collect())
        };
        let lam = (0..n)
            .map(|i| {
                if draws.random() < self.cfg.prob {
                    lam_mix[i] as f32
                } else {
                    1.0
                }
            })
            .collect();
        (lam, use_cutmix)
    }

    /// Mixed images and soft targets with the given draws (`images` `[B, C, H, W]` float,
    /// `targets` `[B]` class indices; B even).
    pub fn apply_with(
        &self,
        images: &Tensor,
        targets: &Tensor,
        draws: &mut impl Draws,
    ) -> Result<(Tensor, Tensor)> {
        let s = images.size();
        ensure!(s.len() == 4, "mixup expects images [B, C, H, W], got {s:?}");
        ensure!(
            s[0] % 2 == 0,
            "mixup needs an even batch size (got {}), as timm's Mixup asserts",
            s[0]
        );
        ensure!(
            targets.size() == [s[0]],
            "targets must be [B] class indices, got {:?}",
            targets.size()
        );
        if s[0] > 0 {
            let (lo, hi) = (
                targets.min().int64_value(&[]),
                targets.max().int64_value(&[]),
            );
            ensure!(
                lo >= 0 && (hi as usize) < self.cfg.num_classes,
                "targets must lie in [0, {}), got values from {lo} to {hi}",
                self.cfg.num_classes
            );
        }
        let (b, shape) = (s[0], (s[2], s[3]));
        let correct = self.cfg.correct_lam;
        let minmax = self.cfg.cutmix_minmax;
        let (x, lam) = match self.cfg.mode {
            MixupMode::Batch => {
                let (lam, use_cutmix) = self.params_per_batch(draws);
                if lam == 1.0 {
                    (images.copy(), Lam::Scalar(1.0))
                } else if use_cutmix {
                    let (bbox, lam) = cutmix_bbox_and_lam(shape, lam, minmax, correct, draws);
                    (mix_with(images, lam, true, bbox), Lam::Scalar(lam))
                } else {
                    (mix_with(images, lam, false, (0, 0, 0, 0)), Lam::Scalar(lam))
                }
            }
            MixupMode::Elem | MixupMode::Pair => {
                let pair = self.cfg.mode == MixupMode::Pair;
                let n = if pair { b / 2 } else { b } as usize;
                let (mut lams, use_cutmix) = self.params_per_elem(n, draws);
                let x = images.copy();
                for i in 0..n {
                    let j = b - i as i64 - 1;
                    let lam = lams[i];
                    if lam == 1.0 {
                        continue;
                    }
                    let (xi, xj) = (images.get(i as i64), images.get(j));
                    if use_cutmix[i] {
                        let ((yl, yh, xl, xh), l) =
                            cutmix_bbox_and_lam(shape, lam as f64, minmax, correct, draws);
                        if yh > yl && xh > xl {
                            let region =
                                |t: &Tensor| t.narrow(1, yl, yh - yl).narrow(2, xl, xh - xl);
                            region(&x.get(i as i64)).copy_(&region(&xj));
                            if pair {
                                region(&x.get(j)).copy_(&region(&xi));
                            }
                        }
                        lams[i] = l as f32;
                    } else {
                        let one_minus = 1.0f32 - lam;
                        x.get(i as i64)
                            .copy_(&(&xi * lam as f64 + &xj * one_minus as f64));
                        if pair {
                            x.get(j).copy_(&(&xj * lam as f64 + &xi * one_minus as f64));
                        }
                    }
                }
                if pair {
                    let mut back = lams.clone();
                    back.reverse();
                    lams.extend(back);
                }
                let t = Tensor::from_slice(&lams)
                    .to_device(images.device())
                    .to_kind(images.kind())
                    .unsqueeze(1);
                (x, Lam::PerRow(t))
            }
        };
        let y = mixup_target(
            targets,
            self.cfg.num_classes,
            &lam,
            self.cfg.label_smoothing,
        );
        Ok((x, y))
    }

    /// [`Mixup::apply_with`] drawing from `rng`.
    pub fn apply(
        &self,
        images: &Tensor,
        targets: &Tensor,
        rng: &mut impl Rng,
    ) -> Result<(Tensor, Tensor)> {
        self.apply_with(images, targets, &mut RngDraws(rng))
    }
}
