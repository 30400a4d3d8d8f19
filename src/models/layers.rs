//! The layers the backbones and the head are built from, as the official `vision_transformer.py`
//! (and timm) defines them: `Linear`, `LayerNorm`, `Mlp`, `Attention`, `PatchEmbed`, stochastic
//! depth. Each keeps the official state-dict names of its parameters.
//!
//! Two things here are faster than the official modules while computing the same function:
//! * float32 matrix products of [`linear`] on the CPU run MKL's kernels for the CPU's features
//!   (MKL's vendor check answered in `csrc/fastops.cpp`), or oneDNN's; see [`CpuGemm`];
//! * [`Attention::forward`] is libtorch's fused `scaled_dot_product_attention` (the CPU flash
//!   kernel, forward and backward) instead of the explicit softmax(q·kᵀ)·v on long sequences
//!   (the explicit product is faster on short ones and is kept in [`Attention::attention_map`]
//!   where the probabilities themselves are wanted).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use super::init::{trunc_normal, zeros};
use crate::params::ParamStore;

/// LayerNorm epsilon of the official ViT (`partial(nn.LayerNorm, eps=1e-6)`).
pub const LN_EPS: f64 = 1e-6;

/// Which library multiplies the float32 matrices of [`linear`] on the CPU.
///
/// libtorch's `F.linear` calls MKL's sgemm. MKL chooses its kernels by CPU vendor and took an
/// AVX2 path on AMD processors; `csrc/fastops.cpp` now answers MKL's vendor question so that it
/// chooses by the CPU's features (its AVX-512 kernels on this project's AMD Zen 5). With that,
/// MKL runs the ViT-S shapes as fast as oneDNN's float32 inner product, and `F.linear` needs no
/// copies into oneDNN's layout: a ViT-S/16 recipe step (one thread) took 2624 ms on BLAS
/// against 2754-2903 ms on oneDNN, the Fashion-MNIST recipe 2969-3011 against 3150-3244 ms, a
/// Swin-T step 2112 against 2300 ms. BLAS is therefore the default; `IBOT_CPU_GEMM=onednn`
/// selects oneDNN (which was the default while MKL ran AVX2 on AMD: there it halved the
/// products' time). Autocast regions (bfloat16/float16) and non-CPU devices always use
/// `F.linear`, whose autocast rules they need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuGemm {
    /// libtorch's `F.linear` (MKL's sgemm in the PyPI build).
    Blas,
    /// oneDNN's float32 inner product (`mkldnn_linear` and its backward kernels), through
    /// [`crate::fastops::onednn_linear`], whose autograd node saves what `F.linear` saves.
    Onednn,
}

static CPU_GEMM: AtomicU8 = AtomicU8::new(0);

impl CpuGemm {
    /// The process-wide choice: `IBOT_CPU_GEMM` (`blas` or `onednn`) read once, else BLAS.
    pub fn current() -> Self {
        match CPU_GEMM.load(Ordering::Relaxed) {
            1 => Self::Blas,
            2 => Self::Onednn,
            _ => {
                let c = match std::env::var("IBOT_CPU_GEMM").as_deref() {
                    Ok("onednn") | Ok("mkldnn") => Self::Onednn,
                    _ => Self::Blas,
                };
                c.set();
                c
            }
        }
    }

    /// Makes `self` the process-wide choice (benchmarks and tests compare both).
    pub fn set(self) {
        CPU_GEMM.store(
            match self {
                Self::Blas => 1,
                Self::Onednn => 2,
            },
            Ordering::Relaxed,
        );
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Blas if crate::fastops::mkl_picks_kernels_by_features() => {
                "MKL (libtorch's F.linear; kernels chosen by CPU features)"
            }
            Self::Blas => "MKL (libtorch's F.linear; MKL's vendor dispatch)",
            Self::Onednn => "oneDNN",
        }
    }
}

