//! Swin Transformer backbone, as the official `models/swin_transformer.py`.
//!
//! State-dict names (under the prefix given at construction, e.g. `backbone.`): `masked_embed`
//! (student only), `patch_embed.proj.{weight,bias}`, `patch_embed.norm.{weight,bias}`,
//! `layers.{i}.blocks.{j}.{norm1, attn.relative_position_bias_table,
//! attn.relative_position_index (int64 buffer), attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`,
//! `layers.{i}.downsample.{reduction.weight, norm.{weight,bias}}` (all stages but the last),
//! `norm.{weight,bias}`.
//!
//! Semantics kept from the official code:
//! * each block's window size and shift are fixed from the resolution the model is built for
//!   (`img_size / patch_size / 2^stage`): a stage whose grid is not larger than the window uses
//!   one window of the grid's size and no shift. Other inputs (e.g. 96-px local crops) are
//!   zero-padded to whole windows after `norm1`, and the padding takes part in attention;
//! * shifted windows use the official attention mask (0 within a region, -100 across regions),
//!   built for the padded grid and cached per input resolution;
//! * `PatchMerging` pads odd grids with a zero row/column;
//! * masked patch embeddings (after the patch norm) are replaced by `masked_embed`, with masks
//!   drawn on a coarser grid repeated up to the 4-px patch grid;
//! * the output is `[B, 1 + N, D]`: the average of the final-stage tokens (after the final
//!   norm) in place of [CLS], then the final-stage tokens.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{bail, ensure, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::init::{trunc_normal, zeros};
use super::layers::{drop_path, LayerNorm, Linear, Mlp, PatchEmbed, LN_EPS};
use crate::params::ParamStore;

/// Shape of a Swin Transformer. The presets follow the official `swin_tiny/small/base/large`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwinConfig {
    /// Resolution the model is built for (official: 224); it fixes each stage's window and
    /// shift, not the input size.
    pub img_size: i64,
    pub patch_size: i64,
    pub in_chans: i64,
    pub embed_dim: i64,
    pub depths: Vec<i64>,
    pub num_heads: Vec<i64>,
    pub window_size: i64,
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    /// Stochastic depth rate of the last block (linearly increasing over all blocks).
    pub drop_path_rate: f64,
    /// Whether the model owns a learnable `masked_embed` (the iBOT student).
    pub masked_im_modeling: bool,
}

