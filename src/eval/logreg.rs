//! L2-regularised multinomial logistic regression on frozen features, as the official
//! `eval_logistic_regression.py` (cyanure's `MultiClassifier(loss="multiclass-logistic",
//! penalty="l2", fit_intercept=False)` on L2-normalised features, one fit per `--lr_lambd`).
//!
//! The objective is cyanure's, for weights `W` of shape `[classes, dim]` and no intercept:
//!
//! ```text
//! F(W) = 1/n Σ_i [ logsumexp_c (W x_i)_c − (W x_i)_{y_i} ] + λ/2 ‖W‖²_F
//! ```
//!
//! which is scikit-learn's `LogisticRegression(C, fit_intercept=False)` multinomial objective
//! `C Σ_i ℓ_i + ½‖W‖²` divided by `C n`: the two have the same minimiser when
//! `C = 1 / (n λ)`. `F` is smooth and λ-strongly convex, so it has one minimiser; it is found
//! here by L-BFGS with a strong-Wolfe line search in float64 until the largest gradient entry
//! is below `tol` (cyanure stops at a relative duality gap of 1e-3 or after `--epochs` passes,
//! so its answer is an approximation of the same point). The objective and its gradient
//! `1/n (softmax(X Wᵀ) − Y)ᵀ X + λ W` come out of one libtorch pass over the features, in
//! chunks of rows so memory stays bounded whatever the number of images.
//!
//! Why hand-written: an optimiser crate (argmin) asks for the cost and the gradient in separate
//! calls, which would double the passes over the features, and converting between its vectors
//! and tensors at every call buys nothing; L-BFGS with a strong-Wolfe search is short and is
//! checked here against scikit-learn's solver (`tests/protocols.rs`).

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Stopping rules of [`fit`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LbfgsOptions {
    /// Largest number of L-BFGS iterations.
    pub max_iter: usize,
    /// Converged when every gradient entry is at most this in absolute value.
    pub tol: f64,
    /// Number of correction pairs kept.
    pub history: usize,
}

impl Default for LbfgsOptions {
    fn default() -> Self {
        Self {
            max_iter: 1000,
            tol: 1e-6,
            history: 10,
        }
    }
}

/// The minimiser of [`objective`] for one λ.
#[derive(Debug)]
pub struct Fit {
    /// `[classes.len(), dim]`, float64.
    pub weight: Tensor,
    /// The training labels, sorted and deduplicated: row `c` of `weight` scores `classes[c]`.
    pub classes: Vec<i64>,
    pub objective: f64,
    /// Largest absolute gradient entry at `weight`.
    pub grad_max: f64,
    pub iterations: usize,
    pub evaluations: usize,
    pub converged: bool,
}

/// Rows per chunk of the objective: `chunk x classes` float64 logits stay under 128 MB.
fn chunk_rows(classes: i64) -> i64 {
    ((1i64 << 24) / classes.max(1)).max(1)
}

/// The training problem: features `[n, dim]`, class positions `[n]` in `0..classes`.
struct Problem<'a> {
    x: &'a Tensor,
    y: Tensor,
    classes: i64,
    lambd: f64,
}

impl Problem<'_> {
    /// `F(W)` and its gradient, `W` flat `[classes * dim]` float64.
    fn eval(&self, w: &Tensor) -> (f64, Tensor) {
        let _g = tch::no_grad_guard();
        let n = self.x.size()[0];
        let d = self.x.size()[1];
        let wm = w.view([self.classes, d]);
        let mut loss = 0.0;
        let mut grad = Tensor::zeros([self.classes, d], (Kind::Double, w.device()));
        let step = chunk_rows(self.classes);
        let mut s = 0;
        while s < n {
            let len = step.min(n - s);
            let xb = self.x.narrow(0, s, len).to_kind(Kind::Double);
            let yb = self.y.narrow(0, s, len);
            let z = xb.matmul(&wm.tr());
            let lse = z.logsumexp([1i64], true);
            let picked = z.gather(1, &yb.unsqueeze(1), false);
            loss += (&lse - &picked).sum(Kind::Double).double_value(&[]);
            let p = (&z - &lse).exp() - yb.one_hot(self.classes).to_kind(Kind::Double);
            grad += p.tr().matmul(&xb);
            s += len;
        }
        let nf = n as f64;
        let f = loss / nf + 0.5 * self.lambd * wm.square().sum(Kind::Double).double_value(&[]);
        let g = grad / nf + &wm * self.lambd;
        (f, g.reshape([-1]))
    }
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    a.dot(b).double_value(&[])
}

