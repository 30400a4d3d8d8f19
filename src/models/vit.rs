//! Vision Transformer backbone, as the official `models/vision_transformer.py`.
//!
//! State-dict names: `cls_token`, `pos_embed`, `masked_embed`, `patch_embed.proj.{weight,bias}`,
//! `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}`, `norm.{weight,bias}`
//! (all under the prefix given at construction, e.g. `backbone.`).

use std::sync::Mutex;

use anyhow::{bail, ensure, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::init::{trunc_normal, zeros};
use super::layers::{
    drop_path, drop_path_rows, residual_drop_path, Attention, LayerNorm, Mlp, PatchEmbed, LN_EPS,
};
use crate::params::ParamStore;

/// Shape of a ViT. The presets follow the official `vit_tiny/small/base/large`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Resolution the position-embedding grid is built for (official: always 224).
    pub img_size: i64,
    pub patch_size: i64,
    pub in_chans: i64,
    pub embed_dim: i64,
    pub depth: i64,
    pub num_heads: i64,
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    /// Stochastic depth rate of the last block (linearly increasing from 0 over the blocks).
    pub drop_path_rate: f64,
    /// Whether the model owns a learnable `masked_embed` (the iBOT student).
    pub masked_im_modeling: bool,
}

impl VitConfig {
    /// `vit_tiny`, `vit_small`, `vit_base`, `vit_large` (also `deit_tiny`/`deit_small`, which
    /// the official code renames to the ViT of the same size).
    pub fn from_arch(arch: &str, patch_size: i64) -> Result<Self> {
        let arch = arch.replace("deit", "vit");
        let (embed_dim, depth, num_heads) = match arch.as_str() {
            "vit_tiny" => (192, 12, 3),
            "vit_small" => (384, 12, 6),
            "vit_base" => (768, 12, 12),
            "vit_large" => (1024, 24, 16),
            other => bail!(
                "unknown architecture '{other}': expected one of vit_tiny, vit_small, vit_base, vit_large"
            ),
        };
        Ok(Self {
            img_size: 224,
            patch_size,
            in_chans: 3,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            qkv_bias: true,
            drop_path_rate: 0.0,
            masked_im_modeling: false,
        })
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.patch_size > 0,
            "patch_size must be positive, got {}",
            self.patch_size
        );
        ensure!(
            self.img_size >= self.patch_size && self.img_size % self.patch_size == 0,
            "img_size {} must be a positive multiple of patch_size {}",
            self.img_size,
            self.patch_size
        );
        ensure!(
            self.embed_dim > 0 && self.depth > 0 && self.num_heads > 0,
            "embed_dim, depth and num_heads must be positive"
        );
        ensure!(
            self.embed_dim % self.num_heads == 0,
            "--embed_dim {} is not divisible by --num_heads {}",
            self.embed_dim,
            self.num_heads
        );
        ensure!(
            (0.0..1.0).contains(&self.drop_path_rate),
            "drop_path_rate must be in [0, 1), got {}",
            self.drop_path_rate
        );
        ensure!(self.mlp_ratio > 0.0, "mlp_ratio must be positive");
        Ok(())
    }

    /// Side of the position-embedding grid (`img_size // patch_size`).
    pub fn grid(&self) -> i64 {
        self.img_size / self.patch_size
    }

    pub fn mlp_hidden(&self) -> i64 {
        (self.embed_dim as f64 * self.mlp_ratio) as i64
    }
}

/// Pre-norm transformer block with stochastic depth.
#[derive(Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub drop_path: f64,
    /// Dropout rate of the attention projection and the MLP (the official `drop`; 0 in
    /// pre-training, set by fine-tuning's `--drop`).
    pub drop: f64,
    /// Dropout rate of the attention probabilities (`attn_drop`, fine-tuning's
    /// `--attn_drop_rate`).
    pub attn_drop: f64,
}

