//! Copy detection on Copydays, as the official `eval_copy_detection.py` (from DINO).
//!
//! On disk, as the official `CopydaysDataset`: `<data_path>/original`, `strong`,
//! `jpegqual/{3,5,8,10,15,20,30,50,75}` and `crops/{10,15,...,80}`, each a folder of `.jpg`
//! files taken in name order. Every block is a set of queries; the database is `original`, plus
//! the images of `--distractors_path` when that folder exists. A query's positive is the
//! original at the same position of its block (for `strong`, every original whose name shares
//! the query's first four characters).
//!
//! Features: every image resized to `imsize x imsize` (bicubic, aspect ratio not kept), the
//! last block's normed tokens, `[CLS]` concatenated with the GeM (p = 4) pool of the patch tokens
//! clamped at 1e-6. With `--whitening_path`, the mean of that folder's features is subtracted
//! from database and queries and a PCA whitening (power 0.5) learnt from the (uncentred) second
//! moment of those features is applied, as the official code does; then L2 normalisation, the
//! 20 most similar database images per query, and the AP of the Holidays evaluation package per
//! query, averaged per block.
//!
//! The official script hard-codes the block sizes of the real data set (157 queries per block,
//! 229 for `strong`); here a block is whatever its folder holds, which is the same on Copydays.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::retrieval::compute_ap;
use crate::data::ops::{self, Rgb8};
use crate::models::BackboneRef;

/// The official block names, in order: `original`, `strong`, then the JPEG qualities and crops.
pub fn block_names() -> Vec<String> {
    let mut v = vec!["original".to_string(), "strong".to_string()];
    v.extend([3, 5, 8, 10, 15, 20, 30, 50, 75].map(|q| format!("jpegqual/{q}")));
    v.extend([10, 15, 20, 30, 40, 50, 60, 70, 80].map(|c| format!("crops/{c}")));
    v
}

/// The number of database images ranked per query (`similarity.topk(20)`).
pub const TOPK: i64 = 20;

/// `.jpg` files of a block folder, in name order.
pub fn block_files(dir: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".jpg"))
        .collect();
    v.sort();
    Ok(v)
}

