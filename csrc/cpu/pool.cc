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

// IEEE binary16 -> binary32, exact (subnormals included).
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24 (exact in float32)
    float v = float(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
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
// Threads over disjoint slices [begin, end) of `units` work units.

template <typename Fn>
void parallel_for(int64_t units, int64_t cost_per_unit, const Fn& fn) {
  const int64_t kMinCostPerThread = int64_t(1) << 16;
  int64_t hw = int64_t(std::thread::hardware_concurrency());
  if (hw < 1) hw = 1;
  int64_t by_cost = (units * std::max<int64_t>(cost_per_unit, 1)) / kMinCostPerThread;
  int64_t n = std::min({hw, units, std::max<int64_t>(by_cost, 1)});
  if (n <= 1) {
    fn(int64_t(0), units);
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(size_t(n));
  int64_t done_upto = 0;  // slices [0, done_upto) are owned by started threads
  for (int64_t k = 0; k < n; ++k) {
    int64_t b = units * k / n, e = units * (k + 1) / n;
    try {
      threads.emplace_back([&fn, b, e]() { fn(b, e); });
      done_upto = e;
    } catch (...) {
      break;  // could not start a thread: run the rest here
    }
  }
  if (done_upto < units) fn(done_upto, units);
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

// Selection of window (oy, ox) of slice o for all I lanes: sel[i] = flat image offset of the
// selected element of lane i. Returns false for an empty window.
template <typename T>
bool select_window(const T* img, const Dims& d, int64_t o, int64_t oy, int64_t ox,
                   typename Num<T>::F* best, int64_t* sel) {
  using F = typename Num<T>::F;
  const int64_t y0 = oy * d.sh - d.pt, x0 = ox * d.sw - d.pl;
  const int64_t ys = std::max<int64_t>(y0, 0), ye = std::min<int64_t>(y0 + d.wh, d.H);
  const int64_t xs = std::max<int64_t>(x0, 0), xe = std::min<int64_t>(x0 + d.ww, d.W);
  if (ys >= ye || xs >= xe) return false;
  bool first = true;
  for (int64_t y = ys; y < ye; ++y) {
    for (int64_t x = xs; x < xe; ++x) {
      const int64_t off = ((o * d.H + y) * d.W + x) * d.I;
      const T* p = img + off;
      if (first) {
        for (int64_t i = 0; i < d.I; ++i) {
          best[i] = Num<T>::to_f(p[i]);
          sel[i] = off + i;
        }
        first = false;
        continue;
      }
      for (int64_t i = 0; i < d.I; ++i) {
        F v = Num<T>::to_f(p[i]);
        if (jcn::pool::takes(false, v, best[i])) {
          best[i] = v;
          sel[i] = off + i;
        }
      }
    }
  }
  return true;
}

// Forward (src = images, empty = -inf) or JVP (src = tangents, empty = 0):
// out[o][oy][ox][i] = src[selected element of lane i].
template <typename T>
void pool_forward(const T* img, const T* src, T* out, const Dims& d, T empty) {
  using F = typename Num<T>::F;
  const int64_t rows = d.O * d.Ho;
  const int64_t cost = d.Wo * d.I * std::max<int64_t>(1, std::min(d.wh, d.H) * std::min(d.ww, d.W));
  parallel_for(rows, cost, [&](int64_t begin, int64_t end) {
    std::vector<F> best(size_t(d.I));
    std::vector<int64_t> sel(size_t(d.I));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / d.Ho, oy = r % d.Ho;
      for (int64_t ox = 0; ox < d.Wo; ++ox) {
        T* q = out + ((o * d.Ho + oy) * d.Wo + ox) * d.I;
        if (select_window(img, d, o, oy, ox, best.data(), sel.data())) {
          for (int64_t i = 0; i < d.I; ++i) q[i] = src[sel[i]];
        } else {
          for (int64_t i = 0; i < d.I; ++i) q[i] = empty;
        }
      }
    }
  });
}

// Gradient, gathered per image row (o, y): the windows covering row y are visited in increasing
// (oy, ox); a window adds its cotangent to the element of row y it selected. Each element thus
// sums its windows in increasing (oy, ox) order, starting from 0, as the CUDA kernel does.
template <typename T>
void pool_grad(const T* img, const T* ct, T* out, const Dims& d) {
  using F = typename Num<T>::F;
  const int64_t rows = d.O * d.H;
  const int64_t cost = d.W * d.I * std::max<int64_t>(1, std::min(d.wh, d.H) * std::min(d.ww, d.W));
  parallel_for(rows, cost, [&](int64_t begin, int64_t end) {
    std::vector<F> best(size_t(d.I));
    std::vector<int64_t> sel(size_t(d.I));
    std::vector<F> acc(size_t(d.W * d.I));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / d.H, y = r % d.H;
      std::fill(acc.begin(), acc.end(), F(0));
      int64_t oy_lo, oy_hi, ox_lo, ox_hi;
      jcn::pool::covering_windows<int64_t>(y, y, d.pt, d.wh, d.sh, d.Ho, &oy_lo, &oy_hi);
      jcn::pool::covering_windows<int64_t>(0, d.W - 1, d.pl, d.ww, d.sw, d.Wo, &ox_lo, &ox_hi);
      const int64_t row_off = (o * d.H + y) * d.W * d.I;  // offset of (o, y, 0, 0)
      for (int64_t oy = oy_lo; oy <= oy_hi; ++oy) {
        for (int64_t ox = ox_lo; ox <= ox_hi; ++ox) {
          if (!select_window(img, d, o, oy, ox, best.data(), sel.data())) continue;
          const T* c = ct + ((o * d.Ho + oy) * d.Wo + ox) * d.I;
          for (int64_t i = 0; i < d.I; ++i) {
            const int64_t k = sel[i] - row_off;  // = x * I + i when the selection is in row y
            if (k >= 0 && k < d.W * d.I) acc[size_t(k)] += Num<T>::to_f(c[i]);
          }
        }
      }
      T* q = out + row_off;
      for (int64_t k = 0; k < d.W * d.I; ++k) q[k] = Num<T>::from_f(acc[size_t(k)]);
    }
  });
}

// ----------------------------------------------------------------------------------------------
// Handlers.

bool same_dims(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b) {
  return a.dimensions() == b.dimensions();
}

// Checks shared by the three handlers; `pooled` is the buffer whose dims give the output size.
ffi::Error check_pool_call(const char* op, const jcn::PoolParams& p, const ffi::AnyBuffer& images,
                           const ffi::AnyBuffer& pooled, jcn::PoolGeometry* g) {
  if (!jcn::is_rank4(images) || !jcn::is_rank4(pooled))
    return jcn::invalid(op, "operands and result must be rank 4");
  if (!jcn::supported_dtype(images.element_type(), /*allow_f64=*/true))
    return jcn::invalid(op, "dtype must be float32, bfloat16, float16 or float64");
  if (pooled.element_type() != images.element_type())
    return jcn::invalid(op, "operands and result must share one dtype");
  std::string e = jcn::make_pool_geometry(p, images.dimensions().begin(),
                                          pooled.dimensions().begin(), g);
  if (e.empty()) e = jcn::pool::check_pool_extent(*g);
  if (!e.empty()) return jcn::invalid(op, e);
  return ffi::Error::Success();
}

enum class Op { kForward, kJvp, kGrad };

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
    case Op::kGrad:
      pool_grad<T>(x, s, y, d);
      break;
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
  if (ffi::Error e = check_pool_call(op, p, images, *pooled, &g); e.failure()) return e;
  return run(Op::kForward, images.element_type(), g, images.untyped_data(), nullptr,
             pooled->untyped_data());
}

ffi::Error MaxPoolJvpImpl(ffi::AnyBuffer images, ffi::AnyBuffer tangents,
                          ffi::Result<ffi::AnyBuffer> pooled_tangents, jcn::PoolParams p) {
  const char* op = "max_pool_jvp";
  jcn::PoolGeometry g;
  if (ffi::Error e = check_pool_call(op, p, images, *pooled_tangents, &g); e.failure()) return e;
  if (tangents.element_type() != images.element_type())
    return jcn::invalid(op, "operands and result must share one dtype");
  if (!same_dims(tangents, images)) return jcn::invalid(op, "tangents' shape differs from the images'");
  return run(Op::kJvp, images.element_type(), g, images.untyped_data(), tangents.untyped_data(),
             pooled_tangents->untyped_data());
}

ffi::Error MaxPoolGradImpl(ffi::AnyBuffer images, ffi::AnyBuffer cotangents,
                           ffi::Result<ffi::AnyBuffer> image_cotangents, jcn::PoolParams p) {
  const char* op = "max_pool_grad";
  jcn::PoolGeometry g;
  if (ffi::Error e = check_pool_call(op, p, images, cotangents, &g); e.failure()) return e;
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
