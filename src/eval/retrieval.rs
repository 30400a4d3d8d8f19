//! Image retrieval on the revisited Oxford and Paris data sets, as the official
//! `eval_image_retrieval.py` (from DINO) with the metric of the revisited protocol
//! (Radenović et al., `compute_map` of revisitop).
//!
//! On disk, as the official `OxfordParisDataset` reads it: `<data_path>/<dataset>/gnd_<dataset>.pkl`
//! (a pickled dict: `imlist` and `qimlist`, lists of image names, and `gnd`, one dict per query
//! with `bbx`, `easy`, `hard`, `junk`) and the images `<data_path>/<dataset>/jpg/<name>.jpg`.
//! The pickle is read by the `pytorch-reader` crate's unpickler, which never imports or calls
//! anything; lists, tuples, numbers and strings are all the ground truth holds.
//!
//! Each image (database and queries alike, batch size 1) is shrunk to fit `--imsize` (Pillow's
//! `thumbnail` size rule and its Lanczos filter), normalised, and its feature is the official
//! one (`--n_last_blocks`, `--avgpool_patchtokens`); with `--multiscale` the mean of the
//! features at scales 1, 1/√2 and 1/2 (bilinear `F.interpolate` of the normalised image) divided
//! by its norm. Features are L2-normalised, database images are ranked by cosine similarity for
//! every query, and mAP and mP@k (k = 1, 5, 10) are computed for the Medium (positives: easy +
//! hard) and Hard (positives: hard; easy ones ignored) protocols as the official script does,
//! plus Easy (positives: easy; hard ones ignored), the third setting of the revisited protocol.
//!
//! Differences from the official script, on purpose: queries are used whole as it does, but
//! `--query_bbox true` crops them to their bounding box first, as the revisited protocol
//! prescribes. Pillow's `thumbnail` also decodes large JPEGs at a reduced DCT scale and
//! box-reduces images over 4x the target before the Lanczos pass; neither is reproduced (an
//! image under 4x `--imsize` is resized exactly as Pillow does, a larger one very nearly).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use pytorch_reader::{PickleValue, PytorchReader};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::features::FeatureSpec;
use crate::data::ops::{self, Filter, Rgb8};
use crate::models::BackboneRef;

/// The data sets the official script accepts.
pub const DATASETS: &[&str] = &["roxford5k", "rparis6k"];

/// The `k` of mP@k in the official script.
pub const KS: [usize; 3] = [1, 5, 10];

/// Ground truth of one query.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueryGnd {
    /// `[x1, y1, x2, y2]` in pixels of the full-size query image.
    pub bbx: Option<[f64; 4]>,
    pub easy: Vec<i64>,
    pub hard: Vec<i64>,
    pub junk: Vec<i64>,
}

/// The content of `gnd_<dataset>.pkl`.
#[derive(Debug, Clone)]
pub struct Gnd {
    pub imlist: Vec<String>,
    pub qimlist: Vec<String>,
    pub gnd: Vec<QueryGnd>,
}

fn as_list<'a>(v: &'a PickleValue, what: &str) -> Result<&'a [PickleValue]> {
    match v {
        PickleValue::List(items) => Ok(items),
        PickleValue::Unsupported(t) => bail!(
            "{what} is a {t}, not a list (this reader takes the lists of the published \
             ground-truth files)"
        ),
        other => bail!("{what} is not a list: {}", short(other)),
    }
}

fn short(v: &PickleValue) -> String {
    let s = format!("{v:?}");
    if s.len() > 60 {
        format!("{}...", &s[..60])
    } else {
        s
    }
}

fn as_ints(v: &PickleValue, what: &str) -> Result<Vec<i64>> {
    as_list(v, what)?
        .iter()
        .map(|x| match x {
            PickleValue::Int(i) => Ok(*i),
            PickleValue::Float(f) if f.fract() == 0.0 => Ok(*f as i64),
            other => Err(anyhow!("{what} holds {}, not an image index", short(other))),
        })
        .collect()
}