impl Block {
    /// `x + drop_path(attn(norm1(x)))`, then `x + drop_path(mlp(norm2(x)))`, each residual
    /// branch computed only for the samples stochastic depth keeps ([`residual_drop_path`]:
    /// the same draws and the same function as the official masking, [`Block::forward_masked`]).
    /// With fine-tuning's dropout (`drop`, `attn_drop`) the branches run their dropouts on the
    /// kept samples.
    pub fn forward(&self, x: &Tensor, train: bool, rng: &Mutex<ChaCha8Rng>) -> Tensor {
        let x = residual_drop_path(x, self.drop_path, train, rng, |x| {
            self.attn_branch(x, train)
        });
        residual_drop_path(&x, self.drop_path, train, rng, |x| {
            self.mlp_branch(x, train)
        })
    }

    /// `attn(norm1(x))`, with the attention dropouts when training with them.
    pub fn attn_branch(&self, x: &Tensor, train: bool) -> Tensor {
        let h = self.norm1.forward(x);
        if train && (self.drop > 0.0 || self.attn_drop > 0.0) {
            self.attn.forward_drop(&h, self.attn_drop, self.drop, true)
        } else {
            self.attn.forward(&h)
        }
    }

    /// `mlp(norm2(x))`, with the MLP dropout when training with it.
    pub fn mlp_branch(&self, x: &Tensor, train: bool) -> Tensor {
        let h = self.norm2.forward(x);
        if train && self.drop > 0.0 {
            self.mlp.forward_drop(&h, self.drop, true)
        } else {
            self.mlp.forward(&h)
        }
    }

    /// The block as the official code computes it: both branches on every sample, multiplied
    /// by the drop-path mask ([`drop_path`]). Same draws as [`Block::forward`]; kept as the
    /// reference the skipping path is tested against.
    pub fn forward_masked(&self, x: &Tensor, train: bool, rng: &Mutex<ChaCha8Rng>) -> Tensor {
        let x = x + drop_path(&self.attn_branch(x, train), self.drop_path, train, rng);
        let y = self.mlp_branch(&x, train);
        &x + drop_path(&y, self.drop_path, train, rng)
    }
}

/// The rows of a batch `[B, 1 + N, D]` whose last-block outputs a training loss reads: every
/// image's [CLS] token, then the patch tokens selected by a `[B, N]` mask (row-major: image by
/// image, patches ascending, the order of `mask.nonzero()`). Built by [`LossRows::new`] for
/// [`Block::forward_rows`].
#[derive(Debug)]
pub struct LossRows {
    /// Images in the batch.
    pub b: i64,
    /// Query rows per image in the attention (1 + the most patches any image selects; images
    /// with fewer repeat their [CLS] query, whose extra outputs are discarded).
    pub q: i64,
    /// `[B·q]`: flat indices into the `B·(1 + N)` token rows of the attention's queries.
    pub q_rows: Tensor,
    /// `[R]`: for each output row, its index among the `B·q` attention rows.
    pub attn_rows: Tensor,
    /// `[R]`: for each output row, its index among the `B·(1 + N)` token rows.
    pub token_rows: Tensor,
    /// `[R]`: for each output row, its image (for the drop-path draws).
    pub sample: Tensor,
    /// `R`: `B` [CLS] rows plus the selected patches.
    pub len: i64,
}

