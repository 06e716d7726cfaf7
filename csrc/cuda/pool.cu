// Max pooling on CUDA: max_pool, max_pool with winners, the JVP and the gradient (see
// csrc/README.md, "Max pool"); average pooling and its gradient in the section "Average pooling".
//
// Both layouts are one memory pattern [outer][H][W][inner] (C01B: outer = C, inner = B;
// NHWC: outer = B, inner = C), `inner` contiguous. Every thread works on a vector of V
// consecutive `inner` elements: V = 16 bytes / sizeof(T) (4 x f32, 8 x bf16 / f16) when `inner`
// is a multiple of V and all buffers are aligned to their vectors, otherwise V = 1 (scalar
// fallback). Consecutive threads take consecutive vectors, so every warp-wide load / store is
// contiguous.
//
// Bit-identical to the CPU kernels (csrc/cpu/pool.cc): forward / JVP copy the selected element
// unchanged; the gradient of an image element is 0 + ct(w1) + ct(w2) + ... over the windows that
// selected it in increasing (oy, ox) order, in float32, rounded once to the storage type.
// (Only NaN payloads of the gradient may differ: the GPU produces canonical NaNs.) Subnormals
// are compared and summed as IEEE values: do not build this file with -ftz=true / fast math.
//
// Under differentiation the forward kernel also writes each window's winner (the selected
// element's offset i * ww + j in the whole window, uint8 or int32: pool::winner_bytes); the JVP
// gathers the tangents at the winners and the gradient gathers, for each image element, the
// cotangents of the windows whose winner it is (no atomics). Neither reads the images.
//
// Graph-safe: no allocation, no synchronisation, no host access to device data; one kernel
// launch per call on the given stream. Index arithmetic is 32-bit when everything provably fits
// (pool::fits_int32), else 64-bit; grids are 1-d with grid-stride loops (any size).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>

#include "ffi_common.h"
#include "pool_checks.h"
#include "pool_select.h"
#include "targets.h"

namespace ffi = xla::ffi;

namespace {

namespace jcn = jax_convnet;

constexpr int kThreads = 256;            // threads per block
constexpr int64_t kMaxBlocks = 1 << 22;  // grid cap: kMaxBlocks * kThreads = 2^30 (int32-safe)
constexpr int kTile = 2;                 // gradient: one thread owns kTile x kTile positions
// Bytes per thread along the contiguous dimension (16 or 8). 16 B vectors cost the bf16 / f16
// gradient kernel 32 float accumulators per thread; 8 B would halve that.
constexpr int kFwdVecBytes = 16;
constexpr int kGradVecBytes = 16;

// ----------------------------------------------------------------------------------------------
// Element types: compare / accumulate in float32, store in T.

template <typename T>
struct Num;
template <>
struct Num<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
  static __device__ __forceinline__ float neg_inf() {
    return __int_as_float(static_cast<int>(0xff800000u));
  }
  static __device__ __forceinline__ float zero() { return 0.0f; }
  static constexpr bool kExactFromFloatBits = true;
  static __device__ __forceinline__ float from_float_bits(float v) { return v; }
};
template <>
struct Num<__nv_bfloat16> {
  // Exact widening by the bits (a NaN keeps its payload: from_float_bits undoes it).
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) {
    return __uint_as_float(uint32_t(__bfloat16_as_ushort(v)) << 16);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ __nv_bfloat16 neg_inf() { return __ushort_as_bfloat16(0xff80); }
  static __device__ __forceinline__ __nv_bfloat16 zero() { return __ushort_as_bfloat16(0); }
  // A float that holds a bfloat16 value (low 16 bits zero) back to it, NaN payload included.
  static constexpr bool kExactFromFloatBits = true;
  static __device__ __forceinline__ __nv_bfloat16 from_float_bits(float v) {
    return __ushort_as_bfloat16(static_cast<unsigned short>(__float_as_uint(v) >> 16));
  }
};
template <>
struct Num<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ __half neg_inf() { return __ushort_as_half(0xfc00); }
  static __device__ __forceinline__ __half zero() { return __ushort_as_half(0); }
  static constexpr bool kExactFromFloatBits = false;
};

// V consecutive elements, loaded / stored with one instruction (128-bit when V*sizeof(T) = 16).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V, typename Idx>
__device__ __forceinline__ Vec<T, V> load_vec(const T* __restrict__ p, Idx off) {
  return *reinterpret_cast<const Vec<T, V>*>(p + off);
}

// V winners of one pooled vector, loaded / stored with one instruction.
template <typename W, int V>
struct alignas(sizeof(W) * V) WinVec {
  W w[V];
};

// v clamped to [0, n - 1].
template <typename Idx>
__device__ __forceinline__ Idx clamp_idx(Idx v, Idx n) {
  return v < 0 ? Idx(0) : (v > n - 1 ? n - 1 : v);
}

