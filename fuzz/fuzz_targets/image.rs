//! Fuzzes image decoding and the augmentation ops on arbitrary bytes: any input must give Ok or
//! an error, never a panic, a hang or an unbounded allocation.
//!
//! The first byte picks what the rest is:
//! * even: `[seed: 8 bytes LE][image file]`. The file is decoded as the data sets do
//!   (`dataset::decode_rgb`, the JPEG truncation check included); when it decodes to at most
//!   512x512 pixels, the whole per-image pipeline runs on it through the loader: 2 global crops
//!   of 32 px and 2 local crops of 16 px with the default augmentation otherwise, normalisation
//!   and block masks of 8-px cells, with the seed from the input.
//! * odd: the ops called directly on a small image (up to 48x48) made of the input's bytes,
//!   with parameters read from the bytes: crop boxes and output sizes of both resampling filters,
//!   RandomResizedCrop parameters with any scale and ratio, enhance factors, hue shifts and blur
//!   radii that may be NaN, infinite or huge, normalisation constants, `augment_crop` under any
//!   configuration that validates, and masks for any ratio.
//!
//! Run (nightly, from the project root, after `bash scripts/bootstrap.sh`), one process:
//!   LD_LIBRARY_PATH=$(readlink -f .libtorch/lib) cargo +nightly fuzz run image -s none \
//!     fuzz/corpus/image -- -max_total_time=600
//! Seed the corpus first: `python3 tools/make_data_fuzz_seeds.py`.
#![no_main]

use std::sync::Arc;

use ibot::data::augment::{augment_crop, random_resized_crop_params, AugmentConfig};
use ibot::data::dataset::{decode_rgb, Dataset};
use ibot::data::loader::{Loader, LoaderConfig};
use ibot::data::masking::{MaskConfig, PredShape};
use ibot::data::ops::{self, Filter, Rgb8};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Reads parameters off the input; past its end every read gives zeros.
struct Params<'a>(&'a [u8]);

impl Params<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> usize {
        u16::from_le_bytes(self.bytes()) as usize
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    fn flag(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    /// A float that is often one of the awkward values (NaN, ±inf, huge, tiny, the float32
    /// and int32 limits), else a small fraction, else any bit pattern.
    fn f64(&mut self) -> f64 {
        const SPECIAL: [f64; 16] = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0,
            -0.0,
            1.0,
            -1.0,
            1e300,
            -1e300,
            f32::MAX as f64,
            1e-300,
            2147483648.0,
            16777216.0,
            1e9,
            1e7,
            0.5,
        ];
        let sel = self.u8();
        match sel % 4 {
            0 => SPECIAL[(sel >> 4) as usize],
            1 => self.u16() as f64 / 8192.0 - 2.0,
            _ => f64::from_bits(self.u64()),
        }
    }
    fn f32(&mut self) -> f32 {
        self.f64() as f32
    }
}

/// A data set of the one decoded image.
struct One(Rgb8);

impl Dataset for One {
    fn len(&self) -> usize {
        1
    }
    fn get(&self, _: usize) -> anyhow::Result<(Rgb8, i64)> {
        Ok((self.0.clone(), -1))
    }
    fn label(&self, _: usize) -> i64 {
        -1
    }
    fn classes(&self) -> &[String] {
        &[]
    }
    fn describe(&self) -> String {
        "one fuzzed image".into()
    }
}

fn decode_and_augment(data: &[u8]) {
    let mut p = Params(data);
    let seed = p.u64();
    let Ok(img) = decode_rgb(p.0, "fuzz-input") else {
        return;
    };
    assert_eq!(img.data.len(), img.width * img.height * 3);
    if img.width * img.height > 512 * 512 {
        return;
    }
    let cfg = LoaderConfig {
        augment: AugmentConfig {
            local_crops_number: 2,
            global_crops_size: 32,
            local_crops_size: 16,
            ..AugmentConfig::default()
        },
        mask: MaskConfig {
            patch_size: 8,
            pred_ratio_var: vec![0.2],
            ..MaskConfig::default()
        },
        batch_size: 1,
        num_workers: 0,
        prefetch: 1,
        seed,
        rank: 0,
        world_size: 1,
        drop_last: false,
        skip_corrupt: false,
    };
    let loader = Loader::new(Arc::new(One(img)), cfg).expect("valid loader config");
    let batch = loader
        .epoch(0)
        .next()
        .expect("one batch")
        .expect("augmenting a decoded image");
    let sizes: Vec<Vec<i64>> = batch.views.iter().map(|v| v.size()).collect();
    assert_eq!(
        sizes,
        [
            [1, 3, 32, 32],
            [1, 3, 32, 32],
            [1, 3, 16, 16],
            [1, 3, 16, 16]
        ]
    );
    assert_eq!(batch.masks[0].size(), [1, 4, 4]);
    assert_eq!(batch.masks[3].size(), [1, 2, 2]);
}

