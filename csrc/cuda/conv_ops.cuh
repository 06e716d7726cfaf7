// The three conv ops as implicit GEMMs: how a tile (unit of work) is decoded and where every
// operand / output element lives.
//
// Notation: images (b, c, y, x) with element strides p.is, filters (f, c, i, j) with p.fs,
// hidden (b, f, oy, ox) with p.hs; T = fh * fw taps, tap = i * fw + j.
//
//   op   A (M x K)       B (K x N)   M               N           K (order, innermost last)
//   FA   images          filters     (b, oy, ox)     f           C01B (c, tap), NHWC (tap, c)
//   IA   hidden          filters     (b, y, x)/class c           (ii, jj, f) taps of the class
//   WA   images          hidden      C01B (c, tap), NHWC (tap, c)   f               (pos, b)
//   IA columns (OpIACols): hidden x filters -> a float32 column buffer, M as FA, N = FA's K, K = f
//
// M orders: C01B puts b innermost (FA: m = (oy * Wo + ox) * B + b), NHWC puts b outermost
// (m = (b * Ho + oy) * Wo + ox), so the contiguous dimension is always read contiguously:
//   A_ROWC / B_ROWC = the operand is contiguous along its row (m or n) index, otherwise along k.
// The K orders make the filter operand of FA a plain row-major K x F matrix (offset k * F + f)
// and the WA output a plain M x F matrix (offset m * F + f) in both layouts.
//
// image_acts is computed per residue class (ry, rx) = (y mod sh, x mod sw): only taps with
// i = i0 + ii * sh (i0 = (ry + pt) mod sh) and j = j0 + jj * sw reach a pixel of the class, and
// then oy = qy + yq - ii with qy = (ry + pt - i0) / sh, y = ry + yq * sh. So there is no wasted
// stride-divisibility test. A class whose taps miss the filter (nI or nJ == 0) has K = 0 and
// writes zeros.
#pragma once

#include "conv_common.cuh"
#include "geometry.h"

namespace jax_convnet {
namespace cuda_conv {

template <typename Idx>
struct RowSt {
  Idx base;
  int y, x;
};
template <typename Idx>
struct KSt {
  Idx off;
  int y, x;
};
// A KSt packed for the k table of the mma and wgmma kernels (Loader's kKTable), 8 bytes read as
// one word (k_entry): y = kKEntryBad for k past K (a row's y plus it stays negative: the host uses
// the table only where rows and taps are below 2^15).
struct __align__(8) KEntry {
  int32_t off;
  int16_t y, x;
};
constexpr int kKEntryBad = -(1 << 15);

template <typename Idx>
struct Tile {
  Idx m0, n0, M, N, K;  // row / col / k validity bounds of this unit
  Idx kb, ke;           // k range of this unit (chunk boundaries are multiples of BK)
  int64_t s_lo, s_n;    // WA: segments summed by this unit (folded in order)
  // IA residue class
  Idx ry, rx, i0, j0, qy, qx, nI, nJ;
  DivMod dHq, dWq;
  float* slot;  // WA: partial-sum slot (null: write the output)
  bool skip;    // IA: tile beyond its class's M
};

// ------------------------------------------------------------------------------------------
// filter_acts: hid[b, f, oy, ox] = sum_{c,i,j} img[b, c, oy*sh - pt + i, ox*sw - pl + j] w[f,c,i,j]
template <Layout L, typename Idx>
struct OpFA {
  static constexpr bool A_ROWC = (L == Layout::kC01B);  // images: b (C01B) / c (NHWC) contiguous
  static constexpr bool B_ROWC = true;                  // filters: f contiguous
  static constexpr bool A_KDIV = true, B_KDIV = false;  // k decomposition needs divisions
  static constexpr bool A_K_FIXED = true;  // a_k is the same for every unit (the mma k table)
  static constexpr bool OUT_ROWC = (L == Layout::kC01B);
  static constexpr bool kFold = false;
  // The mma kernel's 128 x 96 tile (conv_mma.cuh, MmaMid) where 96 wastes the fewest columns:
  // filter_acts only: there it beats the 64-wide tile (with the k table); weight_acts was slower
  // with the tile's first, 4-warp form, image_acts no faster
  // (benchmarks/history/2026-11-29_session6_alex2_bf16_c01b.md).
  static constexpr bool kMidTile = true;

