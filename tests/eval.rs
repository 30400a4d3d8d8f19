//! Evaluation protocols against the official code: the linear probe's optimisation is checked
//! step by step against PyTorch (tests/py/linear_probe_ref.py run with the venv's torch at test
//! time), the feature layouts against eval_knn.py's `extract_features` run in PyTorch, and a
//! short end-to-end probe on Fashion-MNIST must learn.

mod common;

use std::path::PathBuf;

use ibot::eval::linear::{FeatureSpec, LinearProbe};
use ibot::models::{VisionTransformer, VitConfig};
use ibot::params::ParamStore;
use ibot::schedule::cosine_annealing_lr;
use tch::{Device, Kind, Tensor};

fn tmp(name: &str) -> PathBuf {
    common::scratch_dir("eval", name)
}

/// 3 epochs x 4 steps of SGD-momentum with the cosine schedule: weights within 1e-6 of PyTorch's
/// (float32; the differences are summation order), losses within 1e-6.
#[test]
fn linear_probe_optimisation_matches_pytorch() {
    tch::manual_seed(11);
    let (epochs, steps, b, f, c) = (3i64, 4i64, 16i64, 24i64, 7i64);
    let feats = Tensor::randn([epochs, steps, b, f], (Kind::Float, Device::Cpu));
    let targets = Tensor::randint(c, [epochs, steps, b], (Kind::Int64, Device::Cpu));
    let mut probe = LinearProbe::new(f, c, Device::Cpu);
    let base_lr = 0.5 * b as f64 / 256.0;
    let dir = tmp("linear");
    let r = common::python_reference(
        "linear_probe_ref.py",
        &[
            ("feats", feats.shallow_clone()),
            ("targets", targets.shallow_clone()),
            ("weight", probe.weight.detach()),
            ("bias", probe.bias.detach()),
            ("lr", Tensor::from(base_lr)),
        ],
        &dir,
    );
    for e in 0..epochs {
        let lr = cosine_annealing_lr(base_lr, e as usize, epochs as usize);
        for s in 0..steps {
            let loss = probe
                .train_step(&feats.get(e).get(s), &targets.get(e).get(s), lr)
                .unwrap();
            let want = r["losses"].double_value(&[e, s]);
            assert!(
                (loss - want).abs() < 1e-6,
                "loss at epoch {e} step {s}: {loss} vs {want}"
            );
        }
    }
    let dw = ibot::util::max_abs(&(probe.weight.detach() - &r["weight"]));
    let db = ibot::util::max_abs(&(probe.bias.detach() - &r["bias"]));
    assert!(
        dw < 1e-6 && db < 1e-6,
        "weights differ from PyTorch: {dw} {db}"
    );
}

#[test]
fn cosine_annealing_follows_the_closed_form() {
    assert_eq!(cosine_annealing_lr(0.1, 0, 100), 0.1);
    assert!((cosine_annealing_lr(0.1, 50, 100) - 0.05).abs() < 1e-15);
    assert!(cosine_annealing_lr(0.1, 100, 100).abs() < 1e-15);
}

fn tiny_vit() -> VisionTransformer {
    tiny_vit_and_params().0
}

fn tiny_vit_and_params() -> (VisionTransformer, ParamStore) {
    tch::manual_seed(3);
    let cfg = VitConfig {
        img_size: 32,
        patch_size: 8,
        in_chans: 3,
        embed_dim: 24,
        depth: 3,
        num_heads: 2,
        mlp_ratio: 2.0,
        qkv_bias: true,
        drop_path_rate: 0.0,
        masked_im_modeling: false,
    };
    let mut ps = ParamStore::new();
    let vit = VisionTransformer::new(&mut ps, "", &cfg, false, Device::Cpu).unwrap();
    (vit, ps)
}

