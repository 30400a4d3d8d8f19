//! The analysis tools of the official analysis/ folder: `ibot correspondence`, `ibot patterns`,
//! the coloured composite, contours, folders and video of `visualize-attention`, `ibot
//! combine` and `eval-linear --evaluate`. Numbers are checked against the official scripts'
//! operations run with the venv's torch at test time (tests/py/correspondence_ref.py,
//! patterns_ref.py, attn_color_ref.py, linear_ref.py); pictures for their size and for what is
//! drawn where; bad input for clear errors.
//!
//! Mutations tried by hand, each making this file fail (the assertion named): the overlap
//! tolerance without `eps` ("attention panel differs"), the nearest patch taken along the other
//! axis ("nearest patches differ"), the true nearest patch by the largest distance
//! ("true matches differ"), line ends one patch to the right (the red-pixel check of the
//! command test), each image's worst instead of best patch per prototype ("members of
//! prototype 0"), tokens counted for patches only ("counts", [CLS] case), the composite's
//! cumulative-sum rule dropped (the tie case's pixels), its grey background without the
//! truncation to an integer (pixels), top-5 counted as top-1 (the evaluate accuracy), a resumed
//! patterns run that restarts at the first part (counts of the resume test).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ibot::analysis::attention::{self, attn_color, cls_attention_maps, normalised_image};
use ibot::analysis::correspondence::{match_batch, patch_centre_pixel, PairRecord};
use ibot::analysis::patterns::{Member, StreamingTopk};
use ibot::data::ops::Rgb8;
use ibot::models::{VisionTransformer, VitConfig};
use ibot::params::ParamStore;
use tch::{Device, Kind, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_ibot");

fn tmp(name: &str) -> PathBuf {
    common::scratch_dir("analysis-tools", name)
}

fn vit(patch: i64, img: i64, seed: i64) -> VisionTransformer {
    let cfg = VitConfig {
        img_size: img,
        patch_size: patch,
        in_chans: 3,
        embed_dim: 24,
        depth: 2,
        num_heads: 3,
        mlp_ratio: 2.0,
        qkv_bias: true,
        drop_path_rate: 0.0,
        masked_im_modeling: false,
    };
    tch::manual_seed(seed);
    let mut ps = ParamStore::new();
    VisionTransformer::new(&mut ps, "", &cfg, false, Device::Cpu).unwrap()
}

/// A picture with a pattern that differs per `seed` (bright enough not to be skipped as dark).
fn picture(w: u32, h: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let v = |k: u32| {
            ((x * (7 + seed + k) + y * (13 + 3 * seed + k) + seed * 31 * k) % 200 + 55) as u8
        };
        image::Rgb([v(0), v(1), v(2)])
    })
}

