//! Dense patch correspondences between two images, as the official
//! `analysis/correspondence/visualize_correspondence.py` finds and draws them.
//!
//! Both images go through the backbone; every patch token of the first image is matched to the
//! patch token of the second with the largest dot product (the final-norm tokens, not
//! normalised: `bmm(x1, x2^T).max(-1)`). The pairs drawn are those of the `topk` patches of the
//! first image that the [CLS] token attends to most (the last block's attention averaged over
//! heads, brought to the patch grid by nearest resizing), joined by red lines to their matches,
//! the two images side by side (with `show_with_attn`, the attention map in front).
//!
//! Pairs come from the same class of an image folder (`class`: consecutive images of a class
//! in batches of `batch_size`, each matched with the next in its batch, as the official
//! `CustomBatchSampler` with `torch.roll`) or are two augmented views of one image
//! (`instance`: the official crops, flips and colour changes). In `instance` mode the crops'
//! corners say where every patch really lies in the original image: only the patches of the
//! first view whose centre lies inside the second view count, and a match is correct when it is
//! within `eval_radius` patches (rows and columns) of the patch of the second view whose centre
//! is nearest to its own; the accuracy of a batch is correct matches / overlapping patches, and
//! the reported accuracy is the mean over batches, as the official script prints it.
//!
//! Where this differs from the official script, on purpose: the attention comes from the model
//! being analysed, or from `attn_weights` (the official script always downloads DINO's ViT-B/8
//! for it); the overlap grid is the model's own (the official code hard-codes 14x14);
//! `instance` mode runs over the whole data set for the accuracy while it draws the first
//! `show_nums` pairs (the official script exits after drawing them, before printing it);
//! `mutual` optionally keeps only mutual nearest neighbours (not in the official script).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::data::augment::{color_jitter, random_resized_crop_params, AugmentConfig};
use crate::data::dataset::Dataset;
use crate::data::ops::{self, Filter, Rgb8};
use crate::models::VisionTransformer;

/// How pairs are formed (`--sample_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleType {
    /// Two images of the same class.
    Class,
    /// Two augmented views of one image.
    Instance,
}

impl SampleType {
    pub fn name(self) -> &'static str {
        match self {
            Self::Class => "class",
            Self::Instance => "instance",
        }
    }
}

/// Options of `ibot correspondence` (the official script's names and defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CorrespondenceConfig {
    pub img_size: usize,
    pub topk: usize,
    pub show_pics: bool,
    pub show_with_attn: bool,
    pub show_nums: usize,
    pub sample_type: SampleType,
    pub eval_radius: i64,
    pub batch_size: usize,
    pub output_path: PathBuf,
    pub mutual: bool,
    pub seed: u64,
}

/// Matches of one batch of pairs.
#[derive(Debug)]
pub struct BatchMatches {
    /// For every patch of image 1, its best patch of image 2, `[B, N]`, and the dot product.
    pub index: Tensor,
    pub value: Tensor,
    /// Mean attention over heads on the attention model's grid, `[B, ga, ga]` (masked by the
    /// overlap in instance mode), as the first panel shows it.
    pub attention: Tensor,
    /// Mean attention over heads on the model's patch grid, `[B, N]` (masked likewise): the
    /// score that picks the patches drawn.
    pub attention1: Tensor,
    /// Per pair: the top-k patches of image 1 and their matches in image 2.
    pub points: Vec<(Vec<i64>, Vec<i64>)>,
    /// Instance mode: overlapping patches `[B, N]` and the true nearest patch `[B, N]`.
    pub overlap: Option<Tensor>,
    pub real_index: Option<Tensor>,
    /// Instance mode with any overlap: correct matches / overlapping patches of the batch.
    pub accuracy: Option<f64>,
}

/// Centres of the `unit x unit` patches of a crop, in units of the original image's height and
/// width, `[unit*unit, 2]` (y, x) float64: the official
/// `np.linspace(corner[0], corner[2], 2*unit+1)[1::2]` rows by the same of the columns.
/// `corner` is `[top, left, bottom, right]` / image size, left and right swapped for a flip.
pub fn patch_centres(corner: [f64; 4], unit: i64) -> Tensor {
    // numpy's linspace: k * ((stop - start) / (num - 1)) + start.
    let lin = |a: f64, b: f64| -> Vec<f64> {
        let step = (b - a) / (2 * unit) as f64;
        (0..unit).map(|i| (2 * i + 1) as f64 * step + a).collect()
    };
    let (ys, xs) = (lin(corner[0], corner[2]), lin(corner[1], corner[3]));
    let mut v = Vec::with_capacity((unit * unit * 2) as usize);
    for y in &ys {
        for x in &xs {
            v.push(*y);
            v.push(*x);
        }
    }
    Tensor::from_slice(&v).reshape([unit * unit, 2])
}

