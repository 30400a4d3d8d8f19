//! What the [CLS] token looks at: the last block's self-attention from [CLS] to every patch, per
//! head, as the official `analysis/attention_map/visualize_attention.py` computes it, plus the
//! pictures it saves (heat maps per head, the patches that hold a given share of the mass).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use plotters::style::colors::colormaps::{ColorMap, ViridisRGB};
use tch::{Device, Kind, Tensor};

use crate::data::ops::{self, Filter, Rgb8};
use crate::models::VisionTransformer;

/// [CLS]→patch attention maps of one image.
#[derive(Debug)]
pub struct AttentionMaps {
    /// One map per head, `[heads, gh, gw]`, each row summing to at most 1 (the [CLS] column
    /// is left out, as officially).
    pub attentions: Tensor,
    /// 1 where a patch belongs to the smallest set of a head's largest weights that holds
    /// `threshold` of the head's patch mass, else 0; `[heads, gh, gw]` (float).
    pub th_attn: Option<Tensor>,
}

/// Splits `attn` (`[1, heads, 1 + gh*gw, 1 + gh*gw]`, from `get_last_selfattention`) into
/// per-head maps and, with `threshold`, the official mass mask: sort each head's weights
/// ascending, normalise them to sum 1, keep those whose running sum exceeds `1 - threshold`.
pub fn cls_attention_maps(
    attn: &Tensor,
    gh: i64,
    gw: i64,
    threshold: Option<f64>,
) -> Result<AttentionMaps> {
    let size = attn.size();
    let n = gh * gw;
    ensure!(
        size.len() == 4 && size[0] == 1 && size[2] == 1 + n && size[3] == 1 + n,
        "attention of shape {size:?} does not fit one image of {gh}x{gw} patches"
    );
    let heads = size[1];
    // Row 0 is the [CLS] query; its first column is [CLS] itself.
    let a = attn
        .get(0)
        .select(1, 0)
        .narrow(1, 1, n)
        .to_kind(Kind::Float); // [heads, N]
    let th_attn = match threshold {
        None => None,
        Some(t) => {
            ensure!(
                (0.0..=1.0).contains(&t),
                "--threshold {t} is not a share of the mass in [0, 1]"
            );
            let (val, idx) = a.sort(1, false);
            let val = &val / val.sum_dim_intlist(Some(&[1i64][..]), true, Kind::Float);
            let keep_sorted = val.cumsum(1, Kind::Float).gt(1.0 - t);
            // Back to patch order: position i holds the entry ranked argsort(idx)[i].
            let keep = keep_sorted.gather(1, &idx.argsort(1, false), false);
            Some(keep.to_kind(Kind::Float).reshape([heads, gh, gw]))
        }
    };
    Ok(AttentionMaps {
        attentions: a.reshape([heads, gh, gw]),
        th_attn,
    })
}

/// Largest side of the prepared image (`--image_size`).
pub const MAX_SIDE: usize = 4096;
/// Most patches of the prepared image (a 128x128 grid).
pub const MAX_PATCHES: usize = 16384;
/// Largest attention matrix (`heads x (1 + patches)^2` float32) one block may need.
const MAX_ATTENTION_BYTES: u64 = 2 << 30;

