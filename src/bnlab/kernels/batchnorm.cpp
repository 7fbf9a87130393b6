// bnlab's fused CPU kernels for batch normalization.
//
// A tensor of shape (N, C, *) is seen in one of two layouts:
//   planar: N*C contiguous planes of L elements (contiguous NC, NCL, NCHW, NCDHW);
//   rows:   M = N*L contiguous rows of C channels (channels_last, and (N, C) input).
// Statistics use data shifted by one sample per channel, d = x - x[0, c, 0]: with a large
// common offset the subtraction is exact, so sums of d and d^2 never cancel catastrophically.
// Each pass splits its work into one chunk per thread; partial sums are accumulated in the
// compute type over short blocks, then in double, and merged in a fixed order.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

constexpr int64_t kBlock = 2048;  // elements summed in the compute type before a double flush
constexpr int64_t kRowBlock = 64;  // rows summed in the compute type before a double flush
constexpr int64_t kLanes = 32;  // partial sums per plane pass

struct Geometry {
  int64_t N, C, L;
  bool rows;
  int64_t rows_count() const { return N * L; }
};

Geometry geometry(const at::Tensor& x) {
  Geometry g{x.size(0), x.size(1), 1, false};
  for (int64_t d = 2; d < x.dim(); ++d) g.L *= x.size(d);
  if (x.is_contiguous() && g.L > 1) {
    g.rows = false;
  } else if (x.is_contiguous() && g.L == 1) {
    g.rows = true;
  } else {
    g.rows = true;  // channels_last / channels_last_3d, checked by the caller
  }
  return g;
}

constexpr int64_t kMinParallelElements = 65536;  // below this, threads cost more than they save

// One chunk per thread, but no more chunks than work items or than the size justifies.
int64_t chunk_count(int64_t work, int64_t elements) {
  const int64_t by_size = std::max<int64_t>(1, elements / kMinParallelElements);
  return std::max<int64_t>(1, std::min({static_cast<int64_t>(at::get_num_threads()), work, by_size}));
}

