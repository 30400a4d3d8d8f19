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
//! [`run`] reads DAVIS-2017 as the official script (`ImageSets/2017/val.txt`,
//! `JPEGImages/480p/<video>/*.jpg`, the first frame's `Annotations/480p/<video>/<frame>.png`),
//! resizes frames as its `read_frame` (shorter side 480, the other cut to a multiple of 64) and
//! writes `<output_dir>/<video>/<frame>.png` palette PNGs (the DAVIS palette) at the original
//! frame size, which the DAVIS evaluation toolkit reads. The propagation is checked against
//! the official functions in PyTorch (`tests/protocols.rs`); the frame resize is bilinear like
//! OpenCV's `INTER_LINEAR` but not its fixed-point arithmetic, so features differ slightly from
//! the official ones (OpenCV is not used).

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
    let tar = feat_tar
        / feat_tar
            .norm_scalaropt_dim(2.0, [1i64], true)
            .clamp_min(1e-12);
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
    labels
        .one_hot(n)
        .permute([2, 0, 1])
        .unsqueeze(0)
        .to_kind(Kind::Float)
}

/// The DAVIS palette (the PASCAL VOC colour map the official script downloads as UVC's
/// `palette.txt`): colour i spreads the bits of i over the high bits of R, G and B.
pub fn davis_palette() -> Vec<u8> {
    let mut p = Vec::with_capacity(256 * 3);
    for i in 0..256u32 {
        let (mut r, mut g, mut b, mut c) = (0u8, 0u8, 0u8, i);
        for j in 0..8 {
            r |= (((c >> 0) & 1) as u8) << (7 - j);
            g |= (((c >> 1) & 1) as u8) << (7 - j);
            b |= (((c >> 2) & 1) as u8) << (7 - j);
            c >>= 3;
        }
        p.extend([r, g, b]);
    }
    p
}

/// Writes `labels` (`[H, W]` class indices < 256) as an indexed PNG with `palette`
/// (`imwrite_indexed`), atomically.
pub fn write_indexed_png(
    path: &std::path::Path,
    labels: &[u8],
    w: usize,
    h: usize,
    palette: &[u8],
) -> Result<()> {
    ensure!(
        labels.len() == w * h,
        "label map of {} values for {w}x{h}",
        labels.len()
    );
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, w as u32, h as u32);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(palette.to_vec());
        let mut wr = enc.write_header()?;
        wr.write_image_data(labels)?;
    }
    crate::util::atomic_write(path, &buf)
}

/// Reads an indexed (palette) PNG's indices `[H, W]`, as PIL's `np.asarray(Image.open(...))`
/// of a DAVIS annotation. Gray 8-bit PNGs are taken as indices too.
pub fn read_indexed_png(path: &std::path::Path) -> Result<(Vec<u8>, usize, usize)> {
    use anyhow::Context;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(f));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut r = dec
        .read_info()
        .with_context(|| format!("{} is not a PNG", path.display()))?;
    let info = r.info();
    ensure!(
        matches!(
            info.color_type,
            png::ColorType::Indexed | png::ColorType::Grayscale
        ) && info.bit_depth == png::BitDepth::Eight,
        "{}: annotations must be 8-bit palette (or gray) PNGs, not {:?} {:?}",
        path.display(),
        info.color_type,
        info.bit_depth
    );
    let (w, h) = (info.width as usize, info.height as usize);
    let mut buf = vec![0; r.output_buffer_size().context("PNG too large")?];
    let frame = r.next_frame(&mut buf)?;
    buf.truncate(frame.buffer_size());
    ensure!(
        buf.len() == w * h,
        "{}: unexpected PNG layout",
        path.display()
    );
    Ok((buf, w, h))
}

/// Pillow's `resize(..., NEAREST)` of a `w x h` index map to `ow x oh`: the source of output
/// pixel x is `floor((x + 0.5) w / ow)`.
pub fn resize_nearest(src: &[u8], w: usize, h: usize, ow: usize, oh: usize) -> Vec<u8> {
    let (sx, sy) = (w as f64 / ow as f64, h as f64 / oh as f64);
    let mut out = Vec::with_capacity(ow * oh);
    for y in 0..oh {
        let yy = (((y as f64 + 0.5) * sy) as usize).min(h - 1);
        for x in 0..ow {
            let xx = (((x as f64 + 0.5) * sx) as usize).min(w - 1);
            out.push(src[yy * w + xx]);
        }
    }
    out
}

/// `read_frame`'s size for an `ori_w x ori_h` frame and scale 480: the shorter side 480, the
/// other scaled and cut down to a multiple of 64. Returns `(tw, th)`.
pub fn frame_size(ori_w: usize, ori_h: usize, scale: usize) -> (usize, usize) {
    if ori_h > ori_w {
        let th = scale as f64 * ori_h as f64 / ori_w as f64;
        (scale, ((th / 64.0).floor() * 64.0) as usize)
    } else {
        let tw = scale as f64 * ori_w as f64 / ori_h as f64;
        (((tw / 64.0).floor() * 64.0) as usize, scale)
    }
}