  __device__ static Tile<Idx> tile(const KParams& p, int64_t u, int BM, int BN) {
    Tile<Idx> t{};
    const int64_t nt = u % p.tiles_n, mt = u / p.tiles_n;
    t.m0 = Idx(mt * BM);
    t.n0 = Idx(nt * BN);
    t.M = Idx(p.M);
    t.N = Idx(p.N);
    t.K = Idx(p.K);
    t.kb = 0;
    t.ke = Idx(p.K);
    t.s_lo = 0;
    t.s_n = 1;
    t.slot = nullptr;
    t.skip = false;
    return t;
  }
  __device__ static void mpos(const KParams& p, Idx m, Idx& b, Idx& oy, Idx& ox) {
    if constexpr (L == Layout::kC01B) {
      Idx pos = divmod<Idx>(m, p.dB, b);
      oy = divmod<Idx>(pos, p.dWo, ox);
    } else {
      Idx t = divmod<Idx>(m, p.dWo, ox);
      b = divmod<Idx>(t, p.dHo, oy);
    }
  }
  __device__ static RowSt<Idx> a_row(const KParams& p, const Tile<Idx>& t, Idx m) {
    const bool v = m < t.M;
    Idx b, oy, ox;
    mpos(p, v ? m : Idx(0), b, oy, ox);
    const Idx iy0 = oy * Idx(p.sh) - Idx(p.pt), ix0 = ox * Idx(p.sw) - Idx(p.pl);
    return {b * Idx(p.is.n) + iy0 * Idx(p.is.y) + ix0 * Idx(p.is.x), v ? int(iy0) : kBad,
            int(ix0)};
  }
  __device__ static KSt<Idx> a_k(const KParams& p, const Tile<Idx>& t, int64_t, Idx k) {
    const bool v = k < t.K;
    const Idx kk = v ? k : Idx(0);
    Idx c, tap, i, j;
    if constexpr (L == Layout::kC01B) {
      c = divmod<Idx>(kk, p.dT, tap);
    } else {
      tap = divmod<Idx>(kk, p.dC, c);
    }
    i = divmod<Idx>(tap, p.dfw, j);
    return {c * Idx(p.is.c) + i * Idx(p.is.y) + j * Idx(p.is.x), v ? int(i) : kBad, int(j)};
  }
  __device__ static int a_ylim(const KParams& p) { return int(p.H); }
  __device__ static int a_xlim(const KParams& p) { return int(p.W); }

  // Operand B is a plain K x F matrix: the filter offset of (k, n) = k * F + f (see top).
  __device__ static Idx b_offset(const KParams& p, Idx k, Idx n) {
    return k * Idx(p.F) + n * Idx(p.fs.n);
  }
  __device__ static RowSt<Idx> b_row(const KParams& p, const Tile<Idx>& t, Idx n) {
    const bool v = n < t.N;
    return {b_offset(p, Idx(0), v ? n : Idx(0)), v ? 0 : kBad, 0};
  }
  __device__ static KSt<Idx> b_k(const KParams& p, const Tile<Idx>& t, int64_t, Idx k) {
    const bool v = k < t.K;
    return {b_offset(p, v ? k : Idx(0), Idx(0)), v ? 0 : kBad, 0};
  }
  __device__ static int b_ylim(const KParams&) { return 1; }
  __device__ static int b_xlim(const KParams&) { return 1; }

