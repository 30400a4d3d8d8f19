"""scikit-learn's multinomial LogisticRegression at the optimum of the objective of the official
eval_logistic_regression.py (cyanure MultiClassifier, loss multiclass-logistic, penalty l2, no
intercept), for tests/protocols.rs.

cyanure minimises 1/n sum_i loss_i + lambd/2 ||W||^2; scikit-learn minimises
C sum_i loss_i + 1/2 ||W||^2. Dividing the latter by C n gives the former with lambd = 1/(C n),
so C = 1/(n lambd).

Usage: python logreg_ref.py IN.npz OUT.npz
IN.npz: xtr [n, d] float64 (L2-normalised), ytr [n] int64, xte [m, d], lambd [k]
OUT.npz: w{i} [classes, d], obj{i} [] (the cyanure objective at w{i}), pred{i} [m]
"""
import sys

import numpy as np
from sklearn.linear_model import LogisticRegression

d = np.load(sys.argv[1])
xtr, ytr, xte = d["xtr"], d["ytr"], d["xte"]
n = xtr.shape[0]
out = {}
for i, lambd in enumerate(d["lambd"]):
    clf = LogisticRegression(C=1.0 / (n * lambd), fit_intercept=False, solver="newton-cg",
                             tol=1e-13, max_iter=100000)
    clf.fit(xtr, ytr)
    w = clf.coef_
    z = xtr @ w.T
    zmax = z.max(axis=1, keepdims=True)
    lse = (zmax + np.log(np.exp(z - zmax).sum(axis=1, keepdims=True)))[:, 0]
    pos = np.searchsorted(clf.classes_, ytr)
    obj = np.mean(lse - z[np.arange(n), pos]) + 0.5 * lambd * np.sum(w * w)
    out[f"w{i}"] = np.ascontiguousarray(w)
    out[f"obj{i}"] = np.array(obj)
    out[f"pred{i}"] = clf.predict(xte).astype(np.int64)
np.savez(sys.argv[2], **out)
