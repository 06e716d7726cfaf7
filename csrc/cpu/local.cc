// CPU kernels of the locally connected family (local_filter_acts, local_image_acts,
// local_weight_acts); the math is the contract in csrc/README.md, all sizes come from
// make_local_geometry (csrc/common/local_geometry.h).
//
// A locally connected layer is one small matrix product per output position pos = (oy, ox):
// with the patch matrix P[b][k] (the K = C * fh * fw image elements under the position's filter,
// zeros where it reads padding, k ordered as the filters' rows) and the position's filters
// W[k][f]:
//   local_filter_acts:  out[b][f] = sum_k P[b][k] * W[k][f]           (k ascending)
//   local_weight_acts:  dW[k][f]  = sum_b P[b][k] * hid[b][f]         (b ascending)
//   local_image_acts:   dP[b][k]  = sum_f hid[b][f] * W[k][f]         (f ascending), then each
//     image element sums the dP entries that read it, positions in raster order.
// Operands are widened into float32 (float64 for float64) panels as they are packed, and the
// products run on the conv kernels' register-blocked micro-kernels (conv_micro_kernel.h, chosen
// for the CPU's instruction set), accumulating in that type; results are rounded once to the
// storage type. Every output element is one sum in a fixed order computed by one thread
// (threads own disjoint outputs), so results do not depend on the thread count or timing.
#include <algorithm>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "conv_micro_kernel.h"
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

constexpr int64_t kBatchBlock = 64;         // patch rows per local_filter_acts task
constexpr int64_t kRowBlock = 128;          // filter rows per local_weight_acts task
constexpr int64_t kWeightBatchBlock = 256;  // local_weight_acts packs the batch in these blocks
// local_image_acts keeps dP of a batch slice for every position: at most this many elements.
constexpr int64_t kImageScratchElements = int64_t(16) << 20;

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

// The packers widen an operand into a zero-padded panel of rows `ld` elements apart (the
// micro-kernels read whole register tiles, past the operand's edge).

// P[b][k - k0] (b in [0, nb) for images b0 + b, k in [k0, k1)): the patches, k contiguous.
template <class Io>
void pack_patches(const LocalGeometry& g, const typename Io::S* img, const int64_t* off,
                  int64_t b0, int64_t nb, int64_t k0, int64_t k1, typename Io::A* P, int64_t ld) {
  using A = typename Io::A;
  for (int64_t b = 0; b < nb; ++b) {
    const typename Io::S* src = img + (b0 + b) * g.image.n;
    A* dst = P + b * ld;
    for (int64_t k = k0; k < k1; ++k) dst[k - k0] = off[k] < 0 ? A(0) : Io::load(src[off[k]]);
    std::fill(dst + (k1 - k0), dst + ld, A(0));
  }
}

// PT[k - k0][b]: the patches transposed, the batch contiguous.
template <class Io>
void pack_patches_t(const LocalGeometry& g, const typename Io::S* img, const int64_t* off,
                    int64_t b0, int64_t nb, int64_t k0, int64_t k1, typename Io::A* PT,
                    int64_t ld) {
  using A = typename Io::A;
  for (int64_t k = k0; k < k1; ++k) {
    A* dst = PT + (k - k0) * ld;
    if (off[k] < 0) {
      std::fill(dst, dst + ld, A(0));
      continue;
    }
    const typename Io::S* src = img + off[k] + b0 * g.image.n;
    for (int64_t b = 0; b < nb; ++b) dst[b] = Io::load(src[b * g.image.n]);
    std::fill(dst + nb, dst + ld, A(0));
  }
}

// The hidden activations of position pos for images [b0, b0 + nb): H[b][f], or transposed
// H[f][b].
template <class Io>
void pack_hidden(const LocalGeometry& g, const typename Io::S* hid, int64_t pos, int64_t b0,
                 int64_t nb, bool transposed, typename Io::A* H, int64_t ld) {
  using A = typename Io::A;
  const int64_t base = pos / g.out_w * g.hidden.y + pos % g.out_w * g.hidden.x;
  const int64_t F = g.filters;
  const int64_t rows = transposed ? F : nb;
  std::fill(H, H + rows * ld, A(0));
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t f = 0; f < F; ++f)
      H[transposed ? f * ld + b : b * ld + f] =
          Io::load(hid[base + (b0 + b) * g.hidden.n + f * g.hidden.c]);
}

// The filters of position pos: W[k][f], or transposed W[f][k].
template <class Io>
void pack_filters(const LocalGeometry& g, const typename Io::S* w, int64_t pos, bool transposed,
                  typename Io::A* out, int64_t ld) {
  using A = typename Io::A;
  const int64_t K = g.rows(), F = g.filters;
  const typename Io::S* src = w + pos * K * F;
  std::fill(out, out + (transposed ? F : K) * ld, A(0));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t f = 0; f < F; ++f)
      out[transposed ? f * ld + k : k * ld + f] = Io::load(src[k * F + f]);
}

