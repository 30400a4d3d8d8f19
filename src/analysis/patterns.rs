//! The part-level patterns the teacher's prototypes collect, as the official
//! `analysis/extract_pattern/extract_topk_cluster.py` finds and shows them.
//!
//! Every image (`Resize(img_size // 7 * 8)` + `CenterCrop(img_size)`) goes through the backbone
//! and the projection head; each patch token (`patch`) or [CLS] token (`cls`) is assigned to the
//! prototype with the largest output (the head's logit, as the official `feature.max(-1)`:
//! value and index). Prototypes are ranked by how many tokens they got; for each of the
//! `show_pics` most populated ones the members with the largest values are shown in a grid:
//! for `patch`, each image contributes its best patch of that prototype and the `2 * topk` best
//! images are the candidates, drawn as windows of `patch_window` x `patch_window` patches
//! around the patch (highlighted), skipping windows too dark to see (mean HSV value <= 40),
//! up to `topk` tiles; for `cls`, the `topk` best whole images.
//!
//! Unlike the official script, which keeps a memory bank of every token of the data set
//! (50,000 x 196 x 2 floats for ImageNet's validation set, 2 GB for its training set), this
//! keeps per prototype only the count and a bounded top-k (a min-heap of the `2 * topk` or
//! `topk` best members), so memory is `out_dim x k` whatever the data set's size. The data set
//! is processed in `chunks` consecutive parts (the official `--chunks` cut the counting over
//! `out_dim` for the same reason); after each part the counts and heaps are written atomically
//! to `<save_path>/topk_state_<type>.safetensors`, and a rerun with the same options resumes
//! after the last finished part. Members must really belong to the prototype: where fewer than
//! `2 * topk` images have one, the official code fills the list with images that have none
//! (value 0), which this leaves out.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::data::dataset::Dataset;
use crate::data::ops::{self, Filter, Rgb8};
use crate::eval::features::view_batch;
use crate::models::{IbotHead, VisionTransformer};

/// Which tokens are assigned to prototypes (`--type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatternType {
    Patch,
    Cls,
}

impl PatternType {
    pub fn name(self) -> &'static str {
        match self {
            Self::Patch => "patch",
            Self::Cls => "cls",
        }
    }
}

/// Options of `ibot patterns` (the official script's names and defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatternsConfig {
    pub pattern_type: PatternType,
    pub topk: usize,
    pub show_pics: usize,
    pub patch_window: usize,
    pub chunks: usize,
    pub batch_size: usize,
    pub img_size: usize,
    pub save_path: PathBuf,
    pub num_workers: usize,
    /// What the state file must have been made from (weights, data), to refuse resuming
    /// another run's state.
    pub fingerprint: String,
}

impl PatternsConfig {
    /// Members kept per prototype: `2 * topk` candidates for patches (dark windows are skipped
    /// when drawing), `topk` for [CLS].
    pub fn keep(&self) -> usize {
        match self.pattern_type {
            PatternType::Patch => 2 * self.topk,
            PatternType::Cls => self.topk,
        }
    }
}

/// The official view: `Resize(img_size // 7 * 8)` of the shorter side (Pillow bilinear, the
/// longer side `int(s * long / short)`), then `CenterCrop(img_size)`.
pub fn pattern_view(img: &Rgb8, img_size: usize) -> Result<Rgb8> {
    let s = img_size / 7 * 8;
    ensure!(
        s >= img_size && img_size > 0,
        "--img_size {img_size} is too small (at least 7 pixels)"
    );
    let (w, h) = (img.width, img.height);
    let (nw, nh) = if w <= h {
        (s, (s as f64 * h as f64 / w as f64) as usize)
    } else {
        ((s as f64 * w as f64 / h as f64) as usize, s)
    };
    let resized = ops::resized_crop_with(img, 0, 0, h, w, nh, nw, Filter::Bilinear);
    let top = ((nh - img_size) as f64 / 2.0).round_ties_even() as usize;
    let left = ((nw - img_size) as f64 / 2.0).round_ties_even() as usize;
    Ok(ops::resized_crop_with(
        &resized,
        top,
        left,
        img_size,
        img_size,
        img_size,
        img_size,
        Filter::Bilinear,
    ))
}

