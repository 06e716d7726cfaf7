// The implicit-GEMM kernel shared by the three conv ops (FFMA and wmma tensor-core variants),
// and the ordered reduction of weight_acts partial sums.
//
// One block computes a BM x BN tile of C = A * B per unit; units (tiles, IA classes, WA
// segment / split chunks) are walked with a grid-stride loop, so any problem size fits the grid.
// Main loop: operands are gathered global -> registers (predicated, zero fill, VEC elements per
// access along the contiguous dimension), then stored into double-buffered shared memory; one
// __syncthreads per k-tile. Shared memory is k-major ([BK][rows + pad]) for the FFMA path and
// for operands contiguous along their rows; the tensor-core path keeps an operand contiguous
// along k row-major ([rows][BK + pad]), so its vectors are stored whole, not element by
// element across BK rows (wmma reads either layout).
#pragma once

#include <mma.h>

#include "conv_common.cuh"
#include "conv_ops.cuh"

namespace jax_convnet {
namespace cuda_conv {

// Entry k of the k table, read as one 8-byte word.
template <typename Idx>
__device__ __forceinline__ KSt<Idx> k_entry(const KEntry* ktab, Idx k) {
  const int2 w = *reinterpret_cast<const int2*>(ktab + k);
  return {Idx(w.x), int(int16_t(w.y & 0xffff)), w.y >> 16};  // KEntry: off, then y, x
}

// Gathers one operand tile (R rows x BK) per k-step. kMayWalkK: allow the k-walking thread order
// (below); the cp.async pipeline does not, since its 16-byte copies bypass L1 and a k-walk reads
// half of each 32-byte sector (through L1 it was slower too, a warp's copy touching 32 lines:
// benchmarks/history/2026-11-29_session6_alex2_bf16_c01b.md). kKTable: where each k lies is read from `ktab` (a table in shared memory built once
// per block, conv_mma_kernel) instead of decomposed per copy. kUnits: the thread order of
// transposing stores (below).
template <class Op, bool kIsA, int R, int BK, int NT, typename T, typename Idx, int VEC,
          bool kMayWalkK = true, bool kKTable = false, bool kUnits = false>
struct Loader {
  static constexpr bool ROWC = kIsA ? Op::A_ROWC : Op::B_ROWC;
  // kUnits: vectors of 4 floats along rows, stored transposed into a k-contiguous stage
  // (conv_wgmma_tf32_kernel's WgmmaStageTf32T), taken in warp units of 4 k x 32 rows (lane l: k
  // l / 8, rows 4 (l % 8) ... + 3): the 8 lanes of a k read 128 contiguous bytes, and each of the
  // 4 stores of a vector hits 32 distinct banks. Units run along rows first, so a thread keeps
  // its rows where the warps cover whole row spans (operand A: one row state).
  static constexpr int UNIT_SPANS = R / 32, WARPS = NT / 32;
  static_assert(!kUnits || (ROWC && VEC == 4 && sizeof(T) == 4 && R % 32 == 0 && BK % 4 == 0 &&
                            UNIT_SPANS * (BK / 4) % WARPS == 0),
                "warp units of 4 k x 32 rows of floats");
  static constexpr int NV = R * BK / VEC;  // vectors per tile
  static constexpr int SLOTS = (NV + NT - 1) / NT;
  // Thread order over the tile. Row-contiguous operands normally put consecutive threads on
  // consecutive vectors of one k (fully coalesced, one row per thread, SLOTS k's per thread).
  // When a thread would own >= 4 k's of an operand whose k decomposition costs divisions,
  // consecutive threads walk k instead (one k per thread and k-tile, SLOTS rows per thread).
  static constexpr bool KWALK =
      kMayWalkK && !kUnits && ROWC && SLOTS >= 4 && (kIsA ? Op::A_KDIV : Op::B_KDIV) &&
      NT % BK == 0;
  static_assert(R * BK % VEC == 0 && (ROWC ? R % VEC == 0 : BK % VEC == 0), "vec");
  using V = Vec<T, VEC>;

