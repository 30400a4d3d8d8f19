//! Clustering metrics against scikit-learn and scipy (values in tests/data/cluster_ref.json,
//! written by tools/make_cluster_ref.py). Tolerance 1e-9.

use ibot::eval::cluster::{ari, eval_pred, fowlkes_mallows, hungarian_accuracy, nmi};

#[test]
fn nmi_ari_fmi_match_scikit_learn() {
    let raw = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/cluster_ref.json"
    ))
    .unwrap();
    let j: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let cases = j["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for c in cases {
        let v = |k: &str| -> Vec<i64> {
            c[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        };
        let (l, p) = (v("labels"), v("pred"));
        let name = c["name"].as_str().unwrap();
        for (metric, ours) in [
            ("nmi", nmi(&l, &p)),
            ("ari", ari(&l, &p)),
            ("fmi", fowlkes_mallows(&l, &p)),
            ("acc", hungarian_accuracy(&l, &p)),
        ] {
            let want = c[metric].as_f64().unwrap();
            assert!(
                (ours - want).abs() < 1e-9,
                "{name} {metric}: ours {ours}, scikit-learn {want}"
            );
        }
    }
}

#[test]
fn eval_pred_leaves_acc_at_minus_one_unless_asked() {
    let l = [0, 0, 1, 1, 2, 2];
    let p = [5, 5, 7, 7, 7, 9];
    assert_eq!(eval_pred(&l, &p, false).3, -1.0);
    // Best matching: 5->0 (2), 7->1 (2), 9->2 (1) = 5 of 6.
    assert!((eval_pred(&l, &p, true).3 - 5.0 / 6.0).abs() < 1e-12);
    // More labels than clusters: the matrix is transposed internally.
    assert!((hungarian_accuracy(&p, &l) - 5.0 / 6.0).abs() < 1e-12);
}
