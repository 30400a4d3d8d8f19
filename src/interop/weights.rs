//! Pre-trained weights from any of the layouts users arrive with, turned into our models.
//!
//! Understood layouts (the file type is told by its content, not its name):
//! - our training checkpoints (`checkpoint.safetensors`: `student.*` / `teacher.*` plus the
//!   exact model configuration in the metadata);
//! - backbones exported by `ibot extract-backbone` (bare official names, configuration in the
//!   metadata) and any other safetensors file with official or timm ViT names;
//! - the official full checkpoint `checkpoint.pth` (`student`, `teacher`, `optimizer`, `epoch`,
//!   `args`, `ibot_loss`, maybe `fp16_scaler`; keys maybe prefixed `module.`);
//! - backbone-only `.pth` files (`{"state_dict": {...}}` as released, or a bare dictionary as
//!   written by the official `extract_backbone_weights.py`).
//!
//! As the official `load_pretrained_weights`, the entry `checkpoint_key` is taken when the file
//! has one, and `module.` and `backbone.` are removed from the names. Where the file does not
//! carry the configuration, it is read off the tensor shapes (width, depth, patch size, grid,
//! MLP ratio, qkv bias, `masked_embed`); the number of heads, which no shape shows, comes from
//! `--arch` or else from the standard ViT of that width.
//!
//! Swin Transformer weights (names `layers.{i}.blocks.{j}.…`, as the official
//! `models/swin_transformer.py`) are recognised too: width and patch size from the patch
//! embedding, stage depths from the block names, heads and windows from each block's
//! `relative_position_bias_table` (`[(2w-1)², heads]`); the model is taken to be built for
//! 224-px images (as `main_ibot.py` builds it), which fixes which stages clamp their window.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Tensor};

use super::pth::read_pth_subset;
use crate::models::{
    Backbone, BackboneConfig, HeadAct, HeadConfig, HeadNorm, IbotHead, SwinConfig, VitConfig,
};
use crate::params::{read_safetensors, ParamStore};

/// Metadata key under which exported backbones store their [`VitConfig`] (JSON).
pub const VIT_CONFIG_KEY: &str = "ibot_vit_config";

/// Metadata key under which exported Swin backbones store their [`SwinConfig`] (JSON).
pub const SWIN_CONFIG_KEY: &str = "ibot_swin_config";

/// The resolution official Swin weights are taken to be built for (`main_ibot.py`'s default).
pub const SWIN_IMG_SIZE: i64 = 224;

/// Weights of one network (teacher or student) under official names without prefixes.
#[derive(Debug)]
pub struct Pretrained {
    /// The backbone's shape (ViT or Swin).
    pub config: BackboneConfig,
    /// Backbone tensors (`cls_token`, `blocks.0.attn.qkv.weight`, ... or for Swin
    /// `layers.0.blocks.0.attn.relative_position_bias_table`, ...).
    pub backbone: HashMap<String, Tensor>,
    /// Projection head tensors (`mlp.0.weight`, `last_layer.weight_v`, ...), if the file has them.
    pub head: HashMap<String, Tensor>,
    /// A linear classifier stored with the backbone (`linear.weight`, `linear.bias`: files
    /// written by `ibot combine` or the official `combine_ckpt.py`), names without `linear.`.
    pub linear: HashMap<String, Tensor>,
    /// What was read, for messages: file kind, entry and the layout found.
    pub description: String,
}

/// True when the bytes start like a safetensors file (u64 header length, then `{`).
fn looks_like_safetensors(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut head = [0u8; 9];
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = f
        .read(&mut head)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(n == 9
        && head[8] == b'{'
        && u64::from_le_bytes(head[..8].try_into().unwrap_or_default()) < 100_000_000)
}

fn strip_all(name: &str, prefix: &str) -> String {
    // The official loader uses str.replace, which removes the pattern anywhere in the name.
    name.replace(prefix, "")
}