impl SwinConfig {
    /// `swin_tiny`, `swin_small`, `swin_base`, `swin_large` with their official default
    /// drop-path rates (0.1, 0.2, 0.2, 0.2; `main_ibot.py` keeps them for the student).
    pub fn from_arch(arch: &str, window_size: i64) -> Result<Self> {
        let (embed_dim, depths, num_heads, dpr): (i64, &[i64], &[i64], f64) = match arch {
            "swin_tiny" => (96, &[2, 2, 6, 2], &[3, 6, 12, 24], 0.1),
            "swin_small" => (96, &[2, 2, 18, 2], &[3, 6, 12, 24], 0.2),
            "swin_base" => (128, &[2, 2, 18, 2], &[4, 8, 16, 32], 0.2),
            "swin_large" => (192, &[2, 2, 18, 2], &[6, 12, 24, 48], 0.2),
            other => bail!(
                "unknown architecture '{other}': expected one of swin_tiny, swin_small, swin_base, swin_large"
            ),
        };
        Ok(Self {
            img_size: 224,
            patch_size: 4,
            in_chans: 3,
            embed_dim,
            depths: depths.to_vec(),
            num_heads: num_heads.to_vec(),
            window_size,
            mlp_ratio: 4.0,
            qkv_bias: true,
            drop_path_rate: dpr,
            masked_im_modeling: false,
        })
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.patch_size > 0, "patch_size must be positive");
        ensure!(
            self.img_size >= self.patch_size,
            "img_size {} is smaller than the patch size {}",
            self.img_size,
            self.patch_size
        );
        ensure!(!self.depths.is_empty(), "a Swin needs at least one stage");
        ensure!(
            self.depths.len() == self.num_heads.len(),
            "{} stage depths but {} head counts",
            self.depths.len(),
            self.num_heads.len()
        );
        ensure!(
            self.depths.iter().all(|&d| d > 0),
            "every stage needs at least one block"
        );
        ensure!(self.window_size > 0, "window_size must be positive");
        ensure!(self.embed_dim > 0, "embed_dim must be positive");
        for (i, &h) in self.num_heads.iter().enumerate() {
            let dim = self.stage_dim(i);
            ensure!(
                h > 0 && dim % h == 0,
                "stage {i}: width {dim} is not divisible by {h} heads"
            );
        }
        for i in 0..self.depths.len() {
            ensure!(
                self.stage_resolution(i) > 0,
                "img_size {} leaves no tokens at stage {i}",
                self.img_size
            );
        }
        ensure!(
            (0.0..1.0).contains(&self.drop_path_rate),
            "drop_path_rate must be in [0, 1), got {}",
            self.drop_path_rate
        );
        ensure!(self.mlp_ratio > 0.0, "mlp_ratio must be positive");
        Ok(())
    }

    /// Width of stage `i` (`embed_dim · 2^i`).
    pub fn stage_dim(&self, i: usize) -> i64 {
        self.embed_dim << i
    }

    /// Width of the output tokens (`num_features`: the last stage's width).
    pub fn num_features(&self) -> i64 {
        self.stage_dim(self.depths.len() - 1)
    }

    /// Construction grid side of stage `i` (`img_size // patch_size // 2^i`, as official).
    pub fn stage_resolution(&self, i: usize) -> i64 {
        (self.img_size / self.patch_size) >> i
    }

    /// `(window, shift)` of block `j` of stage `i`, as the official block decides them.
    pub fn window_and_shift(&self, i: usize, j: usize) -> (i64, i64) {
        let res = self.stage_resolution(i);
        let shift = if j % 2 == 0 { 0 } else { self.window_size / 2 };
        if res <= self.window_size {
            (res, 0)
        } else {
            (self.window_size, shift)
        }
    }
}

/// The official `relative_position_index` of a `ws x ws` window: `[ws², ws²]` int64.
pub fn relative_position_index(ws: i64, dev: Device) -> Tensor {
    let n = ws * ws;
    let mut idx = Vec::with_capacity((n * n) as usize);
    for i in 0..n {
        let (hi, wi) = (i / ws, i % ws);
        for j in 0..n {
            let (hj, wj) = (j / ws, j % ws);
            idx.push((hi - hj + ws - 1) * (2 * ws - 1) + (wi - wj + ws - 1));
        }
    }
    Tensor::from_slice(&idx).view([n, n]).to_device(dev)
}

/// A pre-trained `relative_position_bias_table` `[(2s-1)², heads]` for a `window x window`
/// window: `[(2·window-1)², heads]`, each head's `(2s-1) x (2s-1)` table resized bicubically
/// (`F.interpolate(mode='bicubic', align_corners=False)`), as the official Swin's
/// `init_weights` (and Microsoft's Swin fine-tuning, and timm's `resize_rel_pos_bias_table_simple`)
/// do when a model is built with another window than its checkpoint. The official
/// `run_class_finetuning.py` has no Swin path for it (see README, Swin fine-tuning).
pub fn resize_rel_pos_bias_table(table: &Tensor, window: i64) -> Result<Tensor> {
    ensure!(window > 0, "window size must be positive");
    let size = table.size();
    ensure!(
        size.len() == 2,
        "a relative_position_bias_table is [(2w-1)², heads], not {size:?}"
    );
    let (l1, heads) = (size[0], size[1]);
    let s1 = (l1 as f64).sqrt().round() as i64;
    ensure!(
        s1 * s1 == l1 && s1 % 2 == 1,
        "a relative_position_bias_table of {l1} rows is not (2w-1)² for a window w"
    );
    let s2 = 2 * window - 1;
    if s1 == s2 {
        return Ok(table.shallow_clone());
    }
    let kind = table.kind();
    Ok(table
        .to_kind(Kind::Float)
        .permute([1, 0])
        .reshape([1, heads, s1, s1])
        .upsample_bicubic2d([s2, s2], false, None, None)
        .reshape([heads, s2 * s2])
        .permute([1, 0])
        .contiguous()
        .to_kind(kind))
}