fn max_abs(a: &Tensor) -> f64 {
    a.abs().max().double_value(&[])
}

/// Minimiser of the cubic through `(x1, f1, g1)` and `(x2, f2, g2)`, kept inside `bounds`
/// (the classic interpolation step of strong-Wolfe searches, as in minFunc and PyTorch's LBFGS).
fn cubic_min(x1: f64, f1: f64, g1: f64, x2: f64, f2: f64, g2: f64, bounds: (f64, f64)) -> f64 {
    let (lo, hi) = if bounds.0 <= bounds.1 {
        bounds
    } else {
        (bounds.1, bounds.0)
    };
    let d1 = g1 + g2 - 3.0 * (f1 - f2) / (x1 - x2);
    let d2sq = d1 * d1 - g1 * g2;
    if d2sq >= 0.0 && (x1 - x2).abs() > 0.0 {
        let d2 = d2sq.sqrt();
        let t = if x1 <= x2 {
            x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2.0 * d2))
        } else {
            x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2.0 * d2))
        };
        if t.is_finite() {
            return t.clamp(lo, hi);
        }
    }
    (lo + hi) / 2.0
}

/// One evaluated point of the line search: step, value, gradient, directional derivative.
struct Point {
    t: f64,
    f: f64,
    g: Tensor,
    dphi: f64,
}

/// A step along `d` from `w` satisfying the strong Wolfe conditions (c1 = 1e-4, c2 = 0.9),
/// by bracketing then zooming with safeguarded cubic interpolation (Nocedal & Wright,
/// algorithms 3.5 and 3.6). Returns the best point found when the search runs out of
/// evaluations (25), which is then at least a decrease.
fn strong_wolfe(
    prob: &Problem,
    w: &Tensor,
    f0: f64,
    dphi0: f64,
    d: &Tensor,
    t0: f64,
    evals: &mut usize,
) -> Point {
    const C1: f64 = 1e-4;
    const C2: f64 = 0.9;
    const MAX_EVALS: usize = 25;
    let eval = |t: f64, evals: &mut usize| {
        *evals += 1;
        let (f, g) = prob.eval(&(w + d * t));
        let dphi = dot(&g, d);
        Point { t, f, g, dphi }
    };
    let armijo = |p: &Point| p.f <= f0 + C1 * p.t * dphi0;
    let curvature = |p: &Point| p.dphi.abs() <= -C2 * dphi0;
    let mut prev = Point {
        t: 0.0,
        f: f0,
        g: Tensor::zeros_like(d),
        dphi: dphi0,
    };
    let mut t = t0;
    let mut used = 0;
    let (mut lo, mut hi);
    loop {
        let p = eval(t, evals);
        used += 1;
        if !p.f.is_finite() {
            // Overshot into overflow: shrink.
            t = (prev.t + t) / 2.0;
            if used >= MAX_EVALS {
                return prev;
            }
            continue;
        }
        if !armijo(&p) || (used > 1 && p.f >= prev.f) {
            (lo, hi) = (prev, p);
            break;
        }
        if curvature(&p) {
            return p;
        }
        if p.dphi >= 0.0 {
            (lo, hi) = (p, prev);
            break;
        }
        if used >= MAX_EVALS {
            return p;
        }
        // Extrapolate: at least 10% past t, at most 10x t.
        let next = cubic_min(
            prev.t,
            prev.f,
            prev.dphi,
            p.t,
            p.f,
            p.dphi,
            (t + 0.01 * (t - prev.t), t * 10.0),
        );
        prev = p;
        t = next;
    }
    // Zoom: lo satisfies Armijo and has the lowest value seen; the minimiser lies between.
    while used < MAX_EVALS {
        let (a, b) = (lo.t.min(hi.t), lo.t.max(hi.t));
        if (b - a) * max_abs(d) < 1e-14 {
            break;
        }
        let mut t = cubic_min(lo.t, lo.f, lo.dphi, hi.t, hi.f, hi.dphi, (a, b));
        // Keep away from the ends so the bracket really shrinks.
        let eps = 0.1 * (b - a);
        if t - a < eps || b - t < eps {
            t = (a + b) / 2.0;
        }
        let p = eval(t, evals);
        used += 1;
        if !p.f.is_finite() || !armijo(&p) || p.f >= lo.f {
            hi = p;
        } else {
            if curvature(&p) {
                return p;
            }
            if p.dphi * (hi.t - lo.t) >= 0.0 {
                hi = lo;
            }
            lo = p;
        }
    }
    lo
}

