//! Every augmentation op against Pillow/torchvision outputs (`../shared/fixtures/augment`).
//! Target and tolerance: bit-exact (uint8 equality; float32 equality for ToTensor+Normalize).

mod common;

use ibot::data::ops::{self, Rgb8};
use ibot::params::read_safetensors;
use tch::Tensor;

fn to_rgb(t: &Tensor) -> Rgb8 {
    let s = t.size();
    let data: Vec<u8> = Vec::try_from(t.flatten(0, -1)).unwrap();
    Rgb8::new(s[1] as usize, s[0] as usize, data)
}

#[test]
fn every_op_is_bit_exact_against_pillow() {
    let Some(dir) = common::augment_fixture_dir() else {
        return;
    };
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("augment.json")).unwrap()).unwrap();
    let tensors = read_safetensors(&dir.join("augment.safetensors")).unwrap();
    let keys = json["keys"].as_object().unwrap();
    let mut checked = 0;
    let mut failures = Vec::new();
    for (key, meta) in keys {
        let op = meta["op"].as_str().unwrap();
        if op == "input" {
            continue;
        }
        let image = meta["image"].as_str().unwrap();
        let p = &meta["params"];
        let f = |k: &str| p[k].as_f64().unwrap();
        let u = |k: &str| p[k].as_u64().unwrap() as usize;
        let input = to_rgb(&tensors[&format!("input/{image}")]);
        let expected = &tensors[key.as_str()];
        if op == "to_tensor_normalize" {
            let src = to_rgb(&tensors[p["source_key"].as_str().unwrap()]);
            let mut out = vec![0f32; src.data.len()];
            ops::to_tensor_normalize_into(&src, ops::IMAGENET_MEAN, ops::IMAGENET_STD, &mut out);
            let ours = Tensor::from_slice(&out).view([3, src.height as i64, src.width as i64]);
            if !ours.equal(expected) {
                failures.push(key.clone());
            }
            checked += 1;
            continue;
        }
        let ours = match op {
            "resized_crop" => {
                let size = p["size"].as_array().unwrap();
                let (oh, ow) = (
                    size[0].as_u64().unwrap() as usize,
                    size[1].as_u64().unwrap() as usize,
                );
                ops::resized_crop(&input, u("top"), u("left"), u("height"), u("width"), oh, ow)
            }
            "hflip" => ops::hflip(&input),
            "adjust_brightness" => ops::adjust_brightness(&input, f("factor")),
            "adjust_contrast" => ops::adjust_contrast(&input, f("factor")),
            "adjust_saturation" => ops::adjust_saturation(&input, f("factor")),
            "adjust_hue" => ops::adjust_hue(&input, f("factor")),
            "grayscale" => ops::grayscale(&input),
            "gaussian_blur" => ops::gaussian_blur(&input, f("radius")),
            "solarize" => ops::solarize(&input),
            "color_jitter" => {
                let mut img = input.clone();
                for name in p["order"].as_array().unwrap() {
                    img = match name.as_str().unwrap() {
                        "brightness" => ops::adjust_brightness(&img, f("brightness")),
                        "contrast" => ops::adjust_contrast(&img, f("contrast")),
                        "saturation" => ops::adjust_saturation(&img, f("saturation")),
                        "hue" => ops::adjust_hue(&img, f("hue")),
                        other => panic!("unknown jitter op {other}"),
                    };
                }
                img
            }
            other => panic!("fixture op {other} is not covered by this test"),
        };
        let want = to_rgb(expected);
        if ours != want {
            let diff = ours
                .data
                .iter()
                .zip(&want.data)
                .filter(|(a, b)| a != b)
                .count();
            let maxd = ours
                .data
                .iter()
                .zip(&want.data)
                .map(|(&a, &b)| (a as i32 - b as i32).abs())
                .max()
                .unwrap_or(-1);
            failures.push(format!(
                "{key}: {diff} bytes differ, max {maxd} (shape ours {}x{}, want {}x{})",
                ours.width, ours.height, want.width, want.height
            ));
        }
        checked += 1;
    }
    assert!(checked >= 85, "only {checked} keys checked");
    assert!(
        failures.is_empty(),
        "{} of {checked} ops differ from Pillow:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn box_blur_radii_match_pillow() {
    for (r, want_ri, want_ww, want_fw) in [
        (0.1f32, 0usize, 16721291u32, 27962u32),
        (0.7, 0, 14036938, 1370139),
        (2.0, 1, 4473924, 1677722),
    ] {
        let br = ops::box_radius(r);
        let ri = br as usize;
        let ww = ((1u32 << 24) as f32 / (br * 2.0 + 1.0)) as u32;
        let fw = ((1u32 << 24) - (ri as u32 * 2 + 1) * ww) / 2;
        assert_eq!((ri, ww, fw), (want_ri, want_ww, want_fw), "radius {r}");
    }
}

