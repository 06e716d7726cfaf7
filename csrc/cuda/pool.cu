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
// Graph-safe: no allocation, no synchronisation, no host access to device data; one kernel
// launch per call on the given stream. Index arithmetic is 32-bit when everything provably fits
// (pool::fits_int32), else 64-bit; grids are 1-d with grid-stride loops (any size).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "ffi_common.h"
#include "pool_select.h"
#include "targets.h"

namespace ffi = xla::ffi;

namespace {

namespace jcn = jax_convnet;

// Kernel selection. Default: the shared-memory tiled gradient for overlapping windows and the
// two-outputs-per-thread 2x2 forward ("Tiled and paired kernels" below); both passed the GPU tests
// bitwise (H200, bc03a1d) but are not yet timed against the per-window kernels, which
// JAX_CONVNET_POOL_KERNELS=per_window selects (read once; for benchmarking both in one run).
// Drop the loser once both are measured.
bool use_tiled_pool_kernels() {
  static const bool tiled = [] {
    const char* v = std::getenv("JAX_CONVNET_POOL_KERNELS");
    return v == nullptr || std::string(v) != "per_window";
  }();
  return tiled;
}

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
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ __nv_bfloat16 neg_inf() { return __ushort_as_bfloat16(0xff80); }
  static __device__ __forceinline__ __nv_bfloat16 zero() { return __ushort_as_bfloat16(0); }
};
template <>
struct Num<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ __half neg_inf() { return __ushort_as_half(0xfc00); }
  static __device__ __forceinline__ __half zero() { return __ushort_as_half(0); }
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
// Forward and JVP. One thread per pooled vector (o, oy, ox, V lanes at i = iv*V): it scans the
// clipped window in row-major order, per lane keeps the selected value, and writes the selected
// image element (forward) or the tangent at that element (JVP); -inf / 0 for an empty window.
// Bytes moved per image element (windows tiling the image, stride s_h x s_w; overlapping
// re-reads are served by L1/L2):
//   forward: sizeof(T) * (1 + 1/(s_h*s_w))   -- f32 2x2/2: 5 B, bf16: 2.5 B
//   JVP:     sizeof(T) * (2 + 1/(s_h*s_w))   -- f32 2x2/2: 9 B
// KH / KW > 0: window size fixed at compile time (loops fully unrolled, all loads of a window in
// flight at once; out-of-image elements predicated off); 0: runtime window over the clipped range.
template <typename T, int V, int KH, int KW, bool kJvp, typename Idx>
__global__ void __launch_bounds__(kThreads)
    max_pool_fwd_kernel(const T* __restrict__ img, const T* __restrict__ tan,
                        T* __restrict__ out, const KGeom<Idx> g) {
  using N = Num<T>;
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

    Vec<T, V> res;
    float best[V];
#pragma unroll
    for (int l = 0; l < V; ++l) {
      res.v[l] = kJvp ? N::zero() : N::neg_inf();
      best[l] = 0.0f;
    }
    bool first = true;
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
        const Idx off = (row + clamp_idx<Idx>(x0 + j, g.W)) * g.I + lane;
        const Vec<T, V> v = load_vec<T, V>(img, off);
        Vec<T, V> tv;
        if (kJvp) tv = load_vec<T, V>(tan, off);
#pragma unroll
        for (int l = 0; l < V; ++l) {
          const float f = N::to_f(v.v[l]);
          const bool take = ok & jcn::pool::takes(first, f, best[l]);
          best[l] = take ? f : best[l];
          res.v[l] = take ? (kJvp ? tv.v[l] : v.v[l]) : res.v[l];
        }
        first = first & !ok;
      }
    }
    *reinterpret_cast<Vec<T, V>*>(out + t * V) = res;
  }
}

