//! Bakes libtorch's library directory into the rpath of every binary and test, so that
//! `target/release/ibot` and `cargo test` find libtorch at run time without LD_LIBRARY_PATH.
//! The directory is canonicalised: libtorch's own RPATH (`$ORIGIN/../../nvidia/...`) must
//! resolve against the real wheel location, not the `.libtorch` symlink.
//!
//! It also compiles `csrc/autocast.cpp`, a few lines of C++ that switch libtorch's autocast on
//! and off for the CPU (tch only exposes the CUDA switch).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set; run scripts/bootstrap.sh first");
        return;
    };
    let root = PathBuf::from(libtorch);
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file("csrc/autocast.cpp")
        .include(root.join("include"))
        .flag_if_supported("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .warnings(false)
        .compile("ibot_autocast");
    let lib: PathBuf = root.join("lib");
    let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