/// `F.linear(x, w, b)`: `x · wᵀ + b` over the last dimension of `x`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let onednn = x.device() == Device::Cpu
        && x.kind() == Kind::Float
        && w.kind() == Kind::Float
        && x.numel() > 0
        && x.dim() >= 1
        && CpuGemm::current() == CpuGemm::Onednn
        && !crate::train::amp::autocast_enabled(Device::Cpu);
    if !onednn {
        return x.linear(w, b);
    }
    crate::fastops::onednn_linear(x, w, b).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `nn.Linear` weights.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Official ViT/head init: trunc_normal(std=.02) weight, zero bias.
    pub fn new_trunc(
        ps: &mut ParamStore,
        name: &str,
        in_dim: i64,
        out_dim: i64,
        bias: bool,
        trainable: bool,
        dev: Device,
    ) -> Self {
        let weight = ps.add(
            format!("{name}.weight"),
            trunc_normal(&[out_dim, in_dim], 0.02, dev),
            trainable,
        );
        let bias = bias.then(|| ps.add(format!("{name}.bias"), zeros(&[out_dim], dev), trainable));
        Self { weight, bias }
    }

    /// PyTorch's default `nn.Linear` init (uniform ±1/√in for weight and bias), used where the
    /// official code does not re-initialise (`mlp2` is created after `apply(_init_weights)`).
    pub fn new_torch_default(
        ps: &mut ParamStore,
        name: &str,
        in_dim: i64,
        out_dim: i64,
        trainable: bool,
        dev: Device,
    ) -> Self {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let w = Tensor::empty([out_dim, in_dim], (Kind::Float, dev)).uniform_(-bound, bound);
        let b = Tensor::empty([out_dim], (Kind::Float, dev)).uniform_(-bound, bound);
        Self {
            weight: ps.add(format!("{name}.weight"), w, trainable),
            bias: Some(ps.add(format!("{name}.bias"), b, trainable)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        linear(x, &self.weight, self.bias.as_ref())
    }

    /// `gelu(self.forward(x))` (exact erf GELU). Without gradient on the CPU in float32 (the
    /// teacher's backbone and head, feature extraction) and with at most
    /// [`FUSED_GELU_MAX_IN`] input features, one oneDNN inner product with the GELU fused into
    /// its output ([`crate::fastops::linear_gelu`]); elsewhere the two operations.
    pub fn forward_gelu(&self, x: &Tensor) -> Tensor {
        if fused_gelu_applies(x, &self.weight) {
            return crate::fastops::linear_gelu(x, &self.weight, self.bias.as_ref())
                .unwrap_or_else(|e| panic!("{e:#}"));
        }
        self.forward(x).gelu("none")
    }
}

/// The widest input for which [`Linear::forward_gelu`] fuses. Measured one thread, AMD Zen 5,
/// median CPU ms, `F.linear` (MKL, AVX-512) + GELU against oneDNN's fused op: 8320x192 by
/// 192x2048 (Fashion-MNIST recipe, teacher head layer 1) 63 against 33; 8320x192 by 192x768
/// (its fc1) 14.1 against 11.8; 1576x384 by 384x1536 (ViT-S fc1) 9.2 against 8.2; 1576x384
/// by 384x2048 12.3 against 11.1; but 1576x768 by 768x3072 (ViT-B fc1) 32.5 against 32.4,
/// 1576x1024 by 1024x4096 58.4 against 61.1, 1576x2048 by 2048x2048 (head layer 2) 55.9
/// against 57.7 and 8320x2048 by 2048x2048 332 against 330: with wide inputs MKL's product
/// is the faster one and the GELU pass is a small part. The outputs of the two paths were
/// bitwise equal at 192 and 384 inputs (erf GELU both; 6e-7 of the largest value from a
/// float64 reference).
pub const FUSED_GELU_MAX_IN: i64 = 512;

/// Whether [`Linear::forward_gelu`] takes the fused op: CPU, float32 outside autocast, grad
/// mode off, at most [`FUSED_GELU_MAX_IN`] inputs, and not disabled by `IBOT_FUSED_GELU=0`
/// (read once; for benchmarks).
fn fused_gelu_applies(x: &Tensor, w: &Tensor) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    x.device() == Device::Cpu
        && x.kind() == Kind::Float
        && w.kind() == Kind::Float
        && x.dim() >= 1
        && x.numel() > 0
        && w.dim() == 2
        && w.size()[1] <= FUSED_GELU_MAX_IN
        && *ENABLED.get_or_init(|| std::env::var("IBOT_FUSED_GELU").as_deref() != Ok("0"))
        && !crate::fastops::grad_mode_enabled()
        && !crate::train::amp::autocast_enabled(Device::Cpu)
}