  // Row-contiguous vectors with NT a multiple of the vectors per k: every slot of a thread is
  // on the same row (row = (tid + s * NT) % Q * VEC), so one row state serves them all.
  static constexpr bool ONE_ROW =
      kUnits ? WARPS % UNIT_SPANS == 0 : ROWC && !KWALK && NT % (R / VEC) == 0;
  RowSt<Idx> rs[ONE_ROW ? 1 : SLOTS];
  V reg[SLOTS];
  const KEntry* ktab;  // kKTable: entry k = where k lies (k past K: y = kKEntryBad)

  __device__ __forceinline__ static bool live(int s) {
    return NV % NT == 0 || int(threadIdx.x) + s * NT < NV;
  }
  // Tile position (row, kk) of slot s's first element; the vector runs along rows (ROWC) or k.
  __device__ __forceinline__ static void pos(int s, int& row, int& kk) {
    const int v = int(threadIdx.x) + s * NT;
    if constexpr (kUnits) {
      const int lane = int(threadIdx.x) % 32, unit = int(threadIdx.x) / 32 + WARPS * s;
      row = (unit % UNIT_SPANS) * 32 + (lane % 8) * 4;
      kk = (unit / UNIT_SPANS) * 4 + lane / 8;
    } else if constexpr (KWALK) {
      kk = v % BK;
      row = (v / BK) * VEC;
    } else if constexpr (ROWC) {
      constexpr int Q = R / VEC;
      row = (v % Q) * VEC;
      kk = v / Q;
    } else {
      constexpr int Q = BK / VEC;
      kk = (v % Q) * VEC;
      row = v / Q;
    }
  }
  __device__ __forceinline__ void init_rows(const KParams& p, const Tile<Idx>& t) {
#pragma unroll
    for (int s = 0; s < (ONE_ROW ? 1 : SLOTS); ++s) {
      if (!live(s)) continue;
      int row, kk;
      pos(s, row, kk);
      if constexpr (kIsA) {
        rs[s] = Op::a_row(p, t, t.m0 + Idx(row));
      } else {
        rs[s] = Op::b_row(p, t, t.n0 + Idx(row));
      }
    }
  }
  // Every slot of a thread sits at the same kk (k walks across threads, or vectors run along k
  // and NT is a multiple of the vectors per row): one k decomposition per k-tile serves them all.
  static constexpr bool SHARED_K = KWALK || (!ROWC && NT % (BK / VEC) == 0);
  static_assert(!kKTable || (kIsA && Op::A_K_FIXED && !SHARED_K), "the k table replaces "
                "per-copy decompositions of k that are the same for every unit");

