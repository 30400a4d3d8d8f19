//! DINO / iBOT projection head, as the official `models/head.py`.
//!
//! `mlp` (Linear → [norm] → act, repeated, → Linear to the bottleneck; with `--norm_in_head ln`
//! one LayerNorm shared by every hidden layer, as the official head builds it), L2 normalisation,
//! then a
//! weight-normalised, bias-free `last_layer` (`weight_g` [out, 1], `weight_v` [out, bottleneck]).
//! On all tokens `[B, 1 + N, D]`, token 0 goes through `last_layer` and the patch tokens through
//! `last_layer2`, which with `shared_head` is the very same module (one tensor, two names).

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::layers::{linear, LayerNorm, Linear};
use crate::params::ParamStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadAct {
    Gelu,
    Relu,
}

impl std::str::FromStr for HeadAct {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gelu" => Ok(Self::Gelu),
            "relu" => Ok(Self::Relu),
            other => bail!("unknown activation '{other}': expected gelu or relu"),
        }
    }
}

/// Normalisation between the head's hidden layers (`--norm_in_head`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadNorm {
    None,
    /// `nn.LayerNorm(hidden_dim)` (eps 1e-5).
    Ln,
}

impl std::str::FromStr for HeadNorm {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "" | "none" | "None" => Ok(Self::None),
            "ln" => Ok(Self::Ln),
            // The official head accepts these too (BatchNorm1d, SyncBatchNorm and its own
            // centred / grouped variants); their running statistics and cross-rank
            // synchronisation are not implemented here.
            "bn" | "syncbn" | "csyncbn" | "psyncbn" => {
                bail!("'{s}' (batch norm in the head) is not supported: use none or ln")
            }
            other => bail!("unknown head norm '{other}': expected none or ln"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    pub in_dim: i64,
    pub out_dim: i64,
    pub patch_out_dim: i64,
    pub hidden_dim: i64,
    pub bottleneck_dim: i64,
    pub nlayers: i64,
    pub norm: HeadNorm,
    pub act: HeadAct,
    /// Freeze `weight_g` at 1 (no gradient) in the last layer(s).
    pub norm_last_layer: bool,
    /// One last layer for [CLS] and patch tokens (`last_layer2` is `last_layer`).
    pub shared_head: bool,
}

impl HeadConfig {
    /// The official defaults of `iBOTHead` (hidden 2048, bottleneck 256, 3 layers, GELU).
    pub fn new(
        in_dim: i64,
        out_dim: i64,
        patch_out_dim: i64,
        norm_last_layer: bool,
        shared_head: bool,
    ) -> Self {
        Self {
            in_dim,
            out_dim,
            patch_out_dim,
            hidden_dim: 2048,
            bottleneck_dim: 256,
            nlayers: 3,
            norm: HeadNorm::None,
            act: HeadAct::Gelu,
            norm_last_layer,
            shared_head,
        }
    }

    /// Output width of the patch tokens.
    pub fn patch_dim(&self) -> i64 {
        if self.shared_head {
            self.out_dim
        } else {
            self.patch_out_dim
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.in_dim > 0 && self.out_dim > 0 && self.patch_out_dim > 0,
            "head dimensions must be positive"
        );
        ensure!(self.bottleneck_dim >= 0, "bottleneck_dim must be >= 0");
        ensure!(self.nlayers >= 1, "the head needs at least one layer");
        ensure!(
            self.nlayers == 1 || self.hidden_dim > 0,
            "hidden_dim must be positive"
        );
        ensure!(
            !(self.nlayers == 1 && self.bottleneck_dim == 0),
            "a one-layer head without bottleneck cannot produce patch outputs"
        );
        Ok(())
    }
}

/// `nn.utils.weight_norm(nn.Linear(in, out, bias=False))`: weight = g · v / ‖v‖ (row norms).
#[derive(Debug)]
pub struct WeightNormLinear {
    pub weight_g: Tensor,
    pub weight_v: Tensor,
}

impl WeightNormLinear {
    /// PyTorch's default Linear init for v (uniform ±1/√in), then g filled with 1.
    fn new(
        ps: &mut ParamStore,
        name: &str,
        in_dim: i64,
        out_dim: i64,
        freeze_g: bool,
        trainable: bool,
        dev: Device,
    ) -> Self {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let v = Tensor::empty([out_dim, in_dim], (Kind::Float, dev)).uniform_(-bound, bound);
        let g = Tensor::ones([out_dim, 1], (Kind::Float, dev));
        let weight_g = ps.add(format!("{name}.weight_g"), g, trainable && !freeze_g);
        let weight_v = ps.add(format!("{name}.weight_v"), v, trainable);
        Self { weight_g, weight_v }
    }

