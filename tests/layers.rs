//! The fast paths of issue 14 against the plain computations they replace: the float32 Linear
//! on oneDNN against libtorch's `F.linear`, the fused attention against the explicit
//! softmax(q·kᵀ)·v, the fused SGD against PyTorch's SGD rule (with a parameter that joins late,
//! as a frozen last layer does), and the multi-tensor EMA against the official per-tensor update.
//! Each check is shown to fail on a wrong variant (in the test itself). AdamW is checked against
//! torch in tests/train.rs, SGD against torch in tests/eval.rs, everything end to end by the
//! verify-fixture groups (tests/reference.rs).

use ibot::models::layers::{linear, Attention, CpuGemm};
use ibot::params::ParamStore;
use ibot::train::optim::{Optimizer, OptimizerKind};
use tch::{Device, Kind, Tensor};

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

/// Largest |a - b| relative to the largest |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    ibot::util::max_abs(&(a - b)) / ibot::util::max_abs(b).max(1e-30)
}

/// Output and input/weight/bias gradients of `f(x, w, b)` for the upstream gradient `g`.
fn with_grads(
    f: &dyn Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    g: &Tensor,
) -> Vec<Tensor> {
    let x = x.detach().set_requires_grad(true);
    let w = w.detach().set_requires_grad(true);
    let b = b.map(|b| b.detach().set_requires_grad(true));
    let y = f(&x, &w, b.as_ref());
    let mut inputs = vec![&x, &w];
    if let Some(b) = &b {
        inputs.push(b);
    }
    let grads = Tensor::run_backward(&[(&y * g).sum(Kind::Float)], &inputs, false, false);
    std::iter::once(y.detach()).chain(grads).collect()
}

#[test]
fn the_onednn_linear_equals_f_linear_forward_and_backward() {
    assert_eq!(CpuGemm::current(), CpuGemm::Blas, "MKL (F.linear) is the default");
    // MKL's vendor question is answered by csrc/fastops.cpp (build.rs exports the answer from
    // every binary), so MKL picks its kernels by the CPU's features; without the export this fails.
    assert!(ibot::fastops::mkl_picks_kernels_by_features());
    CpuGemm::Onednn.set();
    let (x, w, b, g) = ibot::train::seeded_init(3, || {
        (
            Tensor::randn([3, 5, 40], CPU),
            Tensor::randn([24, 40], CPU),
            Tensor::randn([24], CPU),
            Tensor::randn([3, 5, 24], CPU),
        )
    });
    let blas = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| x.linear(w, b);
    let ours = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| linear(x, w, b);
    for bias in [Some(&b), None] {
        let want = with_grads(&blas, &x, &w, bias, &g);
        let got = with_grads(&ours, &x, &w, bias, &g);
        assert_eq!(got.len(), want.len());
        for (i, (a, e)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a.size(), e.size());
            let r = rel(a, e);
            // float32 summation order only (measured ~1e-7).
            assert!(
                r < 1e-5,
                "output/gradient {i} (bias {}) differs by {r:e}",
                bias.is_some()
            );
        }
        // The tolerance tells a slightly different weight apart.
        let off = with_grads(&ours, &x, &(&w * 1.001), bias, &g);
        assert!(rel(&off[0], &want[0]) > 1e-4);
    }
    // A non-contiguous input (a transposed view) and an empty one.
    let xt = Tensor::randn([40, 6], CPU).transpose(0, 1);
    assert!(rel(&linear(&xt, &w, Some(&b)), &xt.linear(&w, Some(&b))) < 1e-5);
    let empty = Tensor::zeros([0, 40], CPU);
    assert_eq!(linear(&empty, &w, Some(&b)).size(), [0, 24]);
    // Switching the library back gives libtorch's own result exactly.
    CpuGemm::Blas.set();
    let y = linear(&x, &w, Some(&b));
    assert!(y.equal(&x.linear(&w, Some(&b))));
}

#[test]
fn the_fused_attention_equals_the_explicit_one_forward_and_backward() {
    let (attn, x, g) = ibot::train::seeded_init(4, || {
        let mut ps = ParamStore::new();
        let attn = Attention::new(&mut ps, "attn", 48, 6, true, true, Device::Cpu);
        (
            attn,
            Tensor::randn([3, 17, 48], CPU),
            Tensor::randn([3, 17, 48], CPU),
        )
    });
    // Output and the gradients of x, qkv.weight and proj.weight.
    let run = |fused: bool, scale: f64| {
        let a = Attention {
            qkv: ibot::models::layers::Linear {
                weight: attn.qkv.weight.shallow_clone(),
                bias: attn.qkv.bias.as_ref().map(Tensor::shallow_clone),
            },
            proj: ibot::models::layers::Linear {
                weight: attn.proj.weight.shallow_clone(),
                bias: attn.proj.bias.as_ref().map(Tensor::shallow_clone),
            },
            num_heads: attn.num_heads,
            scale: attn.scale * scale,
        };
        let x = x.detach().set_requires_grad(true);
        let y = if fused {
            a.forward_fused(&x)
        } else {
            a.forward_explicit(&x)
        };
        let params = [&x, &attn.qkv.weight, &attn.proj.weight];
        let grads = Tensor::run_backward(&[(&y * &g).sum(Kind::Float)], &params, false, false);
        std::iter::once(y.detach()).chain(grads).collect::<Vec<_>>()
    };
    let fused = run(true, 1.0);
    let explicit = run(false, 1.0);
    for (i, (a, e)) in fused.iter().zip(&explicit).enumerate() {
        let r = rel(a, e);
        assert!(r < 1e-5, "output/gradient {i} differs by {r:e}");
    }
    // 1% off in the softmax scale is far outside that tolerance.
    let off = run(true, 1.01);
    assert!(rel(&off[0], &explicit[0]) > 1e-4);
    // `forward` picks by length: the explicit product below FUSED_ATTENTION_MIN_TOKENS, the
    // fused kernel from there on (bit for bit the same calls).
    assert!(attn.forward(&x).equal(&attn.forward_explicit(&x)));
    let long = Tensor::randn([1, ibot::models::layers::FUSED_ATTENTION_MIN_TOKENS, 48], CPU);
    assert!(attn.forward(&long).equal(&attn.forward_fused(&long)));
    // The attention map still comes from the explicit product: rows sum to one.
    let map = attn.attention_map(&x);
    assert_eq!(map.size(), [3, 6, 17, 17]);
    assert!(
        rel(
            &map.sum_dim_intlist(-1, false, Kind::Float),
            &Tensor::ones([3, 6, 17], CPU)
        ) < 1e-6
    );
}

