// The locally connected family on CUDA: local_filter_acts, local_image_acts, local_weight_acts
// (see csrc/README.md, "Locally connected"; sizes from csrc/common/local_geometry.h).
//
// Each op is a batch of small matrix products C_z[m][n] = sum_r A_z[m][r] * B_z[r][n], one per
// "problem" z, computed by one tiled kernel (local_gemm_kernel):
//   local_filter_acts  z = output position, m = batch, n = filter, r = filter row k:
//                      A = the position's patches (zeros in padding), B = its filters.
//   local_weight_acts  z = output position, m = filter row k, n = filter, r = batch:
//                      A = patches (transposed), B = the position's hidden activations.
//   local_image_acts   z = image pixel, m = batch, n = channel, r = (position, filter) over the
//                      positions whose filters read the pixel (raster order), filters ascending:
//                      A = hidden activations, B = the filter entries that read the pixel.
// So local_image_acts gathers (no scatter, no atomics, no workspace). Every element of A and B
// is addressed as a row part plus a column part (int64 offsets), one of which may be -1 for
// "zero" (padding, or past the tile's edge); the kernel keeps the parts of a tile (the r parts of
// kRChunk reduction steps) in shared memory, so the index arithmetic per loaded element is one
// add. Global loads of the next stage overlap the products of the current one.
//
// Operands are widened to float32 and every product is an FFMA into a float32 accumulator,
// r ascending, for every dtype and precision (float32 accuracy): each output is one sum in a
// fixed order computed by one thread, so results are bitwise reproducible. One output element
// is rounded once to the storage type.
//
// Graph-safe: no allocation, no synchronisation, no host access to device data; one launch per
// call on the given stream. Offsets are 64-bit; tiles are visited by a grid-stride loop (any
// count).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "ffi_common.h"
#include "local_geometry.h"
#include "targets.h"

namespace ffi = xla::ffi;

namespace {

namespace jcn = jax_convnet;

// Tile: BM x BN outputs per block, BR reduction steps per shared-memory stage; each thread owns
// TM x TN outputs (TM consecutive m, TN consecutive n).
constexpr int kBM = 32, kBN = 32, kBR = 32, kTM = 4, kTN = 2;
constexpr int kThreads = (kBM / kTM) * (kBN / kTN);
// The r parts of A's and B's offsets are computed for kRChunk reduction steps at a time, one
// per thread (their index arithmetic has divisions).
constexpr int kRChunk = kThreads;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
  static __device__ __forceinline__ float zero() { return 0.0f; }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ __nv_bfloat16 zero() { return __ushort_as_bfloat16(0); }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ __half zero() { return __ushort_as_half(0); }
};