fn as_strings(v: &PickleValue, what: &str) -> Result<Vec<String>> {
    as_list(v, what)?
        .iter()
        .map(|x| match x {
            PickleValue::String(s) => Ok(s.clone()),
            PickleValue::Bytes(b) => Ok(String::from_utf8_lossy(b).into_owned()),
            other => Err(anyhow!("{what} holds {}, not an image name", short(other))),
        })
        .collect()
}

/// Reads a revisited Oxford/Paris ground-truth pickle without running any of it.
pub fn read_gnd(path: &Path) -> Result<Gnd> {
    ensure!(
        path.is_file(),
        "ground-truth file {} not found (the revisited Oxford/Paris layout is \
         <data_path>/<dataset>/gnd_<dataset>.pkl with the images in <data_path>/<dataset>/jpg/)",
        path.display()
    );
    let root = PytorchReader::read_pickle_data(path, None)
        .map_err(|e| anyhow!("cannot read {} as a pickle: {e}", path.display()))?;
    let PickleValue::Dict(top) = &root else {
        bail!(
            "{}: expected a dict with imlist, qimlist and gnd",
            path.display()
        )
    };
    let get = |k: &str| {
        top.get(k)
            .with_context(|| format!("{} has no '{k}'", path.display()))
    };
    let imlist = as_strings(get("imlist")?, "imlist")?;
    let qimlist = as_strings(get("qimlist")?, "qimlist")?;
    let mut gnd = Vec::new();
    for (i, q) in as_list(get("gnd")?, "gnd")?.iter().enumerate() {
        let PickleValue::Dict(m) = q else {
            bail!("gnd[{i}] is not a dict")
        };
        let ints = |k: &str| -> Result<Vec<i64>> {
            match m.get(k) {
                Some(v) => as_ints(v, &format!("gnd[{i}]['{k}']")),
                None => Ok(Vec::new()),
            }
        };
        let bbx = match m.get("bbx") {
            None | Some(PickleValue::None) => None,
            Some(v) => {
                let xs = as_list(v, &format!("gnd[{i}]['bbx']"))?
                    .iter()
                    .map(|x| match x {
                        PickleValue::Int(i) => Ok(*i as f64),
                        PickleValue::Float(f) => Ok(*f),
                        other => Err(anyhow!("gnd[{i}]['bbx'] holds {}", short(other))),
                    })
                    .collect::<Result<Vec<f64>>>()?;
                ensure!(
                    xs.len() == 4,
                    "gnd[{i}]['bbx'] has {} numbers, not 4",
                    xs.len()
                );
                Some([xs[0], xs[1], xs[2], xs[3]])
            }
        };
        let q = QueryGnd {
            bbx,
            easy: ints("easy")?,
            hard: ints("hard")?,
            junk: ints("junk")?,
        };
        for (name, list) in [("easy", &q.easy), ("hard", &q.hard), ("junk", &q.junk)] {
            if let Some(bad) = list.iter().find(|&&j| j < 0 || j as usize >= imlist.len()) {
                bail!(
                    "{}: gnd[{i}]['{name}'] names image {bad}, but imlist has {} images",
                    path.display(),
                    imlist.len()
                );
            }
        }
        gnd.push(q);
    }
    ensure!(
        gnd.len() == qimlist.len(),
        "{}: {} queries in qimlist but {} ground-truth entries",
        path.display(),
        qimlist.len(),
        gnd.len()
    );
    Ok(Gnd {
        imlist,
        qimlist,
        gnd,
    })
}