/// The standard number of heads of a ViT of width `embed_dim`.
fn default_heads(embed_dim: i64) -> Option<i64> {
    ["vit_tiny", "vit_small", "vit_base", "vit_large"]
        .iter()
        .filter_map(|a| VitConfig::from_arch(a, 16).ok())
        .find(|c| c.embed_dim == embed_dim)
        .map(|c| c.num_heads)
}

fn shape_of(t: &HashMap<String, Tensor>, k: &str) -> Result<Vec<i64>> {
    t.get(k)
        .map(|x| x.size())
        .with_context(|| format!("the weights have no '{k}' (not a ViT backbone?)"))
}

/// Reads the ViT shape off the backbone tensors. `arch` (e.g. `vit_small`) fixes the number of
/// heads and is checked against the width.
pub fn infer_vit_config(
    backbone: &HashMap<String, Tensor>,
    arch: Option<&str>,
) -> Result<VitConfig> {
    infer_vit_config_with(backbone, arch, None)
}

/// The number of attention heads of weights of width `d` and depth `depth`: `--num_heads`,
/// else `--arch`'s, else the standard ViT of that width. `--arch` and `--num_heads` are
/// checked against the shapes: a contradiction is an error, never silently ignored.
fn heads_for(d: i64, depth: i64, arch: Option<&str>, num_heads: Option<i64>) -> Result<i64> {
    let from_arch = match arch {
        Some(a) if a.starts_with("swin") => {
            bail!("--arch {a} is a Swin Transformer, but these are ViT weights")
        }
        Some(a) => {
            let c = VitConfig::from_arch(a, 16)?;
            ensure!(
                c.embed_dim == d,
                "--arch {a} has width {}, the weights have width {d}{}",
                c.embed_dim,
                match default_arch(d) {
                    Some(s) => format!(" (that is {s})"),
                    None => " (no standard ViT; leave out --arch and give --num_heads)".to_string(),
                }
            );
            ensure!(
                c.depth == depth,
                "--arch {a} has {} blocks, the weights have {depth}",
                c.depth
            );
            Some(c.num_heads)
        }
        None => None,
    };
    if let Some(h) = num_heads {
        ensure!(
            h >= 1 && d % h == 0,
            "--num_heads {h} does not divide the width {d} of the weights"
        );
        if let (Some(a), Some(ah)) = (arch, from_arch) {
            ensure!(
                ah == h,
                "--num_heads {h} contradicts --arch {a}, which has {ah} heads"
            );
        }
        return Ok(h);
    }
    if let Some(h) = from_arch {
        return Ok(h);
    }
    default_heads(d).with_context(|| {
        format!(
            "width {d} is not a standard ViT (192, 384, 768, 1024), so the number of attention \
             heads is unknown; give --num_heads (e.g. --num_heads {})",
            [16, 12, 8, 6, 4, 3, 2, 1]
                .into_iter()
                .find(|h| d % h == 0 && d / h >= 32)
                .unwrap_or(1)
        )
    })
}

/// The standard architecture of width `embed_dim`, for messages.
fn default_arch(embed_dim: i64) -> Option<&'static str> {
    ["vit_tiny", "vit_small", "vit_base", "vit_large"]
        .into_iter()
        .find(|a| VitConfig::from_arch(a, 16).is_ok_and(|c| c.embed_dim == embed_dim))
}