/// `read_frame`: the frame resized to `tw x th` (bilinear, as OpenCV's `INTER_LINEAR` but
/// without its 11-bit fixed-point rounding), scaled to [0, 1] and normalised with the official
/// `color_normalize` (mean 0.485/0.456/0.406, std 0.228/0.224/0.225): `[1, 3, th, tw]`.
pub fn read_frame(img: &crate::data::ops::Rgb8, tw: usize, th: usize) -> Tensor {
    let x = Tensor::from_slice(&img.data)
        .reshape([img.height as i64, img.width as i64, 3])
        .permute([2, 0, 1])
        .unsqueeze(0)
        .to_kind(Kind::Float)
        / 255.0;
    let x = if (tw, th) == (img.width, img.height) {
        x
    } else {
        x.upsample_bilinear2d([th as i64, tw as i64], false, None, None)
    };
    let mean = Tensor::from_slice(&[0.485f32, 0.456, 0.406]).reshape([1, 3, 1, 1]);
    let std = Tensor::from_slice(&[0.228f32, 0.224, 0.225]).reshape([1, 3, 1, 1]);
    (x - mean) / std
}

/// Settings of `ibot eval-video-seg`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VideoSegConfig {
    pub data_path: std::path::PathBuf,
    pub output_dir: std::path::PathBuf,
    pub propagation: PropagationConfig,
}

/// Patch features `[h w, dim]` of the last block (normed, [CLS] dropped) of a frame.
fn frame_features(vit: &crate::models::VisionTransformer, x: &Tensor) -> Result<Tensor> {
    let _g = tch::no_grad_guard();
    let t = vit
        .intermediate_tokens(x, 1, true)?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no block output"))?;
    let n = t.size()[1] - 1;
    Ok(t.get(0).narrow(0, 1, n).to_device(tch::Device::Cpu))
}

/// Segments every video of `ImageSets/2017/val.txt` into `<output_dir>/<video>/<frame>.png`.
pub fn run(
    cfg: &VideoSegConfig,
    backbone: &crate::models::Backbone,
    device: tch::Device,
) -> Result<usize> {
    use anyhow::{bail, Context};
    let Some(vit) = backbone.as_vit() else {
        bail!("eval-video-seg takes ViT backbones (as the official script)")
    };
    let patch = vit.cfg.patch_size;
    let list = cfg.data_path.join("ImageSets/2017/val.txt");
    let videos: Vec<String> = std::fs::read_to_string(&list)
        .with_context(|| format!("reading {} (the DAVIS-2017 layout: ImageSets/2017/val.txt, JPEGImages/480p/<video>/, Annotations/480p/<video>/)", list.display()))?
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    ensure!(!videos.is_empty(), "{} lists no video", list.display());
    let palette = davis_palette();
    for (i, v) in videos.iter().enumerate() {
        println!("[{i}/{}] Begin to segmentate video {v}.", videos.len());
        let vdir = cfg.data_path.join("JPEGImages/480p").join(v);
        let mut frames: Vec<std::path::PathBuf> = std::fs::read_dir(&vdir)
            .with_context(|| format!("listing {}", vdir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
            .collect();
        frames.sort();
        ensure!(
            frames.len() >= 2,
            "{} holds {} frames; a video needs at least two",
            vdir.display(),
            frames.len()
        );
        let stem = |p: &std::path::Path| {
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let ann = cfg
            .data_path
            .join("Annotations/480p")
            .join(v)
            .join(format!("{}.png", stem(&frames[0])));
        let (seg_ori, sw, sh) = read_indexed_png(&ann)?;
        let out_dir = cfg.output_dir.join(v);
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("creating {}", out_dir.display()))?;
        write_indexed_png(&out_dir.join("00000.png"), &seg_ori, sw, sh, &palette)?;
        // read_seg: the annotation at patch resolution (nearest), one-hot.
        let (stw, sth) = frame_size(sw, sh, 480);
        let (gw, gh) = (stw / patch as usize, sth / patch as usize);
        ensure!(
            gw > 0 && gh > 0,
            "{}: frames too small for {patch}-pixel patches",
            vdir.display()
        );
        let small = resize_nearest(&seg_ori, sw, sh, gw, gh);
        let small = Tensor::from_slice(&small.iter().map(|&x| i64::from(x)).collect::<Vec<_>>())
            .reshape([gh as i64, gw as i64]);
        let first_seg = to_one_hot(&small);
        let bar = crate::util::progress_bar(frames.len() as u64, v);
        let mut feats = Vec::new();
        let mut sizes = Vec::new();
        for f in &frames {
            let img = crate::data::dataset::load_rgb(f)?;
            let (tw, th) = frame_size(img.width, img.height, 480);
            let x = read_frame(&img, tw, th).to_device(device);
            let (h, w) = (th as i64 / patch, tw as i64 / patch);
            ensure!(
                (h, w) == (gh as i64, gw as i64),
                "{}: frame size differs from the annotation's",
                f.display()
            );
            let x = x.narrow(2, 0, h * patch).narrow(3, 0, w * patch);
            feats.push(frame_features(vit, &x)?);
            sizes.push((img.width, img.height));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let labels = propagate_video(
            &cfg.propagation,
            &feats,
            &first_seg,
            gh as i64,
            gw as i64,
            patch,
        )?;
        for ((lab, f), (ow, oh)) in labels.iter().zip(&frames[1..]).zip(&sizes[1..]) {
            let (lh, lw) = (lab.size()[0] as usize, lab.size()[1] as usize);
            let l: Vec<u8> = Vec::<i64>::try_from(lab.reshape([-1]))?
                .into_iter()
                .map(|x| x as u8)
                .collect();
            let full = resize_nearest(&l, lw, lh, *ow, *oh);
            write_indexed_png(
                &out_dir.join(format!("{}.png", stem(f))),
                &full,
                *ow,
                *oh,
                &palette,
            )?;
        }
    }
    Ok(videos.len())
}
