//! Optimizers with the official parameter groups and PyTorch's update rules.
//!
//! Written here rather than taken from tch's `nn::Optimizer` because iBOT needs, per step,
//! a learning rate for every group and a weight decay for the first group only, and it needs
//! parameters whose gradient was cancelled to be skipped entirely (PyTorch skips `grad is None`,
//! weight decay included), which tch's optimizer wrapper cannot express.
//!
//! AdamW and SGD run libtorch's fused multi-tensor kernels (`torch.optim.AdamW(fused=True)`,
//! `SGD(fused=True)`: one call per group, one pass over each tensor), through
//! [`crate::fastops`]; the state (and its checkpoint layout) is per parameter as before. LARS,
//! whose trust ratio needs each tensor's norms, stays per tensor.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::params::ParamStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adamw,
    Sgd,
    Lars,
    /// Adam with L2 weight decay (torch.optim.Adam; fine-tuning's `--opt adam`).
    Adam,
}

impl std::str::FromStr for OptimizerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "adamw" => Ok(Self::Adamw),
            "sgd" => Ok(Self::Sgd),
            "lars" => Ok(Self::Lars),
            other => bail!("unknown optimizer '{other}' (expected adamw, sgd or lars)"),
        }
    }
}

/// The official `get_params_groups`: trainable parameters whose name ends in `.bias` or that
/// are 1-D are not weight-decayed (group 1); all others are (group 0).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroups {
    pub regularized: Vec<usize>,
    pub not_regularized: Vec<usize>,
}

pub fn get_params_groups(ps: &ParamStore) -> ParamGroups {
    let mut g = ParamGroups {
        regularized: vec![],
        not_regularized: vec![],
    };
    for (i, p) in ps.params().iter().enumerate() {
        if !p.trainable {
            continue;
        }
        if p.name.ends_with(".bias") || p.tensor.dim() == 1 {
            g.not_regularized.push(i);
        } else {
            g.regularized.push(i);
        }
    }
    g
}

