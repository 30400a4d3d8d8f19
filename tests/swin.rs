//! Swin backbones in training: exact resume of a tiny Swin run, crops that are not whole
//! windows, and the masking semantics (masks on a coarse grid, repeated to the 4-px patches).

mod common;

use std::path::Path;

use ibot::models::{SwinConfig, SwinTransformer};
use ibot::params::{read_safetensors, ParamStore};
use ibot::train::{checkpoint, run};
use tch::{Device, Kind, Tensor};

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = read_safetensors(path).unwrap().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn a_resumed_swin_run_equals_an_uninterrupted_one() {
    let data = common::scratch_dir("swin", "data");
    common::write_idx(&data, "train", 20, 40);
    let straight = common::scratch_dir("swin", "straight");
    let out = run::train(&common::tiny_swin_args(&data, &straight, &[])).unwrap();
    assert_eq!(out.epochs_done, 3);

    let resumed = common::scratch_dir("swin", "resumed");
    let first = run::train(&common::tiny_swin_args(
        &data,
        &resumed,
        &["--stop_after", "1"],
    ))
    .unwrap();
    assert_eq!(first.epochs_done, 1);
    let meta = checkpoint::read_meta(&resumed.join("checkpoint.safetensors")).unwrap();
    assert_eq!(meta.epoch, 1);
    assert!(
        meta.config.backbone.as_vit().is_none(),
        "the checkpoint's configuration must say Swin"
    );
    let second = run::train(&common::tiny_swin_args(&data, &resumed, &[])).unwrap();
    assert_eq!(second.epochs_done, 2);

    let a = tensors(&straight.join("checkpoint.safetensors"));
    let b = tensors(&resumed.join("checkpoint.safetensors"));
    assert_eq!(a.len(), b.len());
    // Official names, the int64 relative_position_index buffers included (student and teacher).
    let index = "backbone.layers.1.blocks.1.attn.relative_position_index";
    for net in ["student", "teacher"] {
        let (_, t) = a
            .iter()
            .find(|(k, _)| *k == format!("{net}.{index}"))
            .unwrap_or_else(|| panic!("{net}.{index} missing"));
        assert_eq!(t.kind(), Kind::Int64);
        assert_eq!(t.size(), [9, 9]);
    }
    assert!(a.iter().any(|(k, _)| k == "student.backbone.masked_embed"));
    assert!(!a.iter().any(|(k, _)| k == "teacher.backbone.masked_embed"));
    for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert!(ta.equal(tb), "{ka} differs after resume");
    }
    // Training moved the student (masked_embed included: masks were drawn).
    let first_ckpt = tensors(&straight.join("checkpoint0001.safetensors"));
    let me = |v: &[(String, Tensor)]| {
        v.iter()
            .find(|(k, _)| k == "student.backbone.masked_embed")
            .unwrap()
            .1
            .shallow_clone()
    };
    assert!(!me(&a).equal(&me(&first_ckpt)));
    assert_eq!(
        std::fs::read_to_string(straight.join("log.txt")).unwrap(),
        std::fs::read_to_string(resumed.join("log.txt")).unwrap()
    );
}

fn tiny_swin(mim: bool) -> (ParamStore, SwinTransformer) {
    let cfg = SwinConfig {
        img_size: 32,
        embed_dim: 24,
        depths: vec![2, 2],
        num_heads: vec![1, 2],
        window_size: 3,
        drop_path_rate: 0.0,
        masked_im_modeling: mim,
        ..SwinConfig::from_arch("swin_tiny", 3).unwrap()
    };
    // Under the initialisation lock: the training test in this binary draws its initial
    // weights from the same process-wide generator at the same time.
    ibot::train::seeded_init(3, || {
        let mut ps = ParamStore::new();
        let m = SwinTransformer::new(&mut ps, "", &cfg, false, Device::Cpu).unwrap();
        (ps, m)
    })
}