/// The official matching of a batch: `x1`, `x2` are the patch tokens `[B, N, D]` of the two
/// images (N = unit²), `attn` the attention model's last-block attention on image 1
/// (`[B, heads, 1 + ga², 1 + ga²]`), `corners` (instance mode) the crops' corners `[B, 4]`
/// float64 of views 1 and 2. `patch` and `img_size` give the overlap tolerance
/// (`patch // 2 / img_size`).
#[allow(clippy::too_many_arguments)]
pub fn match_batch(
    x1: &Tensor,
    x2: &Tensor,
    attn: &Tensor,
    corners: Option<(&Tensor, &Tensor)>,
    topk: usize,
    eval_radius: i64,
    patch: usize,
    img_size: usize,
    mutual: bool,
) -> Result<BatchMatches> {
    let (b, n) = match x1.size()[..] {
        [b, n, _] => (b, n),
        ref s => bail!("patch tokens must be [B, N, D], not {s:?}"),
    };
    ensure!(
        x2.size() == x1.size(),
        "the two images' tokens differ in shape"
    );
    let unit = (n as f64).sqrt().round() as i64;
    ensure!(unit * unit == n, "{n} patch tokens are not a square grid");
    let asz = attn.size();
    ensure!(
        asz.len() == 4 && asz[0] == b && asz[2] == asz[3],
        "attention of shape {asz:?} does not fit a batch of {b}"
    );
    let na = asz[2] - 1;
    let ga = (na as f64).sqrt().round() as i64;
    ensure!(
        ga * ga == na,
        "the attention model's {na} patches are not a square grid"
    );
    ensure!(
        (1..=n as usize).contains(&topk),
        "--topk {topk} must be between 1 and the {n} patches of an image"
    );
    let heads = asz[1];
    let mut attentions = attn
        .select(2, 0)
        .narrow(2, 1, na)
        .reshape([b, heads, ga, ga])
        .to_kind(Kind::Float);
    let mut attentions1 = attentions.upsample_nearest2d([unit, unit], None, None);

    let (overlap, real_index) = match corners {
        None => (None, None),
        Some((c1, c2)) => {
            let pos = |c: &Tensor| -> Result<Tensor> {
                let v = Vec::<f64>::try_from(c.to_kind(Kind::Double).flatten(0, -1))?;
                ensure!(v.len() == 4 * b as usize, "corners must be [B, 4]");
                Ok(Tensor::stack(
                    &v.chunks(4)
                        .map(|k| patch_centres([k[0], k[1], k[2], k[3]], unit))
                        .collect::<Vec<_>>(),
                    0,
                ))
            };
            let (pos1, pos2) = (pos(c1)?, pos(c2)?); // [B, N, 2]
            let eps = (patch / 2) as f64 / img_size as f64;
            let lo = pos2.min_dim(1, true).0;
            let hi = pos2.max_dim(1, true).0;
            let ovlp = (&pos1 + eps)
                .gt_tensor(&lo)
                .all_dim(-1, false)
                .logical_and(&(&pos1 - eps).lt_tensor(&hi).all_dim(-1, false)); // [B, N]
            let sim = pos1.matmul(&pos2.permute([0, 2, 1]));
            let dst = pos1
                .square()
                .sum_dim_intlist(Some(&[2i64][..]), true, Kind::Double)
                + pos2.permute([0, 2, 1]).square().sum_dim_intlist(
                    Some(&[1i64][..]),
                    true,
                    Kind::Double,
                )
                - sim * 2.0;
            let real = dst.min_dim(2, false).1;
            let o = ovlp.view([-1, 1, unit, unit]).to_kind(Kind::Float);
            attentions1 = attentions1 * &o;
            attentions = attentions * o.upsample_nearest2d([ga, ga], None, None);
            (Some(ovlp), Some(real))
        }
    };
    let attentions = attentions.mean_dim(Some(&[1i64][..]), false, Kind::Float);
    let attentions1 = attentions1
        .mean_dim(Some(&[1i64][..]), false, Kind::Float)
        .reshape([b, n]);

    let sim = x1
        .to_kind(Kind::Float)
        .bmm(&x2.to_kind(Kind::Float).permute([0, 2, 1]));
    let (value, index) = sim.max_dim(-1, false);
    let accuracy = match (&overlap, &real_index) {
        (Some(ovlp), Some(real)) => {
            let (ih, iw) = (
                index.divide_scalar_mode(unit, "floor"),
                index.remainder(unit),
            );
            let (rh, rw) = (real.divide_scalar_mode(unit, "floor"), real.remainder(unit));
            let hit = (ih - rh)
                .abs()
                .le(eval_radius)
                .logical_and(&(iw - rw).abs().le(eval_radius))
                .logical_and(ovlp);
            let total = ovlp.sum(Kind::Int64).int64_value(&[]);
            (total > 0).then(|| hit.sum(Kind::Int64).int64_value(&[]) as f64 / total as f64)
        }
        _ => None,
    };
    let score = if mutual {
        // Mutual nearest neighbours: patch i of image 1 whose match j has i as its own best.
        let back = sim.max_dim(-2, false).1; // [B, N] over image 2's patches
        let round_trip = back.gather(1, &index, false);
        let me = Tensor::arange(n, (Kind::Int64, Device::Cpu)).expand([b, n], false);
        attentions1.where_self(&round_trip.eq_tensor(&me), &Tensor::from(f32::NEG_INFINITY))
    } else {
        attentions1.shallow_clone()
    };
    let mut points = Vec::with_capacity(b as usize);
    for i in 0..b {
        let (top_v, top_i) = score.get(i).topk(topk as i64, -1, true, true);
        let keep = top_v.isfinite();
        let p1 = top_i.masked_select(&keep);
        let p2 = index.get(i).index_select(0, &p1);
        points.push((Vec::<i64>::try_from(p1)?, Vec::<i64>::try_from(p2)?));
    }
    Ok(BatchMatches {
        index,
        value,
        attention: attentions,
        attention1: attentions1,
        points,
        overlap,
        real_index,
        accuracy,
    })
}