/// An image folder: `classes` x `per` pictures of 24x20.
fn image_folder(dir: &Path, classes: usize, per: usize) {
    for c in 0..classes {
        let d = dir.join(format!("class{c}"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..per {
            picture(24, 20, (c * per + i) as u32)
                .save(d.join(format!("img{i}.png")))
                .unwrap();
        }
    }
}

/// Official-layout .pth files (full.pth with the head; teacher_state.pth without) of a tiny
/// seeded iBOT model: ViT width 24, 2 blocks, 4-pixel patches on 16-pixel images, 40
/// prototypes.
fn tiny_checkpoints(dir: &Path) {
    let ibot = ibot::train::Ibot::seeded(common::tiny_config(true, true), Device::Cpu, 0).unwrap();
    let named: Vec<(String, Tensor)> = ibot
        .student_ps
        .state_dict()
        .map(|(k, t)| (k.to_string(), t.detach().copy()))
        .collect();
    assert!(named.iter().any(|(k, _)| k.starts_with("head.")));
    common::make_official_pth(&named, dir, None);
}

fn run_ok(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "ibot {args:?} failed:\n{so}\n{se}");
    so
}

fn run_err(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(!out.status.success(), "ibot {args:?} should fail");
    let se = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !se.contains("panicked"),
        "a panic instead of an error: {se}"
    );
    se
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ------------------------------------------------------------------ correspondence

#[test]
fn correspondence_matches_equal_the_official_operations() {
    let dir = tmp("corr-ref");
    // The model analysed: 4-pixel patches on 16 px (4x4 grid); the attention model: 2-pixel
    // patches (8x8 grid), brought to the 4x4 grid by nearest resizing as the official 8 -> 16.
    let net = vit(4, 16, 1);
    let attn_net = vit(2, 16, 2);
    let img1 = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
    let img2 = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
    let (x1, x2, attn) = tch::no_grad(|| {
        let t1 = net.forward(&img1, None, false).unwrap().narrow(1, 1, 16);
        let t2 = net.forward(&img2, None, false).unwrap().narrow(1, 1, 16);
        (t1, t2, attn_net.get_last_selfattention(&img1).unwrap())
    });
    // Crops as fractions of the image; the second pair's second view is flipped (left > right).
    let c1 = Tensor::from_slice(&[0.1f64, 0.2, 0.8, 0.9, 0.0, 0.1, 0.7, 0.6]).reshape([2, 4]);
    let c2 = Tensor::from_slice(&[0.3f64, 0.1, 0.9, 0.7, 0.2, 0.9, 1.0, 0.3]).reshape([2, 4]);
    for (instance, topk, radius) in [(false, 5usize, 0i64), (true, 6, 0), (true, 4, 1)] {
        let cfg = Tensor::from_slice(&[topk as i64, radius, 4, 16, instance as i64]);
        let mut inputs = vec![("x1", &x1), ("x2", &x2), ("attn", &attn), ("cfg", &cfg)];
        if instance {
            inputs.push(("corners1", &c1));
            inputs.push(("corners2", &c2));
        }
        let r = common::python_reference("correspondence_ref.py", &inputs, &dir);
        let corners = instance.then_some((&c1, &c2));
        let m = match_batch(&x1, &x2, &attn, corners, topk, radius, 4, 16, false).unwrap();
        assert!(m.index.equal(&r["index"]), "nearest patches differ");
        assert!(m.value.equal(&r["value"]), "similarities differ");
        assert!(
            m.attention.equal(&r["attentions"]),
            "attention panel differs"
        );
        assert!(
            m.attention1.equal(&r["attentions1"]),
            "attention on the patch grid differs"
        );
        let (p1, p2) = (
            Vec::<i64>::try_from(r["points1"].flatten(0, -1)).unwrap(),
            Vec::<i64>::try_from(r["points2"].flatten(0, -1)).unwrap(),
        );
        let ours1: Vec<i64> = m.points.iter().flat_map(|p| p.0.clone()).collect();
        let ours2: Vec<i64> = m.points.iter().flat_map(|p| p.1.clone()).collect();
        assert_eq!(ours1, p1, "top-k patches differ");
        assert_eq!(ours2, p2, "their matches differ");
        if instance {
            let ovlp = m.overlap.as_ref().unwrap().to_kind(Kind::Float);
            assert!(ovlp.equal(&r["ovlp"]), "overlap differs");
            assert!(
                m.real_index.as_ref().unwrap().equal(&r["real_index"]),
                "true matches differ"
            );
            let acc = r["accuracy"].double_value(&[]);
            assert!(
                (m.accuracy.unwrap() - acc).abs() < 1e-6,
                "accuracy {:?} vs {acc}",
                m.accuracy
            );
            // A check that can fail: some but not all patches overlap.
            let o = ovlp.sum(Kind::Float).double_value(&[]);
            assert!(o > 0.0 && o < 32.0, "overlap count {o}");
        }
    }
    // Mutual nearest neighbours: every drawn pair is one.
    let m = match_batch(&x1, &x2, &attn, None, 16, 0, 4, 16, true).unwrap();
    let sim = x1.bmm(&x2.permute([0, 2, 1]));
    let back = sim.argmax(-2, false);
    for (b, (p1, p2)) in m.points.iter().enumerate() {
        for (&i, &j) in p1.iter().zip(p2) {
            assert_eq!(back.int64_value(&[b as i64, j]), i);
        }
    }
    // Bad input: top-k beyond the patches.
    assert!(match_batch(&x1, &x2, &attn, None, 17, 0, 4, 16, false).is_err());
}

#[test]
fn correspondence_command_draws_the_matches_and_scores_views() {
    let root = tmp("corr-cli");
    let (data, ck, out) = (root.join("data"), root.join("ck"), root.join("out"));
    std::fs::create_dir_all(&ck).unwrap();
    image_folder(&data, 2, 2);
    tiny_checkpoints(&ck);
    let full = ck.join("full.pth");
    run_ok(&[
        "correspondence",
        "--pretrained_weights",
        s(&full),
        "--num_heads",
        "2",
        "--data_path",
        s(&data),
        "--output_path",
        s(&out),
        "--topk",
        "3",
        "--device",
        "cpu",
    ]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("correspondence.json")).unwrap())
            .unwrap();
    let pairs: Vec<PairRecord> = serde_json::from_value(report["pairs"].clone()).unwrap();
    // 2 classes x 2 images in batches of 2: 4 pairs, each image with the other of its class.
    assert_eq!(pairs.len(), 4);
    for p in &pairs {
        assert_eq!(p.image1 / 2, p.image2 / 2, "a pair from two classes");
        assert_ne!(p.image1, p.image2);
        assert_eq!(p.points1.len(), 3);
        let pic = image::open(out.join(p.file.as_ref().unwrap()))
            .unwrap()
            .to_rgb8();
        assert_eq!(pic.dimensions(), (32, 16), "two 16-px images side by side");
        // The lines start and end at the patch centres: red there.
        for (&a, &b) in p.points1.iter().zip(&p.points2) {
            let (x, y) = patch_centre_pixel(a, 4, 4, 0);
            assert_eq!(
                pic.get_pixel(x as u32, y as u32).0,
                [255, 0, 0],
                "start of {a}->{b}"
            );
            let (x, y) = patch_centre_pixel(b, 4, 4, 16);
            assert_eq!(
                pic.get_pixel(x as u32, y as u32).0,
                [255, 0, 0],
                "end of {a}->{b}"
            );
        }
        assert!(p.file.as_ref().unwrap().starts_with("class_corresp"));
    }
    // The matches are the model's: recomputed here from the same views.
    let p = ibot::interop::load_pretrained_with(&full, "teacher", None, Some(2)).unwrap();
    let (_, bb) = p.backbone_model(Device::Cpu).unwrap();
    let net = bb.as_vit().unwrap();
    let ds = ibot::data::dataset::open(&data, "train").unwrap();
    let view = |i: usize| {
        let img = ds.get(i).unwrap().0;
        let v = ibot::analysis::correspondence::class_view(&img, 16);
        normalised_image(&v).unsqueeze(0)
    };
    let pr = &pairs[0];
    let (a, b) = (view(pr.image1), view(pr.image2));
    let (x1, x2, at) = tch::no_grad(|| {
        (
            net.forward(&a, None, false).unwrap().narrow(1, 1, 16),
            net.forward(&b, None, false).unwrap().narrow(1, 1, 16),
            net.get_last_selfattention(&a).unwrap(),
        )
    });
    let m = match_batch(&x1, &x2, &at, None, 3, 0, 4, 16, false).unwrap();
    assert_eq!(m.points[0].0, pr.points1);
    assert_eq!(m.points[0].1, pr.points2);

    // With the attention map in front: three panels, lines from the second to the third.
    let out2 = root.join("out2");
    run_ok(&[
        "correspondence",
        "--pretrained_weights",
        s(&full),
        "--num_heads",
        "2",
        "--data_path",
        s(&data),
        "--output_path",
        s(&out2),
        "--topk",
        "2",
        "--show_with_attn",
        "true",
        "--show_nums",
        "1",
        "--device",
        "cpu",
    ]);
    let files: Vec<_> = std::fs::read_dir(&out2)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .collect();
    assert_eq!(files.len(), 1, "--show_nums 1");
    let pic = image::open(files[0].path()).unwrap().to_rgb8();
    assert_eq!(pic.dimensions(), (48, 16));

    // Instance mode: two views of each image, and the matching accuracy.
    let out3 = root.join("out3");
    let so = run_ok(&[
        "correspondence",
        "--pretrained_weights",
        s(&full),
        "--num_heads",
        "2",
        "--data_path",
        s(&data),
        "--output_path",
        s(&out3),
        "--sample_type",
        "instance",
        "--eval_radius",
        "1",
        "--topk",
        "2",
        "--device",
        "cpu",
    ]);
    assert!(so.contains("matching accuracy (eval_radius 1)"), "{so}");
    assert!(out3.join("correspondence.json").is_file());

    // Bad input: --topk beyond the patches, an image size that is not whole patches, a flat
    // folder in class mode.
    let e = run_err(&[
        "correspondence",
        "--pretrained_weights",
        s(&full),
        "--num_heads",
        "2",
        "--data_path",
        s(&data),
        "--output_path",
        s(&out3),
        "--topk",
        "17",
        "--device",
        "cpu",
    ]);
    assert!(e.contains("--topk 17"), "{e}");
    let e = run_err(&[
        "correspondence",
        "--pretrained_weights",
        s(&full),
        "--num_heads",
        "2",
        "--data_path",
        s(&data),
        "--output_path",
        s(&out3),
        "--img_size",
        "2",
        "--device",
        "cpu",
    ]);
    assert!(e.contains("--img_size 2"), "{e}");
    let flat = root.join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    picture(20, 20, 1).save(flat.join("a.png")).unwrap();
    picture(20, 20, 2).save(flat.join("b.png")).unwrap();
    let e = run_err(&[
        "correspondence",
        "--pretrained_weights",
        s(&full),
        "--num_heads",
        "2",
        "--data_path",
        s(&flat),
        "--output_path",
        s(&out3),
        "--device",
        "cpu",
    ]);
    assert!(e.contains("class sub-folders"), "{e}");
}