/// PyTorch's SGD (momentum, dampening 0, coupled weight decay) per tensor, in float64.
fn sgd_reference(p: &mut Tensor, buf: &mut Option<Tensor>, g: &Tensor, lr: f64, wd: f64, m: f64) {
    let d = g + &*p * wd;
    let b = match buf.take() {
        None => d,
        Some(b) => b * m + d,
    };
    *p = &*p - &b * lr;
    *buf = Some(b);
}

#[test]
fn the_fused_sgd_follows_pytorch_with_a_parameter_that_joins_late() {
    let (w0, b0, gw, gb) = ibot::train::seeded_init(5, || {
        (
            Tensor::randn([4, 3], CPU),
            Tensor::randn([4], CPU),
            Tensor::randn([5, 4, 3], CPU),
            Tensor::randn([5, 4], CPU),
        )
    });
    let (lr, wd, m) = (0.1, 0.05, 0.9);
    // The bias has no gradient in the first two steps (like a frozen last layer).
    let has_b = [false, false, true, true, true];
    let run = |opt_momentum: f64| {
        let mut ps = ParamStore::new();
        let _ = ps.add("w.weight", w0.copy(), true);
        let _ = ps.add("w.bias", b0.copy(), true);
        let mut opt = Optimizer::new(OptimizerKind::Sgd, &ps);
        opt.momentum = opt_momentum;
        for s in 0..5 {
            let grads = vec![Some(gw.get(s)), has_b[s as usize].then(|| gb.get(s))];
            opt.step(&ps, &grads, lr, wd).unwrap();
        }
        (
            ps.get("w.weight").unwrap().detach(),
            ps.get("w.bias").unwrap().detach(),
            opt.state_tensors(&ps),
        )
    };
    let (w, b, state) = run(m);
    let (mut rw, mut rb) = (w0.to_kind(Kind::Double), b0.to_kind(Kind::Double));
    let (mut bw, mut bb) = (None, None);
    for s in 0..5 {
        sgd_reference(
            &mut rw,
            &mut bw,
            &gw.get(s).to_kind(Kind::Double),
            lr,
            wd,
            m,
        );
        if has_b[s as usize] {
            // The bias is 1-D: no weight decay (the official parameter groups).
            sgd_reference(
                &mut rb,
                &mut bb,
                &gb.get(s).to_kind(Kind::Double),
                lr,
                0.0,
                m,
            );
        }
    }
    let tol = 1e-6;
    assert!(
        rel(&w.to_kind(Kind::Double), &rw) < tol,
        "weight {:e}",
        rel(&w.to_kind(Kind::Double), &rw)
    );
    assert!(
        rel(&b.to_kind(Kind::Double), &rb) < tol,
        "bias {:e}",
        rel(&b.to_kind(Kind::Double), &rb)
    );
    let names: Vec<_> = state.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        ["w.weight.momentum_buffer", "w.bias.momentum_buffer"]
    );
    assert!(rel(&state[1].1.to_kind(Kind::Double), bb.as_ref().unwrap()) < tol);
    // Another momentum is far outside the tolerance.
    let (w2, _, _) = run(0.8);
    assert!(rel(&w2.to_kind(Kind::Double), &rw) > 1e-4);
}

#[test]
fn the_multi_tensor_ema_is_the_official_update_bit_for_bit() {
    let (t0, s0) = ibot::train::seeded_init(6, || {
        (
            vec![Tensor::randn([7, 5], CPU), Tensor::randn([13], CPU)],
            vec![Tensor::randn([7, 5], CPU), Tensor::randn([13], CPU)],
        )
    });
    let build = |ts: &[Tensor], trainable: bool| {
        let mut ps = ParamStore::new();
        for (i, t) in ts.iter().enumerate() {
            let _ = ps.add(format!("p{i}.weight"), t.copy(), trainable);
        }
        ps
    };
    let (teacher, student) = (build(&t0, false), build(&s0, true));
    let m = 0.996;
    ibot::train::ema_update(&teacher, &student, m);
    for (i, (t, s)) in t0.iter().zip(&s0).enumerate() {
        // param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        let want = t * m + s * (1.0 - m);
        let got = teacher.get(&format!("p{i}.weight")).unwrap();
        assert!(
            got.equal(&want),
            "pair {i} differs from the official update"
        );
        // A momentum 1e-4 off does not pass `equal` (a check that can fail).
        assert!(!got.equal(&(t * 0.9961 + s * (1.0 - 0.9961))));
    }
}
