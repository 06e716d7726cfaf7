// CPU kernels of the locally connected family (local_filter_acts, local_image_acts,
// local_weight_acts); the math is the contract in csrc/README.md, all sizes come from
// make_local_geometry (csrc/common/local_geometry.h).
//
// A locally connected layer is one small matrix product per output position pos = (oy, ox):
// with the patch matrix P[b][k] (the K = C * fh * fw image elements under the position's filter,
// zeros where it reads padding, k ordered as the filters' rows) and the position's filters
// W[k][f]:
//   local_filter_acts:  out[b][f] = sum_k P[b][k] * W[k][f]           (k ascending)
//   local_weight_acts:  dW[k][f]  = sum_b P[b][k] * hid[b][f]         (b ascending within
//                       blocks of 256, the blocks' sums added in order)
//   local_image_acts:   dP[b][k]  = sum_f hid[b][f] * W[k][f]         (f ascending), then each
//     image element sums the dP entries that read it, positions in raster order.
// Operands are widened into float32 (float64 for float64) panels as they are packed, products
// are accumulated in that type and rounded once to the storage type. Every output element is
// one sum in a fixed order computed by one thread (threads own disjoint outputs), so results do
// not depend on the thread count or timing.
#include <algorithm>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "conv_numeric.h"
#include "conv_thread_pool.h"
#include "ffi_common.h"
#include "local_geometry.h"
#include "targets.h"

namespace jax_convnet::cpu {
namespace {

// Storage type S, accumulation type A and the conversions between them.
struct F32 {
  using S = float;
  using A = float;
  static A load(S v) { return v; }
  static S store(A v) { return v; }
};
struct F64 {
  using S = double;
  using A = double;
  static A load(S v) { return v; }
  static S store(A v) { return v; }
};
struct BF16 {
  using S = uint16_t;
  using A = float;
  static A load(S v) { return bf16_to_float(v); }
  static S store(A v) { return float_to_bf16(v); }
};
struct F16 {
  using S = uint16_t;
  using A = float;
  static A load(S v) { return f16_to_float(v); }
  static S store(A v) { return float_to_f16(v); }
};

constexpr int64_t kBatchBlock = 64;  // patch rows packed at a time
constexpr int64_t kRowBlock = 128;   // filter rows per local_weight_acts task
constexpr int64_t kWeightBatchBlock = 256;  // local_weight_acts sums the batch in these blocks
constexpr int kRows = 4;             // rows of a register tile
constexpr int64_t kCols = 64;        // columns of a register tile (a run of filters)
// local_image_acts keeps dP of a batch slice for every position: at most this many elements.
constexpr int64_t kImageScratchElements = int64_t(16) << 20;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Offset in an image of batch 0 of every filter row k at position pos, or -1 where the filter
// reads padding.
std::vector<int64_t> patch_offsets(const LocalGeometry& g, int64_t pos) {
  const int64_t K = g.rows();
  const int64_t y0 = pos / g.out_w * g.stride_h - g.pad_top;
  const int64_t x0 = pos % g.out_w * g.stride_w - g.pad_left;
  std::vector<int64_t> off(K, -1);
  for (int64_t c = 0; c < g.channels; ++c)
    for (int64_t i = 0; i < g.filter_h; ++i)
      for (int64_t j = 0; j < g.filter_w; ++j) {
        const int64_t y = y0 + i, x = x0 + j;
        if (y >= 0 && y < g.in_h && x >= 0 && x < g.in_w)
          off[c * g.k_c + i * g.k_i + j * g.k_j] = c * g.image.c + y * g.image.y + x * g.image.x;
      }
  return off;
}

// P[b][k - k0] for b in [b0, b0 + nb), k in [k0, k1): the patches, widened.
template <class Io>
void pack_patches(const LocalGeometry& g, const typename Io::S* img, const int64_t* off,
                  int64_t b0, int64_t nb, int64_t k0, int64_t k1, typename Io::A* P) {
  using A = typename Io::A;
  const int64_t kn = k1 - k0;
  if (g.image.n == 1) {  // C01B: the batch is contiguous, read along it
    for (int64_t k = k0; k < k1; ++k) {
      A* dst = P + (k - k0);
      if (off[k] < 0) {
        for (int64_t b = 0; b < nb; ++b) dst[b * kn] = A(0);
        continue;
      }
      const typename Io::S* src = img + b0 + off[k];
      for (int64_t b = 0; b < nb; ++b) dst[b * kn] = Io::load(src[b]);
    }
    return;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const typename Io::S* src = img + (b0 + b) * g.image.n;
    A* dst = P + b * kn;
    for (int64_t k = k0; k < k1; ++k) dst[k - k0] = off[k] < 0 ? A(0) : Io::load(src[off[k]]);
  }
}

// PT[k - k0][b] for k in [k0, k1), b in [b0, b0 + nb): the patches transposed (batch
// contiguous), widened.
template <class Io>
void pack_patches_t(const LocalGeometry& g, const typename Io::S* img, const int64_t* off,
                    int64_t b0, int64_t nb, int64_t k0, int64_t k1, typename Io::A* PT) {
  using A = typename Io::A;
  if (g.image.n == 1) {  // C01B: runs along the batch are contiguous in the images
    for (int64_t k = k0; k < k1; ++k) {
      A* dst = PT + (k - k0) * nb;
      if (off[k] < 0) {
        std::fill(dst, dst + nb, A(0));
        continue;
      }
      const typename Io::S* src = img + b0 + off[k];
      for (int64_t b = 0; b < nb; ++b) dst[b] = Io::load(src[b]);
    }
    return;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const typename Io::S* src = img + (b0 + b) * g.image.n;
    for (int64_t k = k0; k < k1; ++k)
      PT[(k - k0) * nb + b] = off[k] < 0 ? A(0) : Io::load(src[off[k]]);
  }
}

// H[b][f] for b in [b0, b0 + nb): the hidden activations of position pos, widened.
template <class Io>
void pack_hidden(const LocalGeometry& g, const typename Io::S* hid, int64_t pos, int64_t b0,
                 int64_t nb, typename Io::A* H) {
  const int64_t base = pos / g.out_w * g.hidden.y + pos % g.out_w * g.hidden.x;
  const int64_t F = g.filters;
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t f = 0; f < F; ++f)
      H[b * F + f] = Io::load(hid[base + (b0 + b) * g.hidden.n + f * g.hidden.c]);
}

// The filters of position pos, widened: W[k][f] (or, transposed, W[f][k]).
template <class Io>
void pack_filters(const LocalGeometry& g, const typename Io::S* w, int64_t pos, bool transposed,
                  typename Io::A* out) {
  const int64_t K = g.rows(), F = g.filters;
  const typename Io::S* src = w + pos * K * F;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t f = 0; f < F; ++f)
      out[transposed ? f * K + k : k * F + f] = Io::load(src[k * F + f]);
}