/// The size Pillow's `Image.thumbnail((max, max))` gives a `w x h` image, or `None` when it
/// already fits (Pillow's `preserve_aspect_ratio`: the side that limits is set, the other
/// rounded, down or up, to the aspect ratio nearest the original, at least 1).
pub fn thumbnail_size(w: usize, h: usize, max: usize) -> Option<(usize, usize)> {
    if max >= w && max >= h {
        return None;
    }
    let (x, y) = (max as f64, max as f64);
    let aspect = w as f64 / h as f64;
    let round_aspect = |number: f64, key: &dyn Fn(f64) -> f64| -> usize {
        let (lo, hi) = (number.floor(), number.ceil());
        // Python's min() keeps the first of equal keys: the floor.
        let pick = if key(hi) < key(lo) { hi } else { lo };
        (pick as usize).max(1)
    };
    if x / y >= aspect {
        let nx = round_aspect(y * aspect, &|n| (aspect - n / y).abs());
        Some((nx, max))
    } else {
        let ny = round_aspect(x / aspect, &|n| {
            if n == 0.0 {
                0.0
            } else {
                (aspect - x / n).abs()
            }
        });
        Some((max, ny))
    }
}

/// `img.thumbnail((max, max), LANCZOS)` (see the module notes for what is not reproduced).
pub fn thumbnail(img: &Rgb8, max: usize) -> Rgb8 {
    match thumbnail_size(img.width, img.height, max) {
        None => img.clone(),
        Some((w, h)) if (w, h) == (img.width, img.height) => img.clone(),
        Some((w, h)) => ops::resize_lanczos(img, w, h),
    }
}

/// `img.crop(bbx)` as Pillow does for a float box: the corners rounded to whole pixels
/// (`round()`, halves to even), clipped to the image (Pillow pads outside with black; a box
/// leaving the image is refused here instead).
pub fn crop_bbx(img: &Rgb8, bbx: [f64; 4]) -> Result<Rgb8> {
    let r = |v: f64| v.round_ties_even() as i64;
    let (x1, y1, x2, y2) = (r(bbx[0]), r(bbx[1]), r(bbx[2]), r(bbx[3]));
    ensure!(
        x1 >= 0
            && y1 >= 0
            && x2 <= img.width as i64
            && y2 <= img.height as i64
            && x2 > x1
            && y2 > y1,
        "bounding box {bbx:?} does not lie inside the {}x{} query image",
        img.width,
        img.height
    );
    let (w, h) = ((x2 - x1) as usize, (y2 - y1) as usize);
    Ok(ops::resized_crop_with(
        img,
        y1 as usize,
        x1 as usize,
        h,
        w,
        h,
        w,
        Filter::Bicubic,
    ))
}

/// `Normalize(ToTensor(img))` as `[1, 3, H, W]`.
pub fn to_input(img: &Rgb8) -> Tensor {
    let mut buf = vec![0f32; 3 * img.width * img.height];
    ops::to_tensor_normalize_into(img, ops::IMAGENET_MEAN, ops::IMAGENET_STD, &mut buf);
    Tensor::from_slice(&buf).reshape([1, 3, img.height as i64, img.width as i64])
}

/// The three scales of the official multi-scale features.
pub fn scales() -> [f64; 3] {
    [1.0, 1.0 / 2f64.sqrt(), 0.5]
}

/// `F.interpolate(x, scale_factor=s, mode='bilinear', align_corners=False)` (output
/// `floor(H s) x floor(W s)`, the factor handed to the kernel as given); `x` itself for s = 1.
pub fn rescale(x: &Tensor, s: f64) -> Tensor {
    if s == 1.0 {
        return x.shallow_clone();
    }
    let (h, w) = (x.size()[2], x.size()[3]);
    let (oh, ow) = ((h as f64 * s).floor() as i64, (w as f64 * s).floor() as i64);
    x.upsample_bilinear2d([oh, ow], false, Some(s), Some(s))
}

