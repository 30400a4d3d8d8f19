// ProcessGroupNCCL for CUDA tensors (compiled only with IBOT_NCCL=1: it needs the CUDA and NCCL
// headers of the wheel's nvidia packages and links libtorch_cuda). Untested here: no GPU.
#include "dist_nccl.h"

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

c10::intrusive_ptr<c10d::Backend> ibot_make_nccl(const c10::intrusive_ptr<c10d::Store>& store,
                                                 int rank, int size,
                                                 std::chrono::milliseconds timeout, int device) {
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
  auto o = c10d::ProcessGroupNCCL::Options::create();
  o->timeout = timeout;
  auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, o);
  pg->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
  return pg;
}
