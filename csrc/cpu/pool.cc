// Max pooling on the CPU: max_pool, max_pool with winners, the JVP and the gradient (see
// csrc/README.md, "Max pool"). The JVP and the gradient read the winners, never the images.
// Average pooling and its gradient follow the max-pool kernels (section "Average pooling").
//
// Both layouts are handled as one memory pattern [outer][H][W][inner] (C01B: outer = C,
// inner = B; NHWC: outer = B, inner = C); every inner loop runs over the contiguous `inner`
// dimension. Work is split over std::threads in disjoint slices of output rows (forward, JVP)
// or image rows (gradient), so every output element is written by exactly one thread.
//
// Results are bit-identical to the CUDA kernels (csrc/cuda/pool.cu):
// - forward / JVP copy the selected element (image / tangent at the winner) unchanged;
// - the gradient of an image element is 0 + ct(w1) + ct(w2) + ... over the windows that selected
//   it in increasing (oy, ox) order, accumulated in float32 (float64 for float64), then rounded
//   to the storage type to nearest even (NaN becomes the canonical NaN 0x7fff for bf16 / f16,
//   as the CUDA conversion intrinsics do).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "conv_micro_kernel.h"  // isa_cap(): JAX_CONVNET_CPU_ISA
#include "ffi_common.h"
#include "pool_checks.h"
#include "pool_select.h"
#include "targets.h"

namespace ffi = xla::ffi;

namespace {

namespace jcn = jax_convnet;

// ----------------------------------------------------------------------------------------------
// Storage types and bit-exact conversions.

struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

// Round to nearest even; NaN -> canonical 0x7fff (like __float2bfloat16_rn).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// IEEE binary16 -> binary32, exact (subnormals included; NaN payloads kept). Branch-free so the
// selection loops vectorise.
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = uint32_t(h & 0x7fffu);  // exponent and mantissa
  // normal, inf, NaN: rebias the exponent 15 -> 127 (and 31 -> 255 for inf / NaN)
  const uint32_t normal = (em << 13) + (112u << 23) + (em >= 0x7c00u ? (112u << 23) : 0u);
  // zero, subnormal: mant * 2^-24 is exact and a normal float32
  const float sub = float(em) * 5.9604644775390625e-8f;
  const uint32_t mag = em < 0x0400u ? f32_bits(sub) : normal;
  return f32_from_bits(sign | mag);
}

// binary32 -> binary16, round to nearest even (subnormals, overflow to inf included);
// NaN -> canonical 0x7fff (like __float2half_rn).
inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fff;                   // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                                // normal result (>= 2^-14)
    uint32_t m = a - 0x38000000u;                        // rebias exponent 127 -> 15
    m += 0xfffu + ((m >> 13) & 1u);
    return uint16_t(sign | (m >> 13));
  }
  if (a <= 0x33000000u) return sign;  // <= 2^-25 rounds to (signed) zero
  // subnormal result: round(a / 2^-24) to nearest even
  uint32_t e = a >> 23;  // 102 .. 112
  uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  uint32_t shift = 126u - e;  // 14 .. 24
  uint32_t r = mant >> shift;
  uint32_t rem = mant & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (r & 1u))) ++r;
  return uint16_t(sign | r);
}

// take ? a : b, on the raw bits for the 16-bit storage types (a select the vectoriser handles).
inline float pick(bool take, float a, float b) { return take ? a : b; }
inline double pick(bool take, double a, double b) { return take ? a : b; }
inline Bf16 pick(bool take, Bf16 a, Bf16 b) { return Bf16{uint16_t(take ? a.bits : b.bits)}; }
inline F16 pick(bool take, F16 a, F16 b) { return F16{uint16_t(take ? a.bits : b.bits)}; }

// Compute type F, conversions, -inf and zero in the storage type.
template <typename T>
struct Num;
// float and double compute in themselves.
template <typename T>
struct NativeNum {
  using F = T;
  static F to_f(T v) { return v; }
  static T from_f(F v) { return v; }
  static T neg_inf() { return -std::numeric_limits<T>::infinity(); }
  static T zero() { return T(0); }
};
template <>
struct Num<float> : NativeNum<float> {};
template <>
struct Num<double> : NativeNum<double> {};
template <>
struct Num<Bf16> {
  using F = float;
  static F to_f(Bf16 v) { return bf16_to_f32(v.bits); }
  static Bf16 from_f(F v) { return Bf16{f32_to_bf16(v)}; }
  static Bf16 neg_inf() { return Bf16{0xff80}; }
  static Bf16 zero() { return Bf16{0}; }
};
template <>
struct Num<F16> {
  using F = float;
  static F to_f(F16 v) { return f16_to_f32(v.bits); }
  static F16 from_f(F v) { return F16{f32_to_f16(v)}; }
  static F16 neg_inf() { return F16{0xfc00}; }
  static F16 zero() { return F16{0}; }
};