/// `nn.LayerNorm` parameters.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        dim: i64,
        eps: f64,
        trainable: bool,
        dev: Device,
    ) -> Self {
        let weight = ps.add(
            format!("{name}.weight"),
            Tensor::ones([dim], (Kind::Float, dev)),
            trainable,
        );
        let bias = ps.add(format!("{name}.bias"), zeros(&[dim], dev), trainable);
        Self { weight, bias, eps }
    }

    /// A second handle on the same parameters (a module used in several places).
    pub fn shallow_clone(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            eps: self.eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let d = *x.size().last().expect("layer norm on a 0-d tensor");
        x.layer_norm([d], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// Two-layer MLP with exact GELU (`fc1`, `fc2`).
#[derive(Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    /// Registers `{name}.fc1` (`in_dim → hidden`) and `{name}.fc2` (`hidden → in_dim`) with the
    /// official ViT init.
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        in_dim: i64,
        hidden: i64,
        trainable: bool,
        dev: Device,
    ) -> Self {
        let fc1 = Linear::new_trunc(
            ps,
            &format!("{name}.fc1"),
            in_dim,
            hidden,
            true,
            trainable,
            dev,
        );
        let fc2 = Linear::new_trunc(
            ps,
            &format!("{name}.fc2"),
            hidden,
            in_dim,
            true,
            trainable,
            dev,
        );
        Self { fc1, fc2 }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.fc1.forward_gelu(x))
    }

    /// The official `Mlp` with dropout `p` after the activation and after `fc2` (training only;
    /// the draws come from libtorch's generator).
    pub fn forward_drop(&self, x: &Tensor, p: f64, train: bool) -> Tensor {
        let h = self.fc1.forward(x).gelu("none").dropout(p, train);
        self.fc2.forward(&h).dropout(p, train)
    }
}

/// Multi-head self-attention with a fused qkv projection (`qkv`, `proj`).
#[derive(Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub num_heads: i64,
    pub scale: f64,
}

