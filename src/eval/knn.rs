//! Weighted k-NN classifier of the official `eval_knn.py` (from DINO).
//!
//! For each test feature: cosine similarities to all training features (features are expected
//! L2-normalised), the k largest, and a vote where neighbour j adds `exp(sim_j / T)` to its
//! class. Top-1 / top-5 accuracy in percent.

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

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
