// The Hopper implicit GEMM of filter_acts in 16-bit types and in float32 at default precision
// (TF32, conv_wgmma_tf32_kernel at the end): wgmma (sm_90a), both operands read by the tensor
// cores straight from shared memory.
//
// Why: the mma.sync kernel (conv_mma.cuh) is bound by shared memory there. Every fragment goes
// through ldmatrix into registers, ~290 bytes of shared-memory traffic per HMMA with the 128 x 96
// tile (the profile: benchmarks/history/2026-11-29_session7_wgmma_16bit.md).
// wgmma reads its operands from shared memory itself, a warpgroup (4 warps) at a time, 64 x BN
// per instruction.
//
// Same units, tiles and operand addressing as the other conv kernels (conv_ops.cuh: the Loader's
// row states and k table for the images, the filters as a K x F matrix); block tile 128 x BN:
// two warpgroups of 64 rows, all BN columns each. Stages are laid out in wgmma's canonical
// 128-byte-swizzled form (WgmmaStage), so no padding and no bank conflicts. Per k-tile: wait for
// the stage, fence it to the async proxy, one barrier, 4 wgmma of k 16 (one commit group), the
// copies of the k-tile 3 ahead (overlapping the tensor cores), then wait until one group is left
// in flight. One block of 256 threads per SM (BN / 2 accumulators per thread, 5 stages of 40 KiB
// at BN = 192). One group in flight is faster than draining every wgmma each k-tile; the copies'
// address arithmetic is the longest path now (both measured:
// benchmarks/history/2026-11-29_session7_wgmma_16bit.md).
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

// 16-bit types (conv_wgmma_kernel) or float32 as TF32 (conv_wgmma_tf32_kernel: 3 stages, see
// there).
template <typename T, int BN_>
struct WgmmaCfg {
  static constexpr int E = int(sizeof(T));
  static constexpr int BM = 128, BN = BN_, BK = 128 / E;  // BK: 128 bytes of k
  static constexpr int STAGES = E == 2 ? 5 : 3;
  static constexpr int NT = 256;      // two warpgroups
  static constexpr int VEC = 16 / E;  // elements per copy
  static constexpr int KSTEP = 32 / E;  // k of one wgmma
};