  // Where slot s's k lies in the k-tile starting at k0.
  __device__ __forceinline__ static KSt<Idx> kstate(const KParams& p, const Tile<Idx>& t, int s,
                                                    int64_t seg, Idx k0) {
    int row, kk;
    pos(s, row, kk);
    if constexpr (kIsA) {
      return Op::a_k(p, t, seg, k0 + Idx(kk));
    } else {
      return Op::b_k(p, t, seg, k0 + Idx(kk));
    }
  }
  // Calls f(s, offset, inside) for every live slot of the k-tile starting at k0.
  template <class F>
  __device__ __forceinline__ void for_each_slot(const KParams& p, const Tile<Idx>& t, int64_t seg,
                                                Idx k0, F&& f) const {
    const int ylim = kIsA ? Op::a_ylim(p) : Op::b_ylim(p);
    const int xlim = kIsA ? Op::a_xlim(p) : Op::b_xlim(p);
    KSt<Idx> ks0;
    if constexpr (SHARED_K) ks0 = kstate(p, t, 0, seg, k0);
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      if (!live(s)) continue;
      KSt<Idx> ks;
      if constexpr (kKTable) {
        int row, kk;
        pos(s, row, kk);
        ks = k_entry(ktab, k0 + Idx(kk));
      } else {
        ks = SHARED_K ? ks0 : kstate(p, t, s, seg, k0);
      }
      const RowSt<Idx>& r = rs[ONE_ROW ? 0 : s];
      f(s, r.base + ks.off,
        unsigned(r.y + ks.y) < unsigned(ylim) && unsigned(r.x + ks.x) < unsigned(xlim));
    }
  }
  __device__ __forceinline__ void load(const KParams& p, const Tile<Idx>& t, const T* src,
                                       int64_t seg, Idx k0) {
    for_each_slot(p, t, seg, k0, [&](int s, Idx off, bool ok) {
      if (ok) {
        reg[s] = *reinterpret_cast<const V*>(src + off);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) reg[s].v[e] = zero_elem<T>();
      }
    });
  }
  // The k-tile at k0 straight into a stage of T (no registers): one cp.async per vector of 16
  // bytes (or 8 / 4 where the operand's rows allow no more), zero-filled outside the operand.
  // Stages as in store(): the vector is contiguous in the stage.
  __device__ __forceinline__ void copy_async(T* stage, int ld, const KParams& p, const Tile<Idx>& t,
                                             const T* src, int64_t seg, Idx k0) const {
    constexpr int kBytes = VEC * int(sizeof(T));
    for_each_slot(p, t, seg, k0, [&](int s, Idx off, bool ok) {
      int row, kk;
      pos(s, row, kk);
      T* dst = stage + (ROWC ? kk * ld + row : row * ld + kk);
      if constexpr (kBytes == 16) {
        cp_async16(dst, ok ? src + off : src, ok);
      } else {
        cp_async_small<kBytes>(dst, ok ? src + off : src, ok);
      }
    });
  }
  // buf: one stage of S, [BK][ld] (kKMajor) or [R][ld] (row-major, operands contiguous along k).
  template <bool kKMajor, typename S>
  __device__ __forceinline__ void store(S* buf, int ld) const {
    static_assert(kKMajor || !ROWC, "row-major stages hold operands contiguous along k");
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
      if (!live(s)) continue;
      int row, kk;
      pos(s, row, kk);
      if constexpr (!kKMajor || ROWC) {
        // The vector is contiguous in the stage: along a row of a row-major stage (it runs along
        // k) or along a k row of a k-major one (it runs along rows).
        const int at = kKMajor ? kk * ld + row : row * ld + kk;
        constexpr int CH = (16 / int(sizeof(S))) < VEC ? (16 / int(sizeof(S))) : VEC;
        Vec<S, CH> tmp[VEC / CH];
#pragma unroll
        for (int e = 0; e < VEC; ++e) tmp[e / CH].v[e % CH] = to_smem<S, T>(reg[s].v[e]);
#pragma unroll
        for (int c = 0; c < VEC / CH; ++c)
          *reinterpret_cast<Vec<S, CH>*>(buf + at + c * CH) = tmp[c];
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) buf[(kk + e) * ld + row] = to_smem<S, T>(reg[s].v[e]);
      }
    }
  }
};

// The k table (Loader's kKTable): where each k of operand A lies, K rounded up to BK entries (those
// past K marked kKEntryBad), built by the block's NT threads; ends with a barrier.
template <class Op, int BK, int NT, typename Idx>
__device__ __forceinline__ void build_k_table(const KParams& p, KEntry* ktab) {
  const Tile<Idx> t0 = Op::tile(p, 0, 128, 128);  // (a_k reads only the k bound K of a tile)
  const Idx kpad = (Idx(p.K) + Idx(BK - 1)) / Idx(BK) * Idx(BK);
  for (Idx k = Idx(threadIdx.x); k < kpad; k += Idx(NT)) {
    const KSt<Idx> ks = Op::a_k(p, t0, 0, k);
    ktab[k] = {int32_t(ks.off), int16_t(ks.y < 0 ? kKEntryBad : ks.y), int16_t(ks.x)};
  }
  __syncthreads();
}

template <typename T>
struct WmmaType {
  using frag = T;  // __half / __nv_bfloat16
  using ptr = T;
};
template <>
struct WmmaType<float> {
  using frag = nvcuda::wmma::precision::tf32;
  using ptr = float;
};

// Where a conv kernel's shared memory goes (bytes, offsets 128-aligned): STAGES buffers of each
// operand (A_STAGE / B_STAGE elements of ELEM bytes), which the epilogue's float tile
// Cs[BM][LDC] overlays after the main loop, then the output offsets of the tile's rows and
// columns (IDX bytes each).
template <int STAGES, int A_STAGE, int B_STAGE, int ELEM, int BM, int BN, int LDC, int IDX>
struct SmemOffsets {
  static constexpr int round(int x) { return (x + 127) / 128 * 128; }
  static constexpr int A_OFF = 0;
  static constexpr int B_OFF = round(STAGES * A_STAGE * ELEM);
  static constexpr int MAIN = B_OFF + round(STAGES * B_STAGE * ELEM);
  static constexpr int CBYTES = round(BM * LDC * 4);
  static constexpr int ROW_OFF = MAIN > CBYTES ? MAIN : CBYTES;
  static constexpr int COL_OFF = ROW_OFF + round(BM * IDX);
  static constexpr int TOTAL = COL_OFF + round(BN * IDX);
};