// Kernel geometry in the index type Idx. Memory: image[o][y][x][i], pooled[o][oy][ox][i].
template <typename Idx>
struct KGeom {
  Idx O, H, W, I, Ho, Wo;  // outer, image rows / cols, inner (contiguous), pooled rows / cols
  Idx wh, ww, sh, sw, pt, pl;
  Idx IV;     // I / V: vectors per position
  Idx TH, TW; // gradient: tiles per column / row, ceil(H / kTile), ceil(W / kTile)
  Idx total;  // work items: O*Ho*Wo*IV (forward, JVP) or O*TH*TW*IV (gradient)
};

// The forward's and the JVP's work item t = ((o*Ho + oy)*Wo + ox)*IV + iv, a pooled vector: its
// indices, first lane (i = iv*V) and its window's first row / col (may be outside the image).
template <typename Idx>
struct PooledVector {
  Idx o, oy, ox, lane, y0, x0;
};

template <int V, typename Idx>
__device__ __forceinline__ PooledVector<Idx> pooled_vector(Idx t, const KGeom<Idx>& g) {
  const Idx iv = t % g.IV;
  Idx r = t / g.IV;
  const Idx ox = r % g.Wo;
  r /= g.Wo;
  const Idx oy = r % g.Ho;
  return {r / g.Ho, oy, ox, iv * V, oy * g.sh - g.pt, ox * g.sw - g.pl};
}

// The offsets of a wh x ww window at (y0, x0) kept after clipping to the image: rows i in
// [i_lo, i_hi), cols j in [j_lo, j_hi).
template <typename Idx>
struct ClippedWindow {
  Idx i_lo, i_hi, j_lo, j_hi;
};

template <typename Idx>
__device__ __forceinline__ ClippedWindow<Idx> clip_window(Idx y0, Idx x0, Idx wh, Idx ww,
                                                          const KGeom<Idx>& g) {
  return {y0 < 0 ? -y0 : Idx(0), wh < g.H - y0 ? wh : g.H - y0, x0 < 0 ? -x0 : Idx(0),
          ww < g.W - x0 ? ww : g.W - x0};
}

// The row-major walk over a pooled vector's window (image plane o, origin (y0, x0), clipped to
// w): visit(i, j, ok, v) for each window position, v its V lanes. Compile-time window (KH / KW
// > 0): all KH * KW positions, the out-of-image ones with ok false and loaded from a clamped
// (valid, already-touched) address, so that the unrolled body is branch-free and all loads are in
// flight together. Runtime window: only the clipped range (ok always true).
template <typename T, int V, int KH, int KW, typename Idx, typename Visit>
__device__ __forceinline__ void walk_window(const T* __restrict__ img, Idx o, Idx lane, Idx y0,
                                            Idx x0, const ClippedWindow<Idx>& w,
                                            const KGeom<Idx>& g, Visit&& visit) {
  const Idx i_beg = KH > 0 ? Idx(0) : w.i_lo, i_end = KH > 0 ? Idx(KH) : w.i_hi;
  const Idx j_beg = KW > 0 ? Idx(0) : w.j_lo, j_end = KW > 0 ? Idx(KW) : w.j_hi;
#pragma unroll
  for (Idx i = i_beg; i < i_end; ++i) {
    const bool row_ok = i >= w.i_lo && i < w.i_hi;
    const Idx row = (o * g.H + clamp_idx<Idx>(y0 + i, g.H)) * g.W;
#pragma unroll
    for (Idx j = j_beg; j < j_end; ++j)
      visit(i, j, row_ok && j >= w.j_lo && j < w.j_hi,
            load_vec<T, V>(img, (row + clamp_idx<Idx>(x0 + j, g.W)) * g.I + lane));
  }
}