/// The official feature of one normalised image `[1, 3, H, W]`: the image is cut to whole
/// patches at the bottom and right (what the official patch convolution does with the rest),
/// then `spec`'s tokens; with `multiscale`, the mean over [`scales`] divided by its norm.
pub fn image_feature<'a>(
    backbone: impl Into<BackboneRef<'a>>,
    x: &Tensor,
    spec: FeatureSpec,
    multiscale: bool,
) -> Result<Tensor> {
    let backbone = backbone.into();
    let patch = match backbone {
        BackboneRef::Vit(v) => v.cfg.patch_size,
        BackboneRef::Swin(_) => bail!(
            "eval-retrieval takes ViT backbones (as the official script): a Swin's windows are \
             fixed at the size it was built for, and query images come in any size"
        ),
    };
    let single = |x: &Tensor| -> Result<Tensor> {
        let (h, w) = (x.size()[2], x.size()[3]);
        let (ch, cw) = (h / patch * patch, w / patch * patch);
        ensure!(
            ch > 0 && cw > 0,
            "an image of {w}x{h} pixels is smaller than one {patch}-pixel patch (raise --imsize)"
        );
        spec.features_of(backbone, &x.narrow(2, 0, ch).narrow(3, 0, cw))
    };
    if !multiscale {
        return single(x);
    }
    let mut v: Option<Tensor> = None;
    for s in scales() {
        let f = single(&rescale(x, s))?;
        v = Some(match v {
            None => f,
            Some(acc) => acc + f,
        });
    }
    let v = v.context("no scales")? / 3.0;
    let n = v.norm();
    Ok(v / n)
}

/// What revisitop's `compute_map` returns: mAP, per-query AP (NaN for a query without
/// positives, which the means skip), mean precision at each k, and per-query precisions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapResult {
    pub map: f64,
    pub aps: Vec<f64>,
    pub mpr: Vec<f64>,
    pub prs: Vec<Vec<f64>>,
}

/// Average precision from the 0-based ranks of the positives, as the revisited protocol's
/// `compute_ap` (trapezoids of the precision-recall curve).
pub fn compute_ap(ranks: &[usize], nres: usize) -> f64 {
    let recall_step = 1.0 / nres as f64;
    let mut ap = 0.0;
    for (j, &rank) in ranks.iter().enumerate() {
        let precision_0 = if rank == 0 {
            1.0
        } else {
            j as f64 / rank as f64
        };
        let precision_1 = (j + 1) as f64 / (rank + 1) as f64;
        ap += (precision_0 + precision_1) * recall_step / 2.0;
    }
    ap
}

/// The revisited protocol's `compute_map`: `ranking[q]` lists the database indices in the
/// order retrieved for query `q`; `ok[q]` and `junk[q]` are its positives and the images to
/// ignore. Positions of positives are lowered by the number of junk images ranked before them.
pub fn compute_map(
    ranking: &[Vec<usize>],
    ok: &[Vec<i64>],
    junk: &[Vec<i64>],
    ks: &[usize],
) -> Result<MapResult> {
    let nq = ok.len();
    ensure!(
        ranking.len() == nq && junk.len() == nq,
        "compute_map: {} rankings, {} positive lists, {} junk lists",
        ranking.len(),
        nq,
        junk.len()
    );
    let mut aps = vec![f64::NAN; nq];
    let mut prs = vec![vec![f64::NAN; ks.len()]; nq];
    let (mut map, mut pr) = (0.0, vec![0.0; ks.len()]);
    let mut nempty = 0;
    for q in 0..nq {
        if ok[q].is_empty() {
            nempty += 1;
            continue;
        }
        let okset: std::collections::HashSet<i64> = ok[q].iter().copied().collect();
        let junkset: std::collections::HashSet<i64> = junk[q].iter().copied().collect();
        let mut pos: Vec<usize> = Vec::new();
        let mut jpos: Vec<usize> = Vec::new();
        for (r, &img) in ranking[q].iter().enumerate() {
            if okset.contains(&(img as i64)) {
                pos.push(r);
            }
            if junkset.contains(&(img as i64)) {
                jpos.push(r);
            }
        }
        let (mut k, mut ij) = (0, 0);
        for p in pos.iter_mut() {
            while ij < jpos.len() && *p > jpos[ij] {
                k += 1;
                ij += 1;
            }
            *p -= k;
        }
        ensure!(
            !pos.is_empty(),
            "query {q}: none of its positives is in the ranking"
        );
        let ap = compute_ap(&pos, ok[q].len());
        map += ap;
        aps[q] = ap;
        let maxpos = pos.iter().max().copied().unwrap_or(0) + 1;
        for (j, &kk) in ks.iter().enumerate() {
            let kq = maxpos.min(kk);
            let hits = pos.iter().filter(|&&p| p < kq).count(); // 1-based position <= kq
            prs[q][j] = hits as f64 / kq as f64;
            pr[j] += prs[q][j];
        }
    }
    let used = (nq - nempty) as f64;
    ensure!(
        used > 0.0,
        "no query has any positive image: mAP is undefined"
    );
    Ok(MapResult {
        map: map / used,
        aps,
        mpr: pr.iter().map(|p| p / used).collect(),
        prs,
    })
}

