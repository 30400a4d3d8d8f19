//! Feature extraction with the official evaluation preprocessing.

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::data::dataset::Dataset;
use crate::data::loader::FloatTensorBuf;
use crate::data::ops::{self, Rgb8};
use crate::models::head::l2_normalize;
use crate::models::{Backbone, BackboneRef, VisionTransformer};

/// The official evaluation view for crop side `size`: `Resize(size·256/224)` of the shorter side
/// (bicubic) then `CenterCrop(size)` (224 → Resize 256 + CenterCrop 224).
pub fn eval_view(img: &Rgb8, size: usize) -> Rgb8 {
    let short = size * 256 / 224;
    let (w, h) = (img.width, img.height);
    let (nw, nh) = if w <= h {
        (short, short * h / w)
    } else {
        (short * w / h, short)
    };
    let resized = if (nw, nh) == (w, h) {
        img.clone()
    } else {
        ops::resized_crop(img, 0, 0, h, w, nh, nw)
    };
    let top = ((nh - size) as f64 / 2.0).round_ties_even() as usize;
    let left = ((nw - size) as f64 / 2.0).round_ties_even() as usize;
    ops::resized_crop(&resized, top, left, size, size, size, size)
}

/// Normalised evaluation views of `indices`, stacked `[N, 3, size, size]`, with their labels.
/// Images are decoded and resized on every core.
pub fn eval_batch(ds: &dyn Dataset, indices: &[usize], size: usize) -> Result<(Tensor, Tensor)> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    view_batch(ds, indices, size, workers, &|img: &Rgb8, _| {
        eval_view(img, size)
    })
}

/// Views `view(image, dataset index)` (each `size x size`) of `indices`, normalised and stacked
/// `[N, 3, size, size]`, with their labels; decoding and the views run on `workers` threads.
pub fn view_batch(
    ds: &dyn Dataset,
    indices: &[usize],
    size: usize,
    workers: usize,
    view: &(dyn Fn(&Rgb8, usize) -> Rgb8 + Sync),
) -> Result<(Tensor, Tensor)> {
    anyhow::ensure!(size > 0, "the view size must be at least 1 pixel");
    let s = size as i64;
    let n = 3 * size * size;
    let mut pix = FloatTensorBuf::zeros(&[indices.len() as i64, 3, s, s]);
    let mut labels = vec![0i64; indices.len()];
    let per = indices.len().div_ceil(workers.max(1)).max(1);
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let jobs: Vec<_> = pix
            .as_mut_slice()
            .chunks_mut(per * n)
            .zip(labels.chunks_mut(per))
            .zip(indices.chunks(per))
            .map(|((px, lb), idx)| {
                scope.spawn(move || -> Result<()> {
                    for (k, &i) in idx.iter().enumerate() {
                        let (img, l) = ds.get(i)?;
                        let v = view(&img, i);
                        anyhow::ensure!(
                            v.width == size && v.height == size,
                            "view of image {i} is {}x{}, expected {size}x{size}",
                            v.width,
                            v.height
                        );
                        ops::to_tensor_normalize_into(
                            &v,
                            ops::IMAGENET_MEAN,
                            ops::IMAGENET_STD,
                            &mut px[k * n..(k + 1) * n],
                        );
                        lb[k] = l;
                    }
                    Ok(())
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("an image worker panicked")))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    Ok((pix.into_tensor(), Tensor::from_slice(&labels)))
}

/// How features are taken from the backbone (`--n_last_blocks`, `--avgpool_patchtokens`), as
/// the official `extract_features` of eval_knn.py / eval_linear.py: the normed [CLS] tokens of
/// the last `n_last_blocks` blocks, concatenated (`avgpool 0`), the mean of the last block's
/// patch tokens without the final norm (`1`, the official mean-pooling ViT), or both (`2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureSpec {
    pub n_last_blocks: usize,
    pub avgpool: u8,
}

impl FeatureSpec {
    /// The last block's [CLS] token after the final norm: the k-NN default.
    pub const CLS: Self = Self {
        n_last_blocks: 1,
        avgpool: 0,
    };

    pub fn validate(&self, depth: usize) -> Result<()> {
        ensure!(
            self.avgpool <= 2,
            "--avgpool_patchtokens must be 0, 1 or 2, not {}",
            self.avgpool
        );
        ensure!(
            self.avgpool == 1 || (1..=depth).contains(&self.n_last_blocks),
            "--n_last_blocks must be in 1..={depth} for this backbone, not {}",
            self.n_last_blocks
        );
        Ok(())
    }

    /// Width of the concatenated feature for a backbone of width `embed_dim`.
    pub fn dim(&self, embed_dim: i64) -> i64 {
        let cls = if self.avgpool != 1 {
            self.n_last_blocks as i64
        } else {
            0
        };
        embed_dim * (cls + i64::from(self.avgpool > 0))
    }

    /// [`FeatureSpec::validate`] for a ViT or a Swin backbone (see the module documentation).
    pub fn validate_for<'a>(&self, backbone: impl Into<BackboneRef<'a>>) -> Result<()> {
        match backbone.into() {
            BackboneRef::Vit(v) => self.validate(v.blocks.len()),
            BackboneRef::Swin(s) => {
                ensure!(
                    self.avgpool == 0,
                    "--avgpool_patchtokens {} is a ViT option: a Swin has no [CLS] token, its \
                     features are already the average-pooled tokens of the last --n_last_blocks \
                     blocks (leave --avgpool_patchtokens at 0)",
                    self.avgpool
                );
                let total: i64 = s.cfg.depths.iter().sum();
                ensure!(
                    (1..=total as usize).contains(&self.n_last_blocks),
                    "--n_last_blocks must be in 1..={total} for this Swin (depths {:?}), not {}",
                    s.cfg.depths,
                    self.n_last_blocks
                );
                Ok(())
            }
        }
    }

    /// Width of the concatenated feature of `backbone`.
    pub fn dim_for<'a>(&self, backbone: impl Into<BackboneRef<'a>>) -> i64 {
        match backbone.into() {
            BackboneRef::Vit(v) => self.dim(v.cfg.embed_dim),
            BackboneRef::Swin(s) => s.intermediate_widths(self.n_last_blocks).iter().sum(),
        }
    }

    /// Features `[B, dim]` of images `[B, 3, H, W]` from a ViT or a Swin (no gradient).
    pub fn features_of<'a>(
        &self,
        backbone: impl Into<BackboneRef<'a>>,
        x: &Tensor,
    ) -> Result<Tensor> {
        let backbone = backbone.into();
        match backbone {
            BackboneRef::Vit(v) => self.features(v, x),
            BackboneRef::Swin(s) => {
                let _g = tch::no_grad_guard();
                self.validate_for(backbone)?;
                Ok(Tensor::cat(
                    &s.intermediate_avgpool(x, self.n_last_blocks)?,
                    -1,
                ))
            }
        }
    }

    /// Features `[B, dim]` of images `[B, 3, H, W]` (no gradient).
    pub fn features(&self, vit: &VisionTransformer, x: &Tensor) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        let n = if self.avgpool == 1 {
            1
        } else {
            self.n_last_blocks
        };
        let layers = vit.intermediate_tokens(x, n, self.avgpool != 1)?;
        let mut parts: Vec<Tensor> = Vec::new();
        if self.avgpool != 1 {
            parts.extend(layers.iter().map(|t| t.select(1, 0)));
        }
        if self.avgpool > 0 {
            let last = layers.last().context("no block outputs")?;
            let n_tok = last.size()[1];
            parts.push(last.narrow(1, 1, n_tok - 1).mean_dim(1, false, Kind::Float));
        }
        Ok(Tensor::cat(&parts, -1))
    }
}