// acc[r][t] = sum over d < depth (ascending) of a[r][d] * b[d][t], for R rows and n <= kCols
// columns; a rows are lda apart, b rows ldb apart.
template <int R, typename A>
inline void tile_product(const A* a, int64_t lda, const A* b, int64_t ldb, int64_t depth,
                         int64_t n, A (*acc)[kCols]) {
  for (int r = 0; r < R; ++r)
    for (int64_t t = 0; t < n; ++t) acc[r][t] = A(0);
  for (int64_t d = 0; d < depth; ++d) {
    const A* brow = b + d * ldb;
    for (int r = 0; r < R; ++r) {
      const A av = a[r * lda + d];
      for (int64_t t = 0; t < n; ++t) acc[r][t] += av * brow[t];
    }
  }
}

template <typename A>
inline void tile_product_rows(int rows, const A* a, int64_t lda, const A* b, int64_t ldb,
                              int64_t depth, int64_t n, A (*acc)[kCols]) {
  switch (rows) {
    case 4: return tile_product<4>(a, lda, b, ldb, depth, n, acc);
    case 3: return tile_product<3>(a, lda, b, ldb, depth, n, acc);
    case 2: return tile_product<2>(a, lda, b, ldb, depth, n, acc);
    default: return tile_product<1>(a, lda, b, ldb, depth, n, acc);
  }
}

// ---------------------------------------------------------------------------------------------