/// One member of a prototype: its value (the head's largest logit), the image and the patch
/// (row-major on the patch grid; 0 for [CLS]). Ordered best first: larger value, then lower
/// image, then lower patch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub value: f32,
    pub image: i64,
    pub spatial: i64,
}

impl Eq for Member {}
impl Ord for Member {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.value
            .total_cmp(&o.value)
            .then(o.image.cmp(&self.image))
            .then(o.spatial.cmp(&self.spatial))
    }
}
impl PartialOrd for Member {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// Per prototype: how many tokens it got and its `k` best members, updated batch by batch.
#[derive(Debug, Clone)]
pub struct StreamingTopk {
    pub k: usize,
    pub counts: Vec<i64>,
    heaps: Vec<BinaryHeap<Reverse<Member>>>,
}

impl StreamingTopk {
    pub fn new(out_dim: usize, k: usize) -> Self {
        Self {
            k,
            counts: vec![0; out_dim],
            heaps: vec![BinaryHeap::new(); out_dim],
        }
    }

    pub fn out_dim(&self) -> usize {
        self.counts.len()
    }

    fn offer(&mut self, c: usize, m: Member) {
        let h = &mut self.heaps[c];
        if h.len() < self.k {
            h.push(Reverse(m));
        } else if h.peek().is_some_and(|w| m > w.0) {
            h.pop();
            h.push(Reverse(m));
        }
    }

    /// Adds the head outputs of the images `images`: `[B, L, out_dim]` patch logits (each image
    /// offers, per prototype, its best patch of that prototype) or `[B, out_dim]` [CLS] logits.
    pub fn update(&mut self, logits: &Tensor, images: &[i64]) -> Result<()> {
        let logits = logits.to_kind(Kind::Float);
        let size = logits.size();
        let (b, l, d) = match size[..] {
            [b, l, d] => (b, l, d),
            [b, d] => (b, 1, d),
            _ => bail!("head outputs must be [B, L, out_dim] or [B, out_dim], not {size:?}"),
        };
        ensure!(
            d as usize == self.out_dim() && b as usize == images.len(),
            "head outputs {size:?} do not fit {} prototypes and {} images",
            self.out_dim(),
            images.len()
        );
        let (v, a) = logits.reshape([b, l, d]).max_dim(-1, false);
        let v = Vec::<f32>::try_from(v.to_device(Device::Cpu).flatten(0, -1))?;
        let a = Vec::<i64>::try_from(a.to_device(Device::Cpu).flatten(0, -1))?;
        let l = l as usize;
        for (j, &img) in images.iter().enumerate() {
            // The official (value * mask).max(-1): each image's first best patch per prototype.
            let mut best: HashMap<usize, Member> = HashMap::new();
            for p in 0..l {
                let (val, c) = (v[j * l + p], a[j * l + p] as usize);
                self.counts[c] += 1;
                let m = Member {
                    value: val,
                    image: img,
                    spatial: p as i64,
                };
                match best.get(&c) {
                    Some(o) if o.value >= val => {}
                    _ => {
                        best.insert(c, m);
                    }
                }
            }
            let mut found: Vec<(usize, Member)> = best.into_iter().collect();
            found.sort_by_key(|(c, _)| *c);
            for (c, m) in found {
                self.offer(c, m);
            }
        }
        Ok(())
    }

    /// The members of prototype `c`, best first.
    pub fn members(&self, c: usize) -> Vec<Member> {
        let mut v: Vec<Member> = self.heaps[c].iter().map(|r| r.0).collect();
        v.sort_by(|a, b| b.cmp(a));
        v
    }

    /// The `n` most populated prototypes (ties: lower index first), populated ones only.
    pub fn most_populated(&self, n: usize) -> Vec<usize> {
        let mut ids: Vec<usize> = (0..self.out_dim())
            .filter(|&c| self.counts[c] > 0)
            .collect();
        ids.sort_by(|&a, &b| self.counts[b].cmp(&self.counts[a]).then(a.cmp(&b)));
        ids.truncate(n);
        ids
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        let (d, k) = (self.out_dim(), self.k);
        let mut values = vec![0f32; d * k];
        let mut images = vec![-1i64; d * k];
        let mut spatial = vec![0i64; d * k];
        for c in 0..d {
            for (i, m) in self.members(c).into_iter().enumerate() {
                values[c * k + i] = m.value;
                images[c * k + i] = m.image;
                spatial[c * k + i] = m.spatial;
            }
        }
        let shape = [d as i64, k as i64];
        vec![
            ("counts".into(), Tensor::from_slice(&self.counts)),
            ("values".into(), Tensor::from_slice(&values).reshape(shape)),
            ("images".into(), Tensor::from_slice(&images).reshape(shape)),
            (
                "spatial".into(),
                Tensor::from_slice(&spatial).reshape(shape),
            ),
        ]
    }

