//! Behaviour of the model pieces beyond the reference fixture: the shared/unshared head cases
//! of the official code, weights I/O, drop path, and clear errors on bad input.

mod common;

use ibot::loss::SingleProcess;
use ibot::models::{MultiCropWrapper, VitConfig};
use ibot::params::ParamStore;
use ibot::train::{Ibot, NonFiniteLoss};
use tch::{Device, Kind, Tensor};

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

fn views(b: i64) -> (Vec<Tensor>, Vec<Tensor>) {
    let mut v: Vec<Tensor> = (0..2).map(|_| Tensor::randn([b, 3, 16, 16], CPU)).collect();
    v.extend((0..2).map(|_| Tensor::randn([b, 3, 8, 8], CPU)));
    let m: Vec<Tensor> = (0..2)
        .map(|_| Tensor::rand([b, 4, 4], CPU).lt(0.4))
        .collect();
    (v, m)
}

#[test]
fn shared_head_is_one_tensor_under_two_state_dict_names() {
    tch::manual_seed(0);
    let ibot = Ibot::new(common::tiny_config(true, true), Device::Cpu).unwrap();
    let ps = &ibot.student_ps;
    let a = ps.get("head.last_layer.weight_v").unwrap();
    let b = ps.get("head.last_layer2.weight_v").unwrap();
    assert_eq!(a.data_ptr(), b.data_ptr());
    assert!(
        ps.named("head.last_layer2.weight_v").is_none(),
        "an alias is not a named parameter"
    );
    assert!(ps
        .state_dict()
        .any(|(k, _)| k == "head.last_layer2.weight_g"));
}

/// Official default: student head not shared, teacher head shared. The teacher's single last
/// layer ends up with the student's `last_layer2` (visited last by load_state_dict), and the EMA
/// then pulls it towards the student's `last_layer` (the only common name).
#[test]
fn unshared_student_and_shared_teacher_follow_the_official_quirks() {
    tch::manual_seed(1);
    let ibot = Ibot::new(common::tiny_config(false, true), Device::Cpu).unwrap();
    let t = ibot
        .teacher_ps
        .get("head.last_layer.weight_v")
        .unwrap()
        .copy();
    let s1 = ibot
        .student_ps
        .get("head.last_layer.weight_v")
        .unwrap()
        .detach()
        .copy();
    let s2 = ibot
        .student_ps
        .get("head.last_layer2.weight_v")
        .unwrap()
        .detach()
        .copy();
    assert!(t.equal(&s2) && !t.equal(&s1));
    ibot.update_teacher(0.5);
    let expected = &s2 * 0.5 + &s1 * 0.5;
    let after = ibot.teacher_ps.get("head.last_layer.weight_v").unwrap();
    assert!(after.allclose(&expected, 1e-6, 1e-7, false));
    assert!(ibot.teacher_ps.get("backbone.masked_embed").is_none());
}

#[test]
fn a_training_step_runs_and_moves_the_teacher() {
    tch::manual_seed(2);
    let mut ibot = Ibot::new(common::tiny_config(false, true), Device::Cpu).unwrap();
    let before = ibot
        .teacher_ps
        .get("backbone.blocks.0.attn.qkv.weight")
        .unwrap()
        .copy();
    let frozen = ibot
        .student_ps
        .get("head.last_layer.weight_v")
        .unwrap()
        .detach()
        .copy();
    let (v, m) = views(4);
    let (stats, pred) = ibot
        .train_step(&v, &m, 0, 1e-3, 0.04, 0.9, &SingleProcess)
        .unwrap();
    assert_eq!(pred.size(), [4]);
    assert!(stats.loss.is_finite() && stats.cls > 0.0 && stats.patch > 0.0);
    let after = ibot
        .teacher_ps
        .get("backbone.blocks.0.attn.qkv.weight")
        .unwrap();
    assert!(!after.equal(&before), "EMA did not move the teacher");
    // epoch 0 < freeze_last_layer 1: the last layer is untouched, weight decay included.
    assert!(ibot
        .student_ps
        .get("head.last_layer.weight_v")
        .unwrap()
        .detach()
        .equal(&frozen));
    // From epoch 1 on it trains.
    let _ = ibot
        .train_step(&v, &m, 1, 1e-3, 0.04, 0.9, &SingleProcess)
        .unwrap();
    assert!(!ibot
        .student_ps
        .get("head.last_layer.weight_v")
        .unwrap()
        .detach()
        .equal(&frozen));
}

