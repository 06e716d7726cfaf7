// The Hopper implicit GEMM of filter_acts in 16-bit types: wgmma (sm_90a), both operands read
// by the tensor cores straight from shared memory.
//
// Why: the mma.sync kernel (conv_mma.cuh) is bound by shared memory there. Every fragment goes
// through ldmatrix into registers, ~290 bytes of shared-memory traffic per HMMA with the 128 x 96
// tile (AlexNet conv2 bf16 C01B on an H200: tensor pipe 42% busy, L1/shared 69%, short-scoreboard
// stalls first, L2 47%). wgmma reads its operands from shared memory itself, a warpgroup (4 warps)
// at a time, 64 x BN per instruction.
//
// Same units, tiles and operand addressing as the other conv kernels (conv_ops.cuh: the Loader's
// row states and k table for the images, the filters as a K x F matrix); block tile 128 x BN:
// two warpgroups of 64 rows, all BN columns each. Stages are laid out in wgmma's canonical
// 128-byte-swizzled form (WgmmaStage), so no padding and no bank conflicts. Per k-tile: wait for
// the stage, fence it to the async proxy, one barrier, 4 wgmma of k 16 (one commit group), the
// copies of the k-tile 3 ahead (overlapping the tensor cores), then wait until one group is left
// in flight. One block of 256 threads per SM (BN / 2 accumulators per thread, 5 stages of 40 KiB
// at BN = 192). AlexNet conv2 bf16 C01B on an H200: 0.133 ms (mma.sync: 0.238); 0.148-0.157
// with every wgmma drained each k-tile (4 stages; tensor pipe 46% busy). The copies' address
// arithmetic is the longest path now: ~180 instructions per k-tile and warp at two warps per
// scheduler (253 before B's offsets were fixed per thread: 0.148-0.180 ms drained).
//
// Compiled for sm_90a only (`90a` in CMAKE_CUDA_ARCHITECTURES defines JAX_CONVNET_WGMMA for the
// host); other targets get a kernel that traps, which the host never launches.
#pragma once

#include "conv_common.cuh"
#include "conv_kernel.cuh"
#include "conv_ops.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define JCN_WGMMA_DEVICE 1
#endif