  __device__ static Idx out_row(const KParams& p, const Tile<Idx>&, Idx m) {
    Idx b, oy, ox;
    mpos(p, m, b, oy, ox);
    return b * Idx(p.hs.n) + oy * Idx(p.hs.y) + ox * Idx(p.hs.x);
  }
  __device__ static Idx out_col(const KParams& p, const Tile<Idx>&, Idx n) {
    return n * Idx(p.hs.c);
  }
};

// ------------------------------------------------------------------------------------------
// image_acts: img[b, c, y, x] = sum over taps hitting (y, x) of hid[b, f, oy, ox] w[f, c, i, j]

// Residue class (ry, rx) of image_acts (see the top of this file): its first tap (i0, j0), its
// taps per direction (nI, nJ), its pixels per direction (hq, wq) and the hidden position (qy, qx)
// of its first pixel's first tap, in the integer type I. One rule for the GEMM tiles (OpIA) and
// the direct kernel (conv_image_acts_direct.cuh).
template <typename I>
struct IAClass {
  I i0, j0, nI, nJ, hq, wq, qy, qx;
};
template <typename I>
__device__ __forceinline__ IAClass<I> ia_class(const KParams& p, I ry, I rx) {
  const I sh = I(p.sh), sw = I(p.sw), pt = I(p.pt), pl = I(p.pl), fh = I(p.fh), fw = I(p.fw);
  IAClass<I> c;
  c.i0 = (ry + pt) % sh;
  c.j0 = (rx + pl) % sw;
  c.nI = c.i0 < fh ? (fh - c.i0 + sh - 1) / sh : I(0);
  c.nJ = c.j0 < fw ? (fw - c.j0 + sw - 1) / sw : I(0);
  c.hq = (I(p.H) - ry + sh - 1) / sh;
  c.wq = (I(p.W) - rx + sw - 1) / sw;
  c.qy = (ry + pt - c.i0) / sh;
  c.qx = (rx + pl - c.j0) / sw;
  return c;
}

template <Layout L, typename Idx>
struct OpIA {
  static constexpr bool A_ROWC = (L == Layout::kC01B);  // hidden: b (C01B) / f (NHWC)
  static constexpr bool B_ROWC = false;                 // filters: f (= k innermost)
  static constexpr bool A_KDIV = true, B_KDIV = true;
  static constexpr bool A_K_FIXED = false;
  static constexpr bool OUT_ROWC = (L == Layout::kC01B);
  static constexpr bool kFold = false;
  static constexpr bool kMidTile = false;