// Per-channel sums of a = u - shift (or of v and v * (u - shift) when TWO) -----------------
// ONE input:  s1 = sum(u - shift), s2 = sum((u - shift)^2)
// TWO inputs: s1 = sum(v),         s2 = sum(v * (u - shift))
template <typename scalar_t, bool TWO>
void channel_sums(const Geometry& g, const scalar_t* u, const scalar_t* v,
                  const typename AccType<scalar_t>::type* shift, double* s1, double* s2) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t C = g.C, L = g.L;
  const int64_t work = g.rows ? g.rows_count() : g.N * C;
  const int64_t chunks = chunk_count(work, g.N * C * L);
  std::vector<double> part(chunks * 2 * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> b1_store(g.rows ? C : 0), b2_store(g.rows ? C : 0);
    acc_t* __restrict__ b1 = b1_store.data();
    acc_t* __restrict__ b2 = b2_store.data();
    for (int64_t k = begin; k < end; ++k) {
      double* p1 = &part[k * 2 * C];
      double* p2 = p1 + C;
      const int64_t w0 = work * k / chunks, w1 = work * (k + 1) / chunks;
      if (!g.rows) {
        // Work items in channel-major order (w = c * N + n), so that the kLanes partial sums
        // of a channel carry over its N planes: small planes pay no per-plane reduction.
        for (int64_t w = w0; w < w1;) {
          const int64_t c = w / g.N;
          const int64_t w_end = std::min(w1, (c + 1) * g.N);
          const acc_t sh = shift[c];
          // The partial sums live in registers (no captured lambda: nothing takes their
          // address); they are flushed to double every kBlock elements and at the end.
          acc_t a1[kLanes] = {}, a2[kLanes] = {};
          double t1 = 0, t2 = 0;
          int64_t pending = 0;  // elements summed in a1/a2 since the last flush to double
          for (; w < w_end; ++w) {
            const int64_t plane = (w % g.N) * C + c;
            const scalar_t* __restrict__ up = u + plane * L;
            const scalar_t* __restrict__ vp = TWO ? v + plane * L : up;
            for (int64_t l0 = 0; l0 < L; l0 += kBlock) {
              const int64_t l1 = std::min(L, l0 + kBlock);
              int64_t l = l0;
              for (; l + kLanes <= l1; l += kLanes) {
#pragma omp simd
                for (int64_t j = 0; j < kLanes; ++j) {
                  const acc_t d = static_cast<acc_t>(up[l + j]) - sh;
                  const acc_t e = TWO ? static_cast<acc_t>(vp[l + j]) : d;
                  a1[j] += e;
                  a2[j] += e * d;
                }
              }
              for (int64_t j = 0; l < l1; ++l, ++j) {
                const acc_t d = static_cast<acc_t>(up[l]) - sh;
                const acc_t e = TWO ? static_cast<acc_t>(vp[l]) : d;
                a1[j] += e;
                a2[j] += e * d;
              }
              pending += l1 - l0;
              if (pending >= kBlock || (w + 1 == w_end && l1 == L)) {
                for (int64_t j = 0; j < kLanes; ++j) {
                  t1 += a1[j];
                  t2 += a2[j];
                  a1[j] = acc_t(0);
                  a2[j] = acc_t(0);
                }
                pending = 0;
              }
            }
          }
          p1[c] += t1;
          p2[c] += t2;
        }
      } else {
        // Row by row, all channels at once: the partial sums live in two L1-resident arrays.
        const acc_t* __restrict__ s_ = shift;
        for (int64_t r0 = w0; r0 < w1; r0 += kRowBlock) {
          const int64_t r1 = std::min(w1, r0 + kRowBlock);
          std::fill(b1, b1 + C, acc_t(0));
          std::fill(b2, b2 + C, acc_t(0));
          int64_t r = r0;
          for (; r + 4 <= r1; r += 4) {  // four rows per update of the partial sums
            const scalar_t* __restrict__ u0 = u + r * C;
            const scalar_t* __restrict__ v0 = TWO ? v + r * C : u0;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const acc_t d0 = static_cast<acc_t>(u0[c]) - s_[c];
              const acc_t d1 = static_cast<acc_t>(u0[c + C]) - s_[c];
              const acc_t d2 = static_cast<acc_t>(u0[c + 2 * C]) - s_[c];
              const acc_t d3 = static_cast<acc_t>(u0[c + 3 * C]) - s_[c];
              const acc_t e0 = TWO ? static_cast<acc_t>(v0[c]) : d0;
              const acc_t e1 = TWO ? static_cast<acc_t>(v0[c + C]) : d1;
              const acc_t e2 = TWO ? static_cast<acc_t>(v0[c + 2 * C]) : d2;
              const acc_t e3 = TWO ? static_cast<acc_t>(v0[c + 3 * C]) : d3;
              b1[c] += (e0 + e1) + (e2 + e3);
              b2[c] += (e0 * d0 + e1 * d1) + (e2 * d2 + e3 * d3);
            }
          }
          for (; r < r1; ++r) {
            const scalar_t* __restrict__ ur = u + r * C;
            const scalar_t* __restrict__ vr = TWO ? v + r * C : ur;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const acc_t d = static_cast<acc_t>(ur[c]) - s_[c];
              const acc_t e = TWO ? static_cast<acc_t>(vr[c]) : d;
              b1[c] += e;
              b2[c] += e * d;
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            p1[c] += b1[c];
            p2[c] += b2[c];
          }
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double t1 = 0, t2 = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      t1 += part[k * 2 * C + c];
      t2 += part[k * 2 * C + C + c];
    }
    s1[c] = t1;
    s2[c] = t2;
  }
}