impl LossRows {
    /// The rows for a batch of `b` images of `n` patches; `patches` `[B, N]` (bool or 0/1)
    /// selects patch tokens besides the [CLS] tokens (None: [CLS] only).
    pub fn new(b: i64, n: i64, patches: Option<&Tensor>, dev: Device) -> Result<Self> {
        let t = n + 1;
        let mut per: Vec<Vec<i64>> = vec![Vec::new(); b as usize];
        if let Some(m) = patches {
            ensure!(
                m.size() == [b, n],
                "the patch selection {:?} does not match the {b} images of {n} patches",
                m.size()
            );
            let flat = Vec::<u8>::try_from(
                m.ne(0)
                    .to_kind(Kind::Uint8)
                    .to_device(Device::Cpu)
                    .flatten(0, -1),
            )?;
            for (i, &f) in flat.iter().enumerate() {
                if f != 0 {
                    per[i / n as usize].push(i as i64 % n);
                }
            }
        }
        let q = 1 + per.iter().map(Vec::len).max().unwrap_or(0) as i64;
        let (mut q_rows, mut attn_rows, mut token_rows, mut sample) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, js) in per.iter().enumerate() {
            let i = i as i64;
            q_rows.push(i * t);
            q_rows.extend(js.iter().map(|j| i * t + 1 + j));
            q_rows.extend(std::iter::repeat(i * t).take((q - 1) as usize - js.len()));
            attn_rows.push(i * q);
            token_rows.push(i * t);
            sample.push(i);
        }
        for (i, js) in per.iter().enumerate() {
            let i = i as i64;
            attn_rows.extend((0..js.len() as i64).map(|k| i * q + 1 + k));
            token_rows.extend(js.iter().map(|j| i * t + 1 + j));
            sample.extend(std::iter::repeat(i).take(js.len()));
        }
        let idx = |v: &[i64]| Tensor::from_slice(v).to_device(dev);
        Ok(Self {
            b,
            q,
            q_rows: idx(&q_rows),
            attn_rows: idx(&attn_rows),
            token_rows: idx(&token_rows),
            sample: idx(&sample),
            len: token_rows.len() as i64,
        })
    }
}

impl Block {
    /// [`Block::forward`] computed only at `rows` (pruned rows of the training path's last block,
    /// see [`VisionTransformer::forward_train_rows`]): norm1 and the keys and values on every
    /// token of `x` `[B, T, D]`, the queries, attention, `proj`, residual, norm2 and MLP on the
    /// selected rows only; returns `[R, D]`, row for row `forward(x)` at those rows. The drop
    /// path draws as [`Block::forward`] does (`B` draws per residual branch, in the same order)
    /// and scales each row by its image's draw. Without the dropouts of fine-tuning (`drop`,
    /// `attn_drop`), which pre-training never sets.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        rows: &LossRows,
        train: bool,
        rng: &Mutex<ChaCha8Rng>,
    ) -> Tensor {
        let (b, t, d) = x.size3().expect("block input must be [B, T, D]");
        let a = self
            .attn
            .attend_rows(&self.norm1.forward(x), &rows.q_rows, rows.q)
            .index_select(0, &rows.attn_rows);
        let a = self.attn.proj.forward(&a);
        let x = x.reshape([b * t, d]).index_select(0, &rows.token_rows)
            + drop_path_rows(&a, &rows.sample, b, self.drop_path, train, rng);
        let y = self.mlp.forward(&self.norm2.forward(&x));
        &x + drop_path_rows(&y, &rows.sample, b, self.drop_path, train, rng)
    }
}

/// The ViT backbone.
#[derive(Debug)]
pub struct VisionTransformer {
    pub cfg: VitConfig,
    pub cls_token: Tensor,
    pub pos_embed: Tensor,
    pub masked_embed: Option<Tensor>,
    pub patch_embed: PatchEmbed,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    /// Generator of the drop-path draws (and of the seeds of the dropout draws).
    drop_rng: Mutex<ChaCha8Rng>,
    /// Dropout after the position embedding (`pos_drop`) and in every block (`drop`).
    drop_rate: f64,
    attn_drop_rate: f64,
}