    pub fn weight(&self) -> Tensor {
        Tensor::internal_weight_norm(&self.weight_v, &self.weight_g, 0)
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        linear(x, &self.weight(), None)
    }
}

#[derive(Debug)]
enum MlpLayer {
    Linear(Linear),
    Norm(LayerNorm),
    Act(HeadAct),
}

/// Where the patch tokens are projected.
#[derive(Debug)]
enum PatchProj {
    /// `last_layer2` is `last_layer`.
    SharedLast,
    Last2(WeightNormLinear),
    /// No bottleneck: `mlp2` is the last Linear of `mlp`.
    SharedMlpLast,
    Mlp2(Linear),
}

#[derive(Debug)]
pub struct IbotHead {
    pub cfg: HeadConfig,
    mlp: Vec<MlpLayer>,
    last_layer: Option<WeightNormLinear>,
    patch: PatchProj,
}

/// F.normalize(x, dim=-1, p=2) with eps 1e-12.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let n = x.norm_scalaropt_dim(2.0, [-1i64], true).clamp_min(1e-12);
    x / n
}

impl IbotHead {
    /// Registers the head under `prefix` (e.g. `"head."`) in official order.
    pub fn new(
        ps: &mut ParamStore,
        prefix: &str,
        cfg: &HeadConfig,
        trainable: bool,
        dev: Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let last_in = if cfg.bottleneck_dim > 0 {
            cfg.bottleneck_dim
        } else {
            cfg.out_dim
        };
        let mut mlp = Vec::new();
        if cfg.nlayers == 1 {
            // A plain nn.Linear (not a Sequential): its names have no index.
            mlp.push(MlpLayer::Linear(Linear::new_trunc(
                ps,
                &format!("{prefix}mlp"),
                cfg.in_dim,
                last_in,
                true,
                trainable,
                dev,
            )));
        } else {
            // The official `_build_mlp` builds ONE norm module and appends that same module
            // after every hidden Linear: its parameters exist once (`named_parameters()` names
            // the first index) and the state dict lists them under every index, like the shared
            // head's `last_layer2`.
            let mut shared_norm: Option<(String, LayerNorm)> = None;
            let mut idx = 0;
            for layer in 0..cfg.nlayers - 1 {
                let in_dim = if layer == 0 {
                    cfg.in_dim
                } else {
                    cfg.hidden_dim
                };
                mlp.push(MlpLayer::Linear(Linear::new_trunc(
                    ps,
                    &format!("{prefix}mlp.{idx}"),
                    in_dim,
                    cfg.hidden_dim,
                    true,
                    trainable,
                    dev,
                )));
                idx += 1;
                if cfg.norm == HeadNorm::Ln {
                    let name = format!("{prefix}mlp.{idx}");
                    let norm = match &shared_norm {
                        None => {
                            let n = LayerNorm::new(ps, &name, cfg.hidden_dim, 1e-5, trainable, dev);
                            shared_norm = Some((name, n.shallow_clone()));
                            n
                        }
                        Some((first, n)) => {
                            for s in ["weight", "bias"] {
                                ps.alias(format!("{name}.{s}"), &format!("{first}.{s}"));
                            }
                            n.shallow_clone()
                        }
                    };
                    mlp.push(MlpLayer::Norm(norm));
                    idx += 1;
                }
                mlp.push(MlpLayer::Act(cfg.act));
                idx += 1;
            }
            mlp.push(MlpLayer::Linear(Linear::new_trunc(
                ps,
                &format!("{prefix}mlp.{idx}"),
                cfg.hidden_dim,
                last_in,
                true,
                trainable,
                dev,
            )));
        }
        let last_layer = (cfg.bottleneck_dim > 0).then(|| {
            WeightNormLinear::new(
                ps,
                &format!("{prefix}last_layer"),
                cfg.bottleneck_dim,
                cfg.out_dim,
                cfg.norm_last_layer,
                trainable,
                dev,
            )
        });
        let patch = match (cfg.shared_head, cfg.bottleneck_dim > 0) {
            (true, true) => {
                for s in ["weight_g", "weight_v"] {
                    ps.alias(
                        format!("{prefix}last_layer2.{s}"),
                        &format!("{prefix}last_layer.{s}"),
                    );
                }
                PatchProj::SharedLast
            }
            (false, true) => PatchProj::Last2(WeightNormLinear::new(
                ps,
                &format!("{prefix}last_layer2"),
                cfg.bottleneck_dim,
                cfg.patch_out_dim,
                cfg.norm_last_layer,
                trainable,
                dev,
            )),
            (true, false) => {
                let last = format!("{prefix}mlp.{}", mlp.len() - 1);
                for s in ["weight", "bias"] {
                    ps.alias(format!("{prefix}mlp2.{s}"), &format!("{last}.{s}"));
                }
                PatchProj::SharedMlpLast
            }
            (false, false) => PatchProj::Mlp2(Linear::new_torch_default(
                ps,
                &format!("{prefix}mlp2"),
                cfg.hidden_dim,
                cfg.patch_out_dim,
                trainable,
                dev,
            )),
        };
        Ok(Self {
            cfg: cfg.clone(),
            mlp,
            last_layer,
            patch,
        })
    }