// out = A * v + B * (u - shift) + K per channel; USE_V=false drops v (out = B*(u-shift) + K),
// USE_U=false drops u (out = A * v + K).
template <typename scalar_t, bool USE_V, bool USE_U>
void channel_affine(const Geometry& g, const scalar_t* u, const scalar_t* v,
                    const typename AccType<scalar_t>::type* shift,
                    const typename AccType<scalar_t>::type* A,
                    const typename AccType<scalar_t>::type* B,
                    const typename AccType<scalar_t>::type* K, scalar_t* out) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t C = g.C, L = g.L;
  const int64_t work = g.rows ? g.rows_count() : g.N * C;
  const int64_t per_item = g.rows ? C : L;
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(per_item, 1));
  at::parallel_for(0, work, grain, [&](int64_t begin, int64_t end) {
    if (!g.rows) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % C;
        const acc_t a = USE_V ? A[c] : acc_t(0), b = USE_U ? B[c] : acc_t(0), k = K[c];
        const acc_t sh = USE_U ? shift[c] : acc_t(0);
        const scalar_t* up = USE_U ? u + plane * L : nullptr;
        const scalar_t* vp = USE_V ? v + plane * L : nullptr;
        scalar_t* op = out + plane * L;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) {
          acc_t y = k;
          if constexpr (USE_U) y += b * (static_cast<acc_t>(up[l]) - sh);
          if constexpr (USE_V) y += a * static_cast<acc_t>(vp[l]);
          op[l] = static_cast<scalar_t>(y);
        }
      }
    } else {
      const acc_t* __restrict__ a_ = A;
      const acc_t* __restrict__ b_ = B;
      const acc_t* __restrict__ k_ = K;
      const acc_t* __restrict__ s_ = shift;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* __restrict__ ur = USE_U ? u + r * C : nullptr;
        const scalar_t* __restrict__ vr = USE_V ? v + r * C : nullptr;
        scalar_t* __restrict__ orow = out + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          acc_t y = k_[c];
          if constexpr (USE_U) y += b_[c] * (static_cast<acc_t>(ur[c]) - s_[c]);
          if constexpr (USE_V) y += a_[c] * static_cast<acc_t>(vr[c]);
          orow[c] = static_cast<scalar_t>(y);
        }
      }
    }
  });
}

template <typename scalar_t>
std::vector<typename AccType<scalar_t>::type> first_sample(const Geometry& g, const scalar_t* x) {
  using acc_t = typename AccType<scalar_t>::type;
  std::vector<acc_t> shift(g.C);
  for (int64_t c = 0; c < g.C; ++c) shift[c] = static_cast<acc_t>(g.rows ? x[c] : x[c * g.L]);
  return shift;
}

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A (C,) tensor of any floating dtype and stride, read into doubles (fill if absent).
std::vector<double> to_double(const c10::optional<at::Tensor>& t, int64_t C, double fill) {
  std::vector<double> out(C, fill);
  if (t.has_value() && t->defined()) {
    const int64_t stride = t->stride(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "to_double", [&] {
      const scalar_t* p = t->data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) out[c] = static_cast<double>(p[c * stride]);
    });
  }
  return out;
}

template <typename T>
at::Tensor vector_tensor(const std::vector<T>& values, at::ScalarType dtype) {
  auto t = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vector_tensor", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (size_t i = 0; i < values.size(); ++i) p[i] = static_cast<scalar_t>(values[i]);
  });
  return t;
}

// running = (1 - momentum) * running + momentum * batch, in place, for finite channels only.
void update_running(at::Tensor running, const std::vector<double>& batch, double momentum,
                    const std::vector<bool>& finite) {
  const int64_t stride = running.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "update_running", [&] {
    scalar_t* p = running.data_ptr<scalar_t>();
    for (size_t c = 0; c < batch.size(); ++c) {
      if (!finite[c]) continue;
      const double old = static_cast<double>(p[c * stride]);
      p[c * stride] = static_cast<scalar_t>(old * (1.0 - momentum) + batch[c] * momentum);
    }
  });
}

}  // namespace