// ----------------------------------------------------------------------------------------------
// XLA runs CPU computations with denormals flushed (x86 MXCSR FTZ/DAZ, aarch64 FPCR FZ). The
// contract compares and sums IEEE values, subnormals included, exactly as the GPU does (no FTZ
// there), so every kernel thread runs with flushing switched off, restored on exit.

class ScopedIeeeDenormals {
 public:
  ScopedIeeeDenormals() {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ & ~(kFtz | kDaz));
#elif defined(__aarch64__)
    uint64_t fpcr;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
    saved_ = fpcr;
    fpcr &= ~(kFz | kFz16);
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
#endif
  }
  ~ScopedIeeeDenormals() {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
    _mm_setcsr(saved_);
#elif defined(__aarch64__)
    uint64_t fpcr = saved_;
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
#endif
  }
  ScopedIeeeDenormals(const ScopedIeeeDenormals&) = delete;
  ScopedIeeeDenormals& operator=(const ScopedIeeeDenormals&) = delete;

 private:
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
  static constexpr unsigned kFtz = 0x8000u, kDaz = 0x0040u;
  unsigned saved_ = 0;
#elif defined(__aarch64__)
  static constexpr uint64_t kFz = uint64_t(1) << 24, kFz16 = uint64_t(1) << 19;
  uint64_t saved_ = 0;
#endif
};

// ----------------------------------------------------------------------------------------------
// Threads over disjoint slices [begin, end) of `units` work units (each with IEEE denormals).

