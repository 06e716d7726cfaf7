// The host side of the CUDA conv family: filter_acts (FA), image_acts (IA), weight_acts (WA).
// Included by one translation unit per op (conv_filter_acts.cu, conv_image_acts.cu,
// conv_weight_acts.cu), each instantiating ConvImpl for its op only, so the kernels of the three
// ops compile in parallel.
//
// Stride-1 convolutions with large filters, where the call's workspace holds the spectra
// (fft_conv_plan; csrc/common/conv_workspace.h sizes every workspace): 2-d FFTs, a complex GEMM per frequency bin, inverse FFTs
// (conv_fft.cuh, run_fft). Otherwise each op is an implicit GEMM (conv_ops.cuh) run by one tiled
// kernel (conv_kernel.cuh):
//   FA  M = B*Ho*Wo, N = F, K = C*fh*fw
//   IA  per residue class (y mod sh, x mod sw): M = B*Hq*Wq, N = C, K = F*nI*nJ (useful taps only)
//   WA  M = C*fh*fw, N = F, K = B*partial_sum per segment; segments folded in order.
// image_acts into at most 4 channels (RGB) with large filters, where the call has a column
// workspace: a GEMM into float32 columns and a gather, per chunk of images
// (conv_image_acts_columns.cuh); otherwise with up to 12 rows of taps per residue class, in
// float32 or where kMma* cannot run: a direct FFMA kernel (conv_image_acts_direct.cuh). Other
// paths, when M >= 16:
//   kMma*  both operands readable 16 bytes at a time (contiguous dimensions a multiple of 16 bytes,
//          aligned pointers; narrower copies of NHWC images, kANarrowCopy: float32 of any channel
//          count 4 bytes at a time, 16-bit ones of weight_acts 8):
//          mma.sync with a cp.async pipeline (conv_mma.cuh); bf16 / f16,
//          float32 as TF32 (precision Default) or 3xTF32 (High / Highest: float32 accuracy);
//          a 128 x 32 tile up to 32 columns (kMmaThin: image_acts into RGB), else the widest of
//          128 x 128 (kMmaWide), 128 x 96 (kMmaMid: filter_acts in 16-bit types) and 128 x 64
//          (kMmaNarrow) that wastes the fewest columns and fits the device's shared memory per
//          block; filter_acts of C01B images in 16-bit types reads where each k lies from a table
//          in shared memory (conv_mma_kernel's kKTable).
//   kWgmma where kMma* can run, for filter_acts in 16-bit types or float32 at precision Default
//          (TF32) into a multiple of 192 filters on compute capability 9.0 in sm_90a builds
//          (JAX_CONVNET_WGMMA): Hopper's wgmma, 128 x 192 tiles (conv_wgmma.cuh); with the k
//          table for C01B images in both types.
//   kWmma  otherwise, when N >= 16: bf16 / f16 / TF32: nvcuda::wmma, register-staged
//          (conv_kernel.cuh).
// Else FFMA with a 128x64 tile (or 512x4 for N <= 8). Accumulation is float32 everywhere.
// Before all of these, the route of csrc/common/conv_plan.h (plan_conv, which the lowering's
// jax_convnet.explain also asks): on Hopper in sm_90a builds the TMA-fed wgmma core
// (conv_tma.cuh; run_tma, run_tma_weights and the TF32 copy routes) or the FFT path, in its order.
// Operands are read in place in either layout, except NHWC images of fewer than 4 channels in
// weight_acts: copied once with zero channels up to 4 (conv_weight_acts_padding.cuh).
//
// CUDA-graph safe: no synchronisation, no allocation (weight_acts and image_acts get their
// temporary memory as an extra workspace result), no host reads of device data; the launch plan
// depends only on shapes, attributes, the workspace size and the device's SM count and shared
// memory per block, so results are bitwise reproducible (no atomics).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>

#include "conv_common.cuh"
#include "conv_fft.cuh"
#include "conv_image_acts_columns.cuh"
#include "conv_image_acts_direct.cuh"
#include "conv_kernel.cuh"
#include "conv_mma.cuh"
#include "conv_ops.cuh"
#include "conv_tma.cuh"
#include "conv_weight_acts_padding.cuh"
#include "conv_wgmma.cuh"
#include "conv_plan.h"
#include "conv_workspace.h"
#include "ffi_common.h"
#include "targets.h"

namespace ffi = xla::ffi;

