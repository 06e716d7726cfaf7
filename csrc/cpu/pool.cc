// Max pooling on the CPU: max_pool, its JVP and its gradient (see csrc/README.md, "Max pool").
//
// Both layouts are handled as one memory pattern [outer][H][W][inner] (C01B: outer = C,
// inner = B; NHWC: outer = B, inner = C); every inner loop runs over the contiguous `inner`
// dimension. Work is split over std::threads in disjoint slices of output rows (forward, JVP)
// or image rows (gradient), so every output element is written by exactly one thread.
//
// Results are bit-identical to the CUDA kernels (csrc/cuda/pool.cu):
// - forward / JVP copy the selected element (image / tangent) unchanged;
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
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "ffi_common.h"
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
template <>
struct Num<float> {
  using F = float;
  static F to_f(float v) { return v; }
  static float from_f(F v) { return v; }
  static float neg_inf() { return -std::numeric_limits<float>::infinity(); }
  static float zero() { return 0.0f; }
};
template <>
struct Num<double> {
  using F = double;
  static F to_f(double v) { return v; }
  static double from_f(F v) { return v; }
  static double neg_inf() { return -std::numeric_limits<double>::infinity(); }
  static double zero() { return 0.0; }
};
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

// Selection of a non-empty window of slice o for all I lanes: sel[i] = row-major index k of the
// selected element of lane i within the clipped window. Branch-free inner loop (vectorisable).
// K: int32_t, or int64_t for windows of more than 2^31 - 1 elements.
template <typename T, typename K>
void select_window(const T* img, const Dims& d, int64_t o, const Window& w,
                   typename Num<T>::F* best, K* sel) {
  using F = typename Num<T>::F;
  K k = 0;
  for (int64_t y = w.ys; y < w.ye; ++y) {
    for (int64_t x = w.xs; x < w.xe; ++x, ++k) {
      const T* p = img + ((o * d.H + y) * d.W + x) * d.I;
      if (k == 0) {
        for (int64_t i = 0; i < d.I; ++i) {
          best[i] = Num<T>::to_f(p[i]);
          sel[i] = 0;
        }
        continue;
      }
      for (int64_t i = 0; i < d.I; ++i) {
        const F v = Num<T>::to_f(p[i]);
        const F b = best[i];
        const bool take = jcn::pool::takes(false, v, b);
        best[i] = take ? v : b;
        sel[i] = take ? k : sel[i];
      }
    }
  }
}

// One element of a window for all n lanes: take it where it beats the best so far (or is the
// first), carrying its src value along. Separate function so that `restrict` holds (compilers
// ignore it on locals): q and best are both float for float32 and could otherwise alias.
template <typename T>
void scan_element(const T* __restrict p, const T* __restrict src,
                  typename Num<T>::F* __restrict best, T* __restrict q, int64_t n, bool first) {
  using F = typename Num<T>::F;
  if (first) {
    for (int64_t i = 0; i < n; ++i) {
      best[i] = Num<T>::to_f(p[i]);
      q[i] = src[i];
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const F v = Num<T>::to_f(p[i]);
    const T candidate = src[i];  // loaded unconditionally: a conditional load blocks vectorising
    const bool take = jcn::pool::takes(false, v, best[i]);
    best[i] = take ? v : best[i];
    q[i] = pick(take, candidate, q[i]);
  }
}

// Forward (src = images, empty = -inf) or JVP (src = tangents, empty = 0):
// out[o][oy][ox][i] = src[selected element of lane i]. The selected src value is carried along the
// scan (a select per lane, vectorisable) and written straight to the output: no index, no gather.
template <typename T>
void pool_forward(const T* img, const T* src, T* out, const Dims& d, T empty) {
  using F = typename Num<T>::F;
  const int64_t rows = d.O * d.Ho;
  const int64_t cost =
      d.Wo * d.I * std::max<int64_t>(1, std::min(d.wh, d.H) * std::min(d.ww, d.W));
  parallel_for(rows, cost, [&](int64_t begin, int64_t end) {
    std::vector<F> best(size_t(d.I));
    F* b = best.data();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / d.Ho, oy = r % d.Ho;
      for (int64_t ox = 0; ox < d.Wo; ++ox) {
        T* q = out + ((o * d.Ho + oy) * d.Wo + ox) * d.I;
        const Window w = window_of(d, oy, ox);
        if (w.empty()) {
          for (int64_t i = 0; i < d.I; ++i) q[i] = empty;
          continue;
        }
        for (int64_t y = w.ys; y < w.ye; ++y) {
          for (int64_t x = w.xs; x < w.xe; ++x) {
            const int64_t at = ((o * d.H + y) * d.W + x) * d.I;
            scan_element(img + at, src + at, b, q, d.I, y == w.ys && x == w.xs);
          }
        }
      }
    }
  });
}

