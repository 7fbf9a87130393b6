// Output memory for large tensors: a caching allocator that torch sees as any other.
//
// A fresh 50 MB CPU tensor costs page faults and zeroing on every training step, more than
// the normalization's arithmetic on small machines. Outputs are allocated here instead when
//   training (a forward that autograd records, a backward): at least kPoolMinBytes. Such
//     outputs recur every step at the same sizes, while glibc's heap shrinks between steps
//     (and maps fresh pages again in the next);
//   inference (a forward that autograd does not record): at least kPoolMinInferenceBytes,
//     glibc's largest heap size (above it, every allocation is a fresh mapping). Smaller
//     inference outputs live briefly, and glibc hands their memory straight to the next
//     layer; kept in the pool instead, they measured slower (the following convolutions
//     page-faulted more: resnet50, batch 32, 112², eval).
// Pool blocks are 2 MiB-aligned, transparent huge pages requested, and on release kept for
// the next allocation of the same size (the most recently freed first: likeliest still in
// cache), up to a cap of idle bytes (oldest dropped first; BNLAB_POOL_MB, default 256; 0
// disables caching). The tensors are ordinary: their storage is resizable (through this
// allocator), shareable and serializable like torch's.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace bnlab {

constexpr int64_t kPoolMinBytes = int64_t(1) << 20;
constexpr int64_t kPoolMinInferenceBytes = int64_t(32) << 20;  // glibc's DEFAULT_MMAP_THRESHOLD_MAX

enum class Use { kTraining, kInference };

// An uninitialized tensor with the sizes and dtype of `like` (dense strides) for the kernels
// to write in like's layout: with `strides` where they give every element the offset like's
// strides give it (they differ in dimensions of size 1 only), else with like's strides.
at::Tensor empty_output(const at::Tensor& like, Use use, c10::IntArrayRef strides);

struct PoolStats {
  int64_t idle_bytes, idle_blocks, max_idle_bytes, hits, misses;
};
PoolStats pool_stats();
void pool_release();                      // free every idle block
void pool_set_max_idle_bytes(int64_t n);  // cap (frees idle blocks above it)

}  // namespace bnlab
