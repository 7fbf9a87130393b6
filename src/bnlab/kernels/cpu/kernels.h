// bnlab's CPU batch-norm kernels: the implementations behind the bnlab:: operators
// (schemas and semantics in ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

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
// torch's strides for a batch norm result of `input` (torch 2.6-2.14, CPU; dense): the
// forward's output (`grad_out` undefined) or the input gradient for `grad_out`. Where input
// (and grad_out, in the same suggested memory format) are dense in some format: contiguous if
// input is, else channels_last(_3d); otherwise input's suggested format. (Where these differ
// from the input's own strides only in dimensions of size 1 the memory is the same; but
// torch's operators read such strides differently: a 1x1 stride-2 convolution over a
// 1-channel (784, 1, 28, 1) input corrupted the heap in torch 2.13.)
std::vector<int64_t> result_strides(const at::Tensor& input, const at::Tensor& grad_out);
// `t`, written by the kernels in x's layout, with `strides` (a copy only where the memory
// order differs; else the same memory under the given strides, made so by `empty_output`).
at::Tensor with_strides(const at::Tensor& t, c10::IntArrayRef strides);
at::ScalarType acc_dtype(const at::Tensor& x);                         // float64 for float64, else float32
std::vector<double> to_double(const c10::optional<at::Tensor>& t, int64_t C, double fill);

// Whether `t` is a contiguous CPU vector of T (its memory can be read in place).
template <typename T>
bool readable_as(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->is_cpu() &&
         t->scalar_type() == c10::CppTypeToScalarType<T>::value && t->stride(0) == 1;
}

// Per-channel values of an optional (C,) tensor as T: the tensor's own memory when it is a
// contiguous T vector on the CPU (no copy), else a converted copy; `fill` where absent.
template <typename T>
class ChannelValues {
 public:
  ChannelValues(const c10::optional<at::Tensor>& t, int64_t C, double fill) {
    if (readable_as<T>(t)) {
      ptr_ = t->data_ptr<T>();
      return;
    }
    const auto values = to_double(t, C, fill);
    copy_.assign(values.begin(), values.end());
    ptr_ = copy_.data();
  }
  const T* data() const { return ptr_; }

 private:
  const T* ptr_ = nullptr;
  std::vector<T> copy_;
};

// An optional (C,) tensor's values read as float64: from the tensor's own memory when it is a
// contiguous CPU tensor of type T (no copy; T to double is exact), else from a float64 copy;
// `fill` where absent.
template <typename T>
class ChannelReader {
 public:
  ChannelReader(const c10::optional<at::Tensor>& t, int64_t C, double fill) {
    if (readable_as<T>(t)) {
      own_ = t->data_ptr<T>();
    } else {
      copy_ = to_double(t, C, fill);
    }
  }
  double operator[](int64_t c) const { return own_ ? static_cast<double>(own_[c]) : copy_[c]; }

 private:
  const T* own_ = nullptr;
  std::vector<double> copy_;
};

}  // namespace bnlab
