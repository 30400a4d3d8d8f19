//! Attention over a sequence of frames, as the official
//! `analysis/attention_map/video_generation.py`: every frame of a folder (sorted by name) goes
//! through the model; the [CLS] attention of the last block, averaged over heads, is drawn with
//! matplotlib's "inferno" colours (scaled to the frame's own range, `patch` times larger) as
//! `attention/attn-<frame>.png`; then the attention frames become one animated GIF,
//! `video.gif`, at `fps` frames per second (the `image` crate's GIF encoder; the official
//! script writes MP4/AVI through OpenCV, which would need a video codec library here).
//!
//! Frames are read whatever their format (the official script globs `*.jpg` only); `resize`
//! is applied with Pillow's bilinear filter to the image (the official applies torchvision's
//! `Resize` to the tensor, also bilinear and antialiased); a video file as input is refused
//! (extract its frames first). `video_only` turns a folder of attention frames into the GIF.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, RgbaImage};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::data::ops::Rgb8;
use crate::models::VisionTransformer;

/// Options of `ibot video-generation` (the official script's names and defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VideoConfig {
    pub input_path: PathBuf,
    pub output_path: PathBuf,
    /// Computed by the official script but not drawn; kept for its command line.
    pub threshold: f64,
    pub resize: Option<Vec<usize>>,
    pub video_only: bool,
    pub fps: f64,
    pub video_format: String,
}

/// The attention of one frame averaged over heads, `[gh, gw]` (`sum(attn[i] * 1/nh)` in
/// float32, in head order, as the official script sums it). The frame is used at its size
/// (or `resize`d) and cut to whole patches.
pub fn frame_attention(
    vit: &VisionTransformer,
    frame: &Rgb8,
    resize: Option<&[usize]>,
    device: Device,
) -> Result<Tensor> {
    let patch = vit.cfg.patch_size as usize;
    let img = match resize {
        Some(r) => super::attention::prepare_image(frame, r, patch)?,
        None => {
            ensure!(
                frame.width >= patch && frame.height >= patch,
                "the frame is {}x{} pixels, smaller than one {patch}-pixel patch",
                frame.width,
                frame.height
            );
            super::attention::prepare_image(frame, &[frame.height, frame.width], patch)?
        }
    };
    let maps = super::attention::attention_of(vit, &img, None, device)?;
    let nh = maps.attentions.size()[0];
    let w = (1.0 / nh as f64) as f32;
    let mut acc = maps.attentions.get(0) * w as f64;
    for i in 1..nh {
        acc = acc + maps.attentions.get(i) * w as f64;
    }
    Ok(acc.to_kind(Kind::Float))
}

/// A patch-level map as `plt.imsave(cmap="inferno")` draws it, `patch` times larger: scaled
/// to its own range, colour `int(v * 256)` (clipped to 255) of the 256-colour table.
pub fn inferno_picture(map: &Tensor, patch: usize) -> Result<Rgb8> {
    super::attention::colour_map(map, patch, |t| {
        let c = colorous::INFERNO.eval_rational(((t * 256.0) as usize).min(255), 256);
        [c.r, c.g, c.b]
    })
}

