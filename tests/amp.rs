//! Mixed precision: autocast really switches the arithmetic (and is scoped), a bfloat16 step
//! stays within tolerance of the float32 step, and the loss scaler follows GradScaler: unscaled
//! gradients, skipped steps on overflow with the scale halved, growth after the interval.

mod common;

use ibot::loss::SingleProcess;
use ibot::train::amp::{autocast, autocast_enabled, GradScaler, Precision};
use ibot::train::Ibot;
use tch::{Device, Kind, Tensor};

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

/// Bound on a bfloat16 gradient's distance from the float32 one, relative to the tensor's scale.
const BF16_GRAD_TOL: f64 = 0.05;

/// Inputs from a private generator (libtorch's global one is shared with the other tests, which
/// run in parallel and seed it for model initialisation).
fn views(b: i64) -> (Vec<Tensor>, Vec<Tensor>) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut rand_t = |shape: &[i64]| {
        let n: i64 = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        Tensor::from_slice(&data).reshape(shape)
    };
    let mut v: Vec<Tensor> = (0..2).map(|_| rand_t(&[b, 3, 16, 16])).collect();
    v.extend((0..2).map(|_| rand_t(&[b, 3, 8, 8])));
    let m: Vec<Tensor> = (0..2).map(|_| rand_t(&[b, 4, 4]).lt(-0.4)).collect();
    (v, m)
}

#[test]
fn autocast_switches_matmuls_to_bfloat16_inside_the_scope_only() {
    // No draws from libtorch's global generator here: other tests seed it for their models.
    let a = Tensor::arange(32, CPU).reshape([4, 8]) / 7.0;
    let w = Tensor::arange(24, CPU).reshape([3, 8]) / 5.0;
    assert!(!autocast_enabled(Device::Cpu));
    let inside = autocast(Precision::Bf16, Device::Cpu, || {
        assert!(autocast_enabled(Device::Cpu));
        a.linear(&w, None::<Tensor>)
    });
    assert_eq!(inside.kind(), Kind::BFloat16);
    assert!(
        !autocast_enabled(Device::Cpu),
        "autocast must be off after the scope"
    );
    assert_eq!(a.linear(&w, None::<Tensor>).kind(), Kind::Float);
    // Float32 is a plain call.
    assert_eq!(
        autocast(Precision::Fp32, Device::Cpu, || a
            .linear(&w, None::<Tensor>))
        .kind(),
        Kind::Float
    );
}

/// Tolerance: the bfloat16 loss within 2% of the float32 loss (bfloat16 keeps 8 bits of
/// mantissa; the loss sums thousands of them), and the updated weights stay float32.
#[test]
fn a_bfloat16_step_stays_close_to_the_float32_step() {
    let (v, m) = views(4);
    let mut f32_ibot = Ibot::seeded(common::tiny_config(false, true), Device::Cpu, 9).unwrap();
    let mut bf16_ibot = Ibot::seeded(common::tiny_config(false, true), Device::Cpu, 9).unwrap();
    bf16_ibot.precision = Precision::Bf16;
    let (a, _) = f32_ibot
        .train_step(&v, &m, 0, 1e-3, 0.04, 0.9, &SingleProcess)
        .unwrap();
    let (b, _) = bf16_ibot
        .train_step(&v, &m, 0, 1e-3, 0.04, 0.9, &SingleProcess)
        .unwrap();
    for (name, x, y) in [
        ("loss", a.loss, b.loss),
        ("cls", a.cls, b.cls),
        ("patch", a.patch, b.patch),
    ] {
        assert!(
            (x - y).abs() <= 0.02 * x.abs(),
            "{name}: float32 {x}, bfloat16 {y}"
        );
    }
    assert_ne!(a.loss, b.loss, "the bfloat16 step did not run in bfloat16");
    for p in bf16_ibot.student_ps.params() {
        assert_eq!(p.tensor.kind(), Kind::Float, "{} changed kind", p.name);
    }
    assert_eq!(bf16_ibot.loss.center.kind(), Kind::Float);
}

/// What a bfloat16 step changes is its gradients (one Adam step normalises their size away, so
/// the weights after it cannot show much): under bfloat16 autocast every student gradient
/// stays within 5% of the float32 one relative to the tensor's scale (measured: 2.6% at worst),
/// while the gradients of another batch (the images flipped and negated) are farther than that
/// from it in every tensor (so the bound can fail).
#[test]
fn bfloat16_gradients_follow_the_float32_ones() {
    let (v, m) = views(4);
    let grads = |precision: Precision, v: &[Tensor]| {
        let mut ibot = Ibot::seeded(common::tiny_config(false, true), Device::Cpu, 9).unwrap();
        let fwd = autocast(precision, Device::Cpu, || {
            ibot.forward(v, &m, 0, true, &SingleProcess)
        })
        .unwrap();
        let g = ibot.backward(&fwd.loss.total);
        let names: Vec<String> = ibot
            .student_ps
            .params()
            .iter()
            .map(|p| p.name.clone())
            .collect();
        names.into_iter().zip(g).collect::<Vec<_>>()
    };
    let g32 = grads(Precision::Fp32, &v);
    let g16 = grads(Precision::Bf16, &v);
    let other: Vec<Tensor> = v.iter().map(|x| -x.flip([-2])).collect();
    let g_other = grads(Precision::Fp32, &other);
    let rel =
        |a: &Tensor, b: &Tensor| ibot::util::max_abs(&(a - b)) / ibot::util::max_abs(b).max(1e-30);
    let (mut worst, mut other_min) = (0f64, f64::INFINITY);
    for (((name, a), (_, b)), (_, c)) in g32.iter().zip(&g16).zip(&g_other) {
        let (Some(a), Some(b), Some(c)) = (a, b, c) else {
            continue;
        };
        assert_eq!(b.kind(), Kind::Float, "{name}: gradient not float32");
        // The key bias has a mathematically zero gradient: its values are float noise.
        if name.ends_with("attn.qkv.bias") {
            continue;
        }
        let e = rel(b, a);
        println!("{name}: bfloat16 {e:.3e}, other batch {:.3e}", rel(c, a));
        worst = worst.max(e);
        other_min = other_min.min(rel(c, a));
    }
    assert!(
        worst < BF16_GRAD_TOL,
        "a bfloat16 gradient is {worst:.3} of its scale away"
    );
    assert!(
        other_min > BF16_GRAD_TOL,
        "another batch's gradient is only {other_min:.3} away"
    );
}