// ----------------------------------------------------------------------------------------------
// Gradient (gather, recompute, no atomics). One thread owns a kTile x kTile tile of image
// positions (rows y0 = ty*kTile.., cols x0 = tx*kTile..) for V lanes. It visits the windows
// covering its tile in increasing (oy, ox), recomputes each window's selection per lane (as the
// slot 0..kTile*kTile-1 of the tile it falls in, or -1 when outside the tile), adds the window's
// cotangent to that slot's float32 accumulator, and finally writes its tile once.
// Windows overlapping several tiles are recomputed by each (re-reads come from L1/L2); a tile of
// 2 x 2 shares them between 4 positions (3x3/2: 4 windows per tile instead of 9 per position).
// Bytes moved per image element: read image + write image cotangent + read cotangents:
//   sizeof(T) * (2 + 1/(s_h*s_w))   -- f32 2x2/2: 9 B, bf16: 4.5 B
template <typename T, int V, int KH, int KW, typename Idx>
__global__ void __launch_bounds__(kThreads)
    max_pool_grad_kernel(const T* __restrict__ img, const T* __restrict__ ct,
                         T* __restrict__ out, const KGeom<Idx> g) {
  using N = Num<T>;
  constexpr int kSlots = kTile * kTile;
  const Idx step = Idx(gridDim.x) * Idx(blockDim.x);
  for (Idx t = Idx(blockIdx.x) * Idx(blockDim.x) + Idx(threadIdx.x); t < g.total; t += step) {
    // t = ((o*TH + ty)*TW + tx)*IV + iv
    const Idx iv = t % g.IV;
    Idx r = t / g.IV;
    const Idx tx = r % g.TW;
    r /= g.TW;
    const Idx ty = r % g.TH;
    const Idx o = r / g.TH;
    const Idx lane = iv * V;

    const Idx wh = KH > 0 ? Idx(KH) : g.wh;
    const Idx ww = KW > 0 ? Idx(KW) : g.ww;
    const Idx y0 = ty * kTile, x0 = tx * kTile;  // tile origin (inside the image)
    const Idx ny = kTile < g.H - y0 ? Idx(kTile) : g.H - y0;  // tile rows / cols in the image
    const Idx nx = kTile < g.W - x0 ? Idx(kTile) : g.W - x0;

    float acc[kSlots][V];
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
#pragma unroll
      for (int l = 0; l < V; ++l) acc[s][l] = 0.0f;

    // Windows covering rows [y0, y0+ny-1] / cols [x0, x0+nx-1]; each is non-empty after
    // clipping since it overlaps the tile, which lies inside the image.
    Idx oy_lo, oy_hi, ox_lo, ox_hi;
    jcn::pool::covering_windows<Idx>(y0, y0 + ny - 1, g.pt, wh, g.sh, g.Ho, &oy_lo, &oy_hi);
    jcn::pool::covering_windows<Idx>(x0, x0 + nx - 1, g.pl, ww, g.sw, g.Wo, &ox_lo, &ox_hi);

    for (Idx oy = oy_lo; oy <= oy_hi; ++oy) {
      const Idx wy0 = oy * g.sh - g.pt;
      const Idx i_lo = wy0 < 0 ? -wy0 : Idx(0);
      const Idx i_hi = wh < g.H - wy0 ? wh : g.H - wy0;
      for (Idx ox = ox_lo; ox <= ox_hi; ++ox) {
        const Idx wx0 = ox * g.sw - g.pl;
        const Idx j_lo = wx0 < 0 ? -wx0 : Idx(0);
        const Idx j_hi = ww < g.W - wx0 ? ww : g.W - wx0;
        // Cotangent of this window, loaded up front so it is in flight with the image loads.
        const Vec<T, V> c = load_vec<T, V>(ct, ((o * g.Ho + oy) * g.Wo + ox) * g.I + lane);

        float best[V];
        int sel[V];
#pragma unroll
        for (int l = 0; l < V; ++l) {
          best[l] = 0.0f;
          sel[l] = -1;
        }
        bool first = true;
        // As in the forward kernel: branch-free unrolled body for a compile-time window.
        const Idx i_beg = KH > 0 ? Idx(0) : i_lo, i_end = KH > 0 ? Idx(KH) : i_hi;
        const Idx j_beg = KW > 0 ? Idx(0) : j_lo, j_end = KW > 0 ? Idx(KW) : j_hi;
#pragma unroll
        for (Idx i = i_beg; i < i_end; ++i) {
          const bool row_ok = i >= i_lo && i < i_hi;
          const Idx sy = wy0 + i - y0;  // row within the tile (valid when 0 <= sy < kTile)
          const Idx row = (o * g.H + clamp_idx<Idx>(wy0 + i, g.H)) * g.W;
#pragma unroll
          for (Idx j = j_beg; j < j_end; ++j) {
            const bool ok = row_ok && j >= j_lo && j < j_hi;
            const Idx sx = wx0 + j - x0;
            const int slot = (sy >= 0 && sy < kTile && sx >= 0 && sx < kTile)
                                 ? int(sy) * kTile + int(sx)
                                 : -1;
            const Vec<T, V> v =
                load_vec<T, V>(img, (row + clamp_idx<Idx>(wx0 + j, g.W)) * g.I + lane);
#pragma unroll
            for (int l = 0; l < V; ++l) {
              const float f = N::to_f(v.v[l]);
              const bool take = ok & jcn::pool::takes(first, f, best[l]);
              best[l] = take ? f : best[l];
              sel[l] = take ? slot : sel[l];
            }
            first = first & !ok;
          }
        }
        // Branch-free on purpose: `if (sel == s) acc[s] += cf` gets rewritten by the compiler
        // into acc[sel] += cf, a dynamically indexed array in local memory. Adding +0.0 instead
        // is bit-exact: acc starts at +0.0 and can never become -0.0 (x + y is -0.0 only when
        // both are -0.0), and x + 0.0 == x for every other x (inf included; NaN stays NaN).
#pragma unroll
        for (int l = 0; l < V; ++l) {
          const float cf = N::to_f(c.v[l]);
#pragma unroll
          for (int s = 0; s < kSlots; ++s) acc[s][l] += sel[l] == s ? cf : 0.0f;
        }
      }
    }

#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const Idx sy = s / kTile, sx = s % kTile;
      if (sy < ny && sx < nx) {
        Vec<T, V> q;
#pragma unroll
        for (int l = 0; l < V; ++l) q.v[l] = N::from_f(acc[s][l]);
        *reinterpret_cast<Vec<T, V>*>(out + ((o * g.H + (y0 + sy)) * g.W + (x0 + sx)) * g.I +
                                      lane) = q;
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Tiled and paired kernels (use_tiled_pool_kernels()).
//
// Tiled gradient for overlapping windows (window_h > stride_h or window_w > stride_w). A block
// owns a tile of TY x TX pooled windows (oy0 = ty*TY.., ox0 = tx*TX..) for LG consecutive
// vectors (LG*V lanes) of `inner`, and the disjoint set of image rows
//   [R(ty), R(ty+1)),  R(0) = 0,  R(k) = clamp(k*TY*sh - pt, 0, H),  R(NTY) = H
// (columns likewise), so every image element is written by exactly one block, once.
// The windows covering an owned row y all lie in [oy0 - HY, oy0 + TY) with HY = (wh - 1) / sh
// (the HY "halo" windows above the tile are recomputed here), so the block:
//   1. stages the image rows / cols those NWY x NWX = (TY+HY) x (TX+HX) windows read
//      (SR = (NWY-1)*sh + wh rows, SC cols, zeros outside the image) in shared memory,
//      coalesced 16-byte loads, each image vector loaded once per block;
//   2. one thread per (window, vector): scans the clipped window in row-major order from shared
//      memory, stores the selected slot i*ww + j per lane (255: empty window / no selection) and
//      the window's cotangent vector (loaded once);
//   3. one thread per owned (y, x, vector): visits its covering windows in increasing (oy, ox)
//      and adds ct where the window's slot is this element (+0.0 otherwise, bit-exact as in
//      max_pool_grad_kernel), in float32, and writes the element once.
// Requires 32-bit indices, the vector path, LG | IV and wh*ww <= 254.
constexpr int kSelNone = 255;

template <int V>
struct alignas(V) SelVec {
  uint8_t s[V];
};

struct TGeom {
  int O, H, W, I, Ho, Wo;
  int wh, ww, sh, sw, pt, pl;
  int LG, lg_shift;  // vectors per block (power of two dividing I / V) and log2(LG)
  int TY, TX;        // windows per tile
  int HY, HX;        // halo windows before the tile
  int NWY, NWX;      // staged windows: TY + HY, TX + HX
  int SR, SC;        // staged image rows / cols
  int NTY, NTX, NLG; // tiles per column / row, vector groups
  int tiles;         // O * NTY * NTX * NLG
};

inline size_t tiled_smem_bytes(const TGeom& g, size_t vec_bytes, int V) {
  const size_t wins = size_t(g.NWY) * g.NWX * g.LG;
  return size_t(g.SR) * g.SC * g.LG * vec_bytes + wins * vec_bytes + wins * size_t(V);
}

template <typename T, int V, int KH, int KW>
__global__ void __launch_bounds__(kThreads)
    max_pool_grad_tiled_kernel(const T* __restrict__ img, const T* __restrict__ ct,
                               T* __restrict__ out, const TGeom g) {
  using N = Num<T>;
  using VT = Vec<T, V>;
  extern __shared__ __align__(16) unsigned char smem[];
  VT* s_img = reinterpret_cast<VT*>(smem);
  VT* s_ct = s_img + g.SR * g.SC * g.LG;
  SelVec<V>* s_sel = reinterpret_cast<SelVec<V>*>(s_ct + g.NWY * g.NWX * g.LG);
  const int wh = KH > 0 ? KH : g.wh;
  const int ww = KW > 0 ? KW : g.ww;
  const int lgm = g.LG - 1;
  const int tid = int(threadIdx.x);

  for (int tile = int(blockIdx.x); tile < g.tiles; tile += int(gridDim.x)) {
    int r = tile;
    const int cl = r % g.NLG;
    r /= g.NLG;
    const int tx = r % g.NTX;
    r /= g.NTX;
    const int ty = r % g.NTY;
    const int o = r / g.NTY;
    const int oy0 = ty * g.TY, ox0 = tx * g.TX;
    const int wyb = oy0 - g.HY, wxb = ox0 - g.HX;            // first staged window
    const int ry = wyb * g.sh - g.pt, rx = wxb * g.sw - g.pl;  // its first image row / col
    const int lane0 = cl * g.LG * V;                          // first lane of the block
    const int img_o = o * g.H;

    if (tile != int(blockIdx.x)) __syncthreads();  // previous tile is done with shared memory

    // 1. Stage the image, 4 independent loads in flight per thread.
    const int n_st = (g.SR * g.SC) << g.lg_shift;
    for (int e0 = tid; e0 < n_st; e0 += 4 * kThreads) {
      VT v[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int e = e0 + k * kThreads;
        const int lg = e & lgm;
        const int p = e >> g.lg_shift;
        const int y = ry + p / g.SC, x = rx + p % g.SC;
#pragma unroll
        for (int l = 0; l < V; ++l) v[k].v[l] = N::zero();
        if (e < n_st && y >= 0 && y < g.H && x >= 0 && x < g.W)
          v[k] = load_vec<T, V>(img, ((img_o + y) * g.W + x) * g.I + lane0 + lg * V);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (e0 + k * kThreads < n_st) s_img[e0 + k * kThreads] = v[k];
    }
    __syncthreads();

    // 2. Selections and cotangents of the staged windows.
    const int n_w = (g.NWY * g.NWX) << g.lg_shift;
    for (int e = tid; e < n_w; e += kThreads) {
      const int lg = e & lgm;
      const int p = e >> g.lg_shift;
      const int wy = p / g.NWX, wx = p % g.NWX;
      const int oy = wyb + wy, ox = wxb + wx;
      SelVec<V> sel;
      VT c;
#pragma unroll
      for (int l = 0; l < V; ++l) {
        sel.s[l] = uint8_t(kSelNone);
        c.v[l] = N::zero();
      }
      if (oy >= 0 && oy < g.Ho && ox >= 0 && ox < g.Wo) {
        c = load_vec<T, V>(ct, ((o * g.Ho + oy) * g.Wo + ox) * g.I + lane0 + lg * V);
        const int y0 = oy * g.sh - g.pt, x0 = ox * g.sw - g.pl;
        const int i_lo = y0 < 0 ? -y0 : 0;
        const int i_hi = wh < g.H - y0 ? wh : g.H - y0;
        const int j_lo = x0 < 0 ? -x0 : 0;
        const int j_hi = ww < g.W - x0 ? ww : g.W - x0;
        // Window's first staged element: row wy*sh, col wx*sw of the staged block.
        const VT* base = s_img + ((wy * g.sh) * g.SC + wx * g.sw) * g.LG + lg;
        float best[V];
#pragma unroll
        for (int l = 0; l < V; ++l) best[l] = 0.0f;
        bool first = true;
        const int i_beg = KH > 0 ? 0 : i_lo, i_end = KH > 0 ? KH : i_hi;
        const int j_beg = KW > 0 ? 0 : j_lo, j_end = KW > 0 ? KW : j_hi;
#pragma unroll
        for (int i = i_beg; i < i_end; ++i) {
          const bool row_ok = i >= i_lo && i < i_hi;
#pragma unroll
          for (int j = j_beg; j < j_end; ++j) {
            const bool ok = row_ok && j >= j_lo && j < j_hi;
            // Always inside the staged block (out-of-image entries are zeros, masked by ok).
            const VT v = base[(i * g.SC + j) * g.LG];
            const uint8_t slot = uint8_t(i * ww + j);
#pragma unroll
            for (int l = 0; l < V; ++l) {
              const float f = N::to_f(v.v[l]);
              const bool take = ok & jcn::pool::takes(first, f, best[l]);
              best[l] = take ? f : best[l];
              sel.s[l] = take ? slot : sel.s[l];
            }
            first = first & !ok;
          }
        }
      }
      s_sel[e] = sel;
      s_ct[e] = c;
    }
    __syncthreads();

    // 3. Owned image elements: gather from the covering windows, write once.
    const int y_lo = ty == 0 ? 0 : clamp_idx<int>(oy0 * g.sh - g.pt, g.H + 1);
    const int y_hi = ty == g.NTY - 1 ? g.H : clamp_idx<int>((oy0 + g.TY) * g.sh - g.pt, g.H + 1);
    const int x_lo = tx == 0 ? 0 : clamp_idx<int>(ox0 * g.sw - g.pl, g.W + 1);
    const int x_hi = tx == g.NTX - 1 ? g.W : clamp_idx<int>((ox0 + g.TX) * g.sw - g.pl, g.W + 1);
    const int n_ox = x_hi - x_lo;
    const int n_o = n_ox > 0 && y_hi > y_lo ? ((y_hi - y_lo) * n_ox) << g.lg_shift : 0;
    for (int e = tid; e < n_o; e += kThreads) {
      const int lg = e & lgm;
      const int p = e >> g.lg_shift;
      const int y = y_lo + p / n_ox, x = x_lo + p % n_ox;
      float acc[V];
#pragma unroll
      for (int l = 0; l < V; ++l) acc[l] = 0.0f;
      int oy_lo, oy_hi, ox_lo, ox_hi;
      jcn::pool::covering_windows<int>(y, y, g.pt, wh, g.sh, g.Ho, &oy_lo, &oy_hi);
      jcn::pool::covering_windows<int>(x, x, g.pl, ww, g.sw, g.Wo, &ox_lo, &ox_hi);
      for (int oy = oy_lo; oy <= oy_hi; ++oy) {
        const int i = y - (oy * g.sh - g.pt);
        const int wrow = (oy - wyb) * g.NWX - wxb;
        for (int ox = ox_lo; ox <= ox_hi; ++ox) {
          const int slot = i * ww + (x - (ox * g.sw - g.pl));
          const int w = ((wrow + ox) << g.lg_shift) + lg;
          const SelVec<V> sel = s_sel[w];
          const VT c = s_ct[w];
#pragma unroll
          for (int l = 0; l < V; ++l) acc[l] += int(sel.s[l]) == slot ? N::to_f(c.v[l]) : 0.0f;
        }
      }
      VT q;
#pragma unroll
      for (int l = 0; l < V; ++l) q.v[l] = N::from_f(acc[l]);
      *reinterpret_cast<VT*>(out + ((img_o + y) * g.W + x) * g.I + lane0 + lg * V) = q;
    }
  }
}

// Forward / JVP, two horizontally adjacent outputs (ox = 2*oxp, 2*oxp + 1) per thread for
// compile-time windows: both windows' loads are issued together (2*KH*KW independent 16-byte
// loads in flight; for 3x3/2 the shared column is a second L1 hit, not a DRAM read). The forward
// keeps no float `best`: it is recomputed from the selected value (to_f is exact), which saves
// V registers per output. Same scan, same selection, same bits as max_pool_fwd_kernel.
// Work items: O * Ho * ceil(Wo / 2) * IV (t = ((o*Ho + oy)*WP + oxp)*IV + iv).
template <typename T, int V, int KH, int KW, bool kJvp>
__global__ void __launch_bounds__(kThreads)
    max_pool_fwd2_kernel(const T* __restrict__ img, const T* __restrict__ tan,
                         T* __restrict__ out, const KGeom<int> g, const int WP, const int total) {
  using N = Num<T>;
  const int step = int(gridDim.x) * int(blockDim.x);
  for (int t = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x); t < total; t += step) {
    const int iv = t % g.IV;
    int r = t / g.IV;
    const int oxp = r % WP;
    r /= WP;
    const int oy = r % g.Ho;
    const int o = r / g.Ho;
    const int lane = iv * V;
    const int y0 = oy * g.sh - g.pt;
    const int i_lo = y0 < 0 ? -y0 : 0;
    const int i_hi = KH < g.H - y0 ? KH : g.H - y0;
    int x0[2], j_lo[2], j_hi[2];
    bool has[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int ox = 2 * oxp + k;
      has[k] = ox < g.Wo;
      x0[k] = ox * g.sw - g.pl;
      j_lo[k] = x0[k] < 0 ? -x0[k] : 0;
      j_hi[k] = has[k] ? (KW < g.W - x0[k] ? KW : g.W - x0[k]) : 0;  // no output: all masked
    }
    Vec<T, V> res[2];
    float best[kJvp ? 2 : 1][V];
#pragma unroll
    for (int k = 0; k < 2; ++k)
#pragma unroll
      for (int l = 0; l < V; ++l) {
        res[k].v[l] = kJvp ? N::zero() : N::neg_inf();
        if (kJvp) best[kJvp ? k : 0][l] = 0.0f;
      }
    bool first0 = true, first1 = true;
#pragma unroll
    for (int i = 0; i < KH; ++i) {
      const bool row_ok = i >= i_lo && i < i_hi;
      const int row = (o * g.H + clamp_idx<int>(y0 + i, g.H)) * g.W;
      Vec<T, V> v[2][KW], tv[2][KW];
      // All loads of this window row for both outputs first, then the selections.
#pragma unroll
      for (int k = 0; k < 2; ++k)
#pragma unroll
        for (int j = 0; j < KW; ++j) {
          const int off = (row + clamp_idx<int>(x0[k] + j, g.W)) * g.I + lane;
          v[k][j] = load_vec<T, V>(img, off);
          if (kJvp) tv[k][j] = load_vec<T, V>(tan, off);
        }
#pragma unroll
      for (int k = 0; k < 2; ++k)
#pragma unroll
        for (int j = 0; j < KW; ++j) {
          const bool ok = row_ok && j >= j_lo[k] && j < j_hi[k];
#pragma unroll
          for (int l = 0; l < V; ++l) {
            const float f = N::to_f(v[k][j].v[l]);
            const float b = kJvp ? best[kJvp ? k : 0][l] : N::to_f(res[k].v[l]);
            const bool take = ok & jcn::pool::takes(k == 0 ? first0 : first1, f, b);
            if (kJvp) best[kJvp ? k : 0][l] = take ? f : b;
            res[k].v[l] = take ? (kJvp ? tv[k][j].v[l] : v[k][j].v[l]) : res[k].v[l];
          }
          if (k == 0) first0 = first0 & !ok; else first1 = first1 & !ok;
        }
    }
    const int obase = ((o * g.Ho + oy) * g.Wo + 2 * oxp) * g.I + lane;
    *reinterpret_cast<Vec<T, V>*>(out + obase) = res[0];
    if (has[1]) *reinterpret_cast<Vec<T, V>*>(out + obase + g.I) = res[1];
  }
}

// The sizes every kernel geometry (KGeom, TGeom) holds, in index type Idx.
template <typename Idx, typename G>
void set_dims(const jcn::PoolGeometry& pg, G* g) {
  g->O = Idx(jcn::pool::outer_size(pg));
  g->H = Idx(pg.in_h);
  g->W = Idx(pg.in_w);
  g->I = Idx(jcn::pool::inner_size(pg));
  g->Ho = Idx(pg.out_h);
  g->Wo = Idx(pg.out_w);
  g->wh = Idx(pg.window_h);
  g->ww = Idx(pg.window_w);
  g->sh = Idx(pg.stride_h);
  g->sw = Idx(pg.stride_w);
  g->pt = Idx(pg.pad_top);
  g->pl = Idx(pg.pad_left);
}

// Tiled-gradient geometry for a call, or false when the tiled kernel does not apply.
inline bool make_tgeom(const jcn::PoolGeometry& pg, int V, size_t vec_bytes, TGeom* out) {
  TGeom g;
  set_dims<int>(pg, &g);
  if (!(g.wh > g.sh || g.ww > g.sw)) return false;  // non-overlapping: original kernel
  if (int64_t(g.wh) * g.ww > 254) return false;
  const int IV = g.I / V;
  int lg = IV & -IV;  // largest power of two dividing IV
  if (lg > 4) lg = 4;
  g.LG = lg;
  g.lg_shift = lg == 4 ? 2 : (lg == 2 ? 1 : 0);
  g.NLG = IV / lg;
  g.HY = (g.wh - 1) / g.sh;
  g.HX = (g.ww - 1) / g.sw;
  for (int t = 8; t >= 1; t /= 2) {
    g.TY = t;
    g.TX = t;
    g.NWY = g.TY + g.HY;
    g.NWX = g.TX + g.HX;
    g.SR = (g.NWY - 1) * g.sh + g.wh;
    g.SC = (g.NWX - 1) * g.sw + g.ww;
    g.NTY = (g.Ho + g.TY - 1) / g.TY;
    g.NTX = (g.Wo + g.TX - 1) / g.TX;
    g.tiles = g.O * g.NTY * g.NTX * g.NLG;
    if (tiled_smem_bytes(g, vec_bytes, V) <= 48 * 1024) {
      *out = g;
      return true;
    }
  }
  return false;
}

// ----------------------------------------------------------------------------------------------
// Launch.

enum class Op { kForward, kJvp, kGrad };

constexpr bool kAllowF64 = false;  // no float64 on the GPU

template <typename Idx>
KGeom<Idx> make_kgeom(const jcn::PoolGeometry& pg, int V, Op op) {
  KGeom<Idx> g;
  set_dims<Idx>(pg, &g);
  g.IV = g.I / Idx(V);
  g.TH = (g.H + kTile - 1) / kTile;
  g.TW = (g.W + kTile - 1) / kTile;
  g.total = op == Op::kGrad ? g.O * g.TH * g.TW * g.IV : g.O * g.Ho * g.Wo * g.IV;
  return g;
}

template <typename T, int V, int KH, int KW, typename Idx>
void launch(cudaStream_t stream, Op op, const KGeom<Idx>& g, const T* img, const T* second,
            T* out) {
  if constexpr (KH == 2 && KW == 2 && sizeof(Idx) == 4) {
    // Forward of 2x2 windows only: the 3x3 instances of max_pool_fwd2_kernel spill a few bytes
    // and the JVP ones use more registers than max_pool_fwd_kernel, so those keep the original.
    if (op == Op::kForward && g.Wo >= 2 && use_tiled_pool_kernels()) {
      // Two outputs per thread; total <= O*Ho*Wo*IV fits (fits_int32).
      const int WP = int((g.Wo + 1) / 2);
      const int total = int(g.O * g.Ho) * WP * int(g.IV);
      const int64_t b64 = (int64_t(total) + kThreads - 1) / kThreads;
      const unsigned b = unsigned(b64 < kMaxBlocks ? b64 : kMaxBlocks);
      max_pool_fwd2_kernel<T, V, KH, KW, false>
          <<<b, kThreads, 0, stream>>>(img, nullptr, out, g, WP, total);
      return;
    }
  }
  const int64_t blocks64 = (int64_t(g.total) + kThreads - 1) / kThreads;
  const unsigned blocks = unsigned(blocks64 < kMaxBlocks ? blocks64 : kMaxBlocks);
  switch (op) {
    case Op::kForward:
      max_pool_fwd_kernel<T, V, KH, KW, false, Idx>
          <<<blocks, kThreads, 0, stream>>>(img, nullptr, out, g);
      break;
    case Op::kJvp:
      max_pool_fwd_kernel<T, V, KH, KW, true, Idx>
          <<<blocks, kThreads, 0, stream>>>(img, second, out, g);
      break;
    case Op::kGrad:
      max_pool_grad_kernel<T, V, KH, KW, Idx><<<blocks, kThreads, 0, stream>>>(img, second, out, g);
      break;
  }
}

// 32-bit indices: 2x2 and 3x3 windows get unrolled kernels, others the runtime-window kernel.
// 64-bit indices (huge tensors only): runtime-window kernel.
template <typename T, int V>
void dispatch_window(cudaStream_t stream, Op op, const jcn::PoolGeometry& pg, bool idx32,
                     const T* img, const T* second, T* out) {
  if (!idx32) {
    launch<T, V, 0, 0, int64_t>(stream, op, make_kgeom<int64_t>(pg, V, op), img, second, out);
    return;
  }
  const KGeom<int32_t> g = make_kgeom<int32_t>(pg, V, op);
  if (pg.window_h == 2 && pg.window_w == 2)
    launch<T, V, 2, 2, int32_t>(stream, op, g, img, second, out);
  else if (pg.window_h == 3 && pg.window_w == 3)
    launch<T, V, 3, 3, int32_t>(stream, op, g, img, second, out);
  else
    launch<T, V, 0, 0, int32_t>(stream, op, g, img, second, out);
}

template <typename T, int V>
void launch_grad_tiled(cudaStream_t stream, const TGeom& g, const T* img, const T* ct, T* out) {
  const unsigned blocks = unsigned(g.tiles < kMaxBlocks ? g.tiles : kMaxBlocks);
  const size_t smem = tiled_smem_bytes(g, sizeof(T) * V, V);
  if (g.wh == 3 && g.ww == 3)
    max_pool_grad_tiled_kernel<T, V, 3, 3><<<blocks, kThreads, smem, stream>>>(img, ct, out, g);
  else if (g.wh == 2 && g.ww == 2)
    max_pool_grad_tiled_kernel<T, V, 2, 2><<<blocks, kThreads, smem, stream>>>(img, ct, out, g);
  else
    max_pool_grad_tiled_kernel<T, V, 0, 0><<<blocks, kThreads, smem, stream>>>(img, ct, out, g);
}

template <typename T>
ffi::Error run_typed(cudaStream_t stream, Op op, const jcn::PoolGeometry& pg, int64_t image_elems,
                     int64_t pooled_elems, const void* img, const void* second, void* out) {
  constexpr int kVecFwd = int(kFwdVecBytes / sizeof(T));
  constexpr int kVecGrad = int(kGradVecBytes / sizeof(T));
  const T* x = static_cast<const T*>(img);
  const T* s = static_cast<const T*>(second);
  T* y = static_cast<T*>(out);
  // Vector path: the contiguous dimension is a multiple of V and every buffer is aligned to the
  // vector size (XLA's buffers always are; checked anyway, host-side pointer values only).
  auto vec_ok = [&](int v) {
    const uintptr_t bytes = uintptr_t(v) * sizeof(T);
    auto aligned = [bytes](const void* p) { return p == nullptr || uintptr_t(p) % bytes == 0; };
    return jcn::pool::inner_size(pg) % v == 0 && aligned(img) && aligned(second) && aligned(out);
  };
  const bool idx32 = jcn::pool::fits_int32(pg, image_elems, pooled_elems);
  TGeom tg;
  if (op == Op::kGrad && use_tiled_pool_kernels() && idx32 && vec_ok(kVecGrad) &&
      make_tgeom(pg, kVecGrad, sizeof(T) * kVecGrad, &tg))
    launch_grad_tiled<T, kVecGrad>(stream, tg, x, s, y);
  else if (op == Op::kGrad && vec_ok(kVecGrad))
    dispatch_window<T, kVecGrad>(stream, op, pg, idx32, x, s, y);
  else if (op != Op::kGrad && vec_ok(kVecFwd))
    dispatch_window<T, kVecFwd>(stream, op, pg, idx32, x, s, y);
  else
    dispatch_window<T, 1>(stream, op, pg, idx32, x, s, y);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("jax_convnet max_pool: kernel launch failed: ") +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error run(cudaStream_t stream, Op op, ffi::DataType t, const jcn::PoolGeometry& pg,
               int64_t image_elems, int64_t pooled_elems, const void* img, const void* second,
               void* out) {
  switch (t) {
    case ffi::DataType::F32:
      return run_typed<float>(stream, op, pg, image_elems, pooled_elems, img, second, out);
    case ffi::DataType::BF16:
      return run_typed<__nv_bfloat16>(stream, op, pg, image_elems, pooled_elems, img, second, out);
    case ffi::DataType::F16:
      return run_typed<__half>(stream, op, pg, image_elems, pooled_elems, img, second, out);
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

ffi::Error MaxPoolGradImpl(cudaStream_t stream, ffi::AnyBuffer images, ffi::AnyBuffer cotangents,
                           ffi::Result<ffi::AnyBuffer> image_cotangents, jcn::PoolParams p) {
  const char* op = "max_pool_grad";
  jcn::PoolGeometry g;
  ffi::Error checked = jcn::check_pool_call(op, p, images, cotangents, kAllowF64, &g);
  if (checked.failure()) return checked;
  if (image_cotangents->element_type() != images.element_type())
    return jcn::invalid(op, "operands and result must share one dtype");
  if (!(image_cotangents->dimensions() == images.dimensions()))
    return jcn::invalid(op, "image cotangents' shape differs from the images'");
  return run(stream, Op::kGrad, images.element_type(), g, elems(images), elems(cotangents),
             images.untyped_data(), cotangents.untyped_data(), image_cotangents->untyped_data());
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
                                  .Attrs<jax_convnet::PoolParams>(),
                              {ffi::Traits::kCmdBufferCompatible});
