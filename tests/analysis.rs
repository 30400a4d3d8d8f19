//! Attention maps (`ibot visualize-attention`): the official treatment of the attention tensor
//! (checked against tests/py/attention_ref.py run with the venv's torch at test time), the
//! image preparation, and the pictures written.

mod common;

use std::path::PathBuf;

use ibot::analysis::attention::{
    attention_of, cls_attention_maps, heat_map, prepare_image, save_pictures,
};
use ibot::data::ops::Rgb8;
use ibot::models::{VisionTransformer, VitConfig};
use ibot::params::{read_safetensors, ParamStore};
use tch::{Device, Kind, Tensor};

fn tmp(name: &str) -> PathBuf {
    common::scratch_dir("analysis", name)
}

#[test]
fn attention_maps_and_mass_masks_match_the_official_code() {
    tch::manual_seed(3);
    let dir = tmp("ref");
    for (heads, gh, gw, threshold) in [(3i64, 3i64, 4i64, 0.6f64), (2, 5, 5, 0.9), (4, 2, 6, 0.3)] {
        let n = 1 + gh * gw;
        // Softmax rows, like real attention; distinct values so the sort order is unambiguous.
        let attn = (Tensor::randn([1, heads, n, n], (Kind::Float, Device::Cpu)) * 2.0)
            .softmax(-1, Kind::Float);
        let r = common::python_reference(
            "attention_ref.py",
            &[
                ("attn", &attn),
                ("grid", &Tensor::from_slice(&[gh, gw])),
                ("threshold", &Tensor::from(threshold)),
            ],
            &dir,
        );
        let ours = cls_attention_maps(&attn, gh, gw, Some(threshold)).unwrap();
        // Same selections and the same float32 operations: exact.
        assert!(ours.attentions.equal(&r["attentions"]));
        let th = ours.th_attn.unwrap();
        assert!(
            th.equal(&r["th_attn"]),
            "masks differ at threshold {threshold}"
        );
        // Sanity of the reference itself: some but not all patches kept.
        let kept = th.sum(Kind::Float).double_value(&[]);
        assert!(kept > 0.0 && kept < (heads * gh * gw) as f64);
    }
    // Shapes that do not fit are errors, not panics.
    let attn = Tensor::zeros([1, 2, 10, 10], (Kind::Float, Device::Cpu));
    assert!(cls_attention_maps(&attn, 3, 4, None).is_err());
    assert!(cls_attention_maps(&attn, 3, 3, Some(1.5)).is_err());
}

#[test]
fn images_are_resized_like_torchvision_and_cut_to_whole_patches() {
    let img = Rgb8::new(
        100,
        60,
        (0..100 * 60 * 3).map(|i| (i % 251) as u8).collect(),
    );
    // One number: the shorter side (height 60 -> 48), the other int(48 * 100 / 60) = 80.
    let p = prepare_image(&img, &[48], 16).unwrap();
    assert_eq!((p.height, p.width), (48, 80));
    // Two numbers: exactly that size, then the bottom/right cut to multiples of 16.
    let p = prepare_image(&img, &[50, 70], 16).unwrap();
    assert_eq!((p.height, p.width), (48, 64));
    assert!(prepare_image(&img, &[8, 8], 16).is_err());
    assert!(prepare_image(&img, &[1, 2, 3], 16).is_err());
}

#[test]
fn pictures_and_raw_maps_are_written() {
    let cfg = VitConfig {
        img_size: 32,
        patch_size: 8,
        in_chans: 3,
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        mlp_ratio: 2.0,
        qkv_bias: true,
        drop_path_rate: 0.0,
        masked_im_modeling: false,
    };
    tch::manual_seed(0);
    let mut ps = ParamStore::new();
    let vit = VisionTransformer::new(&mut ps, "", &cfg, false, Device::Cpu).unwrap();
    let img = Rgb8::new(
        50,
        41,
        (0..50 * 41 * 3).map(|i| (i * 7 % 256) as u8).collect(),
    );
    let img = prepare_image(&img, &[40, 48], 8).unwrap();
    let maps = attention_of(&vit, &img, Some(0.6), Device::Cpu).unwrap();
    assert_eq!(maps.attentions.size(), [2, 5, 6]);

    let dir = tmp("pictures");
    let files = save_pictures(&img, &maps, 8, Some(0.6), &dir).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for n in [
        "img.png",
        "attn-head0.png",
        "attn-head1.png",
        "mask_th0.6_head0.png",
        "mask_th0.6_head1.png",
        "attn.png",
        "attn_color.png",
        "attention.safetensors",
    ] {
        assert!(names.contains(&n.to_string()), "{n} not written");
    }
    let strip = image::open(dir.join("attn.png")).unwrap().to_rgb8();
    // The image, the coloured composite and the two heads (the official final picture).
    assert_eq!(strip.dimensions(), (4 * 48, 40));
    let raw = read_safetensors(&dir.join("attention.safetensors")).unwrap();
    assert!(raw["attentions"].equal(&maps.attentions));
    assert!(raw["th_attn"].equal(maps.th_attn.as_ref().unwrap()));

    // The heat map spans viridis: the head's strongest patch is the yellow end, its weakest
    // the purple end.
    let map = maps.attentions.get(0);
    let heat = heat_map(&map, 8).unwrap();
    let flat = map.flatten(0, -1);
    let (hi, lo) = (
        flat.argmax(0, false).int64_value(&[]) as usize,
        flat.argmin(0, false).int64_value(&[]) as usize,
    );
    let px = |k: usize| {
        let (y, x) = ((k / 6) * 8, (k % 6) * 8);
        let i = (y * heat.width + x) * 3;
        [heat.data[i], heat.data[i + 1], heat.data[i + 2]]
    };
    let (top, bottom) = (px(hi), px(lo));
    assert!(
        top[0] > 200 && top[1] > 200 && top[2] < 80,
        "max colour {top:?}"
    );
    assert!(
        bottom[0] < 90 && bottom[1] < 20 && bottom[2] > 60,
        "min colour {bottom:?}"
    );
}