/// How the official script prepares the image: `Resize(image_size)` (two values: exactly that
/// height and width; one value: the shorter side, keeping the aspect ratio as torchvision
/// does), Pillow's bilinear filter, then the bottom/right cut to a multiple of the patch size.
pub fn prepare_image(img: &Rgb8, image_size: &[usize], patch: usize) -> Result<Rgb8> {
    let (h, w) = match *image_size {
        [s] => {
            let (short, long) = (img.height.min(img.width), img.height.max(img.width));
            let other = (s as f64 * long as f64 / short as f64) as usize;
            if img.height <= img.width {
                (s, other)
            } else {
                (other, s)
            }
        }
        [h, w] => (h, w),
        _ => anyhow::bail!("--image_size takes one or two numbers"),
    };
    ensure!(
        h >= patch && w >= patch,
        "--image_size {h}x{w} is smaller than one {patch}-pixel patch"
    );
    ensure!(
        h <= MAX_SIDE && w <= MAX_SIDE,
        "--image_size {h}x{w} is too large: at most {MAX_SIDE} pixels per side"
    );
    let patches = (h / patch) * (w / patch);
    ensure!(
        patches <= MAX_PATCHES,
        "--image_size {h}x{w} gives {patches} patches of {patch} pixels: at most {MAX_PATCHES} \
         (the attention matrix grows with the square of the patch count); use a smaller size"
    );
    let resized = ops::resized_crop_with(img, 0, 0, img.height, img.width, h, w, Filter::Bilinear);
    let (ch, cw) = (h - h % patch, w - w % patch);
    let mut data = Vec::with_capacity(ch * cw * 3);
    for row in resized.data.chunks_exact(w * 3).take(ch) {
        data.extend_from_slice(&row[..cw * 3]);
    }
    Ok(Rgb8::new(cw, ch, data))
}

/// The maps of `img` (already prepared, sides multiples of the patch size) under `vit`.
pub fn attention_of(
    vit: &VisionTransformer,
    img: &Rgb8,
    threshold: Option<f64>,
    device: Device,
) -> Result<AttentionMaps> {
    let p = vit.cfg.patch_size as usize;
    ensure!(
        img.width % p == 0 && img.height % p == 0,
        "image sides must be multiples of the patch size"
    );
    let tokens = 1 + (img.width / p) as u64 * (img.height / p) as u64;
    let bytes = vit.cfg.num_heads as u64 * tokens * tokens * 4;
    ensure!(
        bytes <= MAX_ATTENTION_BYTES,
        "a {}x{} image has {} patches: each block's attention matrix would need {:.1} GB \
         (at most {} GB); use a smaller --image_size",
        img.height,
        img.width,
        tokens - 1,
        bytes as f64 / 1e9,
        MAX_ATTENTION_BYTES as f64 / 1e9
    );
    let mut pix = vec![0f32; 3 * img.width * img.height];
    ops::to_tensor_normalize_into(img, ops::IMAGENET_MEAN, ops::IMAGENET_STD, &mut pix);
    let x = Tensor::from_slice(&pix)
        .reshape([1, 3, img.height as i64, img.width as i64])
        .to_device(device);
    let attn = tch::no_grad(|| vit.get_last_selfattention(&x))?.to_device(Device::Cpu);
    cls_attention_maps(
        &attn,
        (img.height / p) as i64,
        (img.width / p) as i64,
        threshold,
    )
}

/// A patch-level map (`[gh, gw]`) as an RGB picture `patch` times larger (nearest, as the
/// official `interpolate(scale_factor=patch, mode="nearest")`), coloured with viridis between
/// the map's own minimum and maximum (as `plt.imsave` does).
pub fn heat_map(map: &Tensor, patch: usize) -> Result<Rgb8> {
    colour_map(map, patch, |t| {
        let c = ViridisRGB.get_color(t);
        [c.0, c.1, c.2]
    })
}

/// A patch-level map (`[gh, gw]`) as an RGB picture `patch` times larger (nearest), each value
/// scaled to the map's own range, `(v - min) / (max - min)` (0 for a constant map), then
/// coloured by `colour` (as `plt.imsave` with a colour map does).
pub fn colour_map(map: &Tensor, patch: usize, colour: impl Fn(f32) -> [u8; 3]) -> Result<Rgb8> {
    let (gh, gw) = match map.size()[..] {
        [h, w] => (h as usize, w as usize),
        ref s => anyhow::bail!("a map must be 2-D, not {s:?}"),
    };
    let v = Vec::<f32>::try_from(map.to_kind(Kind::Float).flatten(0, -1))?;
    let (lo, hi) = v
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
    let span = if hi > lo { hi - lo } else { 1.0 };
    let colours: Vec<[u8; 3]> = v.iter().map(|&x| colour((x - lo) / span)).collect();
    let (h, w) = (gh * patch, gw * patch);
    let mut data = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        for x in 0..w {
            data.extend_from_slice(&colours[(y / patch) * gw + x / patch]);
        }
    }
    Ok(Rgb8::new(w, h, data))
}

