// ProcessGroupNCCL behind a plain declaration, so that dist.cpp needs no CUDA headers.
#pragma once
#include <chrono>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

c10::intrusive_ptr<c10d::Backend> ibot_make_nccl(const c10::intrusive_ptr<c10d::Store>& store,
                                                 int rank, int size,
                                                 std::chrono::milliseconds timeout, int device);
