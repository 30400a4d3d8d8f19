//! Data sets, masks and the loader: invariants, determinism, sharding and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ibot::data::augment::AugmentConfig;
use ibot::data::dataset::{self, Dataset, IdxDataset};
use ibot::data::loader::{Loader, LoaderConfig};
use ibot::data::masking::{MaskConfig, PredShape};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ibot-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_idx(dir: &Path, n: usize, side: usize, gz: bool) {
    let mut img = vec![0, 0, 8, 3];
    for v in [n, side, side] {
        img.extend_from_slice(&(v as u32).to_be_bytes());
    }
    img.extend((0..n * side * side).map(|i| (i * 7 % 256) as u8));
    let mut lab = vec![0, 0, 8, 1];
    lab.extend_from_slice(&(n as u32).to_be_bytes());
    lab.extend((0..n).map(|i| (i % 10) as u8));
    let enc = |b: &[u8]| -> Vec<u8> {
        if !gz {
            return b.to_vec();
        }
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    };
    let ext = if gz { ".gz" } else { "" };
    std::fs::write(dir.join(format!("train-images-idx3-ubyte{ext}")), enc(&img)).unwrap();
    std::fs::write(dir.join(format!("train-labels-idx1-ubyte{ext}")), enc(&lab)).unwrap();
}

fn small_cfg(workers: usize) -> LoaderConfig {
    LoaderConfig {
        augment: AugmentConfig {
            local_crops_number: 2,
            global_crops_size: 16,
            local_crops_size: 8,
            ..AugmentConfig::default()
        },
        mask: MaskConfig {
            patch_size: 4,
            pred_ratio: vec![0.3],
            pred_ratio_var: vec![0.2],
            ..MaskConfig::default()
        },
        batch_size: 4,
        num_workers: workers,
        prefetch: 2,
        seed: 7,
        rank: 0,
        world_size: 1,
        drop_last: true,
        skip_corrupt: false,
    }
}

#[test]
fn block_masks_respect_the_official_invariants() {
    let cfg = MaskConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (h, w) = (14, 14);
    let mut total = 0usize;
    let n = 2000;
    for _ in 0..n {
        let ratio = 0.3;
        let m = cfg.mask(h, w, ratio, &mut rng);
        let count = m.iter().filter(|&&v| v).count();
        assert!(
            count as f64 <= ratio * (h * w) as f64,
            "{count} masked cells exceed the target"
        );
        total += count;
    }
    // The target is 58.8 cells; the official algorithm stops a little short of it on average
    // (the last block must fit the remainder exactly); it never stops far below.
    let mean = total as f64 / n as f64;
    assert!((50.0..=58.8).contains(&mean), "mean masked count {mean}");
    // Blocks are rectangles: with a target of 17 cells (ratio 0.09) and blocks of at least 16
    // cells, most masks are one block: their cells fill their bounding box exactly.
    // Random masks of the same size almost never do, so this tells the two shapes apart.
    let filled_boxes = |cfg: &MaskConfig, rng: &mut ChaCha8Rng| {
        (0..200)
            .filter(|_| {
                let m = cfg.mask(h, w, 0.09, rng);
                let cells: Vec<(usize, usize)> = (0..h * w)
                    .filter(|&i| m[i])
                    .map(|i| (i / w, i % w))
                    .collect();
                if cells.is_empty() {
                    return false;
                }
                let (r0, r1) = (
                    cells.iter().map(|c| c.0).min().unwrap(),
                    cells.iter().map(|c| c.0).max().unwrap(),
                );
                let (c0, c1) = (
                    cells.iter().map(|c| c.1).min().unwrap(),
                    cells.iter().map(|c| c.1).max().unwrap(),
                );
                let (bh, bw) = (r1 - r0 + 1, c1 - c0 + 1);
                bh >= 2 && bw >= 2 && bh * bw == cells.len()
            })
            .count()
    };
    let blocks = filled_boxes(&cfg, &mut rng);
    let random = filled_boxes(
        &MaskConfig {
            pred_shape: PredShape::Rand,
            ..MaskConfig::default()
        },
        &mut rng,
    );
    // About 68% are (a simulation of the official algorithm gives 0.68); the rest got a few
    // extra cells from a second, small block.
    assert!(
        blocks >= 100,
        "only {blocks} of 200 block masks are one filled rectangle"
    );
    assert!(
        random <= 10,
        "{random} of 200 random masks look like rectangles"
    );
}

