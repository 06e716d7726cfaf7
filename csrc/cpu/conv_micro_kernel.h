// The register-blocked inner products the CPU conv kernels are built on. Each computes an
// mr x nr tile (nr = nv SIMD vectors)
//   tile[m][n] (+)= sum_k a_k[m] * b_k[n]
// with a_k[m] broadcast and b_k[n] loaded as vectors; they differ in where a_k and b_k live:
//   packed:   a and b are packed panels, a[k*mr + m] and b[k*nr + n];
//   indirect: k = (tap, p); a_k[m] = rows[tap][m][p] through one row pointer per (tap, m) (the
//             input read in place, NHWC filter_acts / image_acts), b is a packed panel;
//   gathered: one pointer per k to each of a_k and b_k (NHWC weight_acts, both in place).
//
// The module is compiled without -march, so the same bodies are instantiated for SSE2 (the
// x86-64 baseline), AVX2+FMA and AVX-512 through function target attributes, and chosen at run
// time from the CPU's features. Vectors use GCC/Clang vector extensions.
#pragma once

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

namespace jax_convnet::cpu {

template <typename T>
using PackedFn = void (*)(int64_t depth, const T* a, const T* b, T* tile, bool accumulate);
template <typename T>
using IndirectFn = void (*)(int64_t taps, int64_t channels, const T* const* rows, const T* b,
                            T* tile);
template <typename T>
using GatheredFn = void (*)(int64_t depth, const T* const* a_rows, const T* const* b_rows,
                            T* tile, bool accumulate);

// One instantiated kernel: its tile shape and entry point.
template <typename Fn>
struct Kernel {
  int mr = 0, nr = 0;
  Fn fn = nullptr;
};

// The accumulators live in registers; the loops over m and v unroll fully.
#define JCN_TILE_LOOP(m, v)                 \
  _Pragma("GCC unroll 16") for (int m = 0; m < kMR; ++m) \
      _Pragma("GCC unroll 4") for (int v = 0; v < kNV; ++v)

template <typename T, int kVecBytes, int kMR, int kNV>
struct Tile {
  typedef T Vec __attribute__((vector_size(kVecBytes)));
  static constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(T));
  static constexpr int kNR = kNV * kLanes;
  Vec acc[kMR][kNV];

  [[gnu::always_inline]] void load(const T* tile, bool accumulate) {
    JCN_TILE_LOOP(m, v) {
      if (accumulate)
        std::memcpy(&acc[m][v], tile + m * kNR + v * kLanes, kVecBytes);
      else
        acc[m][v] = Vec{};
    }
  }
  // acc[m][:] += a[m] * b[:]
  [[gnu::always_inline]] void multiply_add(const T* a, const T* b) {
    Vec bv[kNV];
    _Pragma("GCC unroll 4") for (int v = 0; v < kNV; ++v)
        std::memcpy(&bv[v], b + v * kLanes, kVecBytes);
    JCN_TILE_LOOP(m, v) acc[m][v] += a[m] * bv[v];
  }
  [[gnu::always_inline]] void store(T* tile) const {
    JCN_TILE_LOOP(m, v) std::memcpy(tile + m * kNR + v * kLanes, &acc[m][v], kVecBytes);
  }
};
#undef JCN_TILE_LOOP

template <typename T, int kVecBytes, int kMR, int kNV>
[[gnu::always_inline]] inline void packed_body(int64_t depth, const T* __restrict a,
                                               const T* __restrict b, T* __restrict tile,
                                               bool accumulate) {
  Tile<T, kVecBytes, kMR, kNV> t;
  t.load(tile, accumulate);
  for (int64_t k = 0; k < depth; ++k, a += kMR, b += t.kNR) t.multiply_add(a, b);
  t.store(tile);
}

template <typename T, int kVecBytes, int kMR, int kNV>
[[gnu::always_inline]] inline void indirect_body(int64_t taps, int64_t channels,
                                                 const T* const* __restrict rows,
                                                 const T* __restrict b, T* __restrict tile) {
  Tile<T, kVecBytes, kMR, kNV> t;
  t.load(tile, false);
  for (int64_t tap = 0; tap < taps; ++tap, rows += kMR) {
    const T* r[kMR];
    _Pragma("GCC unroll 16") for (int m = 0; m < kMR; ++m) r[m] = rows[m];
    for (int64_t p = 0; p < channels; ++p, b += t.kNR) {
      T a[kMR];
      _Pragma("GCC unroll 16") for (int m = 0; m < kMR; ++m) a[m] = r[m][p];
      t.multiply_add(a, b);
    }
  }
  t.store(tile);
}