/// `[B, H, W, C]` → `[B·nW, ws², C]` (windows row-major within each image).
fn window_partition(x: &Tensor, ws: i64) -> Tensor {
    let (b, h, w, c) = x.size4().expect("window_partition on [B, H, W, C]");
    x.view([b, h / ws, ws, w / ws, ws, c])
        .permute([0, 1, 3, 2, 4, 5])
        .contiguous()
        .view([-1, ws * ws, c])
}

/// Inverse of [`window_partition`] for an `h x w` grid.
fn window_reverse(windows: &Tensor, ws: i64, h: i64, w: i64) -> Tensor {
    let c = *windows.size().last().expect("windows");
    let b = windows.size()[0] / ((h / ws) * (w / ws));
    windows
        .view([b, h / ws, w / ws, ws, ws, c])
        .permute([0, 1, 3, 2, 4, 5])
        .contiguous()
        .view([b, h, w, c])
}

/// The official shifted-window attention mask for a padded `hp x wp` grid: `[nW, ws², ws²]`,
/// 0 between tokens of the same region, -100 across regions.
fn shifted_window_mask(hp: i64, wp: i64, ws: i64, shift: i64) -> Tensor {
    // Region of a row/column: before the last window, in the last window before the shift
    // boundary, or in the wrapped-around shift strip.
    let region = |p: i64, len: i64| -> i64 {
        if p < len - ws {
            0
        } else if p < len - shift {
            1
        } else {
            2
        }
    };
    let (nh, nw) = (hp / ws, wp / ws);
    let n = ws * ws;
    let mut out = Vec::with_capacity((nh * nw * n * n) as usize);
    for wy in 0..nh {
        for wx in 0..nw {
            let ids: Vec<i64> = (0..n)
                .map(|t| {
                    let (y, x) = (wy * ws + t / ws, wx * ws + t % ws);
                    region(y, hp) * 3 + region(x, wp)
                })
                .collect();
            for &a in &ids {
                for &b in &ids {
                    out.push(if a == b { 0.0f32 } else { -100.0 });
                }
            }
        }
    }
    Tensor::from_slice(&out).view([nh * nw, n, n])
}

/// Window multi-head self-attention with a relative position bias.
#[derive(Debug)]
pub struct WindowAttention {
    pub relative_position_bias_table: Tensor,
    pub relative_position_index: Tensor,
    pub qkv: Linear,
    pub proj: Linear,
    pub num_heads: i64,
    pub window_size: i64,
    pub scale: f64,
}

impl WindowAttention {
    /// `[heads, ws², ws²]` bias gathered from the table.
    fn bias(&self) -> Tensor {
        let n = self.window_size * self.window_size;
        self.relative_position_bias_table
            .index_select(0, &self.relative_position_index.view([-1]))
            .view([n, n, -1])
            .permute([2, 0, 1])
            .contiguous()
    }

    /// Windows `[B·nW, N, C]` (all windows of all images at once) with an optional
    /// `[nW, N, N]` mask; returns the output and the attention probabilities.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> (Tensor, Tensor) {
        let (bw, n, c) = x
            .size3()
            .expect("window attention input must be [B·nW, N, C]");
        let qkv = self
            .qkv
            .forward(x)
            .reshape([bw, n, 3, self.num_heads, c / self.num_heads])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let q = q * self.scale;
        let mut attn = q.matmul(&k.transpose(-2, -1)) + self.bias().unsqueeze(0);
        if let Some(m) = mask {
            let nw = m.size()[0];
            attn = (attn.view([bw / nw, nw, self.num_heads, n, n]) + m.unsqueeze(1).unsqueeze(0))
                .view([-1, self.num_heads, n, n]);
        }
        let attn = attn.softmax(-1, Kind::Float);
        let out = attn.matmul(&v).transpose(1, 2).reshape([bw, n, c]);
        (self.proj.forward(&out), attn)
    }
}

