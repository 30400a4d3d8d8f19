//! Video object segmentation by label propagation, the core of the official
//! `eval_video_segmentation.py` (DAVIS-2017, from DINO): the first frame's segmentation is
//! carried to every later frame through the affinities of patch features.
//!
//! For a target frame, the affinity of every target patch to every patch of the context frames
//! (the first frame and the `--n_last_frames` previous ones, a queue) is
//! `exp(<f_t, f_s> / 0.1)` of L2-normalised features, restricted to a
//! `(2 --size_mask_neighborhood + 1)²` window around the target patch when that is positive;
//! for each target patch only the `--topk` largest affinities over all context patches are
//! kept and normalised to sum 1, and the target's soft labels are the so-weighted sum of the
//! context frames' soft labels. The label map is upsampled by the patch size (bilinear),
//! every channel min-max normalised (`norm_mask`) and the argmax taken.
//!
//! Not here yet: reading DAVIS folders, the frame resizing of `read_frame` (OpenCV) and writing
//! the palette PNGs; this module is the propagation itself, checked against the official
//! functions in PyTorch (`tests/protocols.rs`).

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// The official options (defaults 7, 12, 5).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PropagationConfig {
    pub n_last_frames: usize,
    pub size_mask_neighborhood: i64,
    pub topk: i64,
}

impl Default for PropagationConfig {
    fn default() -> Self {
        Self {
            n_last_frames: 7,
            size_mask_neighborhood: 12,
            topk: 5,
        }
    }
}

/// `restrict_neighborhood`: `[h w, h w]`, 1 where the source patch lies within `size` patches
/// (each axis) of the target patch.
pub fn restrict_neighborhood(h: i64, w: i64, size: i64) -> Tensor {
    let ys = Tensor::arange(h, (Kind::Int64, tch::Device::Cpu))
        .unsqueeze(1)
        .expand([h, w], false)
        .reshape([-1]);
    let xs = Tensor::arange(w, (Kind::Int64, tch::Device::Cpu))
        .unsqueeze(0)
        .expand([h, w], false)
        .reshape([-1]);
    let dy = (ys.unsqueeze(1) - ys.unsqueeze(0)).abs();
    let dx = (xs.unsqueeze(1) - xs.unsqueeze(0)).abs();
    (dy.le(size).logical_and(&dx.le(size))).to_kind(Kind::Float)
}

/// `norm_mask`: each channel of `[C, h, w]` with a positive maximum rescaled to [0, 1]
/// (minus its minimum, divided by the new maximum).
pub fn norm_mask(mask: &Tensor) -> Tensor {
    let c = mask.size()[0];
    let chans: Vec<Tensor> = (0..c)
        .map(|i| {
            let m = mask.get(i);
            if m.max().double_value(&[]) > 0.0 {
                let m = &m - m.min();
                let mx = m.max();
                m / mx
            } else {
                m
            }
        })
        .collect();
    Tensor::stack(&chans, 0)
}

/// `label_propagation`: soft labels `[1, C, h, w]` of the target frame from its patch
/// features `feat_tar` `[h w, dim]`, the context frames' features (each `[dim, h w]`) and soft
/// labels (each `[1, C, h, w]`); `mask` is the neighbourhood of [`restrict_neighborhood`].
pub fn label_propagation(
    cfg: &PropagationConfig,
    feat_tar: &Tensor,
    sources: &[Tensor],
    segs: &[Tensor],
    h: i64,
    w: i64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    ensure!(
        !sources.is_empty() && sources.len() == segs.len(),
        "label propagation needs as many context segmentations as context frames"
    );
    let ncontext = sources.len() as i64;
    let hw = h * w;
    ensure!(
        cfg.topk >= 1 && cfg.topk <= ncontext * hw,
        "--topk {} must be between 1 and the {} context patches",
        cfg.topk,
        ncontext * hw
    );
    let _g = tch::no_grad_guard();
    let tar = feat_tar / feat_tar.norm_scalaropt_dim(2.0, [1i64], true).clamp_min(1e-12);
    let src = Tensor::stack(sources, 0);
    let src = &src / src.norm_scalaropt_dim(2.0, [1i64], true).clamp_min(1e-12);
    // [ctx, hw (target), hw (source)]
    let mut aff = (tar.unsqueeze(0).expand([ncontext, hw, -1], false).bmm(&src) / 0.1).exp();
    if let Some(m) = mask {
        let dev = aff.device();
        aff = aff * m.to_device(dev).unsqueeze(0);
    }
    // [ctx * hw (source), hw (target)]
    let aff = aff.transpose(2, 1).reshape([-1, hw]);
    let (tk, _) = aff.topk(cfg.topk, 0, true, true);
    let tk_min = tk.min_dim(0, false).0;
    let aff = aff.where_self(&aff.ge_tensor(&tk_min), &aff.zeros_like());
    let aff = &aff / aff.sum_dim_intlist(0, true, Kind::Float);
    let segs = Tensor::cat(segs, 0);
    let c = segs.size()[1];
    let segs = segs
        .reshape([ncontext, c, -1])
        .transpose(2, 1)
        .reshape([-1, c])
        .tr();
    Ok(segs.mm(&aff).reshape([1, c, h, w]))
}

/// The official tracking loop over a video whose patch features are `feats` (per frame
/// `[h w, dim]`, first frame included) from the first frame's soft labels `first_seg`
/// `[1, C, h, w]`: the label map of every later frame at `h patch x w patch` pixels (before the
/// resize to the original frame size), as class indices `[H, W]` (int64).
pub fn propagate_video(
    cfg: &PropagationConfig,
    feats: &[Tensor],
    first_seg: &Tensor,
    h: i64,
    w: i64,
    patch: i64,
) -> Result<Vec<Tensor>> {
    ensure!(feats.len() >= 2, "a video needs at least two frames");
    // The official queue.Queue(0) would be unbounded and its first get() would block forever.
    ensure!(cfg.n_last_frames >= 1, "--n_last_frames must be at least 1");
    let mask = (cfg.size_mask_neighborhood > 0)
        .then(|| restrict_neighborhood(h, w, cfg.size_mask_neighborhood));
    let first = feats[0].tr();
    let mut queue: std::collections::VecDeque<(Tensor, Tensor)> = Default::default();
    let mut out = Vec::new();
    for f in &feats[1..] {
        let mut srcs = vec![first.shallow_clone()];
        let mut segs = vec![first_seg.shallow_clone()];
        for (qf, qs) in &queue {
            srcs.push(qf.shallow_clone());
            segs.push(qs.shallow_clone());
        }
        let seg = label_propagation(cfg, f, &srcs, &segs, h, w, mask.as_ref())?;
        if queue.len() == cfg.n_last_frames {
            queue.pop_front();
        }
        queue.push_back((f.tr(), seg.copy()));
        let up = seg.upsample_bilinear2d(
            [h * patch, w * patch],
            false,
            Some(patch as f64),
            Some(patch as f64),
        );
        let up = norm_mask(&up.get(0));
        out.push(up.argmax(0, false));
    }
    Ok(out)
}

/// `to_one_hot`: labels `[h, w]` (int64) to `[1, n, h, w]` (float), `n` = max label + 1.
pub fn to_one_hot(labels: &Tensor) -> Tensor {
    let n = labels.max().int64_value(&[]) + 1;
    labels.one_hot(n).permute([2, 0, 1]).unsqueeze(0).to_kind(Kind::Float)
}
