// The two memory passes every batch-norm kernel is made of: per-channel sums and a
// per-channel affine map. Everything else (statistics, running averages, gradients) is
// arithmetic on C numbers between passes.
//
// A tensor of shape (N, C, *) is seen in one of two layouts:
//   planar: N*C contiguous planes of L elements (contiguous NC..., L > 1);
//   rows:   M = N*L contiguous rows of C channels (channels_last, and (N, C) input).
// Sums use data shifted by one sample per channel, d = u - shift: with a large common
// offset the subtraction is exact, so sums of d and d^2 never cancel catastrophically.
// The sums pass splits its work into chunks (chunk_count), the threads share them out; partial
// sums are accumulated in the compute type over short blocks, then in double, and merged in a
// fixed order. How the work is split depends on sizes only, so results do not depend on the
// thread count.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <type_traits>
#include <vector>

namespace bnlab {

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

constexpr int64_t kBlock = 2048;   // elements summed in the compute type before a double flush
constexpr int64_t kRowBlock = 64;  // rows summed in the compute type before a double flush
constexpr int64_t kLanes = 32;     // partial sums per plane pass
// Below this many elements a pass runs on one thread (torch's at::internal::GRAIN_SIZE: inside a
// model, where the previous layer left the data spread over every core's cache, splitting
// smaller tensors measured faster than the 65536 used before).
constexpr int64_t kMinParallelElements = 32768;
// Per-channel float64 work (statistics, coefficients) is shared out in blocks of this many
// channels (a (8, 8192) BatchNorm1d input spends more time there than on its data).
constexpr int64_t kChannelGrain = 1024;

// Calls pass(A, B) with two runtime flags as std::bool_constant types: one call site for the
// four instantiations of a pass (by residual and ReLU; by the ReLU mask and writing g).
template <typename Pass>
inline void with_flags(bool a, bool b, Pass&& pass) {
  if (a) {
    if (b) pass(std::true_type{}, std::true_type{});
    else pass(std::true_type{}, std::false_type{});
  } else {
    if (b) pass(std::false_type{}, std::true_type{});
    else pass(std::false_type{}, std::false_type{});
  }
}
// Planes shorter than this are passed as rows (see small_planes_as_rows).
constexpr int64_t kSmallPlane = 8;

struct Geometry {
  int64_t N, C, L;
  bool rows;
  int64_t rows_count() const { return N * L; }
};

// `x` must be contiguous, or channels_last(_3d) dense (the caller guarantees it).
inline Geometry geometry(const at::Tensor& x) {
  Geometry g{x.size(0), x.size(1), 1, true};
  for (int64_t d = 2; d < x.dim(); ++d) g.L *= x.size(d);
  g.rows = !(x.is_contiguous() && g.L > 1);
  return g;
}

// Small planes (NCHW with H*W < kSmallPlane, e.g. ResNet's 7x7, 4x4, 2x2 stages) make the
// planar loops short; each sample is then one row of C*L values instead, with every
// per-channel coefficient repeated L times (`per_position`).
inline bool small_planes(const Geometry& g) { return !g.rows && g.L < kSmallPlane; }
inline Geometry small_planes_as_rows(const Geometry& g) { return {g.N, g.C * g.L, 1, true}; }

template <typename T>
std::vector<T> per_position(const T* per_channel, const Geometry& g) {
  std::vector<T> out(g.C * g.L);
  for (int64_t c = 0; c < g.C; ++c) std::fill_n(out.begin() + c * g.L, g.L, per_channel[c]);
  return out;
}

// The sums pass's chunks: as many as the size justifies, up to kMaxChunks, never more than
// work items, and at least kRowBlock of the N·L values per channel each (every chunk adds 2·C
// partial sums to merge: wide, short (N, C) inputs measured 26% slower with 16 chunks). Set
// by the sizes alone, not by the thread count (the threads share out the chunks), so that
// each chunk's partial sums, and their merge, are the same on any number of threads: results
// are bitwise equal on 1, 2 or 16 threads.
constexpr int64_t kMaxChunks = 16;
inline int64_t tasks_by_size(const Geometry& g) { return g.N * g.C * g.L / kMinParallelElements; }
inline int64_t chunk_count(const Geometry& g) {
  const int64_t work = g.rows ? g.rows_count() : g.N * g.C;
  const int64_t by_size = tasks_by_size(g);
  const int64_t by_values = g.N * g.L / kRowBlock;
  return std::max<int64_t>(1, std::min({kMaxChunks, work, by_size, by_values}));
}

// Rows layout: each chunk's channels split into this many blocks (of at least kMinColumns),
// so that a few long rows (a (8, 8192) BatchNorm1d input: one chunk of 8 rows) still spread
// over the threads. A channel's sums keep their order: results stay bitwise equal on any
// number of threads.
constexpr int64_t kMinColumns = 64;
inline int64_t column_blocks(const Geometry& g, int64_t chunks) {
  if (!g.rows) return 1;
  const int64_t tasks = std::min(kMaxChunks, tasks_by_size(g));
  return std::max<int64_t>(1, std::min(tasks / chunks, g.C / kMinColumns));
}

// v, kept where the ReLU output m is positive when MASK (the ReLU's backward).
template <bool MASK, typename acc_t, typename scalar_t>
inline acc_t masked(scalar_t v, const scalar_t* m, int64_t i) {
  const acc_t value = static_cast<acc_t>(v);
  if constexpr (MASK) return static_cast<acc_t>(m[i]) > acc_t(0) ? value : acc_t(0);
  return value;
}

// One channel's running sums (see channel_sums): kLanes partial sums in the compute type,
// carried over its planes (short planes pay no per-plane reduction), flushed to double every
// kBlock elements and at the end of the channel's last plane.
template <typename scalar_t, bool TWO, bool MASK>
struct LaneSums {
  using acc_t = typename AccType<scalar_t>::type;
  acc_t a1[kLanes] = {}, a2[kLanes] = {};
  double t1 = 0, t2 = 0;
  int64_t pending = 0;  // elements summed in a1/a2 since the last flush to double