/// Pillow BILINEAR crop-and-resize (tests/data/bilinear_ref.json, written by
/// tools/make_bilinear_ref.py with Pillow): bit-exact.
#[test]
fn bilinear_resize_is_bit_exact_against_pillow() {
    let raw = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/bilinear_ref.json"
    ))
    .unwrap();
    let j: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let bytes = |v: &serde_json::Value| -> Vec<u8> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u8)
            .collect()
    };
    let img = Rgb8::new(
        j["width"].as_u64().unwrap() as usize,
        j["height"].as_u64().unwrap() as usize,
        bytes(&j["pixels"]),
    );
    let cases = j["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for c in cases {
        let b: Vec<usize> = c["box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let out = ops::resized_crop_with(
            &img,
            b[0],
            b[1],
            b[2],
            b[3],
            b[4],
            b[5],
            ops::Filter::Bilinear,
        );
        assert_eq!((out.height, out.width), (b[4], b[5]));
        assert_eq!(out.data, bytes(&c["out"]), "box {b:?}");
    }
}

/// Pillow's extended-box Gaussian blur written the plain way: every output sample sums its
/// whole window (edge samples repeated) in 64 bits; 3 horizontal then 3 vertical passes.
fn gaussian_blur_plain(img: &Rgb8, radius: f64) -> Rgb8 {
    let r = ops::box_radius(radius as f32);
    let ri = r as i64;
    let ww = ((1u32 << 24) as f32 / (r * 2.0 + 1.0)) as u64;
    let fw = ((1u64 << 24) - (ri as u64 * 2 + 1) * ww) / 2;
    let (w, h) = (img.width, img.height);
    let pass = |a: &[u8], horizontal: bool| -> Vec<u8> {
        let n = if horizontal { w } else { h } as i64;
        let mut out = a.to_vec();
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let at = |j: i64| {
                        let j = j.clamp(0, n - 1) as usize;
                        let (xx, yy) = if horizontal { (j, y) } else { (x, j) };
                        a[(yy * w + xx) * 3 + c] as u64
                    };
                    let p = if horizontal { x } else { y } as i64;
                    let acc: u64 = (p - ri..=p + ri).map(at).sum();
                    let bulk = acc * ww + (at(p - ri - 1) + at(p + ri + 1)) * fw + (1 << 23);
                    out[(y * w + x) * 3 + c] = (bulk >> 24) as u8;
                }
            }
        }
        out
    };
    let mut a = img.data.clone();
    for horizontal in [true, true, true, false, false, false] {
        a = pass(&a, horizontal);
    }
    Rgb8::new(w, h, a)
}

/// Regression (found by the `image` fuzz target): the blur summed the first box window over
/// all its `2·radius + 1` positions, so a huge finite radius (called directly) took hours; it
/// now counts the repeated edge samples as Pillow's line blur does, and huge radii give their
/// limit (box weight 0: each line becomes the rounded mean of its two edge samples).
#[test]
fn huge_blur_radii_finish_and_match_pillows_arithmetic() {
    let (w, h) = (7, 5);
    let img = Rgb8::new(w, h, (0..w * h * 3).map(|i| (i * 53 % 256) as u8).collect());
    // Usual radii and radii beyond the image with a non-zero box weight: as the plain sums.
    for r in [0.1, 0.7, 2.0, 3.3, 6.0, 20.0, 333.3, 1e4, 1e5] {
        assert_eq!(
            ops::gaussian_blur(&img, r),
            gaussian_blur_plain(&img, r),
            "radius {r}"
        );
    }
    let px = |x: usize, y: usize, c: usize| img.data[(y * w + x) * 3 + c] as u32;
    let limit: Vec<u8> = (0..w * h)
        .flat_map(|_| {
            (0..3).map(move |c| {
                let top = (px(0, 0, c) + px(w - 1, 0, c) + 1) >> 1;
                let bottom = (px(0, h - 1, c) + px(w - 1, h - 1, c) + 1) >> 1;
                ((top + bottom + 1) >> 1) as u8
            })
        })
        .collect();
    let t = std::time::Instant::now();
    for r in [
        1e7,
        1e9,
        3e9,
        1e20,
        1e300,
        f64::MAX,
        f64::INFINITY,
        -1e9,
        f64::NEG_INFINITY,
    ] {
        assert_eq!(ops::gaussian_blur(&img, r).data, limit, "radius {r}");
    }
    assert!(t.elapsed().as_secs_f64() < 5.0, "{:?}", t.elapsed());
    // A bigger image, a radius of a billion: linear time.
    let big = Rgb8::new(300, 200, vec![9; 300 * 200 * 3]);
    assert_eq!(ops::gaussian_blur(&big, 1e9), big);
    // NaN has no defined result in Pillow's C: the image is left as it is.
    assert_eq!(ops::gaussian_blur(&img, f64::NAN), img);
}
