//! The fast paths of issue 14 against the plain computations they replace: the float32 Linear
//! on oneDNN against libtorch's `F.linear`, the fused attention against the explicit
//! softmax(q·kᵀ)·v, the fused SGD against PyTorch's SGD rule (with a parameter that joins late,
//! as a frozen last layer does), the multi-tensor EMA against the official per-tensor update, and
//! the ViT block whose stochastic depth skips dropped samples against the official masking.
//! Each check is shown to fail on a wrong variant (in the test itself). AdamW is checked against
//! torch in tests/train.rs, SGD against torch in tests/eval.rs, everything end to end by the
//! verify-fixture groups (tests/reference.rs).

use std::sync::Mutex;

use ibot::models::layers::{
    drop_path_keep, linear, Attention, CpuGemm, LayerNorm, Linear, Mlp, LN_EPS,
};
use ibot::models::vit::Block;
use ibot::params::ParamStore;
use ibot::train::optim::{Optimizer, OptimizerKind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
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
    assert_eq!(
        CpuGemm::current(),
        CpuGemm::Blas,
        "MKL (F.linear) is the default"
    );
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
    let long = Tensor::randn(
        [1, ibot::models::layers::FUSED_ATTENTION_MIN_TOKENS, 48],
        CPU,
    );
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

/// A ViT block (width 48, 6 heads, MLP 96) with drop-path rate `p`, its parameters in order.
fn test_block(p: f64) -> (Block, Vec<Tensor>) {
    let mut ps = ParamStore::new();
    let dev = Device::Cpu;
    let block = Block {
        norm1: LayerNorm::new(&mut ps, "norm1", 48, LN_EPS, true, dev),
        attn: Attention::new(&mut ps, "attn", 48, 6, true, true, dev),
        norm2: LayerNorm::new(&mut ps, "norm2", 48, LN_EPS, true, dev),
        mlp: Mlp::new(&mut ps, "mlp", 48, 96, true, dev),
        drop_path: p,
        drop: 0.0,
        attn_drop: 0.0,
    };
    // LayerNorm starts at (1, 0): move it off so its gradients are not trivially shaped.
    tch::no_grad(|| {
        for n in [&block.norm1, &block.norm2] {
            let _ = n.weight.shallow_clone().normal_(1.0, 0.1);
            let _ = n.bias.shallow_clone().normal_(0.0, 0.1);
        }
    });
    let params = ps
        .params()
        .iter()
        .map(|p| p.tensor.shallow_clone())
        .collect();
    (block, params)
}

/// The per-sample keep decisions of one drop-path call, derived from the generator here (not
/// through the library): the official `floor(keep_prob + torch.rand(B))`, one f64 per sample.
fn official_keep(r: &mut ChaCha8Rng, b: i64, p: f64) -> Vec<bool> {
    (0..b)
        .map(|_| (1.0 - p + r.gen::<f64>()).floor() == 1.0)
        .collect()
}

/// Stochastic depth that skips dropped samples (`Block::forward`, `residual_drop_path`) against
/// the official masking (`Block::forward_masked`, `drop_path`) with the same draws: output and
/// the gradients of the input and of all 12 parameters within 1e-5 of their scale (float
/// summation order only; measured at most 2e-7), for seeds whose draws keep some, none and all samples
/// of the attention and MLP branches. The generator must end where the official draws leave it
/// (2·B values per block), and the kept/dropped samples must be the official ones.
///
/// Mutations checked by hand (each fails this test): the `1/(1-p)` scaling left out on the
/// gathered path ("seed 0 ...: output/gradient 0 differs by 1.4e-2") or on the all-kept path
/// ("seed 18 ...: differs by 1.2e-2"); the wrong samples kept (`!keep[i]` in the index list: the
/// outputs differ, and a sample dropped twice is no longer its input); one draw skipped (the
/// last of each call in `drop_path_keep`: "the masking path drew a different count"); the
/// none-kept case returning `x` without running the branch ("seed 59 ...: gradient 8
/// undefined", the branch parameters get no gradient instead of a zero one).
#[test]
fn the_skipping_block_equals_the_masking_block_with_the_same_draws() {
    let (b, p) = (6i64, 0.5);
    let (block, params, x, g) = ibot::train::seeded_init(6, || {
        let (block, params) = test_block(p);
        (
            block,
            params,
            Tensor::randn([b, 9, 48], CPU),
            Tensor::randn([b, 9, 48], CPU),
        )
    });
    assert_eq!(params.len(), 12);
    let run = |skip: bool, seed: u64| {
        let rng = Mutex::new(ChaCha8Rng::seed_from_u64(seed));
        let x = x.detach().set_requires_grad(true);
        let y = if skip {
            block.forward(&x, true, &rng)
        } else {
            block.forward_masked(&x, true, &rng)
        };
        let mut inputs = vec![&x];
        inputs.extend(params.iter());
        let grads = Tensor::run_backward(&[(&y * &g).sum(Kind::Float)], &inputs, false, false);
        let out: Vec<Tensor> = std::iter::once(y.detach()).chain(grads).collect();
        (out, rng.into_inner().unwrap())
    };
    // Seeds whose (attention, MLP) draws give each case; found from the official formula.
    let case = |k: &[bool]| match k.iter().filter(|&&k| k).count() {
        0 => 0,
        n if n as i64 == b => 2,
        _ => 1,
    };
    let mut wanted: Vec<(usize, usize)> =
        vec![(1, 1), (0, 1), (1, 0), (2, 1), (1, 2), (2, 2), (0, 0)];
    let mut seeds = Vec::new();
    for seed in 0..100_000u64 {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let a = official_keep(&mut r, b, p);
        let m = official_keep(&mut r, b, p);
        if let Some(i) = wanted.iter().position(|&w| w == (case(&a), case(&m))) {
            wanted.remove(i);
            seeds.push((seed, a, m, r));
        }
        if wanted.is_empty() {
            break;
        }
    }
    assert!(wanted.is_empty(), "no seed for cases {wanted:?}");
    for (seed, a, m, after) in seeds {
        let what = format!("seed {seed}, attention keeps {a:?}, MLP keeps {m:?}");
        let (want, r_masked) = run(false, seed);
        let (got, r_skip) = run(true, seed);
        assert!(
            r_masked == after,
            "{what}: the masking path drew a different count"
        );
        assert!(
            r_skip == after,
            "{what}: the skipping path drew a different count"
        );
        // The library's decisions are the official ones.
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let lib = Mutex::new(ChaCha8Rng::seed_from_u64(seed));
        assert_eq!(
            drop_path_keep(b, p, &lib),
            official_keep(&mut r, b, p),
            "{what}"
        );
        assert_eq!(got.len(), 14);
        for (i, (o, e)) in got.iter().zip(&want).enumerate() {
            assert!(o.defined() && e.defined(), "{what}: gradient {i} undefined");
            assert_eq!(o.size(), e.size());
            let r = rel(o, e);
            assert!(r < 1e-5, "{what}: output/gradient {i} differs by {r:e}");
        }
        // A sample dropped in both branches passes through unchanged, with gradient g.
        for i in 0..b as usize {
            if !a[i] && !m[i] {
                assert!(
                    got[0].get(i as i64).equal(&x.get(i as i64)),
                    "{what}: sample {i}"
                );
                assert!(
                    got[1].get(i as i64).equal(&g.get(i as i64)),
                    "{what}: sample {i}"
                );
            }
        }
    }
    // The tolerance tells a wrong scaling apart: the masking path at 1% more drop path.
    let (want, _) = run(false, 0);
    let mut off = test_block(p * 1.01).0;
    off.norm1 = block.norm1.shallow_clone();
    off.norm2 = block.norm2.shallow_clone();
    off.attn = clone_attn(&block.attn);
    off.mlp = Mlp {
        fc1: clone_linear(&block.mlp.fc1),
        fc2: clone_linear(&block.mlp.fc2),
    };
    let y = off.forward(&x, true, &Mutex::new(ChaCha8Rng::seed_from_u64(0)));
    assert!(rel(&y, &want[0]) > 1e-4);
    // Not training (and p = 0): no draws, the plain block.
    let rng = Mutex::new(ChaCha8Rng::seed_from_u64(1));
    let e = block.forward(&x, false, &rng);
    assert!(e.equal(&block.forward_masked(&x, false, &rng)));
    assert!(rng.into_inner().unwrap() == ChaCha8Rng::seed_from_u64(1));
}

fn clone_linear(l: &Linear) -> Linear {
    Linear {
        weight: l.weight.shallow_clone(),
        bias: l.bias.as_ref().map(Tensor::shallow_clone),
    }
}

fn clone_attn(a: &Attention) -> Attention {
    Attention {
        qkv: clone_linear(&a.qkv),
        proj: clone_linear(&a.proj),
        num_heads: a.num_heads,
        scale: a.scale,
    }
}

/// Fine-tuning's dropout (`--drop`, `--attn_drop_rate`) inside the skipping block: the same
/// libtorch seed and drop-path seed give the same output, a sample dropped by both branches'
/// drop path is its input, and the dropouts act (the output differs from the dropout-free block).
#[test]
fn the_skipping_block_runs_fine_tuning_dropout() {
    let (b, p) = (6i64, 0.5);
    let (mut block, x) =
        ibot::train::seeded_init(7, || (test_block(p).0, Tensor::randn([b, 9, 48], CPU)));
    let plain = block.forward(&x, true, &Mutex::new(ChaCha8Rng::seed_from_u64(3)));
    block.drop = 0.2;
    block.attn_drop = 0.1;
    let run = || {
        tch::manual_seed(11);
        block.forward(&x, true, &Mutex::new(ChaCha8Rng::seed_from_u64(3)))
    };
    let (y1, y2) = (run(), run());
    assert!(y1.equal(&y2));
    assert!(!y1.equal(&plain));
    let mut r = ChaCha8Rng::seed_from_u64(3);
    let (a, m) = (official_keep(&mut r, b, p), official_keep(&mut r, b, p));
    let mut both = 0;
    for i in 0..b {
        if !a[i as usize] && !m[i as usize] {
            assert!(y1.get(i).equal(&x.get(i)));
            both += 1;
        } else {
            assert!(!y1.get(i).equal(&x.get(i)));
        }
    }
    assert!(both < b, "seed 3 must keep some sample");
}