/// One Swin block: (shifted) window attention and MLP, pre-norm, with stochastic depth.
#[derive(Debug)]
pub struct SwinBlock {
    pub norm1: LayerNorm,
    pub attn: WindowAttention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub window_size: i64,
    pub shift_size: i64,
    pub drop_path: f64,
    /// Shifted-window masks per padded grid `(hp, wp)` and device.
    masks: Mutex<HashMap<(i64, i64, Device), Tensor>>,
}

impl SwinBlock {
    fn attn_mask(&self, hp: i64, wp: i64, dev: Device) -> Tensor {
        let mut cache = self.masks.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry((hp, wp, dev))
            .or_insert_with(|| {
                shifted_window_mask(hp, wp, self.window_size, self.shift_size).to_device(dev)
            })
            .shallow_clone()
    }

    /// Tokens `[B, H·W, C]` of an `h x w` grid; returns the new tokens and the attention
    /// probabilities `[B·nW, heads, ws², ws²]`.
    pub fn forward(
        &self,
        x: &Tensor,
        h: i64,
        w: i64,
        train: bool,
        rng: &Mutex<ChaCha8Rng>,
    ) -> (Tensor, Tensor) {
        let (b, _, c) = x.size3().expect("Swin block input must be [B, L, C]");
        let ws = self.window_size;
        let y = self.norm1.forward(x).view([b, h, w, c]);
        // Pad to whole windows (right and bottom).
        let pad_r = (ws - w % ws) % ws;
        let pad_b = (ws - h % ws) % ws;
        let y = if pad_r > 0 || pad_b > 0 {
            y.constant_pad_nd([0, 0, 0, pad_r, 0, pad_b])
        } else {
            y
        };
        let (hp, wp) = (h + pad_b, w + pad_r);
        let s = self.shift_size;
        let (y, mask) = if s > 0 {
            (
                y.roll([-s, -s], [1, 2]),
                Some(self.attn_mask(hp, wp, y.device())),
            )
        } else {
            (y, None)
        };
        let windows = window_partition(&y, ws);
        let (out, attn) = self.attn.forward(&windows, mask.as_ref());
        let y = window_reverse(&out.view([-1, ws, ws, c]), ws, hp, wp);
        let y = if s > 0 { y.roll([s, s], [1, 2]) } else { y };
        let y = if pad_r > 0 || pad_b > 0 {
            y.narrow(1, 0, h).narrow(2, 0, w).contiguous()
        } else {
            y
        };
        let y = y.view([b, h * w, c]);
        let x = x + drop_path(&y, self.drop_path, train, rng);
        let m = self.mlp.forward(&self.norm2.forward(&x));
        (&x + drop_path(&m, self.drop_path, train, rng), attn)
    }
}

/// `PatchMerging`: 2x2 neighbourhoods concatenated (odd grids zero-padded), norm, linear.
#[derive(Debug)]
pub struct PatchMerging {
    pub reduction: Linear,
    pub norm: LayerNorm,
}

impl PatchMerging {
    /// `[B, H·W, C]` of an `h x w` grid → `[B, ⌈h/2⌉·⌈w/2⌉, 2C]`.
    pub fn forward(&self, x: &Tensor, h: i64, w: i64) -> Tensor {
        let (b, _, c) = x.size3().expect("PatchMerging input must be [B, L, C]");
        let mut x = x.view([b, h, w, c]);
        if h % 2 == 1 || w % 2 == 1 {
            x = x.constant_pad_nd([0, 0, 0, w % 2, 0, h % 2]);
        }
        let part = |r: i64, s: i64| x.slice(1, r, None, 2).slice(2, s, None, 2);
        let x = Tensor::cat(&[part(0, 0), part(1, 0), part(0, 1), part(1, 1)], -1);
        let x = x.view([b, -1, 4 * c]);
        self.reduction.forward(&self.norm.forward(&x))
    }
}

