//! Fuzzes the IDX (MNIST) data set on arbitrary files: any input must give Ok or an error, never
//! a panic, a hang or an unbounded allocation; every image of a file that opens must be readable.
//!
//! Input: `[flags][labels length: u16 LE][labels file][images file]` (the length is cut to what
//! is there). Flags: bit 0 gzips the images file and names it `.gz`, bit 1 the same for the
//! labels file, bit 2 leaves the labels file out, bit 3 cuts the last 4 bytes off the gzip
//! streams (a damaged gzip file), bit 4 opens the folder (`dataset::open(dir, "train")`) instead
//! of the images file. Then `get` and `label` of every image, `classes` and `describe`.
//!
//! Run (nightly, from the project root, after `bash scripts/bootstrap.sh`), one process:
//!   LD_LIBRARY_PATH=$(readlink -f .libtorch/lib) cargo +nightly fuzz run idx -s none \
//!     fuzz/corpus/idx -- -max_total_time=600
//! Seed the corpus first: `python3 tools/make_data_fuzz_seeds.py`.
#![no_main]

use std::io::Write;

use ibot::data::dataset::{self, Dataset, IdxDataset};
use libfuzzer_sys::fuzz_target;

const IMAGES: &str = "train-images-idx3-ubyte";
const LABELS: &str = "train-labels-idx1-ubyte";

fn gzip(b: &[u8], cut: bool) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    let mut out = e.finish().unwrap();
    if cut {
        out.truncate(out.len() - 4);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let flags = data[0];
    let rest = &data[3..];
    let nl = (u16::from_le_bytes([data[1], data[2]]) as usize).min(rest.len());
    let (labels, images) = rest.split_at(nl);
    let (gz_images, gz_labels) = (flags & 1 != 0, flags & 2 != 0);
    let (no_labels, cut, by_dir) = (flags & 4 != 0, flags & 8 != 0, flags & 16 != 0);

    let dir = std::env::temp_dir().join(format!("ibot-fuzz-idx-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    for name in [IMAGES, LABELS] {
        let _ = std::fs::remove_file(dir.join(name));
        let _ = std::fs::remove_file(dir.join(format!("{name}.gz")));
    }
    let write = |name: &str, b: &[u8], gz: bool| {
        let (name, b) = if gz {
            (format!("{name}.gz"), gzip(b, cut))
        } else {
            (name.to_string(), b.to_vec())
        };
        std::fs::write(dir.join(&name), b).map(|_| dir.join(name))
    };
    let Ok(images_path) = write(IMAGES, images, gz_images) else {
        return;
    };
    if !no_labels && write(LABELS, labels, gz_labels).is_err() {
        return;
    }
    let ds: Box<dyn Dataset> = if by_dir {
        match dataset::open(&dir, "train") {
            Ok(d) => d,
            Err(_) => return,
        }
    } else {
        match IdxDataset::open(&images_path) {
            Ok(d) => Box::new(d),
            Err(_) => return,
        }
    };
    assert!(!ds.is_empty());
    let nclass = ds.classes().len() as i64;
    for i in 0..ds.len() {
        let (img, label) = ds.get(i).expect("an image of an IDX file that opened");
        assert_eq!(img.data.len(), img.width * img.height * 3);
        assert_eq!(label, ds.label(i));
        assert!(
            label == -1 || (0..nclass).contains(&label),
            "label {label} of {nclass} classes"
        );
    }
    let _ = ds.describe();
});