// Shared-memory plan of a configuration (two stages). kAK / kBK: operand A / B stages are
// k-major ([BK][rows + PAD]), else row-major ([rows][BK + PAD]).
template <class Cfg, typename S, typename Idx, bool kAK, bool kBK>
struct SmemPlan {
  static constexpr int PAD = 16 / int(sizeof(S));  // 4 floats / 8 halves: keeps 16/32B alignment
  static constexpr int LDA = kAK ? Cfg::BM + PAD : Cfg::BK + PAD;
  static constexpr int LDB = kBK ? Cfg::BN + PAD : Cfg::BK + PAD;
  static constexpr int LDC = Cfg::BN + 4;
  static constexpr int A_STAGE = (kAK ? Cfg::BK : Cfg::BM) * LDA;  // elements
  static constexpr int B_STAGE = (kBK ? Cfg::BK : Cfg::BN) * LDB;
  using Off = SmemOffsets<2, A_STAGE, B_STAGE, int(sizeof(S)), Cfg::BM, Cfg::BN, LDC,
                          int(sizeof(Idx))>;
  static constexpr int A_OFF = Off::A_OFF, B_OFF = Off::B_OFF, ROW_OFF = Off::ROW_OFF,
                       COL_OFF = Off::COL_OFF, TOTAL = Off::TOTAL;
  static_assert(TOTAL <= 48 * 1024, "static shared memory");
  // wmma needs 32-byte aligned fragment pointers: stages, and rows of 16 (row-major stages).
  static_assert((A_STAGE * int(sizeof(S))) % 32 == 0 && (B_STAGE * int(sizeof(S))) % 32 == 0,
                "stage alignment");
  static_assert((16 * LDA * int(sizeof(S))) % 32 == 0 && (16 * LDB * int(sizeof(S))) % 32 == 0,
                "fragment alignment");
};

// Epilogue, first step: the output offsets of the tile's rows and columns (-1 past the edge).
template <class Op, int BM, int BN, int NT, typename Idx>
__device__ __forceinline__ void tile_out_offsets(const KParams& p, const Tile<Idx>& t, Idx* rowoff,
                                                 Idx* coloff) {
  for (int i = int(threadIdx.x); i < BM; i += NT)
    rowoff[i] = (t.m0 + Idx(i) < t.M) ? Op::out_row(p, t, t.m0 + Idx(i)) : Idx(-1);
  for (int i = int(threadIdx.x); i < BN; i += NT)
    coloff[i] = (t.n0 + Idx(i) < t.N) ? Op::out_col(p, t, t.n0 + Idx(i)) : Idx(-1);
}

// Epilogue, middle step: one m16n8 float accumulator tile of mma.sync or wgmma into Cs. The lane
// holds (m, n), (m, n + 1), (m + 8, n), (m + 8, n + 1) with m = its row, n = its first column;
// element (m, n) at m * kCsM + n * kCsN (kCsM == 1: Cs is transposed, else float2 stores).
template <int kCsM, int kCsN>
__device__ __forceinline__ void store_acc_tile(float* Cs, int m, int n, float v0, float v1,
                                               float v2, float v3) {
  float* const c = Cs + m * kCsM + n * kCsN;
  if constexpr (kCsM == 1) {
    c[0] = v0;
    c[kCsN] = v1;
    c[8] = v2;
    c[8 + kCsN] = v3;
  } else {
    static_assert(kCsN == 1, "row-major Cs");
    *reinterpret_cast<float2*>(c) = make_float2(v0, v1);
    *reinterpret_cast<float2*>(c + 8 * kCsM) = make_float2(v2, v3);
  }
}