namespace {

namespace jcn = jax_convnet;
using namespace jax_convnet::cuda_conv;
using jcn::Layout;

enum class OpKind { kFA, kIA, kWA };
enum class Path { kWide, kNarrow, kWmma, kMmaWide, kMmaMid, kMmaNarrow, kMmaThin, kWgmma };

constexpr int64_t kIdx32Limit = int64_t(1) << 30;  // everything below this uses 32-bit indices
// Temporary memory of image_acts and weight_acts, an extra result of their custom calls (graph
// capture cannot allocate), sized by csrc/common/conv_workspace.h: image_acts' column buffer
// (run_ia_columns); weight_acts' partial-sum slots of one launch plus a float32 running sum of
// the filters across launch groups (the plan in run()), then possibly a padded copy of its
// images (run_wa_padding, wa_partial_sum_bytes).
struct Workspace {
  void* data;
  int64_t bytes;
};

const char* op_name(OpKind k) {
  return k == OpKind::kFA ? "filter_acts" : k == OpKind::kIA ? "image_acts" : "weight_acts";
}

ffi::Error cuda_error(OpKind k, const char* what, cudaError_t e) {
  return ffi::Error::Internal(std::string("jax_convnet ") + op_name(k) + " (CUDA): " + what +
                              ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

using jcn::ceil_div;
using jcn::round_up;

template <class Op, class Cfg, typename T, typename Idx, int kVecMask>
cudaError_t launch_gemm(const KParams& p, cudaStream_t stream) {
  if (p.units < 1) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(p.units, int64_t(0x7fffffff));
  conv_gemm_kernel<Op, Cfg, T, Idx, kVecMask><<<dim3(unsigned(blocks)), Cfg::NT, 0, stream>>>(p);
  return cudaGetLastError();
}

// Kernels that take more than 48 KiB of dynamic shared memory opt in, once per device (the
// attribute is per function and device), to `bytes`: always the same for one kKernel.
template <auto kKernel>
cudaError_t opt_in_shared_memory(int bytes) {
  static std::atomic<uint64_t> opted_in{0};  // bit d: device d (devices >= 64 ask every time)
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev < 64 ? uint64_t(1) << dev : 0;
  if (!(opted_in.load() & bit)) {
    err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return err;
    opted_in.fetch_or(bit);
  }
  return cudaSuccess;
}

// The largest k table of the mma kernel (kKTable; k_table_bytes decides where it is used).
constexpr int kKTableMaxBytes = 32 * 1024;
// The 128 x 96 tile and the k table are for 16-bit types: they made AlexNet conv2 C01B faster in
// bf16 and slower in float32 (TF32) (benchmarks/history/2026-11-29_session6_alex2_bf16_c01b.md).
template <typename T>
constexpr bool kMidTileAndKTable = sizeof(T) == 2;

// A kernel of the cp.async pipelines (mma, wgmma): kPlanBytes of dynamic shared memory plus, with
// kKTable, the k table the host planned (p.k_table_bytes); one block per unit up to the grid's
// limit (the kernels loop over units). Opted in once for the largest table that fits beside the
// plan (run() checks the table it plans against the device).
template <auto kKernel, int kThreads, int kPlanBytes, bool kKTable>
cudaError_t launch_pipelined(const KParams& p, cudaStream_t stream) {
  if (p.units < 1) return cudaSuccess;
  cudaError_t err = opt_in_shared_memory<kKernel>(
      std::min(kPlanBytes + (kKTable ? kKTableMaxBytes : 0), 227 * 1024));
  if (err != cudaSuccess) return err;
  const int bytes = kPlanBytes + (kKTable ? int(p.k_table_bytes) : 0);
  const int64_t blocks = std::min<int64_t>(p.units, int64_t(0x7fffffff));
  kKernel<<<dim3(unsigned(blocks)), kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

template <class Op, class Cfg, typename T, bool kSplit, int kAVec, bool kKTable = false>
cudaError_t launch_mma(const KParams& p, cudaStream_t stream) {
  constexpr int plan_bytes = MmaPlanOf<Op, Cfg, T, int32_t>::TOTAL;
  static_assert(!kKTable || plan_bytes + kKTableMaxBytes <= 227 * 1024, "shared memory per block");
  return launch_pipelined<conv_mma_kernel<Op, Cfg, T, int32_t, kSplit, kAVec, kKTable>, Cfg::NT,
                          plan_bytes, kKTable>(p, stream);
}
// One mma.sync per tile pair (TF32 or 16-bit), with the k table where the host planned one.
template <class Op, class Cfg, typename T, int kAVec>
cudaError_t launch_mma_single(const KParams& p, cudaStream_t stream) {
  if constexpr (Op::A_K_FIXED && Op::A_ROWC && kMidTileAndKTable<T>) {
    if (p.k_table_bytes > 0) return launch_mma<Op, Cfg, T, false, kAVec, true>(p, stream);
  }
  return launch_mma<Op, Cfg, T, false, kAVec>(p, stream);
}

// The wgmma kernels (Hopper, sm_90a builds): filter_acts in 16-bit types or float32 at default
// precision (TF32) into multiples of their tile's 192 columns.
#ifdef JAX_CONVNET_WGMMA
constexpr bool kBuiltWgmma = true;
#else
constexpr bool kBuiltWgmma = false;
#endif
constexpr int kWgmmaColumns = 192;
template <typename T>
using WgmmaFA = WgmmaCfg<T, kWgmmaColumns>;
template <class Op, typename T>
int wgmma_plan_bytes() {
  return WgmmaPlan<Op, WgmmaFA<T>, T, int32_t>::TOTAL;
}
template <class Op, typename T, bool kKTable>
cudaError_t launch_wgmma_k(const KParams& p, cudaStream_t stream) {
  using Cfg = WgmmaFA<T>;
  static_assert(Cfg::BN == kWgmmaColumns && Cfg::BK == MmaWide<T>::BK, "run()'s tile sizes");
  constexpr int kBytes = WgmmaPlan<Op, Cfg, T, int32_t>::TOTAL;
  if constexpr (std::is_same_v<T, float>) {
    return launch_pipelined<conv_wgmma_tf32_kernel<Op, Cfg, int32_t, kKTable>, Cfg::NT, kBytes,
                            kKTable>(p, stream);
  } else {
    return launch_pipelined<conv_wgmma_kernel<Op, Cfg, T, int32_t, kKTable>, Cfg::NT, kBytes,
                            kKTable>(p, stream);
  }
}
template <class Op, typename T>
cudaError_t launch_wgmma(const KParams& p, cudaStream_t stream) {
  if constexpr (Op::A_K_FIXED && Op::A_ROWC) {
    if (p.k_table_bytes > 0) return launch_wgmma_k<Op, T, true>(p, stream);
  }
  return launch_wgmma_k<Op, T, false>(p, stream);
}

// The mma tile for N columns: 32 wide up to 32 columns, else the widest of 128, 96 and 64 that
// wastes the fewest columns (128 / 96 only where the device's shared memory fits them, 96 where
// the caller allows it: filter_acts in 16-bit types).
inline Path mma_path(int64_t N, bool wide_fits, bool mid_ok) {
  if (N <= 32) return Path::kMmaThin;
  auto waste = [N](int64_t width) { return ceil_div(N, width) * width - N; };
  const int64_t least =
      std::min({wide_fits ? waste(128) : N, mid_ok ? waste(96) : N, waste(64)});
  if (wide_fits && waste(128) == least) return Path::kMmaWide;
  if (mid_ok && waste(96) == least) return Path::kMmaMid;
  return Path::kMmaNarrow;
}
bool is_mma(Path path) {
  return path == Path::kMmaWide || path == Path::kMmaMid || path == Path::kMmaNarrow ||
         path == Path::kMmaThin;
}
// Shared memory of the mma kernel's plan for a path.
template <class Op, typename T>
int mma_plan_bytes(Path path) {
  return path == Path::kMmaWide  ? MmaPlanOf<Op, MmaWide<T>, T, int32_t>::TOTAL
         : path == Path::kMmaMid ? MmaPlanOf<Op, MmaMid<T>, T, int32_t>::TOTAL
         : path == Path::kMmaThin ? MmaPlanOf<Op, MmaThin<T>, T, int32_t>::TOTAL
                                  : MmaPlanOf<Op, MmaNarrow<T>, T, int32_t>::TOTAL;
}
template <typename T>
int mma_tile_columns(Path path) {
  return path == Path::kMmaWide  ? MmaWide<T>::BN
         : path == Path::kMmaMid ? MmaMid<T>::BN
         : path == Path::kMmaThin ? MmaThin<T>::BN
                                  : MmaNarrow<T>::BN;
}

template <class Op, class Cfg, typename T, int kAVec>
cudaError_t launch_mma_split(const KParams& p, bool split, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    if (split) return launch_mma<Op, Cfg, T, true, kAVec>(p, stream);
  }
  return launch_mma_single<Op, Cfg, T, kAVec>(p, stream);
}

template <class Op, typename T, int kAVec = 16 / int(sizeof(T))>
cudaError_t launch_mma_for(const KParams& p, Path path, bool split, cudaStream_t stream) {
  if (path == Path::kMmaThin) return launch_mma_split<Op, MmaThin<T>, T, kAVec>(p, split, stream);
  if constexpr (kAVec * int(sizeof(T)) >= 8) {  // (single-float copies: never these two)
    if (path == Path::kMmaWide)
      return launch_mma_split<Op, MmaWide<T>, T, kAVec>(p, split, stream);
    // 128 x 96: mma_path and run() choose it for filter_acts in 16-bit types only.
    if constexpr (Op::kMidTile && kMidTileAndKTable<T>) {
      if (path == Path::kMmaMid) return launch_mma_single<Op, MmaMid<T>, T, kAVec>(p, stream);
    }
  }
  return launch_mma_split<Op, MmaNarrow<T>, T, kAVec>(p, split, stream);
}

// Elements per copy of operand A where its rows cannot be read 16 bytes at a time (0: no such
// instance of the mma kernel): float32 NHWC images (filter_acts and weight_acts) one float at a
// time (RGB); 16-bit NHWC images of weight_acts 4 channels (8 bytes) at a time (images of fewer
// channels are padded to 4: run_wa_padding).
template <OpKind K, Layout L, typename T>
constexpr int kANarrowCopy = L != Layout::kNHWC || K == OpKind::kIA ? 0
                             : std::is_same_v<T, float>            ? 1
                             : K == OpKind::kWA                    ? 4
                                                                   : 0;

template <class Op, class Cfg, typename T>
cudaError_t launch_masked(const KParams& p, int mask, cudaStream_t stream) {
  switch (mask) {
    case 3:
      return launch_gemm<Op, Cfg, T, int32_t, 3>(p, stream);
    case 2:
      return launch_gemm<Op, Cfg, T, int32_t, 2>(p, stream);
    case 1:
      return launch_gemm<Op, Cfg, T, int32_t, 1>(p, stream);
    default:
      return launch_gemm<Op, Cfg, T, int32_t, 0>(p, stream);
  }
}

template <OpKind K>
struct OpOf;
template <>
struct OpOf<OpKind::kFA> {
  template <Layout L, typename Idx>
  using type = OpFA<L, Idx>;
};
template <>
struct OpOf<OpKind::kIA> {
  template <Layout L, typename Idx>
  using type = OpIA<L, Idx>;
};
template <>
struct OpOf<OpKind::kWA> {
  template <Layout L, typename Idx>
  using type = OpWA<L, Idx>;
};

template <typename T>
using WmmaCfgOf = std::conditional_t<std::is_same_v<T, float>, CfgWmmaTf32, CfgWmma16>;

// Vector widths (elements) of the A and B loaders of a path, as the kernel computes them.
template <OpKind K, Layout L, typename T, class Cfg>
void vec_widths(int* va, int* vb) {
  using Op = typename OpOf<K>::template type<L, int32_t>;
  constexpr int maxv = 16 / int(sizeof(T));
  *va = loader_vec(Cfg::BM, Cfg::BK, Cfg::NT, maxv, Op::A_ROWC);
  *vb = loader_vec(Cfg::BN, Cfg::BK, Cfg::NT, maxv, Op::B_ROWC);
}

template <OpKind K, Layout L, typename T>
void vec_widths_path(Path path, int* va, int* vb) {
  if (path == Path::kWmma) {
    vec_widths<K, L, T, WmmaCfgOf<T>>(va, vb);
  } else if (path == Path::kNarrow) {
    vec_widths<K, L, T, CfgNarrow>(va, vb);
  } else {
    vec_widths<K, L, T, CfgWide>(va, vb);
  }
}

// mask: bit 0 / 1 = vector loads for operand A / B.
// a_narrow: the mma kernel reads operand A kANarrowCopy elements at a time.
template <OpKind K, Layout L, typename T>
cudaError_t launch_path(const KParams& p, Path path, bool idx64, int mask, bool split,
                        bool a_narrow, cudaStream_t stream) {
  if constexpr (K == OpKind::kFA) {
    if (path == Path::kWgmma)
      return launch_wgmma<typename OpOf<K>::template type<L, int32_t>, T>(p, stream);
  }
  if (is_mma(path)) {
    using Op = typename OpOf<K>::template type<L, int32_t>;
    constexpr int kNarrow = kANarrowCopy<K, L, T>;
    if constexpr (kNarrow > 0) {
      if (a_narrow) {
        if constexpr (K == OpKind::kWA) {
          if (p.fused)
            return launch_mma_for<OpWA<L, int32_t, true>, T, kNarrow>(p, path, split, stream);
        }
        return launch_mma_for<Op, T, kNarrow>(p, path, split, stream);
      }
    }
    if constexpr (K == OpKind::kWA) {
      if (p.fused) return launch_mma_for<OpWA<L, int32_t, true>, T>(p, path, split, stream);
    }
    return launch_mma_for<Op, T>(p, path, split, stream);
  }
  if constexpr (K == OpKind::kWA) {
    if (p.fused) {  // weight_acts folding all segments per tile: mask 3 or scalar
      if (idx64) return launch_gemm<OpWA<L, int64_t, true>, CfgWide, T, int64_t, 0>(p, stream);
      using Op = OpWA<L, int32_t, true>;
      if (path == Path::kWmma)
        return mask == 3 ? launch_gemm<Op, WmmaCfgOf<T>, T, int32_t, 3>(p, stream)
                         : launch_gemm<Op, WmmaCfgOf<T>, T, int32_t, 0>(p, stream);
      return mask == 3 ? launch_gemm<Op, CfgWide, T, int32_t, 3>(p, stream)
                       : launch_gemm<Op, CfgWide, T, int32_t, 0>(p, stream);
    }
  }
  if (idx64) {  // huge problems: FFMA, scalar loads, 64-bit indices
    return launch_gemm<typename OpOf<K>::template type<L, int64_t>, CfgWide, T, int64_t, 0>(
        p, stream);
  }
  using Op = typename OpOf<K>::template type<L, int32_t>;
  if (path == Path::kWmma) return launch_masked<Op, WmmaCfgOf<T>, T>(p, mask, stream);
  if constexpr (K != OpKind::kWA) {
    if (path == Path::kNarrow && mask == 3)  // (narrow is only chosen with vector loads)
      return launch_gemm<Op, CfgNarrow, T, int32_t, 3>(p, stream);
  }
  return launch_masked<Op, CfgWide, T>(p, mask, stream);
}

// image_acts into C <= kDirectMaxChannels channels (conv_image_acts_direct.cuh); the window
// length KMAX is the smallest instantiated one >= the classes' rows of taps.
constexpr int kDirectMaxTapRows = 12;
template <Layout L, typename T, int C>
cudaError_t launch_ia_direct_c(const KParams& p, int nsm, cudaStream_t stream) {
  constexpr unsigned kThreads = 32 * kDirectWarps;
  const int kmax = p.nImax <= 4 ? 4 : kDirectMaxTapRows;
  const DirectIAPlan d = direct_ia_plan(p, L == Layout::kC01B, direct_rows(kmax));
  if (d.units < 1) return cudaSuccess;
  const unsigned blocks =
      unsigned(std::min<int64_t>(ceil_div(d.units, kDirectWarps), int64_t(nsm) * 64));
  if (kmax == 4)
    conv_ia_direct_kernel<T, L, C, 4><<<blocks, kThreads, 0, stream>>>(p, d);
  else
    conv_ia_direct_kernel<T, L, C, kDirectMaxTapRows><<<blocks, kThreads, 0, stream>>>(p, d);
  return cudaGetLastError();
}
// launch(std::integral_constant<int, C>) for C = channels in 1..4: the kernels of image_acts into
// a few channels (direct and column gather) are instantiated per channel count.
template <class Launch>
cudaError_t with_channel_count(int64_t channels, Launch&& launch) {
  static_assert(kDirectMaxChannels == 4 && kColumnMaxChannels == 4, "one case per count");
  switch (channels) {
    case 1:
      return launch(std::integral_constant<int, 1>{});
    case 2:
      return launch(std::integral_constant<int, 2>{});
    case 3:
      return launch(std::integral_constant<int, 3>{});
    default:
      return launch(std::integral_constant<int, 4>{});
  }
}

template <Layout L, typename T>
cudaError_t launch_ia_direct(const KParams& p, int nsm, cudaStream_t stream) {
  return with_channel_count(
      p.C, [&](auto c) { return launch_ia_direct_c<L, T, decltype(c)::value>(p, nsm, stream); });
}

template <typename T>
cudaError_t launch_reduce(const float* slots, int64_t nseg, int64_t nsplit, int64_t E, float* acc,
                          void* out, bool first, bool last, int nsm, cudaStream_t stream) {
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(E, 256), int64_t(nsm) * 16));
  wa_reduce_kernel<T><<<dim3(unsigned(blocks)), 256, 0, stream>>>(
      slots, nseg, nsplit, E, acc, static_cast<T*>(out), first ? 1 : 0, last ? 1 : 0);
  return cudaGetLastError();
}

bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % uintptr_t(bytes) == 0;
}

