//! Training checkpoints: one safetensors file with the student (`student.` + official names),
//! the teacher (`teacher.`), the optimizer state (`optimizer.`), the loss centres (`loss.`), and
//! in its metadata the next epoch, the resolved arguments and the model configuration.
//!
//! Files are written atomically (temporary file, fsync, rename): a crash or a full disk while
//! saving leaves the previous checkpoint intact.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::amp::{GradScaler, Precision};
use super::{Ibot, IbotConfig};
use crate::config::TrainConfig;
use crate::params::{read_safetensors, write_safetensors};

pub const FORMAT: &str = "ibot-rs-checkpoint/1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    /// The epoch to run next (the official checkpoint's `epoch`).
    pub epoch: usize,
    /// The run's resolved configuration, read tolerantly (see [`crate::config`]).
    #[serde(default)]
    pub args: TrainConfig,
    pub config: IbotConfig,
    /// Loss-scaler state of float16 runs (the official `fp16_scaler`).
    #[serde(default)]
    pub scaler: Option<GradScaler>,
    /// The precision the run used (absent in checkpoints of earlier releases): a run resumed
    /// with the same `--use_fp16` and `--precision auto` keeps it rather than deciding again.
    #[serde(default)]
    pub precision: Option<Precision>,
}

/// Writes `ibot`'s complete training state to `path`.
pub fn save(path: &Path, ibot: &Ibot, next_epoch: usize, args: &TrainConfig) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (k, t) in ibot.student_ps.state_dict() {
        tensors.push((format!("student.{k}"), t.shallow_clone()));
    }
    for (k, t) in ibot.teacher_ps.state_dict() {
        tensors.push((format!("teacher.{k}"), t.shallow_clone()));
    }
    for (k, t) in ibot.optimizer.state_tensors(&ibot.student_ps) {
        tensors.push((format!("optimizer.{k}"), t));
    }
    tensors.push(("loss.center".into(), ibot.loss.center.shallow_clone()));
    tensors.push(("loss.center2".into(), ibot.loss.center2.shallow_clone()));
    let meta = CheckpointMeta {
        format: FORMAT.into(),
        epoch: next_epoch,
        args: args.clone(),
        config: ibot.cfg.clone(),
        scaler: (ibot.precision == Precision::Fp16).then(|| ibot.scaler.clone()),
        precision: Some(ibot.precision),
    };
    let mut md = HashMap::new();
    md.insert("ibot".to_string(), serde_json::to_string(&meta)?);
    write_safetensors(path, &tensors, Some(md))
        .with_context(|| format!("saving checkpoint {}", path.display()))
}

/// Reads only the metadata of a checkpoint.
pub fn read_meta(path: &Path) -> Result<CheckpointMeta> {
    let md = crate::params::read_safetensors_metadata(path)?;
    let raw = md.get("ibot").ok_or_else(|| {
        anyhow!(
            "{} has no ibot training metadata (not a checkpoint written by `ibot train`)",
            path.display()
        )
    })?;
    let meta: CheckpointMeta = serde_json::from_str(raw)
        .with_context(|| format!("{}: damaged metadata", path.display()))?;
    ensure!(
        meta.format == FORMAT,
        "{}: unsupported checkpoint format '{}'",
        path.display(),
        meta.format
    );
    Ok(meta)
}

/// The paths (`a.b.c`) where two JSON values differ, each with both values.
pub fn json_diff(
    old: &serde_json::Value,
    new: &serde_json::Value,
    path: &str,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let null = Value::Null;
                json_diff(
                    a.get(k).unwrap_or(&null),
                    b.get(k).unwrap_or(&null),
                    &join(k),
                    out,
                );
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                json_diff(x, y, &join(&i.to_string()), out);
            }
        }
        (a, b) if a != b => out.push(format!(
            "{} {a} vs {b}",
            if path.is_empty() { "<root>" } else { path }
        )),
        _ => {}
    }
}

/// Restores student, teacher, optimizer and centres; returns the metadata (next epoch etc.).
pub fn load(path: &Path, ibot: &mut Ibot) -> Result<CheckpointMeta> {
    let meta = read_meta(path)?;
    // A different number of epochs only stretches the schedules; anything else is another model.
    let shape = |c: &IbotConfig| IbotConfig {
        loss: super::IbotLossConfig {
            nepochs: 0,
            ..c.loss.clone()
        },
        ..c.clone()
    };
    if shape(&meta.config) != shape(&ibot.cfg) {
        let mut diffs = Vec::new();
        json_diff(
            &serde_json::to_value(shape(&meta.config))?,
            &serde_json::to_value(shape(&ibot.cfg))?,
            "",
            &mut diffs,
        );
        const SHOWN: usize = 8;
        let more = diffs.len().saturating_sub(SHOWN);
        diffs.truncate(SHOWN);
        bail!(
            "{} was written for a different model or loss configuration; use the same options as the run that wrote it \
             (its args are in args.json next to it). Differences (checkpoint vs now): {}{}",
            path.display(),
            diffs.join("; "),
            if more > 0 { format!("; and {more} more") } else { String::new() }
        );
    }
    let t = read_safetensors(path)?;
    ibot.student_ps
        .load_strict(&t, "student.")
        .context("student")?;
    ibot.teacher_ps
        .load_strict(&t, "teacher.")
        .context("teacher")?;
    ibot.optimizer
        .load_state(&ibot.student_ps, &t, "optimizer.")?;
    let get = |k: &str| {
        t.get(k)
            .ok_or_else(|| anyhow!("{} has no '{k}'", path.display()))
    };
    let dev = ibot.device;
    let c = get("loss.center")?;
    let c2 = get("loss.center2")?;
    ensure!(
        c.size() == ibot.loss.center.size() && c2.size() == ibot.loss.center2.size(),
        "loss centres have the wrong shape"
    );
    ibot.loss.center = c.to_device(dev);
    ibot.loss.center2 = c2.to_device(dev);
    if let Some(sc) = &meta.scaler {
        ibot.scaler = sc.clone();
    }
    Ok(meta)
}