/// [`infer_vit_config`] with `--num_heads` too.
pub fn infer_vit_config_with(
    backbone: &HashMap<String, Tensor>,
    arch: Option<&str>,
    num_heads: Option<i64>,
) -> Result<VitConfig> {
    if is_swin_layout(backbone) {
        bail!("these are Swin Transformer weights, not a ViT (see infer_swin_config)");
    }
    let cls = shape_of(backbone, "cls_token")?;
    ensure!(
        cls.len() == 3 && cls[0] == 1 && cls[1] == 1,
        "cls_token has shape {cls:?}, expected [1, 1, D]"
    );
    let d = cls[2];
    let pw = shape_of(backbone, "patch_embed.proj.weight")?;
    ensure!(
        pw.len() == 4 && pw[0] == d && pw[2] == pw[3],
        "patch_embed.proj.weight has shape {pw:?}, expected [{d}, C, p, p]"
    );
    let (in_chans, patch) = (pw[1], pw[2]);
    let pos = shape_of(backbone, "pos_embed")?;
    ensure!(
        pos.len() == 3 && pos[2] == d && pos[1] >= 2,
        "pos_embed has shape {pos:?}, expected [1, 1 + N, {d}]"
    );
    let grid = ((pos[1] - 1) as f64).sqrt().round() as i64;
    ensure!(
        grid * grid == pos[1] - 1,
        "pos_embed holds {} patch positions, not a square grid",
        pos[1] - 1
    );
    let mut depth = 0;
    while backbone.contains_key(&format!("blocks.{depth}.norm1.weight")) {
        depth += 1;
    }
    ensure!(
        depth > 0,
        "the weights have no transformer blocks ('blocks.0.norm1.weight')"
    );
    let fc1 = shape_of(backbone, "blocks.0.mlp.fc1.weight")?;
    ensure!(
        fc1.len() == 2 && fc1[1] == d,
        "blocks.0.mlp.fc1.weight has shape {fc1:?}"
    );
    let num_heads = heads_for(d, depth, arch, num_heads)?;
    let cfg = VitConfig {
        img_size: grid * patch,
        patch_size: patch,
        in_chans,
        embed_dim: d,
        depth,
        num_heads,
        mlp_ratio: fc1[0] as f64 / d as f64,
        qkv_bias: backbone.contains_key("blocks.0.attn.qkv.bias"),
        drop_path_rate: 0.0,
        masked_im_modeling: backbone.contains_key("masked_embed"),
    };
    ensure!(
        cfg.mlp_hidden() == fc1[0],
        "MLP width {} is not representable as a ratio of {d}",
        fc1[0]
    );
    cfg.validate()?;
    Ok(cfg)
}

/// True when the backbone tensors have the Swin layout (`layers.{i}.blocks.{j}.…`).
fn is_swin_layout(backbone: &HashMap<String, Tensor>) -> bool {
    backbone.keys().any(|k| k.starts_with("layers."))
}

/// Refuses `--arch` / `--num_heads` that do not fit a Swin of shape `c`.
fn check_swin_options(c: &SwinConfig, arch: Option<&str>, num_heads: Option<i64>) -> Result<()> {
    ensure!(
        num_heads.is_none(),
        "--num_heads is for ViT weights; a Swin's heads per stage are read off its \
         relative-position tables ({:?} here)",
        c.num_heads
    );
    if let Some(a) = arch {
        ensure!(
            a.starts_with("swin"),
            "--arch {a} is a ViT, but these are Swin Transformer weights"
        );
        let want = SwinConfig::from_arch(a, c.window_size)?;
        ensure!(
            (want.embed_dim, &want.depths, &want.num_heads)
                == (c.embed_dim, &c.depths, &c.num_heads),
            "--arch {a} has width {}, depths {:?} and heads {:?}; the weights have width {}, \
             depths {:?} and heads {:?}",
            want.embed_dim,
            want.depths,
            want.num_heads,
            c.embed_dim,
            c.depths,
            c.num_heads
        );
    }
    Ok(())
}