// ------------------------------------------------------------------ patterns

/// Members of the official candidate list that really belong to the prototype, in order.
fn official_members(r: &std::collections::HashMap<String, Tensor>, c: i64) -> Vec<(i64, i64)> {
    let k = r["member"].size()[1];
    (0..k)
        .filter(|&j| r["member"].int64_value(&[c, j]) == 1)
        .map(|j| {
            (
                r["members"].int64_value(&[c, j, 0]),
                r["members"].int64_value(&[c, j, 1]),
            )
        })
        .collect()
}

#[test]
fn streaming_topk_equals_the_official_memory_bank() {
    let dir = tmp("patterns-ref");
    tch::manual_seed(5);
    // Positive values as the head's largest logits are, 12 prototypes so that they collide.
    for (patch, topk) in [(true, 3usize), (false, 4)] {
        let logits = if patch {
            Tensor::rand([11, 9, 12], (Kind::Float, Device::Cpu))
        } else {
            Tensor::rand([11, 12], (Kind::Float, Device::Cpu))
        };
        let cfg = Tensor::from_slice(&[topk as i64, 5, 3]);
        let r = common::python_reference(
            "patterns_ref.py",
            &[("logits", &logits), ("cfg", &cfg)],
            &dir,
        );
        let keep = if patch { 2 * topk } else { topk };
        let mut st = StreamingTopk::new(12, keep);
        // In uneven batches, as the chunks and batches of a run cut the data set.
        for (a, b) in [(0i64, 3i64), (3, 4), (4, 9), (9, 11)] {
            let ids: Vec<i64> = (a..b).collect();
            st.update(&logits.narrow(0, a, b - a), &ids).unwrap();
        }
        assert_eq!(
            st.counts,
            Vec::<i64>::try_from(&r["counts"]).unwrap(),
            "counts"
        );
        for c in 0..12 {
            let ours: Vec<(i64, i64)> = st
                .members(c)
                .iter()
                .map(|m: &Member| (m.image, m.spatial))
                .collect();
            assert_eq!(
                ours,
                official_members(&r, c as i64),
                "members of prototype {c} ({})",
                if patch { "patch" } else { "cls" }
            );
        }
        // A check that can fail: some prototypes have several members.
        assert!((0..12).any(|c| st.members(c).len() > 1));
    }
}