namespace jax_convnet {
namespace cuda_conv {

template <typename T, int BN_>
struct WgmmaCfg {
  static_assert(sizeof(T) == 2, "wgmma with transposed (MN-major) operands: 16-bit types");
  static constexpr int BM = 128, BN = BN_, BK = 64, STAGES = 5;  // BK: 128 bytes of k
  static constexpr int NT = 256;                                  // two warpgroups
  static constexpr int VEC = 8;                                   // elements per cp.async
  static constexpr int KSTEP = 16;                                // k of one wgmma
};

// One stage of an operand tile (R rows x BK k, 16-bit) in wgmma's canonical 128-byte-swizzled
// layouts, built of 1024-byte atoms of 8 lines x 128 bytes; 16-byte chunk c of line l sits at
// chunk c ^ l (the hardware applies the same XOR to the address bits, so atoms are 1024-aligned).
//  - kRowC (contiguous along rows, "MN-major"): an atom holds 64 rows x 8 k, line = k % 8; atom
//    (row / 64, k / 8) at ((row / 64) * BK / 8 + k / 8) * 1024. Descriptor: LBO = the stride
//    between 64-row atoms (BK / 8 * 1024), SBO = between 8-k groups (1024).
//  - k-contiguous ("K-major"): an atom holds 8 rows x 64 k (all of BK), line = row % 8; atom
//    row / 8 at (row / 8) * 1024. Descriptor: SBO = 1024 between 8-row groups, LBO unused; the k
//    steps of 16 move the start address by 32 bytes inside the atoms.
template <bool kRowC, int BK>
struct WgmmaStage {
  static_assert(BK == 64, "one 128-byte swizzle line of 16-bit k (k-contiguous operands)");
  // Byte offset of the 16-byte vector at (row, k): row a multiple of 8 (kRowC) or k (otherwise).
  __device__ __forceinline__ static uint32_t offset(int row, int k) {
    int atom, line, chunk;
    if constexpr (kRowC) {
      atom = (row >> 6) * (BK / 8) + (k >> 3);
      line = k & 7;
      chunk = (row >> 3) & 7;
    } else {
      atom = row >> 3;
      line = row & 7;
      chunk = k >> 3;
    }
    return uint32_t(atom * 1024 + line * 128 + ((chunk ^ line) << 4));
  }
  // Descriptor of the sub-tile starting at row `row0` (a multiple of 64) of the stage at shared
  // address `stage` (1024-aligned), first k step. The start address is its lowest field: later
  // stages and k steps add (bytes >> 4) to the low word (no carry: addresses stay below 2^18).
  __device__ __forceinline__ static uint64_t desc(uint32_t stage, int row0) {
    uint32_t start, lbo;
    if constexpr (kRowC) {
      start = stage + uint32_t((row0 >> 6) * (BK / 8) * 1024);
      lbo = (BK / 8) * 1024;
    } else {
      start = stage + uint32_t((row0 >> 3) * 1024);
      lbo = 16;  // unused ("assumed 1")
    }
    constexpr uint32_t sbo = 1024;
    return uint64_t((start & 0x3FFFF) >> 4) | uint64_t(lbo >> 4) << 16 |
           uint64_t(sbo >> 4) << 32 | uint64_t(1) << 62;  // 62-63: 1 = 128-byte swizzle
  }
  // Bytes from one k step (16) to the next: two 8-k atoms, or 32 bytes along the swizzled lines.
  static constexpr uint32_t kStepBytes = kRowC ? 2 * 1024 : 32;
};

#ifdef JCN_WGMMA_DEVICE
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ uint64_t pack_desc(uint32_t lo, uint32_t hi) {
  uint64_t d;
  asm("mov.b64 %0, {%1, %2};\n" : "=l"(d) : "r"(lo), "r"(hi));
  return d;
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {  // at most N commit groups still in flight
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins the accumulators' registers in place at this point of the program (the compiler may
// not move their reads or writes across it): around the asynchronous wgmma.
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) asm volatile("" : "+f"(d[e])::"memory");
}
// cp.async wrote the stage through the generic proxy; wgmma reads it through the async proxy.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#define JCN_D8(i)                                                                         \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define JCN_WGMMA_N192(TY)                                                                     \
  asm volatile(                                                                                \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"                                             \
      "wgmma.mma_async.sync.aligned.m64n192k16.f32." TY "." TY " "                             \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "  \
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "  \
      "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, "  \
      "%70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, "  \
      "%87, %88, %89, %90, %91, %92, %93, %94, %95}, %96, %97, p, 1, 1, %99, %100;\n}\n"        \
      : JCN_D8(0), JCN_D8(8), JCN_D8(16), JCN_D8(24), JCN_D8(32), JCN_D8(40), JCN_D8(48),      \
        JCN_D8(56), JCN_D8(64), JCN_D8(72), JCN_D8(80), JCN_D8(88)                              \
      : "l"(da), "l"(db), "r"(1), "n"(kTransA), "n"(kTransB))

// d (64 x BN per warpgroup, float) += A (64 x 16) * B (16 x BN), both from shared memory;
// kTransA / kTransB: the operand is MN-major (contiguous along its rows).
template <typename T, int BN, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_bn(float (&d)[BN / 2], uint64_t da, uint64_t db) {
  static_assert(BN == 192, "the instantiated wgmma width");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    JCN_WGMMA_N192("bf16");
  } else {
    JCN_WGMMA_N192("f16");
  }
}
#undef JCN_WGMMA_N192
#undef JCN_D8
#endif  // JCN_WGMMA_DEVICE

// Shared memory of the wgmma kernel, from a 1024-aligned base (TOTAL includes the slack to align):
// STAGES stages of A and of B, overlaid by the epilogue's float tile; the output offsets of the
// tile's rows and columns; the k table (kKTable).
template <class Op, class Cfg, typename T, typename Idx>
struct WgmmaPlan {
  static constexpr int A_STAGE = Cfg::BM * Cfg::BK, B_STAGE = Cfg::BN * Cfg::BK;  // elements
  static constexpr int LDC = Cfg::BN + 8;  // as MmaPlan: conflict-free accumulator stores
  static constexpr int LDCT = Cfg::BM + 4;
  static_assert(Cfg::BN * LDCT <= Cfg::BM * LDC, "the transposed tile fits the tile's space");
  using Off = SmemOffsets<Cfg::STAGES, A_STAGE, B_STAGE, int(sizeof(T)), Cfg::BM, Cfg::BN, LDC,
                          int(sizeof(Idx))>;
  static_assert((A_STAGE * int(sizeof(T))) % 1024 == 0 && (B_STAGE * int(sizeof(T))) % 1024 == 0,
                "stages of whole swizzle atoms");
  static constexpr int kAlignSlack = 1024;
  static constexpr int TOTAL = Off::TOTAL + kAlignSlack;  // bytes to allocate (k table apart)
};