/// `img` with a patch mask (`[gh, gw]`, 0/1) painted over it in red at half opacity, as the
/// official `apply_mask`, and the mask's outline in red: the official `display_instances`
/// draws the contour at level 0.5 of the (padded) mask with matplotlib, a line along the edge
/// between masked and unmasked pixels; here the masked pixels on that edge (a 4-neighbour
/// outside the mask or outside the picture) are painted.
pub fn masked_image(img: &Rgb8, mask: &Tensor, patch: usize) -> Result<Rgb8> {
    let gw = img.width / patch;
    let m = Vec::<f32>::try_from(mask.to_kind(Kind::Float).flatten(0, -1))?;
    ensure!(
        m.len() == gw * (img.height / patch),
        "mask does not fit the image"
    );
    let colour = [255.0f32, 0.0, 0.0];
    let mut out = img.clone();
    for y in 0..img.height {
        for x in 0..img.width {
            let a = 0.5 * m[(y / patch) * gw + x / patch];
            let i = (y * img.width + x) * 3;
            for ((o, &v), col) in out.data[i..i + 3]
                .iter_mut()
                .zip(&img.data[i..i + 3])
                .zip(colour)
            {
                *o = (v as f32 * (1.0 - a) + a * col) as u8;
            }
        }
    }
    for (x, y) in contour_pixels(&m, gw, patch) {
        let i = (y * img.width + x) * 3;
        out.data[i..i + 3].copy_from_slice(&[255, 0, 0]);
    }
    Ok(out)
}

/// The pixels of a patch mask (`m`, row-major, `gw` patches wide, drawn `patch` times larger)
/// that are inside it and touch the outside (4-neighbours; beyond the picture counts as
/// outside, as the official padding does): the mask's outline.
pub fn contour_pixels(m: &[f32], gw: usize, patch: usize) -> Vec<(usize, usize)> {
    if gw == 0 {
        return Vec::new();
    }
    let gh = m.len() / gw;
    let (w, h) = (gw * patch, gh * patch);
    let inside = |x: i64, y: i64| {
        x >= 0
            && y >= 0
            && (x as usize) < w
            && (y as usize) < h
            && m[(y as usize / patch) * gw + x as usize / patch] > 0.5
    };
    let mut out = Vec::new();
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            if inside(x, y)
                && !(inside(x - 1, y) && inside(x + 1, y) && inside(x, y - 1) && inside(x, y + 1))
            {
                out.push((x as usize, y as usize));
            }
        }
    }
    out
}

/// The colours of the official `show_attn_color` (its `company_colors`), one per head.
pub const COMPANY_COLORS: [[u8; 3]; 6] = [
    [0, 160, 215],
    [220, 55, 60],
    [245, 180, 0],
    [10, 120, 190],
    [40, 150, 100],
    [135, 75, 145],
];

