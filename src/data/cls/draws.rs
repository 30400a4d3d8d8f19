//! The random draws of the fine-tuning pipeline, behind one interface.
//!
//! timm and torchvision draw from three generators (Python's `random`, numpy's global state and
//! torch's); a Rust generator cannot reproduce those streams, and need not: what must match is
//! what each transform does *given* its draws. So every transform here takes its randomness
//! from a [`Draws`], one method per kind of call the official code makes, in the official
//! order. [`RngDraws`] serves them from any `rand::Rng` (training); [`Replay`] serves the values
//! that timm drew, recorded in Python by the tests, and checks that each call asks for the same
//! kind of draw with the same arguments, so a control-flow difference fails loudly.

use anyhow::{bail, ensure, Context, Result};
use rand::Rng;
use rand_distr::{Beta, Distribution, StandardNormal};

/// One kind of random call of the official code each.
pub trait Draws {
    /// `random.random()` / `np.random.rand()` / `torch.rand(1)`: uniform on [0, 1).
    fn random(&mut self) -> f64;
    /// `random.uniform(a, b)` (`a + (b - a) * random()`) / `torch.empty(1).uniform_(a, b)`.
    fn uniform(&mut self, a: f64, b: f64) -> f64;
    /// `random.randint(a, b)`: an integer in `[a, b]`, both ends included.
    fn randint(&mut self, a: i64, b: i64) -> i64;
    /// `random.gauss(mu, sigma)`.
    fn gauss(&mut self, mu: f64, sigma: f64) -> f64;
    /// `random.choice(seq)` / `np.random.choice(n)`: an index below `n`.
    fn choice(&mut self, n: usize) -> usize;
    /// `torch.randperm(n)`.
    fn permutation(&mut self, n: usize) -> Vec<usize>;
    /// `torch.empty(n).normal_()`: `n` standard-normal float32 values.
    fn normal_f32(&mut self, n: usize) -> Vec<f32>;
    /// `np.random.beta(a, b)`.
    fn beta(&mut self, a: f64, b: f64) -> f64;
}

/// [`Draws`] from a `rand::Rng` (the same distributions as the official calls).
pub struct RngDraws<'a, R: Rng + ?Sized>(pub &'a mut R);

impl<R: Rng + ?Sized> Draws for RngDraws<'_, R> {
    fn random(&mut self) -> f64 {
        self.0.gen::<f64>()
    }
    fn uniform(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * self.0.gen::<f64>()
    }
    fn randint(&mut self, a: i64, b: i64) -> i64 {
        if b <= a {
            a
        } else {
            self.0.gen_range(a..=b)
        }
    }
    fn gauss(&mut self, mu: f64, sigma: f64) -> f64 {
        let z: f64 = StandardNormal.sample(self.0);
        mu + sigma * z
    }
    fn choice(&mut self, n: usize) -> usize {
        if n <= 1 {
            0
        } else {
            self.0.gen_range(0..n)
        }
    }
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, self.0.gen_range(0..=i));
        }
        p
    }
    fn normal_f32(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| StandardNormal.sample(self.0)).collect()
    }
    fn beta(&mut self, a: f64, b: f64) -> f64 {
        // The configurations validate a, b > 0; a bad pair gives the mean rather than a panic.
        match Beta::new(a, b) {
            Ok(d) => d.sample(self.0),
            Err(_) => 0.5,
        }
    }
}

/// One recorded draw: its kind, its arguments, its value(s).
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub kind: String,
    pub args: Vec<f64>,
    pub values: Vec<f64>,
}

/// Draws recorded from the official code (a JSON list of `[kind, [args...], value or [values]]`),
/// served in order. Test tooling: a call of another kind or with other arguments than the
/// recording panics with both, which is the point (the control flow differs from timm's).
pub struct Replay {
    items: Vec<Recorded>,
    next: usize,
}

impl Replay {
    pub fn new(items: Vec<Recorded>) -> Self {
        Self { items, next: 0 }
    }