  __device__ static Tile<Idx> tile(const KParams& p, int64_t u, int BM, int BN) {
    Tile<Idx> t{};
    const int64_t nt = u % p.tiles_n, r = u / p.tiles_n;
    const int64_t mt = r % p.tiles_m, cls = r / p.tiles_m;
    const int64_t ry = cls / p.ncx, rx = cls % p.ncx;  // ry < min(sh, H), rx < min(sw, W)
    const IAClass<int64_t> c = ia_class<int64_t>(p, ry, rx);
    const int64_t M = p.B * c.hq * c.wq;
    t.m0 = Idx(mt * BM);
    t.n0 = Idx(nt * BN);
    t.M = Idx(M);
    t.N = Idx(p.N);
    t.K = Idx((c.nI > 0 && c.nJ > 0) ? c.nI * p.nJmax * p.F : 0);
    t.kb = 0;
    t.ke = t.K;
    t.s_lo = 0;
    t.s_n = 1;
    t.ry = Idx(ry);
    t.rx = Idx(rx);
    t.i0 = Idx(c.i0);
    t.j0 = Idx(c.j0);
    t.qy = Idx(c.qy);
    t.qx = Idx(c.qx);
    t.nI = Idx(c.nI);
    t.nJ = Idx(c.nJ);
    t.dHq = (c.hq == p.hq0) ? p.dHq[0] : p.dHq[1];
    t.dWq = (c.wq == p.wq0) ? p.dWq[0] : p.dWq[1];
    t.slot = nullptr;
    t.skip = mt * BM >= M;
    return t;
  }
  __device__ static void mpos(const KParams& p, const Tile<Idx>& t, Idx m, Idx& b, Idx& yq,
                              Idx& xq) {
    if constexpr (L == Layout::kC01B) {
      Idx q = divmod<Idx>(m, p.dB, b);
      yq = divmod<Idx>(q, t.dWq, xq);
    } else {
      Idx r = divmod<Idx>(m, t.dWq, xq);
      b = divmod<Idx>(r, t.dHq, yq);
    }
  }
  __device__ static RowSt<Idx> a_row(const KParams& p, const Tile<Idx>& t, Idx m) {
    const bool v = m < t.M;
    Idx b, yq, xq;
    mpos(p, t, v ? m : Idx(0), b, yq, xq);
    const Idx oy0 = t.qy + yq, ox0 = t.qx + xq;
    return {b * Idx(p.hs.n) + oy0 * Idx(p.hs.y) + ox0 * Idx(p.hs.x), v ? int(oy0) : kBad,
            int(ox0)};
  }
  __device__ static void kpos(const KParams& p, const Tile<Idx>& t, Idx k, bool& v, Idx& f,
                              Idx& ii, Idx& jj) {
    v = k < t.K;
    Idx tc = divmod<Idx>(v ? k : Idx(0), p.dF, f);
    ii = divmod<Idx>(tc, p.dnJ, jj);
    v = v && jj < t.nJ;
  }
  __device__ static KSt<Idx> a_k(const KParams& p, const Tile<Idx>& t, int64_t, Idx k) {
    bool v;
    Idx f, ii, jj;
    kpos(p, t, k, v, f, ii, jj);
    return {f * Idx(p.hs.c) - ii * Idx(p.hs.y) - jj * Idx(p.hs.x), v ? -int(ii) : kBad,
            -int(jj)};
  }
  __device__ static int a_ylim(const KParams& p) { return int(p.Ho); }
  __device__ static int a_xlim(const KParams& p) { return int(p.Wo); }

  __device__ static RowSt<Idx> b_row(const KParams& p, const Tile<Idx>& t, Idx n) {
    const bool v = n < t.N;
    return {(v ? n : Idx(0)) * Idx(p.fs.c), v ? 0 : kBad, 0};
  }
  __device__ static KSt<Idx> b_k(const KParams& p, const Tile<Idx>& t, int64_t, Idx k) {
    bool v;
    Idx f, ii, jj;
    kpos(p, t, k, v, f, ii, jj);
    return {f * Idx(p.fs.n) + (t.i0 + ii * Idx(p.sh)) * Idx(p.fs.y) +
                (t.j0 + jj * Idx(p.sw)) * Idx(p.fs.x),
            v ? 0 : kBad, 0};
  }
  __device__ static int b_ylim(const KParams&) { return 1; }
  __device__ static int b_xlim(const KParams&) { return 1; }

  __device__ static Idx out_row(const KParams& p, const Tile<Idx>& t, Idx m) {
    Idx b, yq, xq;
    mpos(p, t, m, b, yq, xq);
    const Idx y = t.ry + yq * Idx(p.sh), x = t.rx + xq * Idx(p.sw);
    return b * Idx(p.is.n) + y * Idx(p.is.y) + x * Idx(p.is.x);
  }
  __device__ static Idx out_col(const KParams& p, const Tile<Idx>&, Idx n) {
    return n * Idx(p.is.c);
  }
};

// image_acts into a few channels through a float32 column buffer (conv_image_acts_columns.cuh):
// cols[n][m] = sum_f hid[b, f, oy, ox] w[f, c, i, j], m = the hidden position (FA's M order),
// n = the filter row (FA's K order: C01B (c, tap), NHWC (tap, c)), so the filters are a plain
// K x N = F x (C*fh*fw) matrix read in place (offset n*F + f) and the buffer is contiguous
// along m. The host runs it per chunk of images (p.B images from p.a on).
template <Layout L, typename Idx>
struct OpIACols {
  static constexpr bool A_ROWC = (L == Layout::kC01B);  // hidden: b (C01B) / f (NHWC, = k)
  static constexpr bool B_ROWC = false;                 // filters: f (= k) contiguous
  static constexpr bool A_KDIV = false, B_KDIV = false;
  static constexpr bool A_K_FIXED = false;
  static constexpr bool OUT_ROWC = true;                // cols: m contiguous
  static constexpr bool kFold = false;
  static constexpr bool kMidTile = false;