impl Attention {
    /// Registers `{name}.qkv` (`dim → 3·dim`, bias when `qkv_bias`) and `{name}.proj`.
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        dim: i64,
        num_heads: i64,
        qkv_bias: bool,
        trainable: bool,
        dev: Device,
    ) -> Self {
        let qkv = Linear::new_trunc(
            ps,
            &format!("{name}.qkv"),
            dim,
            3 * dim,
            qkv_bias,
            trainable,
            dev,
        );
        let proj = Linear::new_trunc(ps, &format!("{name}.proj"), dim, dim, true, trainable, dev);
        Self {
            qkv,
            proj,
            num_heads,
            scale: ((dim / num_heads) as f64).powf(-0.5),
        }
    }

    /// q, k, v as `[B, heads, N, head_dim]` (views into the qkv projection).
    fn qkv(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, n, c) = x.size3().expect("attention input must be [B, N, C]");
        let qkv = self
            .qkv
            .forward(x)
            .reshape([b, n, 3, self.num_heads, c / self.num_heads]);
        // The official `permute(2, 0, 3, 1, 4)` then `qkv[0], qkv[1], qkv[2]` gives the same
        // views as `unbind(2)` then `transpose(1, 2)`, but its backward is slower: three
        // `select`s each fill a zero tensor of the whole qkv size and copy into it before the
        // three are summed, and the permuted result must be copied again to reshape. Here the
        // backward is one `stack` along dim 2, already in the projection's `[B, N, 3·C]` layout.
        let mut t = qkv.unbind(2).into_iter();
        let mut next = || t.next().expect("qkv has 3 parts").transpose(1, 2);
        (next(), next(), next())
    }

    /// Attention probabilities `[B, heads, N, N]`, computed as the official code does.
    pub fn attention_map(&self, x: &Tensor) -> Tensor {
        let (q, k, _) = self.qkv(x);
        (q.matmul(&k.transpose(-2, -1)) * self.scale).softmax(-1, Kind::Float)
    }

    /// `proj(softmax(q·kᵀ·scale)·v)`. Long sequences (more than
    /// [`FUSED_ATTENTION_MIN_TOKENS`] - 1 tokens) go through libtorch's fused attention (the
    /// flash kernel on the CPU): the same function as the official explicit product, computed
    /// blockwise without the `[B, heads, N, N]` matrix, forward and backward. Short ones run the
    /// official explicit product, which is faster there: the CPU flash kernel's per-block small
    /// products cost more than the three batched ones (see the constant).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let n = x.size().get(1).copied().unwrap_or(0);
        if fused_attention_pays(x.device(), n) {
            self.forward_fused(x)
        } else {
            self.forward_explicit(x)
        }
    }

    /// `proj(softmax(q·kᵀ·scale)·v)` through libtorch's fused `scaled_dot_product_attention`
    /// whatever the sequence length.
    pub fn forward_fused(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().expect("attention input must be [B, N, C]");
        let (q, k, v) = self.qkv(x);
        let out = attend(&q, &k, &v, self.scale, true);
        self.proj.forward(&out.transpose(1, 2).reshape([b, n, c]))
    }

    /// [`Attention::forward`] with the official dropouts: `attn_drop` on the attention
    /// probabilities (scaled_dot_product_attention's `dropout_p`, given only when training) and
    /// `proj_drop` after the projection. libtorch's CPU flash kernel takes no dropout, so with
    /// `attn_drop > 0` in training the product runs through its explicit (math) kernel.
    pub fn forward_drop(&self, x: &Tensor, attn_drop: f64, proj_drop: f64, train: bool) -> Tensor {
        let (b, n, c) = x.size3().expect("attention input must be [B, N, C]");
        let (q, k, v) = self.qkv(x);
        let out = if train && attn_drop > 0.0 {
            Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                attn_drop,
                false,
                Some(self.scale),
                false,
            )
        } else {
            // No attention dropout: the kernel `forward` picks.
            attend(&q, &k, &v, self.scale, fused_attention_pays(x.device(), n))
        };
        self.proj
            .forward(&out.transpose(1, 2).reshape([b, n, c]))
            .dropout(proj_drop, train)
    }

    /// Attention for selected query rows only, BEFORE `proj`: `x` `[B, T, C]` gives keys and
    /// values at every token, `q_rows` (`[B·Q]`, flat indices into the `B·T` rows, image `b`'s
    /// queries at `b·Q..b·Q+Q`) the queries; returns `[B·Q, C]`, row for row what
    /// [`Attention::forward`] computes (before its projection) for those tokens. The queries are
    /// projected on the selected rows only (`qkv`'s first `C` output rows), keys and values on
    /// every token; the kernel is chosen as in [`Attention::forward`]. Used by the training
    /// path's last block ([`super::vit::Block::forward_rows`]).
    pub fn attend_rows(&self, x: &Tensor, q_rows: &Tensor, q: i64) -> Tensor {
        let (b, t, c) = x.size3().expect("attention input must be [B, N, C]");
        let (h, hd) = (self.num_heads, c / self.num_heads);
        let w = &self.qkv.weight;
        let bias = self.qkv.bias.as_ref();
        let xq = x.reshape([b * t, c]).index_select(0, q_rows);
        let q_t = linear(
            &xq,
            &w.narrow(0, 0, c),
            bias.map(|b| b.narrow(0, 0, c)).as_ref(),
        );
        let kv = linear(
            x,
            &w.narrow(0, c, 2 * c),
            bias.map(|b| b.narrow(0, c, 2 * c)).as_ref(),
        );
        let q_t = q_t.reshape([b, q, h, hd]).transpose(1, 2);
        let kv = kv.reshape([b, t, 2, h, hd]).permute([2, 0, 3, 1, 4]);
        let (k, v) = (kv.get(0), kv.get(1));
        // The kernel choice of `forward`: explicit product on short sequences on the CPU.
        let out = attend(
            &q_t,
            &k,
            &v,
            self.scale,
            fused_attention_pays(x.device(), t),
        );
        out.transpose(1, 2).reshape([b * q, c])
    }

    /// The official explicit computation, `proj(softmax(q·kᵀ·scale)·v)` with the attention
    /// matrix materialised (kept to compare the fused kernel against).
    pub fn forward_explicit(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().expect("attention input must be [B, N, C]");
        let (q, k, v) = self.qkv(x);
        let out = attend(&q, &k, &v, self.scale, false)
            .transpose(1, 2)
            .reshape([b, n, c]);
        self.proj.forward(&out)
    }
}