// Filter rows per position, K = C * fh * fw.
__host__ __device__ __forceinline__ int64_t rows(const jcn::LocalGeometry& g) {
  return g.channels * g.filter_h * g.filter_w;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Image offset (batch 0) of filter row k at a position whose window starts at (y0, x0), or -1
// where the filter reads padding.
__device__ __forceinline__ int64_t patch_offset(const jcn::LocalGeometry& g, int64_t y0,
                                                int64_t x0, int64_t k) {
  int64_t c, i, j;
  if (g.layout == jcn::Layout::kC01B) {  // k = (c * fh + i) * fw + j
    const int64_t taps = g.filter_h * g.filter_w;
    c = k / taps;
    const int64_t t = k - c * taps;
    i = t / g.filter_w;
    j = t - i * g.filter_w;
  } else {  // k = (i * fw + j) * C + c
    const int64_t t = k / g.channels;
    c = k - t * g.channels;
    i = t / g.filter_w;
    j = t - i * g.filter_w;
  }
  const int64_t y = y0 + i, x = x0 + j;
  if (y < 0 || y >= g.in_h || x < 0 || x >= g.in_w) return -1;
  return c * g.image.c + y * g.image.y + x * g.image.x;
}

// ------------------------------------------------------------------------------------------------
// The three ops as problems of the tiled kernel. Each gives, for problem z: its reduction length,
// the row / column parts of A's and B's offsets, and the output offset.

struct Problem {
  int64_t y, x;        // output position (filter / weight acts) or image pixel (image acts)
  int64_t y0, x0;      // window origin (filter / weight acts); first position (image acts)
  int64_t nx;          // image acts: positions per row of the range
  int64_t r;           // reduction length
  int64_t base;        // position: its filters' first element; pixel: its image offset
  int64_t hidden;      // position: its hidden offset (batch 0, filter 0)
};

template <bool kC01B>
struct FilterActsOp {
  // A (m = b, r = k), B (r = k, n = f), C (m = b, n = f).
  static constexpr bool kAMFast = kC01B, kBNFast = true, kStoreMFast = kC01B;
  jcn::LocalGeometry g;
  __device__ int64_t problems() const { return g.out_h * g.out_w; }
  __device__ int64_t M() const { return g.batch; }
  __device__ int64_t N() const { return g.filters; }
  __device__ Problem problem(int64_t z) const {
    Problem p;
    p.y = z / g.out_w;
    p.x = z - p.y * g.out_w;
    p.y0 = p.y * g.stride_h - g.pad_top;
    p.x0 = p.x * g.stride_w - g.pad_left;
    p.nx = 0;
    p.r = rows(g);
    p.base = z * rows(g) * g.filters;
    p.hidden = p.y * g.hidden.y + p.x * g.hidden.x;
    return p;
  }
  __device__ int64_t a_row(const Problem&, int64_t m) const { return m * g.image.n; }
  __device__ int64_t b_col(const Problem&, int64_t n) const { return n; }
  __device__ void r_parts(const Problem& p, int64_t r, int64_t* a, int64_t* b) const {
    *a = patch_offset(g, p.y0, p.x0, r);
    *b = p.base + r * g.filters;
  }
  __device__ int64_t out(const Problem& p, int64_t m, int64_t n) const {
    return p.hidden + m * g.hidden.n + n * g.hidden.c;
  }
};

template <bool kC01B>
struct WeightActsOp {
  // A (m = k, r = b), B (r = b, n = f), C (m = k, n = f).
  static constexpr bool kAMFast = !kC01B, kBNFast = !kC01B, kStoreMFast = false;
  jcn::LocalGeometry g;
  __device__ int64_t problems() const { return g.out_h * g.out_w; }
  __device__ int64_t M() const { return rows(g); }
  __device__ int64_t N() const { return g.filters; }
  __device__ Problem problem(int64_t z) const {
    FilterActsOp<kC01B> f{g};
    Problem p = f.problem(z);
    p.r = g.batch;
    return p;
  }
  __device__ int64_t a_row(const Problem& p, int64_t m) const {
    return patch_offset(g, p.y0, p.x0, m);
  }
  __device__ int64_t b_col(const Problem&, int64_t n) const { return n * g.hidden.c; }
  __device__ void r_parts(const Problem& p, int64_t r, int64_t* a, int64_t* b) const {
    *a = r * g.image.n;
    *b = p.hidden + r * g.hidden.n;
  }
  __device__ int64_t out(const Problem& p, int64_t m, int64_t n) const {
    return p.base + m * g.filters + n;
  }
};

template <bool kC01B>
struct ImageActsOp {
  // A (m = b, r = (position, f)) from the hidden activations, B (r, n = c) from the filters,
  // C (m = b, n = c).
  static constexpr bool kAMFast = kC01B, kBNFast = false, kStoreMFast = kC01B;
  jcn::LocalGeometry g;
  __device__ int64_t problems() const { return g.in_h * g.in_w; }
  __device__ int64_t M() const { return g.batch; }
  __device__ int64_t N() const { return g.channels; }
  __device__ Problem problem(int64_t z) const {
    Problem p;
    p.y = z / g.in_w;
    p.x = z - p.y * g.in_w;
    // Positions oy whose filter rows i = y + pad_top - oy * stride_h lie in [0, filter_h).
    const int64_t ry = p.y + g.pad_top, rx = p.x + g.pad_left;
    const int64_t ny = ry - g.filter_h + 1, nx = rx - g.filter_w + 1;
    const int64_t oy0 = ny <= 0 ? 0 : (ny + g.stride_h - 1) / g.stride_h;
    const int64_t ox0 = nx <= 0 ? 0 : (nx + g.stride_w - 1) / g.stride_w;
    const int64_t oy1 = min64(g.out_h - 1, ry / g.stride_h);
    const int64_t ox1 = min64(g.out_w - 1, rx / g.stride_w);
    const int64_t rows = oy1 >= oy0 ? oy1 - oy0 + 1 : 0;
    const int64_t cols = ox1 >= ox0 ? ox1 - ox0 + 1 : 0;
    p.y0 = oy0;
    p.x0 = ox0;
    p.nx = cols;
    p.r = rows * cols * g.filters;
    p.base = p.y * g.image.y + p.x * g.image.x;
    p.hidden = 0;
    return p;
  }
  __device__ int64_t a_row(const Problem&, int64_t m) const { return m * g.hidden.n; }
  __device__ int64_t b_col(const Problem&, int64_t n) const { return n * g.k_c * g.filters; }
  __device__ void r_parts(const Problem& p, int64_t r, int64_t* a, int64_t* b) const {
    const int64_t t = r / g.filters, f = r - t * g.filters;
    const int64_t ty = t / p.nx;
    const int64_t oy = p.y0 + ty, ox = p.x0 + (t - ty * p.nx);
    const int64_t i = p.y + g.pad_top - oy * g.stride_h, j = p.x + g.pad_left - ox * g.stride_w;
    *a = oy * g.hidden.y + ox * g.hidden.x + f * g.hidden.c;
    *b = ((oy * g.out_w + ox) * rows(g) + i * g.k_i + j * g.k_j) * g.filters + f;
  }
  __device__ int64_t out(const Problem& p, int64_t m, int64_t n) const {
    return p.base + m * g.image.n + n * g.image.c;
  }
};

// ------------------------------------------------------------------------------------------------
// The tiled kernel. A tile's m and n parts are computed once per tile, the r parts for kRChunk
// reduction steps at a time (double-buffered: a chunk's parts are written one chunk ahead); an
// element whose row or column part is -1 is zero. The stages are pipelined through registers:
// each thread loads its elements of stage s + 1 from global memory before it computes stage s
// from shared memory.

constexpr int kALoads = kBR * kBM / kThreads, kBLoads = kBR * kBN / kThreads;

template <typename T, class Op>
__global__ void __launch_bounds__(kThreads)
    local_gemm_kernel(Op op, const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c,
                      int64_t m_tiles, int64_t n_tiles, int64_t tiles) {
  __shared__ __align__(16) float as[kBR][kBM + 4];
  __shared__ __align__(16) float bs[kBR][kBN + 2];
  __shared__ int64_t a_m[kBM], b_n[kBN], a_r[2][kRChunk], b_r[2][kRChunk];
  const int tid = threadIdx.x;
  // Output coordinates of this thread in the tile: the store's contiguous dimension varies
  // fastest across threads.
  const int tm = Op::kStoreMFast ? tid % (kBM / kTM) : tid / (kBN / kTN);
  const int tn = Op::kStoreMFast ? tid / (kBM / kTM) : tid % (kBN / kTN);
  const int64_t M = op.M(), N = op.N();
  // The (r, m) / (r, n) element of a stage that load i of this thread takes: consecutive threads
  // take consecutive elements along the operand's contiguous dimension.
  auto a_elem = [&](int i, int* r, int* m) {
    const int e = tid + i * kThreads;
    *m = Op::kAMFast ? e % kBM : e / kBR;
    *r = Op::kAMFast ? e / kBM : e % kBR;
  };
  auto b_elem = [&](int i, int* r, int* n) {
    const int e = tid + i * kThreads;
    *n = Op::kBNFast ? e % kBN : e / kBR;
    *r = Op::kBNFast ? e / kBN : e % kBR;
  };

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t z = tile / (m_tiles * n_tiles);
    const int64_t mn = tile - z * (m_tiles * n_tiles);
    const int64_t m0 = mn / n_tiles * kBM, n0 = (mn % n_tiles) * kBN;
    const Problem p = op.problem(z);
    const int64_t stages = (p.r + kBR - 1) / kBR;
    // r parts of chunk q (reduction steps [q * kRChunk, (q + 1) * kRChunk)) into buffer q % 2.
    auto r_chunk = [&](int64_t q) {
      const int64_t r = q * kRChunk + tid;
      int64_t ar = -1, br = -1;
      if (r < p.r) op.r_parts(p, r, &ar, &br);
      a_r[q & 1][tid] = ar;
      b_r[q & 1][tid] = br;
    };
    T ra[kALoads], rb[kBLoads];
    auto load_stage = [&](int64_t s) {  // stage s's elements into registers
      const int q = static_cast<int>((s * kBR / kRChunk) & 1);
      const int rc = static_cast<int>(s * kBR % kRChunk);
#pragma unroll
      for (int i = 0; i < kALoads; ++i) {
        int r, m;
        a_elem(i, &r, &m);
        const int64_t row = a_m[m], col = a_r[q][rc + r];
        // A row part of -1 with a valid r (padding) reads zero; a dead r reads zero in A and B.
        ra[i] = row >= 0 && col >= 0 ? a[row + col] : Cvt<T>::zero();
      }
#pragma unroll
      for (int i = 0; i < kBLoads; ++i) {
        int r, n;
        b_elem(i, &r, &n);
        const int64_t col = b_n[n], row = b_r[q][rc + r];
        rb[i] = row >= 0 && col >= 0 ? b[row + col] : Cvt<T>::zero();
      }
    };

    __syncthreads();  // the previous tile is done with the shared tables
    if (tid < kBM) a_m[tid] = m0 + tid < M ? op.a_row(p, m0 + tid) : -1;
    if (tid < kBN) b_n[tid] = n0 + tid < N ? op.b_col(p, n0 + tid) : -1;
    r_chunk(0);
    __syncthreads();
    if (stages > 0) load_stage(0);

    float acc[kTM][kTN];
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = 0.0f;

    for (int64_t s = 0; s < stages; ++s) {
      __syncthreads();  // everyone is done computing stage s - 1 from the tiles
#pragma unroll
      for (int i = 0; i < kALoads; ++i) {
        int r, m;
        a_elem(i, &r, &m);
        as[r][m] = Cvt<T>::load(ra[i]);
      }
#pragma unroll
      for (int i = 0; i < kBLoads; ++i) {
        int r, n;
        b_elem(i, &r, &n);
        bs[r][n] = Cvt<T>::load(rb[i]);
      }
      // The next chunk's r parts, one chunk ahead: its buffer was last read by stage s's loads,
      // issued before the barrier above; it is first read by the loads of that chunk's first
      // stage, issued after the barrier below.
      if (s * kBR % kRChunk == 0 && (s * kBR / kRChunk + 1) * kRChunk < p.r)
        r_chunk(s * kBR / kRChunk + 1);
      __syncthreads();
      if (s + 1 < stages) load_stage(s + 1);  // in flight while stage s is computed
#pragma unroll
      for (int r = 0; r < kBR; ++r) {
        const float4 av = *reinterpret_cast<const float4*>(&as[r][tm * kTM]);
        const float2 bv = *reinterpret_cast<const float2*>(&bs[r][tn * kTN]);
        const float am[kTM] = {av.x, av.y, av.z, av.w};
        const float bn[kTN] = {bv.x, bv.y};
#pragma unroll
        for (int i = 0; i < kTM; ++i)
#pragma unroll
          for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(am[i], bn[j], acc[i][j]);
      }
    }

#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        const int64_t m = m0 + tm * kTM + i, n = n0 + tn * kTN + j;
        if (m < M && n < N) c[op.out(p, m, n)] = Cvt<T>::store(acc[i][j]);
      }
  }
}
static_assert(kTM == 4 && kTN == 2, "the inner loop reads float4 / float2 from shared memory");
static_assert(kThreads >= kBM && kThreads >= kBN, "the m and n tables fill in one pass");
static_assert(kRChunk == kThreads && kRChunk % kBR == 0, "r tables: one entry per thread");
static_assert(kALoads * kThreads == kBR * kBM && kBLoads * kThreads == kBR * kBN,
              "every thread loads the same number of elements per stage");

