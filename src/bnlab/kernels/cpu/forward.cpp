// Forward kernels: training (statistics, running averages, normalization) and evaluation.
#include "kernels.h"
#include "passes.h"
#include "pool.h"

#include <cmath>
#include <memory>
#include <sstream>

namespace bnlab {

bool kernel_layout(const at::Tensor& x) {
  if (x.is_contiguous()) return true;
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

at::Tensor to_kernel_layout(const at::Tensor& x) { return kernel_layout(x) ? x : x.contiguous(); }

at::Tensor same_layout(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  if (like.is_contiguous()) return t.contiguous();
  return t.contiguous(like.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
}

namespace {
bool dense_in_a_format(const at::Tensor& t) {  // Normalization.cpp's is_contiguous
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast) ||
         t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}
}  // namespace

std::vector<int64_t> result_strides(const at::Tensor& input, const at::Tensor& grad_out) {
  const auto suggested = input.suggest_memory_format();
  const bool dense = dense_in_a_format(input) &&
                     (!grad_out.defined() || (dense_in_a_format(grad_out) &&
                                              grad_out.suggest_memory_format() == suggested));
  auto format = suggested;
  if (dense) {
    format = input.is_contiguous() ? at::MemoryFormat::Contiguous
             : input.is_contiguous(at::MemoryFormat::ChannelsLast3d) ? at::MemoryFormat::ChannelsLast3d
                                                                    : at::MemoryFormat::ChannelsLast;
  }
  if (format == at::MemoryFormat::ChannelsLast) return c10::get_channels_last_strides_2d(input.sizes());
  if (format == at::MemoryFormat::ChannelsLast3d) return c10::get_channels_last_strides_3d(input.sizes());
  std::vector<int64_t> strides(input.dim());
  int64_t step = 1;
  for (int64_t d = input.dim() - 1; d >= 0; --d) {
    strides[d] = step;
    step *= std::max<int64_t>(input.size(d), 1);
  }
  return strides;
}

at::Tensor with_strides(const at::Tensor& t, c10::IntArrayRef strides) {
  return t.strides() == strides ? t : at::empty_strided(t.sizes(), strides, t.options()).copy_(t);
}

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<double> to_double(const c10::optional<at::Tensor>& t, int64_t C, double fill) {
  std::vector<double> out(C, fill);
  if (t.has_value() && t->defined()) {
    const at::Tensor v = t->is_cpu() ? *t : t->cpu();
    const int64_t stride = v.stride(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "to_double", [&] {
      const scalar_t* p = v.data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) out[c] = static_cast<double>(p[c * stride]);
    });
  }
  return out;
}

namespace {

// out = B * (x - shift) + K [+ residual], then ReLU: the normalization pass.
template <typename scalar_t>
void normalize(const Geometry& g, AffineArgs<scalar_t>& p, bool residual, bool relu) {
  with_flags(residual, relu, [&](auto res, auto act) {
    channel_affine<scalar_t, false, true, false, decltype(res)::value, decltype(act)::value, false>(g, p);
  });
}

// weight / sqrt(var + eps), per channel.
template <typename T>
std::vector<T> scales(const T* __restrict__ weight, const T* __restrict__ var, T eps, int64_t C) {
  std::vector<T> out(C);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) out[c] = weight[c] / std::sqrt(var[c] + eps);
  return out;
}

// Inference (eval, nothing to save for a backward): out = B * (x - running_mean) + bias,
// B = weight / sqrt(running_var + eps), computed in the compute type straight from the
// parameters (at small batch sizes this per-channel work costs as much as the pass).
void normalize_inference(const Geometry& g, const at::Tensor& x, at::Tensor& out,
                         const at::Tensor& res, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& running_mean,
                         const c10::optional<at::Tensor>& running_var, double eps, bool relu) {
  const int64_t C = g.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnlab_inference", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const ChannelValues<acc_t> w(weight, C, 1.0), b(bias, C, 0.0);
    const ChannelValues<acc_t> mean(running_mean, C, 0.0), var(running_var, C, 1.0);
    const std::vector<acc_t> B = scales(w.data(), var.data(), static_cast<acc_t>(eps), C);
    AffineArgs<scalar_t> p;
    p.u = x.data_ptr<scalar_t>();
    p.r = res.defined() ? res.data_ptr<scalar_t>() : nullptr;
    p.shift = mean.data();
    p.B = B.data();
    p.K = b.data();
    p.out = out.data_ptr<scalar_t>();
    normalize(g, p, res.defined(), relu);
  });
}

// running = (1 - momentum) * running + momentum * batch(c), in place, where take(c).
template <typename Batch, typename Take>
void update_running(at::Tensor& running, double momentum, const Batch& batch, const Take& take) {
  const int64_t stride = running.stride(0), C = running.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "update_running", [&] {
    scalar_t* p = running.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      if (!take(c)) continue;
      const double old = static_cast<double>(p[c * stride]);
      p[c * stride] = static_cast<scalar_t>(old * (1.0 - momentum) + batch(c) * momentum);
    }
  });
}