  __device__ static Tile<Idx> tile(const KParams& p, int64_t u, int BM, int BN) {
    Tile<Idx> t = OpFA<L, Idx>::tile(p, u, BM, BN);
    t.slot = p.slots;
    return t;
  }
  __device__ static RowSt<Idx> a_row(const KParams& p, const Tile<Idx>& t, Idx m) {
    const bool v = m < t.M;
    Idx b, oy, ox;
    OpFA<L, Idx>::mpos(p, v ? m : Idx(0), b, oy, ox);
    return {b * Idx(p.hs.n) + oy * Idx(p.hs.y) + ox * Idx(p.hs.x), v ? 0 : kBad, 0};
  }
  __device__ static KSt<Idx> a_k(const KParams& p, const Tile<Idx>& t, int64_t, Idx k) {
    const bool v = k < t.K;
    return {(v ? k : Idx(0)) * Idx(p.hs.c), v ? 0 : kBad, 0};
  }
  __device__ static int a_ylim(const KParams&) { return 1; }
  __device__ static int a_xlim(const KParams&) { return 1; }

  __device__ static RowSt<Idx> b_row(const KParams& p, const Tile<Idx>& t, Idx n) {
    const bool v = n < t.N;
    return {(v ? n : Idx(0)) * Idx(p.F), v ? 0 : kBad, 0};  // filter offset n*F + f (see above)
  }
  __device__ static KSt<Idx> b_k(const KParams& p, const Tile<Idx>& t, int64_t, Idx k) {
    const bool v = k < t.K;
    return {(v ? k : Idx(0)) * Idx(p.fs.n), v ? 0 : kBad, 0};
  }
  __device__ static int b_ylim(const KParams&) { return 1; }
  __device__ static int b_xlim(const KParams&) { return 1; }

  __device__ static Idx out_row(const KParams&, const Tile<Idx>&, Idx m) { return m; }
  __device__ static Idx out_col(const KParams& p, const Tile<Idx>&, Idx n) {
    return n * Idx(p.M);
  }
};

// ------------------------------------------------------------------------------------------
// weight_acts: w[f, c, i, j] = sum_{b, oy, ox} img[b, c, oy*sh - pt + i, ox*sw - pl + j] hid[b,f,oy,ox]
// GEMM rows m = (c, tap) (C01B: m = c*T + tap, NHWC: m = tap*C + c), columns n = f, so the
// filter offset is m*F + n in both layouts. K of one segment s: local k = pl * B + b over
// positions pos = s * P + pl (pl < P) and b < B.
// kFused: one unit folds all segments of its tile in registers (tot = ((p0 + p1) + p2) ...);
// otherwise a unit covers one (segment, k-chunk) and writes a slot or, with one of each, the
// output.
template <Layout L, typename Idx, bool kFused = false>
struct OpWA {
  static constexpr bool A_ROWC = (L == Layout::kNHWC);  // images: b (C01B, = k) / c (NHWC, = m)
  static constexpr bool B_ROWC = (L == Layout::kNHWC);  // hidden: b (C01B, = k) / f (NHWC, = n)
  static constexpr bool A_KDIV = true, B_KDIV = true;
  static constexpr bool A_K_FIXED = false;
  static constexpr bool OUT_ROWC = false;               // filters: f (= n) contiguous
  static constexpr bool kFold = kFused;
  static constexpr bool kMidTile = false;

