// Backward kernel: one pass for the per-channel sums, one for the input gradient.
//   g = dy, or dy * (y > 0) past a fused ReLU (y = the forward output)
//   sum_g = Σ g,  sum_g_xhat = Σ g·x̂ = invstd · (Σ g·(x − shift) − mean_d · Σ g)
//   training: dx = w·invstd · (g − sum_g/n − x̂ · sum_g_xhat/n)
//   eval:     dx = w·invstd · g
// Written as dx = A·g + B·(x − shift) + K per channel, so the second pass is one affine map.
#include "kernels.h"
#include "passes.h"
#include "pool.h"

#include <memory>

namespace bnlab {
namespace {

// The dx pass, with or without the x term (training/eval), the ReLU mask and writing g.
template <typename scalar_t>
void input_gradient(const Geometry& g, const AffineArgs<scalar_t>& p, bool training, bool mask,
                    bool write_g) {
  with_flags(mask, write_g, [&](auto masked, auto writes_g) {
    constexpr bool M = decltype(masked)::value, W = decltype(writes_g)::value;
    if (training) channel_affine<scalar_t, true, true, M, false, false, W>(g, p);
    else channel_affine<scalar_t, true, false, M, false, false, W>(g, p);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& output, const at::Tensor& shift_t, const at::Tensor& mean_d_t,
    const at::Tensor& invstd_t, bool training, int64_t activation,
    std::array<bool, 4> output_mask) {
  const bool relu = activation == kRelu;
  TORCH_CHECK(!relu || (output.has_value() && output->defined()),
              "output: the forward output is needed for the ReLU's backward");
  const int64_t C = input.size(1);
  const auto acc = acc_dtype(input);
  const auto none = at::empty({0}, input.options().dtype(acc));
  const bool need_input = output_mask[0], need_weight = output_mask[1],
             need_bias = output_mask[2], need_residual = output_mask[3];
  if (input.numel() == 0) {
    auto zeros = at::zeros({C}, input.options().dtype(acc));
    return {need_input ? at::empty_like(input) : none, need_weight ? zeros : none,
            need_bias ? zeros.clone() : none, need_residual ? at::empty_like(input) : none};
  }
  const at::Tensor x = to_kernel_layout(input);
  const at::Tensor dy = same_layout(grad_out.scalar_type() == x.scalar_type() ? grad_out : grad_out.to(x.scalar_type()), x);
  const at::Tensor y = relu ? same_layout(*output, x) : at::Tensor();
  const Geometry g = geometry(x);
  const double n = static_cast<double>(x.numel() / C);
  // Σg and Σg·x̂ are written where they are returned (as grad_bias and grad_weight).
  at::Tensor sum_g_t = at::empty({C}, input.options().dtype(acc));
  at::Tensor sum_g_xhat_t = at::empty({C}, input.options().dtype(acc));
  const std::vector<int64_t> strides = result_strides(input, grad_out);
  at::Tensor grad_input = need_input ? empty_output(x, Use::kTraining, strides) : at::Tensor();
  // g itself is needed for the residual; written by the dx pass when there is one.
  at::Tensor grad_residual;
  const bool write_g = need_residual && relu && need_input;
  if (write_g) grad_residual = empty_output(x, Use::kTraining, strides);
  const bool need_sums = need_weight || need_bias || (training && need_input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnlab_backward", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const ChannelReader<acc_t> w(weight, C, 1.0), mean_d(mean_d_t, C, 0.0), invstd(invstd_t, C, 1.0);
    const ChannelValues<acc_t> shift(shift_t, C, 0.0);  // (the passes read it as acc_t)
    acc_t* sum_g = sum_g_t.data_ptr<acc_t>();
    acc_t* sum_g_xhat = sum_g_xhat_t.data_ptr<acc_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* yp = relu ? y.data_ptr<scalar_t>() : nullptr;
    // Per channel: the sums, and dx = A·g + B·(x − shift) + K's coefficients from them.
    auto coefficients = [&](int64_t c, double s1, double s2) {
      const double s_xhat = invstd[c] * (s2 - mean_d[c] * s1);
      sum_g[c] = static_cast<acc_t>(s1);
      sum_g_xhat[c] = static_cast<acc_t>(s_xhat);
      const double gain = w[c] * invstd[c];
      const double slope = training ? gain * invstd[c] * s_xhat / n : 0.0;
      const double k = training ? slope * mean_d[c] - gain * s1 / n : 0.0;
      return std::array<acc_t, 3>{static_cast<acc_t>(gain), static_cast<acc_t>(-slope),
                                  static_cast<acc_t>(k)};
    };
    AffineArgs<scalar_t> p;
    p.u = xp;
    p.v = dyp;
    p.m = yp;
    p.shift = shift.data();
    p.out = need_input ? grad_input.data_ptr<scalar_t>() : nullptr;
    p.g = write_g ? grad_residual.data_ptr<scalar_t>() : nullptr;
    const int64_t values = 3 + (relu ? 1 : 0) + (write_g ? 1 : 0);  // x, dy, [y], dx, [g]
    if (training && need_input && by_channel(g, values, x.element_size())) {
      with_flags(relu, write_g, [&](auto masked, auto writes_g) {
        sums_then_affine<scalar_t, true, decltype(masked)::value, true, true, false, false, decltype(writes_g)::value>(g, p, coefficients);
      });
      return;
    }
    std::unique_ptr<double[]> s1(new double[need_sums ? C : 0]), s2(new double[need_sums ? C : 0]);
    if (need_sums) {
      if (relu) channel_sums<scalar_t, true, true>(g, xp, dyp, yp, shift.data(), s1.get(), s2.get());
      else channel_sums<scalar_t, true, false>(g, xp, dyp, nullptr, shift.data(), s1.get(), s2.get());
    }
    std::unique_ptr<acc_t[]> A(new acc_t[C]), B(new acc_t[C]), K(new acc_t[C]);
    at::parallel_for(0, C, kChannelGrain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {  // (eval's dx needs no sums: zero there)
        const auto abk = coefficients(c, need_sums ? s1[c] : 0.0, need_sums ? s2[c] : 0.0);
        A[c] = abk[0];
        B[c] = abk[1];
        K[c] = abk[2];
      }
    });
    if (!need_input) return;
    p.A = A.get();
    p.B = B.get();
    p.K = K.get();
    input_gradient(g, p, training, relu, write_g);
  });
  if (need_residual && !write_g) {
    grad_residual = relu ? dy * y.gt(0) : dy.clone();
  }
  auto fit = [&](const at::Tensor& t) { return t.defined() ? with_strides(t, strides) : t; };
  return {need_input ? fit(grad_input) : none,
          need_weight ? sum_g_xhat_t : none,
          need_bias ? sum_g_t : none,
          need_residual ? fit(grad_residual) : none};
}

}  // namespace bnlab