// One stage of an operand tile (R rows x BK k of kElem bytes) in wgmma's canonical 128-byte-swizzled
// layouts, built of 1024-byte atoms of 8 lines x 128 bytes; 16-byte chunk c of line l sits at
// chunk c ^ l (the hardware applies the same XOR to the address bits, so atoms are 1024-aligned).
//  - kRowC (contiguous along rows, "MN-major"): an atom holds 64 rows x 8 k, line = k % 8; atom
//    (row / 64, k / 8) at ((row / 64) * BK / 8 + k / 8) * 1024. Descriptor: LBO = the stride
//    between 64-row atoms (BK / 8 * 1024), SBO = between 8-k groups (1024).
//    (16-bit types only: TF32 wgmma reads K-major operands only.)
//  - k-contiguous ("K-major"): an atom holds 8 rows x 128 bytes of k (all of BK), line = row %
//    8; atom row / 8 at (row / 8) * 1024. Descriptor: SBO = 1024 between 8-row groups, LBO
//    unused; the k steps of 32 bytes move the start address by 32 bytes inside the atoms.
template <bool kRowC, int kElem>
struct WgmmaStage {
  static constexpr int BK = 128 / kElem;
  static_assert(!kRowC || kElem == 2, "MN-major stages: 16-bit types");
  // Byte offset of the 16-byte vector at (row, k): row a multiple of 8 (kRowC) or k of 16 bytes
  // (otherwise).
  __device__ __forceinline__ static uint32_t offset(int row, int k) {
    int atom, line, chunk;
    if constexpr (kRowC) {
      atom = (row >> 6) * (BK / 8) + (k >> 3);
      line = k & 7;
      chunk = (row >> 3) & 7;
    } else {
      atom = row >> 3;
      line = row & 7;
      chunk = (k * kElem) >> 4;
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
  // Bytes from one k step (32 bytes of k) to the next: two 8-k atoms, or 32 bytes along the
  // swizzled lines.
  static constexpr uint32_t kStepBytes = kRowC ? 2 * 1024 : 32;
  static constexpr int bytes(int rows) { return rows * 128; }
};

// A k-contiguous stage of floats without swizzle (wgmma's INTERLEAVE layout), for the operands
// conv_wgmma_tf32_kernel stores transposed: core matrices of 8 rows x 4 floats (16-byte lines,
// 128 bytes); those along k kLbo = 128 bytes apart, row groups kSbo = 8 * 128 + 16 apart. The 16
// bytes of padding turn the next row group's banks by 4: one float per lane for 4 k x 32 rows
// (Loader's kUnits order) hits 32 distinct banks, where the swizzled layout puts a k's 32 rows
// in 8. A vector's 4 rows (from a multiple of 4) are 16 bytes apart.
struct WgmmaStageTf32T {
  static constexpr int BK = 32, kLbo = 128, kSbo = 8 * 128 + 16;
  __device__ __forceinline__ static uint32_t offset(int row, int k) {
    return uint32_t((row >> 3) * kSbo + (row & 7) * 16 + (k >> 2) * kLbo + (k & 3) * 4);
  }
  __device__ __forceinline__ static uint64_t desc(uint32_t stage, int row0) {
    const uint32_t start = stage + uint32_t((row0 >> 3) * kSbo);
    return uint64_t((start & 0x3FFFF) >> 4) | uint64_t(kLbo >> 4) << 16 |
           uint64_t(kSbo >> 4) << 32;  // 62-63: 0 = no swizzle
  }
  static constexpr uint32_t kStepBytes = 2 * kLbo;  // 8 floats of k: two core matrices
  static constexpr int bytes(int rows) { return rows / 8 * kSbo; }
};

// The stage layouts of operands A and B: the swizzled ones, but for float32 operands contiguous
// along their rows (stored transposed by conv_wgmma_tf32_kernel).
template <class Op, typename T>
struct WgmmaStages {
  static constexpr bool kTransA = sizeof(T) == 4 && Op::A_ROWC;
  static constexpr bool kTransB = sizeof(T) == 4 && Op::B_ROWC;
  using A = std::conditional_t<kTransA, WgmmaStageTf32T, WgmmaStage<Op::A_ROWC, int(sizeof(T))>>;
  using B = std::conditional_t<kTransB, WgmmaStageTf32T, WgmmaStage<Op::B_ROWC, int(sizeof(T))>>;
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
// cp.async or st.shared wrote the stage through the generic proxy; wgmma reads it through the
// async proxy.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// st.shared of one float / 16 bytes at a shared-memory address.
__device__ __forceinline__ void st_shared(uint32_t addr, float v) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}
__device__ __forceinline__ void st_shared(uint32_t addr, const Vec<float, 4>& v) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "f"(v.v[0]),
               "f"(v.v[1]), "f"(v.v[2]), "f"(v.v[3])
               : "memory");
}

#define JCN_D8(i)                                                                         \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define JCN_D96                                                                            \
  JCN_D8(0), JCN_D8(8), JCN_D8(16), JCN_D8(24), JCN_D8(32), JCN_D8(40), JCN_D8(48), JCN_D8(56), \
      JCN_D8(64), JCN_D8(72), JCN_D8(80), JCN_D8(88)
// The 96 accumulator registers of a 64 x 192 tile, then the descriptors (%96, %97) and the
// scale-d flag (%98, as predicate p).
#define JCN_WGMMA_N192(INSTR, TAIL)                                                             \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n" INSTR " "                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "     \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "      \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "      \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, "      \
  "%70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, "      \
  "%87, %88, %89, %90, %91, %92, %93, %94, %95}, %96, %97, p, 1, 1" TAIL ";\n}\n"
#define JCN_WGMMA_N192_16(TY)                                                                  \
  asm volatile(JCN_WGMMA_N192("wgmma.mma_async.sync.aligned.m64n192k16.f32." TY "." TY,       \
                              ", %99, %100")                                                    \
               : JCN_D96                                                                        \
               : "l"(da), "l"(db), "r"(1), "n"(kTransA), "n"(kTransB))

// d (64 x BN per warpgroup, float) += A (64 x 32 bytes of k) * B (32 bytes of k x BN), both from
// shared memory; kTransA / kTransB: the operand is MN-major (contiguous along its rows; 16-bit
// types only).
template <typename T, int BN, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_bn(float (&d)[BN / 2], uint64_t da, uint64_t db) {
  static_assert(BN == 192, "the instantiated wgmma width");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    JCN_WGMMA_N192_16("bf16");
  } else if constexpr (std::is_same_v<T, __half>) {
    JCN_WGMMA_N192_16("f16");
  } else {
    static_assert(std::is_same_v<T, float> && !kTransA && !kTransB, "TF32: K-major operands");
    asm volatile(JCN_WGMMA_N192("wgmma.mma_async.sync.aligned.m64n192k8.f32.tf32.tf32", "")
                 : JCN_D96
                 : "l"(da), "l"(db), "r"(1));
  }
}
#undef JCN_WGMMA_N192_16
#undef JCN_WGMMA_N192
#undef JCN_D96
#undef JCN_D8
#endif  // JCN_WGMMA_DEVICE