#[derive(Debug)]
struct AdamState {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Per-parameter optimizer state.
#[derive(Debug)]
enum State {
    None,
    Adam(AdamState),
    Momentum(Tensor),
}

/// An optimizer over a [`ParamStore`] with the two official groups.
#[derive(Debug)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub groups: ParamGroups,
    state: Vec<State>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub momentum: f64,
    /// Nesterov momentum for SGD (timm's `--opt sgd`; PyTorch's `nesterov=True`).
    pub nesterov: bool,
    pub lars_eta: f64,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, ps: &ParamStore) -> Self {
        Self {
            kind,
            groups: get_params_groups(ps),
            state: (0..ps.len()).map(|_| State::None).collect(),
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            momentum: 0.9,
            nesterov: false,
            lars_eta: 0.001,
        }
    }

    /// One step with learning rate `lr` for both groups and weight decay `wd` for group 0.
    /// `grads[i]` is the gradient of parameter i or None (skipped, like PyTorch's grad None).
    pub fn step(
        &mut self,
        ps: &ParamStore,
        grads: &[Option<Tensor>],
        lr: f64,
        wd: f64,
    ) -> Result<()> {
        let params = ps.params();
        if grads.len() != params.len() {
            bail!("{} gradients for {} parameters", grads.len(), params.len());
        }
        let _guard = tch::no_grad_guard();
        let groups = [
            (self.groups.regularized.clone(), wd),
            (self.groups.not_regularized.clone(), 0.0),
        ];
        for (group, decay) in groups {
            self.update_group(ps, grads, &group, lr, decay)?;
        }
        Ok(())
    }

    /// The update of the parameters `group` (indices into `ps`) with learning rate `lr` and
    /// weight decay `decay`; parameters without a gradient are skipped entirely, as PyTorch
    /// skips grad None.
    fn update_group(
        &mut self,
        ps: &ParamStore,
        grads: &[Option<Tensor>],
        group: &[usize],
        lr: f64,
        decay: f64,
    ) -> Result<()> {
        let params = ps.params();
        {
            let live: Vec<usize> = group
                .iter()
                .copied()
                .filter(|&i| grads.get(i).is_some_and(Option::is_some))
                .collect();
            let grad = |i: usize| grads[i].as_ref().map(Tensor::contiguous).expect("filtered");
            match self.kind {
                OptimizerKind::Adamw | OptimizerKind::Adam => {
                    let mut p = Vec::with_capacity(live.len());
                    let (mut g, mut m, mut v, mut st) = (vec![], vec![], vec![], vec![]);
                    for &i in &live {
                        let param = &params[i].tensor;
                        let s = self.state[i].adam(param);
                        s.step += 1;
                        p.push(param.shallow_clone());
                        g.push(grad(i));
                        m.push(s.exp_avg.shallow_clone());
                        v.push(s.exp_avg_sq.shallow_clone());
                        st.push(Tensor::from_slice(&[s.step as f32]).to_device(param.device()));
                    }
                    crate::fastops::fused_adam(
                        self.kind != OptimizerKind::Adam,
                        &p,
                        &g,
                        &m,
                        &v,
                        &st,
                        [lr, self.beta1, self.beta2, decay, self.eps],
                    )?;
                }
                OptimizerKind::Sgd if self.momentum != 0.0 => {
                    // Two calls: parameters on their first momentum step (buffer = gradient),
                    // then the others; a frozen last layer joins the first set late.
                    let (fresh, running): (Vec<usize>, Vec<usize>) = live
                        .iter()
                        .partition(|&&i| !matches!(self.state[i], State::Momentum(_)));
                    for (first, set) in [(true, fresh), (false, running)] {
                        let mut p = vec![];
                        let (mut g, mut b) = (vec![], vec![]);
                        for i in set {
                            if first {
                                self.state[i] = State::Momentum(params[i].tensor.zeros_like());
                            }
                            let State::Momentum(buf) = &self.state[i] else {
                                unreachable!()
                            };
                            p.push(params[i].tensor.shallow_clone());
                            g.push(grad(i));
                            b.push(buf.shallow_clone());
                        }
                        crate::fastops::fused_sgd(
                            self.nesterov,
                            &p,
                            &g,
                            &b,
                            decay,
                            self.momentum,
                            lr,
                            first,
                        )?;
                    }
                }
                OptimizerKind::Sgd => {
                    if self.nesterov {
                        bail!("Nesterov momentum requires a momentum (PyTorch's SGD refuses it)");
                    }
                    for &i in &live {
                        let mut p = params[i].tensor.shallow_clone();
                        sgd_update(&mut self.state[i], &mut p, &grad(i), lr, decay, 0.0);
                    }
                }
                OptimizerKind::Lars => {
                    for &i in &live {
                        let mut p = params[i].tensor.shallow_clone();
                        lars_update(
                            &mut self.state[i],
                            &mut p,
                            &grad(i),
                            lr,
                            decay,
                            self.momentum,
                            self.lars_eta,
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Optimizer state as named tensors (for checkpoints): `<param>.exp_avg`,
    /// `<param>.exp_avg_sq`, `<param>.step` (AdamW) or `<param>.momentum_buffer`.
    pub fn state_tensors(&self, ps: &ParamStore) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (s, p) in self.state.iter().zip(ps.params()) {
            let n = &p.name;
            match s {
                State::None => {}
                State::Adam(a) => {
                    out.push((format!("{n}.exp_avg"), a.exp_avg.shallow_clone()));
                    out.push((format!("{n}.exp_avg_sq"), a.exp_avg_sq.shallow_clone()));
                    out.push((format!("{n}.step"), Tensor::from_slice(&[a.step as i64])));
                }
                State::Momentum(m) => out.push((format!("{n}.momentum_buffer"), m.shallow_clone())),
            }
        }
        out
    }

    /// Restores the state written by [`Optimizer::state_tensors`] (keys with `prefix`).
    pub fn load_state(
        &mut self,
        ps: &ParamStore,
        src: &std::collections::HashMap<String, Tensor>,
        prefix: &str,
    ) -> Result<()> {
        for (i, p) in ps.params().iter().enumerate() {
            let key = |s: &str| format!("{prefix}{}.{s}", p.name);
            let dev = p.tensor.device();
            let check = |t: &Tensor, what: &str| -> Result<Tensor> {
                if t.size() != p.tensor.size() {
                    bail!(
                        "optimizer state {what} of '{}' has shape {:?}, the parameter {:?}",
                        p.name,
                        t.size(),
                        p.tensor.size()
                    );
                }
                Ok(t.to_device(dev).to_kind(p.tensor.kind()))
            };
            self.state[i] = if let (Some(m), Some(v), Some(st)) = (
                src.get(&key("exp_avg")),
                src.get(&key("exp_avg_sq")),
                src.get(&key("step")),
            ) {
                let step = st.int64_value(&[0]);
                if step < 0 {
                    bail!("optimizer step of '{}' is negative", p.name);
                }
                State::Adam(AdamState {
                    step: step as u64,
                    exp_avg: check(m, "exp_avg")?,
                    exp_avg_sq: check(v, "exp_avg_sq")?,
                })
            } else if let Some(b) = src.get(&key("momentum_buffer")) {
                State::Momentum(check(b, "momentum_buffer")?)
            } else {
                State::None
            };
        }
        Ok(())
    }
}

impl State {
    /// The AdamW state, created (zero moments, step 0) on a parameter's first update.
    fn adam(&mut self, p: &Tensor) -> &mut AdamState {
        if !matches!(self, State::Adam(_)) {
            *self = State::Adam(AdamState {
                step: 0,
                exp_avg: p.zeros_like(),
                exp_avg_sq: p.zeros_like(),
            });
        }
        let State::Adam(s) = self else { unreachable!() };
        s
    }
}

/// PyTorch SGD with momentum (dampening 0, no Nesterov), coupled weight decay, one tensor (used
/// for momentum 0; the fused update covers the rest).
fn sgd_update(state: &mut State, p: &mut Tensor, grad: &Tensor, lr: f64, wd: f64, momentum: f64) {
    let d = if wd != 0.0 {
        grad + &*p * wd
    } else {
        grad.shallow_clone()
    };
    let buf = match state {
        State::Momentum(b) => {
            let _ = b.g_mul_scalar_(momentum);
            let _ = b.g_add_(&d);
            b.shallow_clone()
        }
        _ => {
            let b = d.detach().copy();
            *state = State::Momentum(b.shallow_clone());
            b
        }
    };
    let _ = p.g_add_(&(buf * (-lr)));
}

/// The official LARS (from Barlow Twins): weight decay and trust ratio on non-1-D parameters.
fn lars_update(
    state: &mut State,
    p: &mut Tensor,
    grad: &Tensor,
    lr: f64,
    wd: f64,
    momentum: f64,
    eta: f64,
) {
    let mut dp = grad.shallow_clone();
    if p.dim() != 1 {
        dp = &dp + &*p * wd;
        let pn = p.norm().double_value(&[]);
        let un = dp.norm().double_value(&[]);
        let q = if pn > 0.0 && un > 0.0 {
            eta * pn / un
        } else {
            1.0
        };
        dp = &dp * q;
    }
    if !matches!(state, State::Momentum(_)) {
        *state = State::Momentum(p.zeros_like());
    }
    let State::Momentum(mu) = state else {
        unreachable!()
    };
    let _ = mu.g_mul_scalar_(momentum);
    let _ = mu.g_add_(&dp);
    let _ = p.g_add_(&(&*mu * (-lr)));
}

/// One parameter group of a custom grouping (fine-tuning's layer-wise decay): the indices of
/// its parameters in the [`ParamStore`], the factor its learning rate is multiplied by
/// (`lr_scale`) and whether the step's weight decay applies to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaledGroup {
    /// Group name as the official `get_parameter_groups` prints it (`layer_3_decay`, ...).
    pub name: String,
    pub indices: Vec<usize>,
    pub lr_scale: f64,
    pub weight_decay: bool,
}

impl Optimizer {
    /// One step over custom groups: group g uses learning rate `lr * g.lr_scale` and weight
    /// decay `wd` when `g.weight_decay` (else 0), as the official fine-tuning loop sets
    /// `param_group["lr"] = lr * param_group["lr_scale"]`. Parameters in no group are left
    /// alone; the per-parameter state is the same as [`Optimizer::step`]'s, so
    /// [`Optimizer::state_tensors`] / [`Optimizer::load_state`] checkpoint it.
    pub fn step_groups(
        &mut self,
        ps: &ParamStore,
        grads: &[Option<Tensor>],
        groups: &[ScaledGroup],
        lr: f64,
        wd: f64,
    ) -> Result<()> {
        let params = ps.params();
        if grads.len() != params.len() {
            bail!("{} gradients for {} parameters", grads.len(), params.len());
        }
        let _guard = tch::no_grad_guard();
        for g in groups {
            let (glr, gwd) = (lr * g.lr_scale, if g.weight_decay { wd } else { 0.0 });
            self.update_group(ps, grads, &g.indices, glr, gwd)?;
        }
        Ok(())
    }
}