/// The picture of one pair: the two display images side by side (with `attn_heat`, the
/// attention map's picture first), a red line from the centre of each of `points.0` in image
/// 1 to the centre of its match `points.1` in image 2.
pub fn pair_picture(
    im1: &Rgb8,
    im2: &Rgb8,
    attn_heat: Option<&Rgb8>,
    points: &(Vec<i64>, Vec<i64>),
    patch: usize,
) -> Rgb8 {
    let s = im1.width;
    let mut panels: Vec<Rgb8> = attn_heat.into_iter().cloned().collect();
    let off = panels.len() as i64 * s as i64;
    panels.push(im1.clone());
    panels.push(im2.clone());
    let mut pic = super::side_by_side(&panels);
    let unit = (s / patch) as i64;
    let p = patch as f64;
    for (&a, &b) in points.0.iter().zip(&points.1) {
        let centre = |k: i64| ((k % unit) as f64 + 0.5, (k / unit) as f64 + 0.5);
        let ((ax, ay), (bx, by)) = (centre(a), centre(b));
        super::draw_line(
            &mut pic,
            ((ax * p) as i64 + off, (ay * p) as i64),
            ((bx * p) as i64 + off + s as i64, (by * p) as i64),
            [255, 0, 0],
        );
    }
    pic
}

/// The pixel where a line starts or ends for patch `k` of a `unit`-wide grid in the panel
/// that begins at `panel_x`: the patch centre, as [`pair_picture`] draws it.
pub fn patch_centre_pixel(k: i64, unit: i64, patch: usize, panel_x: usize) -> (usize, usize) {
    let p = patch as f64;
    (
        (((k % unit) as f64 + 0.5) * p) as usize + panel_x,
        (((k / unit) as f64 + 0.5) * p) as usize,
    )
}

/// `Resize((size, size))` (Pillow bilinear, torchvision's default), the view of `class` mode.
pub fn class_view(img: &Rgb8, size: usize) -> Rgb8 {
    ops::resized_crop_with(
        img,
        0,
        0,
        img.height,
        img.width,
        size,
        size,
        Filter::Bilinear,
    )
}

/// One augmented view of `instance` mode and its corner `[top, left, bottom, right]` as
/// fractions of the image (left and right swapped when flipped): RandomResizedCrop(size,
/// scale 0.4..1, bicubic), flip with p 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8,
/// grayscale with p 0.2.
pub fn instance_view(img: &Rgb8, size: usize, rng: &mut impl Rng) -> (Rgb8, [f64; 4]) {
    let cfg = AugmentConfig::default();
    let (h, w) = (img.height as f64, img.width as f64);
    let (i, j, ch, cw) =
        random_resized_crop_params(img.height, img.width, (0.4, 1.0), cfg.ratio, rng);
    let mut out = ops::resized_crop(img, i, j, ch, cw, size, size);
    let mut corner = [
        i as f64 / h,
        j as f64 / w,
        (i + ch) as f64 / h,
        (j + cw) as f64 / w,
    ];
    if rng.gen::<f64>() < 0.5 {
        ops::hflip_in_place(&mut out);
        corner.swap(1, 3);
    }
    if rng.gen::<f64>() < cfg.jitter_p {
        color_jitter(&mut out, &cfg, rng);
    }
    if rng.gen::<f64>() < cfg.grayscale_p {
        ops::grayscale_in_place(&mut out);
    }
    (out, corner)
}