// Training forward: statistics, running-statistics update and normalization, writing `out`.
// Returns (shift, mean - shift, invstd) in the compute dtype and the number of channels
// whose batch statistics were not finite (left unchanged in the running statistics when
// `skip_nonfinite`, written as they are otherwise, as torch does).
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> forward_train(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps, at::Tensor out,
    bool skip_nonfinite) {
  const Geometry g = geometry(x);
  const int64_t C = g.C;
  const double n = static_cast<double>(x.numel() / C);
  std::vector<double> mean_d(C), var(C), invstd(C), a(C), k(C);
  std::vector<bool> finite(C);
  int64_t nonfinite = 0;
  at::Tensor shift_t;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnlab_forward_train", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    auto shift = first_sample(g, xp);
    std::vector<double> s1(C), s2(C);
    channel_sums<scalar_t, false>(g, xp, nullptr, shift.data(), s1.data(), s2.data());
    auto w = to_double(weight, C, 1.0), b = to_double(bias, C, 0.0);
    std::vector<acc_t> A(C), K(C);
    for (int64_t c = 0; c < C; ++c) {
      mean_d[c] = s1[c] / n;
      var[c] = s2[c] / n - mean_d[c] * mean_d[c];
      if (var[c] < 0.0) var[c] = 0.0;  // rounding; NaN stays NaN (std::max would hide it)
      invstd[c] = 1.0 / std::sqrt(var[c] + eps);
      A[c] = static_cast<acc_t>(w[c] * invstd[c]);
      K[c] = static_cast<acc_t>(b[c] - mean_d[c] * w[c] * invstd[c]);
      const bool ok = std::isfinite(mean_d[c]) && std::isfinite(s2[c]);
      nonfinite += ok ? 0 : 1;
      finite[c] = ok || !skip_nonfinite;  // channels allowed to update their running stats
    }
    channel_affine<scalar_t, false, true>(g, xp, nullptr, shift.data(), nullptr, A.data(), K.data(),
                                          out.data_ptr<scalar_t>());
    shift_t = vector_tensor(shift, acc_dtype(x));
  });
  if (running_mean.has_value() && running_mean->defined()) {
    auto shift_d = to_double(c10::optional<at::Tensor>(shift_t), C, 0.0);
    std::vector<double> mean(C);
    for (int64_t c = 0; c < C; ++c) mean[c] = shift_d[c] + mean_d[c];
    update_running(*running_mean, mean, momentum, finite);
  }
  if (running_var.has_value() && running_var->defined()) {
    std::vector<double> unbiased(C);
    for (int64_t c = 0; c < C; ++c) unbiased[c] = var[c] * n / std::max(1.0, n - 1.0);
    update_running(*running_var, unbiased, momentum, finite);
  }
  return {shift_t, vector_tensor(mean_d, acc_dtype(x)), vector_tensor(invstd, acc_dtype(x)), nonfinite};
}

// Evaluation forward: out = (x - running_mean) * weight * invstd + bias, one pass.
// Returns (shift = running_mean, invstd) in the compute dtype when `want_saved`.
std::tuple<at::Tensor, at::Tensor> forward_eval(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double eps, at::Tensor out, bool want_saved) {
  const Geometry g = geometry(x);
  const int64_t C = g.C;
  auto w = to_double(weight, C, 1.0), b = to_double(bias, C, 0.0);
  auto rm = to_double(c10::optional<at::Tensor>(running_mean), C, 0.0);
  auto rv = to_double(c10::optional<at::Tensor>(running_var), C, 1.0);
  std::vector<double> invstd(C);
  for (int64_t c = 0; c < C; ++c) invstd[c] = 1.0 / std::sqrt(rv[c] + eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnlab_forward_eval", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    std::vector<acc_t> shift(C), A(C), K(C);
    for (int64_t c = 0; c < C; ++c) {
      shift[c] = static_cast<acc_t>(rm[c]);
      A[c] = static_cast<acc_t>(w[c] * invstd[c]);
      K[c] = static_cast<acc_t>(b[c]);
    }
    channel_affine<scalar_t, false, true>(g, x.data_ptr<scalar_t>(), nullptr, shift.data(), nullptr,
                                          A.data(), K.data(), out.data_ptr<scalar_t>());
  });
  if (!want_saved) return {at::Tensor(), at::Tensor()};
  return {vector_tensor(rm, acc_dtype(x)), vector_tensor(invstd, acc_dtype(x))};
}