#[test]
fn patterns_command_draws_grids_resumes_and_refuses_bad_input() {
    let root = tmp("patterns-cli");
    let (data, ck, out) = (root.join("data"), root.join("ck"), root.join("out"));
    std::fs::create_dir_all(&ck).unwrap();
    image_folder(&data, 2, 3);
    tiny_checkpoints(&ck);
    let full = ck.join("full.pth");
    let args = |out: &Path, topk: &str, chunks: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "patterns",
            "--pretrained_weights",
            s(&full),
            "--num_heads",
            "2",
            "--data_path",
            s(&data),
            "--save_path",
            s(out),
            "--topk",
            topk,
            "--show_pics",
            "3",
            "--patch_window",
            "3",
            "--chunks",
            chunks,
            "--batch_size",
            "2",
            "--device",
            "cpu",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let a: Vec<String> = args(&out, "4", "2", &[]);
    run_ok(&a.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    let json = std::fs::read_to_string(out.join("patterns_patch.json")).unwrap();
    let shown: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert!(!shown.is_empty() && shown.len() <= 3);
    // The counts and members are those of the head over the same views, in memory.
    let p = ibot::interop::load_pretrained_with(&full, "teacher", None, Some(2)).unwrap();
    let (_, bb) = p.backbone_model(Device::Cpu).unwrap();
    let (_, head) = p.head_model(Device::Cpu).unwrap().unwrap();
    let ds = ibot::data::dataset::open(&data, "train").unwrap();
    // In batches of 2, as the command ran.
    let mut st = StreamingTopk::new(40, 8);
    for b in 0..3i64 {
        let x = Tensor::cat(
            &(2 * b..2 * b + 2)
                .map(|i| {
                    normalised_image(
                        &ibot::analysis::patterns::pattern_view(&ds.get(i as usize).unwrap().0, 16)
                            .unwrap(),
                    )
                    .unsqueeze(0)
                })
                .collect::<Vec<_>>(),
            0,
        );
        let logits = ibot::analysis::patterns::head_logits(
            bb.as_vit().unwrap(),
            &head,
            &x,
            ibot::analysis::patterns::PatternType::Patch,
        )
        .unwrap();
        st.update(&logits, &[2 * b, 2 * b + 1]).unwrap();
    }
    let ranked = st.most_populated(3);
    for (rank, v) in shown.iter().enumerate() {
        let c = v["cluster"].as_u64().unwrap() as usize;
        assert_eq!(c, ranked[rank], "rank {rank}");
        assert_eq!(v["count"].as_i64().unwrap(), st.counts[c]);
        let members: Vec<Member> = serde_json::from_value(v["members"].clone()).unwrap();
        let want: Vec<(i64, i64)> = st.members(c).iter().map(|m| (m.image, m.spatial)).collect();
        assert_eq!(
            members
                .iter()
                .map(|m| (m.image, m.spatial))
                .collect::<Vec<_>>(),
            want
        );
        // The grid: ceil(sqrt(4)) = 2 tiles of 3x3 patches of 4 px a side; drawn tiles are
        // not black, the others are.
        let grid = image::open(out.join(v["file"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        assert_eq!(grid.dimensions(), (24, 24));
        let drawn = v["drawn"].as_array().unwrap().len();
        assert!(drawn >= 1 && drawn <= 4);
        for t in 0..4u32 {
            let (x0, y0) = ((t % 2) * 12, (t / 2) * 12);
            // The window's centre patch is highlighted: the tile's middle pixel.
            let px = grid.get_pixel(x0 + 6, y0 + 6).0;
            if (t as usize) < drawn {
                assert!(px.iter().any(|&c| c > 40), "tile {t} of {drawn} is black");
            } else {
                assert_eq!(px, [0, 0, 0], "tile {t} beyond the {drawn} drawn");
            }
        }
    }
    assert!(out.join("topk_state_patch.safetensors").is_file());
    // Rerunning resumes from the finished state and writes the same lists.
    run_ok(&a.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert_eq!(
        std::fs::read_to_string(out.join("patterns_patch.json")).unwrap(),
        json
    );
    // Another run's state is refused.
    let b = args(&out, "4", "3", &[]);
    let e = run_err(&b.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert!(e.contains("made by another run"), "{e}");
    // [CLS] patterns: whole images, 2x2 tiles of 16 px.
    let out_cls = root.join("cls");
    let c = args(&out_cls, "2", "2", &["--type", "cls"]);
    run_ok(&c.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    let shown: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out_cls.join("patterns_cls.json")).unwrap())
            .unwrap();
    let grid = image::open(out_cls.join(shown[0]["file"].as_str().unwrap()))
        .unwrap()
        .to_rgb8();
    assert_eq!(grid.dimensions(), (32, 32));
    // Bad input: fewer images than --topk; weights without a head.
    let d = args(&root.join("few"), "7", "2", &[]);
    let e = run_err(&d.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert!(e.contains("fewer than --topk 7"), "{e}");
    let e = run_err(&[
        "patterns",
        "--pretrained_weights",
        s(&ck.join("teacher_state.pth")),
        "--num_heads",
        "2",
        "--data_path",
        s(&data),
        "--save_path",
        s(&root.join("nohead")),
        "--device",
        "cpu",
    ]);
    assert!(e.contains("no projection head"), "{e}");
}

// ------------------------------------------------------------------ attention extras

#[test]
fn colour_composite_equals_the_official_pixels() {
    let dir = tmp("color-ref");
    tch::manual_seed(11);
    // 7 heads: the official composite takes the first six.
    // The third case gives heads 0 and 1 the same map: where they tie for the largest
    // attention, only the first may paint (the official cumulative-sum rule).
    for (heads, gh, gw, t, tie) in [
        (3i64, 3i64, 4i64, 0.6f64, false),
        (7, 4, 4, 0.9, false),
        (3, 3, 3, 0.8, true),
    ] {
        let n = 1 + gh * gw;
        let mut attn = (Tensor::randn([1, heads, n, n], (Kind::Float, Device::Cpu)) * 2.0)
            .softmax(-1, Kind::Float);
        if tie {
            let h0 = attn.narrow(1, 0, 1);
            attn = Tensor::cat(&[h0.shallow_clone(), h0, attn.narrow(1, 2, heads - 2)], 1);
        }
        let maps = cls_attention_maps(&attn, gh, gw, Some(t)).unwrap();
        let img = Rgb8::new(
            (gw * 4) as usize,
            (gh * 4) as usize,
            (0..gw * gh * 16 * 3)
                .map(|i| ((i * 37 + i / 5) % 256) as u8)
                .collect(),
        );
        let x = normalised_image(&img);
        let r = common::python_reference(
            "attn_color_ref.py",
            &[
                ("img", &x),
                ("attentions", &maps.attentions),
                ("th_attn", maps.th_attn.as_ref().unwrap()),
                ("patch", &Tensor::from(4i64)),
            ],
            &dir,
        );
        let ours = attn_color(&x, &maps, 4).unwrap();
        let want = Vec::<u8>::try_from(r["pic"].flatten(0, -1)).unwrap();
        assert_eq!(
            ours.data, want,
            "{heads} heads at threshold {t} (tie {tie})"
        );
        // A check that can fail: coloured pixels and grey ones both occur.
        let grey = ours
            .data
            .chunks(3)
            .filter(|p| p[0] == p[1] && p[1] == p[2])
            .count();
        assert!(grey > 0 && grey < ours.data.len() / 3);
    }
}

#[test]
fn mask_outlines_folders_and_attention_video() {
    // The outline: masked pixels on the mask's edge are pure red, inner ones blended.
    let img = Rgb8::new(12, 12, vec![100; 12 * 12 * 3]);
    let mask = Tensor::from_slice(&[0f32, 0., 0., 0., 1., 1., 0., 1., 1.]).reshape([3, 3]);
    let m = attention::masked_image(&img, &mask, 4).unwrap();
    let px = |x: usize, y: usize| &m.data[(y * 12 + x) * 3..(y * 12 + x) * 3 + 3];
    assert_eq!(px(4, 4), [255, 0, 0], "edge of the mask");
    assert_eq!(px(11, 11), [255, 0, 0], "edge at the picture's border");
    assert_eq!(px(7, 7), [177, 50, 50], "inside: half red");
    assert_eq!(px(1, 1), [100, 100, 100], "outside: untouched");

    let root = tmp("attn-folder");
    let (data, ck) = (root.join("data"), root.join("ck"));
    std::fs::create_dir_all(&ck).unwrap();
    image_folder(&data, 1, 2);
    tiny_checkpoints(&ck);
    let full = ck.join("full.pth");
    // A whole folder in one run, each image into its own folder.
    let out = root.join("out");
    run_ok(&[
        "visualize-attention",
        "--pretrained_weights",
        s(&full),
        "--num_heads",
        "2",
        "--image_path",
        s(&data),
        "--image_size",
        "16",
        "20",
        "--output_dir",
        s(&out),
        "--device",
        "cpu",
    ]);
    for sub in ["id0_img0", "id1_img1"] {
        let d = out.join(sub);
        let strip = image::open(d.join("attn.png")).unwrap().to_rgb8();
        // The image, the composite and two heads, 20x16 each (the official final picture).
        assert_eq!(strip.dimensions(), (4 * 20, 16), "{sub}");
        let colour = image::open(d.join("attn_color.png")).unwrap().to_rgb8();
        assert_eq!(colour.dimensions(), (20, 16));
        assert!(d.join("mask_th0.6_head1.png").is_file());
    }

    // Video: frames in, attention frames and an animated GIF out.
    let frames = root.join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    for i in 0..3 {
        picture(26, 21, i)
            .save(frames.join(format!("frame-{i:04}.png")))
            .unwrap();
    }
    let vout = root.join("video");
    run_ok(&[
        "video-generation",
        "--pretrained_weights",
        s(&full),
        "--num_heads",
        "2",
        "--input_path",
        s(&frames),
        "--output_path",
        s(&vout),
        "--fps",
        "5",
        "--device",
        "cpu",
    ]);
    for i in 0..3 {
        let f = image::open(vout.join(format!("attention/attn-frame-{i:04}.png")))
            .unwrap()
            .to_rgb8();
        assert_eq!(f.dimensions(), (24, 20), "cut to whole 4-px patches");
    }
    use image::AnimationDecoder;
    let gif = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
        std::fs::File::open(vout.join("video.gif")).unwrap(),
    ))
    .unwrap();
    let gframes = gif.into_frames().collect_frames().unwrap();
    assert_eq!(gframes.len(), 3);
    assert_eq!(
        gframes[0].delay().numer_denom_ms().0 / gframes[0].delay().numer_denom_ms().1.max(1),
        200
    );
    assert_eq!(gframes[0].buffer().dimensions(), (24, 20));
    // The GIF's frames are the attention frames (up to the 256-colour palette).
    let first = image::open(vout.join("attention/attn-frame-0000.png"))
        .unwrap()
        .to_rgb8();
    let diff: f64 = first
        .pixels()
        .zip(gframes[0].buffer().pixels())
        .map(|(a, b)| {
            (0..3)
                .map(|k| (a.0[k] as f64 - b.0[k] as f64).abs())
                .sum::<f64>()
        })
        .sum::<f64>()
        / (24.0 * 20.0 * 3.0);
    assert!(diff < 4.0, "mean colour difference {diff}");
    // --video_only on the attention frames.
    let vout2 = root.join("video2");
    run_ok(&[
        "video-generation",
        "--video_only",
        "--input_path",
        s(&vout.join("attention")),
        "--output_path",
        s(&vout2),
    ]);
    assert!(vout2.join("video.gif").is_file());
    // Bad input: a frame smaller than a patch; a format that needs a codec; a video file.
    let tiny = root.join("tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    picture(3, 3, 0).save(tiny.join("f.png")).unwrap();
    let e = run_err(&[
        "video-generation",
        "--pretrained_weights",
        s(&full),
        "--num_heads",
        "2",
        "--input_path",
        s(&tiny),
        "--output_path",
        s(&vout2),
        "--device",
        "cpu",
    ]);
    assert!(e.contains("smaller than one 4-pixel patch"), "{e}");
    let e = run_err(&[
        "video-generation",
        "--pretrained_weights",
        s(&full),
        "--num_heads",
        "2",
        "--input_path",
        s(&frames),
        "--output_path",
        s(&vout2),
        "--video_format",
        "mp4",
    ]);
    assert!(e.contains("GIF"), "{e}");
    let e = run_err(&[
        "video-generation",
        "--pretrained_weights",
        s(&full),
        "--num_heads",
        "2",
        "--input_path",
        s(&frames.join("frame-0000.png")),
        "--output_path",
        s(&vout2),
    ]);
    assert!(e.contains("folder of frames"), "{e}");
}

// ------------------------------------------------------------------ combine + evaluate

#[test]
fn combined_model_evaluates_as_the_official_validation() {
    let root = tmp("combine");
    let (data, ck) = (root.join("data"), root.join("ck"));
    std::fs::create_dir_all(&ck).unwrap();
    image_folder(&data, 6, 2); // 6 classes, so top-5 is reported
    tiny_checkpoints(&ck);
    let backbone = ck.join("teacher_state.pth");
    // A classifier on the last block's [CLS] (width 24), 6 classes; a second one for a sweep.
    tch::manual_seed(3);
    let (w, b) = (
        Tensor::randn([6, 24], (Kind::Float, Device::Cpu)),
        Tensor::randn([6], (Kind::Float, Device::Cpu)),
    );
    let (w2, b2) = (
        Tensor::randn([6, 24], (Kind::Float, Device::Cpu)),
        Tensor::randn([6], (Kind::Float, Device::Cpu)),
    );
    // The features the official validation computes for these images (eval views, CLS).
    let p = ibot::interop::load_pretrained_with(&backbone, "teacher", None, Some(2)).unwrap();
    let (_, bb) = p.backbone_model(Device::Cpu).unwrap();
    let ds = ibot::data::dataset::open(&data, "train").unwrap();
    let idx: Vec<usize> = (0..ds.len()).collect();
    let (x, labels) = ibot::eval::features::eval_batch(ds.as_ref(), &idx, 16).unwrap();
    let spec = ibot::eval::features::FeatureSpec {
        n_last_blocks: 1,
        avgpool: 0,
    };
    let feats = tch::no_grad(|| spec.features_of(&bb, &x).unwrap());
    let npz = root.join("lin.npz");
    Tensor::write_npz(
        &[
            ("weight", &w),
            ("bias", &b),
            ("weight2", &w2),
            ("bias2", &b2),
            ("feats", &feats),
            ("labels", &labels),
        ],
        &npz,
    )
    .unwrap();
    let st = Command::new(common::venv_python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/linear_ref.py"))
        .arg(&npz)
        .arg(root.join("ref.npz"))
        .arg(&ck)
        .status()
        .unwrap();
    assert!(st.success());
    let r: std::collections::HashMap<String, Tensor> = Tensor::read_npz(root.join("ref.npz"))
        .unwrap()
        .into_iter()
        .collect();
    let (acc1, acc5) = (r["acc1"].double_value(&[]), r["acc5"].double_value(&[]));
    assert!(acc5 > acc1, "a reference that cannot tell top-1 from top-5");

    let comb = root.join("combined.safetensors");
    let so = run_ok(&[
        "combine",
        "--checkpoint_backbone",
        s(&backbone),
        "--num_heads",
        "2",
        "--checkpoint_linear",
        s(&ck.join("linear.pth")),
        "--output_file",
        s(&comb),
        "--n_last_blocks",
        "1",
    ]);
    assert!(so.contains("6 classes"), "{so}");
    let parse = |so: &str| -> (f64, f64) {
        let l = so
            .lines()
            .find(|l| l.starts_with("* Acc@1"))
            .unwrap_or_else(|| panic!("{so}"));
        let v: Vec<&str> = l.split_whitespace().collect();
        (v[2].parse().unwrap(), v[4].parse().unwrap())
    };
    // The combined file alone (its feature options recorded in it) ...
    let so = run_ok(&[
        "eval-linear",
        "--evaluate",
        "--pretrained_weights",
        s(&comb),
        "--data_path",
        s(&data),
        "--device",
        "cpu",
    ]);
    let (a1, a5) = parse(&so);
    assert!(
        (a1 - acc1).abs() < 1e-3 && (a5 - acc5).abs() < 1e-3,
        "{a1} {a5} vs {acc1} {acc5}"
    );
    // ... the backbone with the official linear checkpoint ...
    let so = run_ok(&[
        "eval-linear",
        "--evaluate",
        "--pretrained_weights",
        s(&backbone),
        "--num_heads",
        "2",
        "--pretrained_linear",
        s(&ck.join("linear.pth")),
        "--n_last_blocks",
        "1",
        "--data_path",
        s(&data),
        "--device",
        "cpu",
    ]);
    assert_eq!(parse(&so), (a1, a5));
    // ... and the sweep's classifier 1 (the same one) picked by --head_index.
    let so = run_ok(&[
        "eval-linear",
        "--evaluate",
        "--pretrained_weights",
        s(&backbone),
        "--num_heads",
        "2",
        "--pretrained_linear",
        s(&ck.join("multi.pth")),
        "--head_index",
        "1",
        "--n_last_blocks",
        "1",
        "--data_path",
        s(&data),
        "--device",
        "cpu",
    ]);
    assert_eq!(parse(&so), (a1, a5));
    // The combined file is a backbone for every other command too.
    let p2 = ibot::interop::load_pretrained(&comb, "teacher", None).unwrap();
    assert!(p2.linear.contains_key("weight") && p2.backbone_model(Device::Cpu).is_ok());

    // Bad input: a sweep without --head_index, feature options that do not fit, a backbone
    // without a classifier, an existing output.
    let e = run_err(&[
        "eval-linear",
        "--evaluate",
        "--pretrained_weights",
        s(&backbone),
        "--num_heads",
        "2",
        "--pretrained_linear",
        s(&ck.join("multi.pth")),
        "--n_last_blocks",
        "1",
        "--data_path",
        s(&data),
        "--device",
        "cpu",
    ]);
    assert!(e.contains("--head_index"), "{e}");
    let e = run_err(&[
        "combine",
        "--checkpoint_backbone",
        s(&backbone),
        "--num_heads",
        "2",
        "--checkpoint_linear",
        s(&ck.join("linear.pth")),
        "--output_file",
        s(&root.join("x.safetensors")),
        "--n_last_blocks",
        "2",
    ]);
    assert!(e.contains("takes 24 features"), "{e}");
    let e = run_err(&[
        "eval-linear",
        "--evaluate",
        "--pretrained_weights",
        s(&backbone),
        "--num_heads",
        "2",
        "--data_path",
        s(&data),
        "--device",
        "cpu",
    ]);
    assert!(e.contains("no linear classifier"), "{e}");
    let e = run_err(&[
        "combine",
        "--checkpoint_backbone",
        s(&backbone),
        "--num_heads",
        "2",
        "--checkpoint_linear",
        s(&ck.join("linear.pth")),
        "--output_file",
        s(&comb),
        "--n_last_blocks",
        "1",
    ]);
    assert!(e.contains("--force"), "{e}");
}

/// A data set whose images from `fail_from` on cannot be read (an interrupted run).
struct FailFrom {
    inner: Box<dyn ibot::data::dataset::Dataset>,
    fail_from: usize,
}

impl ibot::data::dataset::Dataset for FailFrom {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn get(&self, index: usize) -> anyhow::Result<(Rgb8, i64)> {
        anyhow::ensure!(index < self.fail_from, "image {index} is unreadable");
        self.inner.get(index)
    }
    fn label(&self, index: usize) -> i64 {
        self.inner.label(index)
    }
    fn classes(&self) -> &[String] {
        self.inner.classes()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[test]
fn patterns_resume_after_an_interruption_as_if_uninterrupted() {
    use ibot::analysis::patterns::{collect, state_path, PatternType, PatternsConfig};
    let root = tmp("patterns-resume");
    let (data, ck) = (root.join("data"), root.join("ck"));
    std::fs::create_dir_all(&ck).unwrap();
    image_folder(&data, 3, 3);
    tiny_checkpoints(&ck);
    let p = ibot::interop::load_pretrained_with(&ck.join("full.pth"), "teacher", None, Some(2))
        .unwrap();
    let (_, bb) = p.backbone_model(Device::Cpu).unwrap();
    let (_, head) = p.head_model(Device::Cpu).unwrap().unwrap();
    let net = bb.as_vit().unwrap();
    let cfg = |dir: &str| PatternsConfig {
        pattern_type: PatternType::Patch,
        topk: 3,
        show_pics: 4,
        patch_window: 3,
        chunks: 3,
        batch_size: 2,
        img_size: 16,
        save_path: root.join(dir),
        num_workers: 1,
        fingerprint: "tiny".into(),
    };
    let whole = collect(
        &cfg("whole"),
        net,
        &head,
        ibot::data::dataset::open(&data, "train").unwrap().as_ref(),
        Device::Cpu,
    )
    .unwrap();
    // Interrupted in the second part (images 3..6): the first part's state is on disk.
    let broken = FailFrom {
        inner: ibot::data::dataset::open(&data, "train").unwrap(),
        fail_from: 4,
    };
    let c = cfg("resumed");
    assert!(collect(&c, net, &head, &broken, Device::Cpu).is_err());
    let md = ibot::params::read_safetensors_metadata(&state_path(&c)).unwrap();
    assert!(md["ibot_patterns_state"].contains("\"done\":1"), "{md:?}");
    // The rerun starts at the second part and ends where the uninterrupted run did.
    let resumed = collect(
        &c,
        net,
        &head,
        ibot::data::dataset::open(&data, "train").unwrap().as_ref(),
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(resumed.counts, whole.counts);
    for k in 0..whole.out_dim() {
        assert_eq!(resumed.members(k), whole.members(k), "prototype {k}");
    }
    assert!(whole.counts.iter().sum::<i64>() == 9 * 16);
}
