//! Backbones, the projection head and the multi-crop wrapper that joins them.

pub mod head;
pub mod init;
pub mod vit;

use anyhow::{ensure, Result};
use tch::{Device, Tensor};

pub use head::{HeadAct, HeadConfig, HeadNorm, IbotHead};
pub use vit::{VisionTransformer, VitConfig};

use crate::params::ParamStore;

/// Outputs of the wrapper on a list of views (rows are view-major: view v is rows v·B..v·B+B-1).
#[derive(Debug)]
pub struct MultiCropOutput {
    /// Head output of the [CLS] tokens, `[V·B, out_dim]`.
    pub cls: Tensor,
    /// Head output of the patch tokens, `[V·B, N, patch_dim]` (views of one resolution only).
    pub patch: Option<Tensor>,
    /// Backbone tokens after the final norm, one entry per resolution group `[Vg·B, 1 + N, D]`.
    pub backbone: Vec<Tensor>,
}

/// The official `utils.MultiCropWrapper(backbone, iBOTHead)`: parameter names `backbone.*` and
/// `head.*`. Consecutive views of equal resolution are concatenated and run together.
#[derive(Debug)]
pub struct MultiCropWrapper {
    pub backbone: VisionTransformer,
    pub head: IbotHead,
}

impl MultiCropWrapper {
    pub fn new(
        ps: &mut ParamStore,
        vit: &VitConfig,
        head: &HeadConfig,
        trainable: bool,
        dev: Device,
    ) -> Result<Self> {
        ensure!(
            head.in_dim == vit.embed_dim,
            "head input dim {} does not match the backbone embed dim {}",
            head.in_dim,
            vit.embed_dim
        );
        let backbone = VisionTransformer::new(ps, "backbone.", vit, trainable, dev)?;
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
    /// the student's local views, whose patch outputs the loss never reads.
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