/// Database indices by decreasing similarity for every query, from `sim` `[n_db, n_q]`
/// (`torch.argsort(-sim, dim=0)` as the official script).
pub fn rankings(sim: &Tensor) -> Result<Vec<Vec<usize>>> {
    let ranks = (-sim).argsort(0, false).tr().contiguous();
    let nq = ranks.size()[0];
    (0..nq)
        .map(|q| {
            Ok(Vec::<i64>::try_from(ranks.get(q))?
                .into_iter()
                .map(|i| i as usize)
                .collect())
        })
        .collect()
}

/// Settings of `ibot eval-retrieval`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetrievalConfig {
    pub data_path: PathBuf,
    pub dataset: String,
    pub spec: FeatureSpec,
    pub multiscale: bool,
    /// Longest side after `thumbnail` (None: images as they are).
    pub imsize: Option<usize>,
    pub query_bbox: bool,
    pub num_workers: usize,
}

/// One protocol's numbers (in [0, 1], as `compute_map` returns them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProtocolResult {
    pub map: f64,
    /// mP@k for k in [`KS`].
    pub mp_at_k: Vec<f64>,
}

/// The outcome of a retrieval evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetrievalResult {
    pub dataset: String,
    pub database_images: usize,
    pub queries: usize,
    pub easy: ProtocolResult,
    pub medium: ProtocolResult,
    pub hard: ProtocolResult,
}

/// The revisited protocols (`E`, `M`, `H`) of rankings `ranking` against `gnd`.
pub fn evaluate(ranking: &[Vec<usize>], gnd: &[QueryGnd]) -> Result<[ProtocolResult; 3]> {
    let cat = |a: &[i64], b: &[i64]| -> Vec<i64> { a.iter().chain(b).copied().collect() };
    let run = |ok: Vec<Vec<i64>>, junk: Vec<Vec<i64>>| -> Result<ProtocolResult> {
        let r = compute_map(ranking, &ok, &junk, &KS)?;
        Ok(ProtocolResult {
            map: r.map,
            mp_at_k: r.mpr,
        })
    };
    let easy = run(
        gnd.iter().map(|g| g.easy.clone()).collect(),
        gnd.iter().map(|g| cat(&g.junk, &g.hard)).collect(),
    )?;
    let medium = run(
        gnd.iter().map(|g| cat(&g.easy, &g.hard)).collect(),
        gnd.iter().map(|g| g.junk.clone()).collect(),
    )?;
    let hard = run(
        gnd.iter().map(|g| g.hard.clone()).collect(),
        gnd.iter().map(|g| cat(&g.junk, &g.easy)).collect(),
    )?;
    Ok([easy, medium, hard])
}

