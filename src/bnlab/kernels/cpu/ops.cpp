// The bnlab:: torch operators: schemas, CPU kernels and the autograd node.
//
//   batch_norm_forward  one forward (training or eval), running statistics updated in place
//   batch_norm_backward its backward (input, weight, bias and residual gradients)
//   batch_norm          the two above joined by a C++ autograd node: what users call
//   batch_norm_backward_graph
//                       the backward in differentiable torch ops (implemented in Python,
//                       bnlab/kernels/composite.py), used when the graph of the backward is
//                       needed (create_graph=True: double backward)
//
// Registered with TORCH_LIBRARY, with fake implementations in Python (bnlab/kernels/fake.py),
// the operators are seen as single nodes by torch.compile, torch.export and jit.trace, and
// their outputs are ordinary tensors. The autograd node calls the other operators through
// the dispatcher, so the same node serves every device that has kernels registered (CPU
// here; CUDA from Python, bnlab/kernels/cuda) and is traced by AOTAutograd.
#include <torch/extension.h>

#include "kernels.h"
#include "pool.h"

#include <algorithm>
#include <cmath>
#include <set>


namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Absent tensors cross the autograd node as empty tensors: neither empty optionals (which
// would shift the input indices of needs_input_grad) nor undefined tensors (which the
// node's input bookkeeping rejects). A present argument is never empty (C >= 1).
c10::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

bool present(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// bnlab::batch_norm_forward's typed handle (looked up once by each caller).
auto forward_handle() {
  return op("bnlab::batch_norm_forward")
      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
          const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
          const c10::optional<at::Tensor>&, bool, double, double, int64_t, int64_t, bool)>();
}

struct BatchNormNode : public torch::autograd::Function<BatchNormNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& residual, const at::Tensor& running_mean,
                               const at::Tensor& running_var, bool training, double momentum,
                               double eps, int64_t activation, int64_t nonfinite, bool report) {
    static const auto forward_op = forward_handle();
    at::Tensor out, shift, mean_d, invstd, bad;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, shift, mean_d, invstd, bad) =
          forward_op.call(input, opt(weight), opt(bias), opt(residual), opt(running_mean),
                          opt(running_var), training, momentum, eps, activation, nonfinite, report);
    }
    for (const at::Tensor* running : {&running_mean, &running_var}) {  // as an in-place op would
      if (training && present(*running)) running->unsafeGetTensorImpl()->bump_version();
    }
    const bool relu = activation == bnlab::kRelu;
    ctx->save_for_backward({input, weight, relu ? out : shift.new_empty({0}), shift, mean_d, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = present(bias);
    ctx->saved_data["has_residual"] = present(residual);
    ctx->mark_non_differentiable({bad});
    return {out, bad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &output = saved[2];
    const at::Tensor &shift = saved[3], &mean_d = saved[4], &invstd = saved[5];
    const bool training = ctx->saved_data["training"].toBool();
    const int64_t activation = ctx->saved_data["activation"].toInt();
    const at::Tensor& grad_out = grads[0];
    const std::array<bool, 4> mask = {
        ctx->needs_input_grad(0), present(weight) && ctx->needs_input_grad(1),
        ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2),
        ctx->saved_data["has_residual"].toBool() && ctx->needs_input_grad(3)};
    at::Tensor grad_input, grad_weight, grad_bias, grad_residual;
    if (at::GradMode::is_enabled()) {  // create_graph: a backward that is itself differentiable
      static auto graph_op =
          op("bnlab::batch_norm_backward_graph")
              .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                  const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                  const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, bool, double, int64_t, std::array<bool, 4>)>();
      std::tie(grad_input, grad_weight, grad_bias, grad_residual) = graph_op.call(
          grad_out, input, opt(weight), opt(output), shift, mean_d, invstd, training,
          ctx->saved_data["eps"].toDouble(), activation, mask);
    } else {
      static auto backward_op =
          op("bnlab::batch_norm_backward")
              .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                  const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                  const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, bool, int64_t, std::array<bool, 4>)>();
      // Without a ReLU the residual's gradient is grad_out itself: no copy.
      const bool residual_from_op = mask[3] && activation == bnlab::kRelu;
      std::tie(grad_input, grad_weight, grad_bias, grad_residual) = backward_op.call(
          grad_out, input, opt(weight), opt(output), shift, mean_d, invstd, training, activation,
          {mask[0], mask[1], mask[2], residual_from_op});
      if (mask[3] && !residual_from_op) grad_residual = grad_out;
    }
    auto keep = [](bool wanted, const at::Tensor& t) { return wanted ? t : at::Tensor(); };
    return {keep(mask[0], grad_input), keep(mask[1], grad_weight), keep(mask[2], grad_bias),
            keep(mask[3], grad_residual), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> batch_norm_autograd(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps, int64_t activation, int64_t nonfinite,
    bool report) {
  const at::Tensor none = at::empty({0}, input.options());
  auto result = BatchNormNode::apply(input, weight.value_or(none), bias.value_or(none),
                                     residual.value_or(none), running_mean.value_or(none),
                                     running_var.value_or(none), training, momentum, eps,
                                     activation, nonfinite, report);
  return {result[0], result[1]};
}

// Below autograd (inference mode, tensors without autograd): the forward alone.
std::tuple<at::Tensor, at::Tensor> batch_norm_plain(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps, int64_t activation, int64_t nonfinite,
    bool report) {
  static const auto forward_op = forward_handle();
  auto result = forward_op.call(input, weight, bias, residual, running_mean, running_var,
                                training, momentum, eps, activation, nonfinite, report);
  return {std::get<0>(result), std::get<4>(result)};
}

// An eager call on CPU tensors (bnlab.functional's fast path, one Python-to-C++ crossing):
// the forward alone when autograd has nothing to record in eval, else the autograd node.
// Returns (out, bad), bad None unless a training batch left non-finite channels to report
// (the caller reports them: RuntimeWarning / FloatingPointError).
std::tuple<at::Tensor, c10::optional<at::Tensor>> batch_norm_eager(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps, int64_t activation, int64_t nonfinite) {
  auto wants_grad = [](const c10::optional<at::Tensor>& t) { return t && t->requires_grad(); };
  const bool record = at::GradMode::is_enabled() &&
                      (input.requires_grad() || wants_grad(weight) || wants_grad(bias) ||
                       wants_grad(residual));
  if (!training && !record) {
    return {bnlab::normalize_cpu(input, weight, bias, residual, running_mean, running_var,
                                 training, momentum, eps, activation, nonfinite, false),
            c10::nullopt};
  }
  auto [out, bad] = batch_norm_autograd(input, weight, bias, residual, running_mean,
                                        running_var, training, momentum, eps, activation,
                                        nonfinite, false);
  if (training && nonfinite != bnlab::kPropagate) {
    const bool* flags = bad.data_ptr<bool>();
    if (std::any_of(flags, flags + bad.numel(), [](bool b) { return b; })) return {out, bad};
  }
  return {out, c10::nullopt};
}

// A bnlab BatchNorm module's eager call on CPU tensors: torch's module rules (batch statistics
// in training or without running statistics; running statistics passed where tracked; the
// batch counted in num_batches_tracked, momentum=None meaning 1/count) and the input checks,
// then batch_norm_eager. Returns (None, None) where the call does not fit (the module's
// general Python path then raises, naming what is wrong; also for an eps or momentum set
// out of range after construction), else (out, bad) as
// batch_norm_eager; with nonfinite='raise' a rejected batch is not counted.
//   dims_mask     bit d set for each accepted input rank d
//   num_features  the module's channel count
using MaybeTensor = c10::optional<at::Tensor>;
const std::set<at::ScalarType> kFloatTypes{at::kHalf, at::kBFloat16, at::kFloat, at::kDouble};
std::tuple<MaybeTensor, MaybeTensor> module_eager(
    const at::Tensor& input, const MaybeTensor& weight, const MaybeTensor& bias,
    const MaybeTensor& residual, const MaybeTensor& running_mean, const MaybeTensor& running_var,
    const MaybeTensor& num_batches_tracked, bool training, bool track_running_stats,
    c10::optional<double> momentum, double eps, int64_t activation, int64_t nonfinite,
    int64_t dims_mask, int64_t num_features) {
  const std::tuple<MaybeTensor, MaybeTensor> general{c10::nullopt, c10::nullopt};
  const int64_t dim = input.dim();
  const bool valid_momentum = !momentum.has_value() || (*momentum >= 0.0 && *momentum <= 1.0);
  const bool valid_policy = nonfinite >= bnlab::kPropagate && nonfinite <= bnlab::kRaise;
  if (!(eps > 0.0 && std::isfinite(eps)) || !valid_momentum || !valid_policy || dim >= 63 || !((dims_mask >> dim) & 1) || !input.is_cpu() ||
      !kFloatTypes.count(input.scalar_type()) || input.size(1) != num_features ||
      input.numel() == 0) {
    return general;
  }
  for (const MaybeTensor* t : {&weight, &bias, &running_mean, &running_var}) {
    // (an integer buffer set by hand: the general path names it)
    if (t->has_value() && (!(*t)->is_cpu() || !kFloatTypes.count((*t)->scalar_type()))) return general;
  }
  if (residual.has_value() && (residual->sizes() != input.sizes() ||
                               residual->scalar_type() != input.scalar_type() || !residual->is_cpu())) {
    return general;
  }
  const bool batch_stats = training || !running_mean.has_value();
  if (batch_stats && input.numel() == num_features) return general;  // one value per channel
  const bool track = !training || track_running_stats;
  const bool count = training && track_running_stats && num_batches_tracked.has_value();
  int64_t* counter = nullptr;
  if (count) {
    const at::Tensor& n = *num_batches_tracked;
    if (!n.is_cpu() || n.scalar_type() != at::kLong || n.numel() != 1) return general;
    counter = n.data_ptr<int64_t>();
  }
  const double factor = momentum.has_value() ? *momentum : (counter ? 1.0 / double(*counter + 1) : 0.0);
  auto [out, bad] = batch_norm_eager(input, weight, bias, residual,
                                     track ? running_mean : c10::nullopt,
                                     track ? running_var : c10::nullopt, batch_stats, factor, eps,
                                     activation, nonfinite);
  if (counter && !(bad.has_value() && nonfinite == bnlab::kRaise)) {
    ++*counter;  // num_batches_tracked.add_(1), as torch's module does
    num_batches_tracked->unsafeGetTensorImpl()->bump_version();
  }
  return {out, bad};
}

}  // namespace

