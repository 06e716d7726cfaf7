// Max pooling on CUDA: max_pool, its JVP and its gradient (see csrc/README.md, "Max pool").
//
// Both layouts are one memory pattern [outer][H][W][inner] (C01B: outer = C, inner = B;
// NHWC: outer = B, inner = C), `inner` contiguous. Every thread works on a vector of V
// consecutive `inner` elements: V = 16 bytes / sizeof(T) (4 x f32, 8 x bf16 / f16) when `inner`
// is a multiple of V and all buffers are 16-byte aligned, otherwise V = 1 (scalar fallback).
// Consecutive threads take consecutive vectors, so every warp-wide load / store is contiguous.
//
// Bit-identical to the CPU kernels (csrc/cpu/pool.cc): forward / JVP copy the selected element
// unchanged; the gradient of an image element is 0 + ct(w1) + ct(w2) + ... over the windows that
// selected it in increasing (oy, ox) order, in float32, rounded once to the storage type.
// (Only NaN payloads of the gradient may differ: the GPU produces canonical NaNs.) Subnormals
// are compared and summed as IEEE values: do not build this file with -ftz=true / fast math.
//
// Gradient: overlapping windows (window > stride) take two passes, which move the fewest bytes
// and no atomics: the forward kernel records each window's selected element in one byte per
// lane (in the custom call's workspace result), then a gather sums the cotangents of the windows
// that selected each image element. Non-overlapping windows take one pass that recomputes the
// selection (each image element is read once either way). See the kernels for byte counts.
//
// Graph-safe: no allocation, no synchronisation, no host access to device data; one or two
// kernel launches per call on the given stream. Index arithmetic is 32-bit when everything
// provably fits (pool::fits_int32), else 64-bit; grids are 1-d with grid-stride loops (any size).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "ffi_common.h"
#include "pool_select.h"
#include "targets.h"

namespace ffi = xla::ffi;

