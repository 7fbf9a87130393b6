#include "pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstdlib>
#include <deque>
#include <iterator>
#include <mutex>
#include <sys/mman.h>

namespace bnlab {
namespace {

constexpr size_t kAlign = size_t(2) << 20;  // huge-page aligned

struct Block {
  void* ptr;
  size_t bytes;
};

class Pool final : public c10::Allocator {
 public:
  Pool() {
    const char* env = std::getenv("BNLAB_POOL_MB");
    max_idle_ = (env ? std::atoll(env) : 256) << 20;
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = n == 0 ? 1 : n;
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The most recently freed block of this size first: the one most likely still cached.
      for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {
        if (it->bytes == bytes) {
          ptr = it->ptr;
          idle_bytes_ -= static_cast<int64_t>(bytes);
          idle_.erase(std::next(it).base());
          ++hits_;
          break;
        }
      }
      if (!ptr) ++misses_;
    }
    if (!ptr) {
      const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
      if (posix_memalign(&ptr, kAlign, rounded) != 0) {
        TORCH_CHECK(false, "bnlab: out of memory allocating ", bytes, " bytes");
      }
#ifdef MADV_HUGEPAGE
      madvise(ptr, rounded, MADV_HUGEPAGE);
#endif
    }
    auto* block = new Block{ptr, bytes};
    return {ptr, block, &Pool::release_block, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void release_block(void* context);

  void give_back(Block* block) {
    std::lock_guard<std::mutex> lock(mutex_);
    idle_.push_back(*block);
    idle_bytes_ += static_cast<int64_t>(block->bytes);
    trim_locked();
  }

  void trim_locked() {
    while (!idle_.empty() && idle_bytes_ > max_idle_) {
      std::free(idle_.front().ptr);
      idle_bytes_ -= static_cast<int64_t>(idle_.front().bytes);
      idle_.pop_front();
    }
  }

  PoolStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {idle_bytes_, static_cast<int64_t>(idle_.size()), max_idle_, hits_, misses_};
  }

  void set_max_idle(int64_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    max_idle_ = n;
    trim_locked();
  }

 private:
  std::mutex mutex_;
  std::deque<Block> idle_;
  int64_t idle_bytes_ = 0, max_idle_ = 0, hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors may outlive static destruction at process exit.
Pool& pool() {
  static Pool* instance = new Pool();
  return *instance;
}

void Pool::release_block(void* context) {
  auto* block = static_cast<Block*>(context);
  pool().give_back(block);
  delete block;
}

}  // namespace

at::Tensor empty_output(const at::Tensor& like, Use use, c10::IntArrayRef strides) {
  bool same_offsets = strides.size() == static_cast<size_t>(like.dim());
  for (int64_t d = 0; same_offsets && d < like.dim(); ++d) {
    same_offsets = like.size(d) == 1 || like.stride(d) == strides[d];
  }
  const c10::IntArrayRef chosen = same_offsets ? strides : like.strides();
  const int64_t bytes = like.numel() * static_cast<int64_t>(like.element_size());
  const int64_t threshold = use == Use::kTraining ? kPoolMinBytes : kPoolMinInferenceBytes;
  if (bytes < threshold || pool_stats().max_idle_bytes == 0) {
    return at::empty_strided(like.sizes(), chosen, like.options());
  }
  return at::detail::empty_strided_generic(like.sizes(), chosen, &pool(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           like.scalar_type());
}

PoolStats pool_stats() { return pool().stats(); }
void pool_release() {
  const int64_t cap = pool_stats().max_idle_bytes;
  pool().set_max_idle(0);
  pool().set_max_idle(cap);
}
void pool_set_max_idle_bytes(int64_t n) { pool().set_max_idle(n); }

}  // namespace bnlab