template <typename Fn>
void parallel_for(int64_t units, int64_t cost_per_unit, const Fn& fn) {
  const int64_t kMinCostPerThread = int64_t(1) << 16;
  int64_t hw = int64_t(std::thread::hardware_concurrency());
  if (hw < 1) hw = 1;
  int64_t by_cost = (units * std::max<int64_t>(cost_per_unit, 1)) / kMinCostPerThread;
  int64_t n = std::min({hw, units, std::max<int64_t>(by_cost, 1)});
  auto run_slice = [&fn](int64_t b, int64_t e) {
    ScopedIeeeDenormals ieee;
    fn(b, e);
  };
  if (n <= 1) {
    run_slice(int64_t(0), units);
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(size_t(n));
  int64_t done_upto = 0;  // slices [0, done_upto) are owned by started threads
  for (int64_t k = 0; k < n; ++k) {
    int64_t b = units * k / n, e = units * (k + 1) / n;
    try {
      threads.emplace_back([&run_slice, b, e]() { run_slice(b, e); });
      done_upto = e;
    } catch (...) {
      break;  // could not start a thread: run the rest here
    }
  }
  if (done_upto < units) run_slice(done_upto, units);
  for (auto& t : threads) t.join();
}

// ----------------------------------------------------------------------------------------------
// Kernels. Memory: image[o][y][x][i], pooled[o][oy][ox][i], i contiguous.

struct Dims {
  int64_t O, H, W, I, Ho, Wo, wh, ww, sh, sw, pt, pl;
};

Dims dims_of(const jcn::PoolGeometry& g) {
  return Dims{jcn::pool::outer_size(g), g.in_h,     g.in_w,     jcn::pool::inner_size(g),
              g.out_h,                  g.out_w,    g.window_h, g.window_w,
              g.stride_h,               g.stride_w, g.pad_top,  g.pad_left};
}

// The clipped extent of window (oy, ox): rows [ys, ye), cols [xs, xe).
struct Window {
  int64_t ys, ye, xs, xe;
  bool empty() const { return ys >= ye || xs >= xe; }
};

Window window_of(const Dims& d, int64_t oy, int64_t ox) {
  const int64_t y0 = oy * d.sh - d.pt, x0 = ox * d.sw - d.pl;
  return Window{std::max<int64_t>(y0, 0), std::min<int64_t>(y0 + d.wh, d.H),
                std::max<int64_t>(x0, 0), std::min<int64_t>(x0 + d.ww, d.W)};
}

// The work of one pooled row (o, oy) for parallel_for: its window elements over all lanes.
int64_t pooled_row_cost(const Dims& d) {
  return d.Wo * d.I * std::max<int64_t>(1, std::min(d.wh, d.H) * std::min(d.ww, d.W));
}
// row(o, oy) for every pooled row, the rows split over the thread pool.
template <typename Row>
void for_each_pooled_row(const Dims& d, const Row& row) {
  parallel_for(d.O * d.Ho, pooled_row_cost(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row(r / d.Ho, r % d.Ho);
  });
}

// One element of a window for all n lanes: take it where it beats the best so far (or is the
// first), carrying its value and its offset k in the whole window along. Separate function so
// that `restrict` holds (compilers ignore it on locals): q and best are both float for float32
// and could otherwise alias.
template <typename T>
void scan_element_winner(const T* __restrict p, typename Num<T>::F* __restrict best,
                         T* __restrict q, int32_t* __restrict win, int64_t n, bool first,
                         int32_t k) {
  using F = typename Num<T>::F;
  if (first) {
    for (int64_t i = 0; i < n; ++i) {
      best[i] = Num<T>::to_f(p[i]);
      q[i] = p[i];
      win[i] = k;
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const F v = Num<T>::to_f(p[i]);
    const T candidate = p[i];
    const bool take = jcn::pool::takes(false, v, best[i]);
    best[i] = take ? v : best[i];
    q[i] = pick(take, candidate, q[i]);
    // a select by mask: the vectoriser turns `take ? k : win[i]` into a conditional store
    const int32_t mask = -int32_t(take);
    win[i] = (k & mask) | (win[i] & ~mask);
  }
}

// Forward with winners: out[o][oy][ox][i] = the selected image element of lane i (-inf for an
// empty window), carried along the scan (a select per lane, vectorisable) and written straight
// to the output, and its offset i * ww + j in the whole window (0 for an empty window; K =
// uint8_t / int32_t, kept as int32 during the scan). The plain forward: max_pool_forward.
template <typename T, typename K>
void pool_forward_winners(const T* img, T* out, K* winners, const Dims& d) {
  using F = typename Num<T>::F;
  parallel_for(d.O * d.Ho, pooled_row_cost(d), [&](int64_t begin, int64_t end) {
    std::vector<F> best(size_t(d.I));
    std::vector<int32_t> win(size_t(d.I));
    F* b = best.data();
    int32_t* wk = win.data();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / d.Ho, oy = r % d.Ho;
      for (int64_t ox = 0; ox < d.Wo; ++ox) {
        const int64_t at_out = ((o * d.Ho + oy) * d.Wo + ox) * d.I;
        T* q = out + at_out;
        const Window w = window_of(d, oy, ox);
        if (w.empty()) {
          for (int64_t i = 0; i < d.I; ++i) q[i] = Num<T>::neg_inf();
          for (int64_t i = 0; i < d.I; ++i) winners[at_out + i] = K(0);
          continue;
        }
        const int64_t y0 = oy * d.sh - d.pt, x0 = ox * d.sw - d.pl;
        for (int64_t y = w.ys; y < w.ye; ++y) {
          for (int64_t x = w.xs; x < w.xe; ++x) {
            const int64_t at = ((o * d.H + y) * d.W + x) * d.I;
            const bool first = y == w.ys && x == w.xs;
            scan_element_winner(img + at, b, q, wk, d.I, first,
                                int32_t((y - y0) * d.ww + (x - x0)));  // < 2^31: winner_bytes
          }
        }
        for (int64_t i = 0; i < d.I; ++i) winners[at_out + i] = K(wk[i]);
      }
    }
  });
}

// JVP: out[o][oy][ox][i] = tangents at the winner of lane i, 0 where the winner lies outside the
// image (an empty window's).
template <typename T, typename K>
void pool_jvp(const T* tan, const K* winners, T* out, const Dims& d) {
  const int64_t rows = d.O * d.Ho;
  parallel_for(rows, d.Wo * d.I, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / d.Ho, oy = r % d.Ho;
      const int64_t y0 = oy * d.sh - d.pt;
      for (int64_t ox = 0; ox < d.Wo; ++ox) {
        const int64_t x0 = ox * d.sw - d.pl;
        const int64_t at_out = ((o * d.Ho + oy) * d.Wo + ox) * d.I;
        for (int64_t i = 0; i < d.I; ++i) {
          const int64_t k = int64_t(winners[at_out + i]);
          const int64_t dy = k / d.ww;
          const int64_t y = y0 + dy, x = x0 + (k - dy * d.ww);
          const bool inside = k >= 0 && y >= 0 && y < d.H && x >= 0 && x < d.W;
          out[at_out + i] = inside ? tan[((o * d.H + y) * d.W + x) * d.I + i] : Num<T>::zero();
        }
      }
    }
  });
}

// Windows up to this wide add their cotangents in one vectorised pass per column.
constexpr int64_t kColumnPasses = 4;