#[test]
fn rand_masks_have_exactly_int_ratio_cells_and_start_epoch_gives_empty_masks() {
    let cfg = MaskConfig {
        pred_shape: PredShape::Rand,
        pred_start_epoch: 3,
        ..MaskConfig::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for ratio in [0.0, 0.1, 0.3, 0.5] {
        let m = cfg.mask(14, 14, ratio, &mut rng);
        assert_eq!(m.iter().filter(|&&v| v).count(), (ratio * 196.0) as usize);
    }
    assert_eq!(cfg.draw_ratio(2, &mut rng), 0.0);
    assert_eq!(cfg.draw_ratio(3, &mut rng), 0.3);
    let var = MaskConfig {
        pred_ratio: vec![0.1, 0.4],
        pred_ratio_var: vec![0.05],
        ..MaskConfig::default()
    };
    for _ in 0..200 {
        let r = var.draw_ratio(0, &mut rng);
        assert!(
            (0.05..=0.15).contains(&r) || (0.35..=0.45).contains(&r),
            "{r}"
        );
    }
    assert!(MaskConfig {
        pred_ratio: vec![0.1],
        pred_ratio_var: vec![0.2],
        ..MaskConfig::default()
    }
    .validate()
    .is_err());
}

#[test]
fn idx_files_load_plain_and_gzipped_and_truncation_is_an_error() {
    for gz in [false, true] {
        let d = tempdir(&format!("idx-{gz}"));
        write_idx(&d, 10, 6, gz);
        let ds = dataset::open(&d, "train").unwrap();
        assert_eq!(ds.len(), 10);
        let (img, label) = ds.get(3).unwrap();
        assert_eq!((img.width, img.height, label), (6, 6, 3));
        assert_eq!(img.data[0], img.data[1]); // gray replicated to RGB
    }
    let d = tempdir("idx-cut");
    write_idx(&d, 10, 6, false);
    let p = d.join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..100]).unwrap();
    let e = format!("{:#}", IdxDataset::open(&p).err().unwrap());
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn loader_is_deterministic_whatever_the_number_of_workers() {
    let d = tempdir("det");
    write_idx(&d, 24, 20, false);
    let ds: Arc<dyn Dataset> = Arc::from(dataset::open(&d, "train").unwrap());
    let run = |workers: usize, epoch: usize| {
        let l = Loader::new(ds.clone(), small_cfg(workers)).unwrap();
        l.epoch(epoch).map(|b| b.unwrap()).collect::<Vec<_>>()
    };
    let a = run(0, 1);
    let b = run(2, 1);
    let c = run(3, 1);
    assert_eq!(a.len(), 6);
    for ((x, y), z) in a.iter().zip(&b).zip(&c) {
        assert_eq!(x.indices, y.indices);
        assert_eq!(x.views.len(), 4);
        assert_eq!(x.views[0].size(), [4, 3, 16, 16]);
        assert_eq!(x.views[2].size(), [4, 3, 8, 8]);
        assert_eq!(x.masks[0].size(), [4, 4, 4]);
        assert_eq!(x.masks[3].size(), [4, 2, 2]);
        for v in 0..4 {
            assert!(x.views[v].equal(&y.views[v]) && x.views[v].equal(&z.views[v]));
            assert!(x.masks[v].equal(&y.masks[v]) && x.masks[v].equal(&z.masks[v]));
        }
    }
    let other = run(2, 2);
    assert_ne!(a[0].indices, other[0].indices, "epochs must reshuffle");
}

#[test]
fn sharding_covers_the_data_set_like_distributed_sampler() {
    let d = tempdir("shard");
    write_idx(&d, 10, 8, false);
    let ds: Arc<dyn Dataset> = Arc::from(dataset::open(&d, "train").unwrap());
    let mut all = Vec::new();
    for rank in 0..3 {
        let cfg = LoaderConfig {
            rank,
            world_size: 3,
            ..small_cfg(0)
        };
        let l = Loader::new(ds.clone(), cfg).unwrap();
        let idx = l.epoch_indices(0);
        assert_eq!(idx.len(), 4); // ceil(10 / 3)
        all.extend(idx);
    }
    all.sort();
    all.dedup();
    assert_eq!(all, (0..10).collect::<Vec<_>>());
}

