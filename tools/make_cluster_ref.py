"""Writes tests/data/cluster_ref.json: scikit-learn's NMI / ARI / Fowlkes-Mallows and the
Hungarian-matched accuracy (scipy's linear_sum_assignment) for fixed label assignments (the
metrics of the official `eval_pred`). Run once with scikit-learn installed:
  .venv/bin/pip install scikit-learn && .venv/bin/python tools/make_cluster_ref.py
"""
import json

import numpy as np
import sklearn
from scipy.optimize import linear_sum_assignment
from sklearn import metrics


def matched_accuracy(labels, pred):
    """Best one-to-one cluster->label matching, as a fraction of all samples."""
    _, li = np.unique(labels, return_inverse=True)
    _, pi = np.unique(pred, return_inverse=True)
    table = np.zeros((li.max() + 1, pi.max() + 1), dtype=np.int64)
    np.add.at(table, (li, pi), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return table[rows, cols].sum() / len(labels)


def official_style_accuracy(labels, pred):
    """The official get_y_preds route (square cost over the first n label ids, cluster id ->
    label through the assignment), valid when cluster ids lie in 0..n_labels and include 0."""
    n = len(set(labels))
    conf = metrics.confusion_matrix(labels, pred)
    cost = np.array([[conf[:, j].sum() - conf[i, j] for i in range(n)] for j in range(n)])
    rows, cols = linear_sum_assignment(cost)
    to_label = np.zeros(n)
    to_label[rows] = cols
    return metrics.accuracy_score(to_label[pred], labels)

rng = np.random.default_rng(0)
cases = []
labels = rng.integers(0, 10, 500)
for name, pred in [
    ("random_200_clusters", rng.integers(0, 200, 500)),
    ("noisy_copy", np.where(rng.random(500) < 0.7, labels, rng.integers(0, 10, 500))),
    ("perfect_renamed", (labels * 7 + 3) % 50),
    ("single_cluster", np.zeros(500, dtype=np.int64)),
    ("permuted_noisy", rng.permutation(10)[np.where(rng.random(500) < 0.6, labels, rng.integers(0, 10, 500))]),
]:
    acc = matched_accuracy(labels, pred)
    if pred.min() == 0 and pred.max() < len(set(labels)):
        assert abs(acc - official_style_accuracy(labels, pred)) < 1e-12, name
    cases.append({
        "name": name,
        "labels": labels.tolist(),
        "pred": pred.tolist(),
        "nmi": metrics.normalized_mutual_info_score(labels, pred),
        "ari": metrics.adjusted_rand_score(labels, pred),
        "fmi": metrics.fowlkes_mallows_score(labels, pred),
        "acc": acc,
    })
json.dump({"sklearn": sklearn.__version__, "cases": cases}, open("tests/data/cluster_ref.json", "w"))