/// One stage: blocks, then (except for the last stage) patch merging.
#[derive(Debug)]
pub struct SwinStage {
    pub blocks: Vec<SwinBlock>,
    pub downsample: Option<PatchMerging>,
}

/// The Swin backbone.
#[derive(Debug)]
pub struct SwinTransformer {
    pub cfg: SwinConfig,
    pub masked_embed: Option<Tensor>,
    pub patch_embed: PatchEmbed,
    pub patch_norm: LayerNorm,
    pub layers: Vec<SwinStage>,
    pub norm: LayerNorm,
    drop_rng: Mutex<ChaCha8Rng>,
}

impl SwinTransformer {
    /// Registers parameters and buffers under `prefix` in the official state-dict order and
    /// initialises them as the official code (trunc-normal .02 for linears and bias tables,
    /// zero biases, unit LayerNorms, PyTorch's default conv init, zero `masked_embed`).
    pub fn new(
        ps: &mut ParamStore,
        prefix: &str,
        cfg: &SwinConfig,
        trainable: bool,
        dev: Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.embed_dim;
        // masked_embed is the model's own parameter, so it comes first in the state dict.
        let masked_embed = cfg.masked_im_modeling.then(|| {
            ps.add(
                format!("{prefix}masked_embed"),
                zeros(&[1, d], dev),
                trainable,
            )
        });
        let patch_embed = PatchEmbed::new(
            ps,
            &format!("{prefix}patch_embed"),
            cfg.in_chans,
            d,
            cfg.patch_size,
            trainable,
            dev,
        );
        let patch_norm = LayerNorm::new(
            ps,
            &format!("{prefix}patch_embed.norm"),
            d,
            LN_EPS,
            trainable,
            dev,
        );
        let total: i64 = cfg.depths.iter().sum();
        let mut k = 0i64;
        let nstages = cfg.depths.len();
        let mut layers = Vec::with_capacity(nstages);
        for (i, (&depth, &heads)) in cfg.depths.iter().zip(&cfg.num_heads).enumerate() {
            let dim = cfg.stage_dim(i);
            let hidden = (dim as f64 * cfg.mlp_ratio) as i64;
            let mut blocks = Vec::with_capacity(depth as usize);
            for j in 0..depth as usize {
                // torch.linspace(0, drop_path_rate, sum(depths))[k]
                let dpr = if total > 1 {
                    cfg.drop_path_rate * k as f64 / (total - 1) as f64
                } else {
                    0.0
                };
                k += 1;
                let (ws, shift) = cfg.window_and_shift(i, j);
                let b = format!("{prefix}layers.{i}.blocks.{j}.");
                let norm1 = LayerNorm::new(ps, &format!("{b}norm1"), dim, LN_EPS, trainable, dev);
                let table = ps.add(
                    format!("{b}attn.relative_position_bias_table"),
                    trunc_normal(&[(2 * ws - 1) * (2 * ws - 1), heads], 0.02, dev),
                    trainable,
                );
                let index = ps.add_buffer(
                    format!("{b}attn.relative_position_index"),
                    relative_position_index(ws, dev),
                );
                let qkv = Linear::new_trunc(
                    ps,
                    &format!("{b}attn.qkv"),
                    dim,
                    3 * dim,
                    cfg.qkv_bias,
                    trainable,
                    dev,
                );
                let proj =
                    Linear::new_trunc(ps, &format!("{b}attn.proj"), dim, dim, true, trainable, dev);
                let norm2 = LayerNorm::new(ps, &format!("{b}norm2"), dim, LN_EPS, trainable, dev);
                let mlp = Mlp::new(ps, &format!("{b}mlp"), dim, hidden, trainable, dev);
                blocks.push(SwinBlock {
                    norm1,
                    attn: WindowAttention {
                        relative_position_bias_table: table,
                        relative_position_index: index,
                        qkv,
                        proj,
                        num_heads: heads,
                        window_size: ws,
                        scale: ((dim / heads) as f64).powf(-0.5),
                    },
                    norm2,
                    mlp,
                    window_size: ws,
                    shift_size: shift,
                    drop_path: dpr,
                    masks: Mutex::new(HashMap::new()),
                });
            }
            let downsample = (i + 1 < nstages).then(|| {
                let n = format!("{prefix}layers.{i}.downsample.");
                let reduction = Linear::new_trunc(
                    ps,
                    &format!("{n}reduction"),
                    4 * dim,
                    2 * dim,
                    false,
                    trainable,
                    dev,
                );
                let norm = LayerNorm::new(ps, &format!("{n}norm"), 4 * dim, LN_EPS, trainable, dev);
                PatchMerging { reduction, norm }
            });
            layers.push(SwinStage { blocks, downsample });
        }
        let norm = LayerNorm::new(
            ps,
            &format!("{prefix}norm"),
            cfg.num_features(),
            LN_EPS,
            trainable,
            dev,
        );
        Ok(Self {
            cfg: cfg.clone(),
            masked_embed,
            patch_embed,
            patch_norm,
            layers,
            norm,
            drop_rng: Mutex::new(ChaCha8Rng::seed_from_u64(0)),
        })
    }

