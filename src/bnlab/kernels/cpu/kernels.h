// bnlab's CPU batch-norm kernels: the implementations behind the bnlab:: operators
// (schemas and semantics in ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <tuple>

namespace bnlab {

enum Activation : int64_t { kIdentity = 0, kRelu = 1 };
enum Nonfinite : int64_t { kPropagate = 0, kSkip = 1, kRaise = 2 };

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps, int64_t activation, int64_t nonfinite,
    bool report);

// forward_cpu's output alone (no autograd to feed): skips the per-channel results.
at::Tensor normalize_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps, int64_t activation, int64_t nonfinite,
    bool report);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& output, const at::Tensor& shift, const at::Tensor& mean_d,
    const at::Tensor& invstd, bool training, int64_t activation,
    std::array<bool, 4> output_mask);

// Layout helpers shared by the kernels.
bool kernel_layout(const at::Tensor& x);                               // contiguous or channels_last dense
at::Tensor to_kernel_layout(const at::Tensor& x);                      // x, or a contiguous copy
at::Tensor same_layout(const at::Tensor& t, const at::Tensor& like);   // t with like's strides
at::ScalarType acc_dtype(const at::Tensor& x);                         // float64 for float64, else float32
std::vector<double> to_double(const c10::optional<at::Tensor>& t, int64_t C, double fill);
at::Tensor vector_tensor(const std::vector<double>& values, at::ScalarType dtype);

}  // namespace bnlab
