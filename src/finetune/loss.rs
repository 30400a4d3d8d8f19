//! The fine-tuning criteria of the official scripts (timm's `loss/cross_entropy.py`).

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// Which loss a run uses: `SoftTargetCrossEntropy` when Mixup/CutMix is on (its targets are
/// soft, smoothing included), `LabelSmoothingCrossEntropy(smoothing)` when smoothing > 0
/// without mixing, plain cross-entropy otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Criterion {
    SoftTarget,
    LabelSmoothing(f64),
    CrossEntropy,
}

impl Criterion {
    pub fn select(mixup_active: bool, smoothing: f64) -> Self {
        if mixup_active {
            Self::SoftTarget
        } else if smoothing > 0.0 {
            Self::LabelSmoothing(smoothing)
        } else {
            Self::CrossEntropy
        }
    }

    pub fn name(&self) -> String {
        match self {
            Self::SoftTarget => "SoftTargetCrossEntropy()".into(),
            Self::LabelSmoothing(s) => format!("LabelSmoothingCrossEntropy(smoothing={s})"),
            Self::CrossEntropy => "CrossEntropyLoss()".into(),
        }
    }

    /// The mean loss of `logits` `[B, K]` against `target`: `[B, K]` soft targets for
    /// [`Criterion::SoftTarget`], `[B]` class indices otherwise.
    pub fn loss(&self, logits: &Tensor, target: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::SoftTarget => {
                ensure!(
                    target.size() == logits.size(),
                    "soft targets {:?} do not match the logits {:?}",
                    target.size(),
                    logits.size()
                );
                soft_target_cross_entropy(logits, target)
            }
            Self::LabelSmoothing(s) => label_smoothing_cross_entropy(logits, target, *s),
            Self::CrossEntropy => {
                logits.cross_entropy_loss::<Tensor>(target, None, Reduction::Mean, -100, 0.0)
            }
        })
    }
}

/// timm `SoftTargetCrossEntropy`: `sum(-target * log_softmax(x, -1), -1).mean()`.
pub fn soft_target_cross_entropy(x: &Tensor, target: &Tensor) -> Tensor {
    (-target * x.log_softmax(-1, Kind::Float))
        .sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)
        .mean(Kind::Float)
}

/// timm `LabelSmoothingCrossEntropy`: `(1 - s) * nll + s * mean(-log_softmax)`, averaged.
pub fn label_smoothing_cross_entropy(x: &Tensor, target: &Tensor, smoothing: f64) -> Tensor {
    let confidence = 1.0 - smoothing;
    let logprobs = x.log_softmax(-1, Kind::Float);
    let nll = -logprobs
        .gather(-1, &target.to_kind(Kind::Int64).unsqueeze(1), false)
        .squeeze_dim(1);
    let smooth = -logprobs.mean_dim([-1i64].as_slice(), false, Kind::Float);
    (nll * confidence + smooth * smoothing).mean(Kind::Float)
}