template <class Op, class Cfg, typename T, typename Idx, bool kKTable>
__global__ void __launch_bounds__(Cfg::NT, 1) conv_wgmma_kernel(const __grid_constant__ KParams p) {
#ifdef JCN_WGMMA_DEVICE
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, NT = Cfg::NT, STAGES = Cfg::STAGES;
  using Plan = WgmmaPlan<Op, Cfg, T, Idx>;
  using Off = typename Plan::Off;
  using SA = WgmmaStage<Op::A_ROWC, BK>;
  using SB = WgmmaStage<Op::B_ROWC, BK>;
  using LA = Loader<Op, true, BM, BK, NT, T, Idx, Cfg::VEC, false, kKTable>;
  static_assert(!Op::kFold, "filter_acts-like ops: one k range per unit");
  // Operand B (the filters) is a plain K x F matrix (Op::b_offset) and N a multiple of BN (the
  // host's rule): each B copy of a thread keeps one offset for the whole kernel, a k-tile adds
  // its k0 rows, and only rows past K are zero-filled (cp.async of 0 bytes: nothing is read).
  // The generic loader took ~90 of the ~250 instructions per k-tile and warp here (alex2).
  constexpr int B_Q = BN / Cfg::VEC, B_SLOTS = BN * BK / Cfg::VEC / NT;
  static_assert(BN * BK / Cfg::VEC % NT == 0, "whole B copies per thread");
  static_assert(Op::B_ROWC, "filters contiguous along n");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  unsigned char* const smem = smem_raw + ((1024u - (raw & 1023u)) & 1023u);
  const uint32_t base = smem_addr(smem);
  unsigned char* const As = smem + Off::A_OFF;
  unsigned char* const Bs = smem + Off::B_OFF;
  float* const Cs = reinterpret_cast<float*>(smem);
  Idx* const rowoff = reinterpret_cast<Idx*>(smem + Off::ROW_OFF);
  Idx* const coloff = reinterpret_cast<Idx*>(smem + Off::COL_OFF);
  KEntry* const ktab = reinterpret_cast<KEntry*>(smem + Off::TOTAL);
  constexpr int A_BYTES = Plan::A_STAGE * int(sizeof(T)), B_BYTES = Plan::B_STAGE * int(sizeof(T));

  const T* const srcA = static_cast<const T*>(p.a);
  const T* const srcB = static_cast<const T*>(p.b);
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2;  // warpgroup: rows wg * 64 ... + 63 of the tile
  if constexpr (kKTable) build_k_table<Op, BK, NT, Idx>(p, ktab);
  // Each copy slot of a thread lands at the same place of every stage: swizzle once.
  uint32_t a_dst[LA::SLOTS], b_dst[B_SLOTS];
  uint32_t b_bytes[B_SLOTS];
  int b_kk[B_SLOTS];
#pragma unroll
  for (int s = 0; s < LA::SLOTS; ++s) {
    int row, kk;
    LA::pos(s, row, kk);
    a_dst[s] = SA::offset(row, kk);
  }
#pragma unroll
  for (int s = 0; s < B_SLOTS; ++s) {
    const int v = tid + s * NT, row = (v % B_Q) * Cfg::VEC;
    b_kk[s] = v / B_Q;
    b_bytes[s] = uint32_t(Op::b_offset(p, Idx(b_kk[s]), Idx(row))) * uint32_t(sizeof(T));
    b_dst[s] = SB::offset(row, b_kk[s]);
  }
  const uint64_t a_desc = SA::desc(base + uint32_t(Off::A_OFF), wg * 64);
  const uint64_t b_desc = SB::desc(base + uint32_t(Off::B_OFF), 0);
  const uint32_t a_lo = uint32_t(a_desc), a_hi = uint32_t(a_desc >> 32);
  const uint32_t b_lo = uint32_t(b_desc), b_hi = uint32_t(b_desc >> 32);

  for (int64_t u = blockIdx.x; u < p.units; u += gridDim.x) {
    const Tile<Idx> t = Op::tile(p, u, BM, BN);
    LA la;
    la.ktab = ktab;
    la.init_rows(p, t);
    const T* const b_unit = srcB + Op::b_offset(p, Idx(0), t.n0);
    float d[BN / 2];
#pragma unroll
    for (int e = 0; e < BN / 2; ++e) d[e] = 0.f;

    const Idx nkt = (t.ke - t.kb + Idx(BK - 1)) / Idx(BK);
    Idx issued = 0;
    auto issue = [&](int stage) {
      if (issued < nkt) {
        const Idx k0 = t.kb + issued * Idx(BK);
        unsigned char* const a_st = As + stage * A_BYTES;
        unsigned char* const b_st = Bs + stage * B_BYTES;
        // Zero-filled copies read nothing (0 source bytes): their address needs no clamping.
        la.for_each_slot(p, t, 0, k0, [&](int s, Idx off, bool ok) {
          cp_async16(reinterpret_cast<T*>(a_st + a_dst[s]), srcA + off, ok);
        });
        const char* const b_k0 =
            reinterpret_cast<const char*>(b_unit + Op::b_offset(p, k0, Idx(0)));
#pragma unroll
        for (int s = 0; s < B_SLOTS; ++s)
          cp_async16(reinterpret_cast<T*>(b_st + b_dst[s]),
                     reinterpret_cast<const T*>(b_k0 + b_bytes[s]), k0 + b_kk[s] < t.K);
      }
      ++issued;
      cp_async_commit();  // an empty group past the end keeps the wait counts uniform
    };
    // One group of wgmma stays in flight across iterations: k-tile it's copies go into the stage
    // of it - 2, the last one whose wgmma every warpgroup has waited for.
    constexpr int AHEAD = STAGES - 2;  // k-tiles copied ahead of the math
#pragma unroll
    for (int s = 0; s < AHEAD; ++s) issue(s);

    int stage = 0, wstage = AHEAD;
    for (Idx it = 0; it < nkt; ++it) {
      cp_async_wait<AHEAD - 1>();  // this thread's copies of k-tile `it` landed ...
      fence_proxy_async_smem();    // ... are visible to the tensor cores (async proxy) ...
      __syncthreads();             // ... and everyone's; every wgmma of it - 2 has finished
      const uint32_t a_st = a_lo + uint32_t((stage * A_BYTES) >> 4);
      const uint32_t b_st = b_lo + uint32_t((stage * B_BYTES) >> 4);
      wgmma_fence_operands(d);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < BK / Cfg::KSTEP; ++ks)
        wgmma_bn<T, BN, Op::A_ROWC ? 1 : 0, Op::B_ROWC ? 1 : 0>(
            d, pack_desc(a_st + uint32_t(ks * (SA::kStepBytes >> 4)), a_hi),
            pack_desc(b_st + uint32_t(ks * (SB::kStepBytes >> 4)), b_hi));
      wgmma_commit();
      issue(wstage);   // k-tile it + AHEAD, into the stage of it - 2
      wgmma_wait<1>();  // this warpgroup's wgmma of it - 1 finished
      wgmma_fence_operands(d);  // no access to d moves above the wait
      stage = stage + 1 == STAGES ? 0 : stage + 1;
      wstage = wstage + 1 == STAGES ? 0 : wstage + 1;
    }
    wgmma_wait<0>();
    wgmma_fence_operands(d);
    cp_async_wait<0>();
    __syncthreads();  // all stage reads done: Cs may overwrite them

    // ---- epilogue (as conv_mma_kernel): accumulators -> Cs -> global. Warp w of the warpgroup
    // holds rows 16 (w % 4) + g and + 8, columns 8 j + 2 q and + 1 (m16n8 accumulator tiles).
    tile_out_offsets<Op, BM, BN, NT>(p, t, rowoff, coloff);
    constexpr int kCsM = Op::OUT_ROWC ? 1 : Plan::LDC, kCsN = Op::OUT_ROWC ? Plan::LDCT : 1;
    {
      const int g = lane >> 2, q = lane & 3;
      const int m0 = wg * 64 + (warp & 3) * 16 + g;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
        store_acc_tile<kCsM, kCsN>(Cs, m0, j * 8 + 2 * q, d[4 * j], d[4 * j + 1], d[4 * j + 2],
                                   d[4 * j + 3]);
    }
    __syncthreads();
    store_tile<Op, BM, BN, NT, T>(p, t, Cs, kCsM, kCsN, rowoff, coloff);
    __syncthreads();  // Cs / rowoff / coloff are reused by the next unit
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // not sm_90a code: the host never launches it here, and it must not pass silently
#endif  // JCN_WGMMA_DEVICE
}

}  // namespace cuda_conv
}  // namespace jax_convnet