    /// Restarts the drop-path generator (the training loop does it every epoch).
    pub fn reseed_drop_path(&self, seed: u64) {
        *self.drop_rng.lock().unwrap_or_else(|e| e.into_inner()) = ChaCha8Rng::seed_from_u64(seed);
    }

    /// Checks images `[B, C, H, W]`; returns `(B, h, w)` of the patch grid.
    pub fn check_input(&self, x: &Tensor) -> Result<(i64, i64, i64)> {
        let size = x.size();
        ensure!(
            size.len() == 4,
            "expected images of shape [B, C, H, W], got {size:?}"
        );
        ensure!(
            size[1] == self.cfg.in_chans,
            "expected {} image channels, got {}",
            self.cfg.in_chans,
            size[1]
        );
        let p = self.cfg.patch_size;
        ensure!(
            size[2] >= p && size[3] >= p,
            "crop size {}x{} is smaller than the patch size {p}",
            size[2],
            size[3]
        );
        Ok((size[0], size[2] / p, size[3] / p))
    }

    /// Patch embedding with its norm and, given a mask `[B, mh, mw]` (True = masked) on the
    /// patch grid or a coarser grid dividing it, `masked_embed` in place of the masked patches:
    /// tokens `[B, h·w, D]` and the grid `(h, w)`.
    pub fn embed(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, i64, i64)> {
        let (b, gh, gw) = self.check_input(x)?;
        let d = self.cfg.embed_dim;
        let t = self.patch_embed.forward(x); // [B, D, h, w]
        let t = self.patch_norm.forward(&t.flatten(2, -1).transpose(1, 2)); // [B, N, D]
        let t = match mask {
            None => t,
            Some(m) => {
                let Some(me) = &self.masked_embed else {
                    bail!("a mask was given but this backbone has no masked_embed (masked_im_modeling is off)")
                };
                let ms = m.size();
                ensure!(
                    ms.len() == 3 && ms[0] == b && ms[1] > 0 && ms[2] > 0,
                    "mask shape {ms:?} does not fit a batch of {b} images"
                );
                let (fh, fw) = (gh / ms[1], gw / ms[2]);
                ensure!(
                    fh * ms[1] == gh && fw * ms[2] == gw,
                    "mask grid {}x{} does not divide the {gh}x{gw} patch grid",
                    ms[1],
                    ms[2]
                );
                let m = m
                    .to_kind(Kind::Bool)
                    .to_device(t.device())
                    .repeat_interleave_self_int(fh, 1, None)
                    .repeat_interleave_self_int(fw, 2, None)
                    .reshape([b, gh * gw, 1]);
                me.to_kind(t.kind()).reshape([1, 1, d]).where_self(&m, &t)
            }
        };
        Ok((t, gh, gw))
    }