    /// Parses `[[kind, [args...], value | [values...]], ...]`.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let list = v
            .as_array()
            .context("a draw recording must be a JSON list")?;
        let mut items = Vec::with_capacity(list.len());
        for (i, e) in list.iter().enumerate() {
            let e = e
                .as_array()
                .filter(|e| e.len() == 3)
                .with_context(|| format!("draw {i}: expected [kind, args, value]"))?;
            let kind = e[0]
                .as_str()
                .with_context(|| format!("draw {i}: kind must be a string"))?
                .to_string();
            let nums = |v: &serde_json::Value| -> Result<Vec<f64>> {
                match v {
                    serde_json::Value::Array(a) => a
                        .iter()
                        .map(|x| x.as_f64().context("not a number"))
                        .collect(),
                    x => Ok(vec![x.as_f64().context("not a number")?]),
                }
            };
            items.push(Recorded {
                kind,
                args: nums(&e[1]).with_context(|| format!("draw {i}: args"))?,
                values: nums(&e[2]).with_context(|| format!("draw {i}: value"))?,
            });
        }
        Ok(Self::new(items))
    }

    /// How many recorded draws were not used.
    pub fn remaining(&self) -> usize {
        self.items.len() - self.next
    }

    /// Fails unless every recorded draw was used.
    pub fn finish(&self) -> Result<()> {
        ensure!(
            self.remaining() == 0,
            "{} recorded draws were not used; next: {:?}",
            self.remaining(),
            self.items.get(self.next)
        );
        Ok(())
    }

    fn take(&mut self, kind: &str, args: &[f64]) -> &Recorded {
        let Some(r) = self.items.get(self.next) else {
            panic!(
                "replay exhausted at draw {}: asked for {kind}{args:?}",
                self.next
            )
        };
        // Arguments agree to 1e-12 (relative): they are computed the same way on both sides
        // (e.g. `math.log` of the same ratio), the tolerance only spares a libm's last bit.
        let same_args = r.args.len() == args.len()
            && r.args
                .iter()
                .zip(args)
                .all(|(a, b)| a == b || (a - b).abs() <= 1e-12 * a.abs().max(1.0));
        if r.kind != kind || !same_args {
            panic!(
                "draw {} differs from the recording: asked for {kind}{args:?}, recorded {}{:?}",
                self.next, r.kind, r.args
            );
        }
        self.next += 1;
        &self.items[self.next - 1]
    }

    fn one(&mut self, kind: &str, args: &[f64]) -> f64 {
        let r = self.take(kind, args);
        assert_eq!(
            r.values.len(),
            1,
            "draw {kind} holds {} values",
            r.values.len()
        );
        r.values[0]
    }
}

impl Draws for Replay {
    fn random(&mut self) -> f64 {
        self.one("random", &[])
    }
    fn uniform(&mut self, a: f64, b: f64) -> f64 {
        self.one("uniform", &[a, b])
    }
    fn randint(&mut self, a: i64, b: i64) -> i64 {
        self.one("randint", &[a as f64, b as f64]) as i64
    }
    fn gauss(&mut self, mu: f64, sigma: f64) -> f64 {
        self.one("gauss", &[mu, sigma])
    }
    fn choice(&mut self, n: usize) -> usize {
        self.one("choice", &[n as f64]) as usize
    }
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let r = self.take("perm", &[n as f64]);
        r.values.iter().map(|&v| v as usize).collect()
    }
    fn normal_f32(&mut self, n: usize) -> Vec<f32> {
        let r = self.take("normal", &[n as f64]);
        assert_eq!(
            r.values.len(),
            n,
            "normal draw of {n} values holds {}",
            r.values.len()
        );
        r.values.iter().map(|&v| v as f32).collect()
    }
    fn beta(&mut self, a: f64, b: f64) -> f64 {
        self.one("beta", &[a, b])
    }
}

/// Parses a recording file's text (see [`Replay::from_json`]).
pub fn replay_from_str(s: &str) -> Result<Replay> {
    let v: serde_json::Value = match serde_json::from_str(s) {
        Ok(v) => v,
        Err(e) => bail!("draw recording is not JSON: {e}"),
    };
    Replay::from_json(&v)
}