template <typename T, int kVecBytes, int kMR, int kNV>
[[gnu::always_inline]] inline void gathered_body(int64_t depth, const T* const* __restrict a_rows,
                                                 const T* const* __restrict b_rows,
                                                 T* __restrict tile, bool accumulate) {
  Tile<T, kVecBytes, kMR, kNV> t;
  t.load(tile, accumulate);
  for (int64_t k = 0; k < depth; ++k) t.multiply_add(a_rows[k], b_rows[k]);
  t.store(tile);
}

// Register budgets: mr*nv accumulators, nv loaded vectors and a broadcast must fit the vector
// registers (16, or 32 with AVX-512). The indirect kernel also holds its mr row pointers in
// general registers, hence mr <= 8 there.
constexpr int packed_vectors(int registers, int mr) {
  if (registers >= 32) return mr <= 6 ? 4 : 3;
  return mr <= 2 ? 4 : mr <= 4 ? 3 : 2;
}
constexpr int indirect_rows(int registers, int nv) {
  if (registers >= 32) return nv <= 3 ? 8 : 6;
  return nv == 1 ? 8 : 6;
}
constexpr int gathered_rows(int registers, int nv) {
  if (registers >= 32) return nv <= 2 ? 12 : nv == 3 ? 8 : 6;
  return nv == 1 ? 12 : 6;
}

constexpr int kMaxPackedRows = 8, kMaxWidths = 3, kMaxVectors = 4;

// Everything one ISA offers for element type T: packed kernels for mr = 1..max_mr (nr follows
// from mr), indirect and gathered kernels for each vector width (16 bytes up to the ISA's) and
// nv = 1..max_nv vectors (mr follows from nv).
template <typename T>
struct KernelSet {
  const char* isa = "";
  int max_mr = 0, widths = 0, max_nv = 0;
  int lanes[kMaxWidths] = {};
  Kernel<PackedFn<T>> packed[kMaxPackedRows + 1];
  Kernel<IndirectFn<T>> indirect[kMaxWidths][kMaxVectors + 1];
  Kernel<GatheredFn<T>> gathered[kMaxWidths][kMaxVectors + 1];
};

#define JCN_DEFINE_ISA(NAME, TARGET, VEC_BYTES, REGISTERS, MAX_MR, MAX_NV)                      \
  struct NAME {                                                                                 \
    static constexpr const char* kName = #NAME;                                                 \
    static constexpr int kVecBytes = VEC_BYTES, kRegisters = REGISTERS;                         \
    static constexpr int kMaxRows = MAX_MR, kMaxVectors = MAX_NV;                               \
    template <typename T, int kMR, int kNV>                                                     \
    TARGET static void packed(int64_t depth, const T* a, const T* b, T* tile, bool accumulate) { \
      packed_body<T, VEC_BYTES, kMR, kNV>(depth, a, b, tile, accumulate);                       \
    }                                                                                           \
    template <typename T, int kBytes, int kMR, int kNV>                                         \
    TARGET static void indirect(int64_t taps, int64_t channels, const T* const* rows,           \
                                const T* b, T* tile) {                                          \
      indirect_body<T, kBytes, kMR, kNV>(taps, channels, rows, b, tile);                        \
    }                                                                                           \
    template <typename T, int kBytes, int kMR, int kNV>                                         \
    TARGET static void gathered(int64_t depth, const T* const* a_rows, const T* const* b_rows,  \
                                T* tile, bool accumulate) {                                     \
      gathered_body<T, kBytes, kMR, kNV>(depth, a_rows, b_rows, tile, accumulate);              \
    }                                                                                           \
  };

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define JCN_X86_DISPATCH 1
JCN_DEFINE_ISA(sse2, , 16, 16, 6, 2)
JCN_DEFINE_ISA(avx2, __attribute__((target("avx2,fma"))), 32, 16, 6, 2)
// AVX-512F alone lacks FMA on 128/256-bit vectors, which the narrow widths use.
JCN_DEFINE_ISA(avx512, __attribute__((target("avx512f,avx2,fma"))), 64, 32, 8, 4)
#else
JCN_DEFINE_ISA(generic, , 16, 16, 6, 2)
#endif
#undef JCN_DEFINE_ISA

template <typename T, typename Isa, int kBytes, int... kNVm1>
void add_width(KernelSet<T>& set, std::integer_sequence<int, kNVm1...>) {
  const int w = set.widths++;
  const int lanes = set.lanes[w] = kBytes / static_cast<int>(sizeof(T));
  constexpr int r = Isa::kRegisters;
  ((set.indirect[w][kNVm1 + 1] = {indirect_rows(r, kNVm1 + 1), (kNVm1 + 1) * lanes,
                                  &Isa::template indirect<T, kBytes, indirect_rows(r, kNVm1 + 1),
                                                          kNVm1 + 1>}),
   ...);
  ((set.gathered[w][kNVm1 + 1] = {gathered_rows(r, kNVm1 + 1), (kNVm1 + 1) * lanes,
                                  &Isa::template gathered<T, kBytes, gathered_rows(r, kNVm1 + 1),
                                                          kNVm1 + 1>}),
   ...);
}