// acc[i] += ct[i] for the lanes whose winner is k (+0.0 for the others).
template <typename T, typename K>
void add_where(typename Num<T>::F* __restrict acc, const T* __restrict ct,
               const K* __restrict winners, int32_t k, int64_t n) {
  using F = typename Num<T>::F;
  for (int64_t i = 0; i < n; ++i) {
    const F c = Num<T>::to_f(ct[i]);  // loaded unconditionally: a conditional load blocks vectorising
    acc[i] += int32_t(winners[i]) == k ? c : F(0);
  }
}

// Gradient, gathered per image row (o, y): the windows covering row y are visited in increasing
// (oy, ox); a window whose winner lies in row y adds its cotangent there. Each element thus sums
// its windows in increasing (oy, ox) order, starting from 0, as the CUDA kernel does; accumulated
// in float32 (float64 for float64), rounded once. The images are not read.
template <typename T, typename K>
void pool_grad(const T* ct, const K* winners, T* out, const Dims& d) {
  using F = typename Num<T>::F;
  const int64_t rows = d.O * d.H;
  const int64_t covering_rows = (std::min(d.wh, d.H) + d.sh - 1) / d.sh + 1;
  parallel_for(rows, d.Wo * d.I * covering_rows + d.W * d.I, [&](int64_t begin, int64_t end) {
    std::vector<F> acc(size_t(d.W * d.I));
    F* a = acc.data();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / d.H, y = r % d.H;
      std::fill(acc.begin(), acc.end(), F(0));
      int64_t oy_lo, oy_hi, ox_lo, ox_hi;
      jcn::pool::covering_windows<int64_t>(y, y, d.pt, d.wh, d.sh, d.Ho, &oy_lo, &oy_hi);
      jcn::pool::covering_windows<int64_t>(0, d.W - 1, d.pl, d.ww, d.sw, d.Wo, &ox_lo, &ox_hi);
      for (int64_t oy = oy_lo; oy <= oy_hi; ++oy) {
        const int64_t k_lo = (y - (oy * d.sh - d.pt)) * d.ww;  // winners in row y: [k_lo, +ww)
        for (int64_t ox = ox_lo; ox <= ox_hi; ++ox) {
          const int64_t x0 = ox * d.sw - d.pl;
          const int64_t at = ((o * d.Ho + oy) * d.Wo + ox) * d.I;
          const T* c = ct + at;
          const K* wv = winners + at;
          // Branch-free (winners are data: a branch would be mispredicted half the time). A
          // lane adds +0.0 where its winner is not, which leaves the sum unchanged (acc starts
          // at +0.0, and a sum is -0.0 only when both terms are).
          if (d.ww <= kColumnPasses) {
            // one vectorised pass per column of the window inside the image
            const int64_t j_lo = std::max<int64_t>(0, -x0), j_hi = std::min(d.ww, d.W - x0);
            for (int64_t j = j_lo; j < j_hi; ++j)
              add_where(a + (x0 + j) * d.I, c, wv, int32_t(k_lo + j), d.I);
          } else {
            // one scatter per lane; a lane whose winner is elsewhere adds to column 0
            for (int64_t i = 0; i < d.I; ++i) {
              const int64_t dk = int64_t(wv[i]) - k_lo;
              const int64_t x = x0 + dk;
              const bool hit = (dk >= 0) & (dk < d.ww) & (x >= 0) & (x < d.W);
              const F cf = Num<T>::to_f(c[i]);
              a[(x & -int64_t(hit)) * d.I + i] += hit ? cf : F(0);
            }
          }
        }
      }
      T* q = out + (o * d.H + y) * d.W * d.I;
      for (int64_t k = 0; k < d.W * d.I; ++k) q[k] = Num<T>::from_f(a[k]);
    }
  });
}

// ----------------------------------------------------------------------------------------------
// Average pooling (see csrc/README.md, "Average pool"). Bit-identical to the CUDA kernels:
// - forward: each window's in-image elements summed in row-major order starting from 0, in
//   float32 (float64 for float64), times the reciprocal of its divisor (1 / float(divisor),
//   rounded to nearest), rounded once to the storage type;
// - gradient: each image element is 0 + ct(w1) * r(w1) + ct(w2) * r(w2) + ... over the windows
//   containing it in increasing (oy, ox), r the same reciprocal, each product rounded before it
//   is added (this file is built with -ffp-contract=off: no fused multiply-add).
// Both gather: every output element is computed by one thread, its lanes in chunks (forward
// kAvgLanes, gradient kAvgGradLanes) whose accumulators stay in registers.

constexpr int64_t kAvgLanes = 32, kAvgGradLanes = 16;