// Shared memory of the wgmma kernel, from a 1024-aligned base (TOTAL includes the slack to align):
// STAGES stages of A and of B, overlaid by the epilogue's float tile; the output offsets of the
// tile's rows and columns; the k table (kKTable).
template <class Op, class Cfg, typename T, typename Idx>
struct WgmmaPlan {
  using SA = typename WgmmaStages<Op, T>::A;
  using SB = typename WgmmaStages<Op, T>::B;
  static_assert(SA::BK == Cfg::BK && SB::BK == Cfg::BK, "stages of 128 bytes of k");
  static constexpr int A_BYTES = SA::bytes(Cfg::BM), B_BYTES = SB::bytes(Cfg::BN);
  static constexpr int LDC = Cfg::BN + 8;  // as MmaPlan: conflict-free accumulator stores
  static constexpr int LDCT = Cfg::BM + 4;
  static_assert(Cfg::BN * LDCT <= Cfg::BM * LDC, "the transposed tile fits the tile's space");
  using Off = SmemOffsets<Cfg::STAGES, A_BYTES, B_BYTES, 1, Cfg::BM, Cfg::BN, LDC,
                          int(sizeof(Idx))>;
  // Swizzled stages: whole atoms, 1024-aligned (A's start at 0; B's follow whole A stages).
  static_assert(WgmmaStages<Op, T>::kTransA || A_BYTES % 1024 == 0, "A: whole swizzle atoms");
  static_assert(WgmmaStages<Op, T>::kTransB || (B_BYTES % 1024 == 0 && Off::B_OFF % 1024 == 0),
                "B: whole swizzle atoms");
  static constexpr int kAlignSlack = 1024;
  static constexpr int TOTAL = Off::TOTAL + kAlignSlack;  // bytes to allocate (k table apart)
};

#ifdef JCN_WGMMA_DEVICE
// The dynamic shared memory from its first 1024-aligned byte (swizzle atoms; WgmmaPlan's slack).
__device__ __forceinline__ unsigned char* wgmma_smem(unsigned char* raw) {
  return raw + ((1024u - (smem_addr(raw) & 1023u)) & 1023u);
}

// The descriptors' words of both operands' first stage (row0: the warpgroup's first row of A);
// a stage or k step adds its bytes >> 4 to the low word (WgmmaStage::desc).
struct WgmmaDescs {
  uint32_t a_lo, a_hi, b_lo, b_hi;
  template <class SA, class SB>
  __device__ __forceinline__ static WgmmaDescs of(uint32_t a_stage, uint32_t b_stage, int row0) {
    const uint64_t a = SA::desc(a_stage, row0), b = SB::desc(b_stage, 0);
    return {uint32_t(a), uint32_t(a >> 32), uint32_t(b), uint32_t(b >> 32)};
  }
};

// Where each copy slot of a thread lands in every stage (the same place in each: computed once),
// and operand B's source: the filters are a plain K x F matrix (Op::b_offset) and N a multiple of
// BN (the host's rule), so a B slot keeps one source offset for the whole kernel (bytes from the
// unit's first filter at k 0; a k-tile adds its k0 rows) and only its k decides whether it lies
// past K. LA / LB: the slots' order (Loader::pos).
template <class Op, class LA, class LB, class SA, class SB, typename T, typename Idx>
__device__ __forceinline__ void wgmma_slot_places(const KParams& p, uint32_t (&a_dst)[LA::SLOTS],
                                                  uint32_t (&b_dst)[LB::SLOTS],
                                                  uint32_t (&b_bytes)[LB::SLOTS],
                                                  int (&b_kk)[LB::SLOTS]) {
#pragma unroll
  for (int s = 0; s < LA::SLOTS; ++s) {
    int row, kk;
    LA::pos(s, row, kk);
    a_dst[s] = SA::offset(row, kk);
  }
#pragma unroll
  for (int s = 0; s < LB::SLOTS; ++s) {
    int n, kk;
    LB::pos(s, n, kk);
    b_kk[s] = kk;
    b_bytes[s] = uint32_t(Op::b_offset(p, Idx(kk), Idx(n))) * uint32_t(sizeof(T));
    b_dst[s] = SB::offset(n, kk);
  }
}