/// `softmax(q·kᵀ·scale)·v` over `[B, heads, N, head_dim]`: libtorch's fused
/// `scaled_dot_product_attention` when `fused`, else the official explicit product.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, fused: bool) -> Tensor {
    if fused {
        Tensor::scaled_dot_product_attention(
            q,
            k,
            v,
            None::<Tensor>,
            0.0,
            false,
            Some(scale),
            false,
        )
    } else {
        (q.matmul(&k.transpose(-2, -1)) * scale)
            .softmax(-1, Kind::Float)
            .matmul(v)
    }
}

/// Whether the fused kernel is the faster one for `tokens` keys on `device` (see
/// [`FUSED_ATTENTION_MIN_TOKENS`]; always on GPUs).
fn fused_attention_pays(device: Device, tokens: i64) -> bool {
    device != Device::Cpu || tokens >= FUSED_ATTENTION_MIN_TOKENS
}

/// Sequences of at least this many tokens use the fused (flash) attention on the CPU, shorter
/// ones the explicit product. Measured (2026-11-28, one thread, AMD Zen 5, MKL on its AVX-512
/// kernels, forward + backward of one attention, 64-wide heads; flash vs explicit): 40x6 heads
/// of 37 tokens 7.2 vs 3.7 ms, 384x3 of 17 tokens 14.2 vs 8.1, 128x3 of 65 tokens 19.6 vs 14.9,
/// 8x6 of 101 tokens 4.5 vs 2.9, but 8x6 of 197 tokens 12.5 vs 15.3 (flash wins).
pub const FUSED_ATTENTION_MIN_TOKENS: i64 = 160;

/// `PatchEmbed`: a `patch_size`-strided convolution `proj` from images to patch embeddings.
#[derive(Debug)]
pub struct PatchEmbed {
    /// `proj.weight`, `[D, C, p, p]`.
    pub weight: Tensor,
    /// `proj.bias`, `[D]`.
    pub bias: Tensor,
    pub patch_size: i64,
}

impl PatchEmbed {
    /// Registers `{name}.proj.weight` and `{name}.proj.bias` with PyTorch's default conv init
    /// (uniform ±1/√fan_in for both), which the official models keep.
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        in_chans: i64,
        embed_dim: i64,
        patch_size: i64,
        trainable: bool,
        dev: Device,
    ) -> Self {
        let p = patch_size;
        let bound = 1.0 / ((in_chans * p * p) as f64).sqrt();
        let w =
            Tensor::empty([embed_dim, in_chans, p, p], (Kind::Float, dev)).uniform_(-bound, bound);
        let b = Tensor::empty([embed_dim], (Kind::Float, dev)).uniform_(-bound, bound);
        Self {
            weight: ps.add(format!("{name}.proj.weight"), w, trainable),
            bias: ps.add(format!("{name}.proj.bias"), b, trainable),
            patch_size,
        }
    }

    /// Images `[B, C, H, W]` → patch embeddings `[B, D, H/p, W/p]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let p = self.patch_size;
        x.conv2d(&self.weight, Some(&self.bias), [p, p], [0, 0], [1, 1], 1)
    }
}

/// The per-sample decisions of one stochastic-depth call (training, `p > 0`): `b` draws from
/// the model's generator, sample i kept when `floor(1 - p + U[0, 1))` is 1, as the official
/// `drop_path`'s `random_tensor`. Every call draws exactly `b` values in sample order, whichever
/// way the branch is then computed, so runs are reproducible and resume exactly.
pub fn drop_path_keep(b: i64, p: f64, rng: &Mutex<ChaCha8Rng>) -> Vec<bool> {
    let keep = 1.0 - p;
    let mut r = rng.lock().unwrap_or_else(|e| e.into_inner());
    (0..b)
        .map(|_| (keep + r.gen::<f64>()).floor() >= 1.0)
        .collect()
}