// The reciprocal of window (oy, ox)'s divisor (inf for a divisor of 0).
template <typename F>
F avg_reciprocal(const Dims& d, bool count_include_pad, int64_t oy, int64_t ox) {
  const int64_t count = jcn::pool::window_divisor<int64_t>(
      count_include_pad, oy * d.sh - d.pt, ox * d.sw - d.pl, d.wh, d.ww, d.H, d.W);
  return F(1) / F(count);
}

#if defined(__GNUC__) || defined(__clang__)
#define JCN_POOL_INLINE inline __attribute__((always_inline))
#else
#define JCN_POOL_INLINE inline
#endif

// acc[i] += p[i] * r for the first n lanes (the product rounded first: no FMA in this file).
template <int64_t N, typename T, typename F>
JCN_POOL_INLINE void add_scaled_lanes(F (&acc)[kAvgGradLanes], const T* __restrict p, F r,
                                     int64_t n) {
  const int64_t m = N > 0 ? N : n;
  for (int64_t i = 0; i < m; ++i) acc[i] += Num<T>::to_f(p[i]) * r;
}

// Forward of one window over lanes [0, n) of img / q (offset to the first lane), in row-major
// order; N > 0: n == N known at compile time, so the accumulators stay in registers (in memory,
// they would stall on stores whose addresses alias the images' modulo 4 KiB).
template <int64_t N, typename T>
JCN_POOL_INLINE void avg_window(const T* __restrict img, T* __restrict q, const Dims& d,
                               const Window& w, typename Num<T>::F rcp, int64_t n) {
  using F = typename Num<T>::F;
  const int64_t m = N > 0 ? N : n;
  F acc[kAvgLanes] = {};
  for (int64_t y = w.ys; y < w.ye; ++y) {
    const T* row = img + y * d.W * d.I;
    for (int64_t x = w.xs; x < w.xe; ++x) {
      const T* p = row + x * d.I;
#pragma GCC unroll 32
      for (int64_t i = 0; i < m; ++i) acc[i] += Num<T>::to_f(p[i]);
    }
  }
#pragma GCC unroll 32
  for (int64_t i = 0; i < m; ++i) q[i] = Num<T>::from_f(acc[i] * rcp);
}

// Forward of output row (o, oy), kAvgLanes lanes at a time.
template <typename T>
JCN_POOL_INLINE void avg_forward_row(const T* img, T* out, const Dims& d, bool count_include_pad,
                                    int64_t o, int64_t oy) {
  using F = typename Num<T>::F;
  const T* image = img + o * d.H * d.W * d.I;
  for (int64_t ox = 0; ox < d.Wo; ++ox) {
    const Window w = window_of(d, oy, ox);
    const F rcp = avg_reciprocal<F>(d, count_include_pad, oy, ox);
    T* q = out + ((o * d.Ho + oy) * d.Wo + ox) * d.I;
    int64_t i0 = 0;
    for (; i0 + kAvgLanes <= d.I; i0 += kAvgLanes)
      avg_window<kAvgLanes>(image + i0, q + i0, d, w, rcp, kAvgLanes);
    if (i0 < d.I) avg_window<0>(image + i0, q + i0, d, w, rcp, d.I - i0);
  }
}

// Gradient of image element (o, y, x), lanes [i0, i0 + n): the windows [oy_lo, oy_hi] x
// [ox_lo, ox_hi] containing it, in increasing (oy, ox); rcp[(oy - oy_lo) * Wo + ox].
template <int64_t N, typename T>
JCN_POOL_INLINE void avg_grad_element(const T* ct, T* q, const Dims& d, int64_t o, int64_t oy_lo,
                                     int64_t oy_hi, int64_t ox_lo, int64_t ox_hi,
                                     const typename Num<T>::F* rcp, int64_t i0, int64_t n) {
  using F = typename Num<T>::F;
  F acc[kAvgGradLanes] = {};
  for (int64_t oy = oy_lo; oy <= oy_hi; ++oy)
    for (int64_t ox = ox_lo; ox <= ox_hi; ++ox)
      add_scaled_lanes<N>(acc, ct + ((o * d.Ho + oy) * d.Wo + ox) * d.I + i0,
                          rcp[(oy - oy_lo) * d.Wo + ox], n);
  const int64_t m = N > 0 ? N : n;
  for (int64_t i = 0; i < m; ++i) q[i0 + i] = Num<T>::from_f(acc[i]);
}