impl VisionTransformer {
    /// Registers the parameters under `prefix` (e.g. `"backbone."`) in the official order and
    /// initialises them like the official code (trunc-normal .02 for tokens and linears,
    /// PyTorch's default conv init for the patch projection, zero `masked_embed`).
    pub fn new(
        ps: &mut ParamStore,
        prefix: &str,
        cfg: &VitConfig,
        trainable: bool,
        dev: Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.embed_dim;
        let n = cfg.grid() * cfg.grid();
        // Own parameters come first in a PyTorch state dict, then children.
        let cls_token = ps.add(
            format!("{prefix}cls_token"),
            trunc_normal(&[1, 1, d], 0.02, dev),
            trainable,
        );
        let pos_embed = ps.add(
            format!("{prefix}pos_embed"),
            trunc_normal(&[1, n + 1, d], 0.02, dev),
            trainable,
        );
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
        let mut blocks = Vec::with_capacity(cfg.depth as usize);
        let hidden = cfg.mlp_hidden();
        for i in 0..cfg.depth {
            // torch.linspace(0, drop_path_rate, depth)[i]
            let dpr = if cfg.depth > 1 {
                cfg.drop_path_rate * i as f64 / (cfg.depth - 1) as f64
            } else {
                0.0
            };
            let b = format!("{prefix}blocks.{i}.");
            let norm1 = LayerNorm::new(ps, &format!("{b}norm1"), d, LN_EPS, trainable, dev);
            let attn = Attention::new(
                ps,
                &format!("{b}attn"),
                d,
                cfg.num_heads,
                cfg.qkv_bias,
                trainable,
                dev,
            );
            let norm2 = LayerNorm::new(ps, &format!("{b}norm2"), d, LN_EPS, trainable, dev);
            let mlp = Mlp::new(ps, &format!("{b}mlp"), d, hidden, trainable, dev);
            blocks.push(Block {
                norm1,
                attn,
                norm2,
                mlp,
                drop_path: dpr,
                drop: 0.0,
                attn_drop: 0.0,
            });
        }
        let norm = LayerNorm::new(ps, &format!("{prefix}norm"), d, LN_EPS, trainable, dev);
        Ok(Self {
            cfg: cfg.clone(),
            cls_token,
            pos_embed,
            masked_embed,
            patch_embed,
            blocks,
            norm,
            drop_rng: Mutex::new(ChaCha8Rng::seed_from_u64(0)),
            drop_rate: 0.0,
            attn_drop_rate: 0.0,
        })
    }

    /// Restarts the drop-path generator (the training loop does it every epoch).
    pub fn reseed_drop_path(&self, seed: u64) {
        *self.drop_rng.lock().unwrap_or_else(|e| e.into_inner()) = ChaCha8Rng::seed_from_u64(seed);
    }

    /// Turns on the official dropouts (fine-tuning's `--drop`, `--attn_drop_rate`; the model
    /// is built without them, as pre-training uses none): `drop` after the position embedding
    /// (`pos_drop`), the attention projection and both MLP layers, `attn_drop` on the attention
    /// probabilities. Active only in training forwards.
    ///
    /// Their Bernoulli draws are libtorch's (dropout and scaled_dot_product_attention take no
    /// generator): each training forward with dropout first seeds libtorch's process-wide
    /// generator with a value drawn from this model's drop-path generator, so the draws are
    /// reproducible, and resume exactly, wherever the drop-path draws do. Nothing else may draw
    /// from libtorch's generator concurrently with such a forward.
    pub fn set_dropout(&mut self, drop: f64, attn_drop: f64) -> Result<()> {
        ensure!(
            (0.0..1.0).contains(&drop) && (0.0..1.0).contains(&attn_drop),
            "dropout rates must be in [0, 1) (got {drop} and {attn_drop})"
        );
        self.drop_rate = drop;
        self.attn_drop_rate = attn_drop;
        for b in &mut self.blocks {
            b.drop = drop;
            b.attn_drop = attn_drop;
        }
        Ok(())
    }

    /// `pos_drop` of a training forward, after seeding libtorch's generator (see
    /// [`VisionTransformer::set_dropout`]); the tokens unchanged without dropout.
    fn start_dropout(&self, t: Tensor, train: bool) -> Tensor {
        if !train || (self.drop_rate == 0.0 && self.attn_drop_rate == 0.0) {
            return t;
        }
        let seed = {
            use rand::Rng;
            let mut r = self.drop_rng.lock().unwrap_or_else(|e| e.into_inner());
            r.gen::<u64>() >> 1
        };
        tch::manual_seed(seed as i64);
        t.dropout(self.drop_rate, true)
    }

