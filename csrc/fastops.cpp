// Fast paths over libtorch that tch does not expose: a float32 Linear on oneDNN with its own
// autograd node, and the fused / multi-tensor optimizer updates (`_fused_adamw_`, `_fused_sgd_`,
// `_foreach_*`). Everything calls libtorch's own operators through its headers, so a changed
// signature is a compile error. Errors come back as a malloc'ed message in *err.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

void set_error(char** err, const char* msg) {
  if (err) *err = strdup(msg);
}

std::vector<at::Tensor> list(at::Tensor** ts, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

}  // namespace

// MKL (linked statically into libtorch_cpu) chooses its kernels by CPU vendor: on a non-Intel
// CPU its sgemm takes an AVX2 path even where AVX-512 is there (on this project's AMD Zen 5 a
// 1576x384 by 384x1536 product: 17.9 ms instead of 8.6 ms, one thread), and the vendor switches
// MKL once had (MKL_DEBUG_CPU_TYPE) are gone. libtorch still calls MKL for the small products
// inside the CPU flash attention and for everything on `F.linear`. MKL asks this function
// whether the CPU is an Intel one; libtorch_cpu exports it and calls it through its PLT, so the
// definition exported by the ibot executable (build.rs: --export-dynamic-symbol) is the one the
// dynamic linker binds, and MKL then picks its kernels by the CPU's features alone (the
// features are still checked: a CPU without AVX-512 gets the AVX2 kernels). Results are MKL's
// own float32 arithmetic either way (summation order may differ in the last bits).
// IBOT_MKL_VENDOR_CHECK=1 keeps MKL's own answer (read once, at MKL's first call).
extern "C" __attribute__((visibility("default"), used)) int mkl_serv_intel_cpu_true() {
  static const int answer = [] {
    const char* keep = std::getenv("IBOT_MKL_VENDOR_CHECK");
    if (keep && std::strcmp(keep, "1") == 0) {
      // MKL's own function, next in the dynamic linker's search order (libtorch_cpu's).
      using Fn = int (*)();
      if (auto own = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "mkl_serv_intel_cpu_true"))) return own();
    }
    return 1;
  }();
  return answer;
}

// 1 when the dynamic linker binds MKL's vendor question to the definition above (exported by
// the executable), 0 when libtorch's own answers it (a binary linked without the export).
extern "C" int ibot_mkl_vendor_override_bound() {
  return dlsym(RTLD_DEFAULT, "mkl_serv_intel_cpu_true") ==
                 reinterpret_cast<void*>(&mkl_serv_intel_cpu_true)
             ? 1
             : 0;
}

namespace {

at::Tensor dense(const at::Tensor& t) { return t.is_mkldnn() ? t.to_dense() : t; }

// y = x · wᵀ + b with oneDNN's float32 inner product. Autograd saves the dense input and the
// weight, as F.linear does (no second copy of the activations in oneDNN's layout); the oneDNN
// views made for each product are temporary.
struct OnednnLinear : public torch::autograd::Function<OnednnLinear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w, const std::optional<at::Tensor>& b) {
    const int64_t k = x.size(-1);
    auto rows = x.reshape({-1, k}).contiguous();
    auto wc = w.contiguous();
    std::optional<at::Tensor> bias;
    if (b.has_value() && b->defined()) bias = b->contiguous();
    auto y = dense(at::mkldnn_linear(rows.to_mkldnn(), wc, bias));
    ctx->save_for_backward({rows, wc});
    ctx->saved_data["bias"] = bias.has_value();
    ctx->saved_data["shape"] = x.sizes().vec();
    auto shape = x.sizes().vec();
    shape.back() = w.size(0);
    return y.view(shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& rows = saved[0];
    const auto& w = saved[1];
    const bool has_bias = ctx->saved_data["bias"].toBool();
    const auto shape = ctx->saved_data["shape"].toIntVector();
    auto g = grads[0].reshape({-1, w.size(0)}).contiguous().to_mkldnn();
    at::Tensor gx, gw, gb;
    if (ctx->needs_input_grad(0)) {
      gx = dense(at::mkldnn_linear_backward_input(rows.sizes(), g, w)).view(shape);
    }
    if (ctx->needs_input_grad(1) || (has_bias && ctx->needs_input_grad(2))) {
      auto r = at::mkldnn_linear_backward_weights(g, rows.to_mkldnn(), w, has_bias);
      if (ctx->needs_input_grad(1)) gw = dense(std::get<0>(r));
      if (has_bias && ctx->needs_input_grad(2)) gb = dense(std::get<1>(r));
    }
    return {gx, gw, gb};
  }
};

}  // namespace

