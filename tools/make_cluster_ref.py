"""Writes tests/data/cluster_ref.json: scikit-learn's NMI / ARI / Fowlkes-Mallows for fixed label
assignments (the metrics of the official `eval_pred`). Run once with scikit-learn installed:
  .venv/bin/pip install scikit-learn && .venv/bin/python tools/make_cluster_ref.py
"""
import json

import numpy as np
import sklearn
from sklearn import metrics

rng = np.random.default_rng(0)
cases = []
labels = rng.integers(0, 10, 500)
for name, pred in [
    ("random_200_clusters", rng.integers(0, 200, 500)),
    ("noisy_copy", np.where(rng.random(500) < 0.7, labels, rng.integers(0, 10, 500))),
    ("perfect_renamed", (labels * 7 + 3) % 50),
    ("single_cluster", np.zeros(500, dtype=np.int64)),
]:
    cases.append({
        "name": name,
        "labels": labels.tolist(),
        "pred": pred.tolist(),
        "nmi": metrics.normalized_mutual_info_score(labels, pred),
        "ari": metrics.adjusted_rand_score(labels, pred),
        "fmi": metrics.fowlkes_mallows_score(labels, pred),
    })
json.dump({"sklearn": sklearn.__version__, "cases": cases}, open("tests/data/cluster_ref.json", "w"))