// ----------------------------------------------------------------------------------------------
// Forward, with or without winners. One thread per pooled vector (o, oy, ox, V lanes at
// i = iv*V): it scans the clipped window in row-major order, per lane keeps the selected value,
// and writes it (-inf for an empty window) and, with winners, its offset i * ww + j in the whole
// window (0 for an empty window). Bytes moved per image element (windows tiling the image,
// stride s_h x s_w; overlapping re-reads are served by L1/L2):
//   forward:          sizeof(T) * (1 + 1/(s_h*s_w))                  -- f32 2x2/2: 5 B
//   with winners:     sizeof(T) * (1 + 1/(s_h*s_w)) + sizeof(W)/(s_h*s_w)
// KH / KW > 0: window size fixed at compile time (loops fully unrolled, all loads of a window in
// flight at once; out-of-image elements predicated off); 0: runtime window over the clipped range.
template <typename T, typename W, int V, int KH, int KW, bool kWinners, typename Idx>
__global__ void __launch_bounds__(kThreads)
    max_pool_fwd_kernel(const T* __restrict__ img, T* __restrict__ out, W* __restrict__ win,
                        const KGeom<Idx> g) {
  using N = Num<T>;
  const Idx step = Idx(gridDim.x) * Idx(blockDim.x);
  for (Idx t = Idx(blockIdx.x) * Idx(blockDim.x) + Idx(threadIdx.x); t < g.total; t += step) {
    // The pooled vector sits at out + t*V.
    const auto [o, oy, ox, lane, y0, x0] = pooled_vector<V>(t, g);
    const Idx wh = KH > 0 ? Idx(KH) : g.wh;
    const Idx ww = KW > 0 ? Idx(KW) : g.ww;
    const ClippedWindow<Idx> window = clip_window(y0, x0, wh, ww, g);

    // The scan starts from best = -inf and uses takes_over(): no first-element case. A window
    // of -inf only selects its first element: the winner starts there. float32 and bfloat16
    // write `best` back (exact: it holds a T value; bf16 by its bits, keeping NaN payloads);
    // float16's round trip through float could change a NaN's payload, so it keeps the selected
    // element itself.
    constexpr bool kBestIsResult = N::kExactFromFloatBits;
    const bool empty = window.i_lo >= window.i_hi || window.j_lo >= window.j_hi;
    const W first_code = empty ? W(0) : W(window.i_lo * ww + window.j_lo);
    Vec<T, V> res;
    WinVec<W, V> code;
    float best[V];
#pragma unroll
    for (int l = 0; l < V; ++l) {
      res.v[l] = N::neg_inf();
      code.w[l] = first_code;
      best[l] = -INFINITY;
    }
    walk_window<T, V, KH, KW>(img, o, lane, y0, x0, window, g,
                              [&](Idx i, Idx j, bool ok, const Vec<T, V>& v) {
      const W k = W(i * ww + j);  // < 2^31: pool::winner_bytes
#pragma unroll
      for (int l = 0; l < V; ++l) {
        const float f = N::to_f(v.v[l]);
        const bool take = ok & jcn::pool::takes_over(f, best[l]);
        best[l] = take ? f : best[l];
        if constexpr (kWinners) code.w[l] = take ? k : code.w[l];
        if constexpr (!kBestIsResult) res.v[l] = take ? v.v[l] : res.v[l];
      }
    });
    if constexpr (kBestIsResult) {
#pragma unroll
      for (int l = 0; l < V; ++l) res.v[l] = N::from_float_bits(best[l]);
    }
    *reinterpret_cast<Vec<T, V>*>(out + t * V) = res;
    if constexpr (kWinners) *reinterpret_cast<WinVec<W, V>*>(win + t * V) = code;
  }
}

// The window-relative position (dy, dx) of winner k, or false when k is no offset of the
// window (never for winners the forward kernel wrote; checked so that any value is safe).
template <int KW, typename W, typename Idx>
__device__ __forceinline__ bool winner_offset(W code, const KGeom<Idx>& g, Idx* dy, Idx* dx) {
  const Idx ww = KW > 0 ? Idx(KW) : g.ww;
  const Idx k = Idx(code);
  const Idx q = k / ww;
  *dy = q;
  *dx = k - q * ww;
  return k >= 0 && q < g.wh;
}

// ----------------------------------------------------------------------------------------------
// JVP: one thread per pooled vector: the tangent at each lane's winner (0 where the winner lies
// outside the image, as an empty window's does). Bytes per pooled element:
// sizeof(W) + 2 * sizeof(T).
template <typename T, typename W, int V, int KW, typename Idx>
__global__ void __launch_bounds__(kThreads)
    max_pool_jvp_kernel(const T* __restrict__ tan, const W* __restrict__ win,
                        T* __restrict__ out, const KGeom<Idx> g) {
  const Idx step = Idx(gridDim.x) * Idx(blockDim.x);
  for (Idx t = Idx(blockIdx.x) * Idx(blockDim.x) + Idx(threadIdx.x); t < g.total; t += step) {
    const auto [o, oy, ox, lane, y0, x0] = pooled_vector<V>(t, g);
    const WinVec<W, V> code = *reinterpret_cast<const WinVec<W, V>*>(win + t * V);
    Vec<T, V> res;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      Idx dy, dx;
      const bool in_window = winner_offset<KW>(code.w[l], g, &dy, &dx);
      const Idx y = y0 + (in_window ? dy : Idx(0));
      const Idx x = x0 + (in_window ? dx : Idx(0));
      const bool inside = in_window && y >= 0 && y < g.H && x >= 0 && x < g.W;
      res.v[l] = inside ? tan[((o * g.H + y) * g.W + x) * g.I + lane + l] : Num<T>::zero();
    }
    *reinterpret_cast<Vec<T, V>*>(out + t * V) = res;
  }
}

// ----------------------------------------------------------------------------------------------
// Gradient (gather, no atomics). One thread owns a kTile x kTile tile of image positions
// (rows y0 = ty*kTile.., cols x0 = tx*kTile..) for V lanes. It visits the windows covering its
// tile in increasing (oy, ox), finds each window's winner per lane as the slot
// 0..kTile*kTile-1 of the tile it falls in (-1 when outside the tile), adds the window's
// cotangent to that slot's float32 accumulator, and finally writes its tile once. Bytes per
// image element: sizeof(T) (write) + (sizeof(T) + sizeof(W)) / (s_h*s_w) (reads, each window's
// cotangent and winner; overlapping windows re-read from L1/L2).

template <typename Idx>
struct GradTile {
  Idx o, lane, y0, x0, ny, nx;  // ny x nx: the tile's rows / cols inside the image
  Idx oy_lo, oy_hi, ox_lo, ox_hi;  // the windows covering it
};