/// Reads the Swin shape off the backbone tensors (official names without prefixes): width,
/// input channels and patch size from `patch_embed.proj.weight`, stage depths from the block
/// names, heads and window sizes from the `relative_position_bias_table`s (`[(2w-1)², heads]`),
/// MLP ratio, qkv bias and `masked_embed`. The model is taken to be built for
/// [`SWIN_IMG_SIZE`] px; the window size is the largest a block has (stages whose grid is not
/// larger than the window clamp it), and every block's table must fit that construction.
/// `arch` (e.g. `swin_tiny`) is checked against the shapes; `num_heads` is refused.
pub fn infer_swin_config(
    backbone: &HashMap<String, Tensor>,
    arch: Option<&str>,
    num_heads: Option<i64>,
) -> Result<SwinConfig> {
    ensure!(
        !backbone.contains_key("absolute_pos_embed"),
        "the weights have an absolute position embedding (Swin with ape=True), which iBOT's \
         Swin does not use and this implementation does not support"
    );
    let pw = shape_of(backbone, "patch_embed.proj.weight")?;
    ensure!(
        pw.len() == 4 && pw[2] == pw[3],
        "patch_embed.proj.weight has shape {pw:?}, expected [D, C, p, p]"
    );
    let (d, in_chans, patch) = (pw[0], pw[1], pw[2]);
    ensure!(
        backbone.contains_key("patch_embed.norm.weight"),
        "the weights have no 'patch_embed.norm.weight' (Swin with patch_norm=False is not supported)"
    );
    let mut depths = Vec::new();
    let mut heads = Vec::new();
    let mut windows = Vec::new(); // per stage, per block
    while backbone.contains_key(&format!("layers.{}.blocks.0.norm1.weight", depths.len())) {
        let i = depths.len();
        let dim = d << i;
        let mut stage_windows = Vec::new();
        let mut stage_heads = None;
        let mut j = 0;
        while backbone.contains_key(&format!("layers.{i}.blocks.{j}.norm1.weight")) {
            let b = format!("layers.{i}.blocks.{j}.");
            let n1 = shape_of(backbone, &format!("{b}norm1.weight"))?;
            ensure!(
                n1 == [dim],
                "{b}norm1.weight has shape {n1:?}; stage {i} of a Swin of width {d} has width {dim}"
            );
            let k = format!("{b}attn.relative_position_bias_table");
            let t = shape_of(backbone, &k)?;
            ensure!(
                t.len() == 2,
                "{k} has shape {t:?}, expected [(2w-1)², heads]"
            );
            let side = (t[0] as f64).sqrt().round() as i64;
            ensure!(
                side * side == t[0] && side % 2 == 1,
                "{k} has {} rows, not (2w-1)² for a window w",
                t[0]
            );
            let w = (side + 1) / 2;
            match stage_heads {
                None => stage_heads = Some(t[1]),
                Some(h) => ensure!(
                    h == t[1],
                    "stage {i}: block 0 has {h} heads, block {j} has {}",
                    t[1]
                ),
            }
            stage_windows.push(w);
            j += 1;
        }
        depths.push(j as i64);
        heads.push(stage_heads.unwrap_or(0));
        windows.push(stage_windows);
    }
    ensure!(
        !depths.is_empty(),
        "the weights have no Swin blocks ('layers.0.blocks.0.norm1.weight')"
    );
    let fc1 = shape_of(backbone, "layers.0.blocks.0.mlp.fc1.weight")?;
    ensure!(
        fc1.len() == 2 && fc1[1] == d,
        "layers.0.blocks.0.mlp.fc1.weight has shape {fc1:?}"
    );
    let window_size = windows.iter().flatten().copied().max().unwrap_or(1);
    let cfg = SwinConfig {
        img_size: SWIN_IMG_SIZE,
        patch_size: patch,
        in_chans,
        embed_dim: d,
        depths,
        num_heads: heads,
        window_size,
        mlp_ratio: fc1[0] as f64 / d as f64,
        qkv_bias: backbone.contains_key("layers.0.blocks.0.attn.qkv.bias"),
        drop_path_rate: 0.0,
        masked_im_modeling: backbone.contains_key("masked_embed"),
    };
    ensure!(
        (d as f64 * cfg.mlp_ratio) as i64 == fc1[0],
        "MLP width {} is not representable as a ratio of {d}",
        fc1[0]
    );
    cfg.validate()?;
    for (i, ws) in windows.iter().enumerate() {
        for (j, &w) in ws.iter().enumerate() {
            let (built, _) = cfg.window_and_shift(i, j);
            ensure!(
                built == w,
                "stage {i} block {j} has a {w}x{w} window, but a Swin with window {window_size} \
                 built for {SWIN_IMG_SIZE}-px images (as main_ibot.py builds it) has {built}x{built} \
                 there; weights of a Swin built for another resolution are not supported"
            );
        }
    }
    check_swin_options(&cfg, arch, num_heads)?;
    Ok(cfg)
}