// One k-tile's wgmma (BK / KSTEP of them) as one commit group, on the stages that start
// a_stage_bytes / b_stage_bytes after the descriptors' first ones.
template <class Cfg, typename T, class SA, class SB, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_k_tile(float (&d)[Cfg::BN / 2], const WgmmaDescs& ds,
                                             int a_stage_bytes, int b_stage_bytes) {
  const uint32_t a_st = ds.a_lo + uint32_t(a_stage_bytes >> 4);
  const uint32_t b_st = ds.b_lo + uint32_t(b_stage_bytes >> 4);
  wgmma_fence_operands(d);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < Cfg::BK / Cfg::KSTEP; ++ks)
    wgmma_bn<T, Cfg::BN, kTransA, kTransB>(
        d, pack_desc(a_st + uint32_t(ks * (SA::kStepBytes >> 4)), ds.a_hi),
        pack_desc(b_st + uint32_t(ks * (SB::kStepBytes >> 4)), ds.b_hi));
  wgmma_commit();
}

// Epilogue of both kernels (as conv_mma_kernel's), after the last wgmma and a barrier:
// accumulators -> Cs -> global, through the plan's tile and offsets in `smem` (the aligned base).
// Warp w of warpgroup wg holds rows 64 wg + 16 (w % 4) + g and + 8, columns 8 j + 2 q and + 1
// (m16n8 accumulator tiles). Ends with a barrier (Cs, rowoff and coloff are reused by the next
// unit).
template <class Op, class Plan, int BM, int BN, int NT, typename T, typename Idx>
__device__ __forceinline__ void wgmma_epilogue(const KParams& p, const Tile<Idx>& t,
                                               const float (&d)[BN / 2], unsigned char* smem) {
  float* const Cs = reinterpret_cast<float*>(smem);
  Idx* const rowoff = reinterpret_cast<Idx*>(smem + Plan::Off::ROW_OFF);
  Idx* const coloff = reinterpret_cast<Idx*>(smem + Plan::Off::COL_OFF);
  tile_out_offsets<Op, BM, BN, NT>(p, t, rowoff, coloff);
  constexpr int kCsM = Op::OUT_ROWC ? 1 : Plan::LDC, kCsN = Op::OUT_ROWC ? Plan::LDCT : 1;
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int m0 = (warp >> 2) * 64 + (warp & 3) * 16 + g;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
    store_acc_tile<kCsM, kCsN>(Cs, m0, j * 8 + 2 * q, d[4 * j], d[4 * j + 1], d[4 * j + 2],
                               d[4 * j + 3]);
  __syncthreads();
  store_tile<Op, BM, BN, NT, T>(p, t, Cs, kCsM, kCsN, rowoff, coloff);
  __syncthreads();
}
#endif  // JCN_WGMMA_DEVICE