#[test]
fn corrupt_images_fail_clearly_or_are_skipped_and_counted() {
    let d = tempdir("corrupt");
    let cls = d.join("a");
    std::fs::create_dir_all(&cls).unwrap();
    for i in 0..3 {
        let img = image::RgbImage::from_fn(20, 24, |x, y| {
            image::Rgb([x as u8 * 10, y as u8 * 10, i * 50])
        });
        img.save(cls.join(format!("ok{i}.png"))).unwrap();
    }
    std::fs::write(
        cls.join("bad.jpg"),
        b"\xff\xd8\xff\xe0 definitely not a jpeg",
    )
    .unwrap();
    let ds: Arc<dyn Dataset> = Arc::from(dataset::open(&d, "train").unwrap());
    assert_eq!(ds.len(), 4);
    let cfg = LoaderConfig {
        batch_size: 4,
        ..small_cfg(1)
    };
    let l = Loader::new(ds.clone(), cfg.clone()).unwrap();
    let e = format!("{:#}", l.epoch(0).next().unwrap().unwrap_err());
    assert!(e.contains("bad.jpg") && e.contains("--skip_corrupt"), "{e}");
    let l = Loader::new(
        ds,
        LoaderConfig {
            skip_corrupt: true,
            ..cfg
        },
    )
    .unwrap();
    let b = l.epoch(0).next().unwrap().unwrap();
    assert_eq!((b.skipped, b.indices.len()), (1, 3));
    assert_eq!(b.views[0].size()[0], 3);
}

/// The real Fashion-MNIST (Debian package dataset-fashion-mnist): its first training image is
/// the one the augmentation fixtures were made from. Required in CI (IBOT_REQUIRE_FMNIST=1).
#[test]
fn fashion_mnist_reads_as_the_reference_image() {
    let Some(dir) = common::fashion_mnist_dir() else {
        return;
    };
    let Some(fixtures) = common::augment_fixture_dir() else {
        return;
    };
    let ds = dataset::open(&dir, "train").unwrap();
    assert_eq!(ds.len(), 60000);
    let fx = ibot::params::read_safetensors(&fixtures.join("augment.safetensors")).unwrap();
    let want: Vec<u8> = Vec::try_from(fx["input/fmnist"].flatten(0, -1)).unwrap();
    assert_eq!(ds.get(0).unwrap().0.data, want);
    assert_eq!(dataset::open(&dir, "t10k").unwrap().len(), 10000);
}

/// An IDX images file with the given header numbers and `payload` bytes of pixels.
fn write_idx_header(path: &Path, dims: [u32; 3], payload: usize) {
    let mut b = vec![0, 0, 8, 3];
    for v in dims {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend(std::iter::repeat(7u8).take(payload));
    std::fs::write(path, b).unwrap();
}

#[test]
fn idx_headers_with_a_zero_dimension_or_overflowing_sizes_are_errors() {
    let d = tempdir("idx-bad-header");
    let p = d.join("train-images-idx3-ubyte");
    for dims in [[0, 6, 6], [10, 0, 6], [10, 6, 0], [0, 0, 0]] {
        write_idx_header(&p, dims, 360);
        let e = format!("{:#}", IdxDataset::open(&p).err().unwrap());
        assert!(
            e.contains("every dimension must be at least 1"),
            "{dims:?}: {e}"
        );
    }
    // n·h·w overflows 64 bits (and 32 bits): an error, not a wrap-around or a panic.
    for dims in [
        [u32::MAX, u32::MAX, u32::MAX],
        [65536, 65536, 65536],
        [1 << 31, 4, 1],
    ] {
        write_idx_header(&p, dims, 64);
        let e = format!("{:#}", IdxDataset::open(&p).err().unwrap());
        assert!(e.contains("truncated or damaged"), "{dims:?}: {e}");
    }
    write_idx_header(&p, [10, 6, 6], 360);
    assert_eq!(IdxDataset::open(&p).unwrap().len(), 10);
}

#[test]
fn non_finite_enhance_factors_are_safe() {
    use ibot::data::ops::{self, Rgb8};
    let data: Vec<u8> = (0..=255u8).flat_map(|v| [v, v / 2, 255 - v]).collect();
    let img = Rgb8::new(16, 16, data);
    // NaN leaves the image as it is (Pillow's C arithmetic has no defined result for it).
    for f in [f64::NAN, -f64::NAN] {
        assert_eq!(ops::adjust_brightness(&img, f).data, img.data);
        assert_eq!(ops::adjust_contrast(&img, f).data, img.data);
        assert_eq!(ops::adjust_saturation(&img, f).data, img.data);
        let _ = ops::adjust_hue(&img, f);
        let _ = ops::gaussian_blur(&img, f);
    }
    // Infinities act as their limit: every byte pushed to 0 or 255 away from the degenerate.
    let up = ops::adjust_brightness(&img, f64::INFINITY);
    for (&o, &x) in up.data.iter().zip(&img.data) {
        assert_eq!(o, if x == 0 { 0 } else { 255 });
    }
    assert!(ops::adjust_brightness(&img, f64::NEG_INFINITY)
        .data
        .iter()
        .all(|&o| o == 0));
    assert_eq!(ops::adjust_brightness(&img, 1e300).data, up.data);
    let sat = ops::adjust_saturation(&img, f64::INFINITY);
    assert_eq!(sat.data.len(), img.data.len());
    let _ = ops::adjust_contrast(&img, f64::NEG_INFINITY);
    // A large finite factor gives the same as the float32 limit it is clamped to.
    assert_eq!(
        ops::adjust_contrast(&img, 1e300).data,
        ops::adjust_contrast(&img, f32::MAX as f64).data
    );
}

/// The benchmark photos (real JPEGs), or None (the test skips) where ../shared is missing.
fn photos() -> Option<Vec<PathBuf>> {
    let root = common::bench_photos_dir()?;
    let mut v = Vec::new();
    for d in std::fs::read_dir(&root).unwrap().flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            v.push(f.path());
        }
    }
    v.sort();
    Some(v)
}

