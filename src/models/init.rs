//! Parameter initialisers of the official code.

use tch::{Device, Kind, Tensor};

/// The official `trunc_normal_(t, std)` (mean 0, absolute bounds a=-2, b=2): uniform on
/// `[2Φ(a/std)-1, 2Φ(b/std)-1]`, inverse error function, scale by `std·√2`, clamp to `[a, b]`.
pub fn trunc_normal(shape: &[i64], std: f64, dev: Device) -> Tensor {
    let (a, b) = (-2.0f64, 2.0f64);
    let cdf = |x: f64| (1.0 + libm_erf(x / std::f64::consts::SQRT_2)) / 2.0;
    let (l, u) = (cdf(a / std), cdf(b / std));
    let mut t = Tensor::empty(shape, (Kind::Float, dev));
    let _ = t.uniform_(2.0 * l - 1.0, 2.0 * u - 1.0);
    let _ = t.erfinv_();
    let _ = t.g_mul_scalar_(std * std::f64::consts::SQRT_2);
    let _ = t.clamp_(a, b);
    t
}

pub fn zeros(shape: &[i64], dev: Device) -> Tensor {
    Tensor::zeros(shape, (Kind::Float, dev))
}

/// erf in double precision (Rust's std has none; libtorch's is exact enough and already here).
fn libm_erf(x: f64) -> f64 {
    Tensor::from(x)
        .to_kind(Kind::Double)
        .erf()
        .double_value(&[])
}