/// Reads the backbone shape off the tensors: [`infer_swin_config`] for the Swin layout, else
/// [`infer_vit_config_with`].
pub fn infer_backbone_config(
    backbone: &HashMap<String, Tensor>,
    arch: Option<&str>,
    num_heads: Option<i64>,
) -> Result<BackboneConfig> {
    Ok(if is_swin_layout(backbone) {
        infer_swin_config(backbone, arch, num_heads)?.into()
    } else {
        infer_vit_config_with(backbone, arch, num_heads)?.into()
    })
}

/// Swin tensors as the model wants them: the shifted-window `attn_mask` buffers some Swin
/// codebases save are dropped (they are rebuilt from the shape), and missing
/// `relative_position_index` buffers (constants) are supplied.
fn normalise_swin_tensors(backbone: &mut HashMap<String, Tensor>, c: &SwinConfig) {
    backbone.retain(|k, _| !k.ends_with("attn_mask"));
    for (i, &depth) in c.depths.iter().enumerate() {
        for j in 0..depth as usize {
            let k = format!("layers.{i}.blocks.{j}.attn.relative_position_index");
            backbone.entry(k).or_insert_with(|| {
                let (w, _) = c.window_and_shift(i, j);
                crate::models::swin::relative_position_index(w, Device::Cpu)
            });
        }
    }
}

/// Reads the projection-head shape off the head tensors (`None` when there is no head).
pub fn infer_head_config(
    head: &HashMap<String, Tensor>,
    in_dim: i64,
) -> Result<Option<HeadConfig>> {
    if head.is_empty() {
        return Ok(None);
    }
    if head.keys().any(|k| k.ends_with("running_mean")) {
        bail!("the head uses batch norm (--norm_in_head bn), which is not supported");
    }
    let two_d = |k: &str| head.get(k).filter(|t| t.dim() == 2).map(|t| t.size());
    // Linear layers of the Sequential `mlp` (LayerNorms have 1-D weights, activations none).
    let mut linears = Vec::new();
    let mut has_ln = false;
    for i in 0..64 {
        let k = format!("mlp.{i}.weight");
        match head.get(&k) {
            Some(t) if t.dim() == 2 => linears.push(t.size()),
            Some(_) => has_ln = true,
            None => {}
        }
    }
    if let Some(w) = two_d("mlp.weight") {
        linears.push(w);
    }
    ensure!(!linears.is_empty(), "the head has no 'mlp' layers");
    ensure!(
        linears[0][1] == in_dim,
        "the head takes width {}, the backbone gives {in_dim}",
        linears[0][1]
    );
    let last = two_d("last_layer.weight_v");
    let last2 = two_d("last_layer2.weight_v");
    let (out_dim, bottleneck) = match &last {
        Some(v) => (v[0], v[1]),
        None => (linears[linears.len() - 1][0], 0),
    };
    let patch_out_dim = last2
        .as_ref()
        .map(|v| v[0])
        .or_else(|| two_d("mlp2.weight").map(|w| w[0]))
        .unwrap_or(out_dim);
    let shared_head = last2.is_none() && !head.contains_key("mlp2.weight");
    let cfg = HeadConfig {
        in_dim,
        out_dim,
        patch_out_dim,
        hidden_dim: if linears.len() > 1 { linears[0][0] } else { 0 },
        bottleneck_dim: bottleneck,
        nlayers: linears.len() as i64,
        norm: if has_ln { HeadNorm::Ln } else { HeadNorm::None },
        act: HeadAct::Gelu,
        norm_last_layer: true,
        shared_head,
    };
    cfg.validate()?;
    Ok(Some(cfg))
}

