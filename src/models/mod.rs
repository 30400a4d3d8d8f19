//! Backbones, the projection head and the multi-crop wrapper that joins them.

pub mod head;
pub mod init;
pub mod layers;
pub mod swin;
pub mod vit;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

pub use head::{HeadAct, HeadConfig, HeadNorm, IbotHead};
pub use swin::{SwinConfig, SwinTransformer};
pub use vit::{VisionTransformer, VitConfig};

/// Shape of a backbone: a ViT or a Swin. Serialised as the inner configuration (a ViT
/// configuration written before Swin existed reads back as `Vit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BackboneConfig {
    Vit(VitConfig),
    Swin(SwinConfig),
}

impl From<VitConfig> for BackboneConfig {
    fn from(c: VitConfig) -> Self {
        Self::Vit(c)
    }
}

impl From<SwinConfig> for BackboneConfig {
    fn from(c: SwinConfig) -> Self {
        Self::Swin(c)
    }
}

impl BackboneConfig {
    /// Width of the output tokens (the head's input).
    /// The input side the backbone was built for (the position grid or the windows' layout).
    pub fn img_size(&self) -> i64 {
        match self {
            Self::Vit(c) => c.img_size,
            Self::Swin(c) => c.img_size,
        }
    }

    /// Side of the patches the backbone embeds.
    pub fn patch_size(&self) -> i64 {
        match self {
            Self::Vit(c) => c.patch_size,
            Self::Swin(c) => c.patch_size,
        }
    }

    pub fn embed_dim(&self) -> i64 {
        match self {
            Self::Vit(c) => c.embed_dim,
            Self::Swin(c) => c.num_features(),
        }
    }

    pub fn masked_im_modeling(&self) -> bool {
        match self {
            Self::Vit(c) => c.masked_im_modeling,
            Self::Swin(c) => c.masked_im_modeling,
        }
    }

    pub fn drop_path_rate(&self) -> f64 {
        match self {
            Self::Vit(c) => c.drop_path_rate,
            Self::Swin(c) => c.drop_path_rate,
        }
    }

    /// The same shape without drop path and `masked_embed` (the teacher, or inference).
    pub fn without_training_parts(&self) -> Self {
        match self {
            Self::Vit(c) => Self::Vit(VitConfig {
                drop_path_rate: 0.0,
                masked_im_modeling: false,
                ..c.clone()
            }),
            Self::Swin(c) => Self::Swin(SwinConfig {
                drop_path_rate: 0.0,
                masked_im_modeling: false,
                ..c.clone()
            }),
        }
    }

    /// The same shape without drop path (`masked_embed` kept when present).
    pub fn without_drop_path(&self) -> Self {
        match self {
            Self::Vit(c) => Self::Vit(VitConfig {
                drop_path_rate: 0.0,
                ..c.clone()
            }),
            Self::Swin(c) => Self::Swin(SwinConfig {
                drop_path_rate: 0.0,
                ..c.clone()
            }),
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Vit(c) => c.validate(),
            Self::Swin(c) => c.validate(),
        }
    }

    pub fn as_vit(&self) -> Option<&VitConfig> {
        match self {
            Self::Vit(c) => Some(c),
            Self::Swin(_) => None,
        }
    }

    pub fn as_vit_mut(&mut self) -> Option<&mut VitConfig> {
        match self {
            Self::Vit(c) => Some(c),
            Self::Swin(_) => None,
        }
    }
}

/// A ViT or a Swin behind one interface: tokens `[B, 1 + N, D]` (for Swin, token 0 is the
/// average-pooled final-stage token).
#[derive(Debug)]
pub enum Backbone {
    Vit(VisionTransformer),
    Swin(SwinTransformer),
}

impl Backbone {
    pub fn new(
        ps: &mut ParamStore,
        prefix: &str,
        cfg: &BackboneConfig,
        trainable: bool,
        dev: Device,
    ) -> Result<Self> {
        Ok(match cfg {
            BackboneConfig::Vit(c) => {
                Self::Vit(VisionTransformer::new(ps, prefix, c, trainable, dev)?)
            }
            BackboneConfig::Swin(c) => {
                Self::Swin(SwinTransformer::new(ps, prefix, c, trainable, dev)?)
            }
        })
    }

    /// All output tokens after the final norm; `train` enables drop path.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        match self {
            Self::Vit(m) => m.forward(x, mask, train),
            Self::Swin(m) => m.forward(x, mask, train),
        }
    }

    /// Restarts the drop-path generator.
    pub fn reseed_drop_path(&self, seed: u64) {
        match self {
            Self::Vit(m) => m.reseed_drop_path(seed),
            Self::Swin(m) => m.reseed_drop_path(seed),
        }
    }

    /// Width of the output tokens.
    pub fn embed_dim(&self) -> i64 {
        match self {
            Self::Vit(m) => m.cfg.embed_dim,
            Self::Swin(m) => m.cfg.num_features(),
        }
    }

    /// The last block's attention: ViT `get_last_selfattention` `[B, heads, 1+N, 1+N]`, Swin
    /// `get_selfattention` `[nW·B, heads, ws², ws²]`.
    pub fn last_selfattention(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Vit(m) => m.get_last_selfattention(x),
            Self::Swin(m) => m.get_selfattention(x),
        }
    }

    pub fn as_vit(&self) -> Option<&VisionTransformer> {
        match self {
            Self::Vit(m) => Some(m),
            Self::Swin(_) => None,
        }
    }

    pub fn as_swin(&self) -> Option<&SwinTransformer> {
        match self {
            Self::Swin(m) => Some(m),
            Self::Vit(_) => None,
        }
    }
}