  // The L values of one plane of u (v, m); `last`: the channel's last plane.
  inline void add(const scalar_t* __restrict__ up, const scalar_t* __restrict__ vp,
                  const scalar_t* __restrict__ mp, acc_t sh, int64_t L, bool last) {
    for (int64_t l0 = 0; l0 < L; l0 += kBlock) {
      const int64_t l1 = std::min(L, l0 + kBlock);
      int64_t l = l0;
      for (; l + kLanes <= l1; l += kLanes) {
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          const acc_t d = static_cast<acc_t>(up[l + j]) - sh;
          const acc_t e = TWO ? masked<MASK, acc_t>(vp[l + j], mp, l + j) : d;
          a1[j] += e;
          a2[j] += e * d;
        }
      }
      const int64_t rest = l1 - l;  // < kLanes: one lane each, still vectorized
#pragma omp simd
      for (int64_t j = 0; j < rest; ++j) {
        const acc_t d = static_cast<acc_t>(up[l + j]) - sh;
        const acc_t e = TWO ? masked<MASK, acc_t>(vp[l + j], mp, l + j) : d;
        a1[j] += e;
        a2[j] += e * d;
      }
      pending += l1 - l0;
      if (pending >= kBlock || (last && l1 == L)) {
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
};

// Sums over the planes n0 <= n < n1 of channel c.
template <typename scalar_t, bool TWO, bool MASK>
inline void plane_sums(const Geometry& g, const scalar_t* u, const scalar_t* v, const scalar_t* m,
                       typename AccType<scalar_t>::type sh, int64_t c, int64_t n0, int64_t n1,
                       double& s1, double& s2) {
  const int64_t L = g.L;
  LaneSums<scalar_t, TWO, MASK> sums;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t plane = (n * g.C + c) * L;
    sums.add(u + plane, TWO ? v + plane : u, MASK ? m + plane : u, sh, L, n + 1 == n1);
  }
  s1 = sums.t1;
  s2 = sums.t2;
}

// Per-channel sums, d = u - shift:
//   ONE input (TWO=false):  s1 = sum(d),     s2 = sum(d * d)
//   TWO inputs (TWO=true):  s1 = sum(e),     s2 = sum(e * d),  e = v (masked by m > 0 if MASK)
template <typename scalar_t, bool TWO, bool MASK>
void channel_sums(const Geometry& g, const scalar_t* u, const scalar_t* v, const scalar_t* m,
                  const typename AccType<scalar_t>::type* shift, double* s1, double* s2) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t C = g.C, L = g.L;
  if (small_planes(g)) {
    const auto positions = per_position(shift, g);
    std::vector<double> t1(C * L), t2(C * L);
    channel_sums<scalar_t, TWO, MASK>(small_planes_as_rows(g), u, v, m, positions.data(), t1.data(), t2.data());
    for (int64_t c = 0; c < C; ++c) {
      s1[c] = std::accumulate(t1.begin() + c * L, t1.begin() + (c + 1) * L, 0.0);
      s2[c] = std::accumulate(t2.begin() + c * L, t2.begin() + (c + 1) * L, 0.0);
    }
    return;
  }
  const int64_t work = g.rows ? g.rows_count() : g.N * C;
  const int64_t chunks = chunk_count(g);
  const int64_t columns = column_blocks(g, chunks);
  std::vector<double> part(chunks * 2 * C, 0.0);
  at::parallel_for(0, chunks * columns, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> b1_store(g.rows ? C : 0), b2_store(g.rows ? C : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / columns, column = task % columns;
      const int64_t c_begin = C * column / columns, c_end = C * (column + 1) / columns;
      // (the rows branch sees channels [c_begin, c_end) as its whole row)
      double* p1 = &part[k * 2 * C] + c_begin;
      double* p2 = p1 + C;
      acc_t* __restrict__ b1 = b1_store.data() + c_begin;
      acc_t* __restrict__ b2 = b2_store.data() + c_begin;
      const int64_t w0 = work * k / chunks, w1 = work * (k + 1) / chunks;
      if (!g.rows) {
        // Work items in channel-major order (w = c * N + n): a channel's planes in one run.
        for (int64_t w = w0; w < w1;) {
          const int64_t c = w / g.N;
          const int64_t w_end = std::min(w1, (c + 1) * g.N);
          double t1, t2;
          plane_sums<scalar_t, TWO, MASK>(g, u, v, m, shift[c], c, w - c * g.N, w_end - c * g.N, t1, t2);
          p1[c] += t1;
          p2[c] += t2;
          w = w_end;
        }
      } else {
        // Row by row, the block's channels at once: the partial sums live in two L1-resident
        // arrays. Rows are C apart; this block starts at channel c_begin.
        const acc_t* __restrict__ s_ = shift + c_begin;
        const int64_t width = c_end - c_begin;
        for (int64_t r0 = w0; r0 < w1; r0 += kRowBlock) {
          const int64_t r1 = std::min(w1, r0 + kRowBlock);
          std::fill(b1, b1 + width, acc_t(0));
          std::fill(b2, b2 + width, acc_t(0));
          int64_t r = r0;
          for (; r + 4 <= r1; r += 4) {  // four rows per update of the partial sums
            const scalar_t* __restrict__ u0 = u + r * C + c_begin;
            const scalar_t* __restrict__ v0 = TWO ? v + r * C + c_begin : u0;
            const scalar_t* __restrict__ m0 = MASK ? m + r * C + c_begin : u0;
#pragma omp simd
            for (int64_t c = 0; c < width; ++c) {
              const acc_t d0 = static_cast<acc_t>(u0[c]) - s_[c];
              const acc_t d1 = static_cast<acc_t>(u0[c + C]) - s_[c];
              const acc_t d2 = static_cast<acc_t>(u0[c + 2 * C]) - s_[c];
              const acc_t d3 = static_cast<acc_t>(u0[c + 3 * C]) - s_[c];
              const acc_t e0 = TWO ? masked<MASK, acc_t>(v0[c], m0, c) : d0;
              const acc_t e1 = TWO ? masked<MASK, acc_t>(v0[c + C], m0, c + C) : d1;
              const acc_t e2 = TWO ? masked<MASK, acc_t>(v0[c + 2 * C], m0, c + 2 * C) : d2;
              const acc_t e3 = TWO ? masked<MASK, acc_t>(v0[c + 3 * C], m0, c + 3 * C) : d3;
              b1[c] += (e0 + e1) + (e2 + e3);
              b2[c] += (e0 * d0 + e1 * d1) + (e2 * d2 + e3 * d3);
            }
          }
          for (; r < r1; ++r) {
            const scalar_t* __restrict__ ur = u + r * C + c_begin;
            const scalar_t* __restrict__ vr = TWO ? v + r * C + c_begin : ur;
            const scalar_t* __restrict__ mr = MASK ? m + r * C + c_begin : ur;
#pragma omp simd
            for (int64_t c = 0; c < width; ++c) {
              const acc_t d = static_cast<acc_t>(ur[c]) - s_[c];
              const acc_t e = TWO ? masked<MASK, acc_t>(vr[c], mr, c) : d;
              b1[c] += e;
              b2[c] += e * d;
            }
          }
          for (int64_t c = 0; c < width; ++c) {
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

// Pointers and per-channel coefficients of one affine pass (absent ones unused).
template <typename scalar_t>
struct AffineArgs {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* u = nullptr;  // the input x
  const scalar_t* v = nullptr;  // the incoming gradient dy
  const scalar_t* m = nullptr;  // the ReLU's output (its mask)
  const scalar_t* r = nullptr;  // the residual
  const acc_t* shift = nullptr;
  const acc_t* A = nullptr;
  const acc_t* B = nullptr;
  const acc_t* K = nullptr;
  scalar_t* out = nullptr;
  scalar_t* g = nullptr;  // where to write the masked v (the gradient past the ReLU)
};

// out[i] = A * e + B * (u[i] - shift) + K [+ r[i]], then ReLU if RELU; e = v[i], masked by
// m[i] > 0 if MASK (written to g[i] if WRITE_G). USE_V=false drops the e term, USE_U=false the
// u term. A function of (i, A, B, K, shift) that holds the pointers by value (in registers).
template <typename scalar_t, bool USE_V, bool USE_U, bool MASK, bool RES, bool RELU, bool WRITE_G>
inline auto affine_element(const AffineArgs<scalar_t>& p) {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* __restrict__ u = p.u;
  const scalar_t* __restrict__ v = p.v;
  const scalar_t* __restrict__ m = p.m;
  const scalar_t* __restrict__ r = p.r;
  scalar_t* __restrict__ out = p.out;
  scalar_t* __restrict__ gout = p.g;
  return [=](int64_t i, acc_t a, acc_t b, acc_t k, acc_t sh) {
    acc_t y = k;
    if constexpr (USE_U) y += b * (static_cast<acc_t>(u[i]) - sh);
    if constexpr (USE_V) {
      const acc_t e = masked<MASK, acc_t>(v[i], m, i);
      if constexpr (WRITE_G) gout[i] = static_cast<scalar_t>(e);
      y += a * e;
    }
    if constexpr (RES) y += static_cast<acc_t>(r[i]);
    if constexpr (RELU) y = y < acc_t(0) ? acc_t(0) : y;  // NaN stays NaN, as in torch
    out[i] = static_cast<scalar_t>(y);
  };
}

// The affine map of affine_element over the whole tensor, per-channel A, B, K, shift.
template <typename scalar_t, bool USE_V, bool USE_U, bool MASK, bool RES, bool RELU, bool WRITE_G>
void channel_affine(const Geometry& g, const AffineArgs<scalar_t>& p) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t C = g.C, L = g.L;
  if (small_planes(g)) {
    std::vector<acc_t> A, B, K, S;  // the coefficients this pass reads, per position
    AffineArgs<scalar_t> q = p;
    if (USE_V) q.A = (A = per_position(p.A, g)).data();
    if (USE_U) q.B = (B = per_position(p.B, g)).data();
    if (USE_U) q.shift = (S = per_position(p.shift, g)).data();
    q.K = (K = per_position(p.K, g)).data();
    channel_affine<scalar_t, USE_V, USE_U, MASK, RES, RELU, WRITE_G>(small_planes_as_rows(g), q);
    return;
  }
  const int64_t work = g.rows ? g.rows_count() : g.N * C;
  const int64_t per_item = g.rows ? C : L;
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(per_item, 1));
  at::parallel_for(0, work, grain, [&](int64_t begin, int64_t end) {
    const auto element = affine_element<scalar_t, USE_V, USE_U, MASK, RES, RELU, WRITE_G>(p);
    if (!g.rows) {
      for (int64_t plane = begin, c = begin % C; plane < end; ++plane, c = c + 1 == C ? 0 : c + 1) {
        const acc_t a = USE_V ? p.A[c] : acc_t(0), b = USE_U ? p.B[c] : acc_t(0), k = p.K[c];
        const acc_t sh = USE_U ? p.shift[c] : acc_t(0);
        const int64_t base = plane * L;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) element(base + l, a, b, k, sh);
      }
    } else {
      const acc_t* __restrict__ A = p.A;
      const acc_t* __restrict__ B = p.B;
      const acc_t* __restrict__ K = p.K;
      const acc_t* __restrict__ S = p.shift;
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          element(base + c, USE_V ? A[c] : acc_t(0), USE_U ? B[c] : acc_t(0), K[c],
                  USE_U ? S[c] : acc_t(0));
        }
      }
    }
  });
}

// Planar tensors (NCHW) whose channels fit in a core's cache are run channel by channel:
// the channel's sums, its coefficients, then the affine map over the same planes while they
// are still in cache (two whole-tensor passes would read everything from memory twice).
// Short planes go in groups of adjacent channels, whose planes of one sample are contiguous:
// a channel's planes alone, C·L values apart, would be a few cache lines each (shared with
// the neighbouring channels') at strides that crowd a few cache sets (measured: 7x7 and 4x4
// planes ran up to 2x slower channel by channel than in two passes). The choice depends on
// sizes only, never on the thread count, so the results do not either; a channel's sums are
// the same lane sums as channel_sums makes.
constexpr int64_t kChannelCacheBytes = int64_t(2) << 20;  // one core's L2 on recent x86 servers
constexpr int64_t kMinGroups = 8;                         // enough work items to share out
// Values of one sample a group spans (its channels' planes). Measured on 7x7, 4x4, 8x8 and
// 14x14 planes: 512 beat 128 everywhere and two passes up to 1.5x; 2048 did better only with
// 1,024 channels or more.
constexpr int64_t kMinRun = 512;

inline int64_t channels_per_group(const Geometry& g) { return (kMinRun + g.L - 1) / g.L; }

// `values_per_element`: how many tensor values of one element the two passes read and write.
inline bool by_channel(const Geometry& g, int64_t values_per_element, int64_t value_bytes) {
  if (g.rows || small_planes(g)) return false;
  const int64_t G = channels_per_group(g);
  return (g.C + G - 1) / G >= kMinGroups &&
         g.N * G * g.L * values_per_element * value_bytes <= kChannelCacheBytes;
}

// Per group of adjacent channels: each channel c's (s1, s2) = the sums of
// channel_sums<TWO, MASK> over p.u, p.v, p.m (shift p.shift), {A, B, K} = coefficients(c, s1,
// s2), then channel_affine's map over the group's planes with them.
template <typename scalar_t, bool TWO, bool MASK, bool USE_V, bool USE_U, bool RES, bool RELU,
          bool WRITE_G, typename Coefficients>
void sums_then_affine(const Geometry& g, const AffineArgs<scalar_t>& p,
                      const Coefficients& coefficients) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t C = g.C, L = g.L, G = channels_per_group(g), groups = (C + G - 1) / G;
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / (g.N * G * L));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    const auto element = affine_element<scalar_t, USE_V, USE_U, MASK, RES, RELU, WRITE_G>(p);
    std::vector<LaneSums<scalar_t, TWO, MASK>> sums(G);
    std::vector<std::array<acc_t, 3>> abk(G);
    for (int64_t group = begin; group < end; ++group) {
      const int64_t c0 = group * G, c1 = std::min(C, c0 + G);
      std::fill(sums.begin(), sums.end(), LaneSums<scalar_t, TWO, MASK>{});
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t plane = (n * C + c) * L;
          sums[c - c0].add(p.u + plane, TWO ? p.v + plane : p.u, MASK ? p.m + plane : p.u,
                           p.shift[c], L, n + 1 == g.N);
        }
      }
      for (int64_t c = c0; c < c1; ++c) abk[c - c0] = coefficients(c, sums[c - c0].t1, sums[c - c0].t2);
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t c = c0; c < c1; ++c) {
          const acc_t a = abk[c - c0][0], b = abk[c - c0][1], k = abk[c - c0][2], sh = p.shift[c];
          const int64_t base = (n * C + c) * L;
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) element(base + l, a, b, k, sh);
        }
      }
    }
  });
}

}  // namespace bnlab