extern "C" {

void ibot_fastops_free_error(char* s) { std::free(s); }

// A new tensor (to be owned by the caller) or nullptr with *err set. `b` may be null.
at::Tensor* ibot_onednn_linear(at::Tensor* x, at::Tensor* w, at::Tensor* b, char** err) {
  try {
    std::optional<at::Tensor> bias;
    if (b) bias = *b;
    return new at::Tensor(OnednnLinear::apply(*x, *w, bias));
  } catch (const std::exception& e) {
    set_error(err, e.what());
    return nullptr;
  }
}

// gelu(x · wᵀ + b) (exact erf GELU) in one oneDNN float32 inner product with the GELU applied
// to its output (libtorch's `mkldnn::_linear_pointwise(x, w, b, "gelu", [], "none")`, the op
// torch.compile / Inductor's CPU backend emits for Linear → GELU); dense input and output, no
// layout copies of the activations. No autograd node: refused while grad mode is on.
at::Tensor* ibot_linear_gelu(at::Tensor* x, at::Tensor* w, at::Tensor* b, char** err) {
  try {
    TORCH_CHECK(!c10::GradMode::is_enabled(), "the fused linear + GELU has no backward: grad mode must be off");
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, c10::string_view,
                                           c10::List<std::optional<at::Scalar>>,
                                           std::optional<c10::string_view>)>();
    const int64_t k = x->size(-1);
    auto rows = x->reshape({-1, k}).contiguous();
    std::optional<at::Tensor> bias;
    if (b) bias = b->contiguous();
    auto y = op.call(rows, w->contiguous(), bias, "gelu", c10::List<std::optional<at::Scalar>>(),
                     c10::string_view("none"));
    auto shape = x->sizes().vec();
    shape.back() = w->size(0);
    return new at::Tensor(y.view(shape));
  } catch (const std::exception& e) {
    set_error(err, e.what());
    return nullptr;
  }
}

// 1 when autograd records operations (grad mode on).
int ibot_grad_mode_enabled() { return c10::GradMode::is_enabled() ? 1 : 0; }

// torch.optim.AdamW(fused=True)'s update of n parameters (decoupled != 0), or
// torch.optim.Adam(fused=True)'s, with L2 weight decay added to the gradient (timm's `--opt
// adam` of the fine-tuning scripts); `steps` are float scalars holding each parameter's step
// count after this step's increment.
int ibot_fused_adam(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs,
                    at::Tensor** exp_avg_sqs, at::Tensor** steps, int n, double lr, double beta1,
                    double beta2, double weight_decay, double eps, int decoupled, char** err) {
  try {
    at::NoGradGuard no_grad;
    auto p = list(params, n), g = list(grads, n), m = list(exp_avgs, n), v = list(exp_avg_sqs, n),
         s = list(steps, n);
    if (decoupled) {
      at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps,
                        /*amsgrad=*/false, /*maximize=*/false);
    } else {
      at::_fused_adam_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                       /*maximize=*/false);
    }
    return 0;
  } catch (const std::exception& e) {
    set_error(err, e.what());
    return 1;
  }
}

// torch.optim.SGD(nesterov=..., fused=True)'s update (dampening 0; Nesterov is timm's `--opt
// sgd`). With first_step, the buffers are filled with the (weight-decayed) gradients, as
// PyTorch's first momentum step.
int ibot_fused_sgd(at::Tensor** params, at::Tensor** grads, at::Tensor** bufs, int n,
                   double weight_decay, double momentum, double lr, int nesterov, int first_step,
                   char** err) {
  try {
    at::NoGradGuard no_grad;
    at::_fused_sgd_(list(params, n), list(grads, n), list(bufs, n), weight_decay, momentum, lr,
                    /*dampening=*/0.0, nesterov != 0, /*maximize=*/false, first_step != 0);
    return 0;
  } catch (const std::exception& e) {
    set_error(err, e.what());
    return 1;
  }
}

// The official EMA `t.mul_(m).add_((1 - m) * s)` over n pairs, as multi-tensor operations
// (the same roundings as the official per-tensor code).
int ibot_foreach_ema(at::Tensor** teacher, at::Tensor** student, int n, double m, char** err) {
  try {
    at::NoGradGuard no_grad;
    auto t = list(teacher, n);
    auto s = list(student, n);
    at::_foreach_mul_(t, m);
    at::_foreach_add_(t, at::_foreach_mul(s, 1.0 - m));
    return 0;
  } catch (const std::exception& e) {
    set_error(err, e.what());
    return 1;
  }
}

}  // extern "C"