/// A borrowed ViT or Swin (what `&VisionTransformer`, `&SwinTransformer` and `&Backbone` all
/// convert to), for functions that only read a backbone.
#[derive(Debug, Clone, Copy)]
pub enum BackboneRef<'a> {
    Vit(&'a VisionTransformer),
    Swin(&'a SwinTransformer),
}

impl<'a> From<&'a VisionTransformer> for BackboneRef<'a> {
    fn from(m: &'a VisionTransformer) -> Self {
        Self::Vit(m)
    }
}

impl<'a> From<&'a SwinTransformer> for BackboneRef<'a> {
    fn from(m: &'a SwinTransformer) -> Self {
        Self::Swin(m)
    }
}

impl<'a> From<&'a Backbone> for BackboneRef<'a> {
    fn from(m: &'a Backbone) -> Self {
        match m {
            Backbone::Vit(v) => Self::Vit(v),
            Backbone::Swin(s) => Self::Swin(s),
        }
    }
}

use crate::params::ParamStore;

/// Outputs of the wrapper on a list of views (rows are view-major: view v is rows v·B..v·B+B-1).
#[derive(Debug)]
pub struct MultiCropOutput {
    /// Head output of the [CLS] tokens, `[V·B, out_dim]`.
    pub cls: Tensor,
    /// Head output of the patch tokens, `[V·B, N, patch_dim]` (views of one resolution only).
    pub patch: Option<Tensor>,
    /// Backbone tokens after the final norm, one entry per resolution group `[Vg·B, 1 + N, D]`
    /// (`[Vg·B, 1, D]`, the [CLS] tokens alone, where a ViT ran the training path's pruned last
    /// block: [`MultiCropWrapper::forward_cls_only`], [`crate::train::Ibot::forward_train`]).
    pub backbone: Vec<Tensor>,
}

/// The official `utils.MultiCropWrapper(backbone, iBOTHead)`: parameter names `backbone.*` and
/// `head.*`. Consecutive views of equal resolution are concatenated and run together.
#[derive(Debug)]
pub struct MultiCropWrapper {
    pub backbone: Backbone,
    pub head: IbotHead,
}

impl MultiCropWrapper {
    pub fn new(
        ps: &mut ParamStore,
        backbone: &BackboneConfig,
        head: &HeadConfig,
        trainable: bool,
        dev: Device,
    ) -> Result<Self> {
        ensure!(
            head.in_dim == backbone.embed_dim(),
            "head input dim {} does not match the backbone embed dim {}",
            head.in_dim,
            backbone.embed_dim()
        );
        let backbone = Backbone::new(ps, "backbone.", backbone, trainable, dev)?;
        let head = IbotHead::new(ps, "head.", head, trainable, dev)?;
        Ok(Self { backbone, head })
    }

    /// Runs views `[B, C, H, W]` (each with an optional mask `[B, h, w]`) through backbone and
    /// head. `train` enables drop path.
    pub fn forward(
        &self,
        views: &[Tensor],
        masks: Option<&[Tensor]>,
        train: bool,
    ) -> Result<MultiCropOutput> {
        self.forward_with(views, masks, train, true)
    }

    /// [`MultiCropWrapper::forward`] with the head on the [CLS] tokens only (`patch` is None):
    /// the student's local views, whose patch outputs the loss never reads. A ViT also runs its
    /// last block's queries, MLP and final norm on the [CLS] rows only
    /// ([`VisionTransformer::forward_train_rows`]), so `backbone` then holds the [CLS] tokens
    /// alone, `[Vg·B, 1, D]`.
    pub fn forward_cls_only(&self, views: &[Tensor], train: bool) -> Result<MultiCropOutput> {
        self.forward_with(views, None, train, false)
    }

    fn forward_with(
        &self,
        views: &[Tensor],
        masks: Option<&[Tensor]>,
        train: bool,
        patch_head: bool,
    ) -> Result<MultiCropOutput> {
        ensure!(!views.is_empty(), "no views to run");
        if let Some(m) = masks {
            ensure!(
                m.len() == views.len(),
                "{} masks given for {} views",
                m.len(),
                views.len()
            );
        }
        let mut cls = Vec::new();
        let mut patch = Vec::new();
        let mut backbone = Vec::new();
        let mut start = 0;
        while start < views.len() {
            let res = views[start].size().last().copied();
            let mut end = start + 1;
            while end < views.len() && views[end].size().last().copied() == res {
                end += 1;
            }
            let x = Tensor::cat(&views[start..end], 0);
            let m = masks.map(|m| Tensor::cat(&m[start..end], 0));
            if let (false, Some(vit)) = (patch_head, self.backbone.as_vit()) {
                // [CLS] only: the last block and the final norm on the [CLS] rows alone.
                let c = vit.forward_train_rows(&x, m.as_ref(), None, train)?;
                cls.push(self.head.forward_cls(&c));
                backbone.push(c.unsqueeze(1));
                start = end;
                continue;
            }
            let tokens = self.backbone.forward(&x, m.as_ref(), train)?;
            if patch_head {
                let (c, p) = self.head.forward_tokens(&tokens)?;
                cls.push(c);
                patch.push(p);
            } else {
                cls.push(self.head.forward_cls(&tokens.select(1, 0)));
            }
            backbone.push(tokens);
            start = end;
        }
        let same_n = patch.windows(2).all(|w| w[0].size()[1] == w[1].size()[1]);
        let patch = (patch_head && same_n).then(|| Tensor::cat(&patch, 0));
        Ok(MultiCropOutput {
            cls: Tensor::cat(&cls, 0),
            patch,
            backbone,
        })
    }
}