template <class Io>
bool filter_acts(const LocalGeometry& g, const typename Io::S* img, const typename Io::S* w,
                 typename Io::S* hid, ThreadPool& pool) {
  using A = typename Io::A;
  const int64_t K = g.rows(), F = g.filters, B = g.batch;
  const int64_t batch_blocks = ceil_div(B, kBatchBlock);
  // C01B (batch contiguous): out[f][b] = sum_k WT[f][k] * PT[k][b], vectors along the batch.
  // NHWC (filters contiguous): out[b][f] = sum_k P[b][k] * W[k][f], vectors along the filters.
  const bool batch_last = g.layout == Layout::kC01B;
  return pool.run(g.positions() * batch_blocks, [&](int64_t task, int) {
    const int64_t pos = task / batch_blocks, b0 = task % batch_blocks * kBatchBlock;
    const int64_t nb = std::min(kBatchBlock, B - b0);
    const std::vector<int64_t> off = patch_offsets(g, pos);
    std::vector<A> P(nb * K), W(K * F);
    const int64_t base = pos / g.out_w * g.hidden.y + pos % g.out_w * g.hidden.x;
    A acc[kRows][kCols];
    if (batch_last) {
      pack_patches_t<Io>(g, img, off.data(), b0, nb, 0, K, P.data());
      pack_filters<Io>(g, w, pos, true, W.data());
      for (int64_t f = 0; f < F; f += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, F - f));
        for (int64_t c0 = 0; c0 < nb; c0 += kCols) {
          const int64_t n = std::min(kCols, nb - c0);
          tile_product_rows(rows, W.data() + f * K, K, P.data() + c0, nb, K, n, acc);
          for (int r = 0; r < rows; ++r) {
            typename Io::S* dst = hid + base + (f + r) * g.hidden.c + (b0 + c0) * g.hidden.n;
            for (int64_t t = 0; t < n; ++t) dst[t * g.hidden.n] = Io::store(acc[r][t]);
          }
        }
      }
      return;
    }
    pack_patches<Io>(g, img, off.data(), b0, nb, 0, K, P.data());
    pack_filters<Io>(g, w, pos, false, W.data());
    for (int64_t b = 0; b < nb; b += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, nb - b));
      for (int64_t f0 = 0; f0 < F; f0 += kCols) {
        const int64_t n = std::min(kCols, F - f0);
        tile_product_rows(rows, P.data() + b * K, K, W.data() + f0, F, K, n, acc);
        for (int r = 0; r < rows; ++r) {
          typename Io::S* dst = hid + base + (b0 + b + r) * g.hidden.n + f0 * g.hidden.c;
          for (int64_t t = 0; t < n; ++t) dst[t * g.hidden.c] = Io::store(acc[r][t]);
        }
      }
    }
  });
}

template <class Io>
bool weight_acts(const LocalGeometry& g, const typename Io::S* img, const typename Io::S* hid,
                 typename Io::S* w, ThreadPool& pool) {
  using A = typename Io::A;
  const int64_t K = g.rows(), F = g.filters, B = g.batch;
  const int64_t row_blocks = ceil_div(K, kRowBlock);
  return pool.run(g.positions() * row_blocks, [&](int64_t task, int) {
    const int64_t pos = task / row_blocks, k0 = task % row_blocks * kRowBlock;
    const int64_t kn = std::min(kRowBlock, K - k0);
    const std::vector<int64_t> off = patch_offsets(g, pos);
    const int64_t nb_max = std::min(kWeightBatchBlock, B);
    // Patches transposed (PT[k][b]: the batch is the depth of the products), hidden H[b][f].
    std::vector<A> PT(kn * nb_max), H(nb_max * F), sums(kn * F, A(0));
    A acc[kRows][kCols];
    // sums[k][f] = sum over batch blocks (in order) of sum over the block's b (ascending) of
    // P[b][k] * H[b][f].
    for (int64_t b0 = 0; b0 < B; b0 += kWeightBatchBlock) {
      const int64_t nb = std::min(kWeightBatchBlock, B - b0);
      pack_patches_t<Io>(g, img, off.data(), b0, nb, k0, k0 + kn, PT.data());
      pack_hidden<Io>(g, hid, pos, b0, nb, H.data());
      for (int64_t k = 0; k < kn; k += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, kn - k));
        for (int64_t f0 = 0; f0 < F; f0 += kCols) {
          const int64_t n = std::min(kCols, F - f0);
          tile_product_rows(rows, PT.data() + k * nb, nb, H.data() + f0, F, nb, n, acc);
          for (int r = 0; r < rows; ++r) {
            A* s = sums.data() + (k + r) * F + f0;
            for (int64_t t = 0; t < n; ++t) s[t] += acc[r][t];
          }
        }
      }
    }
    typename Io::S* dst = w + (pos * K + k0) * F;
    for (int64_t e = 0; e < kn * F; ++e) dst[e] = Io::store(sums[e]);
  });
}

