// A C entry point to libtorch's own c10d: TCPStore, ProcessGroupGloo (CPU tensors) and, when
// built with CUDA headers, ProcessGroupNCCL (CUDA tensors). The real libtorch headers are
// included, so a changed signature is a compile error. Every call catches C++ exceptions and
// hands their text back to Rust; nothing here aborts or waits without a timeout.
//
// gloo's own types stay opaque: only ProcessGroupGloo's API is used (its devices are created
// by ProcessGroupGloo's static helpers), so the older gloo headers from Debian's libgloo-dev
// serve only to let ProcessGroupGloo.hpp compile; every gloo symbol resolves in libtorch_cpu.
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#ifdef USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef IBOT_WITH_NCCL
#include "dist_nccl.h"
#endif

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
  int rank;
  int size;
};

char* copy_message(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

// Runs `f`, turning any C++ exception into an error message for Rust. Returns 0 on success.
template <typename F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    *err = copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = copy_message(e.what());
  } catch (...) {
    *err = copy_message("unknown C++ exception in c10d");
  }
  return 1;
}

void wait(Group* g, const c10::intrusive_ptr<c10d::Work>& work) {
  if (!work->wait(g->timeout)) {
    throw std::runtime_error("collective timed out");
  }
}

}  // namespace

extern "C" {

// 1 when this build can create a ProcessGroupGloo (gloo headers were found at build time).
int ibot_dist_has_gloo() {
#ifdef USE_C10D_GLOO
  return 1;
#else
  return 0;
#endif
}

// 1 when this build can create a ProcessGroupNCCL (CUDA and NCCL headers were found).
int ibot_dist_has_nccl() {
#ifdef IBOT_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// Connects to (rank 0 of a self-hosted store: hosts) the TCPStore at host:port, then creates
// the process group: Gloo (nccl = 0) or NCCL (nccl = 1, device = the CUDA index). `agent_store`
// = 1 means every rank is a client of a store somebody else hosts (torchrun's agent store).
// `prefix` namespaces the keys. Returns the group or null with *err set.
void* ibot_dist_init(const char* host, int port, int rank, int size, int agent_store,
                     const char* prefix, long long timeout_ms, int nccl, int device,
                     char** err) {
  Group* out = nullptr;
  guarded(err, [&] {
    const std::chrono::milliseconds timeout(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = agent_store == 0 && rank == 0;
    opts.numWorkers = static_cast<std::size_t>(size);
    opts.waitWorkers = false;
    opts.timeout = timeout;
    opts.multiTenant = true;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    c10::intrusive_ptr<c10d::Backend> backend;
    if (nccl != 0) {
#ifdef IBOT_WITH_NCCL
      backend = ibot_make_nccl(store, rank, size, timeout, device);
#else
      (void)device;
      throw std::runtime_error(
          "this build of ibot has no NCCL support for CUDA tensors: rebuild with "
          "`IBOT_NCCL=1 bash scripts/bootstrap.sh && IBOT_NCCL=1 cargo build --release` "
          "(README: Data-parallel training), or train on --device cpu");
#endif
    } else {
#ifdef USE_C10D_GLOO
      auto o = c10d::ProcessGroupGloo::Options::create(timeout);
      // Bind where the store is reached from: loopback for a local run, else this host.
      const std::string h(host);
      if (h == "127.0.0.1" || h == "localhost" || h.rfind("127.", 0) == 0) {
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(h));
      } else {
        o->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      o->threads = 2;
      backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, o);
#else
      throw std::runtime_error(
          "this build of ibot has no Gloo support (the gloo headers were not found when it was "
          "compiled: install Debian's libgloo-dev, e.g. by running scripts/bootstrap.sh as root, "
          "and rebuild)");
#endif
    }
    out = new Group{store, backend, timeout, rank, size};
  });
  return out;
}

void ibot_dist_free(void* g) { delete static_cast<Group*>(g); }

void ibot_dist_free_error(char* s) { std::free(s); }

// In-place all-reduce of one tensor: op 0 = sum, 1 = max, 2 = min.
int ibot_dist_all_reduce(void* gp, at::Tensor* t, int op, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(gp);
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp::MAX : op == 2 ? c10d::ReduceOp::MIN : c10d::ReduceOp::SUM;
    o.timeout = g->timeout;
    wait(g, g->backend->allreduce(ts, o));
  });
}

// In-place broadcast from `root`.
int ibot_dist_broadcast(void* gp, at::Tensor* t, int root, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(gp);
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = g->timeout;
    wait(g, g->backend->broadcast(ts, o));
  });
}

// Gathers every rank's `input` (same shape everywhere) into `output`, whose first dimension is
// world size times the input's: rank r's rows land at [r * n, (r + 1) * n).
int ibot_dist_all_gather(void* gp, at::Tensor* output, at::Tensor* input, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(gp);
    std::vector<std::vector<at::Tensor>> outs(1);
    outs[0] = output->chunk(g->size, 0);
    TORCH_CHECK(static_cast<int>(outs[0].size()) == g->size, "all_gather output not divisible by the world size");
    std::vector<at::Tensor> ins{*input};
    c10d::AllgatherOptions o;
    o.timeout = g->timeout;
    wait(g, g->backend->allgather(outs, ins, o));
  });
}

int ibot_dist_barrier(void* gp, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(gp);
    c10d::BarrierOptions o;
    o.timeout = g->timeout;
    wait(g, g->backend->barrier(o));
  });
}

}  // extern "C"
