//! The classifier that fine-tuning trains: the pre-trained ViT (with drop path) and a linear
//! head on the [CLS] token or on the mean of the patch tokens, as the official models build it.
//!
//! State-dict names are the official ones: the backbone's bare names (`cls_token`,
//! `blocks.3.mlp.fc1.weight`, `norm.weight`, ...), `fc_norm.{weight,bias}` with mean pooling (the
//! official mean-pooling ViT replaces the final `norm` by an identity and normalises the pooled
//! patch tokens with a new `fc_norm`), and `head.{weight,bias}`; for the semi-supervised recipe
//! (`--finetune_head_layer n`, the official `ClassProjHead`) the first n linear layers of the
//! pre-trained projection head as `head.mlp.{0,2,..}` (GELU between and after them) followed by
//! `head.cls_head`.
//!
//! A Swin backbone (the official `models/swin_transformer.py` `SwinTransformer` with
//! `num_classes > 0`) keeps its own names (`patch_embed.*`, `layers.{i}.blocks.{j}.*`,
//! `layers.{i}.downsample.*`, `norm.*`), pools as the official `forward` does (the average of
//! the final-stage tokens after the final `norm`, `avgpool` over `x_region`) and has a plain
//! `head` initialised by its `_init_weights` (trunc-normal .02, zero bias; the official Swin
//! takes no `init_scale` and no `use_mean_pooling`, so both are ignored for it).

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::models::init::trunc_normal;
use crate::models::layers::{LayerNorm, Linear, LN_EPS};
use crate::models::swin::resize_rel_pos_bias_table;
use crate::models::{Backbone, BackboneConfig, VisionTransformer};
use crate::params::ParamStore;

/// Shape of the classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    /// The backbone (ViT or Swin), with `img_size = input_size` and the fine-tuning drop-path
    /// rate. Serialised as `vit` (checkpoints written before Swin existed read back).
    #[serde(rename = "vit")]
    pub backbone: BackboneConfig,
    pub nb_classes: i64,
    /// Mean of the patch tokens through `fc_norm` instead of the normed [CLS] token.
    pub use_mean_pooling: bool,
    /// `--finetune_head_layer`: linear layers of the projection head kept before the classifier
    /// (0: a linear classifier on the backbone's feature).
    pub finetune_head_layer: usize,
    /// Width of the projection head's hidden layers (when `finetune_head_layer > 0`).
    pub head_hidden_dim: i64,
    /// `--init_scale`: the classifier's initial weight and bias are multiplied by it.
    pub init_scale: f64,
}

/// The ViT + pooling + head.
#[derive(Debug)]
pub struct Classifier {
    pub cfg: ClassifierConfig,
    pub ps: ParamStore,
    pub backbone: Backbone,
    pub fc_norm: Option<LayerNorm>,
    /// The kept projection-head layers (each followed by GELU).
    pub proj: Vec<Linear>,
    pub head: Linear,
}