    /// Checks an input batch `[B, C, H, W]` (and its mask `[B, H/p, W/p]`) before use.
    pub fn check_input(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<(i64, i64, i64)> {
        let size = x.size();
        ensure!(
            size.len() == 4,
            "expected images of shape [B, C, H, W], got {size:?}"
        );
        let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
        ensure!(
            c == self.cfg.in_chans,
            "expected {} image channels, got {c}",
            self.cfg.in_chans
        );
        let p = self.cfg.patch_size;
        ensure!(
            h >= p && w >= p && h % p == 0 && w % p == 0,
            "crop size {h}x{w} is not a positive multiple of the patch size {p}"
        );
        if let Some(m) = mask {
            ensure!(
                m.size() == [b, h / p, w / p],
                "mask shape {:?} does not match the patch grid [{b}, {}, {}] of {h}x{w} crops",
                m.size(),
                h / p,
                w / p
            );
        }
        Ok((b, h / p, w / p))
    }

    /// The official `interpolate_pos_encoding` for an `h x w` patch grid: the position table
    /// as-is when the grid matches (and is square), otherwise bicubic resampling of the patch
    /// rows (align_corners=False) with the scale factor `(n + 0.1) / sqrt(N)` handed to the
    /// kernel as given, and the CLS row unchanged.
    pub fn interpolate_pos_encoding(&self, gh: i64, gw: i64) -> Result<Tensor> {
        let npatch = gh * gw;
        let n_tab = self.pos_embed.size()[1] - 1;
        if npatch == n_tab && gh == gw {
            return Ok(self.pos_embed.shallow_clone());
        }
        let side = (n_tab as f64).sqrt() as i64;
        ensure!(
            side * side == n_tab,
            "position embedding has {n_tab} patch rows, which is not a square grid"
        );
        let d = self.cfg.embed_dim;
        let class_pos = self.pos_embed.narrow(1, 0, 1);
        let patch_pos = self.pos_embed.narrow(1, 1, n_tab);
        let sqrt_n = (n_tab as f64).sqrt();
        let (sh, sw) = ((gh as f64 + 0.1) / sqrt_n, (gw as f64 + 0.1) / sqrt_n);
        // Output size as F.interpolate derives it from a scale factor: floor(in * scale).
        let (oh, ow) = (
            (side as f64 * sh).floor() as i64,
            (side as f64 * sw).floor() as i64,
        );
        ensure!(
            oh == gh && ow == gw,
            "position-embedding interpolation gave a {oh}x{ow} grid for {gh}x{gw}"
        );
        let grid = patch_pos.reshape([1, side, side, d]).permute([0, 3, 1, 2]);
        let resized = grid.upsample_bicubic2d([oh, ow], false, sh, sw);
        let resized = resized.permute([0, 2, 3, 1]).reshape([1, -1, d]);
        Ok(Tensor::cat(&[class_pos, resized], 1))
    }

    /// Patch embedding, masking, CLS token and position embedding: `[B, 1 + N, D]`.
    pub fn prepare_tokens(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, gh, gw) = self.check_input(x, mask)?;
        let d = self.cfg.embed_dim;
        let mut t = self.patch_embed.forward(x); // [B, D, h, w]
        if let Some(m) = mask {
            let Some(me) = &self.masked_embed else {
                bail!("a mask was given but this backbone has no masked_embed (masked_im_modeling is off)")
            };
            // Masked patch embeddings are REPLACED by masked_embed (CLS is never masked).
            let m = m.to_kind(Kind::Bool).to_device(t.device()).unsqueeze(1); // [B, 1, h, w]
            t = me
                .to_kind(t.kind())
                .reshape([1, d, 1, 1])
                .where_self(&m, &t);
        }
        let t = t.flatten(2, -1).transpose(1, 2); // [B, N, D]
        let cls = self.cls_token.expand([b, -1, -1], false);
        let t = Tensor::cat(&[cls, t], 1);
        Ok(t + self.interpolate_pos_encoding(gh, gw)?)
    }