// Backward. Given the saved (shift, mean_d, invstd), computes per-channel sum(dy) and
// sum(dy * x_hat) in one pass and, if `grad_input` is defined, dx in a second:
//   training: dx = w*invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))
//   eval:     dx = w*invstd * dy
// Returns (sum_dy, sum_dy_xhat) in `sums_dtype` (undefined tensors when it is not given).
std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& shift_t, const at::Tensor& mean_d_t, const at::Tensor& invstd_t,
    bool training, c10::optional<at::ScalarType> sums_dtype,
    const c10::optional<at::Tensor>& grad_input_opt) {
  const bool need_sums = sums_dtype.has_value();
  const at::Tensor grad_input = grad_input_opt.has_value() ? *grad_input_opt : at::Tensor();
  const Geometry g = geometry(x);
  const int64_t C = g.C;
  const double n = static_cast<double>(x.numel() / C);
  auto w = to_double(weight, C, 1.0);
  auto mean_d = to_double(c10::optional<at::Tensor>(mean_d_t), C, 0.0);
  auto invstd = to_double(c10::optional<at::Tensor>(invstd_t), C, 1.0);
  std::vector<double> sum_dy(C, 0.0), sum_dy_xhat(C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnlab_backward", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    std::vector<acc_t> shift(C);
    auto shift_d = to_double(c10::optional<at::Tensor>(shift_t), C, 0.0);
    for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<acc_t>(shift_d[c]);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dyp = grad_out.data_ptr<scalar_t>();
    if (need_sums || (training && grad_input.defined())) {
      std::vector<double> s1(C), s2(C);
      channel_sums<scalar_t, true>(g, xp, dyp, shift.data(), s1.data(), s2.data());
      for (int64_t c = 0; c < C; ++c) {
        sum_dy[c] = s1[c];
        sum_dy_xhat[c] = invstd[c] * (s2[c] - mean_d[c] * s1[c]);  // x_hat = (d - mean_d) * invstd
      }
    }
    if (!grad_input.defined()) return;
    std::vector<acc_t> A(C), B(C), K(C);
    for (int64_t c = 0; c < C; ++c) {
      const double gain = w[c] * invstd[c];
      A[c] = static_cast<acc_t>(gain);
      const double slope = training ? gain * invstd[c] * sum_dy_xhat[c] / n : 0.0;
      B[c] = static_cast<acc_t>(-slope);
      K[c] = static_cast<acc_t>(training ? slope * mean_d[c] - gain * sum_dy[c] / n : 0.0);
    }
    scalar_t* dxp = grad_input.data_ptr<scalar_t>();
    if (training) {
      channel_affine<scalar_t, true, true>(g, xp, dyp, shift.data(), A.data(), B.data(), K.data(), dxp);
    } else {
      channel_affine<scalar_t, true, false>(g, nullptr, dyp, nullptr, A.data(), nullptr, K.data(), dxp);
    }
  });
  if (!need_sums) return {at::Tensor(), at::Tensor()};
  return {vector_tensor(sum_dy, *sums_dtype), vector_tensor(sum_dy_xhat, *sums_dtype)};
}


// ---------------------------------------------------------------------------------------------
// The same operation as a C++ autograd node, for tensors small enough that a Python
// autograd.Function's fixed cost (tens of microseconds per backward) would dominate.
// Under create_graph the backward is written in differentiable ATen ops (recomputing the
// batch statistics from the input), so double backward stays exact.

namespace {

// Absent optional tensors cross the autograd node as empty tensors (undefined ones cannot).
c10::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

at::Tensor per_channel(const at::Tensor& t, const at::Tensor& like) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape[1] = -1;
  return t.view(shape);
}