#[test]
fn crops_that_are_not_whole_windows_run_through_every_stage() {
    let (ps, m) = tiny_swin(false);
    // Buffers are in the state dict, not among the parameters.
    assert!(ps
        .get("layers.0.blocks.0.attn.relative_position_index")
        .is_some());
    assert!(ps
        .params()
        .iter()
        .all(|p| !p.name.contains("relative_position_index")));
    // Construction at 32 px: stage grids 8 and 4, both larger than the window 3, so the odd
    // blocks are shifted by 1.
    assert_eq!(m.layers[0].blocks[1].shift_size, 1);
    assert_eq!(m.layers[1].blocks[1].window_size, 3);
    // 32 px: 8x8 (padded to 9x9) then 4x4 (padded to 6x6); 20 px: 5x5 (padded to 6x6), odd
    // PatchMerging (padded to 6x6) to 3x3; 8 px: 2x2 (padded to 3x3), then 1x1.
    for (side, n) in [(32, 16), (20, 9), (16, 4), (8, 1)] {
        let x = ibot::train::seeded_init(side as u64, || {
            Tensor::randn([2, 3, side, side], (Kind::Float, Device::Cpu))
        });
        let y = m.forward(&x, None, false).unwrap();
        assert_eq!(y.size(), [2, 1 + n, 48], "{side}-px crop");
        assert!(
            bool::try_from(y.isfinite().all()).unwrap(),
            "{side}-px crop"
        );
        // Token 0 is the average of the final-stage tokens.
        let avg = y.narrow(1, 1, n).mean_dim(1, false, Kind::Float);
        assert!(y.select(1, 0).allclose(&avg, 1e-6, 1e-6, false));
        // Images are independent of each other in the batch.
        let y0 = m.forward(&x.narrow(0, 0, 1), None, false).unwrap();
        assert!(y0.allclose(&y.narrow(0, 0, 1), 1e-5, 1e-5, false));
    }
    let x = ibot::train::seeded_init(1, || {
        Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu))
    });
    let attn = m.get_selfattention(&x).unwrap();
    // Last block: 4x4 grid padded to 6x6 = 4 windows of 9 tokens, per image, 2 heads.
    assert_eq!(attn.size(), [8, 2, 9, 9]);
}

#[test]
fn masks_on_the_coarse_grid_replace_every_patch_they_cover() {
    let (_ps, m) = tiny_swin(true);
    let x = ibot::train::seeded_init(2, || {
        Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu))
    });
    // A 4x4 mask grid (8-px cells) on the 8x8 grid of 4-px patches.
    let mask = Tensor::zeros([2, 4, 4], (Kind::Bool, Device::Cpu));
    let none = m.forward(&x, None, false).unwrap();
    let empty = m.forward(&x, Some(&mask), false).unwrap();
    assert!(none.equal(&empty), "an empty mask changes nothing");
    let _ = mask.get(0).get(1).get(2).fill_(1);
    let _ = mask.get(1).get(3).get(0).fill_(1);
    let masked = m.forward(&x, Some(&mask), false).unwrap();
    assert!(!masked.allclose(&none, 1e-6, 1e-6, false));
    // What lies under the masked cells does not matter any more.
    let x2 = x.copy();
    let _ = x2.get(0).narrow(1, 8, 8).narrow(2, 16, 8).fill_(5.0);
    let _ = x2.get(1).narrow(1, 24, 8).narrow(2, 0, 8).fill_(-3.0);
    let masked2 = m.forward(&x2, Some(&mask), false).unwrap();
    assert!(masked.allclose(&masked2, 1e-6, 1e-6, false));
    // ... while it does without the mask.
    let unmasked2 = m.forward(&x2, None, false).unwrap();
    assert!(!unmasked2.allclose(&none, 1e-6, 1e-6, false));
    // A mask grid that does not divide the patch grid is an error, not a silent resize.
    let bad = Tensor::zeros([2, 3, 3], (Kind::Bool, Device::Cpu));
    let e = m.forward(&x, Some(&bad), false).unwrap_err();
    assert!(e.to_string().contains("does not divide"), "{e}");
}