/// The entry of a multi-network file to read: `checkpoint_key` when the file has one (full
/// checkpoints), else `state_dict` (released backbones), else `model`; `None`: the whole file.
fn pick_entry<'a>(checkpoint_key: &'a str, names: &[String]) -> Option<&'a str> {
    [checkpoint_key, "state_dict", "model"]
        .into_iter()
        .find(|e| {
            let p = format!("{e}.");
            names.iter().any(|k| k.starts_with(&p))
        })
}

/// Loads the weights of network `checkpoint_key` (`teacher` or `student`; ignored for files
/// holding a single network) from `path`.
pub fn load_pretrained(
    path: &Path,
    checkpoint_key: &str,
    arch: Option<&str>,
) -> Result<Pretrained> {
    load_pretrained_with(path, checkpoint_key, arch, None)
}

/// True when the file is meant to be safetensors: its name ends in `.safetensors` or it starts
/// like one (u64 header length, then `{`).
fn claims_safetensors(path: &Path) -> Result<bool> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
    {
        return Ok(true);
    }
    use std::io::Read;
    let mut head = [0u8; 9];
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = f
        .read(&mut head)
        .with_context(|| format!("reading {}", path.display()))?;
    // A PyTorch file starts with a zip header ("PK") or a pickle opcode (0x80): neither is the
    // low byte of a plausible header length followed by six zero bytes.
    Ok(n == 9 && head[8] == b'{' || (n >= 8 && head[2..8] == [0; 6] && head[0] != 0x80))
}