// Gradient, gathered per image row (o, y): the windows covering row y are visited in increasing
// (oy, ox); a window adds its cotangent to the element of row y it selected. Each element thus
// sums its windows in increasing (oy, ox) order, starting from 0, as the CUDA kernel does.
template <typename T, typename K>
void pool_grad(const T* img, const T* ct, T* out, const Dims& d) {
  using F = typename Num<T>::F;
  const int64_t rows = d.O * d.H;
  const int64_t cost =
      d.W * d.I * std::max<int64_t>(1, std::min(d.wh, d.H) * std::min(d.ww, d.W));
  parallel_for(rows, cost, [&](int64_t begin, int64_t end) {
    std::vector<F> best(size_t(d.I));
    std::vector<K> sel(size_t(d.I));
    std::vector<F> acc(size_t(d.W * d.I));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / d.H, y = r % d.H;
      std::fill(acc.begin(), acc.end(), F(0));
      int64_t oy_lo, oy_hi, ox_lo, ox_hi;
      jcn::pool::covering_windows<int64_t>(y, y, d.pt, d.wh, d.sh, d.Ho, &oy_lo, &oy_hi);
      jcn::pool::covering_windows<int64_t>(0, d.W - 1, d.pl, d.ww, d.sw, d.Wo, &ox_lo, &ox_hi);
      for (int64_t oy = oy_lo; oy <= oy_hi; ++oy) {
        for (int64_t ox = ox_lo; ox <= ox_hi; ++ox) {
          const Window w = window_of(d, oy, ox);
          if (w.empty()) continue;
          select_window(img, d, o, w, best.data(), sel.data());
          const T* c = ct + ((o * d.Ho + oy) * d.Wo + ox) * d.I;
          const int64_t nx = w.xe - w.xs;
          const int64_t k_lo = (y - w.ys) * nx;  // selections in row y: k in [k_lo, k_lo + nx)
          for (int64_t i = 0; i < d.I; ++i) {
            const int64_t dk = sel[i] - k_lo;
            if (dk >= 0 && dk < nx) acc[size_t((w.xs + dk) * d.I + i)] += Num<T>::to_f(c[i]);
          }
        }
      }
      T* q = out + (o * d.H + y) * d.W * d.I;
      for (int64_t k = 0; k < d.W * d.I; ++k) q[k] = Num<T>::from_f(acc[size_t(k)]);
    }
  });
}

// ----------------------------------------------------------------------------------------------
// Handlers.

bool same_dims(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b) {
  return a.dimensions() == b.dimensions();
}

enum class Op { kForward, kJvp, kGrad };

constexpr bool kAllowF64 = true;  // float64 too on the CPU

template <typename T>
void run_typed(Op op, const Dims& d, const void* img, const void* second, void* out) {
  const T* x = static_cast<const T*>(img);
  const T* s = static_cast<const T*>(second);
  T* y = static_cast<T*>(out);
  switch (op) {
    case Op::kForward:
      pool_forward<T>(x, x, y, d, Num<T>::neg_inf());
      break;
    case Op::kJvp:
      pool_forward<T>(x, s, y, d, Num<T>::zero());
      break;
    case Op::kGrad: {
      // The gradient numbers window elements with int32 unless a clipped window can hold more.
      const int64_t max_window = std::min(d.wh, d.H) * std::min(d.ww, d.W);
      if (max_window <= int64_t(INT32_MAX))
        pool_grad<T, int32_t>(x, s, y, d);
      else
        pool_grad<T, int64_t>(x, s, y, d);
      break;
    }
  }
}

ffi::Error run(Op op, ffi::DataType t, const jcn::PoolGeometry& g, const void* img,
               const void* second, void* out) {
  const Dims d = dims_of(g);
  switch (t) {
    case ffi::DataType::F32:
      run_typed<float>(op, d, img, second, out);
      break;
    case ffi::DataType::F64:
      run_typed<double>(op, d, img, second, out);
      break;
    case ffi::DataType::BF16:
      run_typed<Bf16>(op, d, img, second, out);
      break;
    case ffi::DataType::F16:
      run_typed<F16>(op, d, img, second, out);
      break;
    default:
      return ffi::Error::InvalidArgument("jax_convnet max_pool: unsupported dtype");
  }
  return ffi::Error::Success();
}

ffi::Error MaxPoolImpl(ffi::AnyBuffer images, ffi::Result<ffi::AnyBuffer> pooled,
                       jcn::PoolParams p) {
  const char* op = "max_pool";
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_pool_call(op, p, images, *pooled, kAllowF64, &g);
  if (checked.failure()) return checked;
  return run(Op::kForward, images.element_type(), g, images.untyped_data(), nullptr,
             pooled->untyped_data());
}

ffi::Error MaxPoolJvpImpl(ffi::AnyBuffer images, ffi::AnyBuffer tangents,
                          ffi::Result<ffi::AnyBuffer> pooled_tangents, jcn::PoolParams p) {
  const char* op = "max_pool_jvp";
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_pool_call(op, p, images, *pooled_tangents, kAllowF64, &g);
  if (checked.failure()) return checked;
  if (tangents.element_type() != images.element_type())
    return jcn::invalid(op, "operands and result must share one dtype");
  if (!same_dims(tangents, images))
    return jcn::invalid(op, "tangents' shape differs from the images'");
  return run(Op::kJvp, images.element_type(), g, images.untyped_data(), tangents.untyped_data(),
             pooled_tangents->untyped_data());
}

ffi::Error MaxPoolGradImpl(ffi::AnyBuffer images, ffi::AnyBuffer cotangents,
                           ffi::Result<ffi::AnyBuffer> image_cotangents, jcn::PoolParams p) {
  const char* op = "max_pool_grad";
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_pool_call(op, p, images, cotangents, kAllowF64, &g);
  if (checked.failure()) return checked;
  if (image_cotangents->element_type() != images.element_type())
    return jcn::invalid(op, "operands and result must share one dtype");
  if (!same_dims(*image_cotangents, images))
    return jcn::invalid(op, "image cotangents' shape differs from the images'");
  return run(Op::kGrad, images.element_type(), g, images.untyped_data(), cotangents.untyped_data(),
             image_cotangents->untyped_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolCpu, MaxPoolImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attrs<jax_convnet::PoolParams>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolJvpCpu, MaxPoolJvpImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attrs<jax_convnet::PoolParams>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolGradCpu, MaxPoolGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attrs<jax_convnet::PoolParams>());