std::vector<int64_t> reduce_dims(const at::Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

at::Tensor same_layout(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  if (like.is_contiguous()) return t.contiguous();
  return t.contiguous(like.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
}

struct FusedBatchNorm : public torch::autograd::Function<FusedBatchNorm> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
      const at::Tensor& bias, at::Tensor running_mean, at::Tensor running_var, bool training,
      double momentum, double eps, bool skip_nonfinite, at::Tensor out) {
    at::Tensor shift, mean_d, invstd;
    int64_t bad = 0;
    if (training) {
      std::tie(shift, mean_d, invstd, bad) = forward_train(
          input, maybe(weight), maybe(bias), maybe(running_mean), maybe(running_var), momentum,
          eps, out, skip_nonfinite);
    } else {
      std::tie(shift, invstd) = forward_eval(input, maybe(weight), maybe(bias), running_mean,
                                             running_var, eps, out, true);  // both present in eval
      mean_d = at::zeros_like(shift);
    }
    ctx->save_for_backward({input, weight, shift, mean_d, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = maybe(bias).has_value();
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias.scalar_type());
    auto stats = at::stack({mean_d, invstd});  // for the caller's non-finite report
    auto count = at::full({}, bad, at::TensorOptions().dtype(at::kLong));
    ctx->mark_non_differentiable({stats, count});
    return {out, stats, count};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor weight = maybe(saved[1]).value_or(at::Tensor());
    const at::Tensor& shift = saved[2];
    at::Tensor mean_d = saved[3], invstd = saved[4];
    const bool training = ctx->saved_data["training"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const auto bias_dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
    const at::Tensor& grad_out = grads[0];
    at::Tensor grad_input, grad_weight, grad_bias;
    const bool need_input = ctx->needs_input_grad(0);
    const bool need_weight = weight.defined() && ctx->needs_input_grad(1);
    const bool need_bias = has_bias && ctx->needs_input_grad(2);
    if (at::GradMode::is_enabled()) {  // create_graph: differentiable in every input
      const auto acc = shift.scalar_type();
      auto xa = input.to(acc);
      auto dims = reduce_dims(xa);
      if (training) {
        auto [var, md] = at::var_mean(xa - per_channel(shift, xa), dims, 0, false);
        mean_d = md;
        invstd = at::rsqrt(var + eps);
      }
      auto dy = grad_out.to(acc);
      auto x_hat = (xa - per_channel(shift, xa) - per_channel(mean_d, xa)) * per_channel(invstd, xa);
      auto sum_dy = dy.sum(dims);
      auto sum_dy_xhat = (dy * x_hat).sum(dims);
      if (need_input) {
        auto gain = weight.defined() ? invstd * weight.to(acc) : invstd;
        auto inner = dy;
        if (training) {
          const double n = static_cast<double>(input.numel() / input.size(1));
          inner = dy - per_channel(sum_dy / n, xa) - x_hat * per_channel(sum_dy_xhat / n, xa);
        }
        grad_input = (inner * per_channel(gain, xa)).to(input.scalar_type());
      }
      if (need_weight) grad_weight = sum_dy_xhat.to(weight.scalar_type());
      if (need_bias) grad_bias = sum_dy.to(bias_dtype);
    } else {
      if (need_input) grad_input = at::empty_like(input);
      c10::optional<at::ScalarType> sums_dtype;
      if (need_weight || need_bias) sums_dtype = weight.defined() ? weight.scalar_type() : bias_dtype;
      auto [sum_dy, sum_dy_xhat] = ::backward(same_layout(grad_out, input), input, maybe(weight),
                                            shift, mean_d, invstd, training, sums_dtype,
                                            maybe(grad_input));
      if (need_weight) grad_weight = sum_dy_xhat;
      if (need_bias) grad_bias = sum_dy.to(bias_dtype);
    }
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

// (out, stats (2, C): mean - shift and invstd, count of non-finite channels) with autograd.
std::tuple<at::Tensor, at::Tensor, int64_t> fused_autograd(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    bool skip_nonfinite) {
  auto out = at::empty_like(input);
  const auto none = at::empty({0}, input.options().dtype(at::kFloat));
  auto result = FusedBatchNorm::apply(input, weight.value_or(none), bias.value_or(none),
                                      running_mean.value_or(none), running_var.value_or(none),
                                      training, momentum, eps, skip_nonfinite, out);
  return {result[0], result[1], result[2].item<int64_t>()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_train", &forward_train, "batch norm training forward (fused)");
  m.def("forward_eval", &forward_eval, "batch norm evaluation forward (fused)");
  m.def("backward", &backward, "batch norm backward (fused)");
  m.def("fused_autograd", &fused_autograd, "batch norm with a C++ autograd node");
}
