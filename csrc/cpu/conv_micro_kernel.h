// The register-blocked inner product every CPU conv kernel is built on:
//   tile[m][n] (+)= sum_k a[k][m] * b[k][n]     m < mr, n < nr,
// with `a` a packed panel of mr scalars per k (broadcast) and `b` a packed panel of nr values per
// k (nr = a few SIMD vectors). The drivers in conv.cc pack both panels and read the tile back.
//
// The module is compiled without -march, so the same body is instantiated for SSE2 (the x86-64
// baseline), AVX2+FMA and AVX-512 through function target attributes and chosen at run time
// from the CPU's features. Vectors use GCC/Clang vector extensions.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

namespace jax_convnet::cpu {

template <typename T>
using MicroKernelFn = void (*)(int64_t depth, const T* a, const T* b, T* tile, bool accumulate);

template <typename T>
struct MicroKernel {
  int mr = 0, nr = 0;
  MicroKernelFn<T> fn = nullptr;
};

constexpr int kMaxMR = 8;

template <typename T, int kVecBytes, int kMR, int kNV>
[[gnu::always_inline]] inline void micro_kernel_body(int64_t depth, const T* __restrict a,
                                                     const T* __restrict b, T* __restrict tile,
                                                     bool accumulate) {
  typedef T Vec __attribute__((vector_size(kVecBytes)));
  constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(T));
  constexpr int kNR = kNV * kLanes;
  Vec acc[kMR][kNV];
#pragma GCC unroll 8
  for (int m = 0; m < kMR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) {
      if (accumulate)
        std::memcpy(&acc[m][v], tile + m * kNR + v * kLanes, kVecBytes);
      else
        acc[m][v] = Vec{};
    }
  for (int64_t k = 0; k < depth; ++k) {
    Vec bv[kNV];
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) std::memcpy(&bv[v], b + v * kLanes, kVecBytes);
#pragma GCC unroll 8
    for (int m = 0; m < kMR; ++m) {
      const T am = a[m];
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) acc[m][v] += am * bv[v];
    }
    a += kMR;
    b += kNR;
  }
#pragma GCC unroll 8
  for (int m = 0; m < kMR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) std::memcpy(tile + m * kNR + v * kLanes, &acc[m][v], kVecBytes);
}

// Indirect variant for inputs whose channels are contiguous (NHWC): the broadcast side is mr
// pixels, each read in place through a row pointer per filter tap (a zero row for padding), so
// the input is never packed:
//   tile[m][n] = sum_t sum_p rows[t][m][p] * b[t][p][n].
template <typename T>
using IndirectKernelFn = void (*)(int64_t taps, int64_t channels, const T* const* rows,
                                  const T* b, T* tile);

template <typename T>
struct IndirectKernel {
  int mr = 0, nr = 0;
  IndirectKernelFn<T> fn = nullptr;
};

template <typename T, int kVecBytes, int kMR, int kNV>
[[gnu::always_inline]] inline void indirect_kernel_body(int64_t taps, int64_t channels,
                                                        const T* const* __restrict rows,
                                                        const T* __restrict b,
                                                        T* __restrict tile) {
  typedef T Vec __attribute__((vector_size(kVecBytes)));
  constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(T));
  constexpr int kNR = kNV * kLanes;
  Vec acc[kMR][kNV];
#pragma GCC unroll 8
  for (int m = 0; m < kMR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) acc[m][v] = Vec{};
  for (int64_t t = 0; t < taps; ++t, rows += kMR) {
    const T* r[kMR];
#pragma GCC unroll 8
    for (int m = 0; m < kMR; ++m) r[m] = rows[m];
    for (int64_t p = 0; p < channels; ++p) {
      Vec bv[kNV];
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) std::memcpy(&bv[v], b + v * kLanes, kVecBytes);
#pragma GCC unroll 8
      for (int m = 0; m < kMR; ++m) {
        const T am = r[m][p];
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) acc[m][v] += am * bv[v];
      }
      b += kNR;
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < kMR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) std::memcpy(tile + m * kNR + v * kLanes, &acc[m][v], kVecBytes);
}

// Register budgets: mr*nv accumulators plus nv loaded vectors and a broadcast must fit the
// vector registers (16, or 32 with AVX-512); the indirect kernel also keeps its mr row
// pointers in general registers, hence mr <= 8.
constexpr int packed_vectors_per_row(int registers, int mr) {
  if (registers >= 32) return mr <= 6 ? 4 : 3;
  return mr <= 2 ? 4 : mr <= 4 ? 3 : 2;
}
constexpr int indirect_rows(int registers, int nv) {
  if (registers >= 32) return nv <= 3 ? 8 : 6;
  return nv == 1 ? 8 : 6;
}

constexpr int kMaxWidths = 3, kMaxIndirectVectors = 4;