// One product C = sum over d < depth of a_d (x) b_d through the gathered micro-kernels
// (conv_micro_kernel.h): C[m][n] = sum_d a[d * lda + m] * b[d * ldb + n] for m < rows,
// n < cols, d ascending; `a` must be readable to a multiple of the kernel's mr rows, `b` to a
// multiple of its nr columns (zero padding). emit(m, n, value) receives each element; with
// `tiles` given, the tiles are kept there across calls and `accumulate` continues their sums.
template <typename A>
class Product {
 public:
  Product(int64_t cols)
      : kernel_(kernel_for_columns(best_kernel_set<A>(), best_kernel_set<A>().gathered, cols,
                                   best_kernel_set<A>().max_nv)) {}
  int mr() const { return kernel_.mr; }
  int nr() const { return kernel_.nr; }
  int64_t tile_elements(int64_t rows, int64_t cols) const {
    return round_up(rows, kernel_.mr) * round_up(cols, kernel_.nr);
  }

  template <typename Emit>
  void run(int64_t depth, int64_t rows, int64_t cols, const A* a, int64_t lda, const A* b,
           int64_t ldb, A* tiles, bool accumulate, Emit emit) {
    const int mr = kernel_.mr, nr = kernel_.nr;
    a_rows_.resize(depth);
    b_rows_.resize(depth);
    for (int64_t r0 = 0; r0 < rows; r0 += mr) {
      for (int64_t d = 0; d < depth; ++d) a_rows_[d] = a + d * lda + r0;
      for (int64_t c0 = 0; c0 < cols; c0 += nr) {
        for (int64_t d = 0; d < depth; ++d) b_rows_[d] = b + d * ldb + c0;
        A* tile = tiles + (r0 / mr * ceil_div(cols, nr) + c0 / nr) * mr * nr;
        kernel_.fn(depth, a_rows_.data(), b_rows_.data(), tile, accumulate);
        const int64_t m_end = std::min<int64_t>(mr, rows - r0);
        const int64_t n_end = std::min<int64_t>(nr, cols - c0);
        for (int64_t m = 0; m < m_end; ++m)
          for (int64_t n = 0; n < n_end; ++n) emit(r0 + m, c0 + n, tile[m * nr + n]);
      }
    }
  }

 private:
  const Kernel<GatheredFn<A>>& kernel_;
  std::vector<const A*> a_rows_, b_rows_;
};

// ---------------------------------------------------------------------------------------------

template <class Io>
bool filter_acts(const LocalGeometry& g, const typename Io::S* img, const typename Io::S* w,
                 typename Io::S* hid, ThreadPool& pool) {
  using A = typename Io::A;
  const int64_t K = g.rows(), F = g.filters, B = g.batch;
  const int64_t batch_blocks = ceil_div(B, kBatchBlock);
  // C01B (batch contiguous): out[f][b] = sum_k W[k][f] * PT[k][b], vectors along the batch.
  // NHWC (filters contiguous): out[b][f] = sum_k PT[k][b] * W[k][f], vectors along the filters.
  const bool batch_last = g.layout == Layout::kC01B;
  return pool.run(g.positions() * batch_blocks, [&](int64_t task, int) {
    const int64_t pos = task / batch_blocks, b0 = task % batch_blocks * kBatchBlock;
    const int64_t nb = std::min(kBatchBlock, B - b0);
    const int64_t rows = batch_last ? F : nb, cols = batch_last ? nb : F;
    Product<A> product(cols);
    const int64_t ld_b = round_up(nb, batch_last ? product.nr() : product.mr());
    const int64_t ld_f = round_up(F, batch_last ? product.mr() : product.nr());
    const std::vector<int64_t> off = patch_offsets(g, pos);
    std::vector<A> PT(K * ld_b), W(K * ld_f), tiles(product.tile_elements(rows, cols));
    pack_patches_t<Io>(g, img, off.data(), b0, nb, 0, K, PT.data(), ld_b);
    pack_filters<Io>(g, w, pos, false, W.data(), ld_f);
    typename Io::S* out = hid + pos / g.out_w * g.hidden.y + pos % g.out_w * g.hidden.x +
                          b0 * g.hidden.n;
    if (batch_last)
      product.run(K, F, nb, W.data(), ld_f, PT.data(), ld_b, tiles.data(), false,
                  [&](int64_t f, int64_t b, A v) {
                    out[b * g.hidden.n + f * g.hidden.c] = Io::store(v);
                  });
    else
      product.run(K, nb, F, PT.data(), ld_b, W.data(), ld_f, tiles.data(), false,
                  [&](int64_t b, int64_t f, A v) {
                    out[b * g.hidden.n + f * g.hidden.c] = Io::store(v);
                  });
  });
}