    fn from_tensors(t: &HashMap<String, Tensor>, k: usize) -> Result<Self> {
        let get = |n: &str| t.get(n).with_context(|| format!("the state has no '{n}'"));
        let counts = Vec::<i64>::try_from(get("counts")?)?;
        let d = counts.len();
        let values = Vec::<f32>::try_from(get("values")?.flatten(0, -1))?;
        let images = Vec::<i64>::try_from(get("images")?.flatten(0, -1))?;
        let spatial = Vec::<i64>::try_from(get("spatial")?.flatten(0, -1))?;
        ensure!(
            values.len() == d * k && images.len() == d * k && spatial.len() == d * k,
            "the state's tables do not have {d} x {k} entries"
        );
        let mut s = Self::new(d, k);
        s.counts = counts;
        for c in 0..d {
            for i in 0..k {
                let j = c * k + i;
                if images[j] >= 0 {
                    s.heaps[c].push(Reverse(Member {
                        value: values[j],
                        image: images[j],
                        spatial: spatial[j],
                    }));
                }
            }
        }
        Ok(s)
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct StateMeta {
    pattern_type: PatternType,
    keep: usize,
    chunks: usize,
    images: usize,
    fingerprint: String,
    /// Parts of the data set already counted.
    done: usize,
}

const STATE_KEY: &str = "ibot_patterns_state";

/// `<save_path>/topk_state_<type>.safetensors`.
pub fn state_path(cfg: &PatternsConfig) -> PathBuf {
    cfg.save_path.join(format!(
        "topk_state_{}.safetensors",
        cfg.pattern_type.name()
    ))
}

fn save_state(cfg: &PatternsConfig, s: &StreamingTopk, meta: &StateMeta) -> Result<()> {
    let mut md = HashMap::new();
    md.insert(STATE_KEY.to_string(), serde_json::to_string(meta)?);
    crate::params::write_safetensors(&state_path(cfg), &s.tensors(), Some(md))
}

fn load_state(cfg: &PatternsConfig, expect: &StateMeta) -> Result<Option<(StreamingTopk, usize)>> {
    let path = state_path(cfg);
    if !path.is_file() {
        return Ok(None);
    }
    let md = crate::params::read_safetensors_metadata(&path)?;
    let meta: StateMeta = serde_json::from_str(
        md.get(STATE_KEY)
            .with_context(|| format!("{} is not a patterns state file", path.display()))?,
    )
    .with_context(|| format!("{}: damaged metadata", path.display()))?;
    let same = StateMeta {
        done: meta.done,
        ..serde_json::from_str(&serde_json::to_string(expect)?)?
    };
    ensure!(
        meta == same,
        "{} was made by another run ({} of {} parts over {} images, type {}, {} members, from \
         {}); use another --save_path or delete the file to start again",
        path.display(),
        meta.done,
        meta.chunks,
        meta.images,
        meta.pattern_type.name(),
        meta.keep,
        meta.fingerprint
    );
    let t = crate::params::read_safetensors(&path)?;
    Ok(Some((
        StreamingTopk::from_tensors(&t, meta.keep)?,
        meta.done,
    )))
}

/// Head outputs of a batch of prepared images `[B, 3, S, S]`: patch logits `[B, L, out_dim]`
/// or [CLS] logits `[B, out_dim]`.
pub fn head_logits(
    vit: &VisionTransformer,
    head: &IbotHead,
    x: &Tensor,
    t: PatternType,
) -> Result<Tensor> {
    tch::no_grad(|| {
        let tokens = vit.forward(x, None, false)?;
        let (cls, patch) = head.forward_tokens(&tokens)?;
        Ok(match t {
            PatternType::Patch => patch,
            PatternType::Cls => cls,
        })
    })
}

/// Counts and top-k members over `ds`, resuming from the state file when there is one.
pub fn collect(
    cfg: &PatternsConfig,
    vit: &VisionTransformer,
    head: &IbotHead,
    ds: &dyn Dataset,
    device: Device,
) -> Result<StreamingTopk> {
    let n = ds.len();
    ensure!(
        n >= cfg.topk,
        "the data set has {n} images, fewer than --topk {}: a grid of the top {} members \
         needs at least that many images",
        cfg.topk,
        cfg.topk
    );
    ensure!(cfg.topk >= 1, "--topk must be at least 1");
    ensure!(
        (1..=n).contains(&cfg.chunks),
        "--chunks {} must be between 1 and the {n} images",
        cfg.chunks
    );
    ensure!(cfg.batch_size >= 1, "--batch_size must be at least 1");
    let patch = vit.cfg.patch_size as usize;
    ensure!(
        cfg.img_size >= patch && cfg.img_size % patch == 0,
        "--img_size {} must be a whole number of {patch}-pixel patches (at least one)",
        cfg.img_size
    );
    ensure!(
        cfg.img_size >= 7,
        "--img_size {} is too small: images are resized to img_size // 7 * 8 first",
        cfg.img_size
    );
    std::fs::create_dir_all(&cfg.save_path)
        .with_context(|| format!("creating {}", cfg.save_path.display()))?;
    let mut meta = StateMeta {
        pattern_type: cfg.pattern_type,
        keep: cfg.keep(),
        chunks: cfg.chunks,
        images: n,
        fingerprint: cfg.fingerprint.clone(),
        done: 0,
    };
    let mut state = match load_state(cfg, &meta)? {
        Some((s, done)) => {
            if done < cfg.chunks {
                eprintln!(
                    "resuming from {}: {done} of {} parts done",
                    state_path(cfg).display(),
                    cfg.chunks
                );
            }
            meta.done = done;
            Some(s)
        }
        None => None,
    };
    let bounds: Vec<usize> = (0..=cfg.chunks).map(|c| c * n / cfg.chunks).collect();
    let todo: usize = (meta.done..cfg.chunks)
        .map(|c| (bounds[c + 1] - bounds[c]).div_ceil(cfg.batch_size))
        .sum();
    let bar = crate::util::progress_bar(
        todo as u64,
        &format!("patterns ({})", cfg.pattern_type.name()),
    );
    let size = cfg.img_size;
    let view = move |img: &Rgb8, _: usize| pattern_view(img, size).unwrap_or_else(|_| img.clone());
    for c in meta.done..cfg.chunks {
        let idx: Vec<usize> = (bounds[c]..bounds[c + 1]).collect();
        for batch in idx.chunks(cfg.batch_size) {
            let (x, _) = view_batch(ds, batch, size, cfg.num_workers, &view)?;
            let logits = head_logits(vit, head, &x.to_device(device), cfg.pattern_type)?;
            let s = state.get_or_insert_with(|| {
                StreamingTopk::new(*logits.size().last().unwrap_or(&0) as usize, cfg.keep())
            });
            let ids: Vec<i64> = batch.iter().map(|&i| i as i64).collect();
            s.update(&logits, &ids)?;
            bar.inc(1);
        }
        meta.done = c + 1;
        if let Some(s) = &state {
            save_state(cfg, s, &meta)?;
        }
    }
    bar.finish_and_clear();
    state.context("no image was processed")
}

/// Mean of PIL's HSV value channel (max of R, G, B) over a picture.
pub fn mean_hsv_value(img: &Rgb8) -> f64 {
    let s: u64 = img
        .data
        .chunks_exact(3)
        .map(|p| p[0].max(p[1]).max(p[2]) as u64)
        .sum();
    s as f64 / (img.width * img.height).max(1) as f64
}

/// Pillow's `crop` of the box (left, top, right, bottom): outside the image is black.
fn crop_padded(img: &Rgb8, left: i64, top: i64, right: i64, bottom: i64) -> Rgb8 {
    let (w, h) = ((right - left) as usize, (bottom - top) as usize);
    let mut out = Rgb8::new(w, h, vec![0; w * h * 3]);
    super::paste(&mut out, img, -left, -top);
    out
}

/// Pillow's `ImageDraw.Draw(img, "RGBA").rectangle((x0, y0, x1, y1), fill=(r, g, b, a))`: the
/// box with both corners included, blended with the fill at alpha `a` in 8-bit arithmetic.
fn blend_rectangle(img: &mut Rgb8, (x0, y0, x1, y1): (usize, usize, usize, usize), fill: [u8; 4]) {
    let a = fill[3] as u32;
    for y in y0..=y1.min(img.height.saturating_sub(1)) {
        for x in x0..=x1.min(img.width.saturating_sub(1)) {
            let i = (y * img.width + x) * 3;
            for ch in 0..3 {
                let t = img.data[i + ch] as u32 * (255 - a) + fill[ch] as u32 * a + 128;
                img.data[i + ch] = ((t + (t >> 8)) >> 8) as u8;
            }
        }
    }
}

/// One prototype's grid as the official script draws it, and the members drawn.
pub fn cluster_grid(
    cfg: &PatternsConfig,
    members: &[Member],
    patch: usize,
    ds: &dyn Dataset,
) -> Result<(Rgb8, Vec<Member>)> {
    let size = (cfg.topk as f64).sqrt().ceil() as usize;
    let (unit, vis) = match cfg.pattern_type {
        PatternType::Patch => (patch, patch * cfg.patch_window),
        PatternType::Cls => (cfg.img_size, cfg.img_size),
    };
    let mut grid = Rgb8::new(size * vis, size * vis, vec![0; size * vis * size * vis * 3]);
    let npatch = (cfg.img_size / patch) as i64;
    let half = (cfg.patch_window / 2) as i64;
    let mut drawn = Vec::new();
    for m in members {
        let (raw, _) = ds.get(m.image as usize)?;
        let raw = pattern_view(&raw, cfg.img_size)?;
        let tile = match cfg.pattern_type {
            PatternType::Patch => {
                let (h, w) = (m.spatial / npatch, m.spatial % npatch);
                let u = unit as i64;
                let mut t = crop_padded(
                    &raw,
                    (w - half) * u,
                    (h - half) * u,
                    (w + half + 1) * u,
                    (h + half + 1) * u,
                );
                if mean_hsv_value(&t) <= 40.0 {
                    continue; // too dark to see, as officially
                }
                if cfg.patch_window > 1 {
                    let (a, b) = (half as usize * unit, (half as usize + 1) * unit);
                    blend_rectangle(&mut t, (a, a, b, b), [200, 100, 0, 127]);
                }
                t
            }
            PatternType::Cls => raw,
        };
        let i = drawn.len();
        super::paste(
            &mut grid,
            &tile,
            ((i % size) * vis) as i64,
            ((i / size) * vis) as i64,
        );
        drawn.push(*m);
        if drawn.len() >= cfg.topk {
            break;
        }
    }
    Ok((grid, drawn))
}

/// One shown prototype, as listed in `patterns_<type>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShownPattern {
    pub rank: usize,
    pub cluster: usize,
    pub count: i64,
    pub file: String,
    /// The candidates (best first) and those drawn (after skipping dark windows).
    pub members: Vec<Member>,
    pub drawn: Vec<Member>,
}

/// Draws the grids of the `show_pics` most populated prototypes into `save_path` and lists
/// them in `patterns_<type>.json`.
pub fn render(
    cfg: &PatternsConfig,
    state: &StreamingTopk,
    patch: usize,
    ds: &dyn Dataset,
) -> Result<Vec<ShownPattern>> {
    let ids = state.most_populated(cfg.show_pics);
    let bar = crate::util::progress_bar(ids.len() as u64, "grids");
    let mut shown = Vec::new();
    for (rank, &c) in ids.iter().enumerate() {
        let members = state.members(c);
        let (grid, drawn) = cluster_grid(cfg, &members, patch, ds)?;
        let file = format!(
            "c{}_crank{rank}_cid{c}_top{}.png",
            cfg.pattern_type.name(),
            cfg.topk
        );
        super::save_png(&grid, &cfg.save_path.join(&file))?;
        shown.push(ShownPattern {
            rank,
            cluster: c,
            count: state.counts[c],
            file,
            members,
            drawn,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    write_json(
        &cfg.save_path
            .join(format!("patterns_{}.json", cfg.pattern_type.name())),
        &shown,
    )?;
    Ok(shown)
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    crate::util::atomic_write(path, serde_json::to_string_pretty(v)?.as_bytes())
}