// t = ((o*TH + ty)*TW + tx)*IV + iv
template <int V, typename Idx>
__device__ __forceinline__ GradTile<Idx> grad_tile(Idx t, const KGeom<Idx>& g) {
  GradTile<Idx> k;
  const Idx iv = t % g.IV;
  Idx r = t / g.IV;
  const Idx tx = r % g.TW;
  r /= g.TW;
  const Idx ty = r % g.TH;
  k.o = r / g.TH;
  k.lane = iv * V;
  k.y0 = ty * kTile;
  k.x0 = tx * kTile;
  k.ny = kTile < g.H - k.y0 ? Idx(kTile) : g.H - k.y0;
  k.nx = kTile < g.W - k.x0 ? Idx(kTile) : g.W - k.x0;
  // Each covering window is non-empty after clipping since it overlaps the tile.
  jcn::pool::covering_windows<Idx>(k.y0, k.y0 + k.ny - 1, g.pt, g.wh, g.sh, g.Ho, &k.oy_lo,
                                   &k.oy_hi);
  jcn::pool::covering_windows<Idx>(k.x0, k.x0 + k.nx - 1, g.pl, g.ww, g.sw, g.Wo, &k.ox_lo,
                                   &k.ox_hi);
  return k;
}

// The slot of tile position (sy, sx) relative to the tile's origin; -1 outside the tile.
template <typename Idx>
__device__ __forceinline__ int tile_slot(Idx sy, Idx sx) {
  return (sy >= 0 && sy < kTile && sx >= 0 && sx < kTile) ? int(sy) * kTile + int(sx) : -1;
}

// acc[slot] += ct where sel == slot. Branch-free on purpose: `if (sel == s) acc[s] += cf` gets
// rewritten by the compiler into acc[sel] += cf, a dynamically indexed array in local memory.
// Adding +0.0 instead is bit-exact: acc starts at +0.0 and can never become -0.0 (x + y is -0.0
// only when both are -0.0), and x + 0.0 == x for every other x (inf included; NaN stays NaN).
template <typename T, int V>
__device__ __forceinline__ void add_selected(float (&acc)[kTile * kTile][V], const int (&sel)[V],
                                             const Vec<T, V>& c) {
#pragma unroll
  for (int l = 0; l < V; ++l) {
    const float cf = Num<T>::to_f(c.v[l]);
#pragma unroll
    for (int s = 0; s < kTile * kTile; ++s) acc[s][l] += sel[l] == s ? cf : 0.0f;
  }
}

template <typename T, int V, typename Idx>
__device__ __forceinline__ void store_tile(const float (&acc)[kTile * kTile][V],
                                           const GradTile<Idx>& k, const KGeom<Idx>& g,
                                           T* __restrict__ out) {
#pragma unroll
  for (int s = 0; s < kTile * kTile; ++s) {
    const Idx sy = s / kTile, sx = s % kTile;
    if (sy < k.ny && sx < k.nx) {
      Vec<T, V> q;
#pragma unroll
      for (int l = 0; l < V; ++l) q.v[l] = Num<T>::from_f(acc[s][l]);
      *reinterpret_cast<Vec<T, V>*>(
          out + ((k.o * g.H + (k.y0 + sy)) * g.W + (k.x0 + sx)) * g.I + k.lane) = q;
    }
  }
}

template <typename T, typename W, int V, int KW, typename Idx>
__global__ void __launch_bounds__(kThreads)
    max_pool_grad_kernel(const T* __restrict__ ct, const W* __restrict__ win,
                         T* __restrict__ out, const KGeom<Idx> g) {
  const Idx step = Idx(gridDim.x) * Idx(blockDim.x);
  for (Idx t = Idx(blockIdx.x) * Idx(blockDim.x) + Idx(threadIdx.x); t < g.total; t += step) {
    const GradTile<Idx> k = grad_tile<V>(t, g);
    float acc[kTile * kTile][V] = {};
    for (Idx oy = k.oy_lo; oy <= k.oy_hi; ++oy) {
      const Idx sy0 = oy * g.sh - g.pt - k.y0;  // window origin relative to the tile
      for (Idx ox = k.ox_lo; ox <= k.ox_hi; ++ox) {
        const Idx sx0 = ox * g.sw - g.pl - k.x0;
        const Idx w = ((k.o * g.Ho + oy) * g.Wo + ox) * g.I + k.lane;
        const Vec<T, V> c = load_vec<T, V>(ct, w);
        const WinVec<W, V> code = *reinterpret_cast<const WinVec<W, V>*>(win + w);
        int slot[V];
#pragma unroll
        for (int l = 0; l < V; ++l) {
          Idx dy, dx;
          const bool in_window = winner_offset<KW>(code.w[l], g, &dy, &dx);
          slot[l] = in_window ? tile_slot(sy0 + dy, sx0 + dx) : -1;
        }
        add_selected<T, V>(acc, slot, c);
      }
    }
    store_tile<T, V>(acc, k, g, out);
  }
}

// ----------------------------------------------------------------------------------------------
// Launch.

enum class Op { kForward, kWinners, kJvp, kGrad };

constexpr bool kAllowF64 = false;  // no float64 on the GPU

