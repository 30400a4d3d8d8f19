//! Weighted k-NN classifier of the official `eval_knn.py` (from DINO).
//!
//! For each test feature: cosine similarities to all training features (features are expected
//! L2-normalised), the k largest, and a vote where neighbour j adds `exp(sim_j / T)` to its
//! class. Top-1 / top-5 accuracy in percent.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};

use super::features::{self, FeatureKind, FeatureSpec};
use super::split::{eval_splits, first_n};
use crate::dist::Comm;

/// Test rows processed at once (bounds the `[chunk, n_train]` similarity matrix).
const CHUNK: i64 = 1024;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnnResult {
    pub top1: f64,
    pub top5: f64,
}

/// `train_features` `[N, D]`, `train_labels` `[N]` (int), `test_features` `[M, D]`,
/// `test_labels` `[M]`, with labels in `0..num_classes`.
pub fn knn_classifier(
    train_features: &Tensor,
    train_labels: &Tensor,
    test_features: &Tensor,
    test_labels: &Tensor,
    k: i64,
    t: f64,
    num_classes: i64,
) -> Result<KnnResult> {
    let (n, d) = train_features
        .size2()
        .map_err(|_| anyhow::anyhow!("train features must be [N, D]"))?;
    let (m, d2) = test_features
        .size2()
        .map_err(|_| anyhow::anyhow!("test features must be [M, D]"))?;
    ensure!(d == d2, "train features have dim {d}, test features {d2}");
    ensure!(
        train_labels.size() == [n],
        "train labels must be [{n}], got {:?}",
        train_labels.size()
    );
    ensure!(
        test_labels.size() == [m],
        "test labels must be [{m}], got {:?}",
        test_labels.size()
    );
    ensure!(m > 0, "no test features");
    ensure!(
        k >= 1 && k <= n,
        "k = {k} must be in 1..={n} (the number of training features)"
    );
    ensure!(num_classes >= 1, "num_classes must be positive");
    let train_labels = train_labels.to_kind(Kind::Int64);
    let test_labels = test_labels.to_kind(Kind::Int64);
    let (lo, hi) = (
        train_labels
            .min()
            .int64_value(&[])
            .min(test_labels.min().int64_value(&[])),
        train_labels
            .max()
            .int64_value(&[])
            .max(test_labels.max().int64_value(&[])),
    );
    ensure!(
        lo >= 0 && hi < num_classes,
        "labels must be in 0..{num_classes}, found {lo}..={hi}"
    );
    let _guard = tch::no_grad_guard();
    let train_t = train_features.to_kind(Kind::Float).transpose(0, 1);
    let top5_k = 5.min(num_classes);
    let (mut top1, mut top5) = (0i64, 0i64);
    let mut start = 0;
    while start < m {
        let len = CHUNK.min(m - start);
        let feats = test_features.narrow(0, start, len).to_kind(Kind::Float);
        let targets = test_labels.narrow(0, start, len);
        let sim = feats.mm(&train_t);
        let (dist, idx) = sim.topk(k, 1, true, true);
        let neigh = train_labels
            .unsqueeze(0)
            .expand([len, n], false)
            .gather(1, &idx, false);
        let one_hot = Tensor::zeros([len * k, num_classes], (Kind::Float, feats.device()))
            .scatter_value(1, &neigh.reshape([-1, 1]), 1.0);
        let w = (dist / t).exp();
        let probs = (one_hot.reshape([len, k, num_classes]) * w.reshape([len, k, 1]))
            .sum_dim_intlist(1, false, Kind::Float);
        let (_, pred) = probs.sort(1, true);
        let correct = pred.eq_tensor(&targets.reshape([-1, 1]));
        top1 += correct.narrow(1, 0, 1).sum(Kind::Int64).int64_value(&[]);
        top5 += correct
            .narrow(1, 0, top5_k)
            .sum(Kind::Int64)
            .int64_value(&[]);
        start += len;
    }
    Ok(KnnResult {
        top1: top1 as f64 * 100.0 / m as f64,
        top5: top5 as f64 * 100.0 / m as f64,
    })
}

/// `ibot eval-knn` (the official eval_knn.py): options.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct KnnConfig {
    pub weights: super::weights::WeightsConfig,
    pub data_path: Option<PathBuf>,
    pub train_path: Option<PathBuf>,
    pub val_path: Option<PathBuf>,
    /// Numbers of nearest neighbours, each at least 1.
    pub nb_knn: Vec<i64>,
    pub temperature: f64,
    pub n_last_blocks: usize,
    pub avgpool_patchtokens: u8,
    pub batch_size_per_gpu: usize,
    pub subset: Option<usize>,
    pub dump_features: Option<PathBuf>,
    pub load_features: Option<PathBuf>,
    /// Also write the accuracies as JSON to this file.
    pub output: Option<PathBuf>,
    pub dist: crate::dist::DistConfig,
}

impl Default for KnnConfig {
    fn default() -> Self {
        Self {
            weights: Default::default(),
            data_path: None,
            train_path: None,
            val_path: None,
            nb_knn: vec![10, 20, 100, 200],
            temperature: 0.07,
            n_last_blocks: 1,
            avgpool_patchtokens: 0,
            batch_size_per_gpu: 128,
            subset: None,
            dump_features: None,
            load_features: None,
            output: None,
            dist: Default::default(),
        }
    }
}

/// The four feature tensors of a k-NN evaluation: memory features and labels, query features
/// and labels.
type KnnFeatures = (Tensor, Tensor, Tensor, Tensor);