// Everything one ISA offers for element type T: packed kernels for mr = 1..max_mr (nr fixed by
// mr) and indirect kernels for each vector width (16 bytes up to the ISA's) and nv vectors.
template <typename T>
struct KernelSet {
  const char* isa = "";
  int max_mr = 0;
  MicroKernel<T> by_mr[kMaxMR + 1];
  int widths = 0, max_nv = 0;
  int lanes[kMaxWidths] = {};
  IndirectKernel<T> indirect[kMaxWidths][kMaxIndirectVectors + 1];  // [width][nv]
};

#define JCN_DEFINE_ISA(NAME, TARGET, VEC_BYTES, REGISTERS, MAX_MR, MAX_NV)                      \
  struct NAME {                                                                                 \
    static constexpr const char* kName = #NAME;                                                 \
    static constexpr int kVecBytes = VEC_BYTES, kRegisters = REGISTERS, kMaxRows = MAX_MR;      \
    static constexpr int kMaxVectors = MAX_NV;                                                  \
    template <typename T, int kMR, int kNV>                                                     \
    TARGET static void packed(int64_t depth, const T* a, const T* b, T* tile, bool accumulate) { \
      micro_kernel_body<T, VEC_BYTES, kMR, kNV>(depth, a, b, tile, accumulate);                 \
    }                                                                                           \
    template <typename T, int kBytes, int kMR, int kNV>                                         \
    TARGET static void indirect(int64_t taps, int64_t channels, const T* const* rows,           \
                                const T* b, T* tile) {                                          \
      indirect_kernel_body<T, kBytes, kMR, kNV>(taps, channels, rows, b, tile);                 \
    }                                                                                           \
  };

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define JCN_X86_DISPATCH 1
JCN_DEFINE_ISA(sse2, , 16, 16, 6, 2)
JCN_DEFINE_ISA(avx2, __attribute__((target("avx2,fma"))), 32, 16, 6, 2)
JCN_DEFINE_ISA(avx512, __attribute__((target("avx512f,avx2,fma"))), 64, 32, 8, 4)
#else
JCN_DEFINE_ISA(generic, , 16, 16, 6, 2)
#endif
#undef JCN_DEFINE_ISA

template <typename T, typename Isa, int kBytes, int... kNVm1>
void fill_indirect(KernelSet<T>& set, int width, std::integer_sequence<int, kNVm1...>) {
  set.lanes[width] = kBytes / static_cast<int>(sizeof(T));
  ((set.indirect[width][kNVm1 + 1] = IndirectKernel<T>{
        indirect_rows(Isa::kRegisters, kNVm1 + 1), (kNVm1 + 1) * set.lanes[width],
        &Isa::template indirect<T, kBytes, indirect_rows(Isa::kRegisters, kNVm1 + 1),
                                kNVm1 + 1>}),
   ...);
}

template <typename T, typename Isa, int... kMRm1>
KernelSet<T> make_kernel_set(std::integer_sequence<int, kMRm1...>) {
  KernelSet<T> set;
  set.isa = Isa::kName;
  set.max_mr = Isa::kMaxRows;
  constexpr int lanes = Isa::kVecBytes / static_cast<int>(sizeof(T));
  ((set.by_mr[kMRm1 + 1] = MicroKernel<T>{
        kMRm1 + 1, packed_vectors_per_row(Isa::kRegisters, kMRm1 + 1) * lanes,
        &Isa::template packed<T, kMRm1 + 1,
                              packed_vectors_per_row(Isa::kRegisters, kMRm1 + 1)>}),
   ...);
  set.max_nv = Isa::kMaxVectors;
  auto vectors = std::make_integer_sequence<int, Isa::kMaxVectors>{};
  fill_indirect<T, Isa, 16>(set, 0, vectors);
  set.widths = 1;
  if constexpr (Isa::kVecBytes >= 32) fill_indirect<T, Isa, 32>(set, set.widths++, vectors);
  if constexpr (Isa::kVecBytes >= 64) fill_indirect<T, Isa, 64>(set, set.widths++, vectors);
  return set;
}

template <typename T, typename Isa>
KernelSet<T> kernel_set_for() {
  return make_kernel_set<T, Isa>(std::make_integer_sequence<int, Isa::kMaxRows>{});
}

// The best kernel set this CPU runs. JAX_CONVNET_CPU_ISA=sse2|avx2|avx512 caps the choice
// (for testing the portable paths).
template <typename T>
const KernelSet<T>& best_kernel_set() {
  static const KernelSet<T> set = [] {
#ifdef JCN_X86_DISPATCH
    const char* cap = std::getenv("JAX_CONVNET_CPU_ISA");
    std::string limit = cap ? cap : "";
    __builtin_cpu_init();
    bool allow512 = limit.empty() || limit == "avx512";
    bool allow2 = allow512 || limit == "avx2";
    if (allow512 && __builtin_cpu_supports("avx512f")) return kernel_set_for<T, avx512>();
    if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return kernel_set_for<T, avx2>();
    return kernel_set_for<T, sse2>();
#else
    return kernel_set_for<T, generic>();
#endif
  }();
  return set;
}

}  // namespace jax_convnet::cpu