impl Classifier {
    /// A new classifier with the official initialisation: the backbone as the official ViT
    /// initialises it (trunc-normal .02 linears and tokens), the head's linear layers
    /// trunc-normal(.02) with zero bias (`_init_weights`), the classifier then scaled by
    /// `init_scale`. Draws from libtorch's generator (seed it with `tch::manual_seed`).
    pub fn new(cfg: &ClassifierConfig, device: Device) -> Result<Self> {
        ensure!(cfg.nb_classes >= 1, "--nb_classes must be at least 1");
        ensure!(
            !cfg.backbone.masked_im_modeling(),
            "the fine-tuning backbone has no masked_embed"
        );
        let is_swin = matches!(cfg.backbone, BackboneConfig::Swin(_));
        // Mean pooling with fc_norm is the ViT's option; the Swin pools its own way.
        let mean_pooling = cfg.use_mean_pooling && !is_swin;
        let mut scratch = ParamStore::new();
        let backbone = Backbone::new(&mut scratch, "", &cfg.backbone, true, device)?;
        // Re-register in the official order, without the final norm when mean pooling
        // replaces it (it is an nn.Identity there, with no parameters).
        let mut ps = ParamStore::new();
        for p in scratch.params() {
            if mean_pooling && p.name.starts_with("norm.") {
                continue;
            }
            let _ = ps.add(p.name.clone(), p.tensor.shallow_clone(), true);
        }
        // The Swin's relative_position_index buffers (part of the official state dict).
        for b in scratch.buffers() {
            let _ = ps.add_buffer(b.name.clone(), b.tensor.shallow_clone());
        }
        let d = cfg.backbone.embed_dim();
        let fc_norm =
            mean_pooling.then(|| LayerNorm::new(&mut ps, "fc_norm", d, LN_EPS, true, device));
        let mut proj = Vec::new();
        let mut in_dim = d;
        for l in 0..cfg.finetune_head_layer {
            ensure!(
                cfg.head_hidden_dim > 0,
                "the projection head's hidden width is unknown"
            );
            proj.push(Linear::new_trunc(
                &mut ps,
                &format!("head.mlp.{}", 2 * l),
                in_dim,
                cfg.head_hidden_dim,
                true,
                true,
                device,
            ));
            in_dim = cfg.head_hidden_dim;
        }
        let head_name = if cfg.finetune_head_layer > 0 {
            "head.cls_head"
        } else {
            "head"
        };
        // The official Swin's head is initialised by `_init_weights` only (no init_scale).
        let scale = if is_swin && cfg.finetune_head_layer == 0 {
            1.0
        } else {
            cfg.init_scale
        };
        let w = trunc_normal(&[cfg.nb_classes, in_dim], 0.02, device) * scale;
        let b = Tensor::zeros([cfg.nb_classes], (Kind::Float, device)) * scale;
        let head = Linear {
            weight: ps.add(format!("{head_name}.weight"), w, true),
            bias: Some(ps.add(format!("{head_name}.bias"), b, true)),
        };
        Ok(Self {
            cfg: cfg.clone(),
            ps,
            backbone,
            fc_norm,
            proj,
            head,
        })
    }