/// Features saved by `--dump_features` in `dir`.
fn load_features(dir: &std::path::Path) -> Result<KnnFeatures> {
    let path = dir.join("knn_features.safetensors");
    let mut t = crate::params::read_safetensors(&path)?;
    let mut take = |n: &str| {
        t.remove(n)
            .with_context(|| format!("{} has no '{n}'", path.display()))
    };
    Ok((
        take("train_features")?,
        take("train_labels")?,
        take("test_features")?,
        take("test_labels")?,
    ))
}

/// Every rank extracts its shard of the memory and query features; rank 0 gets them all (and
/// saves them with `--dump_features`).
fn compute_features(k: &KnnConfig, comm: &dyn Comm, device: Device) -> Result<KnnFeatures> {
    let (_, vit, size, device) = k.weights.open_backbone_on(device)?;
    let spec = FeatureSpec {
        n_last_blocks: k.n_last_blocks,
        avgpool: k.avgpool_patchtokens,
    };
    spec.validate_for(&vit)?;
    let (trp, trs, tep, tes) = eval_splits(
        k.data_path.as_deref(),
        k.train_path.as_deref(),
        k.val_path.as_deref(),
    )?;
    let train_ds = crate::data::dataset::open(&trp, trs)?;
    let test_ds = crate::data::dataset::open(&tep, tes)?;
    if comm.is_main() {
        super::warn_upsampling(train_ds.as_ref(), size, k.weights.crop_size.is_some());
    }
    let lim = k.subset.unwrap_or(usize::MAX);
    let tr = first_n(train_ds.len(), lim);
    let te = first_n(test_ds.len(), lim);
    let bs = k.batch_size_per_gpu;
    let extract = |ds: &dyn crate::data::dataset::Dataset, idx: &[usize]| {
        features::extract_sharded(
            comm,
            Some(&vit),
            FeatureKind::Backbone(spec),
            ds,
            idx,
            size,
            bs,
            device,
        )
    };
    let (ftr, ltr) = extract(train_ds.as_ref(), &tr)?;
    let (fte, lte) = extract(test_ds.as_ref(), &te)?;
    if let (Some(dir), true) = (&k.dump_features, comm.is_main()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let named = [
            ("train_features", &ftr),
            ("train_labels", &ltr),
            ("test_features", &fte),
            ("test_labels", &lte),
        ]
        .map(|(n, t)| (n.to_string(), t.shallow_clone()));
        crate::params::write_safetensors(&dir.join("knn_features.safetensors"), &named, None)?;
        eprintln!(
            "features saved to {}",
            dir.join("knn_features.safetensors").display()
        );
    }
    Ok((ftr, ltr, fte, lte))
}

/// `ibot eval-knn`: features of the memory and query images (or `--load_features`), then the
/// weighted k-NN accuracy for every k, printed as the official script prints it.
pub fn run(k: &KnnConfig) -> Result<()> {
    if let Some(bad) = k.nb_knn.iter().find(|&&x| x < 1) {
        anyhow::bail!("--nb_knn: every k must be at least 1 (got {bad})");
    }
    // The weights are exp(similarity / T): T = 0 gave NaN votes and a meaningless accuracy.
    anyhow::ensure!(
        k.temperature > 0.0 && k.temperature.is_finite(),
        "--temperature must be > 0 (got {})",
        k.temperature
    );
    let t0 = std::time::Instant::now();
    let (comm, device, _) = crate::dist::join_world(&k.dist, k.weights.device)?;
    let comm = comm.as_ref();
    // Only the main rank writes (on several nodes, the folder may exist on its node only).
    if let (Some(out), true) = (&k.output, comm.is_main()) {
        crate::util::check_output_file(out, "--output")?;
    }
    if let (Some(dir), true) = (&k.dump_features, comm.is_main()) {
        crate::util::check_output_dir(dir, "--dump_features")?;
    }
    let (ftr, ltr, fte, lte) = match &k.load_features {
        Some(dir) => load_features(dir)?,
        None => compute_features(k, comm, device)?,
    };
    // As the official eval_knn.py: every rank extracts, rank 0 classifies and reports.
    if !comm.is_main() {
        return Ok(());
    }
    eprintln!(
        "features of {} training and {} test images ({:.0}s{})",
        ftr.size()[0],
        fte.size()[0],
        t0.elapsed().as_secs_f64(),
        if comm.world_size() > 1 {
            format!(", {} ranks", comm.world_size())
        } else {
            String::new()
        }
    );
    let nclass = ltr.max().int64_value(&[]).max(lte.max().int64_value(&[])) + 1;
    let mut results = Vec::new();
    for &kk in &k.nb_knn {
        if kk > ftr.size()[0] {
            eprintln!(
                "note: k = {kk} is more than the {} training images; using k = {}",
                ftr.size()[0],
                ftr.size()[0]
            );
        }
        let r = knn_classifier(
            &ftr,
            &ltr,
            &fte,
            &lte,
            kk.min(ftr.size()[0]),
            k.temperature,
            nclass.max(5),
        )?;
        println!(
            "{kk}-NN classifier result: Top1: {}, Top5: {}",
            r.top1, r.top5
        );
        results.push(serde_json::json!({"k": kk, "top1": r.top1, "top5": r.top5}));
    }
    if let Some(out) = &k.output {
        crate::util::write_json(
            out,
            &serde_json::json!({"pretrained_weights": k.weights.pretrained_weights, "checkpoint_key": k.weights.checkpoint_key, "temperature": k.temperature, "n_last_blocks": k.n_last_blocks, "avgpool_patchtokens": k.avgpool_patchtokens, "knn": results}),
        )?;
    }
    Ok(())
}
