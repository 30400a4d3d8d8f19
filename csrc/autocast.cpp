// A C entry point to libtorch's autocast switches, which tch does not expose for the CPU.
// libtorch's own header declares them, so a changed signature is a compile error.
#include <ATen/autocast_mode.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <torch/headeronly/version.h>

namespace {
c10::DeviceType device_of(int cuda) { return cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU; }
c10::ScalarType dtype_of(int half) { return half ? c10::ScalarType::Half : c10::ScalarType::BFloat16; }
}  // namespace

extern "C" {

// Enters an autocast region on the CPU (cuda = 0) or CUDA (cuda = 1) with bfloat16 (half = 0)
// or float16 (half = 1). Returns the previous state as bit 0: enabled, bit 1: dtype was Half,
// bit 2: dtype was BFloat16, for ibot_autocast_exit.
int ibot_autocast_enter(int cuda, int half) {
  const auto dev = device_of(cuda);
  const int was_enabled = at::autocast::is_autocast_enabled(dev) ? 1 : 0;
  const auto was_dtype = at::autocast::get_autocast_dtype(dev);
  at::autocast::set_autocast_enabled(dev, true);
  at::autocast::set_autocast_dtype(dev, dtype_of(half));
  at::autocast::increment_nesting();
  return was_enabled | (was_dtype == c10::ScalarType::Half ? 2 : 0) | (was_dtype == c10::ScalarType::BFloat16 ? 4 : 0);
}

// Leaves the region entered by ibot_autocast_enter, restoring the state it returned and
// dropping the cast-weight cache when the outermost region ends (as torch.autocast.__exit__).
void ibot_autocast_exit(int cuda, int previous) {
  const auto dev = device_of(cuda);
  if (at::autocast::decrement_nesting() == 0) {
    at::autocast::clear_cache();
  }
  at::autocast::set_autocast_enabled(dev, (previous & 1) != 0);
  if (previous & 2) {
    at::autocast::set_autocast_dtype(dev, c10::ScalarType::Half);
  } else if (previous & 4) {
    at::autocast::set_autocast_dtype(dev, c10::ScalarType::BFloat16);
  }
}

int ibot_autocast_is_enabled(int cuda) { return at::autocast::is_autocast_enabled(device_of(cuda)) ? 1 : 0; }

// The libtorch version the binary was built against (a key of the precision probe's cache).
const char* ibot_torch_version() { return TORCH_VERSION; }

}  // extern "C"