enum class LocalOp { kFilterActs, kImageActs, kWeightActs };

const char* op_name(LocalOp op) {
  switch (op) {
    case LocalOp::kFilterActs: return "local_filter_acts";
    case LocalOp::kImageActs: return "local_image_acts";
    default: return "local_weight_acts";
  }
}

template <typename T, class Op>
void launch(cudaStream_t stream, const Op& op, int64_t problems, int64_t M, int64_t N,
            const void* a, const void* b, void* c) {
  const int64_t m_tiles = (M + kBM - 1) / kBM, n_tiles = (N + kBN - 1) / kBN;
  const int64_t tiles = problems * m_tiles * n_tiles;
  const int64_t blocks = tiles < kMaxBlocks ? tiles : kMaxBlocks;
  local_gemm_kernel<T, Op><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      op, static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(c), m_tiles,
      n_tiles, tiles);
}

template <typename T, bool kC01B>
void run_layout(cudaStream_t stream, LocalOp op, const jcn::LocalGeometry& g, const void* a,
                const void* b, void* c) {
  switch (op) {
    case LocalOp::kFilterActs:
      return launch<T>(stream, FilterActsOp<kC01B>{g}, g.positions(), g.batch, g.filters, a, b,
                       c);
    case LocalOp::kWeightActs:
      return launch<T>(stream, WeightActsOp<kC01B>{g}, g.positions(), rows(g), g.filters, a, b,
                       c);
    default:
      return launch<T>(stream, ImageActsOp<kC01B>{g}, g.in_h * g.in_w, g.batch, g.channels, a,
                       b, c);
  }
}