// Gradient of image row (o, y), covered by windows [oy_lo, oy_hi]; column x by windows
// [ox_range[2x], ox_range[2x + 1]].
template <typename T>
JCN_POOL_INLINE void avg_grad_row(const T* ct, T* out, const Dims& d, int64_t o, int64_t y,
                                 int64_t oy_lo, int64_t oy_hi, const typename Num<T>::F* rcp,
                                 const int64_t* ox_range) {
  T* q = out + (o * d.H + y) * d.W * d.I;
  for (int64_t x = 0; x < d.W; ++x) {
    const int64_t ox_lo = ox_range[2 * x], ox_hi = ox_range[2 * x + 1];
    int64_t i0 = 0;
    for (; i0 + kAvgGradLanes <= d.I; i0 += kAvgGradLanes)
      avg_grad_element<kAvgGradLanes>(ct, q + x * d.I, d, o, oy_lo, oy_hi, ox_lo, ox_hi, rcp,
                                      i0, kAvgGradLanes);
    if (i0 < d.I)
      avg_grad_element<0>(ct, q + x * d.I, d, o, oy_lo, oy_hi, ox_lo, ox_hi, rcp, i0, d.I - i0);
  }
}

// max_pool's plain forward (no winners) of one window, lanes [0, n) of the pooled vector at q,
// in register-sized chunks like the average's: the same selection as pool_forward_winners
// (takes(), the selected element itself written), so the same bits. No unroll pragma: fully
// unrolled, the selects are not vectorised.
template <int64_t N, typename T>
JCN_POOL_INLINE void max_window(const T* __restrict img, T* __restrict q, const Dims& d,
                               const Window& w, int64_t n) {
  using F = typename Num<T>::F;
  const int64_t m = N > 0 ? N : n;
  F best[kAvgLanes];
  T sel[kAvgLanes];
  for (int64_t y = w.ys; y < w.ye; ++y) {
    const T* row = img + y * d.W * d.I;
    for (int64_t x = w.xs; x < w.xe; ++x) {
      const T* p = row + x * d.I;
      const bool first = y == w.ys && x == w.xs;
      for (int64_t i = 0; i < m; ++i) {
        const F v = Num<T>::to_f(p[i]);
        const bool take = jcn::pool::takes(first, v, best[i]);
        best[i] = take ? v : best[i];
        sel[i] = pick(take, p[i], sel[i]);
      }
    }
  }
  for (int64_t i = 0; i < m; ++i) q[i] = sel[i];
}

// max_pool's plain forward of output row (o, oy), kAvgLanes lanes at a time.
template <typename T>
JCN_POOL_INLINE void max_forward_row(const T* img, T* out, const Dims& d, int64_t o, int64_t oy) {
  const T* image = img + o * d.H * d.W * d.I;
  for (int64_t ox = 0; ox < d.Wo; ++ox) {
    const Window w = window_of(d, oy, ox);
    T* q = out + ((o * d.Ho + oy) * d.Wo + ox) * d.I;
    if (w.empty()) {
      for (int64_t i = 0; i < d.I; ++i) q[i] = Num<T>::neg_inf();
      continue;
    }
    int64_t i0 = 0;
    for (; i0 + kAvgLanes <= d.I; i0 += kAvgLanes)
      max_window<kAvgLanes>(image + i0, q + i0, d, w, kAvgLanes);
    if (i0 < d.I) max_window<0>(image + i0, q + i0, d, w, d.I - i0);
  }
}

// The row kernels compiled for one instruction set: wider vectors, the same arithmetic (and
// bits) on every ISA. Chosen per call by with_row_isa().
#define JCN_POOL_ISA(NAME, TARGET)                                                             \
  struct NAME {                                                                                \
    template <typename T>                                                                      \
    TARGET static void forward_row(const T* img, T* out, const Dims& d, bool include,          \
                                   int64_t o, int64_t oy) {                                    \
      avg_forward_row<T>(img, out, d, include, o, oy);                                         \
    }                                                                                          \
    template <typename T>                                                                      \
    TARGET static void grad_row(const T* ct, T* out, const Dims& d, int64_t o, int64_t y,      \
                                int64_t oy_lo, int64_t oy_hi, const typename Num<T>::F* rcp,   \
                                const int64_t* ox_range) {                                     \
      avg_grad_row<T>(ct, out, d, o, y, oy_lo, oy_hi, rcp, ox_range);                          \
    }                                                                                          \
    template <typename T>                                                                      \
    TARGET static void max_row(const T* img, T* out, const Dims& d, int64_t o, int64_t oy) {   \
      max_forward_row<T>(img, out, d, o, oy);                                                  \
    }                                                                                          \
  };