double absd(int64_t v) { return v < 0 ? -double(v) : double(v); }
double extent(const Str4& s, double n, double c, double ylen, double xlen) {
  return n * absd(s.n) + c * absd(s.c) + ylen * absd(s.y) + xlen * absd(s.x);
}

template <typename T, Layout L>
cudaError_t launch_col2im(const KParams& q, int nsm, cudaStream_t stream) {
  const unsigned blocks =
      unsigned(std::min<int64_t>(ceil_div(q.B * q.H * q.W, 256), int64_t(nsm) * 32));
  return with_channel_count(q.C, [&](auto c) {
    conv_ia_col2im_kernel<T, L, decltype(c)::value><<<blocks, 256, 0, stream>>>(q);
    return cudaGetLastError();
  });
}

// image_acts through a column buffer (conv_image_acts_columns.cuh), one chunk of images at a
// time: when the workspace holds at least one chunk (conv_workspace.h gives one only where this
// path pays: few channels, large filters) and the tensor cores can read both operands in place.
// OpIACols reads the hidden tensor and the filters along the same contiguous dimensions as OpIA,
// with the same shared-memory plans: run()'s mma_ok / mma_wide_fits hold for it too.
// nullopt: not applicable here (the caller picks another kernel).
template <Layout L, typename T>
std::optional<cudaError_t> run_ia_columns(KParams p, Workspace ws, bool split, bool mma_ok,
                                          bool mma_wide_fits, int nsm, cudaStream_t stream) {
  using Op = OpIACols<L, int32_t>;
  static_assert(Op::A_ROWC == OpIA<L, int32_t>::A_ROWC && Op::B_ROWC == OpIA<L, int32_t>::B_ROWC,
                "the mma plans of OpIACols and OpIA are the same");
  constexpr int kVec = MmaWide<T>::VEC;
  constexpr bool c01b = L == Layout::kC01B;
  const int64_t N = p.C * p.fh * p.fw, positions = p.Ho * p.Wo;
  const int64_t image_bytes = 4 * N * positions;  // one image's columns, float32
  int64_t nb_max = ws.bytes / image_bytes;
  if (c01b) nb_max -= nb_max % kVec;  // C01B: vectors along m are runs of images
  // N > 32: the 64- and 128-wide tiles only (conv_workspace.h gives columns for N >= 64).
  if (nb_max < 1 || !mma_ok || p.C > kColumnMaxChannels || N <= 32 ||
      ws.bytes / 4 >= kIdx32Limit)
    return std::nullopt;
  int64_t nb = ceil_div(p.B, ceil_div(p.B, nb_max));  // the fewest chunks, balanced
  if (c01b) nb = std::min(nb_max, ceil_div(nb, kVec) * kVec);
  const Path path = mma_path(N, mma_wide_fits, false);  // (128 x 96: filter_acts only)
  const int BN = mma_tile_columns<T>(path);
  p.slots = static_cast<float*>(ws.data);
  p.N = N;
  p.K = p.F;
  p.tiles_n = ceil_div(N, BN);
  for (int64_t b0 = 0; b0 < p.B; b0 += nb) {
    KParams q = p;
    q.B = std::min(nb, p.B - b0);
    q.dB = make_divmod(q.B);
    q.a = static_cast<const T*>(p.a) + b0 * p.hs.n;
    q.out = static_cast<T*>(p.out) + b0 * p.is.n;
    q.M = q.B * positions;
    q.tiles_m = ceil_div(q.M, MmaWide<T>::BM);
    q.units = q.tiles_m * q.tiles_n;
    cudaError_t err = path == Path::kMmaWide
                          ? launch_mma_split<Op, MmaWide<T>, T, kVec>(q, split, stream)
                          : launch_mma_split<Op, MmaNarrow<T>, T, kVec>(q, split, stream);
    if (err != cudaSuccess) return err;
    if ((err = launch_col2im<T, L>(q, nsm, stream)) != cudaSuccess) return err;
  }
  return cudaSuccess;
}


// weight_acts' workspace (csrc/common/conv_workspace.h): partial sums of one launch and a float32
// running sum of the filters (the Workspace the plan in run() divides); then, for NHWC images of
// fewer than kPaddedChannels channels (unless the lowering's cap left it out), a copy of the
// images padded with zero channels.
using jcn::wa_padded_image_bytes;
using jcn::wa_partial_sum_bytes;
static_assert(kPaddedChannels == jcn::kWaPaddedChannels);

// weight_acts of NHWC images of fewer than kPaddedChannels channels, where the workspace has room
// for a padded copy (conv_weight_acts_padding.cuh): makes the copy and points p (and `a`) at it;
// the workspace left to the plan is the partial sums' part. nullopt: the images stay as they are.
template <typename T>
std::optional<cudaError_t> run_wa_padding(KParams& p, const void*& a, Workspace& ws, int nsm,
                                          cudaStream_t stream) {
  const int64_t pixels = p.B * p.H * p.W;
  const int64_t sums = wa_partial_sum_bytes(p.F * p.C * p.fh * p.fw);
  const bool dense = p.is.c == 1 && p.is.x == p.C && p.is.y == p.W * p.C && p.is.n == p.H * p.is.y;
  if (p.C >= kPaddedChannels || !dense ||
      ws.bytes < sums + wa_padded_image_bytes(pixels, int64_t(sizeof(T))))
    return std::nullopt;
  T* padded = reinterpret_cast<T*>(static_cast<unsigned char*>(ws.data) + sums);
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(pixels, 256), int64_t(nsm) * 32));
  wa_pad_channels_kernel<T>
      <<<blocks, 256, 0, stream>>>(static_cast<const T*>(a), padded, pixels, int(p.C));
  a = p.a = padded;
  p.C = kPaddedChannels;
  p.is = {p.H * p.W * p.C, 1, p.W * p.C, p.C};
  ws.bytes = sums;
  return cudaGetLastError();
}

// The FFT transforms' kernels opt in once to the largest shared memory of any plane size.
constexpr int kFftMaxSharedBytes = fft_max_shared_bytes();

int64_t fft_blocks(const FftPlanes& pl, int lph, int lpw, int nsm) {
  const int64_t groups = pl.na * ceil_div(pl.nb, int64_t(1) << fft_log2_planes_per_block(lph, lpw));
  return std::min<int64_t>(groups, int64_t(nsm) * 16);
}