namespace {

namespace jcn = jax_convnet;

constexpr int kThreads = 256;            // threads per block
constexpr int64_t kMaxBlocks = 1 << 22;  // grid cap: kMaxBlocks * kThreads = 2^30 (int32-safe)
constexpr int kTile = 2;                 // gradient: one thread owns kTile x kTile positions
// Bytes per thread along the contiguous dimension (16 or 8). 16 B vectors cost the bf16 / f16
// gradient kernel ~95 registers (32 float accumulators); 8 B would halve that per thread.
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

// Selected window offset (i << 4) | j of V lanes; i <= 14 and j <= 15 (uses_selection), so
// kSelNone (empty window) is never a valid offset.
constexpr int kSelNone = 255;
template <int V>
struct alignas(V) SelVec {
  uint8_t s[V];
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

// ----------------------------------------------------------------------------------------------
// Forward, JVP and selection. One thread per pooled vector (o, oy, ox, V lanes at i = iv*V): it
// scans the clipped window in row-major order, per lane keeps the selected value, and writes the
// selected image element (forward), the tangent at that element (JVP; -inf / 0 for an empty
// window), or its window offset as the byte (i << 4) | j (selection; kSelNone when empty).
// Bytes moved per image element (windows tiling the image, stride s_h x s_w; overlapping
// re-reads are served by L1/L2):
//   forward: sizeof(T) * (1 + 1/(s_h*s_w))   -- f32 2x2/2: 5 B, bf16: 2.5 B
//   JVP:     sizeof(T) * (2 + 1/(s_h*s_w))   -- f32 2x2/2: 9 B
//   select:  sizeof(T) + 1/(s_h*s_w)          -- f32 3x3/2: 4.25 B
// KH / KW > 0: window size fixed at compile time (loops fully unrolled, all loads of a window in
// flight at once; out-of-image elements predicated off); 0: runtime window over the clipped range.
enum class Scan { kValue, kTangent, kSelect };

template <typename T, int V, int KH, int KW, Scan kScan, typename Idx>
__global__ void __launch_bounds__(kThreads)
    max_pool_fwd_kernel(const T* __restrict__ img, const T* __restrict__ tan,
                        T* __restrict__ out, uint8_t* __restrict__ sel, const KGeom<Idx> g) {
  using N = Num<T>;
  constexpr bool kJvp = kScan == Scan::kTangent;
  const Idx step = Idx(gridDim.x) * Idx(blockDim.x);
  for (Idx t = Idx(blockIdx.x) * Idx(blockDim.x) + Idx(threadIdx.x); t < g.total; t += step) {
    // t = ((o*Ho + oy)*Wo + ox)*IV + iv, so the pooled vector sits at out + t*V.
    const Idx iv = t % g.IV;
    Idx r = t / g.IV;
    const Idx ox = r % g.Wo;
    r /= g.Wo;
    const Idx oy = r % g.Ho;
    const Idx o = r / g.Ho;
    const Idx lane = iv * V;

    const Idx wh = KH > 0 ? Idx(KH) : g.wh;
    const Idx ww = KW > 0 ? Idx(KW) : g.ww;
    const Idx y0 = oy * g.sh - g.pt;  // window's first row / col (may be outside the image)
    const Idx x0 = ox * g.sw - g.pl;
    // Window offsets kept after clipping: i in [i_lo, i_hi), j in [j_lo, j_hi).
    const Idx i_lo = y0 < 0 ? -y0 : Idx(0);
    const Idx i_hi = wh < g.H - y0 ? wh : g.H - y0;
    const Idx j_lo = x0 < 0 ? -x0 : Idx(0);
    const Idx j_hi = ww < g.W - x0 ? ww : g.W - x0;

    // The scan starts from best = -inf and uses takes_over(): no first-element case. A window
    // of -inf only selects its first element: the selection and the tangent start there.
    // kValue writes `best` back (exact: it holds a T value; bf16 by its bits, keeping NaN
    // payloads); float16's round trip through float could change a NaN's payload, so it keeps
    // the selected element itself.
    constexpr bool kBestIsResult = kScan == Scan::kValue && N::kExactFromFloatBits;
    const bool empty = i_lo >= i_hi || j_lo >= j_hi;
    const uint8_t first_code = empty ? uint8_t(kSelNone) : uint8_t((int(i_lo) << 4) | int(j_lo));
    Vec<T, V> res;
    SelVec<V> code;
    float best[V];
#pragma unroll
    for (int l = 0; l < V; ++l) {
      res.v[l] = kJvp ? N::zero() : N::neg_inf();
      code.s[l] = first_code;
      best[l] = -INFINITY;
    }
    // Compile-time window: all KH*KW positions, out-of-image ones masked by `ok` and loaded from
    // a clamped (valid, already-touched) address, so the unrolled body is branch-free and all
    // loads are in flight together. Runtime window: only the clipped range (ok always true).
    const Idx i_beg = KH > 0 ? Idx(0) : i_lo, i_end = KH > 0 ? Idx(KH) : i_hi;
    const Idx j_beg = KW > 0 ? Idx(0) : j_lo, j_end = KW > 0 ? Idx(KW) : j_hi;
#pragma unroll
    for (Idx i = i_beg; i < i_end; ++i) {
      const bool row_ok = i >= i_lo && i < i_hi;
      const Idx row = (o * g.H + clamp_idx<Idx>(y0 + i, g.H)) * g.W;
#pragma unroll
      for (Idx j = j_beg; j < j_end; ++j) {
        const bool ok = row_ok && j >= j_lo && j < j_hi;
        const bool first = i == i_lo && j == j_lo;  // (only the tangent needs it)
        const Idx off = (row + clamp_idx<Idx>(x0 + j, g.W)) * g.I + lane;
        const Vec<T, V> v = load_vec<T, V>(img, off);
        Vec<T, V> tv;
        if (kJvp) tv = load_vec<T, V>(tan, off);
#pragma unroll
        for (int l = 0; l < V; ++l) {
          const float f = N::to_f(v.v[l]);
          const bool take = ok & jcn::pool::takes_over(f, best[l]);
          best[l] = take ? f : best[l];
          if constexpr (kScan == Scan::kSelect) {
            code.s[l] = take ? uint8_t((int(i) << 4) | int(j)) : code.s[l];
          } else if constexpr (kJvp) {
            res.v[l] = (take | (ok & first)) ? tv.v[l] : res.v[l];
          } else if constexpr (!kBestIsResult) {
            res.v[l] = take ? v.v[l] : res.v[l];
          }
        }
      }
    }
    if constexpr (kBestIsResult) {
#pragma unroll
      for (int l = 0; l < V; ++l) res.v[l] = N::from_float_bits(best[l]);
    }
    if constexpr (kScan == Scan::kSelect) {
      *reinterpret_cast<SelVec<V>*>(sel + t * V) = code;
    } else {
      *reinterpret_cast<Vec<T, V>*>(out + t * V) = res;
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Gradient kernels (gather, no atomics). One thread owns a kTile x kTile tile of image positions
// (rows y0 = ty*kTile.., cols x0 = tx*kTile..) for V lanes. It visits the windows covering its
// tile in increasing (oy, ox), finds each window's selection per lane as the slot
// 0..kTile*kTile-1 of the tile it falls in (-1 when outside the tile), adds the window's
// cotangent to that slot's float32 accumulator, and finally writes its tile once.

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

// One pass, recomputing each covering window's selection from the image (non-overlapping
// windows, or windows too large for a selection byte). Bytes moved per image element: read image
// + write image cotangent + read cotangents: sizeof(T) * (2 + 1/(s_h*s_w)) -- f32 2x2/2: 9 B.
// A 2 x 2 tile shares its windows between 4 positions (2x2/2: one window per tile).
template <typename T, int V, int KH, int KW, typename Idx>
__global__ void __launch_bounds__(kThreads)
    max_pool_grad_kernel(const T* __restrict__ img, const T* __restrict__ ct,
                         T* __restrict__ out, const KGeom<Idx> g) {
  using N = Num<T>;
  const Idx step = Idx(gridDim.x) * Idx(blockDim.x);
  for (Idx t = Idx(blockIdx.x) * Idx(blockDim.x) + Idx(threadIdx.x); t < g.total; t += step) {
    const GradTile<Idx> k = grad_tile<V>(t, g);
    const Idx wh = KH > 0 ? Idx(KH) : g.wh;
    const Idx ww = KW > 0 ? Idx(KW) : g.ww;
    float acc[kTile * kTile][V] = {};
    for (Idx oy = k.oy_lo; oy <= k.oy_hi; ++oy) {
      const Idx wy0 = oy * g.sh - g.pt;
      const Idx i_lo = wy0 < 0 ? -wy0 : Idx(0);
      const Idx i_hi = wh < g.H - wy0 ? wh : g.H - wy0;
      for (Idx ox = k.ox_lo; ox <= k.ox_hi; ++ox) {
        const Idx wx0 = ox * g.sw - g.pl;
        const Idx j_lo = wx0 < 0 ? -wx0 : Idx(0);
        const Idx j_hi = ww < g.W - wx0 ? ww : g.W - wx0;
        // Cotangent of this window, loaded up front so it is in flight with the image loads.
        const Vec<T, V> c = load_vec<T, V>(ct, ((k.o * g.Ho + oy) * g.Wo + ox) * g.I + k.lane);
        float best[V];
        int sel[V];
        // As in the forward kernel: the scan starts from -inf (takes_over), and a window of -inf
        // selects its first element.
        const int first_slot = tile_slot(wy0 + i_lo - k.y0, wx0 + j_lo - k.x0);
#pragma unroll
        for (int l = 0; l < V; ++l) {
          best[l] = -INFINITY;
          sel[l] = first_slot;
        }
        // As in the forward kernel: branch-free unrolled body for a compile-time window.
        const Idx i_beg = KH > 0 ? Idx(0) : i_lo, i_end = KH > 0 ? Idx(KH) : i_hi;
        const Idx j_beg = KW > 0 ? Idx(0) : j_lo, j_end = KW > 0 ? Idx(KW) : j_hi;
#pragma unroll
        for (Idx i = i_beg; i < i_end; ++i) {
          const bool row_ok = i >= i_lo && i < i_hi;
          const Idx sy = wy0 + i - k.y0;  // row within the tile (valid when 0 <= sy < kTile)
          const Idx row = (k.o * g.H + clamp_idx<Idx>(wy0 + i, g.H)) * g.W;
#pragma unroll
          for (Idx j = j_beg; j < j_end; ++j) {
            const bool ok = row_ok && j >= j_lo && j < j_hi;
            const int slot = tile_slot(sy, wx0 + j - k.x0);
            const Vec<T, V> v =
                load_vec<T, V>(img, (row + clamp_idx<Idx>(wx0 + j, g.W)) * g.I + k.lane);
#pragma unroll
            for (int l = 0; l < V; ++l) {
              const float f = N::to_f(v.v[l]);
              const bool take = ok & jcn::pool::takes_over(f, best[l]);
              best[l] = take ? f : best[l];
              sel[l] = take ? slot : sel[l];
            }
          }
        }
        add_selected<T, V>(acc, sel, c);
      }
    }
    store_tile<T, V>(acc, k, g, out);
  }
}

// Second pass for overlapping windows: the selections recorded by max_pool_fwd_kernel<kSelect>
// (one byte per pooled element) replace the recompute, so the image is not read again and each
// window costs two loads instead of wh*ww. Bytes moved per image element, both passes:
// sizeof(T) * (2 + 1/(s_h*s_w)) + 2/(s_h*s_w)  -- f32 3x3/2: 9.5 B, bf16: 5 B.
template <typename T, int V, typename Idx>
__global__ void __launch_bounds__(kThreads)
    max_pool_grad_gather_kernel(const uint8_t* __restrict__ sel, const T* __restrict__ ct,
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
        const SelVec<V> code = *reinterpret_cast<const SelVec<V>*>(sel + w);
        int slot[V];
#pragma unroll
        for (int l = 0; l < V; ++l) {
          const int s = code.s[l];
          slot[l] = s != kSelNone ? tile_slot(sy0 + Idx(s >> 4), sx0 + Idx(s & 15)) : -1;
        }
        add_selected<T, V>(acc, slot, c);
      }
    }
    store_tile<T, V>(acc, k, g, out);
  }
}

// ----------------------------------------------------------------------------------------------
// Launch.

enum class Op { kForward, kJvp, kGrad };

constexpr bool kAllowF64 = false;  // no float64 on the GPU

// The two-pass gradient: windows overlap (else one pass reads each image element once anyway)
// and every window offset fits the selection byte (i <= 14, j <= 15).
bool uses_selection(const jcn::PoolGeometry& pg) {
  return (pg.window_h > pg.stride_h || pg.window_w > pg.stride_w) && pg.window_h <= 15 &&
         pg.window_w <= 16;
}

// Work items: pooled vectors (kForward / kJvp / the selection pass) or image tiles (kGrad).
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

// The buffers of one call. sel: the workspace (pooled-element bytes) when uses_selection.
template <typename T>
struct Buffers {
  const T* img;
  const T* second;  // tangents (JVP) / cotangents (gradient)
  T* out;
  uint8_t* sel;
};

template <typename T, int V, int KH, int KW, typename Idx>
void launch(cudaStream_t stream, Op op, const jcn::PoolGeometry& pg, const Buffers<T>& b) {
  const KGeom<Idx> g = make_kgeom<Idx>(pg, V, op);
  switch (op) {
    case Op::kForward:
      max_pool_fwd_kernel<T, V, KH, KW, Scan::kValue, Idx>
          <<<blocks_for(g), kThreads, 0, stream>>>(b.img, nullptr, b.out, nullptr, g);
      break;
    case Op::kJvp:
      max_pool_fwd_kernel<T, V, KH, KW, Scan::kTangent, Idx>
          <<<blocks_for(g), kThreads, 0, stream>>>(b.img, b.second, b.out, nullptr, g);
      break;
    case Op::kGrad:
      if (b.sel != nullptr) {
        const KGeom<Idx> gs = make_kgeom<Idx>(pg, V, Op::kForward);
        max_pool_fwd_kernel<T, V, KH, KW, Scan::kSelect, Idx>
            <<<blocks_for(gs), kThreads, 0, stream>>>(b.img, nullptr, nullptr, b.sel, gs);
        max_pool_grad_gather_kernel<T, V, Idx>
            <<<blocks_for(g), kThreads, 0, stream>>>(b.sel, b.second, b.out, g);
      } else {
        max_pool_grad_kernel<T, V, KH, KW, Idx>
            <<<blocks_for(g), kThreads, 0, stream>>>(b.img, b.second, b.out, g);
      }
      break;
  }
}

// 32-bit indices: 2x2 and 3x3 windows get unrolled kernels, others the runtime-window kernel.
// 64-bit indices (huge tensors only): runtime-window kernel.
template <typename T, int V>
void dispatch_window(cudaStream_t stream, Op op, const jcn::PoolGeometry& pg, bool idx32,
                     const Buffers<T>& b) {
  if (!idx32)
    launch<T, V, 0, 0, int64_t>(stream, op, pg, b);
  else if (pg.window_h == 2 && pg.window_w == 2)
    launch<T, V, 2, 2, int32_t>(stream, op, pg, b);
  else if (pg.window_h == 3 && pg.window_w == 3)
    launch<T, V, 3, 3, int32_t>(stream, op, pg, b);
  else
    launch<T, V, 0, 0, int32_t>(stream, op, pg, b);
}

template <typename T>
ffi::Error run_typed(cudaStream_t stream, Op op, const jcn::PoolGeometry& pg, int64_t image_elems,
                     int64_t pooled_elems, const Buffers<T>& b) {
  constexpr int kVecFwd = int(kFwdVecBytes / sizeof(T));
  constexpr int kVecGrad = int(kGradVecBytes / sizeof(T));
  // Vector path: the contiguous dimension is a multiple of V and every buffer is aligned to the
  // vector size (XLA's buffers always are; checked anyway, host-side pointer values only).
  auto vec_ok = [&](int v) {
    auto aligned = [v](const void* p, size_t elem) {
      return p == nullptr || uintptr_t(p) % (uintptr_t(v) * elem) == 0;
    };
    return jcn::pool::inner_size(pg) % v == 0 && aligned(b.img, sizeof(T)) &&
           aligned(b.second, sizeof(T)) && aligned(b.out, sizeof(T)) && aligned(b.sel, 1);
  };
  const bool idx32 = jcn::pool::fits_int32(pg, image_elems, pooled_elems);
  if (op == Op::kGrad && vec_ok(kVecGrad))
    dispatch_window<T, kVecGrad>(stream, op, pg, idx32, b);
  else if (op != Op::kGrad && vec_ok(kVecFwd))
    dispatch_window<T, kVecFwd>(stream, op, pg, idx32, b);
  else
    dispatch_window<T, 1>(stream, op, pg, idx32, b);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("jax_convnet max_pool: kernel launch failed: ") +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error run(cudaStream_t stream, Op op, ffi::DataType t, const jcn::PoolGeometry& pg,
               int64_t image_elems, int64_t pooled_elems, const void* img, const void* second,
               void* out, void* sel = nullptr) {
  auto typed = [&](auto zero) {
    using T = decltype(zero);
    return run_typed<T>(stream, op, pg, image_elems, pooled_elems,
                        Buffers<T>{static_cast<const T*>(img), static_cast<const T*>(second),
                                   static_cast<T*>(out), static_cast<uint8_t*>(sel)});
  };
  switch (t) {
    case ffi::DataType::F32:
      return typed(float{});
    case ffi::DataType::BF16:
      return typed(__nv_bfloat16{});
    case ffi::DataType::F16:
      return typed(__half{});
    default:
      return ffi::Error::InvalidArgument("jax_convnet max_pool: unsupported dtype");
  }
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
  const char* op = "max_pool";
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_pool_call(op, p, images, *pooled, kAllowF64, &g);
  if (checked.failure()) return checked;
  return run(stream, Op::kForward, images.element_type(), g, elems(images), elems(*pooled),
             images.untyped_data(), nullptr, pooled->untyped_data());
}

ffi::Error MaxPoolJvpImpl(cudaStream_t stream, ffi::AnyBuffer images, ffi::AnyBuffer tangents,
                          ffi::Result<ffi::AnyBuffer> pooled_tangents, jcn::PoolParams p) {
  const char* op = "max_pool_jvp";
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_pool_call(op, p, images, *pooled_tangents, kAllowF64, &g);
  if (checked.failure()) return checked;
  if (tangents.element_type() != images.element_type())
    return jcn::invalid(op, "operands and result must share one dtype");
  if (!(tangents.dimensions() == images.dimensions()))
    return jcn::invalid(op, "tangents' shape differs from the images'");
  return run(stream, Op::kJvp, images.element_type(), g, elems(images), elems(*pooled_tangents),
             images.untyped_data(), tangents.untyped_data(), pooled_tangents->untyped_data());
}

// `workspace`: one byte per pooled element (jax_convnet/pool.py sizes it), for the selections
// of the two-pass gradient.
ffi::Error MaxPoolGradImpl(cudaStream_t stream, ffi::AnyBuffer images, ffi::AnyBuffer cotangents,
                           ffi::Result<ffi::AnyBuffer> image_cotangents,
                           ffi::Result<ffi::AnyBuffer> workspace, jcn::PoolParams p) {
  const char* op = "max_pool_grad";
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_pool_call(op, p, images, cotangents, kAllowF64, &g);
  if (checked.failure()) return checked;
  if (image_cotangents->element_type() != images.element_type())
    return jcn::invalid(op, "operands and result must share one dtype");
  if (!(image_cotangents->dimensions() == images.dimensions()))
    return jcn::invalid(op, "image cotangents' shape differs from the images'");
  if (int64_t(workspace->size_bytes()) < elems(cotangents))
    return jcn::invalid(op, "workspace of " + std::to_string(workspace->size_bytes()) +
                                " bytes is smaller than one byte per pooled element");
  return run(stream, Op::kGrad, images.element_type(), g, elems(images), elems(cotangents),
             images.untyped_data(), cotangents.untyped_data(), image_cotangents->untyped_data(),
             uses_selection(g) ? workspace->untyped_data() : nullptr);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolCuda, MaxPoolImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attrs<jax_convnet::PoolParams>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolJvpCuda, MaxPoolJvpImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attrs<jax_convnet::PoolParams>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolGradCuda, MaxPoolGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attrs<jax_convnet::PoolParams>(),
                              {ffi::Traits::kCmdBufferCompatible});