JCN_POOL_ISA(PoolRowsBaseline, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define JCN_POOL_X86 1
JCN_POOL_ISA(PoolRowsAvx2, __attribute__((target("avx2"))))
#endif
#undef JCN_POOL_ISA

// run(Isa{}) with the row kernels of the widest instruction set the CPU has and
// JAX_CONVNET_CPU_ISA allows (AVX2, else the baseline).
template <typename Run>
void with_row_isa(const Run& run) {
#ifdef JCN_POOL_X86
  static const bool avx2 = [] {
    const std::string& limit = jcn::cpu::isa_cap().limit;
    __builtin_cpu_init();
    return (limit.empty() || limit == "avx2" || limit == "avx512") &&
           __builtin_cpu_supports("avx2");
  }();
  if (avx2) return run(PoolRowsAvx2{});
#endif
  run(PoolRowsBaseline{});
}

template <typename T, typename Isa>
void max_pool_forward(const T* img, T* out, const Dims& d) {
  for_each_pooled_row(d, [&](int64_t o, int64_t oy) {
    Isa::template max_row<T>(img, out, d, o, oy);
  });
}

template <typename T, typename Isa>
void avg_pool_forward(const T* img, T* out, const Dims& d, bool count_include_pad) {
  for_each_pooled_row(d, [&](int64_t o, int64_t oy) {
    Isa::template forward_row<T>(img, out, d, count_include_pad, o, oy);
  });
}

// Gradient, gathered per image row (o, y): the reciprocals of the windows covering row y first,
// then each element of the row from the windows that contain it.
template <typename T, typename Isa>
void avg_pool_grad(const T* ct, T* out, const Dims& d, bool count_include_pad) {
  using F = typename Num<T>::F;
  const int64_t rows = d.O * d.H;
  const int64_t covering_rows = (std::min(d.wh, d.H) + d.sh - 1) / d.sh + 1;
  const int64_t covering_cols = (std::min(d.ww, d.W) + d.sw - 1) / d.sw + 1;
  parallel_for(rows, d.W * d.I * covering_rows * covering_cols, [&](int64_t begin, int64_t end) {
    // at most ceil(wh / sh) windows cover a row (with padding= a window may exceed the image)
    std::vector<F> rcp(size_t(std::min(d.Ho, (d.wh + d.sh - 1) / d.sh) * d.Wo));
    // the windows covering each column, the same in every row
    std::vector<int64_t> ox_range(size_t(2 * d.W));
    for (int64_t x = 0; x < d.W; ++x)
      jcn::pool::covering_windows<int64_t>(x, x, d.pl, d.ww, d.sw, d.Wo, &ox_range[size_t(2 * x)],
                                           &ox_range[size_t(2 * x + 1)]);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / d.H, y = r % d.H;
      int64_t oy_lo, oy_hi;
      jcn::pool::covering_windows<int64_t>(y, y, d.pt, d.wh, d.sh, d.Ho, &oy_lo, &oy_hi);
      for (int64_t oy = oy_lo; oy <= oy_hi; ++oy)
        for (int64_t ox = 0; ox < d.Wo; ++ox)
          rcp[size_t((oy - oy_lo) * d.Wo + ox)] =
              avg_reciprocal<F>(d, count_include_pad, oy, ox);
      Isa::template grad_row<T>(ct, out, d, o, y, oy_lo, oy_hi, rcp.data(), ox_range.data());
    }
  });
}

// ----------------------------------------------------------------------------------------------
// Handlers.

constexpr bool kAllowF64 = true;  // float64 too on the CPU

// Calls fn(T{}) with the storage type of `t`.
template <typename Fn>
ffi::Error with_type(ffi::DataType t, const Fn& fn) {
  switch (t) {
    case ffi::DataType::F32:
      fn(float{});
      break;
    case ffi::DataType::F64:
      fn(double{});
      break;
    case ffi::DataType::BF16:
      fn(Bf16{});
      break;
    case ffi::DataType::F16:
      fn(F16{});
      break;
    default:
      return ffi::Error::InvalidArgument("jax_convnet max_pool: unsupported dtype");
  }
  return ffi::Error::Success();
}

// Calls fn(T{}, K{}) with the storage type of `t` and the winners' type K of the geometry.
template <typename Fn>
ffi::Error with_types(ffi::DataType t, const jcn::PoolGeometry& g, const Fn& fn) {
  const bool narrow = jcn::pool::winner_bytes(g) == 1;
  return with_type(t, [&](auto zero) {
    if (narrow)
      fn(zero, uint8_t{});
    else
      fn(zero, int32_t{});
  });
}

ffi::Error MaxPoolImpl(ffi::AnyBuffer images, ffi::Result<ffi::AnyBuffer> pooled,
                       jcn::PoolParams p) {
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_pool_call("max_pool", p, images, *pooled, kAllowF64, &g);
  if (checked.failure()) return checked;
  return with_type(images.element_type(), [&](auto zero) {
    using T = decltype(zero);
    with_row_isa([&](auto isa) {
      max_pool_forward<T, decltype(isa)>(static_cast<const T*>(images.untyped_data()),
                                         static_cast<T*>(pooled->untyped_data()), dims_of(g));
    });
  });
}