    fn run_mlp(&self, layers: &[MlpLayer], x: &Tensor) -> Tensor {
        let mut x = x.shallow_clone();
        let mut layers = layers.iter().peekable();
        while let Some(l) = layers.next() {
            x = match l {
                MlpLayer::Linear(lin)
                    if matches!(layers.peek(), Some(MlpLayer::Act(HeadAct::Gelu))) =>
                {
                    layers.next();
                    lin.forward_gelu(&x)
                }
                MlpLayer::Linear(lin) => lin.forward(&x),
                MlpLayer::Norm(n) => n.forward(&x),
                MlpLayer::Act(HeadAct::Gelu) => x.gelu("none"),
                MlpLayer::Act(HeadAct::Relu) => x.relu(),
            };
        }
        x
    }

    fn last_mlp_linear(&self) -> &Linear {
        match self.mlp.last() {
            Some(MlpLayer::Linear(l)) => l,
            _ => unreachable!("the head's mlp always ends with a Linear"),
        }
    }

    /// Head on a single token per sample, `[B, D] -> [B, out_dim]` (DINOHead.forward).
    pub fn forward_cls(&self, x: &Tensor) -> Tensor {
        let x = self.run_mlp(&self.mlp, x);
        match &self.last_layer {
            Some(last) => last.forward(&l2_normalize(&x)),
            None => x,
        }
    }

    /// Head on selected patch tokens `[M, D]` -> `[M, patch_dim]`: row for row what
    /// [`IbotHead::forward_tokens`] gives for those tokens (every layer acts on each token
    /// alone), so training can run the patch head only where the loss looks (masked tokens).
    pub fn forward_patch_rows(&self, x: &Tensor) -> Tensor {
        match &self.last_layer {
            Some(last) => {
                let x = l2_normalize(&self.run_mlp(&self.mlp, x));
                match &self.patch {
                    PatchProj::Last2(l2) => l2.forward(&x),
                    _ => last.forward(&x),
                }
            }
            None => {
                let x = self.run_mlp(&self.mlp[..self.mlp.len() - 1], x);
                match &self.patch {
                    PatchProj::Mlp2(l) => l.forward(&x),
                    _ => self.last_mlp_linear().forward(&x),
                }
            }
        }
    }

