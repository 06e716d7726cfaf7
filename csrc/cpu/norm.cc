// Response norms on the CPU: the forward (with or without the denominators), the JVP and the
// gradient of cross_map_norm / response_norm (csrc/common/norm_checks.h has the memory view
// [O][A1][A2][I] and the window rule; csrc/README.md, "Response norms", the contract).
//
// All four are one pattern: out = combine(inputs, S), S the window sum of an elementwise v:
//   forward:  v = x^2,               d = min_div + a S,   y = x d^-p
//   JVP:      v = x t,               out = t d^-p - 2ap x d^(-p-1) S
//   gradient: v = c x d^(-p-1),      out = c d^-p - 2ap x S   (S over the transposed windows)
// A task owns one o and a chunk of up to kChunk lanes of I; it walks the rows a1 in increasing
// order, computing each row of v once into a ring of min(size, A1) rows (the windows' begin and
// end never decrease with a1), and sums each output's window from the ring in the fixed order of
// norm_checks.h: the result does not depend on the number of threads. Compute in float32
// (float64 for float64); 16-bit values are rounded once, to nearest even.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "conv_numeric.h"
#include "conv_thread_pool.h"
#include "ffi_common.h"
#include "norm_checks.h"
#include "targets.h"

namespace ffi = xla::ffi;

namespace {

namespace jcn = jax_convnet;
using jcn::cpu::ThreadPool;

struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

template <typename T>
struct Num {  // float, double
  using F = T;
  static F load(T v) { return v; }
  static T store(F v) { return v; }
};
template <>
struct Num<Bf16> {
  using F = float;
  static F load(Bf16 v) { return jcn::cpu::bf16_to_float(v.bits); }
  static Bf16 store(F v) { return Bf16{jcn::cpu::float_to_bf16(v)}; }
};
template <>
struct Num<F16> {
  using F = float;
  static F load(F16 v) { return jcn::cpu::f16_to_float(v.bits); }
  static F16 store(F v) { return F16{jcn::cpu::float_to_f16(v)}; }
};

enum class Op { kForward, kForwardResidual, kJvp, kGrad };

// T: operands' storage, R: the denominators' storage.
template <typename T, typename R>
struct Buffers {
  const T* x;   // x
  const T* v;   // t (JVP) / c (gradient)
  const R* d;   // denominators (JVP, gradient)
  T* out;       // y / JVP / gradient
  R* d_out;     // denominators (forward with residual)
};

constexpr int64_t kChunk = 256;                     // lanes of I per task (at most)
constexpr int64_t kRingFloats = int64_t(1) << 16;   // ring budget in compute values
constexpr int64_t kTaskCost = int64_t(1) << 15;     // elements x window per task, roughly

// out[i] = d[i]^-p for the n values of d (> 0). The common powers take sqrt and division, which
// vectorise (std::pow does not); any other p takes std::pow.
template <typename F>
void neg_pow(const F* __restrict d, F* __restrict out, int64_t n, F p) {
  if (p == F(0.75)) {
    for (int64_t i = 0; i < n; ++i) {
      const F r = std::sqrt(d[i]);
      out[i] = F(1) / (r * std::sqrt(r));
    }
  } else if (p == F(0.5)) {
    for (int64_t i = 0; i < n; ++i) out[i] = F(1) / std::sqrt(d[i]);
  } else if (p == F(1)) {
    for (int64_t i = 0; i < n; ++i) out[i] = F(1) / d[i];
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = std::pow(d[i], -p);
  }
}

template <typename T, typename F>
void load(const T* __restrict src, F* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Num<T>::load(src[i]);
}

// The elementwise parts of one op on runs of n consecutive elements, with scratch for n values.
template <Op kOp, typename T, typename R>
struct Elementwise {
  using F = typename Num<T>::F;
  const Buffers<T, R>& b;
  F a, p, k, two_ap;
  F* x;  // scratch, n values each
  F* w;
  F* d;
  F* e;

  // q[i] = v of element at + i.
  void v(int64_t at, int64_t n, F* __restrict q) {
    load(b.x + at, x, n);
    if constexpr (kOp == Op::kForward || kOp == Op::kForwardResidual) {
      for (int64_t i = 0; i < n; ++i) q[i] = x[i] * x[i];
    } else if constexpr (kOp == Op::kJvp) {
      load(b.v + at, w, n);
      for (int64_t i = 0; i < n; ++i) q[i] = x[i] * w[i];
    } else {
      load(b.v + at, w, n);
      load(b.d + at, d, n);
      neg_pow(d, e, n, p);
      for (int64_t i = 0; i < n; ++i) q[i] = w[i] * x[i] * (e[i] / d[i]);
    }
  }