/// [`load_pretrained`] with `--num_heads` for weights of a non-standard width. `arch` and
/// `num_heads` are checked against the weights' shapes (and against the configuration our own
/// files store).
pub fn load_pretrained_with(
    path: &Path,
    checkpoint_key: &str,
    arch: Option<&str>,
    num_heads: Option<i64>,
) -> Result<Pretrained> {
    let shown = path.display().to_string();
    let (all, known_cfg, kind) = if looks_like_safetensors(path)? || claims_safetensors(path)? {
        let all = read_safetensors(path).map_err(|e| {
            anyhow::anyhow!("{shown} is a damaged safetensors file (truncated or corrupt?): {e:#}")
        })?;
        let cfg = known_config(path, checkpoint_key)?;
        (all, cfg, "safetensors")
    } else {
        // Only the tensors of the entry `load_pretrained` will pick (see `pick_entry`).
        let chosen = std::cell::OnceCell::new();
        let f = read_pth_subset(path, |name, all| {
            let prefix =
                chosen.get_or_init(|| pick_entry(checkpoint_key, all).map(|e| format!("{e}.")));
            match prefix {
                Some(p) => name.starts_with(p.as_str()),
                None => true,
            }
        })?;
        for s in &f.skipped {
            eprintln!("note: {shown}: skipped the non-tensor object {s}");
        }
        (f.tensors, None, "PyTorch pickle")
    };
    ensure!(!all.is_empty(), "{shown} holds no tensors");
    // Take the entry `checkpoint_key` when the file has one (full checkpoints), else the
    // `state_dict` entry (released backbones), else everything.
    let names: Vec<String> = all.keys().cloned().collect();
    let entry = pick_entry(checkpoint_key, &names);
    let mut backbone = HashMap::new();
    let mut head = HashMap::new();
    let mut linear = HashMap::new();
    for (k, v) in all {
        let rest = match entry {
            Some(e) => match k.strip_prefix(&format!("{e}.")) {
                Some(r) => r.to_string(),
                None => continue,
            },
            None => k,
        };
        let rest = strip_all(&rest, "module.");
        if let Some(h) = rest.strip_prefix("head.") {
            head.insert(h.to_string(), v);
        } else if let Some(l) = rest.strip_prefix("linear.") {
            linear.insert(l.to_string(), v);
        } else {
            backbone.insert(strip_all(&rest, "backbone."), v);
        }
    }
    // timm checkpoints name the classifier `head.weight` / `head.bias`: not a projection head.
    if head.keys().all(|k| k == "weight" || k == "bias") {
        head.clear();
    }
    let config = match known_cfg {
        Some(c) => {
            // The file states its configuration: --arch / --num_heads may only agree with it.
            match &c {
                BackboneConfig::Vit(v) if arch.is_some() || num_heads.is_some() => {
                    let h = heads_for(v.embed_dim, v.depth, arch, num_heads)
                        .with_context(|| format!("checking the options against {shown}"))?;
                    ensure!(
                        h == v.num_heads,
                        "{shown} was written for {} attention heads, not {h}",
                        v.num_heads
                    );
                }
                BackboneConfig::Swin(s) => check_swin_options(s, arch, num_heads)
                    .with_context(|| format!("checking the options against {shown}"))?,
                BackboneConfig::Vit(_) => {}
            }
            c
        }
        None => infer_backbone_config(&backbone, arch, num_heads)
            .with_context(|| format!("reading the model shape from {shown}"))?,
    };
    if let BackboneConfig::Swin(c) = &config {
        normalise_swin_tensors(&mut backbone, c);
    }
    let shape = match &config {
        BackboneConfig::Vit(v) => format!(
            "ViT width {} depth {} patch {} grid {}x{}",
            v.embed_dim,
            v.depth,
            v.patch_size,
            v.grid(),
            v.grid()
        ),
        BackboneConfig::Swin(c) => format!(
            "Swin width {} depths {:?} heads {:?} window {} patch {}",
            c.embed_dim, c.depths, c.num_heads, c.window_size, c.patch_size
        ),
    };
    let description = format!(
        "{shown} ({kind}{}; {shape}{})",
        entry.map(|e| format!(", entry '{e}'")).unwrap_or_default(),
        if head.is_empty() {
            ""
        } else {
            ", with projection head"
        }
    );
    Ok(Pretrained {
        config,
        backbone,
        head,
        linear,
        description,
    })
}

/// The exact backbone configuration stored by our own files, if any.
fn known_config(path: &Path, checkpoint_key: &str) -> Result<Option<BackboneConfig>> {
    let md = crate::params::read_safetensors_metadata(path)?;
    if let Some(raw) = md.get(VIT_CONFIG_KEY) {
        let c: VitConfig = serde_json::from_str(raw)
            .with_context(|| format!("{}: damaged {VIT_CONFIG_KEY}", path.display()))?;
        return Ok(Some(c.into()));
    }
    if let Some(raw) = md.get(SWIN_CONFIG_KEY) {
        let c: SwinConfig = serde_json::from_str(raw)
            .with_context(|| format!("{}: damaged {SWIN_CONFIG_KEY}", path.display()))?;
        return Ok(Some(c.into()));
    }
    if md.contains_key("ibot") {
        let meta = crate::train::checkpoint::read_meta(path)?;
        return Ok(Some(match checkpoint_key {
            "student" => meta.config.backbone.without_drop_path(),
            _ => meta.config.teacher_backbone(),
        }));
    }
    Ok(None)
}

impl Pretrained {
    /// The ViT shape, when the weights are a ViT.
    pub fn vit(&self) -> Option<&VitConfig> {
        self.config.as_vit()
    }

    /// The Swin shape, when the weights are a Swin.
    pub fn swin(&self) -> Option<&SwinConfig> {
        match &self.config {
            BackboneConfig::Swin(c) => Some(c),
            BackboneConfig::Vit(_) => None,
        }
    }