/// Image files of a distractor / whitening folder (the official `is_image_file` extensions),
/// in name order (the official script takes `os.listdir` order, which is arbitrary).
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    const EXT: &[&str] = &[
        "jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp",
    ];
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .map(|n| {
                    n.to_string_lossy()
                        .rsplit('.')
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
                .is_some_and(|e| EXT.contains(&e.as_str()))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// `[CLS]` and GeM-pooled (p = 4) patch tokens of the last block (normed) for images
/// `[B, 3, S, S]`: `[B, 2 D]`.
pub fn cls_gem<'a>(backbone: impl Into<BackboneRef<'a>>, x: &Tensor) -> Result<Tensor> {
    let BackboneRef::Vit(vit) = backbone.into() else {
        bail!("eval-copydetection takes ViT backbones (as the official script)")
    };
    let _g = tch::no_grad_guard();
    let t = vit
        .intermediate_tokens(x, 1, true)?
        .pop()
        .context("no block output")?;
    let cls = t.select(1, 0);
    let n = t.size()[1] - 1;
    let gem = t
        .narrow(1, 1, n)
        .clamp_min(1e-6)
        .pow_tensor_scalar(4)
        .mean_dim(1, false, Kind::Float)
        .pow_tensor_scalar(0.25);
    Ok(Tensor::cat(&[cls, gem], 1))
}

/// The official whitening: features minus the mean of `whit`, times `diag(d^-1/2) Vᵀ` of the
/// eigen-decomposition of `whitᵀ whit / n` (eigenvalues below 1e-5 of the largest raised to it,
/// components by decreasing eigenvalue). Returns the transformed `(database, queries)`.
pub fn whiten(whit: &Tensor, database: &Tensor, queries: &Tensor) -> Result<(Tensor, Tensor)> {
    ensure!(whit.size()[0] >= 1, "the whitening folder gave no features");
    let w = whit.to_kind(Kind::Double);
    let mean = w.mean_dim(0, false, Kind::Double);
    let cov = w.tr().matmul(&w) / w.size()[0] as f64;
    let (d, v) = cov.linalg_eigh("L");
    let dmax = d.max().double_value(&[]);
    let d = d.clamp_min(dmax * 1e-5);
    let order = d.argsort(0, true);
    let (d, v) = (d.index_select(0, &order), v.index_select(1, &order));
    let dvt = v.tr() * d.pow_tensor_scalar(-0.5).unsqueeze(1);
    let apply = |x: &Tensor| (x.to_kind(Kind::Double) - &mean).matmul(&dvt.tr());
    Ok((apply(database), apply(queries)))
}

/// Per-block mAP of the retrieved database indices `ids` `[n_queries, k]` (queries in block
/// order, `sizes` per block) as the official `eval_result`: the positive of query j of a block
/// is database image j, except for `strong`, whose positives are `strong_positives[j]`.
pub fn eval_result(
    ids: &[Vec<i64>],
    names: &[String],
    sizes: &[usize],
    strong_positives: &[Vec<i64>],
) -> Result<Vec<f64>> {
    ensure!(
        sizes.iter().sum::<usize>() == ids.len() && names.len() == sizes.len(),
        "block sizes {sizes:?} do not add up to the {} queries",
        ids.len()
    );
    let mut out = Vec::new();
    let mut j0 = 0;
    for (name, &size) in names.iter().zip(sizes) {
        let mut sum_ap = 0.0;
        for (qno, line) in ids[j0..j0 + size].iter().enumerate() {
            let positives: Vec<i64> = if name == "strong" {
                strong_positives
                    .get(qno)
                    .cloned()
                    .with_context(|| format!("no positives for strong query {qno}"))?
            } else {
                vec![qno as i64]
            };
            let ranks: Vec<usize> = line
                .iter()
                .enumerate()
                .filter(|(_, b)| positives.contains(b))
                .map(|(r, _)| r)
                .collect();
            // An empty positive list (a strong query without an original) scores 0 here; the
            // official code would divide by zero.
            if !positives.is_empty() {
                sum_ap += compute_ap(&ranks, positives.len());
            }
        }
        out.push(if size > 0 {
            sum_ap / size as f64
        } else {
            f64::NAN
        });
        j0 += size;
    }
    Ok(out)
}

/// A list of image files as an unlabelled data set (the official `ImgListDataset`).
struct FileList(Vec<PathBuf>);

impl crate::data::dataset::Dataset for FileList {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self, index: usize) -> Result<(Rgb8, i64)> {
        Ok((crate::data::dataset::load_rgb(&self.0[index])?, -1))
    }
    fn label(&self, _: usize) -> i64 {
        -1
    }
    fn classes(&self) -> &[String] {
        &[]
    }
    fn describe(&self) -> String {
        format!("{} image files", self.0.len())
    }
}

/// Settings of `ibot eval-copydetection`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyConfig {
    pub data_path: PathBuf,
    pub whitening_path: Option<PathBuf>,
    pub distractors_path: Option<PathBuf>,
    pub imsize: usize,
    pub batch_size_per_gpu: usize,
    pub num_workers: usize,
}

/// mAP of one query block.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockResult {
    pub block: String,
    pub queries: usize,
    pub map: f64,
}