// The normalization of a channel whose d = x − shift has mean mean_d and variance var:
// out = B·(x − shift) + K, B = w·invstd, K = b − mean_d·w·invstd (float64).
struct ChannelNorm {
  double invstd, B, K;
};
inline ChannelNorm channel_norm(double mean_d, double var, double eps, double w, double b) {
  const double invstd = 1.0 / std::sqrt(var + eps);
  return {invstd, w * invstd, b - mean_d * w * invstd};
}

// The batch mean of d and its biased variance from s1 = Σd, s2 = Σd² over n values.
inline double batch_moments(double s1, double s2, double n, double& var) {
  const double mean_d = s1 / n;
  var = s2 / n - mean_d * mean_d;
  if (var < 0.0) var = 0.0;  // rounding; NaN stays NaN (std::max would hide it)
  return mean_d;
}

std::string channel_list(const bool* bad, int64_t C) {
  std::ostringstream s;
  s << "[";
  int64_t shown = 0;
  for (int64_t c = 0; c < C; ++c) {
    if (!bad[c]) continue;
    if (shown == 10) {
      s << ", ...";
      break;
    }
    s << (shown++ ? ", " : "") << c;
  }
  s << "]";
  return s.str();
}

}  // namespace

namespace {

// The forward; the per-channel results (shift, mean_d, invstd, bad) only if `want_stats`.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps, int64_t activation, int64_t nonfinite,
    bool report, bool want_stats) {
  TORCH_CHECK(input.dim() >= 2, "input: expected a tensor (N, C, *), got ", input.dim(), "-d");
  TORCH_CHECK(training || (running_mean.has_value() && running_var.has_value()),
              "running_mean, running_var: expected tensors in evaluation mode");
  const bool has_residual = residual.has_value() && residual->defined();
  TORCH_CHECK(!has_residual || (residual->sizes() == input.sizes() &&
                                residual->scalar_type() == input.scalar_type()),
              "residual: expected the input's shape and dtype");
  const int64_t C = input.size(1);
  for (const auto& [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias},
                                std::pair{"running_mean", &running_mean},
                                std::pair{"running_var", &running_var}}) {
    TORCH_CHECK_VALUE(!t->has_value() || !(*t)->defined() || (*t)->numel() == C, name,
                      ": expected ", C, " values (one per channel of input ", input.sizes(),
                      "), got ", (*t)->sizes());
  }
  const auto acc = acc_dtype(input);
  const auto acc_options = input.options().dtype(acc);
  if (input.numel() == 0) {  // an empty batch: nothing to normalize, statistics untouched
    return {at::empty_like(input), at::zeros({C}, acc_options), at::zeros({C}, acc_options),
            at::ones({C}, acc_options), at::zeros({C}, input.options().dtype(at::kBool))};
  }
  const at::Tensor x = to_kernel_layout(input);
  const at::Tensor res = has_residual ? same_layout(*residual, x) : at::Tensor();
  const std::vector<int64_t> strides = result_strides(input, at::Tensor());
  at::Tensor out = empty_output(x, want_stats ? Use::kTraining : Use::kInference, strides);
  const Geometry g = geometry(x);
  if (!training && !want_stats) {
    normalize_inference(g, x, out, res, weight, bias, running_mean, running_var, eps, activation == kRelu);
    return {with_strides(out, strides), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
  const double n = static_cast<double>(x.numel() / C);
  // The per-channel results are written where they are returned (the autograd node keeps
  // them); mean_d and var also in float64 for the running averages.
  at::Tensor shift_t = at::empty({C}, acc_options), mean_d_t = at::empty({C}, acc_options);
  at::Tensor invstd_t = at::empty({C}, acc_options);
  at::Tensor bad_t = at::empty({C}, input.options().dtype(at::kBool));
  bool* bad = bad_t.data_ptr<bool>();
  std::unique_ptr<double[]> mean_d(new double[C]), var(new double[C]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnlab_forward", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    acc_t* S = shift_t.data_ptr<acc_t>();
    acc_t* mean_d_out = mean_d_t.data_ptr<acc_t>();
    acc_t* invstd_out = invstd_t.data_ptr<acc_t>();
    const ChannelReader<acc_t> w(weight, C, 1.0), b(bias, C, 0.0);
    // Training: one sample per channel, x[0, c, 0, ...], or 0 where that sample is not finite
    // (an inf shift would turn the channel's sums into inf − inf = NaN; torch's mean is inf).
    // Eval (recorded by autograd): the running mean, and the running variance as var.
    if (training) {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t sample = static_cast<acc_t>(g.rows ? xp[c] : xp[c * g.L]);
        S[c] = std::isfinite(sample) ? sample : acc_t(0);
      }
    } else {
      const ChannelReader<acc_t> rm(running_mean, C, 0.0), rv(running_var, C, 1.0);
      for (int64_t c = 0; c < C; ++c) {
        S[c] = static_cast<acc_t>(rm[c]);
        var[c] = rv[c];
      }
    }
    // Channel c: its statistics (training: from s1 = Σd, s2 = Σd²), stored; {0, B, K} of
    // out = B·(x − shift) + K.
    auto channel = [&](int64_t c, double s1, double s2) {
      mean_d[c] = training ? batch_moments(s1, s2, n, var[c]) : 0.0;
      bad[c] = training && !(std::isfinite(mean_d[c]) && std::isfinite(s2));
      const ChannelNorm norm = channel_norm(mean_d[c], var[c], eps, w[c], b[c]);
      mean_d_out[c] = static_cast<acc_t>(mean_d[c]);
      invstd_out[c] = static_cast<acc_t>(norm.invstd);
      return std::array<acc_t, 3>{acc_t(0), static_cast<acc_t>(norm.B), static_cast<acc_t>(norm.K)};
    };
    AffineArgs<scalar_t> p;
    p.u = xp;
    p.r = has_residual ? res.data_ptr<scalar_t>() : nullptr;
    p.shift = S;
    p.out = out.data_ptr<scalar_t>();
    const bool relu = activation == kRelu;
    if (training && by_channel(g, 2 + (has_residual ? 1 : 0), x.element_size())) {  // x, [r], out
      with_flags(has_residual, relu, [&](auto res, auto act) {
        sums_then_affine<scalar_t, false, false, false, true, decltype(res)::value, decltype(act)::value, false>(g, p, channel);
      });
      return;
    }
    std::unique_ptr<double[]> s1(new double[training ? C : 0]), s2(new double[training ? C : 0]);
    if (training) channel_sums<scalar_t, false, false>(g, xp, nullptr, nullptr, S, s1.get(), s2.get());
    std::unique_ptr<acc_t[]> B(new acc_t[C]), K(new acc_t[C]);
    // (per channel: a square root and divisions in float64; threads share many channels out)
    at::parallel_for(0, C, kChannelGrain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const auto abk = channel(c, training ? s1[c] : 0.0, training ? s2[c] : 0.0);
        B[c] = abk[1];
        K[c] = abk[2];
      }
    });
    p.B = B.get();
    p.K = K.get();
    normalize(g, p, has_residual, relu);
  });
  if (training) {
    int64_t bad_count = 0;
    for (int64_t c = 0; c < C; ++c) bad_count += bad[c] ? 1 : 0;
    auto take = [&](int64_t c) {
      return nonfinite == kPropagate || (nonfinite == kSkip ? !bad[c] : bad_count == 0);
    };
    AT_DISPATCH_FLOATING_TYPES(shift_t.scalar_type(), "bnlab_running", [&] {
      const scalar_t* S = shift_t.data_ptr<scalar_t>();
      if (running_mean.has_value() && running_mean->defined()) {
        at::Tensor running = *running_mean;
        update_running(running, momentum, [&](int64_t c) { return static_cast<double>(S[c]) + mean_d[c]; }, take);
      }
    });
    if (running_var.has_value() && running_var->defined()) {
      at::Tensor running = *running_var;
      update_running(running, momentum, [&](int64_t c) { return var[c] * n / std::max(1.0, n - 1.0); }, take);
    }
    // Inside compiled or traced code nothing runs after the operator to read `bad`, so it
    // reports itself: a C++ warning (torch forwards it to Python's warnings where its
    // handler is installed, else logs it) or an error (a Python RuntimeError).
    if (report && bad_count && nonfinite != kPropagate) {
      const std::string channels = channel_list(bad, C);
      TORCH_CHECK(nonfinite != kRaise, "batch_norm: non-finite batch statistics in channel(s) ",
                  channels, "; running statistics left unchanged (nonfinite='raise')");
      TORCH_WARN("batch_norm: non-finite batch statistics in channel(s) ", channels,
                 "; their running statistics were not updated");
    }
  }
  out = with_strides(out, strides);
  if (!want_stats) return {out, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  return {out, shift_t, mean_d_t, invstd_t, bad_t};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps, int64_t activation, int64_t nonfinite,
    bool report) {
  return forward_impl(input, weight, bias, residual, running_mean, running_var, training,
                      momentum, eps, activation, nonfinite, report, true);
}

at::Tensor normalize_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps, int64_t activation, int64_t nonfinite,
    bool report) {
  return std::get<0>(forward_impl(input, weight, bias, residual, running_mean, running_var,
                                  training, momentum, eps, activation, nonfinite, report, false));
}

}  // namespace bnlab