#[test]
fn a_truncated_jpeg_is_unreadable_like_pillow_says() {
    let Some(all) = photos() else {
        return;
    };
    assert!(all.len() > 100);
    // Every complete photo passes the end-of-image check.
    for p in &all {
        let b = std::fs::read(p).unwrap();
        assert!(dataset::jpeg_is_complete(&b), "{}", p.display());
    }
    let d = tempdir("jpeg-cut");
    let full = std::fs::read(&all[0]).unwrap();
    for (name, bytes) in [
        ("half.jpg", &full[..full.len() / 2]),
        ("most.jpg", &full[..full.len() - 100]),
        ("no-eoi.jpg", &full[..full.len() - 2]),
        ("header-only.jpg", &full[..600]),
    ] {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = format!("{:#}", dataset::load_rgb(&p).err().unwrap());
        assert!(e.contains("truncated") && e.contains(name), "{e}");
    }
    let p = d.join("full.jpg");
    std::fs::write(&p, &full).unwrap();
    dataset::load_rgb(&p).unwrap();
    // Trailing bytes after the end-of-image marker (some cameras add them) are fine.
    std::fs::write(&p, [&full[..], &[0u8; 64][..], b"trailer"].concat()).unwrap();
    dataset::load_rgb(&p).unwrap();
    // In training, the truncated file stops the run (or is skipped with --skip_corrupt).
    std::fs::create_dir_all(d.join("c")).unwrap();
    std::fs::rename(d.join("half.jpg"), d.join("c/half.jpg")).unwrap();
    let ds = dataset::open(&d, "train").unwrap();
    let i = (0..ds.len()).find(|&i| format!("{:?}", ds.get(i).err()).contains("half.jpg"));
    assert!(i.is_some());
}

#[test]
fn symlink_cycles_under_the_data_path_are_read_once() {
    let d = tempdir("cycle");
    for c in ["a", "b"] {
        std::fs::create_dir_all(d.join(c)).unwrap();
        for i in 0..4 {
            image::RgbImage::from_pixel(4, 4, image::Rgb([i * 40, 0, 0]))
                .save(d.join(c).join(format!("{i}.png")))
                .unwrap();
        }
    }
    // A link to the root inside a class, a link to its own class and a second name of class b.
    std::os::unix::fs::symlink(&d, d.join("a/root")).unwrap();
    std::os::unix::fs::symlink("..", d.join("b/up")).unwrap();
    std::os::unix::fs::symlink(d.join("a"), d.join("a/self")).unwrap();
    std::os::unix::fs::symlink(d.join("b"), d.join("c")).unwrap();
    let ds = dataset::open(&d, "train").unwrap();
    assert_eq!(ds.len(), 8, "{}", ds.describe());
    assert_eq!(ds.classes(), ["a", "b"]);
    // A link to a real folder elsewhere is followed.
    let other = tempdir("cycle-other");
    image::RgbImage::new(4, 4)
        .save(other.join("x.png"))
        .unwrap();
    std::os::unix::fs::symlink(&other, d.join("a/ext")).unwrap();
    assert_eq!(dataset::open(&d, "train").unwrap().len(), 9);
}