/// L2-normalised features `[n, D]` of the named images (`<dir>/<name>.jpg`), one at a time as
/// the official loader (batch size 1), decoding on `workers` threads ahead of the model.
fn features_of_list<'a>(
    backbone: BackboneRef<'a>,
    dir: &Path,
    names: &[String],
    bbxs: Option<&[QueryGnd]>,
    cfg: &RetrievalConfig,
    device: Device,
    what: &str,
) -> Result<Tensor> {
    let bar = crate::util::progress_bar(names.len() as u64, what);
    let mut feats = Vec::with_capacity(names.len());
    let workers = cfg.num_workers.max(1);
    for (c, chunk) in names.chunks(workers * 4).enumerate() {
        let imgs: Vec<Result<Rgb8>> = std::thread::scope(|scope| {
            let per = chunk.len().div_ceil(workers);
            let jobs: Vec<_> = chunk
                .chunks(per)
                .enumerate()
                .map(|(t, part)| {
                    scope.spawn(move || {
                        part.iter()
                            .enumerate()
                            .map(|(k, name)| {
                                let i = c * workers * 4 + t * per + k;
                                let path = dir.join(format!("{name}.jpg"));
                                let mut img = crate::data::dataset::load_rgb(&path)?;
                                if let Some(g) = bbxs.and_then(|b| b.get(i)).and_then(|g| g.bbx) {
                                    img = crop_bbx(&img, g)
                                        .with_context(|| format!("query {}", path.display()))?;
                                }
                                if let Some(m) = cfg.imsize {
                                    img = thumbnail(&img, m);
                                }
                                Ok(img)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            jobs.into_iter()
                .flat_map(|j| {
                    j.join()
                        .unwrap_or_else(|_| vec![Err(anyhow!("an image worker panicked"))])
                })
                .collect()
        });
        for img in imgs {
            let img = img?;
            let x = to_input(&img).to_device(device);
            let f = image_feature(backbone, &x, cfg.spec, cfg.multiscale)?;
            feats.push(f.to_kind(Kind::Float).to_device(Device::Cpu));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(crate::models::head::l2_normalize(&Tensor::cat(&feats, 0)))
}

/// Runs the evaluation; returns the numbers and the (normalised) database and query features.
pub fn run<'a>(
    cfg: &RetrievalConfig,
    backbone: impl Into<BackboneRef<'a>>,
    device: Device,
) -> Result<(RetrievalResult, Tensor, Tensor)> {
    ensure!(
        DATASETS.contains(&cfg.dataset.as_str()),
        "--dataset must be one of {DATASETS:?}, not '{}'",
        cfg.dataset
    );
    let backbone = backbone.into();
    cfg.spec.validate_for(backbone)?;
    let root = cfg.data_path.join(&cfg.dataset);
    let gnd = read_gnd(&root.join(format!("gnd_{}.pkl", cfg.dataset)))?;
    let kmax = KS[KS.len() - 1];
    ensure!(
        gnd.imlist.len() >= kmax,
        "the database holds {} images, fewer than the {kmax} that mP@{kmax} ranks",
        gnd.imlist.len()
    );
    ensure!(!gnd.qimlist.is_empty(), "the ground truth has no queries");
    let images = root.join("jpg");
    ensure!(
        images.is_dir(),
        "{} is missing: the images go to <data_path>/{}/jpg/<name>.jpg",
        images.display(),
        cfg.dataset
    );
    let db = features_of_list(
        backbone,
        &images,
        &gnd.imlist,
        None,
        cfg,
        device,
        "database",
    )?;
    let q = features_of_list(
        backbone,
        &images,
        &gnd.qimlist,
        cfg.query_bbox.then_some(&gnd.gnd[..]),
        cfg,
        device,
        "queries",
    )?;
    let sim = db.matmul(&q.tr());
    let ranking = rankings(&sim)?;
    let [easy, medium, hard] = evaluate(&ranking, &gnd.gnd)?;
    Ok((
        RetrievalResult {
            dataset: cfg.dataset.clone(),
            database_images: gnd.imlist.len(),
            queries: gnd.qimlist.len(),
            easy,
            medium,
            hard,
        },
        db,
        q,
    ))
}
