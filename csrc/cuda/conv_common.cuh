// Shared pieces of the CUDA conv family (filter_acts / image_acts / weight_acts): the kernel
// parameter block, fast integer division, element-type helpers and tile configurations.
//
// Every op is an implicit GEMM  C[m, n] = sum_k A[m, k] * B[k, n]  where each operand element
// lives at   offset = row_part(row) + k_part(k)   and is in range iff
//   (unsigned)(row.y + k.y) < ylim  and  (unsigned)(row.x + k.x) < xlim.
// Invalid rows / k are encoded by y = kBad (so any sum stays negative). See conv_ops.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace jax_convnet {
namespace cuda_conv {

// Marker for an invalid row / k: every valid coordinate lies in (-2^30, 2^30) (the host checks
// dims, pads and strides against 2^30), so kBad + anything valid < 0 and kBad + kBad = -2^31
// still fits an int.
constexpr int kBad = -(1 << 30);

// Division by a run-time constant d >= 1. For 32-bit indices (n < 2^31) the quotient is
// umulhi(n, mul) >> shr (round-up method, exact for n < 2^31, d < 2^31); 64-bit indices use the
// hardware division.
struct DivMod {
  int64_t d;
  uint32_t mul, shr;
};

inline DivMod make_divmod(int64_t d) {
  DivMod r{d, 0u, 0u};
  if (d > 1 && d < (int64_t(1) << 31)) {
    int l = 0;
    while ((int64_t(1) << l) < d) ++l;  // ceil(log2 d), >= 1
    uint32_t p = 31u + uint32_t(l);
    r.mul = uint32_t(((uint64_t(1) << p) + uint64_t(d) - 1) / uint64_t(d));
    r.shr = p - 32u;
  }
  return r;
}

template <typename Idx>
__device__ __forceinline__ Idx divmod(Idx n, const DivMod& f, Idx& rem) {
  Idx q;
  if constexpr (sizeof(Idx) == 4) {
    q = (f.d == 1) ? n : Idx(__umulhi(uint32_t(n), f.mul) >> f.shr);
  } else {
    q = n / Idx(f.d);
  }
  rem = n - q * Idx(f.d);
  return q;
}

// Element strides of the three tensors (see geometry.h Strides4), as int64.
struct Str4 {
  int64_t n, c, y, x;
};

// Everything a conv GEMM kernel needs; filled on the host (conv_launch.cuh), passed
// __grid_constant__.
struct KParams {
  const void* a;  // operand A source (FA: images, IA: hidden, WA: hidden)
  const void* b;  // operand B source (FA: filters, IA: filters, WA: images)
  void* out;      // final output (operand dtype)
  float* slots;   // WA: float32 partial sums, slot-major [slot][E]; null = write `out` directly
                  // IA through columns: the column buffer (OpIACols)
  int64_t B, C, F, H, W, fh, fw, Ho, Wo, sh, sw, pt, pl;
  Str4 is, fs, hs;  // images, filters, hidden
  int64_t M, N, K;  // GEMM sizes (IA: K is per class and computed per tile; WA: K per segment)
  int64_t tiles_m, tiles_n, units;
  DivMod dB, dC, dF, dfw, dWo, dHo, dT;  // T = fh * fw
  // image_acts residue classes (ry, rx) in [0, ncy) x [0, ncx)
  int64_t ncy, ncx, nImax, nJmax, hq0, wq0;
  DivMod dnJ, dHq[2], dWq[2];  // [0]: hq0 (wq0), [1]: hq0 - 1 (wq0 - 1)
  // weight_acts: segments of P positions, nsplit chunks of kchunk k's each
  int64_t P, nseg, seg0, fused, nsplit, kchunk, E;
  // weight_acts: the filters' channel count; < C where the kernels read images padded with zero
  // channels (conv_launch.cuh), whose GEMM rows are not stored.
  int64_t C_out;
  // filter_acts: bytes of the mma kernel's k table (0: none; conv_launch.cuh, k_table_bytes).
  int64_t k_table_bytes;
};

// ---- element types -------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// VEC consecutive elements, loaded / stored as one access (16 bytes at most).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Raw storage of one element in shared memory: float for the FFMA and TF32 paths (operands are
// converted when stored), the 16-bit pattern itself for the bf16 / f16 tensor-core path.
template <typename T, bool kRaw16>
struct SmemElem {
  using type = float;
};
template <typename T>
struct SmemElem<T, true> {
  using type = uint16_t;
};

template <typename S, typename T>
__device__ __forceinline__ S to_smem(T x) {
  if constexpr (std::is_same_v<S, float>) {
    return to_f32<T>(x);
  } else {
    static_assert(sizeof(T) == 2, "raw smem storage is for 16-bit types");
    uint16_t r;
    memcpy(&r, &x, 2);
    return r;
  }
}

template <typename T>
__device__ __forceinline__ T zero_elem() {
  if constexpr (std::is_same_v<T, float>) {
    return 0.f;
  } else {
    uint16_t z = 0;
    T r;
    memcpy(&r, &z, 2);
    return r;
  }
}

// ---- PTX wrappers (sm_80+): asynchronous copies, shared-memory matrix loads, tensor-core MMA ----

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return uint32_t(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared, bypassing L1; zero-filled (nothing read) when !valid.
template <typename T>
__device__ __forceinline__ void cp_async16(T* dst, const T* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
// 4 or 8 bytes global -> shared (through L1: .ca, the only form below 16 bytes); zero-filled
// when !valid. For operands whose rows cannot be read 16 bytes at a time (float32 3-channel
// images; 16-bit images of 4 channels).
template <int kBytes, typename T>
__device__ __forceinline__ void cp_async_small(T* dst, const T* src, bool valid) {
  static_assert(kBytes == 4 || kBytes == 8, "cp.async.ca copies 4, 8 or 16 bytes");
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr(dst)),
               "l"(src), "n"(kBytes), "r"(valid ? kBytes : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>  // wait until at most N committed groups are still in flight
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Four 8x8 b16 matrices; lanes 8i..8i+7 address the rows of matrix i; register i holds it.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}
// float bits -> TF32 high part (in place) and the TF32 residue (3xTF32). Plain TF32 passes the
// float bits unconverted: the tensor cores read their top 19 bits (truncation, at most 2^-10
// relative per operand); a per-fragment cvt.rna would cost one conversion per element per warp
// that reads it (24 per 16 mma), more than the mma themselves.
template <int N>
__device__ __forceinline__ void split_tf32(uint32_t (&big)[N], uint32_t (&small)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const float x = __uint_as_float(big[e]);
    big[e] = to_tf32(x);
    small[e] = to_tf32(x - __uint_as_float(big[e]));
  }
}

// d += a * b for one 16 x 8 tile: m16n8k16 (bf16 / f16) or m16n8k8 (tf32), float accumulators.
template <typename T>
__device__ __forceinline__ void mma_16x8(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// ---- tile configurations -------------------------------------------------------------------

// FFMA path: BM x BN block tile, BK deep, TM x TN outputs per thread; smem holds float.
template <int BM_, int BN_, int BK_, int TM_, int TN_>
struct FfmaCfg {
  static constexpr bool kTensor = false;
  static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_;
  static constexpr int NT = (BM / TM) * (BN / TN);
  // unused wmma members (kept so both kinds of configuration can be named uniformly)
  static constexpr int KF = 16, FM = 1, FN = 1, WARPS_M = 1, WARPS_N = 1, WM = 16, WN = 16;
  static_assert(TM % 4 == 0 && (TN == 4 || TN == 2 || TN == 1), "micro-tile");
  static_assert(BM % TM == 0 && BN % TN == 0, "tile");
};
using CfgWide = FfmaCfg<128, 64, 16, 8, 4>;   // 256 threads
using CfgNarrow = FfmaCfg<512, 4, 8, 4, 4>;   // 128 threads, for N <= 8 (e.g. RGB image grads)

// Tensor-core (wmma) path: 128 x 64 block tile, 8 warps as 4 (M) x 2 (N), 32 x 32 per warp,
// 2 x 2 fragments of 16 x 16. KF = fragment depth (16 for bf16 / f16, 8 for tf32).
template <int BK_, int KF_>
struct WmmaCfg {
  static constexpr bool kTensor = true;
  static constexpr int BM = 128, BN = 64, BK = BK_, KF = KF_;
  static constexpr int WARPS_M = 4, WARPS_N = 2, NT = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // 32 x 32
  static constexpr int FM = WM / 16, FN = WN / 16;             // 2 x 2 fragments
  static constexpr int TM = 0, TN = 0;
};
using CfgWmma16 = WmmaCfg<32, 16>;  // bf16 / f16
using CfgWmmaTf32 = WmmaCfg<16, 8>;  // float32, precision Default

// Per-thread vector width of an operand loader: at most 16 bytes, at most the thread's share
// of the tile, and not wider than the tile along the contiguous direction.
constexpr int loader_vec(int rows, int bk, int nt, int maxv, bool rowc) {
  int per = rows * bk / nt;
  if (per < 1) per = 1;
  int v = maxv < per ? maxv : per;
  int lim = rowc ? rows : bk;
  return v < lim ? v : lim;
}

}  // namespace cuda_conv
}  // namespace jax_convnet