TORCH_LIBRARY(bnlab, m) {
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
      "float eps, int activation, int nonfinite, bool report) "
      "-> (Tensor out, Tensor shift, Tensor mean_d, Tensor invstd, Tensor bad)");
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? output, "
      "Tensor shift, Tensor mean_d, Tensor invstd, bool training, int activation, "
      "bool[4] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_residual)");
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
      "float eps, int activation, int nonfinite, bool report) -> (Tensor out, Tensor bad)");
  m.def(
      "batch_norm_backward_graph(Tensor grad_out, Tensor input, Tensor? weight, Tensor? output, "
      "Tensor shift, Tensor mean_d, Tensor invstd, bool training, float eps, int activation, "
      "bool[4] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
}

TORCH_LIBRARY_IMPL(bnlab, CPU, m) {
  m.impl("batch_norm_forward", &bnlab::forward_cpu);
  m.impl("batch_norm_backward", &bnlab::backward_cpu);
}

TORCH_LIBRARY_IMPL(bnlab, Autograd, m) { m.impl("batch_norm", &batch_norm_autograd); }

TORCH_LIBRARY_IMPL(bnlab, CompositeExplicitAutograd, m) { m.impl("batch_norm", &batch_norm_plain); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Eager calls on CPU tensors skip the boxed operator call (a few microseconds of argument
  // boxing): the same autograd node and kernels, entered directly. Compiled, traced and
  // exported code, and other devices, go through torch.ops.bnlab.
  m.def("eager", &batch_norm_eager, "an eager CPU call: (out, bad channels to report or None)");
  m.def("module_eager", &module_eager,
        "a bnlab BatchNorm module's eager CPU call: (out, bad or None), or (None, None) where "
        "the general path must run");
  m.def("pool_stats", [] {
    auto s = bnlab::pool_stats();
    return std::make_tuple(s.idle_bytes, s.idle_blocks, s.max_idle_bytes, s.hits, s.misses);
  }, "(idle_bytes, idle_blocks, max_idle_bytes, hits, misses) of the output pool");
  m.def("pool_release", &bnlab::pool_release, "free every idle block of the output pool");
  m.def("pool_set_max_idle_bytes", &bnlab::pool_set_max_idle_bytes, "cap the pool's idle bytes");
}