/// The official coloured composite (`show_attn_color`, saved as `attn_color.png`): the image
/// stretched to its own range, made grey, lightened (64 levels above 192) and darkened to a
/// tenth; over it, each of the first six heads paints, in its own colour, the pixels of its
/// mass mask where it attends more than every other head (the first head wins ties, and a
/// pixel another head already took stays that head's), with opacity `sqrt(a)` where `a` is the
/// head's masked attention stretched to 0..1 and above 0.2. `x` is the normalised image
/// `[3, H, W]` (ToTensor + Normalize), `maps` its maps with a mass mask.
///
/// The arithmetic is numpy's, in the same precisions (float32 masks, float64 image, truncation
/// to uint8). One guard the official code lacks: a head whose masked map is constant (it wins
/// no pixel) paints nothing, where the official division by zero turns the picture to NaN.
pub fn attn_color(x: &Tensor, maps: &AttentionMaps, patch: usize) -> Result<Rgb8> {
    let th = maps
        .th_attn
        .as_ref()
        .context("the coloured composite needs the mass masks (a --threshold above 0)")?;
    let size = x.size();
    ensure!(
        size.len() == 3 && size[0] == 3,
        "the image must be [3, H, W]"
    );
    let (h, w) = (size[1] as usize, size[2] as usize);
    let heads = (maps.attentions.size()[0] as usize).min(COMPANY_COLORS.len());
    let grid = maps.attentions.size();
    ensure!(
        grid[1] as usize * patch == h && grid[2] as usize * patch == w,
        "maps of {}x{} patches of {patch} pixels do not cover a {h}x{w} image",
        grid[1],
        grid[2]
    );
    let up = |t: &Tensor| -> Result<Vec<f32>> {
        let t = t
            .narrow(0, 0, heads as i64)
            .unsqueeze(0)
            .to_kind(Kind::Float)
            .upsample_nearest2d([h as i64, w as i64], None, None);
        Ok(Vec::<f32>::try_from(t.flatten(0, -1))?)
    };
    let (att, thm) = (up(&maps.attentions)?, up(th)?);
    let n = h * w;
    let mut mask: Vec<f32> = att.iter().zip(&thm).map(|(a, t)| a * t).collect();
    // mask[i] *= (mask[i] == max over heads); then mask[i] *= (mask[i] == cumsum[i]).
    for p in 0..n {
        let mx = (0..heads)
            .map(|i| mask[i * n + p])
            .fold(f32::NEG_INFINITY, f32::max);
        for i in 0..heads {
            let v = mask[i * n + p];
            mask[i * n + p] = if v == mx { v } else { 0.0 };
        }
        let mut acc = 0f32;
        for i in 0..heads {
            let v = mask[i * n + p];
            acc += v;
            mask[i * n + p] = if v == acc { v } else { 0.0 };
        }
    }
    // The grey background from the normalised image (float32 as numpy computes it).
    let xv = Vec::<f32>::try_from(
        x.to_kind(Kind::Float)
            .permute([1, 2, 0])
            .contiguous()
            .flatten(0, -1),
    )?;
    let (m, mx) = xv
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
            (l.min(v), h.max(v))
        });
    let span = mx - m;
    let mut img: Vec<f64> = (0..n)
        .map(|p| {
            let c = |k: usize| {
                let v = xv[p * 3 + k];
                if span > 0.0 {
                    ((v - m) / span) * 64.0 + 192.0
                } else {
                    192.0
                }
            };
            let grey = ((c(0) + c(1)) + c(2)) / 3.0;
            0.1 * (grey as u32) as f64
        })
        .collect();
    let mut rgb: Vec<f64> = img.iter().flat_map(|&g| [g, g, g]).collect();
    img.clear();
    for (i, colour) in COMPANY_COLORS.iter().enumerate().take(heads) {
        let hm = &mask[i * n..(i + 1) * n];
        let (lo, hi) = hm
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        if hi - lo <= 0.0 {
            continue;
        }
        for p in 0..n {
            let a = (hm[p] - lo) / (hi - lo);
            let s = if a > 0.2 { a.sqrt() } else { 0.0 };
            for ch in 0..3 {
                let col = (colour[ch] as f64 / 255.0) as f32;
                let o = &mut rgb[p * 3 + ch];
                *o = *o * (1.0 - s) as f64 + (s * col * 255.0) as f64;
            }
        }
    }
    Ok(Rgb8::new(w, h, rgb.iter().map(|&v| v as u8).collect()))
}

/// The normalised tensor `[3, H, W]` of a prepared image (ToTensor + Normalize).
pub fn normalised_image(img: &Rgb8) -> Tensor {
    let mut pix = vec![0f32; 3 * img.width * img.height];
    ops::to_tensor_normalize_into(img, ops::IMAGENET_MEAN, ops::IMAGENET_STD, &mut pix);
    Tensor::from_slice(&pix).reshape([3, img.height as i64, img.width as i64])
}