    /// The pooled feature `[B, D]` (`train` enables drop path).
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let vit = match &self.backbone {
            Backbone::Vit(v) => v,
            // forward's token 0: avgpool over the final-stage tokens after the final norm.
            Backbone::Swin(s) => return Ok(s.forward(x, None, train)?.select(1, 0)),
        };
        let t = vit.forward_unnormed(x, train)?;
        Ok(match &self.fc_norm {
            Some(n) => n.forward(&t.narrow(1, 1, t.size()[1] - 1).mean_dim(
                [1i64].as_slice(),
                false,
                Kind::Float,
            )),
            None => vit.norm.forward(&t).select(1, 0),
        })
    }

    /// Turns on the official dropouts of the fine-tuning ViT (`--drop`, `--attn_drop_rate`; see
    /// [`VisionTransformer::set_dropout`]). A Swin refuses rates above 0 (not implemented).
    pub fn set_dropout(&mut self, drop: f64, attn_drop: f64) -> Result<()> {
        match &mut self.backbone {
            Backbone::Vit(v) => v.set_dropout(drop, attn_drop),
            Backbone::Swin(_) if drop == 0.0 && attn_drop == 0.0 => Ok(()),
            Backbone::Swin(_) => bail!(
                "--drop and --attn_drop_rate are not implemented for Swin backbones yet (the ViT \
                 takes them)"
            ),
        }
    }

    /// The ViT backbone (None for a Swin).
    pub fn vit(&self) -> Option<&VisionTransformer> {
        self.backbone.as_vit()
    }

    /// Logits `[B, nb_classes]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut f = self.features(x, train)?;
        for l in &self.proj {
            f = l.forward(&f).gelu("none");
        }
        Ok(self.head.forward(&f))
    }

    /// Trainable parameters (the official `n_parameters`).
    pub fn n_parameters(&self) -> i64 {
        self.ps
            .params()
            .iter()
            .map(|p| p.tensor.numel() as i64)
            .sum()
    }

    /// Copies pre-trained tensors into the model as the official non-strict load does: every
    /// model key found in `src` (shape checked) is copied; keys of `src` the model does not have
    /// (`masked_embed`, the final `norm` under mean pooling, the projection head's other
    /// layers) are reported as unexpected, model keys missing from `src` (the new classifier,
    /// `fc_norm`) as missing. A position table of another grid is resized bicubically first,
    /// as the official fine-tuning scripts do; a Swin's `relative_position_bias_table` of another
    /// window is resized bicubically ([`resize_rel_pos_bias_table`]) and its
    /// `relative_position_index` is always the model's own (the official script drops the
    /// checkpoint's).
    pub fn load_pretrained(
        &self,
        src: &HashMap<String, Tensor>,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let mut missing = Vec::new();
        for p in self.ps.params() {
            let Some(t) = src.get(&p.name) else {
                missing.push(p.name.clone());
                continue;
            };
            let t = if p.name == "pos_embed" && t.size() != p.tensor.size() {
                resize_pos_embed(t, &p.tensor.size())
                    .context("interpolating the pre-trained position embedding")?
            } else if p.name.ends_with("relative_position_bias_table")
                && t.size() != p.tensor.size()
            {
                // A Swin built for another window (--window_size, or a stage whose grid at
                // --input_size clamps its window): the table resized bicubically.
                let want = p.tensor.size();
                ensure!(
                    t.dim() == 2 && t.size()[1] == want[1],
                    "'{}': the checkpoint's table {:?} has another number of heads than the \
                     model's {want:?}",
                    p.name,
                    t.size()
                );
                let w = ((want[0] as f64).sqrt().round() as i64 + 1) / 2;
                let r = resize_rel_pos_bias_table(t, w)
                    .with_context(|| format!("resizing the pre-trained '{}'", p.name))?;
                eprintln!(
                    "Position interpolate for {} from {:?} to {:?}",
                    p.name,
                    t.size(),
                    r.size()
                );
                r
            } else {
                t.shallow_clone()
            };
            self.ps
                .set(&p.name, &t)
                .with_context(|| format!("loading pre-trained '{}'", p.name))?;
        }
        let mut unexpected: Vec<String> = src
            .keys()
            .filter(|k| !self.ps.contains(k))
            .cloned()
            .collect();
        unexpected.sort();
        Ok((missing, unexpected))
    }
}

/// The official fine-tuning scripts' position-embedding interpolation: the [CLS] row kept, the
/// patch rows reshaped to their square grid and resized to the model's grid with
/// `F.interpolate(size=..., mode='bicubic', align_corners=False)`.
pub fn resize_pos_embed(t: &Tensor, want: &[i64]) -> Result<Tensor> {
    ensure!(
        t.dim() == 3 && want.len() == 3 && t.size()[2] == want[2],
        "position embedding {:?} cannot become {want:?}",
        t.size()
    );
    let (n_src, n_dst, d) = (t.size()[1] - 1, want[1] - 1, want[2]);
    let (s, g) = ((n_src as f64).sqrt() as i64, (n_dst as f64).sqrt() as i64);
    if s * s != n_src || g * g != n_dst {
        bail!("position embeddings of {n_src} and {n_dst} patches are not square grids");
    }
    let grid = t
        .narrow(1, 1, n_src)
        .reshape([1, s, s, d])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float);
    let r = grid.upsample_bicubic2d([g, g], false, None, None);
    let r = r.permute([0, 2, 3, 1]).reshape([1, g * g, d]);
    eprintln!("Position interpolate from {s}x{s} to {g}x{g}");
    Ok(Tensor::cat(&[t.narrow(1, 0, 1).to_kind(Kind::Float), r], 1))
}
