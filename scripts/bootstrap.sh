#!/usr/bin/env bash
# Sets up everything `cargo build` / `cargo test` / `target/release/ibot` need, once.
#
# libtorch comes from the PyPI wheel torch==2.13.0 (the version tch 0.26 is built against),
# installed into a project-local venv (.venv, ignored by git). Python is only the installer:
# the ibot binary never runs Python. `.libtorch` is a symlink to the wheel's torch/ folder;
# .cargo/config.toml points LIBTORCH at it and build.rs bakes its lib dir into the rpath, so
# a plain `cargo build` works in a fresh shell without exporting anything.
#
# Idempotent and quiet when already done. Usage: bash scripts/bootstrap.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
say() { printf 'bootstrap: %s\n' "$*" >&2; }

FMNIST=/usr/share/datasets/fashion-mnist

# Fashion-MNIST (the demo's data set) from Debian's package, where this user can install it.
install_fmnist() {
  [ -f "$FMNIST/train-images-idx3-ubyte.gz" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    if (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }); then
      return 0
    fi
  fi
  say "Fashion-MNIST is not installed: 'sudo apt-get install dataset-fashion-mnist' (or point --data_path at any image folder)"
}

# A font for the labels of loss.png (without one the curves are drawn unlabelled).
install_font() {
  [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq fonts-dejavu-core >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq fonts-dejavu-core >/dev/null 2>&1; } ||
      say "could not install fonts-dejavu-core; loss.png will have no labels"
  fi
  return 0
}

# The gloo headers that libtorch's ProcessGroupGloo.hpp includes (the wheel ships c10d's
# headers and gloo's symbols, not gloo's headers): data-parallel training on CPU needs them at
# build time. Only headers are used; every gloo symbol resolves inside libtorch.
install_gloo_headers() {
  [ -f /usr/include/gloo/config.h ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing the gloo headers (Debian package libgloo-dev) for data-parallel training"
    apt-get install -y -qq libgloo-dev >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libgloo-dev >/dev/null 2>&1; } ||
      say "could not install libgloo-dev; data-parallel training on CPU will be disabled in this build"
  else
    say "for data-parallel training on CPU: 'sudo apt-get install libgloo-dev', then rebuild"
  fi
  return 0
}

# IBOT_NCCL=1 (opt-in NCCL process groups for CUDA): the wheel's CUDA headers lack the crt/ and
# CCCL headers that ATen's CUDA headers include; NVIDIA publishes them as PyPI packages.
install_cuda_headers() {
  [ "${IBOT_NCCL:-0}" = 1 ] || return 0
  [ -f .libtorch/../nvidia/cu13/include/crt/host_config.h ] && [ -e .libtorch/../nvidia/cu13/include/nv/target ] && return 0
  say "IBOT_NCCL=1: installing the CUDA crt and CCCL headers into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*"
}

# scikit-learn (with scipy): the test oracle of eval-logreg (tests/protocols.rs compares the
# optimum with its LogisticRegression). Tests only; the ibot binary never uses it.
SKLEARN_VERSION=1.9.1
install_sklearn() {
  .venv/bin/python -c "import sklearn, sys; sys.exit(sklearn.__version__ != '$SKLEARN_VERSION')" >/dev/null 2>&1 && return 0
  say "installing scikit-learn==$SKLEARN_VERSION into .venv (a test reference)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "scikit-learn==$SKLEARN_VERSION"
}

# Pillow, timm and torchvision (test oracles only: tests/cls_data.rs compares the fine-tuning
# transforms and Mixup with them, tests/analysis_tools.rs and tests/protocols.rs use Pillow).
# --no-deps so that torch is never replaced; torchvision 0.28.0 is the build for torch 2.13.0,
# and timm imports without its optional hub dependencies.
PILLOW_VERSION=13.0.0
TIMM_VERSION=1.0.31
TORCHVISION_VERSION=0.28.0
install_test_oracles() {
  local marker=".venv/.oracles-pil-$PILLOW_VERSION-timm-$TIMM_VERSION-tv-$TORCHVISION_VERSION"
  [ -f "$marker" ] && return 0
  say "installing pillow==$PILLOW_VERSION, timm==$TIMM_VERSION and torchvision==$TORCHVISION_VERSION into .venv (test references)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    "pillow==$PILLOW_VERSION" "timm==$TIMM_VERSION" "torchvision==$TORCHVISION_VERSION" &&
    .venv/bin/python -c "import PIL, timm, torchvision" &&
    touch "$marker"
}

if [ -L .libtorch ] && [ -f .libtorch/lib/libtorch_cpu.so ] && [ -f .venv/.torch-$TORCH_VERSION ]; then
  install_cuda_headers
  install_test_oracles
  install_gloo_headers
  install_fmnist
  install_font
  install_sklearn
  exit 0
fi

PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
  say "no python3 found. Install Python 3.9+ with venv and pip, e.g. 'apt-get install python3 python3-venv python3-pip', then re-run."
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  say "creating the project venv (.venv)"
  if ! "$PY" -m venv .venv >/dev/null 2>&1; then
    say "'$PY -m venv' failed. Install the venv module, e.g. 'apt-get install python3-venv', then re-run."
    exit 1
  fi
fi
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  say "the venv has no pip. Install it, e.g. 'apt-get install python3-pip python3-venv', then re-run."
  exit 1
fi
say "installing torch==$TORCH_VERSION into .venv (libtorch for tch; a few GB, once)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy
TORCH_DIR=$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ln -sfn "$TORCH_DIR" .libtorch
touch ".venv/.torch-$TORCH_VERSION"
say "libtorch ready at .libtorch -> $TORCH_DIR"
install_cuda_headers
install_test_oracles
install_gloo_headers
install_fmnist
install_font
install_sklearn
