//! Bakes libtorch's library directory into the rpath of every binary and test, so that
//! `target/release/ibot` and `cargo test` find libtorch at run time without LD_LIBRARY_PATH.
//! The directory is canonicalised: libtorch's own RPATH (`$ORIGIN/../../nvidia/...`) must
//! resolve against the real wheel location, not the `.libtorch` symlink.
//!
//! It also compiles the C++ shims over libtorch:
//! * `csrc/autocast.cpp`: libtorch's autocast switches for the CPU (tch only exposes CUDA's);
//! * `csrc/fastops.cpp`: a float32 Linear on oneDNN with its autograd node, and the fused
//!   optimizer / multi-tensor EMA updates (libtorch operators tch does not expose);
//! * `csrc/dist.cpp`: c10d's TCPStore and process groups for data-parallel training. The wheel
//!   ships c10d's headers and symbols but not the gloo headers that ProcessGroupGloo.hpp
//!   includes; with Debian's libgloo-dev (installed by scripts/bootstrap.sh) Gloo is compiled
//!   in, without it the shim still builds and a distributed run says what to install.
use std::path::{Path, PathBuf};

fn gloo_include() -> Option<PathBuf> {
    std::env::var_os("GLOO_INCLUDE")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from("/usr/include"),
            PathBuf::from("/usr/local/include"),
        ])
        .find(|dir| dir.join("gloo/config.h").is_file())
}

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    println!("cargo:rerun-if-changed=csrc/dist.cpp");
    println!("cargo:rerun-if-changed=csrc/fastops.cpp");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        panic!("LIBTORCH is not set: run `bash scripts/bootstrap.sh` first (it installs libtorch into .venv and points .cargo/config.toml at it)");
    };
    let root = PathBuf::from(libtorch);
    if !root.join("include").is_dir() {
        panic!(
            "libtorch not found at {}: run `bash scripts/bootstrap.sh` first",
            root.display()
        );
    }
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let lib: PathBuf = root.join("lib");
    let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
    // Rebuild when the symlink is pointed at another libtorch.
    println!(
        "cargo:rerun-if-changed={}",
        lib.join("libtorch_cpu.so").display()
    );
    let base = |b: &mut cc::Build, root: &Path| {
        b.cpp(true)
            .include(root.join("include"))
            .flag_if_supported("-std=c++17")
            .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
            .warnings(false);
    };
    let mut b = cc::Build::new();
    base(&mut b, &root);
    b.file("csrc/autocast.cpp").compile("ibot_autocast");

    let mut f = cc::Build::new();
    base(&mut f, &root);
    f.file("csrc/fastops.cpp")
        .include(root.join("include/torch/csrc/api/include"))
        .compile("ibot_fastops");

    let mut d = cc::Build::new();
    base(&mut d, &root);
    d.file("csrc/dist.cpp")
        .include(root.join("include/torch/csrc/api/include"));
    match gloo_include() {
        Some(inc) => {
            println!("cargo:rerun-if-changed={}", inc.join("gloo/config.h").display());
            d.include(inc).define("USE_C10D_GLOO", None);
        }
        None => println!(
            "cargo:warning=gloo headers not found (Debian package libgloo-dev): data-parallel training on CPU is disabled in this build; run scripts/bootstrap.sh as root to install them"
        ),
    }
    // NCCL (CUDA) groups: opt-in with IBOT_NCCL=1, since they need the CUDA/NCCL headers of the
    // wheel's nvidia packages and make every ibot process load libtorch_cuda.
    println!("cargo:rerun-if-env-changed=IBOT_NCCL");
    println!("cargo:rerun-if-changed=csrc/dist_nccl.cpp");
    println!("cargo:rerun-if-changed=csrc/dist_nccl.h");
    let nccl = std::env::var("IBOT_NCCL").is_ok_and(|v| v == "1");
    if nccl {
        d.define("IBOT_WITH_NCCL", None);
    }
    // ibot_dist before ibot_dist_nccl on the link line: the first calls into the second.
    d.compile("ibot_dist");
    if nccl {
        let nvidia = std::fs::canonicalize(&root)
            .unwrap_or_else(|_| root.clone())
            .join("../nvidia");
        let cuda_inc = ["cu13", "cu12", "cuda_runtime"]
            .iter()
            .map(|d| nvidia.join(d).join("include"))
            .find(|d| d.join("cuda_runtime_api.h").is_file() && d.join("crt/host_config.h").is_file())
            .unwrap_or_else(|| {
                panic!(
                    "IBOT_NCCL=1: no complete CUDA headers under {}: run `IBOT_NCCL=1 bash scripts/bootstrap.sh` \
                     (it adds the crt and CCCL headers the wheel lacks)",
                    nvidia.display()
                )
            });
        let nccl_inc = nvidia.join("nccl/include");
        assert!(
            nccl_inc.join("nccl.h").is_file(),
            "IBOT_NCCL=1: no nccl.h under {}",
            nccl_inc.display()
        );
        let mut n = cc::Build::new();
        base(&mut n, &root);
        n.file("csrc/dist_nccl.cpp")
            .include(root.join("include/torch/csrc/api/include"))
            .include(&cuda_inc)
            .include(&nccl_inc)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .compile("ibot_dist_nccl");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-lc10_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    // csrc/fastops.cpp's `mkl_serv_intel_cpu_true` must be in the executable's dynamic symbol
    // table to take precedence over libtorch_cpu's (see the comment there).
    println!("cargo:rustc-link-arg=-Wl,--undefined=mkl_serv_intel_cpu_true");
    println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol=mkl_serv_intel_cpu_true");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