  // The outputs of elements at + i from their window sums s[i].
  void combine(int64_t at, int64_t n, const F* __restrict s) {
    load(b.x + at, x, n);
    if constexpr (kOp == Op::kForward || kOp == Op::kForwardResidual) {
      for (int64_t i = 0; i < n; ++i) d[i] = k + a * s[i];
      neg_pow(d, e, n, p);
      for (int64_t i = 0; i < n; ++i) b.out[at + i] = Num<T>::store(x[i] * e[i]);
      if constexpr (kOp == Op::kForwardResidual)
        for (int64_t i = 0; i < n; ++i) b.d_out[at + i] = Num<R>::store(d[i]);
    } else {
      load(b.v + at, w, n);
      load(b.d + at, d, n);
      neg_pow(d, e, n, p);
      if constexpr (kOp == Op::kJvp)
        for (int64_t i = 0; i < n; ++i)
          b.out[at + i] = Num<T>::store(w[i] * e[i] - two_ap * x[i] * (e[i] / d[i]) * s[i]);
      else
        for (int64_t i = 0; i < n; ++i)
          b.out[at + i] = Num<T>::store(w[i] * e[i] - two_ap * x[i] * s[i]);
    }
  }
};

template <Op kOp, typename T, typename R>
bool run(const Buffers<T, R>& b, const jcn::NormDims& d, double add_scale, double pow_scale,
         double min_div) {
  using F = typename Num<T>::F;
  using FR = typename Num<R>::F;
  static_assert(std::is_same_v<F, FR>, "one compute type");
  const bool transposed = kOp == Op::kGrad;
  const int64_t size = d.size;
  const int64_t lo = jcn::norm::lo_of(size, transposed);
  const bool blocked = d.blocked;
  const F a = F(add_scale), p = F(pow_scale), k = F(min_div);
  const F two_ap = F(2) * a * p;
  const int64_t row = d.A2 * d.I;  // elements between consecutive a1

  if (d.I == 1 && d.A2 == 1) {
    // The window axis is the contiguous one (cross-map NHWC): a task takes whole runs of A1.
    const int64_t unit_cost = d.A1 * std::min(size, d.A1);
    const int64_t per_task = std::max<int64_t>(1, kTaskCost / std::max<int64_t>(1, unit_cost));
    const int64_t n_tasks = (d.O + per_task - 1) / per_task;
    return ThreadPool::shared().run(n_tasks, [&](int64_t task, int) {
      std::vector<F> scratch(size_t(6 * d.A1));
      F* v = scratch.data();
      F* sum = v + d.A1;
      Elementwise<kOp, T, R> ew{b, a, p, k, two_ap, sum + d.A1, sum + 2 * d.A1, sum + 3 * d.A1,
                                sum + 4 * d.A1};
      const int64_t o_end = std::min(d.O, (task + 1) * per_task);
      for (int64_t o = task * per_task; o < o_end; ++o) {
        const int64_t base = o * d.A1;
        ew.v(base, d.A1, v);
        for (int64_t a1 = 0; a1 < d.A1; ++a1) {
          int64_t gb, ge;
          jcn::norm::window<int64_t>(a1, d.A1, size, lo, blocked, &gb, &ge);
          F s = F(0);
          for (int64_t g = gb; g < ge; ++g) s += v[g];
          sum[a1] = s;
        }
        ew.combine(base, d.A1, sum);
      }
    });
  }

  // Otherwise lanes along I: a task owns one o and a chunk of lanes, walking a1 upwards.
  const int64_t lo2 = d.same_map ? lo : 0, size2 = d.same_map ? size : 1;
  const int64_t ring_rows = std::min(size, d.A1);
  int64_t chunk = std::min(d.I, kChunk);
  chunk = std::max<int64_t>(
      1, std::min(chunk, kRingFloats / std::max<int64_t>(1, ring_rows * d.A2)));
  const int64_t n_chunks = (d.I + chunk - 1) / chunk;
  const int64_t units = d.O * n_chunks;
  const int64_t unit_cost = d.A1 * d.A2 * chunk * std::min(size, d.A1) *
                            (d.same_map ? std::min(size, d.A2) : 1);
  const int64_t per_task = std::max<int64_t>(1, kTaskCost / std::max<int64_t>(1, unit_cost));
  const int64_t n_tasks = (units + per_task - 1) / per_task;

  return ThreadPool::shared().run(n_tasks, [&](int64_t task, int) {
    std::vector<F> ring(size_t(ring_rows * d.A2 * chunk));
    std::vector<F> sum(size_t(d.A2 * chunk));
    std::vector<F> scratch(size_t(4 * chunk));
    Elementwise<kOp, T, R> ew{b, a, p, k, two_ap, scratch.data(), scratch.data() + chunk,
                              scratch.data() + 2 * chunk, scratch.data() + 3 * chunk};
    const int64_t u_end = std::min(units, (task + 1) * per_task);
    for (int64_t u = task * per_task; u < u_end; ++u) {
      const int64_t o = u / n_chunks, i0 = (u % n_chunks) * chunk;
      const int64_t n = std::min(chunk, d.I - i0);
      const int64_t base = o * d.A1 * row + i0;
      int64_t next_row = 0;  // rows [0, next_row) of v have been computed
      for (int64_t a1 = 0; a1 < d.A1; ++a1) {
        int64_t rb, re;
        jcn::norm::window<int64_t>(a1, d.A1, size, lo, blocked, &rb, &re);
        for (; next_row < re; ++next_row) {  // v of row next_row into its ring slot
          F* dst = ring.data() + (next_row % ring_rows) * d.A2 * chunk;
          for (int64_t a2 = 0; a2 < d.A2; ++a2)
            ew.v(base + next_row * row + a2 * d.I, n, dst + a2 * chunk);
        }
        // S of every (a2, lane) of output row a1, rows then columns in increasing order.
        std::fill(sum.begin(), sum.end(), F(0));
        for (int64_t r = rb; r < re; ++r) {
          const F* src = ring.data() + (r % ring_rows) * d.A2 * chunk;
          for (int64_t a2 = 0; a2 < d.A2; ++a2) {
            int64_t cb = 0, ce = 1;
            if (d.same_map) jcn::norm::window<int64_t>(a2, d.A2, size2, lo2, false, &cb, &ce);
            F* __restrict s = sum.data() + a2 * chunk;
            for (int64_t c = cb; c < ce; ++c) {
              const F* __restrict q = src + c * chunk;
              for (int64_t i = 0; i < n; ++i) s[i] += q[i];
            }
          }
        }
        for (int64_t a2 = 0; a2 < d.A2; ++a2)
          ew.combine(base + a1 * row + a2 * d.I, n, sum.data() + a2 * chunk);
      }
    }
  });
}

constexpr bool kAllowF64 = true;

// Calls fn(T{}, R{}) with the operands' storage type T and the denominators' R.
template <typename Fn>
void with_types(ffi::DataType t, const Fn& fn) {
  switch (t) {
    case ffi::DataType::F32: fn(float{}, float{}); break;
    case ffi::DataType::F64: fn(double{}, double{}); break;
    case ffi::DataType::BF16: fn(Bf16{}, Bf16{}); break;
    default: fn(F16{}, float{}); break;  // F16: check_norm_call admits nothing else
  }
}

template <Op kOp>
ffi::Error launch(const char* op, const jcn::NormParams& p, const jcn::NormBuffers& buffers) {
  jcn::NormDims d;
  ffi::Error checked = jcn::check_norm_call(op, p, buffers, kAllowF64, &d);
  if (checked.failure()) return checked;
  bool ok = true;
  with_types(buffers.x->element_type(), [&](auto tz, auto rz) {
    using T = decltype(tz);
    using R = decltype(rz);
    ok = run<kOp, T, R>(buffers.typed<Buffers, T, R>(), d, p.add_scale, p.pow_scale, p.min_div);
  });
  if (!ok) return jcn::invalid(op, "a worker thread failed (out of memory?)");
  return ffi::Error::Success();
}

ffi::Error NormImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, jcn::NormParams p) {
  return launch<Op::kForward>("norm", p, {&x, nullptr, nullptr, &*y, nullptr});
}

ffi::Error NormFwdImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> d, jcn::NormParams p) {
  return launch<Op::kForwardResidual>("norm_fwd", p, {&x, nullptr, nullptr, &*y, &*d});
}

ffi::Error NormJvpImpl(ffi::AnyBuffer t, ffi::AnyBuffer x, ffi::AnyBuffer d,
                       ffi::Result<ffi::AnyBuffer> out, jcn::NormParams p) {
  return launch<Op::kJvp>("norm_jvp", p, {&x, &t, &d, &*out, nullptr});
}

ffi::Error NormGradImpl(ffi::AnyBuffer c, ffi::AnyBuffer x, ffi::AnyBuffer d,
                        ffi::Result<ffi::AnyBuffer> out, jcn::NormParams p) {
  return launch<Op::kGrad>("norm_grad", p, {&x, &c, &d, &*out, nullptr});
}

}  // namespace

// Bindings from the signatures above (csrc/common/ffi_common.h).
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormCpu, NormImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormFwdCpu, NormFwdImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormJvpCpu, NormJvpImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormGradCpu, NormGradImpl);