template <class Op, class Cfg, typename T, typename Idx, bool kKTable>
__global__ void __launch_bounds__(Cfg::NT, 1) conv_wgmma_kernel(const __grid_constant__ KParams p) {
#ifdef JCN_WGMMA_DEVICE
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, NT = Cfg::NT, STAGES = Cfg::STAGES;
  using Plan = WgmmaPlan<Op, Cfg, T, Idx>;
  using Off = typename Plan::Off;
  using SA = typename Plan::SA;
  using SB = typename Plan::SB;
  using LA = Loader<Op, true, BM, BK, NT, T, Idx, Cfg::VEC, false, kKTable>;
  static_assert(!Op::kFold, "filter_acts-like ops: one k range per unit");
  // Operand B (the filters) at offsets fixed per thread (wgmma_slot_places), in the Loader's
  // order (LB serves only its positions); rows past K are zero-filled (cp.async of 0 bytes:
  // nothing is read). The generic loader took ~90 of the ~250 instructions per k-tile and warp
  // here (alex2).
  using LB = Loader<Op, false, BN, BK, NT, T, Idx, Cfg::VEC, false>;
  constexpr int B_SLOTS = LB::SLOTS;
  static_assert(BN * BK / Cfg::VEC % NT == 0, "whole B copies per thread");
  static_assert(Op::B_ROWC, "filters contiguous along n");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* const smem = wgmma_smem(smem_raw);
  const uint32_t base = smem_addr(smem);
  unsigned char* const As = smem + Off::A_OFF;
  unsigned char* const Bs = smem + Off::B_OFF;
  KEntry* const ktab = reinterpret_cast<KEntry*>(smem + Off::TOTAL);
  constexpr int A_BYTES = Plan::A_BYTES, B_BYTES = Plan::B_BYTES;

  const T* const srcA = static_cast<const T*>(p.a);
  const T* const srcB = static_cast<const T*>(p.b);
  const int wg = int(threadIdx.x) >> 7;  // warpgroup: rows wg * 64 ... + 63 of the tile
  if constexpr (kKTable) build_k_table<Op, BK, NT, Idx>(p, ktab);
  uint32_t a_dst[LA::SLOTS], b_dst[B_SLOTS], b_bytes[B_SLOTS];
  int b_kk[B_SLOTS];
  wgmma_slot_places<Op, LA, LB, SA, SB, T, Idx>(p, a_dst, b_dst, b_bytes, b_kk);
  const WgmmaDescs descs =
      WgmmaDescs::of<SA, SB>(base + uint32_t(Off::A_OFF), base + uint32_t(Off::B_OFF), wg * 64);

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
      wgmma_k_tile<Cfg, T, SA, SB, Op::A_ROWC ? 1 : 0, Op::B_ROWC ? 1 : 0>(
          d, descs, stage * A_BYTES, stage * B_BYTES);
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

    wgmma_epilogue<Op, Plan, BM, BN, NT, T>(p, t, d, smem);
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // not sm_90a code: the host never launches it here, and it must not pass silently
#endif  // JCN_WGMMA_DEVICE
}