// Work items: pooled vectors (kForward / kWinners / kJvp) or image tiles (kGrad).
template <typename Idx>
KGeom<Idx> make_kgeom(const jcn::PoolGeometry& pg, int V, Op op) {
  KGeom<Idx> g;
  g.O = Idx(jcn::pool::outer_size(pg));
  g.H = Idx(pg.in_h);
  g.W = Idx(pg.in_w);
  g.I = Idx(jcn::pool::inner_size(pg));
  g.Ho = Idx(pg.out_h);
  g.Wo = Idx(pg.out_w);
  g.wh = Idx(pg.window_h);
  g.ww = Idx(pg.window_w);
  g.sh = Idx(pg.stride_h);
  g.sw = Idx(pg.stride_w);
  g.pt = Idx(pg.pad_top);
  g.pl = Idx(pg.pad_left);
  g.IV = g.I / Idx(V);
  g.TH = (g.H + kTile - 1) / kTile;
  g.TW = (g.W + kTile - 1) / kTile;
  g.total = op == Op::kGrad ? g.O * g.TH * g.TW * g.IV : g.O * g.Ho * g.Wo * g.IV;
  return g;
}

template <typename Idx>
unsigned blocks_for(const KGeom<Idx>& g) {
  const int64_t b = (int64_t(g.total) + kThreads - 1) / kThreads;
  return unsigned(b < kMaxBlocks ? b : kMaxBlocks);
}

// The buffers of one call: `in` is the images (kForward, kWinners), the tangents (kJvp) or the
// cotangents (kGrad); `win` the winners (written by kWinners, read by kJvp / kGrad).
template <typename T, typename W>
struct Buffers {
  const T* in;
  T* out;
  W* win;
};

template <typename T, typename W, int V, int KH, int KW, typename Idx>
void launch(cudaStream_t stream, Op op, const jcn::PoolGeometry& pg, const Buffers<T, W>& b) {
  const KGeom<Idx> g = make_kgeom<Idx>(pg, V, op);
  switch (op) {
    case Op::kForward:
      max_pool_fwd_kernel<T, W, V, KH, KW, false, Idx>
          <<<blocks_for(g), kThreads, 0, stream>>>(b.in, b.out, nullptr, g);
      break;
    case Op::kWinners:
      max_pool_fwd_kernel<T, W, V, KH, KW, true, Idx>
          <<<blocks_for(g), kThreads, 0, stream>>>(b.in, b.out, b.win, g);
      break;
    case Op::kJvp:
      max_pool_jvp_kernel<T, W, V, KW, Idx>
          <<<blocks_for(g), kThreads, 0, stream>>>(b.in, b.win, b.out, g);
      break;
    case Op::kGrad:
      max_pool_grad_kernel<T, W, V, KW, Idx>
          <<<blocks_for(g), kThreads, 0, stream>>>(b.in, b.win, b.out, g);
      break;
  }
}

// 32-bit indices: 2x2 and 3x3 windows get unrolled kernels, others the runtime-window kernel.
// 64-bit indices (huge tensors only): runtime-window kernel.
template <typename T, typename W, int V>
void dispatch_window(cudaStream_t stream, Op op, const jcn::PoolGeometry& pg, bool idx32,
                     const Buffers<T, W>& b) {
  if (!idx32)
    launch<T, W, V, 0, 0, int64_t>(stream, op, pg, b);
  else if (pg.window_h == 2 && pg.window_w == 2)
    launch<T, W, V, 2, 2, int32_t>(stream, op, pg, b);
  else if (pg.window_h == 3 && pg.window_w == 3)
    launch<T, W, V, 3, 3, int32_t>(stream, op, pg, b);
  else
    launch<T, W, V, 0, 0, int32_t>(stream, op, pg, b);
}

// Calls launch_with(std::integral_constant<int, V>{}) with the widest vector of lanes V the call
// allows: the gradient's or the forward's (the JVP's too) where the contiguous dimension is a
// multiple of V and every buffer is aligned to V elements (XLA's buffers always are; checked
// anyway, host-side pointer values only), else 1. Then reports the launches' status.
template <typename T, typename LaunchWith>
ffi::Error launch_vectorized(const char* op, bool grad, const jcn::PoolGeometry& pg,
                             std::initializer_list<std::pair<const void*, size_t>> buffers,
                             const LaunchWith& launch_with) {
  constexpr int kVecFwd = int(kFwdVecBytes / sizeof(T));
  constexpr int kVecGrad = int(kGradVecBytes / sizeof(T));
  auto vec_ok = [&](int v) {
    for (const auto& [ptr, elem_bytes] : buffers)
      if (ptr != nullptr && uintptr_t(ptr) % (uintptr_t(v) * elem_bytes) != 0) return false;
    return jcn::pool::inner_size(pg) % v == 0;
  };
  if (grad && vec_ok(kVecGrad))
    launch_with(std::integral_constant<int, kVecGrad>{});
  else if (!grad && vec_ok(kVecFwd))
    launch_with(std::integral_constant<int, kVecFwd>{});
  else
    launch_with(std::integral_constant<int, 1>{});
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("jax_convnet ") + op +
                                ": kernel launch failed: " + cudaGetErrorString(err));
  return ffi::Error::Success();
}

