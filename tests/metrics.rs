//! Clustering metrics against scikit-learn (values in tests/data/cluster_ref.json, written by
//! tools/make_cluster_ref.py with scikit-learn). Tolerance 1e-9.

use ibot::eval::cluster::{ari, fowlkes_mallows, nmi};

#[test]
fn nmi_ari_fmi_match_scikit_learn() {
    let raw = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/cluster_ref.json"
    ))
    .unwrap();
    let j: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let cases = j["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
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
        ] {
            let want = c[metric].as_f64().unwrap();
            assert!(
                (ours - want).abs() < 1e-9,
                "{name} {metric}: ours {ours}, scikit-learn {want}"
            );
        }
    }
}