// float32 at default precision (TF32) into multiples of BN filters. TF32 wgmma reads only
// k-contiguous ("K-major") operands, and the filters and C01B images are contiguous along n / m:
// so the copies go through registers instead of cp.async. A k-tile is loaded one k-tile ahead
// of its store (the loads' latency overlaps a k-tile of wgmma), and every vector of 4 floats
// along rows is stored as 4 floats into 4 rows of an unswizzled k-contiguous stage
// (WgmmaStageTf32T), in the Loader's kUnits order: 128 contiguous bytes per k for the loads, 32
// banks per store. NHWC images are k-contiguous: stored whole into a swizzled stage. 3 stages:
// k-tile it + 1 is stored while the wgmma of it and it - 1 may still read theirs.
// Not the swizzled layout: its conflict-free stores need units of 16 k x 8 rows, and a warp's load
// then touches 16 cache lines (benchmarks/history/2026-11-29_session8_tf32_wgmma.md).
template <class Op, class Cfg, typename Idx, bool kKTable>
__global__ void __launch_bounds__(Cfg::NT, 1)
    conv_wgmma_tf32_kernel(const __grid_constant__ KParams p) {
#ifdef JCN_WGMMA_DEVICE
  using T = float;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, NT = Cfg::NT, STAGES = Cfg::STAGES;
  static_assert(STAGES >= 3, "a stage stored while two are read");
  using Plan = WgmmaPlan<Op, Cfg, T, Idx>;
  using Off = typename Plan::Off;
  using SA = typename Plan::SA;
  using SB = typename Plan::SB;
  static_assert(Cfg::VEC == 4, "vectors of 4 floats");
  using V = Vec<float, 4>;
  constexpr bool kATrans = Op::A_ROWC;  // C01B images: transposed into the stage
  using LA = Loader<Op, true, BM, BK, NT, T, Idx, 4, false, kKTable, kATrans>;
  // Operand B (the filters, a plain K x F matrix: Op::b_offset) in the same order, at offsets
  // fixed per thread (as conv_wgmma_kernel); LB serves only its positions.
  using LB = Loader<Op, false, BN, BK, NT, T, Idx, 4, false, false, true>;
  static_assert(Op::B_ROWC && !Op::kFold, "filter_acts-like ops, filters contiguous along n");
  static_assert(std::is_same_v<SB, WgmmaStageTf32T> &&
                    (std::is_same_v<SA, WgmmaStageTf32T> == kATrans),
                "transposed operands in the unswizzled stages");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* const smem = wgmma_smem(smem_raw);
  const uint32_t a_base = smem_addr(smem) + uint32_t(Off::A_OFF);
  const uint32_t b_base = smem_addr(smem) + uint32_t(Off::B_OFF);
  KEntry* const ktab = reinterpret_cast<KEntry*>(smem + Off::TOTAL);
  constexpr int A_BYTES = Plan::A_BYTES, B_BYTES = Plan::B_BYTES;

  const T* const srcA = static_cast<const T*>(p.a);
  const T* const srcB = static_cast<const T*>(p.b);
  const int wg = int(threadIdx.x) >> 7;  // warpgroup: rows wg * 64 ... + 63 of the tile
  if constexpr (kKTable) build_k_table<Op, BK, NT, Idx>(p, ktab);
  // (A slots: each one's first float; SA::offset of (row, k) includes k's place in its chunk.)
  uint32_t a_dst[LA::SLOTS], b_dst[LB::SLOTS], b_bytes[LB::SLOTS];
  int b_kk[LB::SLOTS];
  wgmma_slot_places<Op, LA, LB, SA, SB, T, Idx>(p, a_dst, b_dst, b_bytes, b_kk);
  const WgmmaDescs descs = WgmmaDescs::of<SA, SB>(a_base, b_base, wg * 64);

  for (int64_t u = blockIdx.x; u < p.units; u += gridDim.x) {
    const Tile<Idx> t = Op::tile(p, u, BM, BN);
    LA la;
    la.ktab = ktab;
    la.init_rows(p, t);
    const T* const b_unit = srcB + Op::b_offset(p, Idx(0), t.n0);
    V breg[LB::SLOTS];
    float d[BN / 2];
#pragma unroll
    for (int e = 0; e < BN / 2; ++e) d[e] = 0.f;

    const Idx nkt = (t.ke - t.kb + Idx(BK - 1)) / Idx(BK);
    auto load = [&](Idx kt) {  // k-tile kt -> registers (zeros outside the operands)
      const Idx k0 = t.kb + kt * Idx(BK);
      la.load(p, t, srcA, 0, k0);
      const char* const b_k0 =
          reinterpret_cast<const char*>(b_unit + Op::b_offset(p, k0, Idx(0)));
#pragma unroll
      for (int s = 0; s < LB::SLOTS; ++s)
        breg[s] = k0 + Idx(b_kk[s]) < t.K ? *reinterpret_cast<const V*>(b_k0 + b_bytes[s]) : V{};
    };
    auto store = [&](int stage) {  // registers -> the stage
      const uint32_t a_st = a_base + uint32_t(stage * A_BYTES);
      const uint32_t b_st = b_base + uint32_t(stage * B_BYTES);
#pragma unroll
      for (int s = 0; s < LA::SLOTS; ++s) {
        if (!LA::live(s)) continue;
        if constexpr (kATrans) {
#pragma unroll
          for (int j = 0; j < 4; ++j) st_shared(a_st + a_dst[s] + 16 * j, la.reg[s].v[j]);
        } else {
          st_shared(a_st + a_dst[s], la.reg[s]);
        }
      }
#pragma unroll
      for (int s = 0; s < LB::SLOTS; ++s)
#pragma unroll
        for (int j = 0; j < 4; ++j) st_shared(b_st + b_dst[s] + 16 * j, breg[s].v[j]);
    };
    if (nkt > 0) {
      load(0);
      store(0);
    }
    if (nkt > 1) load(1);

    int stage = 0;
    for (Idx it = 0; it < nkt; ++it) {
      fence_proxy_async_smem();  // this thread's stores of k-tile `it` are visible to the
      __syncthreads();           // tensor cores, and everyone's; every wgmma of it - 2 finished
      wgmma_k_tile<Cfg, T, SA, SB, 0, 0>(d, descs, stage * A_BYTES, stage * B_BYTES);
      const int next = stage + 1 == STAGES ? 0 : stage + 1;
      if (it + 1 < nkt) store(next);    // k-tile it + 1 into the stage of it - 2
      if (it + 2 < nkt) load(it + 2);
      wgmma_wait<1>();          // this warpgroup's wgmma of it - 1 finished
      wgmma_fence_operands(d);  // no access to d moves above the wait
      stage = next;
    }
    wgmma_wait<0>();
    wgmma_fence_operands(d);
    __syncthreads();  // all stage reads done: Cs may overwrite them

    wgmma_epilogue<Op, Plan, BM, BN, NT, T>(p, t, d, smem);
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // not sm_90a code: the host never launches it here, and it must not pass silently
#endif  // JCN_WGMMA_DEVICE
}

}  // namespace cuda_conv
}  // namespace jax_convnet