  __device__ static Tile<Idx> tile(const KParams& p, int64_t u, int BM, int BN) {
    Tile<Idx> t{};
    const int64_t nt = u % p.tiles_n, r = u / p.tiles_n;
    const int64_t mt = r % p.tiles_m, r2 = r / p.tiles_m;
    const int64_t q = r2 % p.nsplit, sl = r2 / p.nsplit;
    t.m0 = Idx(mt * BM);
    t.n0 = Idx(nt * BN);
    t.M = Idx(p.M);
    t.N = Idx(p.N);
    t.K = Idx(p.K);
    const int64_t kb = q * p.kchunk, ke = kb + p.kchunk < p.K ? kb + p.kchunk : p.K;
    t.kb = Idx(kb);
    t.ke = Idx(ke);
    if constexpr (kFused) {
      t.s_lo = 0;
      t.s_n = p.nseg;
    } else {
      t.s_lo = p.seg0 + sl;
      t.s_n = 1;
    }
    t.slot = p.slots ? p.slots + (sl * p.nsplit + q) * p.E : nullptr;
    t.skip = false;
    return t;
  }
  __device__ static RowSt<Idx> a_row(const KParams& p, const Tile<Idx>& t, Idx m) {
    const bool v = m < t.M;
    const Idx mm = v ? m : Idx(0);
    Idx c, tap, i, j;
    if constexpr (L == Layout::kC01B) {
      c = divmod<Idx>(mm, p.dT, tap);
    } else {
      tap = divmod<Idx>(mm, p.dC, c);
    }
    i = divmod<Idx>(tap, p.dfw, j);
    const Idx y0 = i - Idx(p.pt), x0 = j - Idx(p.pl);
    return {c * Idx(p.is.c) + y0 * Idx(p.is.y) + x0 * Idx(p.is.x), v ? int(y0) : kBad, int(x0)};
  }
  __device__ static KSt<Idx> a_k(const KParams& p, const Tile<Idx>& t, int64_t s, Idx k) {
    const bool v = k < t.K;
    Idx b, ox;
    const Idx pl = divmod<Idx>(v ? k : Idx(0), p.dB, b);
    const Idx oy = divmod<Idx>(Idx(s * p.P) + pl, p.dWo, ox);
    const Idx ys = oy * Idx(p.sh), xs = ox * Idx(p.sw);
    return {b * Idx(p.is.n) + ys * Idx(p.is.y) + xs * Idx(p.is.x), v ? int(ys) : kBad, int(xs)};
  }
  __device__ static int a_ylim(const KParams& p) { return int(p.H); }
  __device__ static int a_xlim(const KParams& p) { return int(p.W); }

  __device__ static RowSt<Idx> b_row(const KParams& p, const Tile<Idx>& t, Idx n) {
    const bool v = n < t.N;
    return {(v ? n : Idx(0)) * Idx(p.hs.c), v ? 0 : kBad, 0};
  }
  __device__ static KSt<Idx> b_k(const KParams& p, const Tile<Idx>& t, int64_t s, Idx k) {
    const bool v = k < t.K;
    Idx b;
    const Idx pl = divmod<Idx>(v ? k : Idx(0), p.dB, b);
    const Idx pos = Idx(s * p.P) + pl;  // hidden is dense: oy*hs.y + ox*hs.x = pos*hs.x
    return {b * Idx(p.hs.n) + pos * Idx(p.hs.x), v ? 0 : kBad, 0};
  }
  __device__ static int b_ylim(const KParams&) { return 1; }
  __device__ static int b_xlim(const KParams&) { return 1; }

  __device__ static Idx out_row(const KParams& p, const Tile<Idx>&, Idx m) {
    if constexpr (L == Layout::kNHWC) {
      if (p.C_out != p.C) {  // images padded with zero channels: their rows are not stored
        Idx c;
        const Idx tap = divmod<Idx>(m, p.dC, c);
        return c < Idx(p.C_out) ? (tap * Idx(p.C_out) + c) * Idx(p.F) : Idx(-1);
      }
    }
    return m * Idx(p.F);  // filter offset m*F + f (see above)
  }
  __device__ static Idx out_col(const KParams& p, const Tile<Idx>&, Idx n) {
    return n * Idx(p.fs.n);
  }
};

}  // namespace cuda_conv
}  // namespace jax_convnet