/// Features `[n, 2D]` of image files (official preprocessing: square bicubic resize).
pub fn features_of_files<'a>(
    backbone: BackboneRef<'a>,
    files: &[PathBuf],
    cfg: &CopyConfig,
    device: Device,
    what: &str,
) -> Result<Tensor> {
    ensure!(!files.is_empty(), "{what}: no images");
    let ds = FileList(files.to_vec());
    let idx: Vec<usize> = (0..files.len()).collect();
    let s = cfg.imsize;
    let bar = crate::util::progress_bar(idx.len().div_ceil(cfg.batch_size_per_gpu) as u64, what);
    let mut out = Vec::new();
    for chunk in idx.chunks(cfg.batch_size_per_gpu.max(1)) {
        let (x, _) =
            super::features::view_batch(&ds, chunk, s, cfg.num_workers, &|img: &Rgb8, _| {
                ops::resized_crop(img, 0, 0, img.height, img.width, s, s)
            })?;
        out.push(cls_gem(backbone, &x.to_device(device))?.to_device(Device::Cpu));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(Tensor::cat(&out, 0))
}

/// Runs the evaluation: per-block mAP.
pub fn run<'a>(
    cfg: &CopyConfig,
    backbone: impl Into<BackboneRef<'a>>,
    device: Device,
) -> Result<Vec<BlockResult>> {
    let backbone = backbone.into();
    let orig_dir = cfg.data_path.join("original");
    ensure!(
        orig_dir.is_dir(),
        "{} is missing: Copydays is laid out as <data_path>/original, strong, jpegqual/<q>, crops/<c>",
        orig_dir.display()
    );
    let mut names = Vec::new();
    let mut sizes = Vec::new();
    let mut query_files = Vec::new();
    for b in block_names() {
        let dir = cfg.data_path.join(&b);
        if !dir.is_dir() {
            eprintln!("note: block {b} is missing ({}), skipped", dir.display());
            continue;
        }
        let files = block_files(&dir)?;
        sizes.push(files.len());
        query_files.extend(files.iter().map(|f| dir.join(f)));
        names.push(b);
    }
    let originals = block_files(&orig_dir)?;
    let strongs = if cfg.data_path.join("strong").is_dir() {
        block_files(&cfg.data_path.join("strong"))?
    } else {
        Vec::new()
    };
    let prefix = |s: &str| s.chars().take(4).collect::<String>();
    let strong_positives: Vec<Vec<i64>> = strongs
        .iter()
        .map(|q| {
            originals
                .iter()
                .enumerate()
                .filter(|(_, o)| prefix(o) == prefix(q))
                .map(|(j, _)| j as i64)
                .collect()
        })
        .collect();
    let mut db_files: Vec<PathBuf> = originals.iter().map(|f| orig_dir.join(f)).collect();
    if let Some(d) = cfg.distractors_path.as_ref().filter(|d| d.is_dir()) {
        let extra = image_files(d)?;
        eprintln!("Using {} distractors...", extra.len());
        db_files.extend(extra);
    }
    ensure!(
        db_files.len() as i64 >= TOPK,
        "the database holds {} images, fewer than the {TOPK} retrieved per query (add distractors)",
        db_files.len()
    );
    let queries = features_of_files(backbone, &query_files, cfg, device, "queries")?;
    let database = features_of_files(backbone, &db_files, cfg, device, "database")?;
    let (database, queries) = match cfg.whitening_path.as_ref().filter(|d| d.is_dir()) {
        Some(d) => {
            let files = image_files(d)?;
            eprintln!(
                "whitening learnt on {} images of {}",
                files.len(),
                d.display()
            );
            let w = features_of_files(backbone, &files, cfg, device, "whitening")?;
            whiten(&w, &database, &queries)?
        }
        None => (database, queries),
    };
    let ids = retrieve(&queries, &database)?;
    let maps = eval_result(&ids, &names, &sizes, &strong_positives)?;
    let mut out = Vec::new();
    for ((name, size), map) in names.iter().zip(&sizes).zip(maps) {
        println!("eval on {name} mAP={map:.3}");
        out.push(BlockResult {
            block: name.clone(),
            queries: *size,
            map,
        });
    }
    Ok(out)
}

/// The [`TOPK`] most similar database rows for every query, after L2 normalisation.
pub fn retrieve(queries: &Tensor, database: &Tensor) -> Result<Vec<Vec<i64>>> {
    let q = crate::models::head::l2_normalize(&queries.to_kind(Kind::Double));
    let d = crate::models::head::l2_normalize(&database.to_kind(Kind::Double));
    let k = TOPK.min(d.size()[0]);
    let (_, idx) = q.matmul(&d.tr()).topk(k, 1, true, true);
    (0..idx.size()[0])
        .map(|i| Ok(Vec::<i64>::try_from(idx.get(i))?))
        .collect()
}