/// What to use as the feature of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// The backbone's tokens as the spec says ([`FeatureSpec::CLS`]: the official k-NN feature).
    Backbone(FeatureSpec),
    /// The normalised pixels themselves (a baseline).
    Pixels,
}

/// L2-normalised features `[N, D]` and labels `[N]` of `indices`.
pub fn extract(
    backbone: Option<&Backbone>,
    kind: FeatureKind,
    ds: &dyn Dataset,
    indices: &[usize],
    size: usize,
    batch: usize,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    anyhow::ensure!(
        !indices.is_empty(),
        "no images to extract features from (an empty data set or --subset 0?)"
    );
    anyhow::ensure!(
        size > 0,
        "the evaluation crop size must be at least 1 pixel"
    );
    let mut feats = Vec::new();
    let mut labels = Vec::new();
    let _guard = tch::no_grad_guard();
    let bar = crate::util::progress_bar(indices.len().div_ceil(batch.max(1)) as u64, "features");
    for chunk in indices.chunks(batch.max(1)) {
        let (x, l) = eval_batch(ds, chunk, size)?;
        let f = match (kind, backbone) {
            (FeatureKind::Backbone(spec), Some(b)) => spec.features_of(b, &x.to_device(device))?,
            (FeatureKind::Backbone(_), None) => anyhow::bail!("backbone features need a backbone"),
            (FeatureKind::Pixels, _) => x.flatten(1, -1),
        };
        feats.push(l2_normalize(&f.to_kind(Kind::Float)).to_device(Device::Cpu));
        labels.push(l);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((Tensor::cat(&feats, 0), Tensor::cat(&labels, 0)))
}

/// [`extract`] split over the ranks of a data-parallel run, as the official eval_knn.py: rank r
/// takes positions r, r + W, r + 2W, … of `indices` (padded by wrapping around, like
/// `DistributedSampler(shuffle=False)`), and the shards are all-gathered back into the order of
/// `indices` on every rank.
#[allow(clippy::too_many_arguments)]
pub fn extract_sharded(
    comm: &dyn crate::dist::Comm,
    backbone: Option<&Backbone>,
    kind: FeatureKind,
    ds: &dyn Dataset,
    indices: &[usize],
    size: usize,
    batch: usize,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    let ws = comm.world_size();
    if ws == 1 {
        return extract(backbone, kind, ds, indices, size, batch, device);
    }
    let n = indices.len();
    anyhow::ensure!(n > 0, "no images to extract features from");
    let mine = crate::dist::shard(indices, comm.rank(), ws);
    let (f, l) = extract(backbone, kind, ds, &mine, size, batch, device)?;
    Ok((
        crate::dist::unshard(comm, &f, n)?,
        crate::dist::unshard(comm, &l, n)?,
    ))
}