template <typename T, typename Isa, int... kMRm1>
KernelSet<T> make_kernel_set(std::integer_sequence<int, kMRm1...>) {
  KernelSet<T> set;
  set.isa = Isa::kName;
  set.max_mr = Isa::kMaxRows;
  set.max_nv = Isa::kMaxVectors;
  constexpr int lanes = Isa::kVecBytes / static_cast<int>(sizeof(T)), r = Isa::kRegisters;
  ((set.packed[kMRm1 + 1] = {kMRm1 + 1, packed_vectors(r, kMRm1 + 1) * lanes,
                             &Isa::template packed<T, kMRm1 + 1, packed_vectors(r, kMRm1 + 1)>}),
   ...);
  constexpr auto vectors = std::make_integer_sequence<int, Isa::kMaxVectors>{};
  add_width<T, Isa, 16>(set, vectors);
  if constexpr (Isa::kVecBytes >= 32) add_width<T, Isa, 32>(set, vectors);
  if constexpr (Isa::kVecBytes >= 64) add_width<T, Isa, 64>(set, vectors);
  return set;
}

// JAX_CONVNET_CPU_ISA=sse2|avx2|avx512 (any case; unset or empty: no cap) caps the instruction
// set of the kernels (for testing the portable paths). Read once, as the kernel sets are chosen.
struct IsaCap {
  std::string limit;  // "", "sse2", "avx2" or "avx512"
  std::string error;  // non-empty for an unrecognised value: the handlers return it
};

inline const IsaCap& isa_cap() {
  static const IsaCap cap = [] {
    const char* env = std::getenv("JAX_CONVNET_CPU_ISA");
    std::string value = env ? env : "";
    for (char& ch : value) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (value.empty() || value == "sse2" || value == "avx2" || value == "avx512")
      return IsaCap{value, ""};
    return IsaCap{"", "JAX_CONVNET_CPU_ISA='" + std::string(env) +
                          "' is not one of sse2, avx2, avx512 (case-insensitive) or empty"};
  }();
  return cap;
}

// The best kernel set this CPU runs, within isa_cap().
template <typename T>
const KernelSet<T>& best_kernel_set() {
  static const KernelSet<T> set = [] {
#ifdef JCN_X86_DISPATCH
    const std::string& limit = isa_cap().limit;
    __builtin_cpu_init();
    const bool allow512 = limit.empty() || limit == "avx512";
    const bool allow2 = allow512 || limit == "avx2";
    if (allow512 && __builtin_cpu_supports("avx512f"))
      return make_kernel_set<T, avx512>(std::make_integer_sequence<int, avx512::kMaxRows>{});
    if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return make_kernel_set<T, avx2>(std::make_integer_sequence<int, avx2::kMaxRows>{});
    return make_kernel_set<T, sse2>(std::make_integer_sequence<int, sse2::kMaxRows>{});
#else
    return make_kernel_set<T, generic>(std::make_integer_sequence<int, generic::kMaxRows>{});
#endif
  }();
  return set;
}

// The packed kernel whose mr fits `rows` (its broadcast side) with the least padding; ties go
// to the taller kernel, which does more multiply-adds per loaded vector.
template <typename T>
const Kernel<PackedFn<T>>& packed_kernel_for_rows(const KernelSet<T>& set, int64_t rows) {
  if (rows <= set.max_mr) return set.packed[rows];
  int best = set.max_mr;
  auto padded = [&](int mr) { return (rows + mr - 1) / mr * mr; };
  for (int mr = set.max_mr - 1; mr > set.max_mr / 2; --mr)
    if (padded(mr) < padded(best)) best = mr;
  return set.packed[best];
}

// The (width, nv) of an indirect / gathered table for `cols` vector-side columns: the widest
// vector the columns fill, and as few column blocks of up to max_nv vectors as possible.
template <typename T, typename K>
const K& kernel_for_columns(const KernelSet<T>& set, const K (&table)[kMaxWidths][kMaxVectors + 1],
                            int64_t cols, int max_nv) {
  int w = 0;
  while (w + 1 < set.widths && set.lanes[w + 1] <= cols) ++w;
  const int64_t lanes = set.lanes[w];
  max_nv = std::min(max_nv, set.max_nv);
  const int64_t blocks = (cols + lanes * max_nv - 1) / (lanes * max_nv);
  return table[w][(cols + blocks * lanes - 1) / (blocks * lanes)];
}

}  // namespace jax_convnet::cpu