#[test]
fn a_non_finite_loss_is_reported_as_such() {
    tch::manual_seed(3);
    let mut ibot = Ibot::new(common::tiny_config(true, true), Device::Cpu).unwrap();
    let (mut v, m) = views(2);
    v[0] = Tensor::full([2, 3, 16, 16], f64::NAN, CPU);
    let before = ibot
        .student_ps
        .get("backbone.cls_token")
        .unwrap()
        .detach()
        .copy();
    let err = ibot
        .train_step(&v, &m, 0, 1e-3, 0.04, 0.9, &SingleProcess)
        .unwrap_err();
    assert!(err.downcast_ref::<NonFiniteLoss>().is_some(), "{err:#}");
    assert!(
        ibot.student_ps
            .get("backbone.cls_token")
            .unwrap()
            .detach()
            .equal(&before),
        "weights changed"
    );
}

#[test]
fn drop_path_is_random_in_training_and_off_in_eval() {
    tch::manual_seed(4);
    let mut cfg = common::tiny_config(true, true);
    cfg.backbone.as_vit_mut().unwrap().drop_path_rate = 0.5;
    let mut ps = ParamStore::new();
    let model =
        MultiCropWrapper::new(&mut ps, &cfg.backbone, &cfg.head, true, Device::Cpu).unwrap();
    let x = Tensor::randn([16, 3, 16, 16], CPU);
    let e1 = model.backbone.forward(&x, None, false).unwrap();
    let e2 = model.backbone.forward(&x, None, false).unwrap();
    assert!(e1.equal(&e2));
    let t1 = model.backbone.forward(&x, None, true).unwrap();
    assert!(!t1.equal(&e1));
}

#[test]
fn bad_inputs_are_clear_errors() {
    tch::manual_seed(5);
    let cfg = common::tiny_config(true, true);
    let mut ps = ParamStore::new();
    let model =
        MultiCropWrapper::new(&mut ps, &cfg.backbone, &cfg.head, true, Device::Cpu).unwrap();
    let vit = model.backbone.as_vit().unwrap();
    let e = vit
        .forward(&Tensor::randn([2, 3, 18, 16], CPU), None, false)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("not a positive multiple of the patch size 4"),
        "{e}"
    );
    let e = vit
        .forward(&Tensor::randn([2, 1, 16, 16], CPU), None, false)
        .unwrap_err();
    assert!(e.to_string().contains("channels"), "{e}");
    let e = vit
        .forward(&Tensor::randn([3, 16, 16], CPU), None, false)
        .unwrap_err();
    assert!(e.to_string().contains("[B, C, H, W]"), "{e}");
    let bad_mask = Tensor::zeros([2, 3, 4], (Kind::Bool, Device::Cpu));
    let e = vit
        .forward(&Tensor::randn([2, 3, 16, 16], CPU), Some(&bad_mask), false)
        .unwrap_err();
    assert!(e.to_string().contains("mask shape"), "{e}");
    let e = VitConfig::from_arch("vit_huge", 16).unwrap_err();
    assert!(
        e.to_string().contains("unknown architecture 'vit_huge'"),
        "{e}"
    );
    let e = VitConfig {
        patch_size: 5,
        ..VitConfig::from_arch("vit_small", 16).unwrap()
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("multiple of patch_size"), "{e}");
}