    /// The teacher's head on all tokens `[B, 1 + N, D]` when the loss reads its patch outputs
    /// only at the flat positions `masked` (`b · N + patch`, the masked positions of the
    /// student's view with the same index) and their mean over the tokens of each sample (the
    /// patch centre): (`[B, out_dim]`, `[M, patch_dim]` at `masked`, `[B, patch_dim]` token
    /// means). The weight-normalised last layer is linear without bias, so the mean over tokens
    /// of its outputs is its output on the mean over tokens of its inputs: the [`IbotHead::
    /// forward_tokens`] outputs at those rows and their means, up to float summation order,
    /// without the `[B·N, bottleneck] × [bottleneck, patch_dim]` product on every token (on the
    /// Fashion-MNIST recipe, out_dim 8192 on 65-token views, the largest of the teacher's
    /// step). None for heads without a bottleneck (their patch projection has a bias): run
    /// `forward_tokens` there.
    pub fn forward_tokens_at(
        &self,
        x: &Tensor,
        masked: &Tensor,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        let Some(last) = &self.last_layer else {
            return Ok(None);
        };
        ensure!(
            x.dim() == 3 && x.size()[1] >= 2,
            "head input must be [B, tokens, D] with a [CLS] and at least one patch token, got {:?}",
            x.size()
        );
        let (b, n) = (x.size()[0], x.size()[1] - 1);
        ensure!(
            masked.dim() == 1 && masked.kind() == Kind::Int64,
            "masked positions must be a 1-d int64 tensor, got {:?} {:?}",
            masked.size(),
            masked.kind()
        );
        if masked.numel() > 0 {
            let (lo, hi) = (masked.min().int64_value(&[]), masked.max().int64_value(&[]));
            ensure!(
                lo >= 0 && hi < b * n,
                "masked positions {lo}..={hi} fall outside the {b}x{n} patch grid"
            );
        }
        let z = l2_normalize(&self.run_mlp(&self.mlp, x));
        let w = last.weight();
        let w2 = match &self.patch {
            PatchProj::SharedLast => w.shallow_clone(),
            PatchProj::Last2(l2) => l2.weight(),
            _ => unreachable!("bottleneck heads project patches with a last layer"),
        };
        let cls = linear(&z.select(1, 0), &w, None);
        let zp = z.narrow(1, 1, n);
        let rows = zp.reshape([b * n, -1]).index_select(0, masked);
        let rows = linear(&rows, &w2, None);
        let mean = linear(&zp.mean_dim(1, false, Kind::Float), &w2, None);
        Ok(Some((cls, rows, mean)))
    }

    /// Head on all tokens `[B, 1 + N, D]` -> (`[B, out_dim]`, `[B, N, patch_dim]`).
    pub fn forward_tokens(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        ensure!(
            x.dim() == 3,
            "head input must be [B, tokens, D], got {:?}",
            x.size()
        );
        let n = x.size()[1];
        ensure!(
            n >= 2,
            "head input needs a [CLS] token and at least one patch token"
        );
        match &self.last_layer {
            Some(last) => {
                let x = l2_normalize(&self.run_mlp(&self.mlp, x));
                let x1 = last.forward(&x.select(1, 0));
                let patches = x.narrow(1, 1, n - 1);
                let x2 = match &self.patch {
                    PatchProj::SharedLast => last.forward(&patches),
                    PatchProj::Last2(l2) => l2.forward(&patches),
                    _ => unreachable!("bottleneck heads project patches with a last layer"),
                };
                Ok((x1, x2))
            }
            None => {
                let x = self.run_mlp(&self.mlp[..self.mlp.len() - 1], x);
                let x1 = self.last_mlp_linear().forward(&x.select(1, 0));
                let patches = x.narrow(1, 1, n - 1);
                let x2 = match &self.patch {
                    PatchProj::SharedMlpLast => self.last_mlp_linear().forward(&patches),
                    PatchProj::Mlp2(l) => l.forward(&patches),
                    _ => unreachable!("heads without bottleneck project patches with an mlp layer"),
                };
                Ok((x1, x2))
            }
        }
    }
}
