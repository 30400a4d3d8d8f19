//! `ibot demo`: pre-trains a small ViT on Fashion-MNIST for a few minutes, then compares the
//! k-NN accuracy of its teacher with the same network at initialisation and with raw pixels.

use std::time::Instant;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::config::TrainConfig;
use crate::data::dataset::Dataset;
use crate::eval::features::{self, FeatureKind, FeatureSpec};
use crate::eval::knn::knn_classifier;
use crate::eval::split::{eval_splits, first_n};
use crate::models::Backbone;
use crate::train::run;

/// Where the Debian package `dataset-fashion-mnist` puts its files (the demo's default data).
pub const FMNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Options of `ibot demo`: a training run and the size of the k-NN comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DemoConfig {
    #[serde(flatten)]
    pub train: TrainConfig,
    /// Training-split images whose features form the k-NN memory.
    pub knn_train: usize,
    /// Test-split images classified by k-NN.
    pub knn_test: usize,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            train: TrainConfig::default(),
            knn_train: 10000,
            knn_test: 2000,
        }
    }
}

/// The memory and query images of a k-NN evaluation.
pub type KnnData<'a> = (&'a dyn Dataset, &'a [usize], &'a dyn Dataset, &'a [usize]);

/// Weighted k-NN accuracy (top-1, top-5) for each k of `ks` with features of `backbone` (or
/// raw pixels), reported on stderr under `name`.
#[allow(clippy::too_many_arguments)]
pub fn knn_report(
    name: &str,
    backbone: Option<&Backbone>,
    kind: FeatureKind,
    data: KnnData,
    size: usize,
    ks: &[i64],
    t: f64,
    device: Device,
) -> Result<Vec<(i64, f64, f64)>> {
    let (train_ds, train_idx, test_ds, test_idx) = data;
    let t0 = Instant::now();
    let (ftr, ltr) = features::extract(backbone, kind, train_ds, train_idx, size, 256, device)?;
    let (fte, lte) = features::extract(backbone, kind, test_ds, test_idx, size, 256, device)?;
    let nclass = ltr.max().int64_value(&[]).max(lte.max().int64_value(&[])) + 1;
    let mut out = Vec::new();
    for &k in ks {
        let r = knn_classifier(
            &ftr,
            &ltr,
            &fte,
            &lte,
            k.min(ftr.size()[0]),
            t,
            nclass.max(5),
        )?;
        out.push((k, r.top1, r.top5));
    }
    let best = out
        .iter()
        .map(|r| format!("{}-NN {:.2}%", r.0, r.1))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!("k-NN {name}: {best} ({:.0}s)", t0.elapsed().as_secs_f64());
    Ok(out)
}

/// Trains, then prints the three k-NN accuracies.
pub fn run(d: &DemoConfig) -> Result<()> {
    let a = &d.train;
    if !a.data.data_path.exists() {
        bail!(
            "{} not found. Install Fashion-MNIST with 'apt-get install dataset-fashion-mnist' (bash scripts/bootstrap.sh does it \
             when run as root), or point --data_path at any image folder",
            a.data.data_path.display()
        );
    }
    let t0 = Instant::now();
    eprintln!(
        "== iBOT demo: pre-training ({} epochs) into {}",
        a.schedule.epochs,
        a.run.output_dir.display()
    );
    let out = run::train(a)?;
    let device = out.ibot.device;
    let size = a.data.global_crops_size;
    let (train_path, train_split, test_path, test_split) =
        eval_splits(Some(&a.data.data_path), None, None)?;
    let train_ds = crate::data::dataset::open(&train_path, train_split)?;
    let test_ds = crate::data::dataset::open(&test_path, test_split)?;
    let tr = first_n(train_ds.len(), d.knn_train);
    let te = first_n(test_ds.len(), d.knn_test);
    let data = (train_ds.as_ref(), &tr[..], test_ds.as_ref(), &te[..]);
    eprintln!(
        "== k-NN (k=20, T=0.07) on {} training and {} test images",
        tr.len(),
        te.len()
    );
    let ks = [20];
    let cls = FeatureKind::Backbone(FeatureSpec::CLS);
    let trained = knn_report(
        "iBOT teacher",
        Some(&out.ibot.teacher.backbone),
        cls,
        data,
        size,
        &ks,
        0.07,
        device,
    )?;
    let init = crate::train::Ibot::seeded(run::ibot_config(a)?, device, a.run.seed)?;
    let at_init = knn_report(
        "same network at initialisation",
        Some(&init.teacher.backbone),
        cls,
        data,
        size,
        &ks,
        0.07,
        device,
    )?;
    let pixels = knn_report(
        "raw pixels",
        None,
        FeatureKind::Pixels,
        data,
        size,
        &ks,
        0.07,
        device,
    )?;
    println!();
    println!("Fashion-MNIST k-NN top-1 (k=20, {} test images):", te.len());
    println!("  iBOT-pretrained teacher    {:6.2}%", trained[0].1);
    println!("  same ViT at initialisation {:6.2}%", at_init[0].1);
    println!("  raw pixels                 {:6.2}%", pixels[0].1);
    println!(
        "total time {:.0}s; checkpoint and log.txt in {}",
        t0.elapsed().as_secs_f64(),
        a.run.output_dir.display()
    );
    Ok(())
}