// typed(T{}) for the storage type T of `t` (float32, bfloat16, float16); an error naming `op`
// for any other.
template <typename Typed>
ffi::Error with_storage_type(ffi::DataType t, const char* op, const Typed& typed) {
  switch (t) {
    case ffi::DataType::F32:
      return typed(float{});
    case ffi::DataType::BF16:
      return typed(__nv_bfloat16{});
    case ffi::DataType::F16:
      return typed(__half{});
    default:
      return ffi::Error::InvalidArgument(std::string("jax_convnet ") + op +
                                         ": unsupported dtype");
  }
}

template <typename T, typename W>
ffi::Error run_typed(cudaStream_t stream, Op op, const jcn::PoolGeometry& pg, int64_t image_elems,
                     int64_t pooled_elems, const Buffers<T, W>& b) {
  const bool idx32 = jcn::pool::fits_int32(pg, image_elems, pooled_elems);
  return launch_vectorized<T>(
      "max_pool", op == Op::kGrad, pg, {{b.in, sizeof(T)}, {b.out, sizeof(T)}, {b.win, sizeof(W)}},
      [&](auto v) { dispatch_window<T, W, decltype(v)::value>(stream, op, pg, idx32, b); });
}

// Runs `op` with the storage type of `t` and the winners' type of the geometry (the plain
// forward, which has no winners, takes the one-byte instantiation).
ffi::Error run(cudaStream_t stream, Op op, ffi::DataType t, const jcn::PoolGeometry& pg,
               int64_t image_elems, int64_t pooled_elems, const void* in, void* out,
               void* win) {
  const bool narrow = op == Op::kForward || jcn::pool::winner_bytes(pg) == 1;
  auto typed = [&](auto zero) {
    using T = decltype(zero);
    auto with = [&](auto wzero) {
      using W = decltype(wzero);
      return run_typed<T, W>(stream, op, pg, image_elems, pooled_elems,
                             Buffers<T, W>{static_cast<const T*>(in), static_cast<T*>(out),
                                           static_cast<W*>(win)});
    };
    return narrow ? with(uint8_t{}) : with(int32_t{});
  };
  return with_storage_type(t, "max_pool", typed);
}

// ----------------------------------------------------------------------------------------------
// Average pooling (see csrc/README.md, "Average pool"). Bit-identical to the CPU kernels
// (csrc/cpu/pool.cc): each window's in-image elements summed in row-major order from 0 in
// float32, times r = 1 / float(divisor) rounded to nearest (__frcp_rn), rounded once to the
// storage type; the gradient of an image element is 0 + ct(w1) * r(w1) + ct(w2) * r(w2) + ...
// over the windows containing it in increasing (oy, ox). Products and sums use the _rn
// intrinsics so that nvcc never fuses them into an FMA (the CPU rounds each). Out-of-window /
// out-of-image terms are added as +0.0, which is bit-exact: a sum that starts at +0.0 never
// becomes -0.0 in round-to-nearest, and x + 0.0 == x for every other x.

// 1 / float(divisor) of the window whose first row / col is (y0, x0); +inf for a divisor of 0.
// In int64: window_h * window_w may exceed int32 even where the kernel indexes with int32.
__device__ __forceinline__ float avg_reciprocal(bool include, int64_t y0, int64_t x0,
                                                int64_t wh, int64_t ww, int64_t h, int64_t w) {
  const int64_t count = jcn::pool::window_divisor<int64_t>(include, y0, x0, wh, ww, h, w);
  return __frcp_rn(__ll2float_rn(count));
}

// Forward: one thread per pooled vector (o, oy, ox, V lanes), its window summed in row-major
// order. KH / KW > 0: window fixed at compile time (unrolled, out-of-image terms masked to +0.0
// and loaded from a clamped address); 0: runtime window over the clipped range.
template <typename T, int V, int KH, int KW, typename Idx>
__global__ void __launch_bounds__(kThreads)
    avg_pool_fwd_kernel(const T* __restrict__ img, T* __restrict__ out, const KGeom<Idx> g,
                        bool include) {
  using N = Num<T>;
  const Idx step = Idx(gridDim.x) * Idx(blockDim.x);
  for (Idx t = Idx(blockIdx.x) * Idx(blockDim.x) + Idx(threadIdx.x); t < g.total; t += step) {
    const auto [o, oy, ox, lane, y0, x0] = pooled_vector<V>(t, g);
    const Idx wh = KH > 0 ? Idx(KH) : g.wh;
    const Idx ww = KW > 0 ? Idx(KW) : g.ww;
    float sum[V];
#pragma unroll
    for (int l = 0; l < V; ++l) sum[l] = 0.0f;
    walk_window<T, V, KH, KW>(img, o, lane, y0, x0, clip_window(y0, x0, wh, ww, g), g,
                              [&](Idx, Idx, bool ok, const Vec<T, V>& v) {
#pragma unroll
      for (int l = 0; l < V; ++l) sum[l] = __fadd_rn(sum[l], ok ? N::to_f(v.v[l]) : 0.0f);
    });
    const float rcp = avg_reciprocal(include, int64_t(y0), int64_t(x0), int64_t(g.wh),
                                     int64_t(g.ww), int64_t(g.H), int64_t(g.W));
    Vec<T, V> res;
#pragma unroll
    for (int l = 0; l < V; ++l) res.v[l] = N::from_f(__fmul_rn(sum[l], rcp));
    *reinterpret_cast<Vec<T, V>*>(out + t * V) = res;
  }
}

