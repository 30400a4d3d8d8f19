//! Bakes libtorch's library directory into the rpath of every binary and test, so that
//! `target/release/ibot` and `cargo test` find libtorch at run time without LD_LIBRARY_PATH.
//! The directory is canonicalised: libtorch's own RPATH (`$ORIGIN/../../nvidia/...`) must
//! resolve against the real wheel location, not the `.libtorch` symlink.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set; run scripts/bootstrap.sh first");
        return;
    };
    let lib: PathBuf = PathBuf::from(libtorch).join("lib");
    let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