/// The three official feature layouts (`--avgpool_patchtokens 0|1|2` with `--n_last_blocks 2`)
/// against eval_knn.py's `extract_features` run in PyTorch on a ViT laid out as the official one
/// (tests/py/features_ref.py, the mean-pooling model for layout 1); and the k-NN features that
/// `eval-knn` extracts from a data set with those options, L2-normalised as eval_knn.py does.
#[test]
fn feature_layouts_match_the_official_extract_features() {
    use ibot::eval::features::{eval_batch, extract, FeatureKind};
    let (vit, ps) = tiny_vit_and_params();
    let data = tmp("features-data");
    common::write_idx(&data, "train", 5, 28);
    let ds = ibot::data::dataset::open(&data, "train").unwrap();
    let idx: Vec<usize> = (0..5).collect();
    let (x, _) = eval_batch(ds.as_ref(), &idx, 32).unwrap();
    let n_last_blocks = 2usize;
    let mut inputs: Vec<(String, Tensor)> = vec![
        (
            "cfg".into(),
            Tensor::from_slice(&[3i64, 2, 8, n_last_blocks as i64]),
        ),
        ("x".into(), x.shallow_clone()),
    ];
    for (k, v) in ps.state_dict() {
        inputs.push((format!("sd/{k}"), v.detach().copy()));
    }
    let inputs: Vec<(&str, Tensor)> = inputs
        .iter()
        .map(|(k, v)| (k.as_str(), v.shallow_clone()))
        .collect();
    let r = common::python_reference("features_ref.py", &inputs, &tmp("features-ref"));
    let vit = ibot::models::Backbone::Vit(vit);
    for avgpool in 0..=2u8 {
        let spec = FeatureSpec {
            n_last_blocks,
            avgpool,
        };
        let f = spec.features_of(&vit, &x).unwrap();
        assert_eq!(f.size()[1], spec.dim(24));
        let d = ibot::util::max_abs(&(&f - &r[&format!("f{avgpool}")]));
        assert!(
            d < 1e-5,
            "avgpool_patchtokens {avgpool}: features differ by {d}"
        );
        // What eval-knn extracts with these options: the same features, L2-normalised.
        let (k, _) = extract(
            Some(&vit),
            FeatureKind::Backbone(spec),
            ds.as_ref(),
            &idx,
            32,
            2,
            Device::Cpu,
        )
        .unwrap();
        let want = if avgpool == 0 {
            r["knn"].shallow_clone()
        } else {
            let f = &r[&format!("f{avgpool}")];
            f / f.norm_scalaropt_dim(2.0, [1i64], true).clamp_min(1e-12)
        };
        let d = ibot::util::max_abs(&(&k - &want));
        assert!(d < 1e-5, "k-NN features of avgpool {avgpool} differ by {d}");
    }
    assert_eq!(
        FeatureSpec {
            n_last_blocks: 4,
            avgpool: 1
        }
        .dim(384),
        384
    );
    assert!(FeatureSpec {
        n_last_blocks: 4,
        avgpool: 0
    }
    .validate(3)
    .is_err());
    assert!(FeatureSpec {
        n_last_blocks: 1,
        avgpool: 3
    }
    .validate(3)
    .is_err());
}

/// End to end on real Fashion-MNIST images: a random tiny ViT, the official augmented training
/// path, 8 epochs on 1,000 images; results and checkpoint files written, accuracy well above
/// chance (10%; a random ViT reaches about 31% here), and a longer run resumes where the first
/// stopped.
#[test]
fn linear_probe_learns_on_fashion_mnist_and_resumes() {
    let Some(dir) = common::fashion_mnist_dir() else {
        return;
    };
    let train = ibot::data::dataset::open(&dir, "train").unwrap();
    let val = ibot::data::dataset::open(&dir, "t10k").unwrap();
    let vit = tiny_vit();
    let out = tmp("linear-e2e");
    let mut a = ibot::eval::linear::LinearConfig {
        pretrained_weights: "unused".into(),
        checkpoint_key: ibot::config::CheckpointKey::Teacher,
        arch: None,
        num_heads: None,
        data_path: Some(dir),
        train_path: None,
        val_path: None,
        n_last_blocks: 2,
        avgpool_patchtokens: 0,
        epochs: 8,
        lr: 0.4,
        batch_size_per_gpu: 64,
        seed: 0,
        num_workers: 2,
        val_freq: 1,
        output_dir: out.clone(),
        num_labels: None,
        load_from: None,
        crop_size: Some(32),
        subset: Some(1000),
        precompute_features: false,
        device: ibot::device::DeviceChoice::Cpu,
    };
    let r = ibot::eval::linear::run(&a, &vit, train.as_ref(), val.as_ref(), Device::Cpu).unwrap();
    assert_eq!((r.num_labels, r.feature_dim), (10, 48));
    assert!(
        r.best_acc1 > 24.0,
        "linear probe reached only {}%",
        r.best_acc1
    );
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("results_linear_teacher.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["best_acc1"].as_f64().unwrap(), r.best_acc1);
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    assert_eq!(log.lines().count(), 8);
    // Resume: only epoch 8 runs.
    a.epochs = 9;
    ibot::eval::linear::run(&a, &vit, train.as_ref(), val.as_ref(), Device::Cpu).unwrap();
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    let epochs: Vec<i64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(epochs, (0..9).collect::<Vec<i64>>());
}