    /// The backbone as an inference model (no drop path), every tensor checked.
    pub fn backbone_model(&self, device: Device) -> Result<(ParamStore, Backbone)> {
        let mut ps = ParamStore::new();
        let model = Backbone::new(&mut ps, "", &self.config.without_drop_path(), false, device)?;
        ps.load_strict(&self.backbone, "")
            .context("loading the backbone weights")?;
        Ok((ps, model))
    }

    /// The projection head, when the file has one.
    pub fn head_model(&self, device: Device) -> Result<Option<(ParamStore, IbotHead)>> {
        let Some(cfg) = infer_head_config(&self.head, self.config.embed_dim())? else {
            return Ok(None);
        };
        let mut ps = ParamStore::new();
        let head = IbotHead::new(&mut ps, "", &cfg, false, device)?;
        let mut src: HashMap<String, Tensor> = self
            .head
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        if cfg.shared_head {
            // The file has no separate patch layer: the shared one answers to both names.
            for (alias, k) in [
                ("last_layer2.weight_g", "last_layer.weight_g"),
                ("last_layer2.weight_v", "last_layer.weight_v"),
            ] {
                if let Some(t) = self.head.get(k) {
                    src.insert(alias.to_string(), t.shallow_clone());
                }
            }
            if cfg.bottleneck_dim == 0 {
                let last_idx = (0..64).rev().find(|i| {
                    self.head
                        .get(&format!("mlp.{i}.weight"))
                        .is_some_and(|t| t.dim() == 2)
                });
                let last = last_idx
                    .map(|i| format!("mlp.{i}"))
                    .unwrap_or_else(|| "mlp".to_string());
                for s in ["weight", "bias"] {
                    if let Some(t) = self.head.get(&format!("{last}.{s}")) {
                        src.insert(format!("mlp2.{s}"), t.shallow_clone());
                    }
                }
            }
        }
        ps.load_strict(&src, "")
            .context("loading the projection-head weights")?;
        Ok(Some((ps, head)))
    }

    /// The backbone tensors in the official order, optionally named for timm
    /// (`masked_embed`, which timm's ViT does not have, is left out).
    pub fn backbone_tensors(&self, timm: bool) -> Result<Vec<(String, Tensor)>> {
        ensure!(
            !(timm && self.swin().is_some()),
            "--timm names are for ViT backbones; timm's Swin Transformer uses other names and \
             layouts, so this Swin backbone is written under the official iBOT names only \
             (leave out --timm)"
        );
        let (ps, _) = self.backbone_model(Device::Cpu)?;
        Ok(ps
            .state_dict()
            .filter(|(k, _)| !(timm && *k == "masked_embed"))
            .map(|(k, t)| (k.to_string(), t.shallow_clone()))
            .collect())
    }
}

/// Writes the backbone of `p` to `out` as safetensors under official names (no prefix), with its
/// configuration in the metadata so it loads back without guessing. With `timm` (ViT only),
/// names are those timm's `VisionTransformer` uses (the same, minus `masked_embed`).
pub fn export_backbone(p: &Pretrained, out: &Path, timm: bool) -> Result<usize> {
    let tensors = p.backbone_tensors(timm)?;
    let mut md = HashMap::new();
    match &p.config {
        BackboneConfig::Vit(v) => md.insert(
            VIT_CONFIG_KEY.to_string(),
            serde_json::to_string(&VitConfig {
                masked_im_modeling: v.masked_im_modeling && !timm,
                ..v.clone()
            })?,
        ),
        BackboneConfig::Swin(c) => {
            md.insert(SWIN_CONFIG_KEY.to_string(), serde_json::to_string(c)?)
        }
    };
    md.insert("format".to_string(), "pt".to_string());
    crate::params::write_safetensors(out, &tensors, Some(md))
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(tensors.len())
}
