//! Fuzzes the `.pth` reader and the checkpoint-layout logic on arbitrary files: any input must
//! give Ok or an error, never a panic, a hang or an unbounded allocation.
//!
//! Run (nightly, from the project root, after `bash scripts/bootstrap.sh`):
//!   LD_LIBRARY_PATH=$(readlink -f .libtorch/lib) cargo +nightly fuzz run pth -s none fuzz/corpus/pth
//! Seed the corpus first: `.venv/bin/python tools/make_pth_fuzz_seeds.py`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("ibot-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("input.pth");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let _ = ibot::interop::read_pth(&path);
    let _ = ibot::interop::load_pretrained(&path, "teacher", None);
});