fn ops_directly(data: &[u8]) {
    let mut p = Params(data);
    let (w, h) = (1 + p.u8() as usize % 48, 1 + p.u8() as usize % 48);
    let mut rng = ChaCha8Rng::seed_from_u64(p.u64());
    let pixels: Vec<u8> = {
        let take = (w * h * 3).min(p.0.len());
        let src = &p.0[..take];
        (0..w * h * 3)
            .map(|i| {
                if take > 0 {
                    src[i % take]
                } else {
                    (i * 37) as u8
                }
            })
            .collect()
    };
    let img = Rgb8::new(w, h, pixels);

    // A crop box inside the image, resampled by either filter to any small size.
    let top = p.u16() % h;
    let left = p.u16() % w;
    let ch = 1 + p.u16() % (h - top);
    let cw = 1 + p.u16() % (w - left);
    let (oh, ow) = (1 + p.u8() as usize % 64, 1 + p.u8() as usize % 64);
    let filter = if p.flag() {
        Filter::Bicubic
    } else {
        Filter::Bilinear
    };
    let out = ops::resized_crop_with(&img, top, left, ch, cw, oh, ow, filter);
    assert_eq!(
        (out.width, out.height, out.data.len()),
        (ow, oh, ow * oh * 3)
    );

    // RandomResizedCrop parameters for any scale and ratio stay inside the image.
    let scale = (p.f64(), p.f64());
    let ratio = (p.f64(), p.f64());
    let (t, l, ch, cw) = random_resized_crop_params(h, w, scale, ratio, &mut rng);
    assert!(
        ch >= 1 && cw >= 1 && t + ch <= h && l + cw <= w,
        "crop ({t}, {l}, {ch}, {cw}) of {w}x{h} for scale {scale:?} ratio {ratio:?}"
    );

    // A sequence of the colour / geometric ops with any factors.
    let mut x = img.clone();
    for _ in 0..6 {
        match p.u8() % 9 {
            0 => ops::hflip_in_place(&mut x),
            1 => ops::solarize_in_place(&mut x),
            2 => ops::grayscale_in_place(&mut x),
            3 => ops::adjust_brightness_in_place(&mut x, p.f64()),
            4 => ops::adjust_contrast_in_place(&mut x, p.f64()),
            5 => ops::adjust_saturation_in_place(&mut x, p.f64()),
            6 => ops::adjust_hue_in_place(&mut x, p.f64()),
            7 => ops::gaussian_blur_in_place(&mut x, p.f64()),
            _ => {
                let mean = [p.f32(), p.f32(), p.f32()];
                let std = [p.f32(), p.f32(), p.f32()];
                let mut t = vec![0f32; w * h * 3];
                ops::to_tensor_normalize_into(&x, mean, std, &mut t);
            }
        }
        assert_eq!((x.width, x.height, x.data.len()), (w, h, w * h * 3));
    }

    // One crop of the augmentation under any configuration that validates.
    let cfg = AugmentConfig {
        global_crops_number: 1 + p.u8() as usize % 3,
        local_crops_number: p.u8() as usize % 3,
        global_crops_size: 1 + p.u8() as usize % 40,
        local_crops_size: 1 + p.u8() as usize % 24,
        global_crops_scale: (p.f64(), p.f64()),
        local_crops_scale: (p.f64(), p.f64()),
        ratio: (p.f64(), p.f64()),
        flip_p: p.f64(),
        jitter_p: p.f64(),
        brightness: p.f64(),
        contrast: p.f64(),
        saturation: p.f64(),
        hue: p.f64(),
        grayscale_p: p.f64(),
        blur_p: (p.f64(), p.f64(), p.f64()),
        blur_radius: (p.f64(), p.f64()),
        solarize_p: p.f64(),
        mean: [p.f32(), p.f32(), p.f32()],
        std: [p.f32(), p.f32(), p.f32()],
    };
    if cfg.validate().is_ok() {
        for i in 0..cfg.num_crops() {
            let c = augment_crop(&img, &cfg, i, &mut rng);
            let s = cfg.crop_size(i);
            assert_eq!((c.width, c.height, c.data.len()), (s, s, s * s * 3));
        }
    }

    // Masks: any configuration that validates, and any ratio.
    let n = 1 + p.u8() as usize % 3;
    let mc = MaskConfig {
        patch_size: 1 + p.u8() as usize % 16,
        pred_ratio: (0..n).map(|_| p.f64()).collect(),
        pred_ratio_var: (0..if p.flag() { n } else { 1 }).map(|_| p.f64()).collect(),
        pred_shape: if p.flag() {
            PredShape::Block
        } else {
            PredShape::Rand
        },
        pred_aspect_ratio: (p.f64(), p.f64()),
        pred_start_epoch: p.u8() as usize % 4,
    };
    if mc.validate().is_ok() {
        let (gh, gw) = (p.u8() as usize % 32, p.u8() as usize % 32);
        let r = mc.draw_ratio(p.u8() as usize % 4, &mut rng);
        assert_eq!(mc.mask(gh, gw, r, &mut rng).len(), gh * gw);
        let m = mc.mask(gh, gw, p.f64(), &mut rng);
        assert_eq!(m.len(), gh * gw);
    }
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((&mode, rest)) if mode & 1 == 0 => decode_and_augment(rest),
        Some((_, rest)) => ops_directly(rest),
        None => {}
    }
});
