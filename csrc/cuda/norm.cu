// Response norms on CUDA: the forward (with or without the denominators), the JVP and the
// gradient of cross_map_norm / response_norm (csrc/common/norm_checks.h: the memory view
// [O][A1][A2][I], the window rule and the summation order; csrc/README.md, "Response norms").
//
// All four are one pattern: out = combine(inputs, S), S the window sum of an elementwise v:
//   forward:  v = x^2,               d = min_div + a S,   y = x d^-p
//   JVP:      v = x t,               out = t d^-p - 2ap x d^(-p-1) S
//   gradient: v = c x d^(-p-1),      out = c d^-p - 2ap x S   (S over the transposed windows)
// Two kernels, both summing S in float32 in the fixed order of norm_checks.h (no atomics):
// bitwise reproducible. d^-p is exp2(-p log2 d) (d >= min_div > 0).
// - norm_cross_tiled_kernel, cross-map with at least 32 lanes (C01B) and size <= 33: v is
//   computed once per element (plus the tile's halo) into shared memory, windows summed there.
// - norm_contiguous_tiled_kernel, cross-map with the channels contiguous (NHWC), size <= 33:
//   the same along the contiguous axis.
// - norm_kernel, every other case: one thread per output element, consecutive threads along the
//   contiguous I, so every load of a window element is a contiguous warp-wide load; the window's
//   other elements are read again by the neighbouring outputs' threads from L1 / L2.
//
// Graph-safe: no allocation, no synchronisation, no host access to device data; one kernel
// launch per call on the given stream. 32-bit indices when the tensor has fewer than 2^31
// elements, 64-bit otherwise; a 1-d grid with a grid-stride loop (any size).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "ffi_common.h"
#include "norm_checks.h"
#include "targets.h"

namespace ffi = xla::ffi;