template <typename T>
void run_typed(cudaStream_t stream, LocalOp op, const jcn::LocalGeometry& g, const void* a,
               const void* b, void* c) {
  if (g.layout == jcn::Layout::kC01B)
    run_layout<T, true>(stream, op, g, a, b, c);
  else
    run_layout<T, false>(stream, op, g, a, b, c);
}

// Operands (a, b) and result: local_filter_acts (images, filters) -> hidden, local_image_acts
// (hidden, filters) -> images, local_weight_acts (images, hidden) -> filters.
ffi::Error local_handler(cudaStream_t stream, LocalOp op, ffi::AnyBuffer a, ffi::AnyBuffer b,
                         ffi::Result<ffi::AnyBuffer> out, jcn::ConvParams params) {
  const std::string name = op_name(op);
  const size_t rank_b = op == LocalOp::kWeightActs ? 4 : 6;
  const size_t rank_out = op == LocalOp::kWeightActs ? 6 : 4;
  if (a.dimensions().size() != 4 || b.dimensions().size() != rank_b ||
      out->dimensions().size() != rank_out)
    return jcn::invalid(name, "images and hidden activations must have rank 4, filters rank 6");
  const ffi::DataType dtype = a.element_type();
  if (!jcn::supported_dtype(dtype, /*allow_f64=*/false))
    return jcn::invalid(name, "dtype must be float32, bfloat16 or float16 on the GPU");
  if (b.element_type() != dtype || out->element_type() != dtype)
    return jcn::invalid(name, "operands and result must share one dtype");
  const int64_t* da = &a.dimensions()[0];
  const int64_t* db = &b.dimensions()[0];
  const int64_t* dout = &out->dimensions()[0];
  const int64_t *images = da, *filters = db, *hidden = dout;
  if (op == LocalOp::kImageActs) images = dout, hidden = da;
  if (op == LocalOp::kWeightActs) filters = dout, hidden = db;
  jcn::LocalGeometry g;
  const std::string error = jcn::make_local_geometry(params, images, filters, hidden, &g);
  if (!error.empty()) return jcn::invalid(name, error);

  const void* pa = a.untyped_data();
  const void* pb = b.untyped_data();
  void* po = out->untyped_data();
  switch (dtype) {
    case ffi::DataType::F32: run_typed<float>(stream, op, g, pa, pb, po); break;
    case ffi::DataType::BF16: run_typed<__nv_bfloat16>(stream, op, g, pa, pb, po); break;
    default: run_typed<__half>(stream, op, g, pa, pb, po); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error::Internal("jax_convnet " + name + ": kernel launch failed: " +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error LocalFilterActsImpl(cudaStream_t stream, ffi::AnyBuffer images, ffi::AnyBuffer filters,
                               ffi::Result<ffi::AnyBuffer> hidden, jcn::ConvParams params) {
  return local_handler(stream, LocalOp::kFilterActs, images, filters, hidden, params);
}

ffi::Error LocalImageActsImpl(cudaStream_t stream, ffi::AnyBuffer hidden, ffi::AnyBuffer filters,
                              ffi::Result<ffi::AnyBuffer> images, jcn::ConvParams params) {
  return local_handler(stream, LocalOp::kImageActs, hidden, filters, images, params);
}

ffi::Error LocalWeightActsImpl(cudaStream_t stream, ffi::AnyBuffer images, ffi::AnyBuffer hidden,
                               ffi::Result<ffi::AnyBuffer> filters, jcn::ConvParams params) {
  return local_handler(stream, LocalOp::kWeightActs, images, hidden, filters, params);
}

}  // namespace

#define JCN_LOCAL_CUDA_BINDING                      \
  ffi::Ffi::Bind()                                  \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()     \
      .Arg<ffi::AnyBuffer>()                        \
      .Arg<ffi::AnyBuffer>()                        \
      .Ret<ffi::AnyBuffer>()                        \
      .Attrs<jax_convnet::ConvParams>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(LocalFilterActsCuda, LocalFilterActsImpl, JCN_LOCAL_CUDA_BINDING,
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(LocalImageActsCuda, LocalImageActsImpl, JCN_LOCAL_CUDA_BINDING,
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(LocalWeightActsCuda, LocalWeightActsImpl, JCN_LOCAL_CUDA_BINDING,
                              {ffi::Traits::kCmdBufferCompatible});