template <class Io>
bool weight_acts(const LocalGeometry& g, const typename Io::S* img, const typename Io::S* hid,
                 typename Io::S* w, ThreadPool& pool) {
  using A = typename Io::A;
  const int64_t K = g.rows(), F = g.filters, B = g.batch;
  const int64_t row_blocks = ceil_div(K, kRowBlock);
  // dW[k][f] = sum_b P[b][k] * H[b][f], b ascending: the micro-kernel's tiles carry the sums
  // across the batch blocks.
  return pool.run(g.positions() * row_blocks, [&](int64_t task, int) {
    const int64_t pos = task / row_blocks, k0 = task % row_blocks * kRowBlock;
    const int64_t kn = std::min(kRowBlock, K - k0);
    Product<A> product(F);
    const int64_t ld_k = round_up(kn, product.mr()), ld_f = round_up(F, product.nr());
    const std::vector<int64_t> off = patch_offsets(g, pos);
    const int64_t nb_max = std::min(kWeightBatchBlock, B);
    std::vector<A> P(nb_max * ld_k), H(nb_max * ld_f), tiles(product.tile_elements(kn, F));
    typename Io::S* dst = w + (pos * K + k0) * F;
    for (int64_t b0 = 0; b0 < B; b0 += kWeightBatchBlock) {
      const int64_t nb = std::min(kWeightBatchBlock, B - b0);
      const bool last = b0 + nb == B;
      pack_patches<Io>(g, img, off.data(), b0, nb, k0, k0 + kn, P.data(), ld_k);
      pack_hidden<Io>(g, hid, pos, b0, nb, false, H.data(), ld_f);
      product.run(nb, kn, F, P.data(), ld_k, H.data(), ld_f, tiles.data(), b0 > 0,
                  [&](int64_t k, int64_t f, A v) {
                    if (last) dst[k * F + f] = Io::store(v);
                  });
    }
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
    // dP[pos][b][k] = sum_f H[f][b] * W[f][k], f ascending.
    bool ok = pool.run(positions, [&](int64_t pos, int) {
      Product<A> product(K);
      const int64_t ld_b = round_up(nb, product.mr()), ld_k = round_up(K, product.nr());
      std::vector<A> HT(F * ld_b), WT(F * ld_k), tiles(product.tile_elements(nb, K));
      pack_hidden<Io>(g, hid, pos, b0, nb, true, HT.data(), ld_b);
      pack_filters<Io>(g, w, pos, true, WT.data(), ld_k);
      A* d = dP.data() + pos * nb * K;
      product.run(F, nb, K, HT.data(), ld_b, WT.data(), ld_k, tiles.data(), false,
                  [&](int64_t b, int64_t k, A v) { d[b * K + k] = v; });
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
  if (!isa_cap().error.empty()) return invalid(name, isa_cap().error);
  // Ranks: images and hidden 4, filters 6.
  const size_t rank_a = 4;
  const size_t rank_b = op == LocalOp::kWeightActs ? 4 : 6;
  const size_t rank_out = op == LocalOp::kWeightActs ? 6 : 4;
  if (a.dimensions().size() != rank_a || b.dimensions().size() != rank_b ||
      out->dimensions().size() != rank_out)
    return invalid(name, "images and hidden activations must have rank 4, filters rank 6");
  ffi::Error checked = check_one_dtype(name, {&a, &b, &*out}, /*allow_f64=*/true);
  if (checked.failure()) return checked;
  const ffi::DataType dtype = a.element_type();

  const int64_t* da = &a.dimensions()[0];
  const int64_t* db = &b.dimensions()[0];
  const int64_t* dout = &out->dimensions()[0];
  const int64_t *images = da, *filters = db, *hidden = dout;
  if (op == LocalOp::kImageActs) images = dout, hidden = da;
  if (op == LocalOp::kWeightActs) filters = dout, hidden = db;
  LocalGeometry g;
  const std::string error = make_local_geometry(params, images, filters, hidden, &g);
  if (!error.empty()) return invalid(name, error);

  const void* pa = a.untyped_data();
  const void* pb = b.untyped_data();
  void* po = out->untyped_data();
  return run_guarded(name, [&] {
    switch (dtype) {
      case ffi::DataType::F32: return compute<F32>(op, g, pa, pb, po);
      case ffi::DataType::F64: return compute<F64>(op, g, pa, pb, po);
      case ffi::DataType::BF16: return compute<BF16>(op, g, pa, pb, po);
      default: return compute<F16>(op, g, pa, pb, po);
    }
  });
}

// The handler of one op; operands and result as in compute().
template <LocalOp op>
ffi::Error local_op(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                    ConvParams params) {
  return local_handler(op, a, b, out, params);
}

}  // namespace
}  // namespace jax_convnet::cpu

// Bindings from the signature of local_op (csrc/common/ffi_common.h).
XLA_FFI_DEFINE_HANDLER_SYMBOL(LocalFilterActsCpu,
                              jax_convnet::cpu::local_op<jax_convnet::cpu::LocalOp::kFilterActs>);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LocalImageActsCpu,
                              jax_convnet::cpu::local_op<jax_convnet::cpu::LocalOp::kImageActs>);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LocalWeightActsCpu,
                              jax_convnet::cpu::local_op<jax_convnet::cpu::LocalOp::kWeightActs>);