#[test]
fn grad_scaler_unscales_detects_overflow_and_adapts() {
    let s = GradScaler {
        scale: 1024.0,
        ..GradScaler::default()
    };
    let mut g = vec![Some(Tensor::from_slice(&[2048.0f32, -512.0])), None];
    assert!(!s.unscale(&mut g));
    assert_eq!(
        Vec::<f32>::try_from(g[0].as_ref().unwrap()).unwrap(),
        [2.0, -0.5]
    );
    let mut bad = vec![
        Some(Tensor::from_slice(&[1.0f32, f32::INFINITY])),
        Some(Tensor::from_slice(&[f32::NAN])),
    ];
    assert!(s.unscale(&mut bad));

    let mut s = GradScaler {
        growth_interval: 3,
        ..GradScaler::default()
    };
    assert_eq!(s.scale, 65536.0);
    s.update(true);
    assert_eq!((s.scale, s.growth_tracker), (32768.0, 0));
    s.update(false);
    s.update(false);
    assert_eq!((s.scale, s.growth_tracker), (32768.0, 2));
    s.update(false);
    assert_eq!((s.scale, s.growth_tracker), (65536.0, 0));
}

/// The float16 path end to end on the CPU: an absurd scale overflows the gradients, so the
/// optimizer step is skipped (weights unchanged, the EMA still runs as in the official loop)
/// and the scale is halved; with a sane scale the step happens.
#[test]
fn float16_steps_are_skipped_on_overflow() {
    let (v, m) = views(4);
    let mut ibot = Ibot::seeded(common::tiny_config(false, true), Device::Cpu, 4).unwrap();
    ibot.precision = Precision::Fp16;
    ibot.scaler.scale = 2f64.powi(126);
    let before = ibot
        .student_ps
        .get("backbone.blocks.0.mlp.fc1.weight")
        .unwrap()
        .copy();
    let _ = ibot
        .train_step(&v, &m, 0, 1e-3, 0.04, 0.9, &SingleProcess)
        .unwrap();
    assert!(
        ibot.student_ps
            .get("backbone.blocks.0.mlp.fc1.weight")
            .unwrap()
            .equal(&before),
        "overflowing step was applied"
    );
    assert_eq!(ibot.scaler.scale, 2f64.powi(125));
    // The scale keeps halving while the float16 gradients overflow, until a step goes through.
    let mut skipped = 0;
    while ibot
        .student_ps
        .get("backbone.blocks.0.mlp.fc1.weight")
        .unwrap()
        .equal(&before)
    {
        let scale = ibot.scaler.scale;
        let _ = ibot
            .train_step(&v, &m, 0, 1e-3, 0.04, 0.9, &SingleProcess)
            .unwrap();
        if ibot.scaler.growth_tracker == 0 {
            assert_eq!(ibot.scaler.scale, scale / 2.0);
            skipped += 1;
        }
        assert!(skipped < 140, "no step ever went through");
    }
    assert_eq!(ibot.scaler.growth_tracker, 1);
    let w = ibot
        .student_ps
        .get("backbone.blocks.0.mlp.fc1.weight")
        .unwrap();
    assert!(
        w.isfinite().all().int64_value(&[]) == 1,
        "the applied step left non-finite weights"
    );
    eprintln!(
        "float16 step applied at scale {} after {skipped} skipped steps",
        ibot.scaler.scale
    );
}

#[test]
fn precision_choice_overrides_use_fp16_and_float16_needs_cuda() {
    use ibot::train::amp::PrecisionChoice as C;
    let cpu = Device::Cpu;
    assert_eq!(
        Precision::resolve(true, C::Float32, cpu).unwrap(),
        Precision::Fp32
    );
    assert_eq!(
        Precision::resolve(false, C::Bfloat16, cpu).unwrap(),
        Precision::Bf16
    );
    assert_eq!(
        Precision::resolve(false, C::Auto, cpu).unwrap(),
        Precision::Fp32
    );
    // What auto means with --use_fp16 on a CPU (AMX, or a probe on AVX512-BF16) is tested in
    // tests/precision_probe.rs, without running the probe in this process.
    let err = Precision::resolve(true, C::Float16, cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("CUDA"), "{err}");
}