    /// All output tokens after the final norm, `[B, 1 + N, D]`. `train` enables drop path.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let mut t = self.start_dropout(self.prepare_tokens(x, mask)?, train);
        for blk in &self.blocks {
            t = blk.forward(&t, train, &self.drop_rng);
        }
        Ok(self.norm.forward(&t))
    }

    /// The training path's backbone: the outputs after the final norm of only the tokens a
    /// training loss reads, `[R, D]` — every image's [CLS] token (rows `0..B`), then the patch
    /// tokens `patches` (`[B, N]`, None: none) selects, image by image in ascending order (the
    /// order of `patches.nonzero()`). Row for row what [`VisionTransformer::forward`] gives
    /// there, with the same drop-path draws; the last block computes its queries, attention
    /// output, residual, MLP and the final norm on those rows only ([`Block::forward_rows`]).
    /// `mask` is the masked-image-modelling mask of [`VisionTransformer::forward`]. With
    /// fine-tuning's dropouts on, the full forward runs and the rows are gathered from it.
    pub fn forward_train_rows(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        patches: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, gh, gw) = self.check_input(x, mask)?;
        let rows = LossRows::new(b, gh * gw, patches, x.device())?;
        if train && (self.drop_rate > 0.0 || self.attn_drop_rate > 0.0) {
            let t = self.forward(x, mask, train)?;
            let d = t.size()[2];
            return Ok(t.reshape([-1, d]).index_select(0, &rows.token_rows));
        }
        let (t, last) = self.all_but_last_block(self.prepare_tokens(x, mask)?, train);
        Ok(self
            .norm
            .forward(&last.forward_rows(&t, &rows, train, &self.drop_rng)))
    }

    /// All output tokens of the last block BEFORE the final norm, `[B, 1 + N, D]`; `train`
    /// enables drop path (fine-tuning's mean-pooling model replaces the final norm by `fc_norm`).
    pub fn forward_unnormed(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut t = self.start_dropout(self.prepare_tokens(x, None)?, train);
        for blk in &self.blocks {
            t = blk.forward(&t, train, &self.drop_rng);
        }
        Ok(t)
    }

    /// Self-attention of the last block, `[B, heads, 1 + N, 1 + N]` (no mask, eval mode).
    pub fn get_last_selfattention(&self, x: &Tensor) -> Result<Tensor> {
        let (t, last) = self.all_but_last_block(self.prepare_tokens(x, None)?, false);
        Ok(last.attn.attention_map(&last.norm1.forward(&t)))
    }

    /// Runs every block but the last on the tokens `t`; returns their output and the last block.
    fn all_but_last_block(&self, mut t: Tensor, train: bool) -> (Tensor, &Block) {
        let (last, rest) = self
            .blocks
            .split_last()
            .expect("a ViT has at least one block");
        for blk in rest {
            t = blk.forward(&t, train, &self.drop_rng);
        }
        (t, last)
    }

    /// Normed outputs of the last `n` blocks (the official `get_intermediate_layers`).
    pub fn get_intermediate_layers(&self, x: &Tensor, n: usize) -> Result<Vec<Tensor>> {
        self.intermediate_tokens(x, n, true)
    }

    /// Outputs of the last `n` blocks, `[B, 1 + N, D]` each, through the final norm or not (the
    /// official mean-pooling ViT of `--avgpool_patchtokens 1` replaces that norm by an identity).
    pub fn intermediate_tokens(&self, x: &Tensor, n: usize, normed: bool) -> Result<Vec<Tensor>> {
        let mut t = self.prepare_tokens(x, None)?;
        let depth = self.blocks.len();
        let mut out = Vec::new();
        for (i, blk) in self.blocks.iter().enumerate() {
            t = blk.forward(&t, false, &self.drop_rng);
            if depth - i <= n {
                out.push(if normed {
                    self.norm.forward(&t)
                } else {
                    t.shallow_clone()
                });
            }
        }
        Ok(out)
    }
}