#[test]
fn weights_round_trip_through_safetensors_and_bad_files_are_refused() {
    tch::manual_seed(6);
    let cfg = common::tiny_config(false, true);
    let dir = std::env::temp_dir().join(format!("ibot-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("student.safetensors");

    let mut a = ParamStore::new();
    MultiCropWrapper::new(&mut a, &cfg.backbone, &cfg.head, true, Device::Cpu).unwrap();
    a.save_safetensors(&path, "").unwrap();
    let mut b = ParamStore::new();
    MultiCropWrapper::new(&mut b, &cfg.backbone, &cfg.head, true, Device::Cpu).unwrap();
    b.load_safetensors(&path, "").unwrap();
    for (pa, pb) in a.params().iter().zip(b.params()) {
        assert!(
            pa.tensor.detach().equal(&pb.tensor.detach()),
            "{} differs",
            pa.name
        );
    }

    // A model of another shape: the error names the parameter and both shapes.
    let mut other = cfg.clone();
    other.backbone.as_vit_mut().unwrap().embed_dim = 32;
    other.head.in_dim = 32;
    let mut c = ParamStore::new();
    MultiCropWrapper::new(&mut c, &other.backbone, &other.head, true, Device::Cpu).unwrap();
    let e = format!("{:#}", c.load_safetensors(&path, "").unwrap_err());
    assert!(
        e.contains("backbone.") && e.contains("expected shape"),
        "{e}"
    );

    // Missing keys.
    let e = format!("{:#}", b.load_safetensors(&path, "student.").unwrap_err());
    assert!(e.contains("missing key"), "{e}");

    // A truncated file is refused, not a panic, and the good file stays readable.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = format!("{:#}", b.load_safetensors(&cut, "").unwrap_err());
    assert!(e.contains("not a valid safetensors file"), "{e}");
    std::fs::write(&cut, b"garbage").unwrap();
    assert!(b.load_safetensors(&cut, "").is_err());
    b.load_safetensors(&path, "").unwrap();

    // Metadata is read from the header alone, and the header must account for every byte.
    let named = vec![("t".to_string(), Tensor::ones([3], CPU))];
    let md: std::collections::HashMap<String, String> = [("k".to_string(), "v".to_string())].into();
    let with_md = dir.join("md.safetensors");
    ibot::params::write_safetensors(&with_md, &named, Some(md.clone())).unwrap();
    assert_eq!(
        ibot::params::read_safetensors_metadata(&with_md).unwrap(),
        md
    );
    let full = std::fs::read(&with_md).unwrap();
    for bad in [
        &full[..full.len() - 1],
        &full[..10],
        &[full.clone(), vec![0]].concat()[..],
    ] {
        std::fs::write(&cut, bad).unwrap();
        let e = format!(
            "{:#}",
            ibot::params::read_safetensors_metadata(&cut).unwrap_err()
        );
        assert!(e.contains("not a valid safetensors file"), "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The training path (patch head on masked tokens only, locals' [CLS] only; the teacher's patch
/// last layer only at the masked positions of the student's view of the same index plus once
/// on each sample's mean bottleneck output for the centre) gives the loss, centres and
/// gradients of the full forward pass, for every head layout (the last case, no bottleneck,
/// keeps the teacher's head on every token), with masks that include an image without any
/// masked patch; and it fails loudly when the masks do not fit. Tolerances: 1e-6 of the scale
/// for losses and centres, 1e-5 for gradients (float32 summation order; the two paths agree to
/// ~1e-7). Mutations of the lean teacher path checked by hand to fail here: teacher rows taken
/// from the other global view (`masked` shifted by B·N modulo G·B·N: "patch loss" off by 0.62
/// on 6.3), the centre from view 0's token means counted twice ("center2" off by 6.5e-3 on
/// 1.1e-2), the token mean over the masked tokens only instead of all (9.8e-3 on 1.1e-2), the
/// mean taken over the [CLS] token too (4.3e-3 on 8.1e-3), and no centre update on the lean
/// path ("center" off by its whole value). (Which view's means go to which row of the centre
/// sum cannot matter: the centre sums over every sample of every view.)
#[test]
fn the_lean_training_forward_equals_the_full_one() {
    for (shared, shared_t, bottleneck) in [
        (false, true, 8),
        (true, true, 8),
        (false, false, 8),
        (false, true, 0),
    ] {
        tch::manual_seed(3);
        let mut cfg = common::tiny_config(shared, shared_t);
        cfg.head.bottleneck_dim = bottleneck;
        let mut ibot = Ibot::new(cfg, Device::Cpu).unwrap();
        let (v, m) = views(3);
        let _ = m[1].get(0).fill_(0); // one image of view 1 has no masked patch
        let (c, c2) = (ibot.loss.center.copy(), ibot.loss.center2.copy());
        let full = ibot.forward(&v, &m, 0, true, &SingleProcess).unwrap();
        let full_centres = (ibot.loss.center.copy(), ibot.loss.center2.copy());
        let gf = ibot.backward(&full.loss.total);
        ibot.loss.center = c;
        ibot.loss.center2 = c2;
        let lean = ibot.forward_train(&v, &m, 0, &SingleProcess).unwrap();
        assert!(lean.student.patch.is_none());
        assert_eq!(lean.teacher.patch.is_none(), bottleneck > 0);
        let gl = ibot.backward(&lean.loss.total);
        let close = |a: &Tensor, b: &Tensor, tol: f64, what: &str| {
            let d = (a - b).abs().max().double_value(&[]);
            let s = b.abs().max().double_value(&[]).max(1e-3);
            assert!(
                d <= tol * s,
                "{what} ({shared}/{shared_t}/{bottleneck}): {d:e} vs scale {s:e}"
            );
        };
        close(&lean.teacher.cls, &full.teacher.cls, 1e-6, "teacher cls");
        close(&lean.loss.cls, &full.loss.cls, 1e-6, "cls loss");
        close(&lean.loss.patch, &full.loss.patch, 1e-6, "patch loss");
        close(&ibot.loss.center, &full_centres.0, 1e-6, "center");
        close(&ibot.loss.center2, &full_centres.1, 1e-6, "center2");
        for ((p, a), b) in ibot.student_ps.params().iter().zip(&gl).zip(&gf) {
            match (a, b) {
                (Some(a), Some(b)) => close(a, b, 1e-5, &p.name),
                (None, None) => {}
                _ => panic!("{}: gradient on one path only", p.name),
            }
        }
    }
    // Masks of the wrong grid are an error, not a silent misalignment.
    tch::manual_seed(3);
    let mut ibot = Ibot::new(common::tiny_config(false, true), Device::Cpu).unwrap();
    let (v, _) = views(3);
    let bad: Vec<Tensor> = (0..2)
        .map(|_| Tensor::ones([3, 2, 2], (Kind::Bool, Device::Cpu)))
        .collect();
    assert!(ibot.forward_train(&v, &bad, 0, &SingleProcess).is_err());
}

/// The teacher's lean head (`forward_tokens_at`): its [CLS] outputs, its patch outputs at the
/// given positions and each sample's mean over all patch tokens are those of the head on every
/// token (float32 summation order: 1e-6 of the scale), for a shared and a separate patch last
/// layer; heads without a bottleneck decline (None); positions outside the grid are an error.
/// Checked by hand to fail: rows of the other view (1.5 on 0.96), view 0's means twice, the
/// mean over the masked tokens only or with the [CLS] token.
#[test]
fn the_teacher_head_at_masked_positions_equals_the_head_on_every_token() {
    use ibot::models::{HeadConfig, IbotHead};
    for (shared, bottleneck) in [(true, 8), (false, 8), (false, 0)] {
        tch::manual_seed(5);
        let mut ps = ParamStore::new();
        let cfg = HeadConfig {
            hidden_dim: 32,
            bottleneck_dim: bottleneck,
            ..HeadConfig::new(24, 40, 48, true, shared)
        };
        let head = IbotHead::new(&mut ps, "head.", &cfg, false, Device::Cpu).unwrap();
        let x = Tensor::randn([6, 17, 24], CPU);
        let masked = Tensor::rand([6 * 16], CPU).lt(0.4).nonzero().squeeze_dim(1);
        let lean = tch::no_grad(|| head.forward_tokens_at(&x, &masked)).unwrap();
        let Some((cls, rows, mean)) = lean else {
            assert_eq!(bottleneck, 0, "a bottleneck head must take the lean path");
            continue;
        };
        assert!(bottleneck > 0, "a head without bottleneck has no lean path");
        let (cls_f, patch_f) = tch::no_grad(|| head.forward_tokens(&x)).unwrap();
        let pd = cfg.patch_dim();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            assert_eq!(a.size(), b.size(), "{what}");
            let d = (a - b).abs().max().double_value(&[]);
            let s = b.abs().max().double_value(&[]);
            assert!(d <= 1e-6 * s, "{what} (shared {shared}): {d:e} vs {s:e}");
        };
        close(&cls, &cls_f, "cls");
        close(
            &rows,
            &patch_f.reshape([-1, pd]).index_select(0, &masked),
            "rows at the masked positions",
        );
        close(
            &mean,
            &patch_f.mean_dim(1, false, Kind::Float),
            "token means",
        );
        let outside = Tensor::from_slice(&[0i64, 6 * 16]);
        assert!(head.forward_tokens_at(&x, &outside).is_err());
    }
}

/// `--norm_in_head ln` as the official `iBOTHead` builds it: one LayerNorm module appended after
/// every hidden layer, so one set of parameters under several state-dict indices. A head laid
/// out that way in PyTorch (tests/py/head_ref.py) must accept our state dict with
/// `load_state_dict(strict=True)`, list the same keys and parameters in the same order and give
/// the same outputs, for shared and separate last layers, 3 and 4 layers, with and without a
/// bottleneck.
#[test]
fn the_head_matches_an_official_layout_head_in_pytorch() {
    use ibot::models::{HeadAct, HeadConfig, HeadNorm, IbotHead};
    let dir = common::scratch_dir("model", "head-ref");
    let cases = [
        // (nlayers, bottleneck, shared_head, norm, act)
        (3, 8, true, HeadNorm::Ln, HeadAct::Gelu),
        (4, 8, false, HeadNorm::Ln, HeadAct::Gelu),
        (4, 0, true, HeadNorm::Ln, HeadAct::Relu),
        (3, 0, false, HeadNorm::Ln, HeadAct::Gelu),
        (3, 8, false, HeadNorm::None, HeadAct::Relu),
    ];
    for (i, (nlayers, bottleneck, shared, norm, act)) in cases.into_iter().enumerate() {
        tch::manual_seed(i as i64);
        let cfg = HeadConfig {
            in_dim: 12,
            out_dim: 10,
            patch_out_dim: 6,
            hidden_dim: 16,
            bottleneck_dim: bottleneck,
            nlayers,
            norm,
            act,
            norm_last_layer: false,
            shared_head: shared,
        };
        let mut ps = ParamStore::new();
        let head = IbotHead::new(&mut ps, "", &cfg, true, Device::Cpu).unwrap();
        // Non-trivial norm parameters and weight-norm scales, so that using them matters.
        tch::no_grad(|| {
            for p in ps.params() {
                if p.tensor.dim() == 1 || p.name.ends_with("weight_g") {
                    let mut t = p.tensor.shallow_clone();
                    let _ = t.copy_(&(Tensor::randn(t.size(), CPU) * 0.5 + 1.0));
                }
            }
        });
        let tokens = Tensor::randn([2, 5, 12], CPU);
        let rows = Tensor::randn([3, 12], CPU);
        let flags = [
            12,
            10,
            6,
            16,
            bottleneck,
            nlayers,
            i64::from(norm == HeadNorm::Ln),
            i64::from(act == HeadAct::Relu),
            i64::from(shared),
        ];
        let mut inputs: Vec<(String, Tensor)> = vec![
            ("cfg".into(), Tensor::from_slice(&flags)),
            ("tokens".into(), tokens.shallow_clone()),
            ("rows".into(), rows.shallow_clone()),
        ];
        for (k, v) in ps.state_dict() {
            inputs.push((format!("sd/{k}"), v.detach().copy()));
        }
        let inputs: Vec<(&str, Tensor)> = inputs
            .iter()
            .map(|(k, v)| (k.as_str(), v.shallow_clone()))
            .collect();
        let r = common::python_reference("head_ref.py", &inputs, &dir);
        let names = |k: &str| -> Vec<String> {
            let bytes = Vec::<u8>::try_from(&r[k]).unwrap();
            String::from_utf8(bytes)
                .unwrap()
                .split('\n')
                .map(String::from)
                .collect()
        };
        let ours_sd: Vec<String> = ps.state_dict().map(|(k, _)| k.to_string()).collect();
        let ours_np: Vec<String> = ps.params().iter().map(|p| p.name.clone()).collect();
        assert_eq!(
            ours_sd,
            names("state_dict_keys"),
            "case {i}: state-dict keys"
        );
        assert_eq!(
            ours_np,
            names("named_parameters"),
            "case {i}: named_parameters"
        );
        let (x1, x2) = tch::no_grad(|| head.forward_tokens(&tokens)).unwrap();
        let y = tch::no_grad(|| head.forward_cls(&rows));
        for (name, ours) in [("x1", &x1), ("x2", &x2), ("y", &y)] {
            let diff = (ours - &r[name]).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "case {i}: {name} differs by {diff}");
        }
    }
}

/// The fused Linear + GELU of gradient-free forwards (`Linear::forward_gelu`, oneDNN's
/// `_linear_pointwise(.., "gelu", .., "none")`) is the exact erf GELU of the float32 product:
/// within 1e-6 of the largest value from a float64 reference (float32 rounding; the tanh
/// approximation, checked by hand by swapping "none" for "tanh" in csrc/fastops.cpp, is off by
/// ~1e-4 of it and fails) and within 1e-6 of the unfused `F.linear` + GELU, at the widths it
/// is used for (the Fashion-MNIST and ViT-S fc1 / head input shapes, scaled down in rows) and
/// on 3-d input. With grad mode on, `forward_gelu` keeps the differentiable path and the raw
/// fused op refuses.
#[test]
fn the_fused_linear_gelu_is_the_exact_erf_gelu_of_the_product() {
    use ibot::models::layers::Linear;
    for (shape, k, out) in [
        (vec![130i64, 192], 192i64, 768i64),
        (vec![130, 192], 192, 2048),
        (vec![4, 33, 384], 384, 1536),
    ] {
        tch::manual_seed(11);
        let lin = Linear {
            weight: Tensor::randn([out, k], CPU) / (k as f64).sqrt(),
            bias: Some(Tensor::randn([out], CPU) * 0.1),
        };
        let x = Tensor::randn(shape.as_slice(), CPU);
        let fused = tch::no_grad(|| lin.forward_gelu(&x));
        let reference = x
            .to_kind(Kind::Double)
            .linear(
                &lin.weight.to_kind(Kind::Double),
                lin.bias.as_ref().map(|b| b.to_kind(Kind::Double)),
            )
            .gelu("none");
        let unfused = x.linear(&lin.weight, lin.bias.as_ref()).gelu("none");
        let mut want = shape.clone();
        *want.last_mut().unwrap() = out;
        assert_eq!(fused.size(), want);
        let scale = reference.abs().max().double_value(&[]);
        let err = (fused.to_kind(Kind::Double) - &reference)
            .abs()
            .max()
            .double_value(&[]);
        assert!(err <= 1e-6 * scale, "{k}->{out}: {err:e} vs {scale:e}");
        let d = (&fused - &unfused).abs().max().double_value(&[]);
        assert!(
            d <= 1e-6 * scale,
            "{k}->{out} vs unfused: {d:e} vs {scale:e}"
        );
        // With gradients: the unfused, differentiable path.
        let xg = x.set_requires_grad(true);
        let y = lin.forward_gelu(&xg);
        assert!(y.requires_grad());
        assert!(ibot::fastops::linear_gelu(&xg, &lin.weight, lin.bias.as_ref()).is_err());
    }
}