/// Image files directly in `dir` whose name passes `keep`, sorted by name.
fn images_in(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().is_some_and(|e| {
                    crate::data::dataset::IMAGE_EXTENSIONS
                        .contains(&e.to_string_lossy().to_ascii_lowercase().as_str())
                })
                && p.file_name().is_some_and(|n| keep(&n.to_string_lossy()))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// An animated GIF of `frames` (all of one size) at `fps`, looping forever, written atomically.
pub fn write_gif(frames: &[PathBuf], out: &Path, fps: f64) -> Result<()> {
    ensure!(
        !frames.is_empty(),
        "no frames to put into {}",
        out.display()
    );
    ensure!(fps > 0.0 && fps.is_finite(), "--fps must be positive");
    let mut bytes = Vec::new();
    {
        let mut enc = GifEncoder::new_with_speed(&mut bytes, 10);
        enc.set_repeat(Repeat::Infinite)?;
        let delay = Delay::from_numer_denom_ms((1000.0 * 1000.0 / fps).round() as u32, 1000);
        let mut size = None;
        let bar = crate::util::progress_bar(frames.len() as u64, "gif");
        for f in frames {
            let img = image::open(f)
                .with_context(|| format!("reading {}", f.display()))?
                .to_rgba8();
            let dims = img.dimensions();
            match size {
                None => size = Some(dims),
                Some(s) => ensure!(
                    s == dims,
                    "{} is {}x{}, the first frame {}x{}: every frame of a video must have one size",
                    f.display(),
                    dims.0,
                    dims.1,
                    s.0,
                    s.1
                ),
            }
            let img: RgbaImage = img;
            enc.encode_frame(Frame::from_parts(img, 0, 0, delay))
                .with_context(|| format!("encoding {}", f.display()))?;
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    crate::util::atomic_write(out, &bytes)
}

/// What a run wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VideoReport {
    pub frames: Vec<PathBuf>,
    pub video: PathBuf,
}

/// The official run: frames → `attention/attn-*.png` → `video.gif` (with `video_only`,
/// `input_path` already holds the attention frames). `vit` may be `None` only with
/// `video_only`.
pub fn run(
    cfg: &VideoConfig,
    vit: Option<&VisionTransformer>,
    device: Device,
) -> Result<VideoReport> {
    ensure!(
        cfg.video_format == "gif",
        "--video_format {}: ibot writes animated GIFs (no video codec is linked); use \
         --video_format gif and convert video.gif with any tool if you need {}",
        cfg.video_format,
        cfg.video_format
    );
    ensure!(
        cfg.input_path.exists(),
        "--input_path {} does not exist",
        cfg.input_path.display()
    );
    ensure!(
        cfg.input_path.is_dir(),
        "--input_path {} is a file: give a folder of frames (extract a video's frames first, \
         e.g. with `ffmpeg -i video.mp4 frames/frame-%04d.jpg`)",
        cfg.input_path.display()
    );
    std::fs::create_dir_all(&cfg.output_path)
        .with_context(|| format!("creating {}", cfg.output_path.display()))?;
    let video = cfg.output_path.join("video.gif");
    if cfg.video_only {
        let frames = images_in(&cfg.input_path, |n| n.starts_with("attn-"))?;
        ensure!(
            !frames.is_empty(),
            "--video_only: {} has no attention frames (attn-*)",
            cfg.input_path.display()
        );
        write_gif(&frames, &video, cfg.fps)?;
        return Ok(VideoReport { frames, video });
    }
    let vit = vit.context("the attention frames need a model (--pretrained_weights)")?;
    let patch = vit.cfg.patch_size as usize;
    let inputs = images_in(&cfg.input_path, |_| true)?;
    ensure!(
        !inputs.is_empty(),
        "{} has no image frames",
        cfg.input_path.display()
    );
    let att_dir = cfg.output_path.join("attention");
    std::fs::create_dir_all(&att_dir).with_context(|| format!("creating {}", att_dir.display()))?;
    let bar = crate::util::progress_bar(inputs.len() as u64, "attention frames");
    let mut frames = Vec::new();
    for p in &inputs {
        let frame = crate::data::dataset::load_rgb(p)?;
        let map = frame_attention(vit, &frame, cfg.resize.as_deref(), device)
            .with_context(|| format!("frame {}", p.display()))?;
        let pic = inferno_picture(&map, patch)?;
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let out = att_dir.join(format!("attn-{stem}.png"));
        super::save_png(&pic, &out)?;
        frames.push(out);
        bar.inc(1);
    }
    bar.finish_and_clear();
    write_gif(&frames, &video, cfg.fps)?;
    Ok(VideoReport { frames, video })
}