fn normalised(imgs: &[&Rgb8]) -> Tensor {
    let (w, h) = (imgs[0].width, imgs[0].height);
    let mut pix = vec![0f32; imgs.len() * 3 * w * h];
    for (img, out) in imgs.iter().zip(pix.chunks_mut(3 * w * h)) {
        ops::to_tensor_normalize_into(img, ops::IMAGENET_MEAN, ops::IMAGENET_STD, out);
    }
    Tensor::from_slice(&pix).reshape([imgs.len() as i64, 3, h as i64, w as i64])
}

/// The batches of dataset indices of `class` mode: the images of each class in order, cut
/// into batches of `batch_size` (an incomplete batch at the end of a class is dropped, as
/// `drop_last=True`), the batches shuffled.
pub fn class_batches(labels: &[i64], batch_size: usize, rng: &mut impl Rng) -> Vec<Vec<usize>> {
    let mut by_class: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
    for (i, &l) in labels.iter().enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    let mut all: Vec<Vec<usize>> = by_class
        .values()
        .flat_map(|v| v.chunks_exact(batch_size).map(|c| c.to_vec()))
        .collect();
    rand::seq::SliceRandom::shuffle(&mut all[..], rng);
    all
}

/// One drawn pair, as listed in `correspondence.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairRecord {
    pub file: Option<String>,
    pub image1: usize,
    pub image2: usize,
    pub class: i64,
    /// Patches of image 1 (row-major on the patch grid) and their matches in image 2.
    pub points1: Vec<i64>,
    pub points2: Vec<i64>,
}

/// What a run found (also written to `<output_path>/correspondence.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CorrespondenceReport {
    pub sample_type: SampleType,
    pub pairs: Vec<PairRecord>,
    /// Instance mode: the mean over batches of each batch's matching accuracy.
    pub accuracy: Option<f64>,
    pub batches_scored: usize,
}

