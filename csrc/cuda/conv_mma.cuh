// The tensor-core implicit GEMM of the conv family (mma.sync), for operands that can be read
// 16 bytes at a time: bf16 / f16 (m16n8k16), float32 as TF32 (m16n8k8) or, for float32
// accuracy, as 3xTF32 (each operand split into a TF32 high part and a TF32 residue; the three
// products big*big + big*small + small*big keep ~22 bits, the residue*residue term is dropped).
//
// Same units, tiles and operand addressing as conv_gemm_kernel (conv_ops.cuh, Loader); what
// differs is the pipeline: every k-tile goes global -> shared memory with cp.async (no registers,
// zero-filled outside the operand) into a ring of STAGES buffers, STAGES - 1 k-tiles ahead of the
// math, one __syncthreads per k-tile. Warps own WM x WN of the block tile and read their fragments
// with ldmatrix (the .trans form for k-major stages; TF32 reads k-major stages element-wise).
// Stage rows are padded so that ldmatrix and the element-wise reads are free of bank conflicts.
#pragma once

#include "conv_common.cuh"
#include "conv_kernel.cuh"
#include "conv_ops.cuh"

namespace jax_convnet {
namespace cuda_conv {

// Block tile of WARPS_M x WARPS_N warps of WM x WN each; BK = 128 bytes of k per stage (deep
// k-tiles halve the barriers and the operand address arithmetic per flop of 64-byte ones).
template <typename T, int WARPS_M_, int WARPS_N_, int WM_, int WN_, int STAGES_>
struct MmaCfg {
  static constexpr bool kTensor = true;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int WM = WM_, WN = WN_, MI = WM / 16, NI = WN / 8;
  static constexpr int BM = WM * WARPS_M, BN = WN * WARPS_N, NT = 32 * WARPS_M * WARPS_N;
  static constexpr int BK = 128 / int(sizeof(T));    // 64 halves or 32 floats
  static constexpr int KF = sizeof(T) == 2 ? 16 : 8;  // k of one mma
  static constexpr int VEC = 16 / int(sizeof(T));    // elements per cp.async
};
// Warps of 64 x 32: a warp reads 3 KiB of fragments per k-step of 16 mma (bf16; TF32 half the
// k). The wide tile has 8 of them (256 threads, two blocks per SM at <= 128 registers, 2 x 105
// KiB of shared memory); the narrow one 4 (128 threads, ~200 registers): 8 warps of 32 x 32
// there read a third more shared memory per mma and were slower
// (benchmarks/history/2026-11-29_session1_tf32_narrow_tiles.md).
template <typename T>
using MmaWide = MmaCfg<T, 2, 4, 64, 32, 3>;  // 128 x 128
template <typename T>
using MmaNarrow = MmaCfg<T, 2, 2, 64, 32, 3>;  // 128 x 64
// filter_acts into column counts that 96 divides and 128 does not (192 filters: AlexNet conv2;
// Op::kMidTile): no wasted columns, and 8 warps of 32 x 48 at 128 registers, two blocks and 16
// warps per SM (the narrow tile holds 8: its 192 registers). 4 warps of 64 x 48 (1.5x the mma
// per fragment read, 224-230 registers) were slower on AlexNet conv2
// (benchmarks/history/2026-11-29_session6_alex2_bf16_c01b.md).
template <typename T>
using MmaMid = MmaCfg<T, 4, 2, 32, 48, 3>;  // 128 x 96
// Up to 32 columns (image_acts into a few channels, e.g. RGB): 4 warps of 32 x 32; the 8-column
// mma tiles past the operand's last column are skipped (N = 3: one in four runs).
template <typename T>
using MmaThin = MmaCfg<T, 4, 1, 32, 32, 3>;  // 128 x 32

// Shared memory of one kernel instance (SmemOffsets of STAGES stages). kAK / kBK: operand A / B is
// contiguous along its rows, so its stages are k-major ([BK][rows + pad]); otherwise row-major
// ([rows][BK + pad]). Pads: 16-bit stages 8 elements (ldmatrix rows 16 bytes apart modulo 128);
// float stages 4 (row-major: ldmatrix) or 8 (k-major: lanes (t, g) read t * ld + g, ld = 8 mod 32).
template <class Cfg, typename T, typename Idx, bool kAK, bool kBK>
struct MmaPlan {
  static constexpr int PAD_K = 8, PAD_R = sizeof(T) == 2 ? 8 : 4;
  static constexpr int LDA = kAK ? Cfg::BM + PAD_K : Cfg::BK + PAD_R;
  static constexpr int LDB = kBK ? Cfg::BN + PAD_K : Cfg::BK + PAD_R;
  static constexpr int LDC = Cfg::BN + 8;  // float2 stores of a warp's accumulators: no conflicts
  // Outputs contiguous along m (Op::OUT_ROWC) go through the tile transposed, [BN][BM + 4]: the
  // accumulator stores and store_tile's reads along m are then free of bank conflicts (read
  // along m from [BM][LDC], a warp hit 4 banks: 8-way conflicts).
  static constexpr int LDCT = Cfg::BM + 4;
  static_assert(Cfg::BN * LDCT <= Cfg::BM * LDC, "the transposed tile fits the tile's space");
  static constexpr int A_STAGE = (kAK ? Cfg::BK : Cfg::BM) * LDA;  // elements
  static constexpr int B_STAGE = (kBK ? Cfg::BK : Cfg::BN) * LDB;
  using Off = SmemOffsets<Cfg::STAGES, A_STAGE, B_STAGE, int(sizeof(T)), Cfg::BM, Cfg::BN, LDC,
                          int(sizeof(Idx))>;
  static constexpr int A_OFF = Off::A_OFF, B_OFF = Off::B_OFF, ROW_OFF = Off::ROW_OFF,
                       COL_OFF = Off::COL_OFF, TOTAL = Off::TOTAL;
  static_assert(TOTAL <= 227 * 1024, "shared memory per block");
  static_assert((LDA * int(sizeof(T))) % 16 == 0 && (LDB * int(sizeof(T))) % 16 == 0,
                "cp.async and ldmatrix need 16-byte aligned stage rows");
};

template <class Op, class Cfg, typename T, typename Idx>
using MmaPlanOf = MmaPlan<Cfg, T, Idx, Op::A_ROWC, Op::B_ROWC>;

// The fragments of one warp for one mma k-step at kk: A (MI tiles of 16 x KF) and B (NI tiles of
// KF x 8), raw (16-bit pairs or float bits), in mma.sync's register order.
template <class Cfg, typename T, int LD, bool kKMajor>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const T* s, int m0, int kk,
                                            int lane) {
  if constexpr (sizeof(T) == 2) {
    if constexpr (kKMajor) {  // matrices (m 0-7 | 8-15) x (k 0-7 | 8-15), stored k-major: .trans
      ldmatrix_x4_trans(a, s + (kk + (lane & 7) + ((lane >> 4) << 3)) * LD + m0 +
                               (((lane >> 3) & 1) << 3));
    } else {
      ldmatrix_x4(a, s + (m0 + (lane & 15)) * LD + kk + ((lane >> 4) << 3));
    }
  } else {
    if constexpr (kKMajor) {
      const int g = lane >> 2, t = lane & 3;
      const float* f = reinterpret_cast<const float*>(s);
      a[0] = __float_as_uint(f[(kk + t) * LD + m0 + g]);
      a[1] = __float_as_uint(f[(kk + t) * LD + m0 + g + 8]);
      a[2] = __float_as_uint(f[(kk + t + 4) * LD + m0 + g]);
      a[3] = __float_as_uint(f[(kk + t + 4) * LD + m0 + g + 8]);
    } else {  // 8x8 b16 matrices are 8 x 4 floats: (m 0-7 | 8-15) x (k 0-3 | 4-7)
      ldmatrix_x4(a, s + (m0 + (lane & 15)) * LD + kk + ((lane >> 4) << 2));
    }
  }
}

// Two adjacent 8-column B tiles (n0 and n0 + 8).
template <class Cfg, typename T, int LD, bool kKMajor>
__device__ __forceinline__ void load_b_frag_pair(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* s,
                                                 int n0, int kk, int lane) {
  uint32_t r[4];
  if constexpr (sizeof(T) == 2) {
    if constexpr (kKMajor) {  // matrices (k 0-7 | 8-15) x (n 0-7 | 8-15), stored k-major: .trans
      ldmatrix_x4_trans(r, s + (kk + (lane & 7) + (((lane >> 3) & 1) << 3)) * LD + n0 +
                               ((lane >> 4) << 3));
    } else {
      ldmatrix_x4(r, s + (n0 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk +
                         (((lane >> 3) & 1) << 3));
    }
  } else {
    if constexpr (kKMajor) {
      const int g = lane >> 2, t = lane & 3;
      const float* f = reinterpret_cast<const float*>(s);
      r[0] = __float_as_uint(f[(kk + t) * LD + n0 + g]);
      r[1] = __float_as_uint(f[(kk + t + 4) * LD + n0 + g]);
      r[2] = __float_as_uint(f[(kk + t) * LD + n0 + 8 + g]);
      r[3] = __float_as_uint(f[(kk + t + 4) * LD + n0 + 8 + g]);
    } else {
      ldmatrix_x4(r, s + (n0 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk +
                         (((lane >> 3) & 1) << 2));
    }
  }
  b0[0] = r[0];
  b0[1] = r[1];
  b1[0] = r[2];
  b1[1] = r[3];
}

// kSplit: float32 as 3xTF32 (precision highest); otherwise one mma per tile pair.
// kAVec: elements per copy of operand A: 16 bytes, or single floats for float32 operands whose
// rows cannot be read 16 bytes at a time (NHWC images of 3 channels).
// kKTable: operand A's k decompositions (the same for every unit: filter_acts) are computed once
// per block into a table of K (rounded up to BK) entries after the plan's shared memory. Where A
// is contiguous along m (C01B images) each copy sits at its own k and would decompose it (two
// divisions and the offset: about 30 instructions per copy, 8 copies per thread and k-tile).
template <class Op, class Cfg, typename T, typename Idx, bool kSplit, int kAVec = Cfg::VEC,
          bool kKTable = false>
__global__ void __launch_bounds__(Cfg::NT, Op::kFold ? 1 : 2)
    conv_mma_kernel(const __grid_constant__ KParams p) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, NT = Cfg::NT, STAGES = Cfg::STAGES;
  constexpr int MI = Cfg::MI, NI = Cfg::NI, KF = Cfg::KF;
  constexpr bool AK = Op::A_ROWC, BKM = Op::B_ROWC;  // k-major stages
  constexpr bool kSkipDead = BN <= 32;  // the thin tile (wider ones keep their loop unchanged)
  static_assert(!kSplit || std::is_same_v<T, float>, "3xTF32 is for float32");
  using Plan = MmaPlanOf<Op, Cfg, T, Idx>;
  constexpr int LDA = Plan::LDA, LDB = Plan::LDB, LDC = Plan::LDC;
  using LA = Loader<Op, true, BM, BK, NT, T, Idx, kAVec, false, kKTable>;
  using LB = Loader<Op, false, BN, BK, NT, T, Idx, Cfg::VEC, false>;

  extern __shared__ __align__(128) unsigned char smem[];
  T* const As = reinterpret_cast<T*>(smem + Plan::A_OFF);
  T* const Bs = reinterpret_cast<T*>(smem + Plan::B_OFF);
  float* const Cs = reinterpret_cast<float*>(smem);
  Idx* const rowoff = reinterpret_cast<Idx*>(smem + Plan::ROW_OFF);
  Idx* const coloff = reinterpret_cast<Idx*>(smem + Plan::COL_OFF);

  const T* const srcA = static_cast<const T*>(p.a);
  const T* const srcB = static_cast<const T*>(p.b);
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp % Cfg::WARPS_M) * Cfg::WM, wn0 = (warp / Cfg::WARPS_M) * Cfg::WN;
  constexpr int FI = Op::kFold ? MI : 1, FJ = Op::kFold ? NI : 1;  // the fold's running sum

  KEntry* const ktab = reinterpret_cast<KEntry*>(smem + Plan::TOTAL);
  if constexpr (kKTable) build_k_table<Op, BK, NT, Idx>(p, ktab);

  for (int64_t u = blockIdx.x; u < p.units; u += gridDim.x) {
    const Tile<Idx> t = Op::tile(p, u, BM, BN);
    if (t.skip) continue;  // uniform across the block

    // Columns of the thin tile inside the operand: its mma past them are skipped (uniform).
    const int n_live = int(t.N - t.n0 < Idx(BN) ? t.N - t.n0 : Idx(BN));

    LA la;
    LB lb;
    la.ktab = ktab;
    la.init_rows(p, t);
    lb.init_rows(p, t);
    float acc[MI][NI][4], tot[FI][FJ][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NI; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    const Idx nkt = (t.ke - t.kb + Idx(BK - 1)) / Idx(BK);  // k-tiles per segment
    const int64_t total_it = int64_t(nkt) * t.s_n;
    // Load cursor: the next k-tile to copy (segment, k-tile), STAGES - 1 ahead of the math.
    int64_t lseg = t.s_lo, issued = 0;
    Idx lkt = 0;
    auto issue = [&](int stage) {
      if (issued < total_it) {
        const Idx k0 = t.kb + lkt * Idx(BK);
        la.copy_async(As + stage * Plan::A_STAGE, LDA, p, t, srcA, lseg, k0);
        lb.copy_async(Bs + stage * Plan::B_STAGE, LDB, p, t, srcB, lseg, k0);
        if (++lkt == nkt) {
          lkt = 0;
          ++lseg;
        }
      }
      ++issued;
      cp_async_commit();  // an empty group past the end keeps the wait counts uniform
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s);

    int stage = 0;
    Idx ckt = 0;  // k-tile of the math within its segment (the fold's trigger)
    for (int64_t it = 0; it < total_it; ++it) {
      cp_async_wait<STAGES - 2>();  // this thread's copies of k-tile `it` landed ...
      __syncthreads();              // ... and everyone's; the stage read at it - 1 is free
      issue(stage == 0 ? STAGES - 1 : stage - 1);
      const T* a_s = As + stage * Plan::A_STAGE;
      const T* b_s = Bs + stage * Plan::B_STAGE;
#pragma unroll
      for (int kk = 0; kk < BK; kk += KF) {
        uint32_t bf[NI][2], bs[kSplit ? NI : 1][2];
#pragma unroll
        for (int j = 0; j < NI; j += 2)
          load_b_frag_pair<Cfg, T, LDB, BKM>(bf[j], bf[j + 1], b_s, wn0 + j * 8, kk, lane);
        if constexpr (kSplit) {
#pragma unroll
          for (int j = 0; j < NI; ++j) split_tf32<2>(bf[j], bs[j]);
        }
#pragma unroll
        for (int i = 0; i < MI; ++i) {
          uint32_t af[4], as[4];
          load_a_frag<Cfg, T, LDA, AK>(af, a_s, wm0 + i * 16, kk, lane);
          if constexpr (kSplit) split_tf32<4>(af, as);
#pragma unroll
          for (int j = 0; j < NI; ++j) {
            if (kSkipDead && wn0 + j * 8 >= n_live) continue;  // zero-filled B, not stored
            if constexpr (kSplit) {  // small terms first: they are the least significant
              mma_16x8<T>(acc[i][j], as, bf[j]);
              mma_16x8<T>(acc[i][j], af, bs[j]);
            }
            mma_16x8<T>(acc[i][j], af, bf[j]);
          }
        }
      }
      if constexpr (Op::kFold) {
        if (++ckt == nkt) {  // segment finished: tot = (...(p0 + p1) + ...) + p_seg
          ckt = 0;
          const bool first = it + 1 == int64_t(nkt);
#pragma unroll
          for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < NI; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                tot[i][j][e] = first ? acc[i][j][e] : tot[i][j][e] + acc[i][j][e];
                acc[i][j][e] = 0.f;
              }
        }
      }
      stage = stage + 1 == STAGES ? 0 : stage + 1;
    }
    cp_async_wait<0>();
    __syncthreads();  // all stage reads done: Cs may overwrite them

    // ---- epilogue: accumulators -> Cs -> global, coalesced along the output's contiguous
    // dimension (as conv_gemm_kernel). Cs is [BM][LDC], or [BN][LDCT] for m-contiguous outputs.
    tile_out_offsets<Op, BM, BN, NT>(p, t, rowoff, coloff);
    constexpr int kCsM = Op::OUT_ROWC ? 1 : LDC, kCsN = Op::OUT_ROWC ? Plan::LDCT : 1;
    {
      const int g = lane >> 2, q = lane & 3;
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j) {
          const float* v = Op::kFold ? tot[i % FI][j % FJ] : acc[i][j];
          store_acc_tile<kCsM, kCsN>(Cs, wm0 + i * 16 + g, wn0 + j * 8 + 2 * q, v[0], v[1], v[2],
                                     v[3]);
        }
    }
    __syncthreads();
    store_tile<Op, BM, BN, NT, T>(p, t, Cs, kCsM, kCsN, rowoff, coloff);
    __syncthreads();  // Cs / rowoff / coloff are reused by the next unit
  }
}

}  // namespace cuda_conv
}  // namespace jax_convnet