namespace {

namespace jcn = jax_convnet;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;

template <typename T>
struct Num;
template <>
struct Num<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Num<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

enum class Op { kForward, kForwardResidual, kJvp, kGrad };

template <typename T, typename R>
struct Buffers {
  const T* __restrict__ x;
  const T* __restrict__ v;  // t (JVP) / c (gradient)
  const R* __restrict__ d;  // denominators (JVP, gradient)
  T* __restrict__ out;
  R* __restrict__ d_out;    // denominators (forward with residual)
};

template <typename Idx>
struct KDims {
  Idx O, A1, A2, I, n, size, lo;
  bool same_map, blocked;
};

struct Scales {
  float a, p, k, two_ap;
};

// d^-e for d > 0.
__device__ __forceinline__ float pow_neg(float d, float e) { return exp2f(-e * __log2f(d)); }

// v of element `at`: x^2, x t or c x d^(-p-1).
template <Op kOp, typename T, typename R, typename Idx>
__device__ __forceinline__ float v_at(const Buffers<T, R>& b, Idx at, const Scales& s) {
  const float xv = Num<T>::load(b.x[at]);
  if constexpr (kOp == Op::kForward || kOp == Op::kForwardResidual) {
    return xv * xv;
  } else if constexpr (kOp == Op::kJvp) {
    return xv * Num<T>::load(b.v[at]);
  } else {
    return Num<T>::load(b.v[at]) * xv * pow_neg(Num<R>::load(b.d[at]), s.p + 1.0f);
  }
}

// The outputs of element e from its window sum.
template <Op kOp, typename T, typename R, typename Idx>
__device__ __forceinline__ void combine_at(const Buffers<T, R>& b, Idx e, float sum,
                                           const Scales& s) {
  const float xv = Num<T>::load(b.x[e]);
  if constexpr (kOp == Op::kForward || kOp == Op::kForwardResidual) {
    const float den = __fadd_rn(s.k, __fmul_rn(s.a, sum));
    b.out[e] = Num<T>::store(xv * pow_neg(den, s.p));
    if constexpr (kOp == Op::kForwardResidual) b.d_out[e] = Num<R>::store(den);
  } else {
    const float dv = Num<R>::load(b.d[e]);
    const float scale = pow_neg(dv, s.p);
    const float vv = Num<T>::load(b.v[e]);
    if constexpr (kOp == Op::kJvp)
      b.out[e] = Num<T>::store(vv * scale - s.two_ap * xv * (scale / dv) * sum);
    else
      b.out[e] = Num<T>::store(vv * scale - s.two_ap * xv * sum);
  }
}

// Any case: one thread per output element, the window's v read from global memory (L1 / L2).
template <Op kOp, typename T, typename R, typename Idx>
__global__ void __launch_bounds__(kThreads)
    norm_kernel(Buffers<T, R> b, KDims<Idx> g, Scales s) {
  const Idx stride = Idx(gridDim.x) * Idx(kThreads);
  for (Idx e = Idx(blockIdx.x) * Idx(kThreads) + Idx(threadIdx.x); e < g.n; e += stride) {
    const Idx i = e % g.I;
    Idx rest = e / g.I;
    const Idx a2 = rest % g.A2;
    rest /= g.A2;
    const Idx a1 = rest % g.A1;
    const Idx o = rest / g.A1;
    Idx rb, re, cb = 0, ce = 1;
    jcn::norm::window<Idx>(a1, g.A1, g.size, g.lo, g.blocked, &rb, &re);
    if (g.same_map) jcn::norm::window<Idx>(a2, g.A2, g.size, g.lo, false, &cb, &ce);
    float sum = 0.0f;
    for (Idx r = rb; r < re; ++r) {
      const Idx row = ((o * g.A1 + r) * g.A2) * g.I + i;
      for (Idx c = cb; c < ce; ++c)
        // no contraction into an FMA: the order and rounding are fixed
        sum = __fadd_rn(sum, v_at<kOp>(b, row + c * g.I, s));
    }
    combine_at<kOp>(b, e, sum, s);
  }
}

// Cross-map with lanes (A2 = 1, I >= kLanes; C01B): a block takes kLanes consecutive lanes of
// one o and kTileRows consecutive output channels, computes v once for the rows their windows
// cover (at most kTileRows + 2 * (kMaxTiledSize - 1)) into shared memory and sums each window
// from there in the same order as norm_kernel. blockIdx.x: (o, lane tile); blockIdx.y: channel
// tile.
constexpr int kLanes = 32;
constexpr int kTileRows = 32;
constexpr int kRowThreads = kThreads / kLanes;  // 8
constexpr int kMaxTiledSize = 33;
constexpr int kMaxTileRows = kTileRows + 2 * (kMaxTiledSize - 1);

template <Op kOp, typename T, typename R, typename Idx>
__global__ void __launch_bounds__(kThreads)
    norm_cross_tiled_kernel(Buffers<T, R> b, KDims<Idx> g, Scales s, Idx lane_tiles) {
  __shared__ float tile[kMaxTileRows * kLanes];
  const int tx = int(threadIdx.x) % kLanes, ty = int(threadIdx.x) / kLanes;
  const Idx f0 = Idx(blockIdx.y) * kTileRows;
  const Idx f_last = (f0 + kTileRows < g.A1 ? f0 + kTileRows : g.A1) - 1;
  Idx rb, re, unused;
  jcn::norm::window<Idx>(f0, g.A1, g.size, g.lo, g.blocked, &rb, &unused);
  jcn::norm::window<Idx>(f_last, g.A1, g.size, g.lo, g.blocked, &unused, &re);
  for (Idx unit = Idx(blockIdx.x); unit < g.O * lane_tiles; unit += Idx(gridDim.x)) {
    const Idx o = unit / lane_tiles;
    const Idx i = (unit % lane_tiles) * kLanes + tx;
    const bool lane_ok = i < g.I;
    __syncthreads();  // the previous unit's reads of the tile are done
    for (Idx r = rb + ty; r < re; r += kRowThreads)
      tile[int(r - rb) * kLanes + tx] = lane_ok ? v_at<kOp>(b, (o * g.A1 + r) * g.I + i, s) : 0.0f;
    __syncthreads();
    if (!lane_ok) continue;
    for (Idx f = f0 + ty; f <= f_last; f += kRowThreads) {
      Idx wb, we;
      jcn::norm::window<Idx>(f, g.A1, g.size, g.lo, g.blocked, &wb, &we);
      float sum = 0.0f;
      for (Idx r = wb; r < we; ++r) sum = __fadd_rn(sum, tile[int(r - rb) * kLanes + tx]);
      combine_at<kOp>(b, (o * g.A1 + f) * g.I + i, sum, s);
    }
  }
}

// Cross-map with the channels contiguous (NHWC: A2 = I = 1), size <= kMaxTiledSize: a block
// takes kSpan consecutive elements, computes v once for them and the size - 1 elements either
// side into shared memory (windows never reach further), and sums each window from there in the
// same order as norm_kernel.
constexpr int kSpan = 4 * kThreads;

template <Op kOp, typename T, typename R, typename Idx>
__global__ void __launch_bounds__(kThreads)
    norm_contiguous_tiled_kernel(Buffers<T, R> b, KDims<Idx> g, Scales s) {
  __shared__ float tile[kSpan + 2 * (kMaxTiledSize - 1)];
  const Idx halo = g.size - 1;
  for (Idx t0 = Idx(blockIdx.x) * kSpan; t0 < g.n; t0 += Idx(gridDim.x) * kSpan) {
    const Idx t_end = t0 + kSpan < g.n ? t0 + kSpan : g.n;
    const Idx mb = t0 > halo ? t0 - halo : Idx(0);
    const Idx me = t_end + halo < g.n ? t_end + halo : g.n;
    __syncthreads();  // the previous span's reads of the tile are done
    for (Idx m = mb + Idx(threadIdx.x); m < me; m += kThreads)
      tile[int(m - mb)] = v_at<kOp>(b, m, s);
    __syncthreads();
    for (Idx e = t0 + Idx(threadIdx.x); e < t_end; e += kThreads) {
      const Idx c = e % g.A1;
      const Idx first = e - c - mb;  // channel 0 of this position, in the tile
      Idx wb, we;
      jcn::norm::window<Idx>(c, g.A1, g.size, g.lo, g.blocked, &wb, &we);
      float sum = 0.0f;
      for (Idx r = wb; r < we; ++r) sum = __fadd_rn(sum, tile[int(first + r)]);
      combine_at<kOp>(b, e, sum, s);
    }
  }
}

template <Op kOp, typename T, typename R, typename Idx>
void launch_typed(cudaStream_t stream, const Buffers<T, R>& b, const jcn::NormDims& d,
                  bool transposed, const Scales& s) {
  const int64_t n = jcn::norm::elements(d);
  KDims<Idx> g{Idx(d.O),    Idx(d.A1),   Idx(d.A2),
               Idx(d.I),    Idx(n),      Idx(d.size),
               Idx(jcn::norm::lo_of(d.size, transposed)), d.same_map, d.blocked};
  const int64_t channel_tiles = (d.A1 + kTileRows - 1) / kTileRows;
  if (!d.same_map && d.A2 == 1 && d.I >= kLanes && d.size <= kMaxTiledSize &&
      channel_tiles <= 65535) {
    const int64_t lane_tiles = (d.I + kLanes - 1) / kLanes;
    const int64_t units = d.O * lane_tiles;
    const dim3 grid(unsigned(units < kMaxBlocks ? units : kMaxBlocks), unsigned(channel_tiles));
    norm_cross_tiled_kernel<kOp, T, R, Idx><<<grid, kThreads, 0, stream>>>(b, g, s,
                                                                           Idx(lane_tiles));
    return;
  }
  if (!d.same_map && d.A2 == 1 && d.I == 1 && d.size <= kMaxTiledSize) {
    // at most kMaxBlocks * kThreads elements per grid-stride step, as norm_kernel's
    int64_t blocks = (n + kSpan - 1) / kSpan;
    if (blocks > kMaxBlocks * kThreads / kSpan) blocks = kMaxBlocks * kThreads / kSpan;
    norm_contiguous_tiled_kernel<kOp, T, R, Idx><<<unsigned(blocks), kThreads, 0, stream>>>(b, g, s);
    return;
  }
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  norm_kernel<kOp, T, R, Idx><<<unsigned(blocks), kThreads, 0, stream>>>(b, g, s);
}

// Calls fn(T{}, R{}) with the operands' storage type T and the denominators' R.
template <typename Fn>
void with_types(ffi::DataType t, const Fn& fn) {
  switch (t) {
    case ffi::DataType::F32: fn(float{}, float{}); break;
    case ffi::DataType::BF16: fn(__nv_bfloat16{}, __nv_bfloat16{}); break;
    default: fn(__half{}, float{}); break;  // F16: check_norm_call admits nothing else
  }
}

template <Op kOp>
ffi::Error launch(cudaStream_t stream, const char* op, const jcn::NormParams& p,
                  const jcn::NormBuffers& buffers) {
  jcn::NormDims d;
  ffi::Error checked = jcn::check_norm_call(op, p, buffers, /*allow_f64=*/false, &d);
  if (checked.failure()) return checked;
  const float a = float(p.add_scale), pw = float(p.pow_scale);
  const Scales s{a, pw, float(p.min_div), 2.0f * a * pw};
  const bool narrow = jcn::norm::elements(d) < (int64_t(1) << 31) - int64_t(kThreads) * kMaxBlocks;
  with_types(buffers.x->element_type(), [&](auto tz, auto rz) {
    using T = decltype(tz);
    using R = decltype(rz);
    const Buffers<T, R> b = buffers.typed<Buffers, T, R>();
    if (narrow)
      launch_typed<kOp, T, R, int32_t>(stream, b, d, kOp == Op::kGrad, s);
    else
      launch_typed<kOp, T, R, int64_t>(stream, b, d, kOp == Op::kGrad, s);
  });
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("jax_convnet ") + op +
                                ": kernel launch failed: " + cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error NormImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                    jcn::NormParams p) {
  return launch<Op::kForward>(stream, "norm", p, {&x, nullptr, nullptr, &*y, nullptr});
}

ffi::Error NormFwdImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> d, jcn::NormParams p) {
  return launch<Op::kForwardResidual>(stream, "norm_fwd", p, {&x, nullptr, nullptr, &*y, &*d});
}

ffi::Error NormJvpImpl(cudaStream_t stream, ffi::AnyBuffer t, ffi::AnyBuffer x, ffi::AnyBuffer d,
                       ffi::Result<ffi::AnyBuffer> out, jcn::NormParams p) {
  return launch<Op::kJvp>(stream, "norm_jvp", p, {&x, &t, &d, &*out, nullptr});
}

ffi::Error NormGradImpl(cudaStream_t stream, ffi::AnyBuffer c, ffi::AnyBuffer x, ffi::AnyBuffer d,
                        ffi::Result<ffi::AnyBuffer> out, jcn::NormParams p) {
  return launch<Op::kGrad>(stream, "norm_grad", p, {&x, &c, &d, &*out, nullptr});
}

}  // namespace

// Bindings from the signatures above (csrc/common/ffi_common.h).
JCN_DEFINE_CUDA_HANDLER(NormCuda, NormImpl);
JCN_DEFINE_CUDA_HANDLER(NormFwdCuda, NormFwdImpl);
JCN_DEFINE_CUDA_HANDLER(NormJvpCuda, NormJvpImpl);
JCN_DEFINE_CUDA_HANDLER(NormGradCuda, NormGradImpl);