template <typename T>
cudaError_t fft_forward(const void* src, const FftPlanes& pl, int lph, int lpw, float2* spec,
                        int nsm, cudaStream_t stream) {
  constexpr auto kernel = fft_forward_kernel<T>;
  cudaError_t err = opt_in_shared_memory<kernel>(kFftMaxSharedBytes);
  if (err != cudaSuccess) return err;
  kernel<<<unsigned(fft_blocks(pl, lph, lpw, nsm)), kFftThreads, fft_shared_bytes(lph, lpw),
           stream>>>(static_cast<const T*>(src), pl, lph, lpw, spec);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fft_inverse(const float2* spec, const FftPlanes& pl, int lph, int lpw, void* dst,
                        int nsm, cudaStream_t stream) {
  constexpr auto kernel = fft_inverse_kernel<T>;
  cudaError_t err = opt_in_shared_memory<kernel>(kFftMaxSharedBytes);
  if (err != cudaSuccess) return err;
  kernel<<<unsigned(fft_blocks(pl, lph, lpw, nsm)), kFftThreads, fft_shared_bytes(lph, lpw),
           stream>>>(spec, pl, lph, lpw, 1.f / float(1 << (lph + lpw)), static_cast<T*>(dst));
  return cudaGetLastError();
}

template <bool kAUnitK, bool kBUnitN, bool kConjB, bool kSplit>
cudaError_t launch_cgemm(const CgemmParams& p, int64_t bins, cudaStream_t stream) {
  const int64_t tiles = ceil_div(p.M, kCgBM) * ceil_div(p.N, kCgBN);
  cgemm_bins_kernel<kAUnitK, kBUnitN, kConjB, kSplit>
      <<<dim3(unsigned(std::min<int64_t>(tiles, 65535)), unsigned(bins)), kCgThreads, 0, stream>>>(
          p);
  return cudaGetLastError();
}
// The bin GEMM for operands of these strides.
template <bool kConjB, bool kSplit>
cudaError_t launch_cgemm(const CgemmParams& p, int64_t bins, cudaStream_t stream) {
  if (p.sAk == 1)
    return p.sBn == 1 ? launch_cgemm<true, true, kConjB, kSplit>(p, bins, stream)
                      : launch_cgemm<true, false, kConjB, kSplit>(p, bins, stream);
  return p.sBn == 1 ? launch_cgemm<false, true, kConjB, kSplit>(p, bins, stream)
                    : launch_cgemm<false, false, kConjB, kSplit>(p, bins, stream);
}
// ... as 3xTF32 where the caller asks float32 at a precision above default (float32-accurate),
// else TF32 (the precision its operands allow).
template <bool kConjB>
cudaError_t launch_cgemm(const CgemmParams& p, int64_t bins, bool split, cudaStream_t stream) {
  return split ? launch_cgemm<kConjB, true>(p, bins, stream)
               : launch_cgemm<kConjB, false>(p, bins, stream);
}

// The FFT path (conv_fft.cuh) where jcn::fft_conv_plan takes it and the workspace has exactly
// the plan's size (conv_workspace.h sizes it by the same rule, or for another path where the
// lowering's cap turns the FFT off). nullopt: the op runs without it. a / b as in run(); the
// workspace holds the spectra of the images X, the filters W and the hidden tensor H.
template <OpKind K, Layout L, typename T>
std::optional<cudaError_t> run_fft(const jcn::ConvGeometry& g, const void* a, const void* b,
                                   void* out, Workspace ws, int nsm, cudaStream_t stream) {
  const jcn::FftConvPlan plan = jcn::fft_conv_plan(K == OpKind::kWA, g, int64_t(sizeof(T)));
  if (plan.ph == 0 || ws.bytes != plan.bytes) return std::nullopt;
  int lph = 0, lpw = 0;
  while ((int64_t(1) << lph) < plan.ph) ++lph;
  while ((int64_t(1) << lpw) < plan.pw) ++lpw;
  const int64_t bins = plan.ph * (plan.pw / 2 + 1);
  unsigned char* const base = static_cast<unsigned char*>(ws.data);
  float2* const spec_x = reinterpret_cast<float2*>(base);
  float2* const spec_w = reinterpret_cast<float2*>(base + plan.spectrum_bytes[0]);
  float2* const spec_h =
      reinterpret_cast<float2*>(base + plan.spectrum_bytes[0] + plan.spectrum_bytes[1]);

  // Plane sets, b along the tensor's contiguous index: images (NHWC (n, c), C01B (c, n)),
  // filters (c, f), hidden (NHWC (n, f), C01B (f, n)). Images sit at (pad_top, pad_left).
  constexpr bool c01b = L == Layout::kC01B;
  const int64_t N = g.batch, C = g.channels, F = g.filters;
  const jcn::Strides4 &is = g.image, &fs = g.filter, &hs = g.hidden;
  const int ih = int(g.in_h), iw = int(g.in_w), pt = int(g.pad_top), pl = int(g.pad_left);
  const FftPlanes images = c01b ? FftPlanes{C, N, is.c, is.n, is.y, is.x, ih, iw, pt, pl}
                                : FftPlanes{N, C, is.n, is.c, is.y, is.x, ih, iw, pt, pl};
  const FftPlanes filters{C, F, fs.c, fs.n, fs.y, fs.x, int(g.filter_h), int(g.filter_w), 0, 0};
  const int oh = int(g.out_h), ow = int(g.out_w);
  const FftPlanes hidden = c01b ? FftPlanes{F, N, hs.c, hs.n, hs.y, hs.x, oh, ow, 0, 0}
                                : FftPlanes{N, F, hs.n, hs.c, hs.y, hs.x, oh, ow, 0, 0};
  // Within a bin: X(n, c) at n * sXn + c * sXc, W(c, f) at c * F + f, H(n, f) likewise.
  const int64_t sXn = c01b ? 1 : C, sXc = c01b ? N : 1, sHn = c01b ? 1 : F, sHf = c01b ? N : 1;

  // Per op: which planes the operands a and b and the result are, where their spectra go, and
  // the bin GEMM over them (dimensions and strides; its operands are those spectra).
  struct Side {
    const FftPlanes* planes;
    float2* spec;
  };
  Side in_a, in_b, res;
  CgemmParams cg;
  if constexpr (K == OpKind::kFA) {  // H = X conj(W): (n x c) (c x f)
    in_a = {&images, spec_x};
    in_b = {&filters, spec_w};
    res = {&hidden, spec_h};
    cg = CgemmParams{N, F, C, N * C, sXn, sXc, C * F, F, 1, N * F, sHn, sHf};
  } else if constexpr (K == OpKind::kIA) {  // X = H W^T: (n x f) (f x c)
    in_a = {&hidden, spec_h};
    in_b = {&filters, spec_w};
    res = {&images, spec_x};
    cg = CgemmParams{N, C, F, N * F, sHn, sHf, C * F, 1, F, N * C, sXn, sXc};
  } else {  // W = X^T conj(H): (c x n) (n x f)
    in_a = {&images, spec_x};
    in_b = {&hidden, spec_h};
    res = {&filters, spec_w};
    cg = CgemmParams{C, F, N, N * C, sXc, sXn, N * F, sHn, sHf, C * F, F, 1};
  }
  cg.A = in_a.spec;
  cg.B = in_b.spec;
  cg.C = res.spec;
  cudaError_t err;
  if ((err = fft_forward<T>(a, *in_a.planes, lph, lpw, in_a.spec, nsm, stream)) != cudaSuccess ||
      (err = fft_forward<T>(b, *in_b.planes, lph, lpw, in_b.spec, nsm, stream)) != cudaSuccess)
    return err;
  const bool split = std::is_same_v<T, float> && g.precision != jcn::Precision::kDefault;
  if ((err = launch_cgemm<K != OpKind::kIA>(cg, bins, split, stream)) != cudaSuccess) return err;
  return fft_inverse<T>(res.spec, *res.planes, lph, lpw, out, nsm, stream);
}

// ---- The TMA kernels (conv_tma.cuh): filter_acts, weight_acts, image_acts at stride 1 ----

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
using EncodeIm2colFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                    const cuuint64_t*, const cuuint64_t*, const int*, const int*,
                                    cuuint32_t, cuuint32_t, const cuuint32_t*,
                                    CUtensorMapInterleave, CUtensorMapSwizzle,
                                    CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
// The driver's tensor-map encoders (through the runtime: the module links no libcuda), and
// whether the TMA kernels may run at all (JAX_CONVNET_TMA=0 turns them off, to compare paths).
struct TmaDriver {
  EncodeTiledFn tiled = nullptr;
  EncodeIm2colFn im2col = nullptr;
  int driver_version = 0;
  bool usable = false;
};
const TmaDriver& tma_driver() {
  static const TmaDriver drv = [] {
    TmaDriver d;
    const char* env = std::getenv("JAX_CONVNET_TMA");
    if (env && std::string(env) == "0") return d;
    cudaDriverEntryPointQueryResult q;
    void* fn = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      d.tiled = reinterpret_cast<EncodeTiledFn>(fn);
    fn = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeIm2col", &fn, 12000,
                                         cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      d.im2col = reinterpret_cast<EncodeIm2colFn>(fn);
    if (cudaDriverGetVersion(&d.driver_version) != cudaSuccess) d.driver_version = 0;
    d.usable = d.tiled && d.im2col && d.driver_version > 0;
    return d;
  }();
  return drv;
}
// Drivers up to 13.1 mis-handle one descriptor bit for tensors under 128 KiB (CUTLASS clears it
// likewise).
void tma_small_tensor_fix(CUtensorMap* map, int64_t tensor_bytes, int driver_version) {
  if (driver_version <= 13010 && tensor_bytes < 131072)
    reinterpret_cast<uint64_t*>(map)[1] &= ~(uint64_t(1) << 21);
}

// The TMA kernels' problem, its rules and the route of a call: csrc/common/conv_plan.h.
using jcn::TmaProblem;
static_assert(TmaPlan<256>::SMEM == jcn::tma_smem_bytes(256) && kTmaBM == jcn::kTmaRows &&
                  kTmaK<float> * 4 == jcn::kTmaKBlockBytes,
              "conv_plan.h's TMA constants are the kernel's");

// The operands' tensor maps and, for 3xTF32 (kp.passes 3), their residues' (else the same maps).
struct TmaMaps {
  CUtensorMap a, b, a_residue, b_residue;
};
template <Layout L, typename T, int BN, TmaMode kMode>
cudaError_t launch_tma(const TmaMaps& m, const TmaConvParams& kp, int nsm, cudaStream_t stream) {
  constexpr auto kernel = conv_tma_kernel<L, T, BN, kMode>;
  cudaError_t err = opt_in_shared_memory<kernel>(TmaPlan<BN>::SMEM);
  if (err != cudaSuccess) return err;
  const unsigned blocks = unsigned(std::min<int64_t>(kp.tiles, nsm));
  kernel<<<blocks, kTmaThreads, TmaPlan<BN>::SMEM, stream>>>(m.a, m.b, m.a_residue, m.b_residue,
                                                              kp);
  return cudaGetLastError();
}
template <Layout L, typename T, TmaMode kMode>
cudaError_t launch_tma_bn(int bn, const TmaMaps& m, const TmaConvParams& kp, int nsm,
                          cudaStream_t stream) {
  switch (bn) {
    case 256:
      return launch_tma<L, T, 256, kMode>(m, kp, nsm, stream);
    case 192:
      return launch_tma<L, T, 192, kMode>(m, kp, nsm, stream);
    case 128:
      return launch_tma<L, T, 128, kMode>(m, kp, nsm, stream);
    default:
      return launch_tma<L, T, 64, kMode>(m, kp, nsm, stream);
  }
}

// 3xTF32's residue buffers (jcn::tf32_residue_bytes: the op's first and second GEMM operand), at
// the workspace's start; none where the call runs plain TF32 or 16-bit types.
struct Residues {
  float* first = nullptr;
  float* second = nullptr;
  bool on() const { return first != nullptr; }
};
// r[i] = x[i] minus its TF32 truncation (the top 19 bits, which the tensor cores read for x), for
// the n elements of a dense float32 tensor (exact: x and its truncation share their exponent).
__global__ void tf32_residue_kernel(const float* __restrict__ x, float* __restrict__ r,
                                    int64_t n) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const float v = x[i];
    r[i] = v - __uint_as_float(__float_as_uint(v) & 0xffffe000u);
  }
}
cudaError_t tf32_residue(const void* x, float* r, int64_t n, int nsm, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(n, 256), int64_t(nsm) * 8));
  tf32_residue_kernel<<<blocks, 256, 0, stream>>>(static_cast<const float*>(x), r, n);
  return cudaGetLastError();
}
// An operand of the TMA kernel: its data (dense where it has a residue), element count and
// residue buffer.
struct TmaOperand {
  const void* data;
  int64_t elements;
  float* residue;
};
// The kernel's maps (make_a / make_b(map, pointer) encode one for an operand's data) and, for
// 3xTF32 (`split`), the residues written and their maps; else the operands' maps again.
template <typename MakeA, typename MakeB>
cudaError_t tma_maps(TmaMaps* m, const TmaOperand& a, const MakeA& make_a, const TmaOperand& b,
                     const MakeB& make_b, bool split, int nsm, cudaStream_t stream) {
  if (make_a(&m->a, a.data) != CUDA_SUCCESS || make_b(&m->b, b.data) != CUDA_SUCCESS)
    return cudaErrorInvalidValue;
  m->a_residue = m->a;
  m->b_residue = m->b;
  if (!split) return cudaSuccess;
  cudaError_t err;
  if ((err = tf32_residue(a.data, a.residue, a.elements, nsm, stream)) != cudaSuccess ||
      (err = tf32_residue(b.data, b.residue, b.elements, nsm, stream)) != cudaSuccess)
    return err;
  if (make_a(&m->a_residue, a.residue) != CUDA_SUCCESS ||
      make_b(&m->b_residue, b.residue) != CUDA_SUCCESS)
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

template <typename T>
constexpr CUtensorMapDataType kTmaDataType =
    std::is_same_v<T, float>           ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
    : std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                       : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
// Tensor maps with 128-byte swizzled boxes; out-of-bounds elements read as zeros. dims / strides /
// box innermost first; strides in elements (all but the first dim's).
template <typename T>
CUresult tma_tiled_map(CUtensorMap* map, const void* ptr, int rank, const int64_t* dims,
                       const int64_t* strides, const int* box, int64_t tensor_bytes) {
  const TmaDriver& drv = tma_driver();
  cuuint64_t d[5], st[4];
  cuuint32_t b[5], unit[5] = {1, 1, 1, 1, 1};
  for (int i = 0; i < rank; ++i) {
    d[i] = cuuint64_t(dims[i]);
    b[i] = cuuint32_t(box[i]);
    if (i + 1 < rank) st[i] = cuuint64_t(strides[i] * int64_t(sizeof(T)));
  }
  const CUresult r = drv.tiled(map, kTmaDataType<T>, cuuint32_t(rank), const_cast<void*>(ptr), d,
                               st, b, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                               CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  tma_small_tensor_fix(map, tensor_bytes, drv.driver_version);
  return r;
}
// NHWC images (B, H, W, C) as (C, W, H, B) in im2col mode: `pixels` output pixels (raster order)
// of a k-block of channels per copy, for the convolution of pr's geometry (its corners and
// strides).
template <typename T>
CUresult tma_im2col_map(CUtensorMap* map, const void* ptr, const TmaProblem& pr, int pixels) {
  const TmaDriver& drv = tma_driver();
  constexpr int64_t E = sizeof(T);
  const cuuint64_t dims[4] = {cuuint64_t(pr.cin), cuuint64_t(pr.in_w), cuuint64_t(pr.in_h),
                              cuuint64_t(pr.batch)};
  const cuuint64_t strides[3] = {cuuint64_t(pr.xs.x * E), cuuint64_t(pr.xs.y * E),
                                 cuuint64_t(pr.xs.n * E)};
  const int lower[2] = {int(-pr.pl), int(-pr.pt)};
  const int upper[2] = {int(pr.pr - (pr.fw - 1)), int(pr.pb - (pr.fh - 1))};
  const cuuint32_t traversal[4] = {1, cuuint32_t(pr.sw), cuuint32_t(pr.sh), 1};
  const CUresult r = drv.im2col(map, kTmaDataType<T>, 4, const_cast<void*>(ptr), dims, strides,
                                lower, upper, kTmaK<T>, cuuint32_t(pixels), traversal,
                                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  tma_small_tensor_fix(map, E * pr.batch * pr.cin * pr.in_h * pr.in_w, drv.driver_version);
  return r;
}

// The kernel parameters every mode shares, from the problem (tma_can_read bounds them to 31 bits):
// weight_acts' per-tap blocks are 64-channel columns and its runs of images k-blocks.
template <typename T>
TmaConvParams tma_params(const TmaProblem& pr, bool weights) {
  TmaConvParams kp{};
  kp.batch = int32_t(pr.batch);
  kp.cin = int32_t(pr.cin);
  kp.cout = int32_t(pr.cout);
  kp.out_h = int32_t(pr.out_h);
  kp.out_w = int32_t(pr.out_w);
  kp.fh = int32_t(pr.fh);
  kp.fw = int32_t(pr.fw);
  kp.stride_h = int32_t(pr.sh);
  kp.stride_w = int32_t(pr.sw);
  kp.pad_top = int32_t(pr.pt);
  kp.pad_left = int32_t(pr.pl);
  kp.cblocks = int32_t(ceil_div(pr.cin, weights ? 64 : kTmaK<T>));
  kp.m_total = pr.batch * pr.out_h * pr.out_w;
  kp.b_runs = int32_t(ceil_div(pr.batch, weights ? kTmaK<T> : 64));
  return kp;
}
// Whether the TMA kernels may read operands at x, w and y of pr's geometry: the kernels built
// and the driver's encoders found (tma_usable), 16-byte aligned bases, and the geometry's rules
// (jcn::tma_reads).
bool tma_usable(int smem_optin) {
  return kBuiltWgmma && tma_driver().usable && TmaPlan<256>::SMEM <= smem_optin;
}
template <Layout L, typename T>
bool tma_can_read(const TmaProblem& pr, const void* x, const void* w, const void* y,
                  int smem_optin) {
  return tma_usable(smem_optin) && aligned(x, 16) && aligned(w, 16) && aligned(y, 16) &&
         jcn::tma_reads(L, int64_t(sizeof(T)), pr);
}

// filter_acts / image_acts on a TMA kernel where one can (tma_can_read, and the rules of
// jcn::tma_forward_tile, which gives the tile width; TF32: NHWC, filter_acts through the taps'
// k-contiguous copy in the workspace); nullopt: another kernel runs it. res (3xTF32): the
// residues of X and of the taps (filter_acts' copy, or image_acts' W, dense: jcn::residues_fit).
template <Layout L, typename T, bool kFlip>
std::optional<cudaError_t> run_tma(const TmaProblem& pr, const void* x, const void* w, void* y,
                                   Workspace ws, int nsm, int smem_optin, cudaStream_t stream,
                                   const Residues& res = {}) {
  constexpr bool c01b = L == Layout::kC01B, tf32 = std::is_same_v<T, float>;
  static_assert(!(tf32 && c01b), "TF32 reads NHWC images k-contiguous only");
  constexpr bool taps_copy = tf32 && !kFlip;
  const int bn = jcn::tma_forward_tile(L, int64_t(sizeof(T)), kFlip, pr, ws.bytes, nsm);
  if (bn == 0 || !tma_can_read<L, T>(pr, x, w, y, smem_optin) ||
      (taps_copy && !aligned(ws.data, 16)) || (res.on() && !tf32))
    return std::nullopt;
  const int64_t nf = kFlip ? pr.cin : pr.cout, nc = kFlip ? pr.cout : pr.cin;
  const int64_t w_elems = nf * nc * pr.fh * pr.fw, x_elems = pr.batch * pr.cin * pr.in_h * pr.in_w;
  const int64_t w_bytes = int64_t(sizeof(T)) * w_elems;

  TmaConvParams kp = tma_params<T>(pr, false);
  kp.passes = res.on() ? 3 : 1;
  kp.kblocks_pass = int32_t(pr.fh * pr.fw * kp.cblocks);
  kp.kblocks = kp.passes * kp.kblocks_pass;
  kp.x_pairs = int32_t(ceil_div(pr.out_w, 2));
  kp.ys = {pr.ys.n, pr.ys.c, pr.ys.y, pr.ys.x};
  kp.y = y;
  const int64_t tiles_m = c01b ? pr.out_h * kp.x_pairs * kp.b_runs : ceil_div(kp.m_total, kTmaBM);
  kp.tiles_n = int32_t(ceil_div(pr.cout, bn));
  kp.tiles = int32_t(tiles_m * kp.tiles_n);
  if (kp.tiles < 1 || kp.kblocks < 1) return cudaSuccess;

  const auto x_map = [&](CUtensorMap* m, const void* ptr) -> CUresult {
    if (c01b) {  // X (C, H, W, B) as (B, W, H, C): boxes of 64 images x 64 channels
      const int64_t dims[4] = {pr.batch, pr.in_w, pr.in_h, pr.cin};
      const int64_t strides[3] = {pr.xs.x, pr.xs.y, pr.xs.c};
      const int box[4] = {64, 1, 1, kTmaK<T>};
      return tma_tiled_map<T>(m, ptr, 4, dims, strides, box, int64_t(sizeof(T)) * x_elems);
    }
    // X (B, H, W, C) in im2col mode: 128 pixels x a k-block of channels per copy
    return tma_im2col_map<T>(m, ptr, pr, kTmaBM);
  };
  const auto w_map = [&](CUtensorMap* m, const void* ptr) -> CUresult {
    if (taps_copy) {  // TF32 filter_acts' taps copy (fh, fw, F, C) as (C, F, fw, fh): boxes of a
                      // k-block of channels x BN filters
      const int64_t wdims[4] = {nc, nf, pr.fw, pr.fh};
      const int64_t wstrides[3] = {nc, nf * nc, pr.fw * nf * nc};
      const int wbox[4] = {kTmaK<T>, bn, 1, 1};
      return tma_tiled_map<T>(m, ptr, 4, wdims, wstrides, wbox, w_bytes);
    }
    // W: C01B (C, fh, fw, F) as (F, fw, fh, C), NHWC (fh, fw, C, F) as (F, C, fw, fh); boxes of
    // 64 filters x 64 channels (filter_acts) or a k-block of filters x BN channels (image_acts).
    const int64_t wdims[4] = {nf, c01b ? pr.fw : nc, c01b ? pr.fh : pr.fw, c01b ? nc : pr.fh};
    const int64_t wstrides[3] = {c01b ? pr.ws.x : pr.ws.c, c01b ? pr.ws.y : pr.ws.x,
                                 c01b ? pr.ws.c : pr.ws.y};
    const int channels = kFlip ? bn : kTmaK<T>;
    const int wbox[4] = {kFlip ? kTmaK<T> : 64, c01b ? 1 : channels, 1, c01b ? channels : 1};
    return tma_tiled_map<T>(m, ptr, 4, wdims, wstrides, wbox, w_bytes);
  };
  const void* taps = w;
  if constexpr (taps_copy) {  // W (f, c, r, s) copied to (fh, fw, F, C) in the workspace
    const dim3 grid(unsigned(ceil_div(nf, 32)), unsigned(ceil_div(nc, 32)),
                    unsigned(pr.fh * pr.fw));
    tf32_taps_kernel<<<grid, dim3(32, 8), 0, stream>>>(static_cast<const float*>(w),
                                                      static_cast<float*>(ws.data), nf, nc,
                                                      int(pr.fw), {pr.ws.n, pr.ws.c, pr.ws.y,
                                                                   pr.ws.x});
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    taps = ws.data;
  }
  TmaMaps m;
  if (cudaError_t err = tma_maps(&m, {x, x_elems, res.first}, x_map, {taps, w_elems, res.second},
                                 w_map, res.on(), nsm, stream);
      err != cudaSuccess)
    return err;
  return launch_tma_bn<L, T, kFlip ? TmaMode::kFlipped : TmaMode::kForward>(bn, m, kp, nsm,
                                                                         stream);
}

// weight_acts on a TMA kernel where one can (tma_can_read with pr = filter_acts' problem, and the
// rules of jcn::tma_weights_plan, which gives the tile and the splits; TF32: C01B): K (the
// output pixels) split into ranges whose float32 sums land in the workspace, then added in order
// (wa_reduce_kernel). partial_sum only sets the order of additions (the value beyond rounding
// never depends on it), so the kernel keeps its own.
template <Layout L, typename T>
std::optional<cudaError_t> run_tma_weights(const TmaProblem& pr, const void* x, const void* hid,
                                           void* out, Workspace ws, int nsm, int smem_optin,
                                           cudaStream_t stream, const Residues& res = {}) {
  constexpr bool c01b = L == Layout::kC01B;
  static_assert(c01b || sizeof(T) == 2, "TF32 reads C01B's pixels k-contiguous only");
  constexpr int64_t E_ = sizeof(T);
  const jcn::Strides4& hs = pr.ys;
  const int64_t passes = res.on() ? 3 : 1;
  const jcn::TmaWeightsPlan plan = jcn::tma_weights_plan(L, E_, pr, ws.bytes, nsm, passes);
  if (plan.bn == 0 || !tma_can_read<L, T>(pr, x, out, hid, smem_optin) || !aligned(ws.data, 16) ||
      (res.on() && sizeof(T) != 4))
    return std::nullopt;
  const int64_t E = pr.cout * pr.cin * pr.fh * pr.fw;

  TmaConvParams kp = tma_params<T>(pr, true);
  kp.ys = {pr.ws.n, pr.ws.c, pr.ws.y, pr.ws.x};
  kp.filter_elems = E;
  const int bn = plan.bn;
  kp.tiles_m = int32_t(plan.tiles_m);
  kp.tiles_n = int32_t(plan.tiles_n);
  kp.passes = int32_t(passes);
  kp.kblocks_total = int32_t(plan.kblocks);
  kp.kblocks_pass = int32_t(plan.kblocks / passes);
  kp.kblocks = int32_t(plan.kblocks_per_split);
  const int64_t splits = plan.splits;
  kp.splits = int32_t(splits);
  kp.tiles = int32_t(plan.tiles_m * plan.tiles_n * splits);
  kp.y = ws.data;

  const int64_t hid_elems = kp.m_total * pr.cout;
  const int64_t x_elems = pr.batch * pr.cin * pr.in_h * pr.in_w;
  // A: the hidden tensor; B: the images.
  const auto hid_map = [&](CUtensorMap* m, const void* ptr) -> CUresult {
    if (c01b) {  // hidden (F, Ho, Wo, B) as (B, Wo, Ho, F): a k-block of images x 128 filters
      const int64_t dims[4] = {pr.batch, pr.out_w, pr.out_h, pr.cout};
      const int64_t strides[3] = {hs.x, hs.y, hs.c};
      const int box[4] = {kTmaK<T>, 1, 1, kTmaBM};
      return tma_tiled_map<T>(m, ptr, 4, dims, strides, box, E_ * hid_elems);
    }
    // hidden as a (pixels x F) matrix: 64 pixels x 64 filters
    const int64_t dims[2] = {pr.cout, kp.m_total};
    const int64_t strides[1] = {pr.cout};
    const int box[2] = {64, 64};
    return tma_tiled_map<T>(m, ptr, 2, dims, strides, box, E_ * hid_elems);
  };
  const auto x_map = [&](CUtensorMap* m, const void* ptr) -> CUresult {
    if (c01b) {  // images (C, H, W, B) as (B, W, H, C): a k-block of images x 64 channels
      const int64_t idims[4] = {pr.batch, pr.in_w, pr.in_h, pr.cin};
      const int64_t istrides[3] = {pr.xs.x, pr.xs.y, pr.xs.c};
      const int ibox[4] = {kTmaK<T>, 1, 1, 64};
      return tma_tiled_map<T>(m, ptr, 4, idims, istrides, ibox, E_ * x_elems);
    }
    return tma_im2col_map<T>(m, ptr, pr, 64);  // images in im2col mode
  };
  TmaMaps m;  // res.first: the images' residue, res.second: the hidden tensor's
  cudaError_t err = tma_maps(&m, {hid, hid_elems, res.second}, hid_map, {x, x_elems, res.first},
                             x_map, res.on(), nsm, stream);
  if (err != cudaSuccess) return err;
  err = launch_tma_bn<L, T, TmaMode::kWeights>(bn, m, kp, nsm, stream);
  if (err != cudaSuccess) return err;
  return launch_reduce<T>(static_cast<const float*>(ws.data), 1, splits, E, nullptr, out, true,
                          true, nsm, stream);
}

// A float32 (outer, pixels, inner) tensor copied to (inner, pixels, outer)
// (swap_outer_inner_kernel): NHWC to C01B with outer = batch, inner = channels, and back. Sizes
// of the copies' grids: outer and inner at most kMaxSwapped.
using jcn::kMaxSwapped;
cudaError_t swap_outer_inner(const void* src, void* dst, int64_t outer, int64_t pixels,
                             int64_t inner, cudaStream_t stream) {
  const dim3 grid(unsigned(ceil_div(inner, kSwapTile)), unsigned(ceil_div(outer, kSwapTile)),
                  unsigned(std::min<int64_t>(pixels, 65535)));
  const auto s = static_cast<const float*>(src);
  const auto d = static_cast<float*>(dst);
  if (outer % 4 == 0 && inner % 4 == 0 && aligned(src, 16) && aligned(dst, 16))
    swap_outer_inner_kernel<4><<<grid, kSwapThreads, 0, stream>>>(s, d, outer, pixels, inner);
  else
    swap_outer_inner_kernel<1><<<grid, kSwapThreads, 0, stream>>>(s, d, outer, pixels, inner);
  return cudaGetLastError();
}

// float32 NHWC weight_acts as TF32: the images and the hidden tensor (dense) copied to C01B
// (C, H, W, B) at the workspace's start, so that K (the pixels) is k-contiguous, then the C01B
// kernel with the rest of the workspace for its partial sums (jcn::tf32_copies_bytes,
// csrc/common/conv_workspace.h, sizes the copies).
std::optional<cudaError_t> run_tma_weights_nhwc_tf32(const TmaProblem& pr, const void* x,
                                                     const void* hid, void* out, Workspace ws,
                                                     int nsm, int smem_optin,
                                                     cudaStream_t stream,
                                                     const Residues& res = {}) {
  if (jcn::tma_weights_via_c01b_plan(pr, ws.bytes, nsm, res.on() ? 3 : 1).bn == 0 ||
      !aligned(ws.data, 16))
    return std::nullopt;
  const int64_t x_pixels = pr.in_h * pr.in_w, h_pixels = pr.out_h * pr.out_w;
  const int64_t x_bytes = jcn::tma_copy_bytes(pr.batch, x_pixels, pr.cin);
  const int64_t h_bytes = jcn::tma_copy_bytes(pr.batch, h_pixels, pr.cout);
  char* const base = static_cast<char*>(ws.data);
  float* const xc = reinterpret_cast<float*>(base);
  float* const hc = reinterpret_cast<float*>(base + x_bytes);
  const TmaProblem pc = jcn::tma_c01b_copies_problem(pr);
  if (!tma_can_read<Layout::kC01B, float>(pc, xc, out, hc, smem_optin)) return std::nullopt;
  cudaError_t err;
  if ((err = swap_outer_inner(x, xc, pr.batch, x_pixels, pr.cin, stream)) != cudaSuccess ||
      (err = swap_outer_inner(hid, hc, pr.batch, h_pixels, pr.cout, stream)) != cudaSuccess)
    return err;
  const Workspace rest{base + x_bytes + h_bytes, ws.bytes - x_bytes - h_bytes};
  return run_tma_weights<Layout::kC01B, float>(pc, xc, hc, out, rest, nsm, smem_optin, stream,
                                               res);
}

// float32 C01B filter_acts / image_acts (stride 1) as TF32: X (dense) copied to NHWC at the
// workspace's start, the NHWC kernel into an NHWC Y after it (the rest of the workspace for the
// taps' copy), then Y copied to C01B (dense) (jcn::tf32_copies_bytes,
// csrc/common/conv_workspace.h, sizes the copies).
template <bool kFlip>
std::optional<cudaError_t> run_tma_c01b_tf32(const TmaProblem& pr, const void* x, const void* w,
                                             void* y, Workspace ws, int nsm, int smem_optin,
                                             cudaStream_t stream, const Residues& res = {}) {
  if (jcn::tma_via_nhwc_tile(kFlip, pr, ws.bytes, nsm) == 0 || !aligned(ws.data, 16))
    return std::nullopt;
  const int64_t x_pixels = pr.in_h * pr.in_w, y_pixels = pr.out_h * pr.out_w;
  const int64_t x_bytes = jcn::tma_copy_bytes(pr.batch, x_pixels, pr.cin);
  const int64_t y_bytes = jcn::tma_copy_bytes(pr.batch, y_pixels, pr.cout);
  char* const base = static_cast<char*>(ws.data);
  float* const xn = reinterpret_cast<float*>(base);
  float* const yn = reinterpret_cast<float*>(base + x_bytes);
  const TmaProblem pn = jcn::tma_nhwc_copies_problem(pr);
  if (!tma_can_read<Layout::kNHWC, float>(pn, xn, w, yn, smem_optin)) return std::nullopt;
  if (cudaError_t err = swap_outer_inner(x, xn, pr.cin, x_pixels, pr.batch, stream);
      err != cudaSuccess)
    return err;
  const Workspace rest{base + x_bytes + y_bytes, ws.bytes - x_bytes - y_bytes};
  const std::optional<cudaError_t> done = run_tma<Layout::kNHWC, float, kFlip>(
      pn, xn, w, yn, rest, nsm, smem_optin, stream, res);
  if (!done || *done != cudaSuccess) return done;
  return swap_outer_inner(yn, y, pr.batch, y_pixels, pr.cout, stream);
}

// The op for one layout and element type, once geometry and attributes are checked.
// a / b: the GEMM operands A / B (FA: images / filters, IA: hidden / filters, WA: images / hidden).
template <OpKind K, Layout L, typename T>
ffi::Error run(cudaStream_t stream, Workspace workspace, const jcn::ConvGeometry& g,
               const jcn::ConvParams& cp, const void* a, const void* b, void* out) {
  const OpKind kOp = K;
  constexpr bool f32 = std::is_same_v<T, float>;
  // float32 at precision High / Highest: tensor cores only as 3xTF32 (the mma path).
  const bool split = f32 && cp.precision != jcn::Precision::kDefault;

  KParams p{};
  p.a = a;
  p.b = b;
  p.out = out;
  p.slots = nullptr;
  p.B = g.batch;
  p.C = g.channels;
  p.F = g.filters;
  p.H = g.in_h;
  p.W = g.in_w;
  p.fh = g.filter_h;
  p.fw = g.filter_w;
  p.Ho = g.out_h;
  p.Wo = g.out_w;
  p.sh = g.stride_h;
  p.sw = g.stride_w;
  p.pt = g.pad_top;
  p.pl = g.pad_left;
  p.is = {g.image.n, g.image.c, g.image.y, g.image.x};
  p.fs = {g.filter.n, g.filter.c, g.filter.y, g.filter.x};
  p.hs = {g.hidden.n, g.hidden.c, g.hidden.y, g.hidden.x};
  p.C_out = p.C;
  const int64_t T_ = p.fh * p.fw;

  // The device's limits the plan depends on (cached by the runtime: no synchronisation).
  int dev = 0, nsm = 0, smem_optin = 0, smem_sm = 0, smem_reserved = 0;
  int cc_major = 0, cc_minor = 0;
  cudaError_t err;
  if ((err = cudaGetDevice(&dev)) != cudaSuccess) return cuda_error(kOp, "cudaGetDevice", err);
  if ((err = cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) !=
          cudaSuccess ||
      (err = cudaDeviceGetAttribute(&smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev)) !=
          cudaSuccess ||
      (err = cudaDeviceGetAttribute(&smem_reserved, cudaDevAttrReservedSharedMemoryPerBlock,
                                    dev)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev)) !=
          cudaSuccess ||
      (err = cudaDeviceGetAttribute(&cc_minor, cudaDevAttrComputeCapabilityMinor, dev)) !=
          cudaSuccess)
    return cuda_error(kOp, "cudaDeviceGetAttribute", err);
  nsm = std::max(nsm, 1);

  // The route (csrc/common/conv_plan.h): Hopper's TMA core, directly or through copies of the
  // operands TF32 cannot read in place, or the FFT path, in the plan's order; the kernels below
  // where the plan takes neither. Where the planned TMA kernel cannot run after all (unaligned
  // pointers: the plan sees only the geometry), the FFT path if it applies, then the others.
  constexpr jcn::ConvOp kConvOp = K == OpKind::kFA   ? jcn::ConvOp::kFilterActs
                                  : K == OpKind::kIA ? jcn::ConvOp::kImageActs
                                                     : jcn::ConvOp::kWeightActs;
  const jcn::ConvDevice device{cc_major, cc_minor, nsm, smem_optin, tma_usable(smem_optin)};
  const jcn::ConvPlan plan = jcn::plan_conv(kConvOp, g, cp.pad_bottom, cp.pad_right,
                                            int64_t(sizeof(T)), f32, device, workspace.bytes);
  // 3xTF32 (plan.split): the residues take the workspace's first bytes, the route the rest.
  Residues res;
  Workspace route_ws = workspace;
  if (plan.split) {
    const jcn::Tf32Residues bytes = jcn::tf32_residue_bytes(kConvOp, g);
    if (workspace.bytes >= bytes.total() && aligned(workspace.data, 16)) {
      char* const base = static_cast<char*>(workspace.data);
      res = {reinterpret_cast<float*>(base), reinterpret_cast<float*>(base + bytes.first)};
      route_ws = {base + bytes.total(), workspace.bytes - bytes.total()};
    }
  }
  const auto run_tma_route = [&]() -> std::optional<cudaError_t> {
    constexpr bool c01b_f32 = f32 && L == Layout::kC01B;
    if (plan.split && !res.on()) return std::nullopt;  // never plain TF32 above default
    switch (plan.route) {
      case jcn::ConvRoute::kTmaWeightsViaC01b:
        if constexpr (K == OpKind::kWA && f32 && L == Layout::kNHWC)
          return run_tma_weights_nhwc_tf32(jcn::tma_problem(false, g, cp.pad_bottom, cp.pad_right),
                                           a, b, out, route_ws, nsm, smem_optin, stream, res);
        break;
      case jcn::ConvRoute::kTmaWeights:
        if constexpr (K == OpKind::kWA && (sizeof(T) == 2 || L == Layout::kC01B))
          return run_tma_weights<L, T>(jcn::tma_problem(false, g, cp.pad_bottom, cp.pad_right),
                                       a, b, out, route_ws, nsm, smem_optin, stream, res);
        break;
      case jcn::ConvRoute::kTmaViaNhwc:
        if constexpr (K != OpKind::kWA && c01b_f32)
          return run_tma_c01b_tf32<K == OpKind::kIA>(
              jcn::tma_problem(K == OpKind::kIA, g, cp.pad_bottom, cp.pad_right), a, b, out,
              route_ws, nsm, smem_optin, stream, res);
        break;
      case jcn::ConvRoute::kTma:
        if constexpr (K != OpKind::kWA && (sizeof(T) == 2 || (f32 && !c01b_f32)))
          return run_tma<L, T, K == OpKind::kIA>(
              jcn::tma_problem(K == OpKind::kIA, g, cp.pad_bottom, cp.pad_right), a, b, out,
              route_ws, nsm, smem_optin, stream, res);
        break;
      default:
        break;
    }
    return std::nullopt;
  };
  if (const std::optional<cudaError_t> done = run_tma_route()) {
    if (*done != cudaSuccess) return cuda_error(kOp, "TMA kernel launch", *done);
    return ffi::Error::Success();
  }
  if (const std::optional<cudaError_t> fft = run_fft<K, L, T>(g, a, b, out, workspace, nsm, stream)) {
    if (*fft != cudaSuccess) return cuda_error(kOp, "FFT path launch", *fft);
    return ffi::Error::Success();
  }
  if constexpr (K == OpKind::kWA && L == Layout::kNHWC) {
    const std::optional<cudaError_t> padded = run_wa_padding<T>(p, a, workspace, nsm, stream);
    if (padded && *padded != cudaSuccess) return cuda_error(kOp, "kernel launch", *padded);
  }
  p.dB = make_divmod(p.B);
  p.dC = make_divmod(p.C);
  p.dF = make_divmod(p.F);
  p.dfw = make_divmod(p.fw);
  p.dWo = make_divmod(p.Wo);
  p.dHo = make_divmod(p.Ho);
  p.dT = make_divmod(T_);

  // GEMM sizes (IA: the largest class) and the 32/64-bit index decision.
  int64_t M = 0, N = 0, Kd = 0;
  if (K == OpKind::kFA) {
    M = p.B * p.Ho * p.Wo;
    N = p.F;
    Kd = p.C * T_;
  } else if (K == OpKind::kIA) {
    p.ncy = std::min(p.sh, p.H);
    p.ncx = std::min(p.sw, p.W);
    p.hq0 = ceil_div(p.H, p.sh);
    p.wq0 = ceil_div(p.W, p.sw);
    p.nImax = ceil_div(p.fh, p.sh);
    p.nJmax = ceil_div(p.fw, p.sw);
    p.dnJ = make_divmod(p.nJmax);
    p.dHq[0] = make_divmod(p.hq0);
    p.dHq[1] = make_divmod(std::max<int64_t>(1, p.hq0 - 1));
    p.dWq[0] = make_divmod(p.wq0);
    p.dWq[1] = make_divmod(std::max<int64_t>(1, p.wq0 - 1));
    M = p.B * p.hq0 * p.wq0;
    N = p.C;
    Kd = p.nImax * p.nJmax * p.F;
  } else {
    p.P = g.partial_sum;
    p.nseg = (p.Ho * p.Wo) / p.P;
    M = p.C * T_;
    N = p.F;
    Kd = p.B * p.P;
  }
  p.M = M;
  p.N = N;
  p.K = Kd;
  const double img_n = double(p.B) * double(p.C) * double(p.H) * double(p.W);
  const double fil_n = double(p.F) * double(p.C) * double(T_);
  const double hid_n = double(p.B) * double(p.F) * double(p.Ho) * double(p.Wo);
  double worst = std::max({double(M), double(N), double(Kd), img_n, fil_n, hid_n});
  worst = std::max(worst, extent(p.is, double(p.B), double(p.C),
                                 double(p.H + 2 * p.pt + 2 * p.fh + 2 * p.sh) + double(cp.pad_bottom),
                                 double(p.W + 2 * p.pl + 2 * p.fw + 2 * p.sw) + double(cp.pad_right)));
  worst = std::max(worst, extent(p.hs, double(p.B), double(p.F),
                                 double(p.Ho + p.H + p.pt + 2 * p.fh + 2),
                                 double(p.Wo + p.W + p.pl + 2 * p.fw + 2)));
  worst = std::max(worst, extent(p.fs, double(p.F), double(p.C), double(p.fh + p.sh + 1),
                                 double(p.fw + p.sw + 1)));
  const bool idx64 = worst >= double(kIdx32Limit);

  // Vector loads: the contiguous dimension of each operand must be a multiple of the width and
  // the base pointers aligned to it. The narrow tile is only used with vector loads.
  const bool c01b = L == Layout::kC01B;
  int64_t ca, cb;  // contiguous dimension of A / B
  if (K == OpKind::kFA) {
    ca = c01b ? p.B : p.C;
    cb = p.F;
  } else if (K == OpKind::kIA) {
    ca = c01b ? p.B : p.F;
    cb = p.F;
  } else {
    ca = c01b ? p.B : p.C;
    cb = c01b ? p.B : p.F;
  }
  auto vec_mask = [&](Path pa) {
    int va = 1, vb = 1;
    vec_widths_path<K, L, T>(pa, &va, &vb);
    const bool oka = ca % va == 0 && aligned(a, int64_t(va) * int64_t(sizeof(T)));
    const bool okb = cb % vb == 0 && aligned(b, int64_t(vb) * int64_t(sizeof(T)));
    return (oka ? 1 : 0) | (okb ? 2 : 0);
  };
  // The mma kernel: 16-byte vectors of both operands (or narrower copies of A where
  // kANarrowCopy), and its shared memory within the device's per-block limit (the 128 x 128
  // tile takes about 105 KiB, more than sm_86 / sm_89 GPUs allow).
  using OpMma = typename OpOf<K>::template type<L, int32_t>;
  constexpr int kMmaVec = MmaWide<T>::VEC;  // 16 bytes
  constexpr int kNarrow = kANarrowCopy<K, L, T>;
  const bool a_vec16 = ca % kMmaVec == 0 && aligned(a, 16);
  const bool a_narrow = !a_vec16 && kNarrow > 0 && ca % std::max(kNarrow, 1) == 0 &&
                        aligned(a, int64_t(kNarrow) * int64_t(sizeof(T)));
  const bool mma_ok = (a_vec16 || a_narrow) && cb % kMmaVec == 0 && aligned(b, 16) &&
                      MmaPlanOf<OpMma, MmaNarrow<T>, T, int32_t>::TOTAL <= smem_optin;
  const bool mma_wide_fits = MmaPlanOf<OpMma, MmaWide<T>, T, int32_t>::TOTAL <= smem_optin;
  const bool mma_mid_fits = MmaPlanOf<OpMma, MmaMid<T>, T, int32_t>::TOTAL <= smem_optin;

  // image_acts into RGB: through columns where the call has a workspace (faster than the direct
  // kernel with large filters, L1 / alex1), else the direct kernel for float32 (faster than the
  // TF32 / 3xTF32 thin tile there) and for 16-bit types the tensor cores cannot read (the bf16
  // thin tile is faster where it runs). Measured: benchmarks/history/2026-11-29_session{2,3}_*.
  if constexpr (K == OpKind::kIA) {
    if (!idx64 && workspace.bytes > 0) {
      const std::optional<cudaError_t> done =
          run_ia_columns<L, T>(p, workspace, split, mma_ok, mma_wide_fits, nsm, stream);
      if (done && *done != cudaSuccess) return cuda_error(kOp, "kernel launch", *done);
      if (done) return ffi::Error::Success();
    }
    if (!idx64 && p.C <= kDirectMaxChannels && p.nImax <= kDirectMaxTapRows && (f32 || !mma_ok)) {
      err = launch_ia_direct<L, T>(p, nsm, stream);
      if (err != cudaSuccess) return cuda_error(kOp, "kernel launch", err);
      return ffi::Error::Success();
    }
  }

  Path path = Path::kWide;
  if (!idx64 && M >= 16 && mma_ok) {
    // Single-float copies of A: the 128 x 128 tile spills (16 or 32 copies per thread and k-tile);
    // the 128 x 96 one is not instantiated for them.
    const bool a_single = a_narrow && kNarrow * sizeof(T) < 8;
    const bool mid = mma_mid_fits && OpMma::kMidTile && kMidTileAndKTable<T> && !a_single;
    path = mma_path(N, mma_wide_fits && !a_single, mid);
    // Hopper: the wgmma kernels (sm_90a code runs on compute capability 9.0 only; float32 as
    // TF32, not 3xTF32).
    if constexpr (K == OpKind::kFA && kBuiltWgmma) {
      if (cc_major == 9 && cc_minor == 0 && a_vec16 && N % kWgmmaColumns == 0 && !split &&
          wgmma_plan_bytes<OpMma, T>() <= smem_optin)
        path = Path::kWgmma;
    }
  } else if (!idx64 && !split && N >= 16 && M >= 16) {
    path = Path::kWmma;
  } else if (!idx64 && K != OpKind::kWA && N <= 8) {
    path = Path::kNarrow;
  }
  const bool mma = is_mma(path);
  // Vector loads of the other kernels (the mma kernel always copies 16-byte vectors; 64-bit
  // indices: scalar loads).
  int mask = 0;
  if (!mma && !idx64) mask = vec_mask(path);
  if (path == Path::kNarrow && mask != 3) {
    path = Path::kWide;
    mask = vec_mask(path);
  }
  int BM = 128, BN = 64, BK = CfgWide::BK;
  if (mma || path == Path::kWgmma) {  // (both: 128 bytes of k per stage)
    BN = path == Path::kWgmma ? kWgmmaColumns : mma_tile_columns<T>(path);
    BK = MmaWide<T>::BK;
  } else if (path == Path::kWmma) {
    BK = WmmaCfgOf<T>::BK;
  } else if (path == Path::kNarrow) {
    BM = CfgNarrow::BM;
    BN = CfgNarrow::BN;
    BK = CfgNarrow::BK;
  }

  p.tiles_m = ceil_div(M, BM);
  p.tiles_n = ceil_div(N, BN);
  const int64_t tiles = p.tiles_m * p.tiles_n;
  if constexpr (K == OpKind::kFA) {
    p.units = tiles;
    // The k table for C01B images (Loader's kKTable; with the mma kernel 16-bit types only):
    // where rows and taps fit its 16-bit fields and the mma kernel keeps two blocks per SM (the
    // wgmma kernels run one: beside its stages).
    const int64_t table = round_up(Kd, BK) * int64_t(sizeof(KEntry));
    const int64_t block = mma ? mma_plan_bytes<OpMma, T>(path) + table + smem_reserved : 0;
    const bool wgmma = path == Path::kWgmma;
    const bool table_fits = wgmma ? wgmma_plan_bytes<OpMma, T>() + table <= smem_optin
                                  : mma && 2 * block <= smem_sm;
    if ((kMidTileAndKTable<T> || wgmma) && c01b && table_fits && !split &&
        table <= kKTableMaxBytes &&
        p.Ho * p.sh + p.fh < (int64_t(1) << 15) && p.fw < (int64_t(1) << 15))
      p.k_table_bytes = table;
  } else if constexpr (K == OpKind::kIA) {
    p.units = p.ncy * p.ncx * tiles;
  }

  if (K != OpKind::kWA) {
    err = launch_path<K, L, T>(p, path, idx64, mask, split, a_narrow, stream);
    if (err != cudaSuccess) return cuda_error(kOp, "kernel launch", err);
    return ffi::Error::Success();
  }

  // ---- weight_acts launch plan ----
  const int64_t target = 4 * int64_t(nsm);  // units wanted in flight
  const int64_t Kseg = Kd, nseg = p.nseg, E = p.F * p.C_out * T_;
  const int64_t kScratchCap = workspace.bytes - 4 * E;  // bytes of partial-sum slots per launch
  if (kScratchCap < 4 * E)
    return jcn::invalid(op_name(kOp), "workspace of " + std::to_string(workspace.bytes) +
                                          " bytes is smaller than 8 * filter elements");
  const int64_t max_split = std::max<int64_t>(1, ceil_div(Kseg, 16 * int64_t(BK)));
  const bool fused = nseg > 1 && tiles >= nsm;  // each block folds all segments in registers
  int64_t nsplit = 1;
  if (!fused)
    nsplit = std::clamp<int64_t>(ceil_div(target, tiles * nseg), 1, max_split);
  if (nsplit > 1 && nsplit * E * 4 > kScratchCap)
    nsplit = std::max<int64_t>(1, kScratchCap / (E * 4));
  int64_t kchunk = ceil_div(ceil_div(Kseg, nsplit), BK) * BK;
  nsplit = ceil_div(Kseg, kchunk);
  p.nsplit = nsplit;
  p.kchunk = kchunk;
  p.E = E;
  p.seg0 = 0;
  p.fused = fused ? 1 : 0;

  if (fused || (nseg == 1 && nsplit == 1)) {  // direct: the kernel writes the output
    p.units = tiles;
    err = launch_path<K, L, T>(p, path, idx64, mask, split, a_narrow, stream);
    if (err != cudaSuccess) return cuda_error(kOp, "kernel launch", err);
    return ffi::Error::Success();
  }

  // Partial sums into scratch slots [segment in group][chunk][E], G segments per launch, then an
  // ordered fold (into a float32 running sum when there is more than one group).
  const int64_t slot_bytes = nsplit * E * 4;
  const int64_t G = std::clamp<int64_t>(kScratchCap / slot_bytes, 1, nseg);
  const int64_t ngroups = ceil_div(nseg, G);
  const size_t slots_bytes = size_t(G) * size_t(slot_bytes);
  const size_t acc_bytes = ngroups > 1 ? size_t(E) * 4 : 0;
  if (int64_t(slots_bytes + acc_bytes) > workspace.bytes)  // cannot happen: G, nsplit fit the cap
    return ffi::Error::Internal("jax_convnet weight_acts (CUDA): workspace plan overflow");
  float* slots = static_cast<float*>(workspace.data);
  float* acc = ngroups > 1 ? slots + size_t(G) * size_t(nsplit) * size_t(E) : nullptr;
  p.slots = slots;
  for (int64_t gi = 0; gi < ngroups; ++gi) {
    const int64_t s0 = gi * G, gcount = std::min(G, nseg - s0);
    p.seg0 = s0;
    p.units = gcount * nsplit * tiles;
    err = launch_path<K, L, T>(p, path, idx64, mask, split, a_narrow, stream);
    if (err != cudaSuccess) return cuda_error(kOp, "kernel launch", err);
    err = launch_reduce<T>(slots, gcount, nsplit, E, acc, out, gi == 0, gi + 1 == ngroups, nsm,
                           stream);
    if (err != cudaSuccess) return cuda_error(kOp, "reduce launch", err);
  }
  return ffi::Error::Success();
}

template <OpKind K>
ffi::Error ConvImpl(cudaStream_t stream, Workspace workspace, ffi::AnyBuffer x, ffi::AnyBuffer y,
                    ffi::Result<ffi::AnyBuffer> res, jcn::ConvParams cp) {
  const std::string name = op_name(K);
  if (!jcn::is_rank4(x) || !jcn::is_rank4(y) || !jcn::is_rank4(*res))
    return jcn::invalid(name, "operands and result must have rank 4");
  const ffi::DataType dt = x.element_type();
  if (y.element_type() != dt || res->element_type() != dt)
    return jcn::invalid(name, "operands and result must share one dtype");
  if (dt == ffi::DataType::F64)
    return jcn::invalid(name, "float64 is supported on the CPU only");
  if (!jcn::supported_dtype(dt, false))
    return jcn::invalid(name, "dtype must be float32, bfloat16 or float16");
  if (cp.precision != jcn::Precision::kDefault && cp.precision != jcn::Precision::kHigh &&
      cp.precision != jcn::Precision::kHighest)
    return jcn::invalid(name, "precision must be 0, 1 or 2");

  // FA: (images, filters) -> hidden; IA: (hidden, filters) -> images; WA: (images, hidden) -> filters.
  const int64_t* xd = x.dimensions().begin();
  const int64_t* yd = y.dimensions().begin();
  const int64_t* rd = res->dimensions().begin();
  const int64_t *img_d, *fil_d, *hid_d;
  if (K == OpKind::kFA) {
    img_d = xd, fil_d = yd, hid_d = rd;
  } else if (K == OpKind::kIA) {
    hid_d = xd, fil_d = yd, img_d = rd;
  } else {
    img_d = xd, hid_d = yd, fil_d = rd;
  }
  jcn::ConvGeometry g;
  const std::string gerr = jcn::make_conv_geometry(cp, img_d, fil_d, hid_d, &g);
  if (!gerr.empty()) return jcn::invalid(name, gerr);

  // Every coordinate the kernels form must lie in (-2^30, 2^30) (see kBad in conv_common.cuh).
  const int64_t lim = kIdx32Limit;
  const int64_t dims[] = {g.batch,    g.channels, g.filters,  g.in_h,     g.in_w,
                          g.filter_h, g.filter_w, g.out_h,    g.out_w,    g.stride_h,
                          g.stride_w, g.pad_top,  g.pad_left, cp.pad_bottom, cp.pad_right};
  for (int64_t d : dims)
    if (d >= lim) return jcn::invalid(name, "a dimension, stride or padding is >= 2^30");
  if (g.in_h + cp.pad_top + cp.pad_bottom >= lim || g.in_w + cp.pad_left + cp.pad_right >= lim)
    return jcn::invalid(name, "padded image extent is >= 2^30");

  // GEMM operands (conv_ops.cuh): A = first operand, B = second operand for all three ops:
  // FA (images, filters), IA (hidden, filters), WA (images, hidden).
  const void* a = x.untyped_data();
  const void* b = y.untyped_data();
  void* out = res->untyped_data();
  const bool c01b = g.layout == Layout::kC01B;
  switch (dt) {
    case ffi::DataType::F32:
      return c01b ? run<K, Layout::kC01B, float>(stream, workspace, g, cp, a, b, out)
                  : run<K, Layout::kNHWC, float>(stream, workspace, g, cp, a, b, out);
    case ffi::DataType::BF16:
      return c01b ? run<K, Layout::kC01B, __nv_bfloat16>(stream, workspace, g, cp, a, b, out)
                  : run<K, Layout::kNHWC, __nv_bfloat16>(stream, workspace, g, cp, a, b, out);
    case ffi::DataType::F16:
      return c01b ? run<K, Layout::kC01B, __half>(stream, workspace, g, cp, a, b, out)
                  : run<K, Layout::kNHWC, __half>(stream, workspace, g, cp, a, b, out);
    default:
      return jcn::invalid(name, "unsupported dtype");
  }
}

// The custom calls' extra workspace result (the FFT path's spectra; image_acts: else the column
// buffer; weight_acts: else the partial sums): it must be a 1-d uint8 buffer.
template <OpKind K>
ffi::Error ConvImplWithWorkspace(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer y,
                                 ffi::Result<ffi::AnyBuffer> res,
                                 ffi::Result<ffi::AnyBuffer> workspace, jcn::ConvParams cp) {
  if (workspace->dimensions().size() != 1 || workspace->element_type() != ffi::DataType::U8)
    return jcn::invalid(op_name(K), "the workspace result must be a 1-d uint8 buffer");
  const Workspace ws{workspace->untyped_data(), int64_t(workspace->size_bytes())};
  return ConvImpl<K>(stream, ws, x, y, res, cp);
}

}  // namespace

#define JCN_CONV_BINDING                           \
  ffi::Ffi::Bind()                                 \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()    \
      .Arg<ffi::AnyBuffer>()                       \
      .Arg<ffi::AnyBuffer>()                       \
      .Ret<ffi::AnyBuffer>()