/// Fits the model on features `x` `[n, dim]` (any float kind; used as given, so normalise them
/// first as the official script does) and labels `y` `[n]`, for one λ > 0.
pub fn fit(x: &Tensor, y: &Tensor, lambd: f64, opts: &LbfgsOptions) -> Result<Fit> {
    ensure!(
        lambd > 0.0 && lambd.is_finite(),
        "--lr_lambd values must be positive, not {lambd}"
    );
    ensure!(
        x.dim() == 2 && y.dim() == 1 && x.size()[0] == y.size()[0],
        "features {:?} and labels {:?} do not match",
        x.size(),
        y.size()
    );
    let n = x.size()[0];
    ensure!(n > 0, "no training features");
    ensure!(
        opts.history > 0 && opts.max_iter > 0,
        "the L-BFGS history and iteration count must be positive"
    );
    let labels = Vec::<i64>::try_from(y.to_device(Device::Cpu).to_kind(Kind::Int64))?;
    let mut classes = labels.clone();
    classes.sort_unstable();
    classes.dedup();
    ensure!(
        classes.len() >= 2,
        "logistic regression needs at least two classes in the training labels, found {}",
        classes.len()
    );
    let pos: Vec<i64> = labels
        .iter()
        .map(|l| classes.binary_search(l).unwrap_or(0) as i64)
        .collect();
    let device = x.device();
    let prob = Problem {
        x,
        y: Tensor::from_slice(&pos).to_device(device),
        classes: classes.len() as i64,
        lambd,
    };
    let d = x.size()[1];
    let mut w = Tensor::zeros([prob.classes * d], (Kind::Double, device));
    let (mut f, mut g) = prob.eval(&w);
    let mut evals = 1;
    let mut hist: std::collections::VecDeque<(Tensor, Tensor, f64)> = Default::default();
    let mut iters = 0;
    let mut gmax = max_abs(&g);
    while gmax > opts.tol && iters < opts.max_iter {
        iters += 1;
        // Two-loop recursion: d = -H g.
        let mut q = g.copy();
        let mut alphas = Vec::with_capacity(hist.len());
        for (s, yv, rho) in hist.iter().rev() {
            let a = rho * dot(s, &q);
            q -= yv * a;
            alphas.push(a);
        }
        if let Some((s, yv, _)) = hist.back() {
            q *= dot(s, yv) / dot(yv, yv);
        }
        for ((s, yv, rho), a) in hist.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(yv, &q);
            q += s * (a - b);
        }
        let mut dir = -q;
        let mut dphi0 = dot(&g, &dir);
        if dphi0 >= 0.0 || !dphi0.is_finite() {
            // Not a descent direction (numerical trouble): restart from steepest descent.
            hist.clear();
            dir = -&g;
            dphi0 = dot(&g, &dir);
        }
        let t0 = if hist.is_empty() {
            (1.0 / g.abs().sum(Kind::Double).double_value(&[])).min(1.0)
        } else {
            1.0
        };
        let p = strong_wolfe(&prob, &w, f, dphi0, &dir, t0, &mut evals);
        if p.t == 0.0 || p.f > f {
            break; // no progress possible at this precision
        }
        let s = &dir * p.t;
        let yv = &p.g - &g;
        let sy = dot(&s, &yv);
        w += &s;
        let df = f - p.f;
        f = p.f;
        g = p.g;
        gmax = max_abs(&g);
        if sy > 1e-300 {
            if hist.len() == opts.history {
                hist.pop_front();
            }
            hist.push_back((s, yv, 1.0 / sy));
        }
        if df.abs() <= f64::EPSILON * f.abs().max(1.0) && max_abs(&(&dir * p.t)) < 1e-300 {
            break;
        }
    }
    Ok(Fit {
        weight: w.view([prob.classes, d]),
        classes,
        objective: f,
        grad_max: gmax,
        iterations: iters,
        evaluations: evals,
        converged: gmax <= opts.tol,
    })
}

/// `F(W)` for weights `[classes, dim]` over the labels' positions in `classes` (for checks).
pub fn objective(x: &Tensor, y: &Tensor, w: &Tensor, classes: &[i64], lambd: f64) -> Result<f64> {
    let labels = Vec::<i64>::try_from(y.to_device(Device::Cpu).to_kind(Kind::Int64))?;
    let pos = labels
        .iter()
        .map(|l| {
            classes
                .binary_search(l)
                .map(|p| p as i64)
                .map_err(|_| anyhow::anyhow!("label {l} is not one of the classes"))
        })
        .collect::<Result<Vec<_>>>()?;
    let prob = Problem {
        x,
        y: Tensor::from_slice(&pos).to_device(x.device()),
        classes: classes.len() as i64,
        lambd,
    };
    Ok(prob.eval(&w.to_kind(Kind::Double).reshape([-1])).0)
}

