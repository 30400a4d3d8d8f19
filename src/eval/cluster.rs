//! Clustering metrics of the official `eval_pred`: NMI, ARI and the Fowlkes–Mallows F score,
//! computed as scikit-learn does (natural logarithms, arithmetic-mean normalisation).

use std::collections::HashMap;

/// Contingency counts of (true label, predicted cluster).
struct Contingency {
    n: f64,
    cells: Vec<f64>,
    rows: Vec<f64>,
    cols: Vec<f64>,
    /// (row, col) of each cell.
    at: Vec<(usize, usize)>,
}

fn contingency(labels: &[i64], pred: &[i64]) -> Contingency {
    assert_eq!(
        labels.len(),
        pred.len(),
        "labels and predictions differ in length"
    );
    let mut li = HashMap::new();
    let mut pi = HashMap::new();
    let mut cell: HashMap<(usize, usize), f64> = HashMap::new();
    for (&l, &p) in labels.iter().zip(pred) {
        let n = li.len();
        let r = *li.entry(l).or_insert(n);
        let n = pi.len();
        let c = *pi.entry(p).or_insert(n);
        *cell.entry((r, c)).or_default() += 1.0;
    }
    let mut rows = vec![0.0; li.len()];
    let mut cols = vec![0.0; pi.len()];
    let mut at: Vec<(usize, usize)> = cell.keys().copied().collect();
    at.sort_unstable();
    let cells: Vec<f64> = at.iter().map(|k| cell[k]).collect();
    for (&(r, c), &v) in at.iter().zip(&cells) {
        rows[r] += v;
        cols[c] += v;
    }
    Contingency {
        n: labels.len() as f64,
        cells,
        rows,
        cols,
        at,
    }
}

fn entropy(counts: &[f64]) -> f64 {
    let total: f64 = counts.iter().sum();
    if counts.len() <= 1 || total == 0.0 {
        return 0.0;
    }
    -counts
        .iter()
        .filter(|&&c| c > 0.0)
        .map(|&c| (c / total) * (c.ln() - total.ln()))
        .sum::<f64>()
}

/// `sklearn.metrics.normalized_mutual_info_score` (arithmetic mean).
pub fn nmi(labels: &[i64], pred: &[i64]) -> f64 {
    let c = contingency(labels, pred);
    if (c.rows.len() == 1 && c.cols.len() == 1) || c.n == 0.0 {
        return 1.0;
    }
    let (sr, sc): (f64, f64) = (c.rows.iter().sum(), c.cols.iter().sum());
    let mut mi = 0.0;
    for (&(r, k), &v) in c.at.iter().zip(&c.cells) {
        let p = v / c.n;
        let term =
            p * (v.ln() - c.n.ln()) + p * (-(c.rows[r] * c.cols[k]).ln() + sr.ln() + sc.ln());
        mi += if term.abs() < f64::EPSILON { 0.0 } else { term };
    }
    let mi = mi.max(0.0);
    if mi == 0.0 {
        return 0.0;
    }
    let norm = (entropy(&c.rows) + entropy(&c.cols)) / 2.0;
    mi / norm
}

/// Pair confusion counts (tn, fp, fn, tp) as scikit-learn's `pair_confusion_matrix`.
fn pairs(c: &Contingency) -> (f64, f64, f64, f64) {
    let sum_sq: f64 = c.cells.iter().map(|v| v * v).sum();
    let tp = sum_sq - c.n;
    let fp =
        c.at.iter()
            .zip(&c.cells)
            .map(|(&(_, k), &v)| v * c.cols[k])
            .sum::<f64>()
            - sum_sq;
    let fn_ =
        c.at.iter()
            .zip(&c.cells)
            .map(|(&(r, _), &v)| v * c.rows[r])
            .sum::<f64>()
            - sum_sq;
    let tn = c.n * c.n - fp - fn_ - sum_sq;
    (tn, fp, fn_, tp)
}

/// `sklearn.metrics.adjusted_rand_score`.
pub fn ari(labels: &[i64], pred: &[i64]) -> f64 {
    let c = contingency(labels, pred);
    let (tn, fp, fn_, tp) = pairs(&c);
    if fn_ == 0.0 && fp == 0.0 {
        return 1.0;
    }
    2.0 * (tp * tn - fn_ * fp) / ((tp + fn_) * (fn_ + tn) + (tp + fp) * (fp + tn))
}

/// `sklearn.metrics.fowlkes_mallows_score`.
pub fn fowlkes_mallows(labels: &[i64], pred: &[i64]) -> f64 {
    let c = contingency(labels, pred);
    let tk: f64 = c.cells.iter().map(|v| v * v).sum::<f64>() - c.n;
    let pk: f64 = c.cols.iter().map(|v| v * v).sum::<f64>() - c.n;
    let qk: f64 = c.rows.iter().map(|v| v * v).sum::<f64>() - c.n;
    if tk == 0.0 {
        0.0
    } else {
        (tk / pk).sqrt() * (tk / qk).sqrt()
    }
}

/// Accuracy (in 0..=1) of the best one-to-one matching of clusters to labels: the Hungarian
/// (Kuhn–Munkres) assignment on the contingency table, as the official `eval_pred(...,
/// calc_acc=True)` computes it with `munkres`. Clusters left without a label (more clusters than
/// labels) count as wrong. Where the official code's indexing works (cluster ids in `0..n_labels`
/// with a 0 among them) both give the same number; with cluster ids beyond that range the
/// official code stops with an IndexError, while this one still returns the matched accuracy.
pub fn hungarian_accuracy(labels: &[i64], pred: &[i64]) -> f64 {
    let c = contingency(labels, pred);
    if c.n == 0.0 {
        return 0.0;
    }
    // kuhn_munkres needs rows <= columns: put the smaller side on the rows.
    let transpose = c.rows.len() > c.cols.len();
    let (nr, nc) = if transpose {
        (c.cols.len(), c.rows.len())
    } else {
        (c.rows.len(), c.cols.len())
    };
    let mut w = pathfinding::matrix::Matrix::new(nr, nc, 0i64);
    for (&(r, k), &v) in c.at.iter().zip(&c.cells) {
        let (i, j) = if transpose { (k, r) } else { (r, k) };
        w[(i, j)] = v as i64;
    }
    let (matched, _) = pathfinding::kuhn_munkres::kuhn_munkres(&w);
    matched as f64 / c.n
}

/// The official `eval_pred`: (NMI, ARI, F, ACC), ACC being -1 unless `calc_acc`.
pub fn eval_pred(labels: &[i64], pred: &[i64], calc_acc: bool) -> (f64, f64, f64, f64) {
    let acc = if calc_acc {
        hungarian_accuracy(labels, pred)
    } else {
        -1.0
    };
    (
        nmi(labels, pred),
        ari(labels, pred),
        fowlkes_mallows(labels, pred),
        acc,
    )
}