// Gradient (gather, no atomics): one thread owns a kTile x kTile tile of image positions for V
// lanes (as max_pool_grad_kernel), visits the windows covering it in increasing (oy, ox), scales
// each window's cotangents by its reciprocal once and adds them to the tile positions inside the
// window (+0.0 to the others: branch-free, the accumulators stay in registers).
template <typename T, int V, typename Idx>
__global__ void __launch_bounds__(kThreads)
    avg_pool_grad_kernel(const T* __restrict__ ct, T* __restrict__ out, const KGeom<Idx> g,
                         bool include) {
  const Idx step = Idx(gridDim.x) * Idx(blockDim.x);
  for (Idx t = Idx(blockIdx.x) * Idx(blockDim.x) + Idx(threadIdx.x); t < g.total; t += step) {
    const GradTile<Idx> k = grad_tile<V>(t, g);
    float acc[kTile * kTile][V] = {};
    for (Idx oy = k.oy_lo; oy <= k.oy_hi; ++oy) {
      const Idx wy0 = oy * g.sh - g.pt;  // window origin in the image
      const Idx sy0 = wy0 - k.y0;        // ... relative to the tile
      for (Idx ox = k.ox_lo; ox <= k.ox_hi; ++ox) {
        const Idx wx0 = ox * g.sw - g.pl;
        const Idx sx0 = wx0 - k.x0;
        const float rcp = avg_reciprocal(include, int64_t(wy0), int64_t(wx0), int64_t(g.wh),
                                         int64_t(g.ww), int64_t(g.H), int64_t(g.W));
        const Vec<T, V> c = load_vec<T, V>(ct, ((k.o * g.Ho + oy) * g.Wo + ox) * g.I + k.lane);
        float scaled[V];
#pragma unroll
        for (int l = 0; l < V; ++l) scaled[l] = __fmul_rn(Num<T>::to_f(c.v[l]), rcp);
#pragma unroll
        for (int s = 0; s < kTile * kTile; ++s) {
          const Idx dy = Idx(s / kTile) - sy0, dx = Idx(s % kTile) - sx0;
          const bool inside = dy >= 0 && dy < g.wh && dx >= 0 && dx < g.ww;
#pragma unroll
          for (int l = 0; l < V; ++l) acc[s][l] = __fadd_rn(acc[s][l], inside ? scaled[l] : 0.0f);
        }
      }
    }
    store_tile<T, V>(acc, k, g, out);
  }
}

template <typename T, int V, int KH, int KW, typename Idx>
void avg_launch(cudaStream_t stream, bool grad, const jcn::PoolGeometry& pg, const T* in, T* out,
                bool include) {
  const KGeom<Idx> g = make_kgeom<Idx>(pg, V, grad ? Op::kGrad : Op::kForward);
  if (grad)
    avg_pool_grad_kernel<T, V, Idx><<<blocks_for(g), kThreads, 0, stream>>>(in, out, g, include);
  else
    avg_pool_fwd_kernel<T, V, KH, KW, Idx>
        <<<blocks_for(g), kThreads, 0, stream>>>(in, out, g, include);
}

// As dispatch_window: unrolled 2x2 / 3x3 forward windows with 32-bit indices.
template <typename T, int V>
void avg_dispatch(cudaStream_t stream, bool grad, const jcn::PoolGeometry& pg, bool idx32,
                  const T* in, T* out, bool include) {
  if (!idx32)
    avg_launch<T, V, 0, 0, int64_t>(stream, grad, pg, in, out, include);
  else if (!grad && pg.window_h == 2 && pg.window_w == 2)
    avg_launch<T, V, 2, 2, int32_t>(stream, grad, pg, in, out, include);
  else if (!grad && pg.window_h == 3 && pg.window_w == 3)
    avg_launch<T, V, 3, 3, int32_t>(stream, grad, pg, in, out, include);
  else
    avg_launch<T, V, 0, 0, int32_t>(stream, grad, pg, in, out, include);
}

template <typename T>
ffi::Error avg_run_typed(cudaStream_t stream, bool grad, const jcn::PoolGeometry& pg,
                         int64_t image_elems, int64_t pooled_elems, const T* in, T* out,
                         bool include) {
  const bool idx32 = jcn::pool::fits_int32(pg, image_elems, pooled_elems);
  return launch_vectorized<T>(
      "avg_pool", grad, pg, {{in, sizeof(T)}, {out, sizeof(T)}}, [&](auto v) {
        avg_dispatch<T, decltype(v)::value>(stream, grad, pg, idx32, in, out, include);
      });
}