impl Fit {
    /// Predicted labels of features `[m, dim]` (the argmax class, lowest label on ties).
    pub fn predict(&self, x: &Tensor) -> Result<Vec<i64>> {
        let _g = tch::no_grad_guard();
        let n = x.size()[0];
        let step = chunk_rows(self.classes.len() as i64);
        let mut out = Vec::with_capacity(n as usize);
        let mut s = 0;
        while s < n {
            let len = step.min(n - s);
            let z = x
                .narrow(0, s, len)
                .to_kind(Kind::Double)
                .matmul(&self.weight.tr());
            let am = Vec::<i64>::try_from(z.argmax(1, false).to_device(Device::Cpu))?;
            out.extend(am.into_iter().map(|c| self.classes[c as usize]));
            s += len;
        }
        Ok(out)
    }

    /// Accuracy in percent on features `x` and labels `y` (cyanure's `score` x 100).
    pub fn accuracy(&self, x: &Tensor, y: &Tensor) -> Result<f64> {
        let pred = self.predict(x)?;
        let labels = Vec::<i64>::try_from(y.to_device(Device::Cpu).to_kind(Kind::Int64))?;
        ensure!(
            pred.len() == labels.len(),
            "features and labels differ in number"
        );
        ensure!(!labels.is_empty(), "no test features");
        let hits = pred.iter().zip(&labels).filter(|(p, l)| p == l).count();
        Ok(100.0 * hits as f64 / labels.len() as f64)
    }
}

/// Settings of `ibot eval-logreg` (the official option names; see [`crate::cli::eval_logreg`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogregConfig {
    pub lr_lambd: Vec<f64>,
    pub solver: LbfgsOptions,
}

/// The outcome for one λ.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogregResult {
    pub lambd: f64,
    /// Top-1 accuracy on the test features, percent.
    pub acc: f64,
    pub objective: f64,
    pub grad_max: f64,
    pub iterations: usize,
    pub converged: bool,
}

/// One fit per λ of `cfg.lr_lambd` on L2-normalised training features, scored on the test
/// features (normalised the same way). Prints a line per λ as the official script does.
pub fn run(
    cfg: &LogregConfig,
    train: (&Tensor, &Tensor),
    test: (&Tensor, &Tensor),
) -> Result<Vec<LogregResult>> {
    if cfg.lr_lambd.is_empty() {
        bail!("--lr_lambd needs at least one value");
    }
    ensure!(
        train.0.size().get(1) == test.0.size().get(1),
        "training features are {:?} but test features {:?}",
        train.0.size(),
        test.0.size()
    );
    let xtr = crate::models::head::l2_normalize(&train.0.to_kind(Kind::Float));
    let xte = crate::models::head::l2_normalize(&test.0.to_kind(Kind::Float));
    let mut out = Vec::new();
    for &lambd in &cfg.lr_lambd {
        let t0 = std::time::Instant::now();
        let fit = fit(&xtr, train.1, lambd, &cfg.solver)
            .with_context(|| format!("logistic regression with lambda {lambd}"))?;
        let acc = fit.accuracy(&xte, test.1)?;
        if !fit.converged {
            eprintln!(
                "warning: lambda {lambd}: not converged after {} iterations (largest gradient entry {:.2e} > --tol {:.0e})",
                fit.iterations, fit.grad_max, cfg.solver.tol
            );
        }
        eprintln!(
            "lambda {lambd}: objective {:.6}, {} L-BFGS iterations, largest gradient entry {:.1e} ({:.1}s)",
            fit.objective,
            fit.iterations,
            fit.grad_max,
            t0.elapsed().as_secs_f64()
        );
        println!("Logistic regression result (lambda {lambd}): Acc: {acc}");
        out.push(LogregResult {
            lambd,
            acc,
            objective: fit.objective,
            grad_max: fit.grad_max,
            iterations: fit.iterations,
            converged: fit.converged,
        });
    }
    Ok(out)
}

/// The result with the highest accuracy (the first such λ on ties).
pub fn best(results: &[LogregResult]) -> Option<&LogregResult> {
    results
        .iter()
        .fold(None, |b: Option<&LogregResult>, r| match b {
            Some(x) if x.acc >= r.acc => Some(x),
            _ => Some(r),
        })
}