/// `visualize-attention` on `image_path`: one image into `output_dir`, or every image of a
/// folder (class sub-folders or flat; at most `show_pics`) each into its own sub-folder
/// `id{index}_{name}` of `output_dir`. Returns the folders written.
pub fn visualize_path(
    vit: &VisionTransformer,
    image_path: &Path,
    image_size: &[usize],
    threshold: Option<f64>,
    output_dir: &Path,
    show_pics: usize,
    device: Device,
) -> Result<Vec<PathBuf>> {
    crate::util::check_output_dir(output_dir, "--output_dir")?;
    let patch = vit.cfg.patch_size as usize;
    let one = |img: &Rgb8, dir: &Path| -> Result<()> {
        let img = prepare_image(img, image_size, patch)?;
        let maps = attention_of(vit, &img, threshold, device)?;
        save_pictures(&img, &maps, patch, threshold, dir)?;
        Ok(())
    };
    if !image_path.is_dir() {
        let img = crate::data::dataset::load_rgb(image_path)?;
        one(&img, output_dir)?;
        return Ok(vec![output_dir.to_path_buf()]);
    }
    use crate::data::dataset::Dataset as _;
    let ds = crate::data::dataset::ImageFolder::open(image_path)?;
    let n = ds.len().min(show_pics);
    let bar = crate::util::progress_bar(n as u64, "attention maps");
    let mut dirs = Vec::new();
    for i in 0..n {
        let (img, _) = ds.get(i)?;
        let name = ds
            .path(i)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = output_dir.join(format!("id{i}_{name}"));
        one(&img, &dir).with_context(|| format!("image {}", ds.path(i).display()))?;
        dirs.push(dir);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(dirs)
}

use super::{save_png, side_by_side};

/// Writes the official set of pictures into `dir`: `img.png` (the prepared image),
/// `attn-head{j}.png` per head, `mask_th{t}_head{j}.png` per head with a threshold (mask and
/// outline), `attn_color.png` (the coloured composite, with a threshold), `attn.png` (the
/// image, the composite and every head side by side, as the official final picture), and the raw maps as `attention.safetensors`
/// (`attentions`, `th_attn`). Returns the files written.
pub fn save_pictures(
    img: &Rgb8,
    maps: &AttentionMaps,
    patch: usize,
    threshold: Option<f64>,
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let mut save = |pic: &Rgb8, name: String| -> Result<()> {
        let path = dir.join(name);
        save_png(pic, &path)?;
        written.push(path);
        Ok(())
    };
    save(img, "img.png".into())?;
    let heads = maps.attentions.size()[0];
    let mut strip = vec![img.clone()];
    for j in 0..heads {
        let heat = heat_map(&maps.attentions.get(j), patch)?;
        save(&heat, format!("attn-head{j}.png"))?;
        strip.push(heat);
        if let (Some(th), Some(t)) = (&maps.th_attn, threshold) {
            save(
                &masked_image(img, &th.get(j), patch)?,
                format!("mask_th{t}_head{j}.png"),
            )?;
        }
    }
    // The official final picture: the image, the coloured composite, every head.
    if threshold.is_some() && maps.th_attn.is_some() {
        let colour = attn_color(&normalised_image(img), maps, patch)?;
        save(&colour, "attn_color.png".into())?;
        strip.insert(1, colour);
    }
    save(&side_by_side(&strip), "attn.png".into())?;
    let mut named = vec![("attentions".to_string(), maps.attentions.shallow_clone())];
    if let Some(th) = &maps.th_attn {
        named.push(("th_attn".to_string(), th.shallow_clone()));
    }
    let raw = dir.join("attention.safetensors");
    crate::params::write_safetensors(&raw, &named, None)?;
    written.push(raw);
    Ok(written)
}