    /// Runs the stages on embedded tokens; with `last_attention`, the last block's attention
    /// probabilities are returned too.
    fn stages(
        &self,
        mut t: Tensor,
        mut h: i64,
        mut w: i64,
        train: bool,
    ) -> (Tensor, Option<Tensor>) {
        let mut attn = None;
        for stage in &self.layers {
            for blk in &stage.blocks {
                let (y, a) = blk.forward(&t, h, w, train, &self.drop_rng);
                t = y;
                attn = Some(a);
            }
            if let Some(ds) = &stage.downsample {
                t = ds.forward(&t, h, w);
                h = (h + 1) / 2;
                w = (w + 1) / 2;
            }
        }
        (t, attn)
    }

    /// All output tokens `[B, 1 + N, D]`: the average-pooled final-stage token (the [CLS] of
    /// iBOT's head and loss), then the final-stage tokens after the final norm.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let (t, h, w) = self.embed(x, mask)?;
        let (t, _) = self.stages(t, h, w, train);
        let region = self.norm.forward(&t);
        let pooled = region.mean_dim(1, true, region.kind());
        Ok(Tensor::cat(&[pooled, region], 1))
    }

    /// The official `get_intermediate_layers(x, n, return_patch_avgpool=True)`: the average of
    /// the tokens output by each of the last `n` blocks (all stages counted, block order), the
    /// final-stage ones through the final norm, the earlier ones as they are: `[B, width of that
    /// block's stage]` each. With `n = 1` this is token 0 of [`SwinTransformer::forward`].
    pub fn intermediate_avgpool(&self, x: &Tensor, n: usize) -> Result<Vec<Tensor>> {
        let total: usize = self.cfg.depths.iter().map(|&d| d as usize).sum();
        ensure!(
            (1..=total).contains(&n),
            "n must be in 1..={total} (blocks of this Swin), not {n}"
        );
        let (mut t, mut h, mut w) = self.embed(x, None)?;
        let last = self.layers.len() - 1;
        let mut k = 0;
        let mut out = Vec::with_capacity(n);
        for (i, stage) in self.layers.iter().enumerate() {
            for blk in &stage.blocks {
                let (y, _) = blk.forward(&t, h, w, false, &self.drop_rng);
                t = y;
                if total - k <= n {
                    let f = if i == last {
                        self.norm.forward(&t)
                    } else {
                        t.shallow_clone()
                    };
                    out.push(f.mean_dim(1, false, f.kind()));
                }
                k += 1;
            }
            if let Some(ds) = &stage.downsample {
                t = ds.forward(&t, h, w);
                h = (h + 1) / 2;
                w = (w + 1) / 2;
            }
        }
        Ok(out)
    }

    /// Widths of the features [`SwinTransformer::intermediate_avgpool`] gives for `n`.
    pub fn intermediate_widths(&self, n: usize) -> Vec<i64> {
        let mut widths: Vec<i64> = Vec::new();
        for (i, &d) in self.cfg.depths.iter().enumerate() {
            widths.extend(std::iter::repeat(self.cfg.stage_dim(i)).take(d as usize));
        }
        let from = widths.len().saturating_sub(n);
        widths[from..].to_vec()
    }

    /// The official `get_selfattention(x)`: attention probabilities of the last block,
    /// `[nW·B, heads, ws², ws²]` (no mask, eval mode).
    pub fn get_selfattention(&self, x: &Tensor) -> Result<Tensor> {
        let (t, h, w) = self.embed(x, None)?;
        let (_, attn) = self.stages(t, h, w, false);
        Ok(attn.expect("a Swin has at least one block"))
    }
}