template <class Io>
bool image_acts(const LocalGeometry& g, const typename Io::S* hid, const typename Io::S* w,
                typename Io::S* img, ThreadPool& pool) {
  using A = typename Io::A;
  const int64_t K = g.rows(), F = g.filters, B = g.batch, positions = g.positions();
  const int64_t chunk = std::clamp<int64_t>(kImageScratchElements / (positions * K), 1, B);
  std::vector<A> dP(positions * chunk * K);  // [pos][b][k] of one batch slice
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t nb = std::min(chunk, B - b0);
    // dP[pos][b][k] = sum_f hid[b][f] * W[k][f], f ascending.
    bool ok = pool.run(positions, [&](int64_t pos, int) {
      std::vector<A> Wt(F * K), H(nb * F);
      pack_filters<Io>(g, w, pos, true, Wt.data());
      pack_hidden<Io>(g, hid, pos, b0, nb, H.data());
      for (int64_t b = 0; b < nb; ++b) {
        A* d = dP.data() + (pos * nb + b) * K;
        std::fill(d, d + K, A(0));
        for (int64_t f = 0; f < F; ++f) {
          const A h = H[b * F + f];
          const A* wt = Wt.data() + f * K;
          for (int64_t k = 0; k < K; ++k) d[k] += h * wt[k];
        }
      }
    });
    if (!ok) return false;
    // Each image element sums what the positions reading it got, positions in raster order.
    const int64_t channel_blocks = ceil_div(g.channels, 16);
    ok = pool.run(nb * channel_blocks, [&](int64_t task, int) {
      const int64_t b = task / channel_blocks, c0 = task % channel_blocks * 16;
      const int64_t c1 = std::min(g.channels, c0 + 16);
      for (int64_t y = 0; y < g.in_h; ++y) {
        const int64_t ry = y + g.pad_top, ny = ry - g.filter_h + 1;
        const int64_t oy0 = ny <= 0 ? 0 : ceil_div(ny, g.stride_h);
        const int64_t oy1 = std::min(g.out_h - 1, ry / g.stride_h);
        for (int64_t x = 0; x < g.in_w; ++x) {
          const int64_t rx = x + g.pad_left, nx = rx - g.filter_w + 1;
          const int64_t ox0 = nx <= 0 ? 0 : ceil_div(nx, g.stride_w);
          const int64_t ox1 = std::min(g.out_w - 1, rx / g.stride_w);
          for (int64_t c = c0; c < c1; ++c) {
            A sum = A(0);
            for (int64_t oy = oy0; oy <= oy1; ++oy)
              for (int64_t ox = ox0; ox <= ox1; ++ox) {
                const int64_t k = c * g.k_c + (ry - oy * g.stride_h) * g.k_i +
                                  (rx - ox * g.stride_w) * g.k_j;
                sum += dP[((oy * g.out_w + ox) * nb + b) * K + k];
              }
            img[(b0 + b) * g.image.n + c * g.image.c + y * g.image.y + x * g.image.x] =
                Io::store(sum);
          }
        }
      }
    });
    if (!ok) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// FFI handlers.

enum class LocalOp { kFilterActs, kImageActs, kWeightActs };

const char* op_name(LocalOp op) {
  switch (op) {
    case LocalOp::kFilterActs: return "local_filter_acts";
    case LocalOp::kImageActs: return "local_image_acts";
    default: return "local_weight_acts";
  }
}

// Operands (a, b) and result: local_filter_acts (images, filters) -> hidden, local_image_acts
// (hidden, filters) -> images, local_weight_acts (images, hidden) -> filters.
template <class Io>
bool compute(LocalOp op, const LocalGeometry& g, const void* a, const void* b, void* out) {
  using S = typename Io::S;
  ThreadPool& pool = ThreadPool::shared();
  const S* sa = static_cast<const S*>(a);
  const S* sb = static_cast<const S*>(b);
  S* so = static_cast<S*>(out);
  switch (op) {
    case LocalOp::kFilterActs: return filter_acts<Io>(g, sa, sb, so, pool);
    case LocalOp::kImageActs: return image_acts<Io>(g, sa, sb, so, pool);
    default: return weight_acts<Io>(g, sa, sb, so, pool);
  }
}

ffi::Error local_handler(LocalOp op, ffi::AnyBuffer a, ffi::AnyBuffer b,
                         ffi::Result<ffi::AnyBuffer> out, ConvParams params) {
  const std::string name = op_name(op);
  // Ranks: images and hidden 4, filters 6.
  const size_t rank_a = 4;
  const size_t rank_b = op == LocalOp::kWeightActs ? 4 : 6;
  const size_t rank_out = op == LocalOp::kWeightActs ? 6 : 4;
  if (a.dimensions().size() != rank_a || b.dimensions().size() != rank_b ||
      out->dimensions().size() != rank_out)
    return invalid(name, "images and hidden activations must have rank 4, filters rank 6");
  const ffi::DataType dtype = a.element_type();
  if (!supported_dtype(dtype, /*allow_f64=*/true))
    return invalid(name, "dtype must be float32, bfloat16, float16 or float64");
  if (b.element_type() != dtype || out->element_type() != dtype)
    return invalid(name, "operands and result must share one dtype");

  const int64_t* da = &a.dimensions()[0];
  const int64_t* db = &b.dimensions()[0];
  const int64_t* dout = &out->dimensions()[0];
  const int64_t *images = da, *filters = db, *hidden = dout;
  if (op == LocalOp::kImageActs) images = dout, hidden = da;
  if (op == LocalOp::kWeightActs) filters = dout, hidden = db;
  LocalGeometry g;
  const std::string error = make_local_geometry(params, images, filters, hidden, &g);
  if (!error.empty()) return invalid(name, error);

  try {
    bool ok;
    const void* pa = a.untyped_data();
    const void* pb = b.untyped_data();
    void* po = out->untyped_data();
    switch (dtype) {
      case ffi::DataType::F32: ok = compute<F32>(op, g, pa, pb, po); break;
      case ffi::DataType::F64: ok = compute<F64>(op, g, pa, pb, po); break;
      case ffi::DataType::BF16: ok = compute<BF16>(op, g, pa, pb, po); break;
      default: ok = compute<F16>(op, g, pa, pb, po); break;
    }
    if (!ok) return ffi::Error::Internal("jax_convnet " + name + ": a worker thread failed");
  } catch (const std::exception& e) {
    return ffi::Error::Internal("jax_convnet " + name + ": " + e.what());
  } catch (...) {
    return ffi::Error::Internal("jax_convnet " + name + ": unknown failure");
  }
  return ffi::Error::Success();
}

ffi::Error local_filter_acts(ffi::AnyBuffer images, ffi::AnyBuffer filters,
                             ffi::Result<ffi::AnyBuffer> hidden, ConvParams params) {
  return local_handler(LocalOp::kFilterActs, images, filters, hidden, params);
}

ffi::Error local_image_acts(ffi::AnyBuffer hidden, ffi::AnyBuffer filters,
                            ffi::Result<ffi::AnyBuffer> images, ConvParams params) {
  return local_handler(LocalOp::kImageActs, hidden, filters, images, params);
}

ffi::Error local_weight_acts(ffi::AnyBuffer images, ffi::AnyBuffer hidden,
                             ffi::Result<ffi::AnyBuffer> filters, ConvParams params) {
  return local_handler(LocalOp::kWeightActs, images, hidden, filters, params);
}

}  // namespace
}  // namespace jax_convnet::cpu

#define JCN_LOCAL_BINDING                                                                       \
  ::xla::ffi::Ffi::Bind()                                                                       \
      .Arg<::xla::ffi::AnyBuffer>()                                                             \
      .Arg<::xla::ffi::AnyBuffer>()                                                             \
      .Ret<::xla::ffi::AnyBuffer>()                                                             \
      .Attrs<jax_convnet::ConvParams>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(LocalFilterActsCpu, jax_convnet::cpu::local_filter_acts,
                              JCN_LOCAL_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LocalImageActsCpu, jax_convnet::cpu::local_image_acts,
                              JCN_LOCAL_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LocalWeightActsCpu, jax_convnet::cpu::local_weight_acts,
                              JCN_LOCAL_BINDING);