// Runs the forward (grad false: in = images, out = pooled) or the gradient (in = pooled
// cotangents, out = image cotangents) with the storage type of `t`.
ffi::Error avg_run(cudaStream_t stream, bool grad, ffi::DataType t, const jcn::PoolGeometry& pg,
                   int64_t image_elems, int64_t pooled_elems, const void* in, void* out,
                   bool include) {
  auto typed = [&](auto zero) {
    using T = decltype(zero);
    return avg_run_typed<T>(stream, grad, pg, image_elems, pooled_elems,
                            static_cast<const T*>(in), static_cast<T*>(out), include);
  };
  return with_storage_type(t, "avg_pool", typed);
}

// ----------------------------------------------------------------------------------------------
// Handlers.

int64_t elems(const ffi::AnyBuffer& b) {
  int64_t n = 1;
  for (int64_t d : b.dimensions()) n *= d;
  return n;
}

ffi::Error MaxPoolImpl(cudaStream_t stream, ffi::AnyBuffer images,
                       ffi::Result<ffi::AnyBuffer> pooled, jcn::PoolParams p) {
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_pool_call("max_pool", p, images, *pooled, kAllowF64, &g);
  if (checked.failure()) return checked;
  return run(stream, Op::kForward, images.element_type(), g, elems(images), elems(*pooled),
             images.untyped_data(), pooled->untyped_data(), nullptr);
}

ffi::Error MaxPoolWinnersImpl(cudaStream_t stream, ffi::AnyBuffer images,
                              ffi::Result<ffi::AnyBuffer> pooled,
                              ffi::Result<ffi::AnyBuffer> winners, jcn::PoolParams p) {
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_pool_winners_call("max_pool_winners", p, images, *pooled,
                                                    *winners, kAllowF64, &g);
  if (checked.failure()) return checked;
  return run(stream, Op::kWinners, images.element_type(), g, elems(images), elems(*pooled),
             images.untyped_data(), pooled->untyped_data(), winners->untyped_data());
}

ffi::Error MaxPoolJvpImpl(cudaStream_t stream, ffi::AnyBuffer tangents, ffi::AnyBuffer winners,
                          ffi::Result<ffi::AnyBuffer> pooled_tangents, jcn::PoolParams p) {
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_pool_winners_call("max_pool_jvp", p, tangents,
                                                    *pooled_tangents, winners, kAllowF64, &g);
  if (checked.failure()) return checked;
  return run(stream, Op::kJvp, tangents.element_type(), g, elems(tangents),
             elems(*pooled_tangents), tangents.untyped_data(), pooled_tangents->untyped_data(),
             winners.untyped_data());
}

ffi::Error MaxPoolGradImpl(cudaStream_t stream, ffi::AnyBuffer cotangents, ffi::AnyBuffer winners,
                           ffi::Result<ffi::AnyBuffer> image_cotangents, jcn::PoolParams p) {
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_pool_winners_call("max_pool_grad", p, *image_cotangents,
                                                    cotangents, winners, kAllowF64, &g);
  if (checked.failure()) return checked;
  return run(stream, Op::kGrad, cotangents.element_type(), g, elems(*image_cotangents),
             elems(cotangents), cotangents.untyped_data(), image_cotangents->untyped_data(),
             winners.untyped_data());
}

ffi::Error AvgPoolImpl(cudaStream_t stream, ffi::AnyBuffer images,
                       ffi::Result<ffi::AnyBuffer> pooled, jcn::AvgPoolParams p) {
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_avg_pool_call("avg_pool", p, images, *pooled, kAllowF64, &g);
  if (checked.failure()) return checked;
  return avg_run(stream, false, images.element_type(), g, elems(images), elems(*pooled),
                 images.untyped_data(), pooled->untyped_data(), p.count_include_pad == 1);
}

ffi::Error AvgPoolGradImpl(cudaStream_t stream, ffi::AnyBuffer cotangents,
                           ffi::Result<ffi::AnyBuffer> image_cotangents, jcn::AvgPoolParams p) {
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_avg_pool_call("avg_pool_grad", p, *image_cotangents,
                                                cotangents, kAllowF64, &g);
  if (checked.failure()) return checked;
  return avg_run(stream, true, cotangents.element_type(), g, elems(*image_cotangents),
                 elems(cotangents), cotangents.untyped_data(), image_cotangents->untyped_data(),
                 p.count_include_pad == 1);
}

}  // namespace

// Bindings from the signatures above (csrc/common/ffi_common.h).
JCN_DEFINE_CUDA_HANDLER(AvgPoolCuda, AvgPoolImpl);
JCN_DEFINE_CUDA_HANDLER(AvgPoolGradCuda, AvgPoolGradImpl);
JCN_DEFINE_CUDA_HANDLER(MaxPoolCuda, MaxPoolImpl);
JCN_DEFINE_CUDA_HANDLER(MaxPoolWinnersCuda, MaxPoolWinnersImpl);
JCN_DEFINE_CUDA_HANDLER(MaxPoolJvpCuda, MaxPoolJvpImpl);
JCN_DEFINE_CUDA_HANDLER(MaxPoolGradCuda, MaxPoolGradImpl);