ffi::Error MaxPoolWinnersImpl(ffi::AnyBuffer images, ffi::Result<ffi::AnyBuffer> pooled,
                              ffi::Result<ffi::AnyBuffer> winners, jcn::PoolParams p) {
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_pool_winners_call("max_pool_winners", p, images, *pooled,
                                                    *winners, kAllowF64, &g);
  if (checked.failure()) return checked;
  return with_types(images.element_type(), g, [&](auto zero, auto kzero) {
    using T = decltype(zero);
    using K = decltype(kzero);
    pool_forward_winners<T, K>(static_cast<const T*>(images.untyped_data()),
                               static_cast<T*>(pooled->untyped_data()),
                               static_cast<K*>(winners->untyped_data()), dims_of(g));
  });
}

ffi::Error MaxPoolJvpImpl(ffi::AnyBuffer tangents, ffi::AnyBuffer winners,
                          ffi::Result<ffi::AnyBuffer> pooled_tangents, jcn::PoolParams p) {
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_pool_winners_call("max_pool_jvp", p, tangents,
                                                    *pooled_tangents, winners, kAllowF64, &g);
  if (checked.failure()) return checked;
  return with_types(tangents.element_type(), g, [&](auto zero, auto kzero) {
    using T = decltype(zero);
    using K = decltype(kzero);
    pool_jvp<T, K>(static_cast<const T*>(tangents.untyped_data()),
                   static_cast<const K*>(winners.untyped_data()),
                   static_cast<T*>(pooled_tangents->untyped_data()), dims_of(g));
  });
}

ffi::Error MaxPoolGradImpl(ffi::AnyBuffer cotangents, ffi::AnyBuffer winners,
                           ffi::Result<ffi::AnyBuffer> image_cotangents, jcn::PoolParams p) {
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_pool_winners_call("max_pool_grad", p, *image_cotangents,
                                                    cotangents, winners, kAllowF64, &g);
  if (checked.failure()) return checked;
  return with_types(cotangents.element_type(), g, [&](auto zero, auto kzero) {
    using T = decltype(zero);
    using K = decltype(kzero);
    pool_grad<T, K>(static_cast<const T*>(cotangents.untyped_data()),
                    static_cast<const K*>(winners.untyped_data()),
                    static_cast<T*>(image_cotangents->untyped_data()), dims_of(g));
  });
}

// Average pooling's forward (grad = false: images in, pooled out) or gradient (cotangents in,
// image cotangents out), on the AVX2 row kernels where they run.
ffi::Error run_avg_pool(bool grad, const jcn::PoolGeometry& g, bool count_include_pad,
                        const ffi::AnyBuffer& in, ffi::AnyBuffer& out) {
  return with_type(in.element_type(), [&](auto zero) {
    using T = decltype(zero);
    const T* src = static_cast<const T*>(in.untyped_data());
    T* dst = static_cast<T*>(out.untyped_data());
    with_row_isa([&](auto isa) {
      using Isa = decltype(isa);
      if (grad)
        avg_pool_grad<T, Isa>(src, dst, dims_of(g), count_include_pad);
      else
        avg_pool_forward<T, Isa>(src, dst, dims_of(g), count_include_pad);
    });
  });
}

ffi::Error AvgPoolImpl(ffi::AnyBuffer images, ffi::Result<ffi::AnyBuffer> pooled,
                       jcn::AvgPoolParams p) {
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_avg_pool_call("avg_pool", p, images, *pooled, kAllowF64, &g);
  if (checked.failure()) return checked;
  return run_avg_pool(false, g, p.count_include_pad == 1, images, *pooled);
}

ffi::Error AvgPoolGradImpl(ffi::AnyBuffer cotangents,
                           ffi::Result<ffi::AnyBuffer> image_cotangents, jcn::AvgPoolParams p) {
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_avg_pool_call("avg_pool_grad", p, *image_cotangents,
                                                cotangents, kAllowF64, &g);
  if (checked.failure()) return checked;
  return run_avg_pool(true, g, p.count_include_pad == 1, cotangents, *image_cotangents);
}

}  // namespace

// Bindings from the signatures above (csrc/common/ffi_common.h).
XLA_FFI_DEFINE_HANDLER_SYMBOL(AvgPoolCpu, AvgPoolImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AvgPoolGradCpu, AvgPoolGradImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolCpu, MaxPoolImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolWinnersCpu, MaxPoolWinnersImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolJvpCpu, MaxPoolJvpImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolGradCpu, MaxPoolGradImpl);