/// Stochastic depth: zeroes whole samples of the residual branch with probability `p` and
/// rescales the rest by `1/(1-p)`, as the official `drop_path` (identity when not training).
///
/// The per-sample draws come from the model's own generator (not libtorch's global one), so a
/// run is reproducible whatever else the process does, and resumable exactly by reseeding.
/// This is the official masking computation (the branch is computed for every sample); the ViT
/// blocks use [`residual_drop_path`], which skips the dropped samples.
pub fn drop_path(x: &Tensor, p: f64, train: bool, rng: &Mutex<ChaCha8Rng>) -> Tensor {
    if p == 0.0 || !train {
        return x.shallow_clone();
    }
    let b = x.size()[0];
    let mut shape = vec![b];
    shape.extend(std::iter::repeat(1).take(x.dim() - 1));
    let mask = keep_mask(b, p, rng, x.device())
        .view(shape.as_slice())
        .to_kind(x.kind());
    x.g_div_scalar(1.0 - p) * mask
}

/// [`drop_path_keep`]'s decisions as a float32 `[b]` tensor on `device`: 1 kept, 0 dropped.
fn keep_mask(b: i64, p: f64, rng: &Mutex<ChaCha8Rng>, device: Device) -> Tensor {
    let draws: Vec<f32> = drop_path_keep(b, p, rng)
        .into_iter()
        .map(|k| if k { 1.0 } else { 0.0 })
        .collect();
    Tensor::from_slice(&draws).to_device(device)
}

/// [`drop_path`] on selected rows `[R, ...]` of a batch of `b` samples, `sample` (`[R]`) naming
/// each row's sample: the same `b` draws from `rng` in the same order as [`drop_path`] on the
/// whole batch, and each kept row scaled exactly as there, so a forward that computes only some
/// rows keeps the run's randomness (the training path's last block,
/// [`super::vit::Block::forward_rows`]).
pub fn drop_path_rows(
    x: &Tensor,
    sample: &Tensor,
    b: i64,
    p: f64,
    train: bool,
    rng: &Mutex<ChaCha8Rng>,
) -> Tensor {
    if p == 0.0 || !train {
        return x.shallow_clone();
    }
    let mut shape = vec![-1];
    shape.extend(std::iter::repeat(1).take(x.dim() - 1));
    let mask = keep_mask(b, p, rng, x.device())
        .index_select(0, sample)
        .view(shape.as_slice())
        .to_kind(x.kind());
    x.g_div_scalar(1.0 - p) * mask
}

/// `x + drop_path(branch(x))` for a per-sample residual branch, computing the branch only for
/// the samples that stochastic depth keeps.
///
/// The official code (and [`drop_path`]) runs the branch on the whole batch and multiplies the
/// dropped samples by 0. The draws here are the same ([`drop_path_keep`], same generator, same
/// count and order), and since a ViT branch (norm → attention or norm → MLP) treats each sample
/// independently, the result and every gradient are the same up to float summation order
/// (`tests/layers.rs`):
/// * not training or `p == 0`: `x + branch(x)`, no draws;
/// * every sample kept: `x + branch(x)·(1/(1-p))` in one `addcmul` (no gather);
/// * some dropped: the kept samples are gathered (`index_select`), the branch runs on them and
///   `branch/(1-p)` is added back to their rows (`index_add`); the dropped rows are `x`;
/// * none kept: the same with an empty batch, so the branch costs nothing but its parameters
///   still receive (zero) gradients, as in the official code: an undefined gradient would make
///   the optimizer skip the parameter (no weight decay) and desynchronise a distributed step.
///
/// `branch` must treat samples (dimension 0) independently.
pub fn residual_drop_path(
    x: &Tensor,
    p: f64,
    train: bool,
    rng: &Mutex<ChaCha8Rng>,
    branch: impl FnOnce(&Tensor) -> Tensor,
) -> Tensor {
    if p == 0.0 || !train {
        return x + branch(x);
    }
    let b = x.size()[0];
    let keep = drop_path_keep(b, p, rng);
    let scale = Tensor::from(1.0 / (1.0 - p))
        .to_kind(x.kind())
        .to_device(x.device());
    if keep.iter().all(|&k| k) {
        return x.addcmul(&branch(x), &scale);
    }
    let kept: Vec<i64> = (0..b).filter(|&i| keep[i as usize]).collect();
    let idx = Tensor::from_slice(&kept).to_device(x.device());
    let y = branch(&x.index_select(0, &idx));
    x.index_add(0, &idx, &(y * scale).to_kind(x.kind()))
}