/// Runs the official loop over `ds` with `net` (patch tokens) and `attn_net` (attention).
pub fn run(
    cfg: &CorrespondenceConfig,
    net: &VisionTransformer,
    attn_net: &VisionTransformer,
    ds: &dyn Dataset,
    device: Device,
) -> Result<CorrespondenceReport> {
    let s = cfg.img_size;
    let patch = net.cfg.patch_size as usize;
    let pa = attn_net.cfg.patch_size as usize;
    ensure!(
        s >= patch && s % patch == 0,
        "--img_size {s} must be a whole number of the model's {patch}-pixel patches (at least one)"
    );
    ensure!(
        s % pa == 0,
        "--img_size {s} must be a multiple of the attention model's patch size {pa}"
    );
    ensure!(cfg.batch_size >= 1, "--batch_size must be at least 1");
    if cfg.sample_type == SampleType::Class {
        ensure!(
            cfg.batch_size >= 2,
            "--sample_type class pairs the images of a batch: --batch_size must be at least 2"
        );
    }
    let n = (s / patch) * (s / patch);
    ensure!(
        (1..=n).contains(&cfg.topk),
        "--topk {} must be between 1 and the {n} patches of a {s}-pixel image",
        cfg.topk
    );
    ensure!(!ds.is_empty(), "the data set has no images");
    if cfg.show_pics {
        std::fs::create_dir_all(&cfg.output_path)
            .with_context(|| format!("creating {}", cfg.output_path.display()))?;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let labels: Vec<i64> = (0..ds.len()).map(|i| ds.label(i)).collect();
    let batches: Vec<Vec<usize>> = match cfg.sample_type {
        SampleType::Class => {
            ensure!(
                labels.iter().all(|&l| l >= 0),
                "--sample_type class pairs images of the same class: the data set needs class \
                 sub-folders (use --sample_type instance for a flat folder)"
            );
            let b = class_batches(&labels, cfg.batch_size, &mut rng);
            ensure!(
                !b.is_empty(),
                "no class has --batch_size {} images, so no pair can be formed",
                cfg.batch_size
            );
            b
        }
        SampleType::Instance => {
            let mut order: Vec<usize> = (0..ds.len()).collect();
            rand::seq::SliceRandom::shuffle(&mut order[..], &mut rng);
            order.chunks(cfg.batch_size).map(|c| c.to_vec()).collect()
        }
    };
    let bar = crate::util::progress_bar(batches.len() as u64, "correspondence");
    let (mut pairs, mut accs) = (Vec::new(), Vec::new());
    let mut cnt = 0usize;
    for batch in &batches {
        if cfg.sample_type == SampleType::Class && cnt >= cfg.show_nums {
            break;
        }
        let mut views1 = Vec::new();
        let mut views2 = Vec::new();
        let mut c1 = Vec::new();
        let mut c2 = Vec::new();
        for &i in batch {
            let (img, _) = ds.get(i)?;
            match cfg.sample_type {
                SampleType::Class => views1.push(class_view(&img, s)),
                SampleType::Instance => {
                    let mut r = ChaCha8Rng::seed_from_u64(
                        cfg.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    );
                    let (a, ca) = instance_view(&img, s, &mut r);
                    let (b, cb) = instance_view(&img, s, &mut r);
                    views1.push(a);
                    views2.push(b);
                    c1.extend(ca);
                    c2.extend(cb);
                }
            }
        }
        let img1 = normalised(&views1.iter().collect::<Vec<_>>());
        let (img2, pair_of): (Tensor, Vec<usize>) = match cfg.sample_type {
            // torch.cat([img[1:], img[0:1]]): each image with the next one of its batch.
            SampleType::Class => {
                let k = img1.size()[0];
                (
                    Tensor::cat(&[img1.narrow(0, 1, k - 1), img1.narrow(0, 0, 1)], 0),
                    (0..batch.len())
                        .map(|j| batch[(j + 1) % batch.len()])
                        .collect(),
                )
            }
            SampleType::Instance => (
                normalised(&views2.iter().collect::<Vec<_>>()),
                batch.clone(),
            ),
        };
        let (x1, x2, attn) = tch::no_grad(|| -> Result<_> {
            let t1 = net.forward(&img1.to_device(device), None, false)?;
            let t2 = net.forward(&img2.to_device(device), None, false)?;
            let a = attn_net.get_last_selfattention(&img1.to_device(device))?;
            Ok((
                t1.narrow(1, 1, t1.size()[1] - 1).to_device(Device::Cpu),
                t2.narrow(1, 1, t2.size()[1] - 1).to_device(Device::Cpu),
                a.to_device(Device::Cpu),
            ))
        })?;
        let corners = (cfg.sample_type == SampleType::Instance).then(|| {
            (
                Tensor::from_slice(&c1).reshape([-1, 4]),
                Tensor::from_slice(&c2).reshape([-1, 4]),
            )
        });
        let m = match_batch(
            &x1,
            &x2,
            &attn,
            corners.as_ref().map(|(a, b)| (a, b)),
            cfg.topk,
            cfg.eval_radius,
            patch,
            s,
            cfg.mutual,
        )?;
        if let Some(a) = m.accuracy {
            accs.push(a);
        }
        if cfg.show_pics {
            for (j, &i) in batch.iter().enumerate() {
                if cnt >= cfg.show_nums {
                    break;
                }
                let im1 = super::display_image(&img1.get(j as i64))?;
                let im2 = super::display_image(&img2.get(j as i64))?;
                let heat = if cfg.show_with_attn {
                    Some(super::attention::heat_map(&m.attention.get(j as i64), pa)?)
                } else {
                    None
                };
                let pic = pair_picture(&im1, &im2, heat.as_ref(), &m.points[j], patch);
                let name = format!(
                    "{}_corresp{cnt}_cls{}_nh0.png",
                    cfg.sample_type.name(),
                    labels[i]
                );
                super::save_png(&pic, &cfg.output_path.join(&name))?;
                pairs.push(PairRecord {
                    file: Some(name),
                    image1: i,
                    image2: pair_of[j],
                    class: labels[i],
                    points1: m.points[j].0.clone(),
                    points2: m.points[j].1.clone(),
                });
                cnt += 1;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let report = CorrespondenceReport {
        sample_type: cfg.sample_type,
        pairs,
        accuracy: (!accs.is_empty()).then(|| accs.iter().sum::<f64>() / accs.len() as f64),
        batches_scored: accs.len(),
    };
    if cfg.show_pics {
        write_report(&report, &cfg.output_path)?;
    }
    Ok(report)
}

fn write_report(r: &CorrespondenceReport, dir: &Path) -> Result<()> {
    crate::util::atomic_write(
        &dir.join("correspondence.json"),
        serde_json::to_string_pretty(r)?.as_bytes(),
    )
}