// Epilogue, last step (the tile's float sums in Cs, element (m, n) at m * cs_m + n * cs_n;
// offsets filled, after a barrier): to the output, or to the unit's partial-sum slot, coalesced
// along the output's contiguous dimension.
template <class Op, int BM, int BN, int NT, typename T, typename Idx>
__device__ __forceinline__ void store_tile(const KParams& p, const Tile<Idx>& t, const float* Cs,
                                           int cs_m, int cs_n, const Idx* rowoff,
                                           const Idx* coloff) {
  T* const out = static_cast<T*>(p.out);
  for (int l = int(threadIdx.x); l < BM * BN; l += NT) {
    int m, n;
    if constexpr (Op::OUT_ROWC) {
      m = l % BM;
      n = l / BM;
    } else {
      n = l % BN;
      m = l / BN;
    }
    const Idx ro = rowoff[m], co = coloff[n];
    if (ro >= 0 && co >= 0) {
      const float v = Cs[m * cs_m + n * cs_n];
      if (t.slot) {
        t.slot[ro + co] = v;
      } else {
        out[ro + co] = from_f32<T>(v);
      }
    }
  }
}

// kVecMask bit 0 / bit 1: operand A / B is read up to 16 bytes at a time (the host checked
// divisibility of its contiguous dimension and pointer alignment).
template <class Op, class Cfg, typename T, typename Idx, int kVecMask>
__global__ void __launch_bounds__(Cfg::NT, 1)
    conv_gemm_kernel(const __grid_constant__ KParams p) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, NT = Cfg::NT;
  constexpr bool kTensor = Cfg::kTensor;
  using S = typename SmemElem<T, kTensor && sizeof(T) == 2>::type;
  constexpr bool AK = !kTensor || Op::A_ROWC, BKM = !kTensor || Op::B_ROWC;  // k-major stages
  using Plan = SmemPlan<Cfg, S, Idx, AK, BKM>;
  constexpr int LDA = Plan::LDA, LDB = Plan::LDB, LDC = Plan::LDC;
  constexpr int VA = loader_vec(BM, BK, NT, (kVecMask & 1) ? 16 / int(sizeof(T)) : 1, Op::A_ROWC);
  constexpr int VB = loader_vec(BN, BK, NT, (kVecMask & 2) ? 16 / int(sizeof(T)) : 1, Op::B_ROWC);
  using LA = Loader<Op, true, BM, BK, NT, T, Idx, VA>;
  using LB = Loader<Op, false, BN, BK, NT, T, Idx, VB>;

  __shared__ __align__(128) unsigned char smem[Plan::TOTAL];
  S* const As = reinterpret_cast<S*>(smem + Plan::A_OFF);
  S* const Bs = reinterpret_cast<S*>(smem + Plan::B_OFF);
  float* const Cs = reinterpret_cast<float*>(smem);
  Idx* const rowoff = reinterpret_cast<Idx*>(smem + Plan::ROW_OFF);
  Idx* const coloff = reinterpret_cast<Idx*>(smem + Plan::COL_OFF);

  const T* const srcA = static_cast<const T*>(p.a);
  const T* const srcB = static_cast<const T*>(p.b);
  const int tid = int(threadIdx.x);

  // Accumulators: per-thread TM x TN floats (FFMA) or FM x FN fragments (wmma); `tot` holds the
  // in-order sum of finished segments (weight_acts only).
  constexpr int TM = kTensor ? 1 : Cfg::TM, TN = kTensor ? 1 : Cfg::TN;
  constexpr int FM = kTensor ? Cfg::FM : 1, FN = kTensor ? Cfg::FN : 1;
  constexpr int KF = kTensor ? Cfg::KF : 16;
  using namespace nvcuda;
  using FragT = typename WmmaType<T>::frag;
  using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, KF, float>;

  for (int64_t u = blockIdx.x; u < p.units; u += gridDim.x) {
    const Tile<Idx> t = Op::tile(p, u, BM, BN);
    if (t.skip) continue;  // uniform across the block

    LA la;
    LB lb;
    la.init_rows(p, t);
    lb.init_rows(p, t);

    float acc[TM][TN], tot[TM][TN];
    AccFrag facc[FM][FN], ftot[FM][FN];
    if constexpr (kTensor) {
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) {
          wmma::fill_fragment(facc[i][j], 0.f);
          wmma::fill_fragment(ftot[i][j], 0.f);
        }
    } else {
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = tot[i][j] = 0.f;
    }

    const Idx nkt = (t.ke - t.kb + Idx(BK - 1)) / Idx(BK);  // k-tiles per segment
    const int64_t total_it = int64_t(nkt) * t.s_n;
    if (total_it > 0) {
      la.load(p, t, srcA, t.s_lo, t.kb);
      lb.load(p, t, srcB, t.s_lo, t.kb);
      la.template store<AK>(As, LDA);
      lb.template store<BKM>(Bs, LDB);
      __syncthreads();
      int cur = 0;
      int64_t seg = t.s_lo;
      Idx kt = 0;
      for (int64_t it = 0; it < total_it; ++it) {
        int64_t seg_nx = seg;
        Idx kt_nx = kt + 1;
        if (kt_nx == nkt) {
          kt_nx = 0;
          ++seg_nx;
        }
        const bool more = it + 1 < total_it;
        if (more) {  // prefetch the next k-tile into registers
          la.load(p, t, srcA, seg_nx, t.kb + kt_nx * Idx(BK));
          lb.load(p, t, srcB, seg_nx, t.kb + kt_nx * Idx(BK));
        }
        const S* a_s = As + cur * Plan::A_STAGE;
        const S* b_s = Bs + cur * Plan::B_STAGE;
        if constexpr (kTensor) {
          const int warp = tid / 32, wm = warp % Cfg::WARPS_M, wn = warp / Cfg::WARPS_M;
          using P = typename WmmaType<T>::ptr;
#pragma unroll
          for (int kk = 0; kk < BK; kk += KF) {
            // A (m, k) / B (k, n) at stage[k * ld + m] (k-major) or stage[m * ld + k].
            using ALay = std::conditional_t<AK, wmma::col_major, wmma::row_major>;
            using BLay = std::conditional_t<BKM, wmma::row_major, wmma::col_major>;
            wmma::fragment<wmma::matrix_a, 16, 16, KF, FragT, ALay> fa[FM];
            wmma::fragment<wmma::matrix_b, 16, 16, KF, FragT, BLay> fb[FN];
#pragma unroll
            for (int i = 0; i < FM; ++i) {
              const int m = wm * Cfg::WM + i * 16;
              const S* a_frag = a_s + (AK ? kk * LDA + m : m * LDA + kk);
              wmma::load_matrix_sync(fa[i], reinterpret_cast<const P*>(a_frag), LDA);
              if constexpr (std::is_same_v<T, float>) {
#pragma unroll
                for (int e = 0; e < fa[i].num_elements; ++e)
                  fa[i].x[e] = wmma::__float_to_tf32(fa[i].x[e]);
              }
            }
#pragma unroll
            for (int j = 0; j < FN; ++j) {
              const int n = wn * Cfg::WN + j * 16;
              const S* b_frag = b_s + (BKM ? kk * LDB + n : n * LDB + kk);
              wmma::load_matrix_sync(fb[j], reinterpret_cast<const P*>(b_frag), LDB);
              if constexpr (std::is_same_v<T, float>) {
#pragma unroll
                for (int e = 0; e < fb[j].num_elements; ++e)
                  fb[j].x[e] = wmma::__float_to_tf32(fb[j].x[e]);
              }
            }
#pragma unroll
            for (int i = 0; i < FM; ++i)
#pragma unroll
              for (int j = 0; j < FN; ++j) wmma::mma_sync(facc[i][j], fa[i], fb[j], facc[i][j]);
          }
        } else {
          const int tn = tid % (BN / TN), tm = tid / (BN / TN);
#pragma unroll
          for (int kk = 0; kk < BK; ++kk) {
            float a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; i += 4) {
              const float4 v = *reinterpret_cast<const float4*>(a_s + kk * LDA + tm * TM + i);
              a[i] = v.x;
              a[i + 1] = v.y;
              a[i + 2] = v.z;
              a[i + 3] = v.w;
            }
            if constexpr (TN == 4) {
              const float4 v = *reinterpret_cast<const float4*>(b_s + kk * LDB + tn * TN);
              b[0] = v.x;
              b[1] = v.y;
              b[2] = v.z;
              b[3] = v.w;
            } else if constexpr (TN == 2) {
              const float2 v = *reinterpret_cast<const float2*>(b_s + kk * LDB + tn * TN);
              b[0] = v.x;
              b[1] = v.y;
            } else {
              b[0] = b_s[kk * LDB + tn];
            }
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
              for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
          }
        }
        if constexpr (Op::kFold) {
          if (kt + 1 == nkt) {  // segment finished: tot = (...(p0 + p1) + ...) + p_seg
            const bool first = seg == t.s_lo;
            if constexpr (kTensor) {
#pragma unroll
              for (int i = 0; i < FM; ++i)
#pragma unroll
                for (int j = 0; j < FN; ++j) {
#pragma unroll
                  for (int e = 0; e < facc[i][j].num_elements; ++e)
                    ftot[i][j].x[e] = first ? facc[i][j].x[e] : ftot[i][j].x[e] + facc[i][j].x[e];
                  wmma::fill_fragment(facc[i][j], 0.f);
                }
            } else {
#pragma unroll
              for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) {
                  tot[i][j] = first ? acc[i][j] : tot[i][j] + acc[i][j];
                  acc[i][j] = 0.f;
                }
            }
          }
        }
        if (more) {
          la.template store<AK>(As + (cur ^ 1) * Plan::A_STAGE, LDA);
          lb.template store<BKM>(Bs + (cur ^ 1) * Plan::B_STAGE, LDB);
        }
        __syncthreads();
        cur ^= 1;
        seg = seg_nx;
        kt = kt_nx;
      }
    }

    // ---- epilogue: accumulators -> Cs[BM][LDC] (aliases the operand buffers, all reads of which
    // finished at the loop's last __syncthreads) -> global, coalesced along the output's
    // contiguous dimension.
    tile_out_offsets<Op, BM, BN, NT>(p, t, rowoff, coloff);
    if constexpr (kTensor) {
      const int warp = tid / 32, wm = warp % Cfg::WARPS_M, wn = warp / Cfg::WARPS_M;
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j)
          wmma::store_matrix_sync(Cs + (wm * Cfg::WM + i * 16) * LDC + wn * Cfg::WN + j * 16,
                                  Op::kFold ? ftot[i][j] : facc[i][j], LDC, wmma::mem_row_major);
    } else {
      const int tn = tid % (BN / TN), tm = tid / (BN / TN);
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        float v[TN];
#pragma unroll
        for (int j = 0; j < TN; ++j) v[j] = Op::kFold ? tot[i][j] : acc[i][j];
        float* dst = Cs + (tm * TM + i) * LDC + tn * TN;
        if constexpr (TN == 4) {
          *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
        } else {
#pragma unroll
          for (int j = 0; j < TN; ++j) dst[j] = v[j];
        }
      }
    }
    __syncthreads();
    store_tile<Op, BM, BN, NT, T>(p, t, Cs, LDC, 1, rowoff, coloff);
    __syncthreads();  // Cs / rowoff / coloff are reused by the next unit
  }
}

// weight_acts: out = left fold over segments g (in order) of the segment sums, each the sum of
// its nsplit chunk slots (in order): total = ((acc + s_0) + s_1) + ...  with s_g = ((c_0 + c_1) + ...).
// first: acc is not read (the fold starts with s_0); last: write the output, else acc.
template <typename T>
__global__ void __launch_bounds__(256)
    wa_reduce_kernel(const float* __restrict__ slots, int64_t nseg, int64_t nsplit, int64_t E,
                     float* __restrict__ acc, T* __restrict__ out, int first, int last) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < E;
       e += int64_t(gridDim.x) * blockDim.x) {
    float total = first ? 0.f : acc[e];
    for (int64_t g = 0; g < nseg; ++g) {
      const float* sg = slots + g * nsplit * E + e;
      float s = sg[0];
      for (int64_t q = 1; q < nsplit; ++q) s += sg[q * E];
      total = (first && g == 0) ? s : total + s;
    }
    if (last) {
      out[e] = from_f32<T>(total);
    } else {
      acc[e] = total;
    }
  }
}

}  // namespace cuda_conv
}  // namespace jax_convnet
