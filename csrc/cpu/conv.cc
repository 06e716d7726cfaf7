// CPU kernels of the conv family (filter_acts, image_acts, weight_acts); the math is the
// contract in csrc/README.md, all sizes come from make_conv_geometry.
//
// Every op is a matrix product computed tile by tile by a register-blocked micro-kernel
// (conv_micro_kernel.h): tile[m][n] = sum_k a_k[m] * b_k[n], a broadcast, b loaded as vectors.
// The vector side is always a dimension that is contiguous in memory, and the layouts differ
// in which one that is:
//   C01B (batch contiguous): n runs over (pixel, b); the input is packed into panels of runs
//     along the batch, the weights are the broadcast side (packed kernel).
//   NHWC (channels contiguous): n runs over output channels / filters. filter_acts and
//     image_acts read input pixels in place through row pointers (indirect kernel);
//     weight_acts reads both image and hidden rows in place (gathered kernel).
//
// filter_acts and image_acts share the gather form: out[b, q, site] sums, over the filter
// taps that can reach the site, in[b, p, source] * w(p, q, tap). image_acts is the same loop
// with the hidden activations as input and the taps running backwards; with a stride > 1 the
// sites are split into phase classes so that only the taps landing on a hidden unit are visited.
// weight_acts reduces over (b, position) in the contract's partial-sum chunks: each chunk is
// summed in a fixed sequence of blocks, and the chunk sums are added in order.
//
// Groups (cuda-convnet's numGroups) are independent convolutions side by side on slices of the
// channels and filters: every op runs them all in one pass of the thread pool, its work units
// (panels, tiles) enumerated group by group, group g reading and writing through pointers moved
// to its slices (the operands' strides are the whole tensors').
//
// Accumulation is in T (float32, or float64 for float64); bfloat16 / float16 are widened to
// float32 first and the result is rounded once. Threads (conv_thread_pool.h) each own fixed,
// disjoint output tiles, so nothing is reduced across threads and results do not depend on
// the thread count or timing.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "conv_micro_kernel.h"
#include "conv_numeric.h"
#include "conv_thread_pool.h"
#include "ffi_common.h"
#include "targets.h"

namespace jax_convnet::cpu {
namespace {

// 64-byte aligned scratch memory (panels are read as whole SIMD vectors).
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(int64_t n) { resize(n); }
  void resize(int64_t n) {
    if (n <= size_) return;
    data_.reset(static_cast<T*>(::operator new(static_cast<size_t>(n) * sizeof(T),
                                               std::align_val_t{64})));
    size_ = n;
  }
  T* data() const { return data_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete(p, std::align_val_t{64}); }
  };
  std::unique_ptr<T, Free> data_;
  int64_t size_ = 0;
};

// Copies / zeroes n elements with fixed-size moves only: packing copies many short runs, for
// which a call to memmove / memset each would cost more than the copy itself.
template <typename T>
inline void copy_short(const T* src, int64_t n, T* dst) {
  for (; n >= 8; n -= 8, src += 8, dst += 8) std::memcpy(dst, src, 8 * sizeof(T));
  if (n & 4) std::memcpy(dst, src, 4 * sizeof(T)), src += 4, dst += 4;
  if (n & 2) std::memcpy(dst, src, 2 * sizeof(T)), src += 2, dst += 2;
  if (n & 1) *dst = *src;
}

template <typename T>
inline void fill_short(T* dst, int64_t n) {
  static constexpr T kZeros[8] = {};
  for (; n >= 8; n -= 8, dst += 8) std::memcpy(dst, kZeros, sizeof kZeros);
  if (n & 4) std::memcpy(dst, kZeros, 4 * sizeof(T)), dst += 4;
  if (n & 2) std::memcpy(dst, kZeros, 2 * sizeof(T)), dst += 2;
  if (n & 1) *dst = T(0);
}

// ---------------------------------------------------------------------------------------------
// Gather form of filter_acts / image_acts.

// One spatial axis: every output coordinate ("site") reads through filter taps from a source
// coordinate of the input, or from zero padding. Sites are grouped into classes sharing the
// candidate taps worth visiting.
struct AxisMap {
  int64_t taps = 0;
  std::vector<int64_t> source;  // [site * taps + tap]: source coordinate, -1 for zero
  std::vector<std::vector<int64_t>> class_taps, class_sites;

  int64_t src(int64_t site, int64_t tap) const { return source[site * taps + tap]; }
};

// filter_acts: site o reads o*stride - pad + tap; every tap is a candidate.
AxisMap forward_axis(int64_t sites, int64_t sources, int64_t taps, int64_t stride, int64_t pad) {
  AxisMap a;
  a.taps = taps;
  a.source.assign(sites * taps, -1);
  a.class_taps.emplace_back();
  a.class_sites.emplace_back();
  for (int64_t t = 0; t < taps; ++t) a.class_taps[0].push_back(t);
  for (int64_t o = 0; o < sites; ++o) {
    a.class_sites[0].push_back(o);
    for (int64_t t = 0; t < taps; ++t) {
      int64_t s = o * stride - pad + t;
      if (s >= 0 && s < sources) a.source[o * taps + t] = s;
    }
  }
  return a;
}

// image_acts: image coordinate o receives from hidden unit u through tap t when
// u*stride - pad + t == o, so only taps t == (o + pad) mod stride can contribute: the sites of
// one residue class share those taps (residues >= taps share the empty list). Classes are
// numbered in order of first appearance.
AxisMap adjoint_axis(int64_t sites, int64_t sources, int64_t taps, int64_t stride, int64_t pad) {
  AxisMap a;
  a.taps = taps;
  a.source.assign(sites * taps, -1);
  std::vector<int64_t> residues;  // of each class
  for (int64_t o = 0; o < sites; ++o) {
    const int64_t r = std::min((o + pad) % stride, taps);
    const size_t cls = std::find(residues.begin(), residues.end(), r) - residues.begin();
    if (cls == residues.size()) {
      residues.push_back(r);
      a.class_taps.emplace_back();
      a.class_sites.emplace_back();
      for (int64_t t = r; t < taps; t += stride) a.class_taps.back().push_back(t);
    }
    a.class_sites[cls].push_back(o);
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t u = o + pad - t;
      if (u >= 0 && u % stride == 0 && u / stride < sources) a.source[o * taps + t] = u / stride;
    }
  }
  return a;
}

// out[b, q, y, x] = sum over the taps (ty, tx) of the site's classes and p < in_channels of
//   in[b, p, rows.src(y, ty), cols.src(x, tx)] * w(p, q, ty, tx).
// With groups, in_channels / out_channels are one group's, and group gr's input, output and
// weights start `gr * in_group`, `gr * out_group`, `gr * w_group` elements further.
template <typename T>
struct GatherConv {
  int64_t batch;
  const T* in;
  Strides4 in_s;
  int64_t in_channels;
  T* out;
  Strides4 out_s;
  int64_t out_channels;
  const T* w;
  int64_t w_p, w_q, w_y, w_x;
  AxisMap rows, cols;
  int64_t groups, in_group, out_group, w_group;

  T weight(int64_t gr, int64_t p, int64_t q, int64_t ty, int64_t tx) const {
    return w[gr * w_group + p * w_p + q * w_q + ty * w_y + tx * w_x];
  }
};

// One (row class, column class) pair: its sites share the candidate taps.
struct GatherGroup {
  const std::vector<int64_t>*taps_y, *taps_x, *sites_y, *sites_x;
  int64_t taps() const { return static_cast<int64_t>(taps_y->size() * taps_x->size()); }
  int64_t sites() const { return static_cast<int64_t>(sites_y->size() * sites_x->size()); }
  int64_t tap_y(int64_t t) const { return (*taps_y)[t / taps_x->size()]; }
  int64_t tap_x(int64_t t) const { return (*taps_x)[t % taps_x->size()]; }
  int64_t site_y(int64_t s) const { return (*sites_y)[s / sites_x->size()]; }
  int64_t site_x(int64_t s) const { return (*sites_x)[s % sites_x->size()]; }
};

std::vector<GatherGroup> gather_groups(const AxisMap& rows, const AxisMap& cols) {
  std::vector<GatherGroup> groups;
  for (size_t cy = 0; cy < rows.class_taps.size(); ++cy)
    for (size_t cx = 0; cx < cols.class_taps.size(); ++cx)
      groups.push_back({&rows.class_taps[cy], &cols.class_taps[cx], &rows.class_sites[cy],
                        &cols.class_sites[cx]});
  return groups;
}

// The group holding global panel `panel`, given each group's first panel.
inline size_t group_of_panel(const std::vector<int64_t>& first_panel, int64_t panel) {
  return static_cast<size_t>(std::upper_bound(first_panel.begin(), first_panel.end(), panel) -
                             first_panel.begin()) - 1;
}

// C01B: the batch is contiguous in input and output, so the vector side n runs over
// (site, b), b fastest, and the broadcast side over output channels q (packed weights).
// A column of the packed input panel is one image at one site.
struct Column {
  int64_t b, y, x;
};

// Packs the input panel b[k][j], k = (tap, p), for the columns of one panel; consecutive
// columns of one site hold consecutive images, copied as runs. Columns past cols.size() are 0.
template <typename T>
void pack_batch_last_columns(const GatherConv<T>& g, const T* in, const GatherGroup& gr,
                             const std::vector<Column>& cols, int nr, T* panel) {
  const int64_t P = g.in_channels, taps = gr.taps();
  const int64_t n_cols = static_cast<int64_t>(cols.size());
  for (int64_t j0 = 0; j0 < n_cols;) {
    const Column& c = cols[j0];
    int64_t len = 1;
    while (j0 + len < n_cols && cols[j0 + len].y == c.y && cols[j0 + len].x == c.x) ++len;
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t sy = g.rows.src(c.y, gr.tap_y(t)), sx = g.cols.src(c.x, gr.tap_x(t));
      T* dst = panel + t * P * nr + j0;
      if (sy < 0 || sx < 0) {
        for (int64_t p = 0; p < P; ++p) fill_short(dst + p * nr, len);
        continue;
      }
      const T* src = in + sy * g.in_s.y + sx * g.in_s.x + c.b;
      for (int64_t p = 0; p < P; ++p) copy_short(src + p * g.in_s.c, len, dst + p * nr);
    }
    j0 += len;
  }
  for (int64_t k = 0; k < taps * P; ++k) fill_short(panel + k * nr + n_cols, nr - n_cols);
}

// The weights of every (conv group, tap group) packed for the micro-kernels:
// [q_block][tap][p][block] with q = q_block * block + lane, zero past the last output channel.
template <typename T>
std::vector<Buffer<T>> pack_gather_weights(const GatherConv<T>& g,
                                           const std::vector<GatherGroup>& groups, int block) {
  const int64_t P = g.in_channels, Q = g.out_channels, q_blocks = ceil_div(Q, block);
  std::vector<Buffer<T>> weights;
  for (int64_t cg = 0; cg < g.groups; ++cg)
    for (const GatherGroup& gr : groups) {
      weights.emplace_back(q_blocks * gr.taps() * P * block);
      T* dst = weights.back().data();
      for (int64_t qb = 0; qb < q_blocks; ++qb)
        for (int64_t t = 0; t < gr.taps(); ++t)
          for (int64_t p = 0; p < P; ++p)
            for (int64_t q = qb * block; q < (qb + 1) * block; ++q)
              *dst++ = q < Q ? g.weight(cg, p, q, gr.tap_y(t), gr.tap_x(t)) : T(0);
    }
  return weights;
}

template <typename T>
bool run_gather_batch_last(const GatherConv<T>& g, ThreadPool& pool) {
  const auto& mk = packed_kernel_for_rows(best_kernel_set<T>(), g.out_channels);
  const int mr = mk.mr, nr = mk.nr;
  const int64_t P = g.in_channels, Q = g.out_channels, q_blocks = ceil_div(Q, mr);

  // (Tap) groups of sites sharing their taps; conv groups are `g.groups`.
  const std::vector<GatherGroup> groups = gather_groups(g.rows, g.cols);
  const int64_t n_groups = static_cast<int64_t>(groups.size());
  std::vector<int64_t> first_panel;
  int64_t panels = 0, max_depth = 0;  // panels of one conv group
  for (const GatherGroup& gr : groups) {
    first_panel.push_back(panels);
    panels += ceil_div(g.batch * gr.sites(), nr);
    max_depth = std::max(max_depth, gr.taps() * P);
  }
  const std::vector<Buffer<T>> weights = pack_gather_weights(g, groups, mr);

  // Per-thread scratch: the packed input panel, the output tile and the panel's columns.
  const int threads = pool.participants();
  std::vector<Buffer<T>> panel_buf, tile_buf;
  std::vector<std::vector<Column>> column_buf(threads);
  for (int t = 0; t < threads; ++t) {
    panel_buf.emplace_back(std::max<int64_t>(max_depth, 1) * nr);
    tile_buf.emplace_back(int64_t{mr} * nr);
    column_buf[t].reserve(nr);
  }

  // Enough tasks to even out the load; each is a run of consecutive panels (of all groups).
  const int64_t all_panels = g.groups * panels;
  const int64_t n_tasks = std::min<int64_t>(all_panels, int64_t{threads} * 8);
  return pool.run(n_tasks, [&](int64_t task, int who) {
    T* panel = panel_buf[who].data();
    T* tile = tile_buf[who].data();
    std::vector<Column>& cols = column_buf[who];
    const int64_t end = (task + 1) * all_panels / n_tasks;
    for (int64_t pa = task * all_panels / n_tasks; pa < end; ++pa) {
      const int64_t cg = pa / panels, pi = pa % panels;
      const size_t gi = group_of_panel(first_panel, pi);
      const GatherGroup& gr = groups[gi];
      const T* w_packed = weights[cg * n_groups + gi].data();
      T* out = g.out + cg * g.out_group;
      const int64_t first = (pi - first_panel[gi]) * nr;
      const int64_t n_cols = std::min<int64_t>(nr, g.batch * gr.sites() - first);
      cols.clear();
      for (int64_t idx = first; idx < first + n_cols; ++idx) {
        const int64_t site = idx / g.batch;
        cols.push_back({idx % g.batch, gr.site_y(site), gr.site_x(site)});
      }
      pack_batch_last_columns(g, g.in + cg * g.in_group, gr, cols, nr, panel);
      const int64_t depth = gr.taps() * P;
      for (int64_t qb = 0; qb < q_blocks; ++qb) {
        mk.fn(depth, w_packed + qb * depth * mr, panel, tile, false);
        const int64_t q0 = qb * mr, rows = std::min<int64_t>(mr, Q - q0);
        for (int64_t m = 0; m < rows; ++m) {
          const T* src = tile + m * nr;
          T* dst = out + (q0 + m) * g.out_s.c;
          for (int64_t j = 0; j < n_cols; ++j)
            dst[cols[j].b + cols[j].y * g.out_s.y + cols[j].x * g.out_s.x] = src[j];
        }
      }
    }
  });
}

// NHWC: channels are contiguous in input and output, so the vector side n runs over output
// channels q (packed weights) and the broadcast side over mr pixels read in place through a
// table of row pointers per tap (indirect kernel); padding taps point at a row of zeros.
template <typename T>
bool run_gather_channels_last(const GatherConv<T>& g, ThreadPool& pool) {
  const KernelSet<T>& set = best_kernel_set<T>();
  const auto& ik = kernel_for_columns(set, set.indirect, g.out_channels, set.max_nv);
  const int mr = ik.mr, nr = ik.nr;
  const int64_t P = g.in_channels, Q = g.out_channels, q_blocks = ceil_div(Q, nr);

  // (Tap) groups of sites sharing their taps; conv groups are `g.groups`.
  const std::vector<GatherGroup> groups = gather_groups(g.rows, g.cols);
  const int64_t n_groups = static_cast<int64_t>(groups.size());
  std::vector<int64_t> first_panel;
  int64_t panels = 0, max_taps = 0;  // panels of one conv group
  for (const GatherGroup& gr : groups) {
    first_panel.push_back(panels);
    panels += ceil_div(g.batch * gr.sites(), mr);
    max_taps = std::max(max_taps, gr.taps());
  }
  const std::vector<Buffer<T>> weights = pack_gather_weights(g, groups, nr);
  const std::vector<T> zeros(P, T(0));

  // Per-thread scratch: the row-pointer table [tap][mr] and the output tile.
  const int threads = pool.participants();
  std::vector<std::vector<const T*>> table_buf(threads, std::vector<const T*>(max_taps * mr));
  std::vector<std::vector<T*>> out_rows_buf(threads, std::vector<T*>(mr));
  std::vector<Buffer<T>> tile_buf;
  for (int t = 0; t < threads; ++t) tile_buf.emplace_back(int64_t{mr} * nr);

  const int64_t all_panels = g.groups * panels;
  const int64_t n_tasks = std::min<int64_t>(all_panels, int64_t{threads} * 8);
  return pool.run(n_tasks, [&](int64_t task, int who) {
    const T** table = table_buf[who].data();
    T** out_rows = out_rows_buf[who].data();
    T* tile = tile_buf[who].data();
    const int64_t end = (task + 1) * all_panels / n_tasks;
    for (int64_t pa = task * all_panels / n_tasks; pa < end; ++pa) {
      const int64_t cg = pa / panels, pi = pa % panels;
      const size_t gi = group_of_panel(first_panel, pi);
      const GatherGroup& gr = groups[gi];
      const T* in = g.in + cg * g.in_group;
      T* out = g.out + cg * g.out_group;
      const int64_t sites = gr.sites(), taps = gr.taps();
      const int64_t first = (pi - first_panel[gi]) * mr;
      const int64_t n_rows = std::min<int64_t>(mr, g.batch * sites - first);
      for (int64_t m = 0; m < mr; ++m) {
        if (m >= n_rows) {
          for (int64_t t = 0; t < taps; ++t) table[t * mr + m] = zeros.data();
          continue;
        }
        const int64_t b = (first + m) / sites, site = (first + m) % sites;
        const int64_t y = gr.site_y(site), x = gr.site_x(site);
        out_rows[m] = out + b * g.out_s.n + y * g.out_s.y + x * g.out_s.x;
        const T** entry = table + m;
        for (int64_t ty : *gr.taps_y) {
          const int64_t sy = g.rows.src(y, ty);
          for (int64_t tx : *gr.taps_x) {
            const int64_t sx = g.cols.src(x, tx);
            *entry = sy < 0 || sx < 0 ? zeros.data()
                                      : in + b * g.in_s.n + sy * g.in_s.y + sx * g.in_s.x;
            entry += mr;
          }
        }
      }
      for (int64_t qb = 0; qb < q_blocks; ++qb) {
        ik.fn(taps, P, table, weights[cg * n_groups + gi].data() + qb * taps * P * nr, tile);
        const int64_t q0 = qb * nr, n_q = std::min<int64_t>(nr, Q - q0);
        for (int64_t m = 0; m < n_rows; ++m) std::copy_n(tile + m * nr, n_q, out_rows[m] + q0);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// weight_acts: w[f, c, ty, tx] = sum over (b, position) of img[b, c, iy, ix] * hid[b, f, oy, ox],
// reduced over blocks of (b, position) in the order the contract fixes for partial sums. With
// groups, c runs over one group's channels (those of the filter's group) and the tiles of all
// groups share one pass of the thread pool, enumerated group by group.

// Reduction depth handled at a time: bounds the panels to cache-sized pieces.
constexpr int64_t kWeightActsBlockDepth = 512;

// A filter row (c, ty, tx) and where its values go in the filters buffer.
struct FilterRow {
  int64_t c, ty, tx, offset;
};

// Filter rows in memory order: (c, ty, tx) in C01B, (ty, tx, c) in NHWC; c < channels / groups.
std::vector<FilterRow> filter_rows(const ConvGeometry& g) {
  const bool batch_last = g.layout == Layout::kC01B;
  const int64_t C = g.channels / g.groups;
  const int64_t n_rows = C * g.filter_h * g.filter_w;
  std::vector<FilterRow> rows;
  rows.reserve(n_rows);
  for (int64_t r = 0; r < n_rows; ++r) {
    FilterRow fr;
    if (batch_last)
      fr = {r / (g.filter_h * g.filter_w), r / g.filter_w % g.filter_h, r % g.filter_w, 0};
    else
      fr = {r % C, r / C / g.filter_w, r / C % g.filter_w, 0};
    fr.offset = fr.c * g.filter.c + fr.ty * g.filter.y + fr.tx * g.filter.x;
    rows.push_back(fr);
  }
  return rows;
}

// A piece of one partial-sum chunk: images [b0, b0 + nb) times output positions
// [p0, p0 + np). Its reduction index k runs along memory: b fastest in C01B (k = pos*nb + b),
// positions fastest in NHWC (k = b*np + pos).
struct ReductionBlock {
  int64_t b0, nb, p0, np;
  int64_t depth() const { return nb * np; }
};

// For each partial-sum chunk, the fixed sequence of blocks covering its positions and the
// whole batch.
std::vector<std::vector<ReductionBlock>> reduction_blocks(const ConvGeometry& g) {
  const bool batch_last = g.layout == Layout::kC01B;
  const int64_t chunk = g.partial_sum, B = g.batch;
  int64_t np, nb;
  if (batch_last) {  // whole batch columns, as many positions as fit
    nb = B;
    np = std::clamp<int64_t>(kWeightActsBlockDepth / B, 1, chunk);
  } else {  // long runs of positions of one image, several images if the chunk is short
    np = std::min(chunk, kWeightActsBlockDepth);
    nb = std::clamp<int64_t>(kWeightActsBlockDepth / np, 1, B);
  }
  std::vector<std::vector<ReductionBlock>> chunks;
  for (int64_t begin = 0; begin < g.out_h * g.out_w; begin += chunk) {
    chunks.emplace_back();
    for (int64_t b0 = 0; b0 < B; b0 += nb)
      for (int64_t p0 = begin; p0 < begin + chunk; p0 += np)
        chunks.back().push_back({b0, std::min(nb, B - b0), p0, std::min(np, begin + chunk - p0)});
  }
  return chunks;
}

int64_t max_depth(const std::vector<std::vector<ReductionBlock>>& chunks) {
  int64_t depth = 1;
  for (const auto& blocks : chunks)
    for (const ReductionBlock& blk : blocks) depth = std::max(depth, blk.depth());
  return depth;
}

// Per-thread sums of output tiles: `partial` holds the current chunk's sum; with several chunks
// `total` adds them up in the contract's order, total = ((s_0 + s_1) + s_2) + ...
template <typename T>
class ChunkSums {
 public:
  ChunkSums(int64_t size, int64_t chunks)
      : size_(size), chunks_(chunks), partial_(size), total_(chunks > 1 ? size : 0) {}
  T* partial() const { return partial_.data(); }
  void end_chunk(int64_t ck) {
    if (chunks_ == 1) return;
    T* t = total_.data();
    const T* s = partial_.data();
    if (ck == 0)
      std::copy_n(s, size_, t);
    else
      for (int64_t i = 0; i < size_; ++i) t[i] += s[i];
  }
  const T* result() const { return chunks_ > 1 ? total_.data() : partial_.data(); }

 private:
  int64_t size_, chunks_;
  Buffer<T> partial_, total_;
};

// C01B: the product has m = f (broadcast, packed from the hidden activations), n = filter row
// (vector, packed from the image: a transposed copy along the batch) and k = (position, b).
template <typename T>
bool run_weight_acts_batch_last(const ConvGeometry& g, const T* img, const T* hid, T* w,
                                ThreadPool& pool) {
  const int64_t F = g.filters / g.groups;  // of one group
  const auto& mk = packed_kernel_for_rows(best_kernel_set<T>(), F);
  const int mr = mk.mr, nr = mk.nr;
  const int64_t f_blocks = ceil_div(F, mr);
  const std::vector<FilterRow> rows = filter_rows(g);
  const int64_t n_rows = static_cast<int64_t>(rows.size()), panels = ceil_div(n_rows, nr);
  const auto chunks = reduction_blocks(g);
  const int64_t depth_max = max_depth(chunks);
  // Group cg's images, hidden activations and filters start this many elements further.
  const int64_t img_group = n_rows / (g.filter_h * g.filter_w) * g.image.c;
  const int64_t hid_group = F * g.hidden.c, w_group = F * g.filter.n;

  // hid_pack[k][mr] of filter block fb of group cg.
  auto pack_hidden = [&](int64_t cg, int64_t fb, const ReductionBlock& blk, T* dst) {
    const int64_t f0 = fb * mr, n_f = std::min<int64_t>(mr, F - f0);
    for (int64_t i = 0; i < blk.np; ++i) {
      const int64_t pos = blk.p0 + i;
      const T* src = hid + cg * hid_group + pos / g.out_w * g.hidden.y +
                     pos % g.out_w * g.hidden.x + blk.b0 + f0 * g.hidden.c;
      T* out = dst + i * blk.nb * mr;
      for (int64_t m = 0; m < mr; ++m)
        for (int64_t b = 0; b < blk.nb; ++b)
          out[b * mr + m] = m < n_f ? src[m * g.hidden.c + b] : T(0);
    }
  };

  // img_pack[k][nr]: image values of the filter rows [r0, r0 + nr) of group cg; rows past
  // n_rows are 0.
  auto pack_image = [&](int64_t cg, int64_t r0, const ReductionBlock& blk, T* dst) {
    const int64_t n_valid = std::min<int64_t>(nr, n_rows - r0);
    for (int64_t i = 0; i < blk.np; ++i) {
      const int64_t pos = blk.p0 + i;
      const int64_t y0 = pos / g.out_w * g.stride_h - g.pad_top;
      const int64_t x0 = pos % g.out_w * g.stride_w - g.pad_left;
      T* out = dst + i * blk.nb * nr;
      for (int64_t j = 0; j < n_valid; ++j) {
        const FilterRow& fr = rows[r0 + j];
        const int64_t iy = y0 + fr.ty, ix = x0 + fr.tx;
        if (iy < 0 || iy >= g.in_h || ix < 0 || ix >= g.in_w) {
          for (int64_t b = 0; b < blk.nb; ++b) out[b * nr + j] = T(0);
          continue;
        }
        const T* src =
            img + cg * img_group + fr.c * g.image.c + iy * g.image.y + ix * g.image.x + blk.b0;
        for (int64_t b = 0; b < blk.nb; ++b) out[b * nr + j] = src[b];
      }
      for (int64_t b = 0; b < blk.nb; ++b) fill_short(out + b * nr + n_valid, nr - n_valid);
    }
  };

  // One task per thread, each a fixed run of the (group, row panel, filter block) tiles.
  const int64_t group_units = panels * f_blocks, units = g.groups * group_units;
  const int64_t tile = int64_t{mr} * nr;
  const int64_t n_tasks = std::min<int64_t>(pool.participants(), units);
  return pool.run(n_tasks, [&](int64_t task, int) {
    const int64_t u0 = task * units / n_tasks, u1 = (task + 1) * units / n_tasks;
    Buffer<T> hid_pack(f_blocks * depth_max * mr), img_pack(depth_max * nr);
    std::vector<char> hid_packed(f_blocks);
    ChunkSums<T> sums((u1 - u0) * tile, static_cast<int64_t>(chunks.size()));
    for (size_t ck = 0; ck < chunks.size(); ++ck) {
      bool accumulate = false;
      for (const ReductionBlock& blk : chunks[ck]) {
        const int64_t depth = blk.depth();
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t cg = u / group_units, pi = u % group_units / f_blocks;
          const int64_t fb = u % f_blocks;
          T* hid_block = hid_pack.data() + fb * depth * mr;
          // A new group (or block) packs its hidden activations afresh.
          if (u == u0 || u % group_units == 0)
            std::fill(hid_packed.begin(), hid_packed.end(), 0);
          if (u == u0 || fb == 0) pack_image(cg, pi * nr, blk, img_pack.data());
          if (!hid_packed[fb]) pack_hidden(cg, fb, blk, hid_block), hid_packed[fb] = 1;
          mk.fn(depth, hid_block, img_pack.data(), sums.partial() + (u - u0) * tile, accumulate);
        }
        accumulate = true;
      }
      sums.end_chunk(static_cast<int64_t>(ck));
    }
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t cg = u / group_units;
      const int64_t r0 = u % group_units / f_blocks * nr;
      const int64_t n_valid = std::min<int64_t>(nr, n_rows - r0);
      const int64_t f0 = u % f_blocks * mr, n_f = std::min<int64_t>(mr, F - f0);
      const T* t = sums.result() + (u - u0) * tile;
      for (int64_t m = 0; m < n_f; ++m) {
        T* dst = w + cg * w_group + (f0 + m) * g.filter.n;
        for (int64_t j = 0; j < n_valid; ++j) dst[rows[r0 + j].offset] = t[m * nr + j];
      }
    }
  });
}

// A weight_acts window: its top row, the span [inside_lo, inside_hi) of offsets (tx*C + c)
// from its corner that lie inside the image row, and the corner's element offset in an image.
struct Window {
  int64_t y0, inside_lo, inside_hi, corner;
};

// NHWC: the product has m = mr filter rows (tx, c) of one filter row ty, n = f and
// k = (b, position), both read in place (gathered kernel): a hidden row holds the filters
// contiguously, and the filter rows of one ty are consecutive values of an image row (the
// pixel stride is the channel count). Windows reaching into the padding, and a last partial
// block of filters, are copied into zero-padded scratch rows instead; so are all filter rows
// with groups, where one group's channels are only a part of each pixel.
template <typename T>
bool run_weight_acts_channels_last(const ConvGeometry& g, const T* img, const T* hid, T* w,
                                   ThreadPool& pool) {
  // At most two vectors wide: taller tiles spread the cost of each k's pointers further.
  const KernelSet<T>& set = best_kernel_set<T>();
  // F and C of one group; the pixel stride of the images is g.image.x (all channels).
  const int64_t F = g.filters / g.groups, C = g.channels / g.groups;
  const auto& kern = kernel_for_columns(set, set.gathered, F, 2);
  const int mr = kern.mr, nr = kern.nr;
  const int64_t q_blocks = ceil_div(F, nr);
  const int64_t run_len = g.filter_w * C;  // filter rows per ty
  const int64_t blocks_per_run = ceil_div(run_len, mr);
  const int64_t row_blocks = g.filter_h * blocks_per_run;
  const std::vector<FilterRow> rows = filter_rows(g);
  const auto chunks = reduction_blocks(g);
  const int64_t depth_max = max_depth(chunks);

  // b_rows[k] of filter block qb of group cg: hidden rows read in place, or a zero-padded copy
  // for a last partial block (full vectors are read).
  auto gather_hidden = [&](int64_t cg, int64_t qb, const ReductionBlock& blk, const T** b_rows,
                           T* scratch) {
    const int64_t q0 = qb * nr, n_q = std::min<int64_t>(nr, F - q0);
    for (int64_t b = 0; b < blk.nb; ++b)
      for (int64_t i = 0; i < blk.np; ++i) {
        const int64_t k = b * blk.np + i, pos = blk.p0 + i;
        const T* src = hid + (blk.b0 + b) * g.hidden.n + pos / g.out_w * g.hidden.y +
                       pos % g.out_w * g.hidden.x + cg * F + q0;
        if (n_q < nr) {
          T* s = scratch + k * nr;
          copy_short(src, n_q, s);
          fill_short(s + n_q, nr - n_q);
          src = s;
        }
        b_rows[k] = src;
      }
  };

  // a_rows[k] of row block rb of group cg: mr consecutive values of an image row read in place
  // where they all lie inside the image (one group only), else a zero-padded copy (windows
  // holds the block's windows).
  auto gather_image = [&](int64_t cg, int64_t rb, const ReductionBlock& blk,
                          const Window* windows, const T** a_rows, T* scratch) {
    const int64_t ty = rb / blocks_per_run, off0 = rb % blocks_per_run * mr;
    const int64_t len = std::min<int64_t>(mr, run_len - off0);
    const int64_t rb_offset = ty * g.image.y + off0;
    for (int64_t i = 0; i < blk.np; ++i) {
      const Window& win = windows[i];
      const bool row_inside = win.y0 + ty >= 0 && win.y0 + ty < g.in_h;
      if (g.groups > 1) {
        // Filter row offset o = tx * C + c reads pixel tx, channel cg * C + c.
        const int64_t lo = row_inside ? std::clamp(win.inside_lo - off0, int64_t{0}, len) : 0;
        const int64_t hi = row_inside ? std::clamp(win.inside_hi - off0, lo, len) : 0;
        for (int64_t b = 0; b < blk.nb; ++b) {
          const int64_t k = b * blk.np + i;
          T* s = scratch + k * mr;
          const int64_t base = (blk.b0 + b) * g.image.n + win.corner + ty * g.image.y + cg * C;
          fill_short(s, lo);
          for (int64_t m = lo; m < hi; ++m) {
            const int64_t o = off0 + m;
            s[m] = img[base + o / C * g.image.x + o % C];
          }
          fill_short(s + hi, mr - hi);
          a_rows[k] = s;
        }
        continue;
      }
      if (row_inside && off0 >= win.inside_lo && off0 + mr <= win.inside_hi) {
        // Rows past len read further values of the image row, which reach only unused rows
        // of the tile.
        const T* src = img + (blk.b0 * g.image.n + win.corner + rb_offset);
        for (int64_t b = 0; b < blk.nb; ++b) a_rows[b * blk.np + i] = src + b * g.image.n;
        continue;
      }
      const int64_t lo = row_inside ? std::clamp(win.inside_lo - off0, int64_t{0}, len) : 0;
      const int64_t hi = row_inside ? std::clamp(win.inside_hi - off0, lo, len) : 0;
      for (int64_t b = 0; b < blk.nb; ++b) {
        const int64_t k = b * blk.np + i;
        T* s = scratch + k * mr;
        fill_short(s, lo);
        if (hi > lo)
          copy_short(img + ((blk.b0 + b) * g.image.n + win.corner + rb_offset + lo), hi - lo,
                     s + lo);
        fill_short(s + hi, mr - hi);
        a_rows[k] = s;
      }
    }
  };

  // One task per thread, each a fixed run of the (group, row block, filter block) tiles.
  const int64_t group_units = row_blocks * q_blocks, units = g.groups * group_units;
  const int64_t tile = int64_t{mr} * nr;
  const int64_t n_tasks = std::min<int64_t>(pool.participants(), units);
  return pool.run(n_tasks, [&](int64_t task, int) {
    const int64_t u0 = task * units / n_tasks, u1 = (task + 1) * units / n_tasks;
    std::vector<const T*> a_rows(depth_max), b_rows(q_blocks * depth_max);
    std::vector<char> b_gathered(q_blocks);
    std::vector<Window> windows(depth_max);
    Buffer<T> a_scratch(depth_max * mr), b_scratch(q_blocks * depth_max * nr);
    ChunkSums<T> sums((u1 - u0) * tile, static_cast<int64_t>(chunks.size()));
    for (size_t ck = 0; ck < chunks.size(); ++ck) {
      bool accumulate = false;
      for (const ReductionBlock& blk : chunks[ck]) {
        const int64_t depth = blk.depth();
        for (int64_t i = 0; i < blk.np; ++i) {
          const int64_t pos = blk.p0 + i;
          const int64_t y0 = pos / g.out_w * g.stride_h - g.pad_top;
          const int64_t x0 = pos % g.out_w * g.stride_w - g.pad_left;
          windows[i] = {y0, std::max<int64_t>(0, -x0) * C, (g.in_w - x0) * C,
                        y0 * g.image.y + x0 * g.image.x};
        }
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t cg = u / group_units, rb = u % group_units / q_blocks;
          const int64_t qb = u % q_blocks;
          const T** b_block = b_rows.data() + qb * depth_max;
          // A new group (or block) gathers its hidden rows afresh.
          if (u == u0 || u % group_units == 0)
            std::fill(b_gathered.begin(), b_gathered.end(), 0);
          if (u == u0 || qb == 0)
            gather_image(cg, rb, blk, windows.data(), a_rows.data(), a_scratch.data());
          if (!b_gathered[qb])
            gather_hidden(cg, qb, blk, b_block, b_scratch.data() + qb * depth_max * nr),
                b_gathered[qb] = 1;
          kern.fn(depth, a_rows.data(), b_block, sums.partial() + (u - u0) * tile, accumulate);
        }
        accumulate = true;
      }
      sums.end_chunk(static_cast<int64_t>(ck));
    }
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t cg = u / group_units, rb = u % group_units / q_blocks;
      const int64_t off0 = rb % blocks_per_run * mr;
      const int64_t r0 = rb / blocks_per_run * run_len + off0;
      const int64_t len = std::min<int64_t>(mr, run_len - off0);
      const int64_t q0 = cg * F + u % q_blocks * nr, n_q = std::min<int64_t>(nr, F - u % q_blocks * nr);
      const T* t = sums.result() + (u - u0) * tile;
      for (int64_t m = 0; m < len; ++m)
        for (int64_t n = 0; n < n_q; ++n)
          w[rows[r0 + m].offset + (q0 + n) * g.filter.n] = t[m * nr + n];
    }
  });
}

// NHWC weight_acts with one channel per group (depthwise convolutions, each channel feeding
// F / groups filters): w[ty, tx, 0, f] = sum over (b, position) of img[b, iy, ix, f / (F / groups)]
// * hid[b, oy, ox, f], a product along f (contiguous in the hidden rows and the filters) that
// the tiles of run_weight_acts_channels_last, one channel and few filters wide, would mostly
// waste. Each task owns one tap and a block of filters; every partial-sum chunk is summed over
// (b, position) in order and the chunk sums are added in order.
template <typename T>
bool run_weight_acts_depthwise_channels_last(const ConvGeometry& g, const T* img, const T* hid,
                                             T* w, ThreadPool& pool) {
  constexpr int64_t kFilterBlock = 64;
  const int64_t F = g.filters, per_channel = F / g.groups;
  const int64_t f_blocks = ceil_div(F, kFilterBlock);
  const int64_t positions = g.out_h * g.out_w, chunk = g.partial_sum;
  return pool.run(g.filter_h * g.filter_w * f_blocks, [&](int64_t task, int) {
    const int64_t ty = task / f_blocks / g.filter_w, tx = task / f_blocks % g.filter_w;
    const int64_t f0 = task % f_blocks * kFilterBlock;
    const int64_t nf = std::min(kFilterBlock, F - f0);
    T part[kFilterBlock], total[kFilterBlock];
    std::fill_n(total, nf, T(0));
    for (int64_t p0 = 0; p0 < positions; p0 += chunk) {
      std::fill_n(part, nf, T(0));
      for (int64_t b = 0; b < g.batch; ++b)
        for (int64_t pos = p0; pos < p0 + chunk; ++pos) {
          const int64_t oy = pos / g.out_w, ox = pos % g.out_w;
          const int64_t iy = oy * g.stride_h - g.pad_top + ty;
          const int64_t ix = ox * g.stride_w - g.pad_left + tx;
          if (iy < 0 || iy >= g.in_h || ix < 0 || ix >= g.in_w) continue;
          const T* h = hid + (b * g.hidden.n + oy * g.hidden.y + ox * g.hidden.x + f0);
          const int64_t x = b * g.image.n + iy * g.image.y + ix * g.image.x;
          if (per_channel == 1) {
            const T* xf = img + (x + f0);
            for (int64_t f = 0; f < nf; ++f) part[f] += xf[f] * h[f];
          } else {
            for (int64_t f = 0; f < nf; ++f) part[f] += img[x + (f0 + f) / per_channel] * h[f];
          }
        }
      for (int64_t f = 0; f < nf; ++f) total[f] += part[f];
    }
    T* dst = w + (ty * g.filter.y + tx * g.filter.x + f0 * g.filter.n);
    for (int64_t f = 0; f < nf; ++f) dst[f * g.filter.n] = total[f];
  });
}

// ---------------------------------------------------------------------------------------------
// FFI handlers.

enum class ConvOp { kFilterActs, kImageActs, kWeightActs };

const char* op_name(ConvOp op) {
  switch (op) {
    case ConvOp::kFilterActs: return "filter_acts";
    case ConvOp::kImageActs: return "image_acts";
    default: return "weight_acts";
  }
}

template <typename T>
bool run_gather(bool batch_last, const GatherConv<T>& g, ThreadPool& pool) {
  return batch_last ? run_gather_batch_last(g, pool) : run_gather_channels_last(g, pool);
}

// Operands (a, b) and result are, per the contract: filter_acts (images, filters) -> hidden,
// image_acts (hidden, filters) -> images, weight_acts (images, hidden) -> filters.
template <typename T>
bool compute(ConvOp op, const ConvGeometry& g, const T* a, const T* b, T* out) {
  ThreadPool& pool = ThreadPool::shared();
  const bool batch_last = g.layout == Layout::kC01B;
  // One group's channels and filters, and where each group's slice starts.
  const int64_t C = g.channels / g.groups, F = g.filters / g.groups;
  const int64_t image_group = C * g.image.c, hidden_group = F * g.hidden.c;
  const int64_t filter_group = F * g.filter.n;
  switch (op) {
    case ConvOp::kFilterActs:
      return run_gather(
          batch_last,
          GatherConv<T>{g.batch, a, g.image, C, out, g.hidden, F, b,
                        g.filter.c, g.filter.n, g.filter.y, g.filter.x,
                        forward_axis(g.out_h, g.in_h, g.filter_h, g.stride_h, g.pad_top),
                        forward_axis(g.out_w, g.in_w, g.filter_w, g.stride_w, g.pad_left),
                        g.groups, image_group, hidden_group, filter_group},
          pool);
    case ConvOp::kImageActs:
      return run_gather(
          batch_last,
          GatherConv<T>{g.batch, a, g.hidden, F, out, g.image, C, b,
                        g.filter.n, g.filter.c, g.filter.y, g.filter.x,
                        adjoint_axis(g.in_h, g.out_h, g.filter_h, g.stride_h, g.pad_top),
                        adjoint_axis(g.in_w, g.out_w, g.filter_w, g.stride_w, g.pad_left),
                        g.groups, hidden_group, image_group, filter_group},
          pool);
    default:
      if (!batch_last && g.groups > 1 && g.channels == g.groups)
        return run_weight_acts_depthwise_channels_last(g, a, b, out, pool);
      return batch_last ? run_weight_acts_batch_last(g, a, b, out, pool)
                        : run_weight_acts_channels_last(g, a, b, out, pool);
  }
}

// bfloat16 / float16 operands are widened to float32, computed, and rounded once.
template <uint16_t (*Narrow)(float), float (*Widen)(uint16_t)>
bool compute_16bit(ConvOp op, const ConvGeometry& g, const ffi::AnyBuffer& a,
                   const ffi::AnyBuffer& b, ffi::AnyBuffer& out) {
  auto widen = [](const ffi::AnyBuffer& buf) {
    std::vector<float> v(buf.element_count());
    const uint16_t* src = static_cast<const uint16_t*>(buf.untyped_data());
    for (size_t i = 0; i < v.size(); ++i) v[i] = Widen(src[i]);
    return v;
  };
  std::vector<float> wa = widen(a), wb = widen(b), result(out.element_count());
  if (!compute<float>(op, g, wa.data(), wb.data(), result.data())) return false;
  uint16_t* dst = static_cast<uint16_t*>(out.untyped_data());
  for (size_t i = 0; i < result.size(); ++i) dst[i] = Narrow(result[i]);
  return true;
}

// The conv attributes (ConvParams), "groups" among them only where it is not 1: the attribute
// set of ungrouped calls stays the one the CUDA handlers (and exported programs) have.
ffi::Error decode_conv_params(const std::string& name, const ffi::Dictionary& attrs,
                              ConvParams* p) {
  const size_t expected = attrs.contains("groups") ? 10 : 9;
  if (attrs.size() != expected)
    return invalid(name, "unexpected attributes (expected the conv attributes and groups)");
  auto layout = attrs.get<Layout>("layout");
  auto precision = attrs.get<Precision>("precision");
  if (layout.has_error()) return layout.error();
  if (precision.has_error()) return precision.error();
  p->layout = *layout;
  p->precision = *precision;
  const std::pair<const char*, int64_t*> ints[] = {
      {"stride_h", &p->stride_h}, {"stride_w", &p->stride_w},   {"pad_top", &p->pad_top},
      {"pad_bottom", &p->pad_bottom}, {"pad_left", &p->pad_left}, {"pad_right", &p->pad_right},
      {"partial_sum", &p->partial_sum}};
  for (const auto& [attr, field] : ints) {
    auto v = attrs.get<int64_t>(attr);
    if (v.has_error()) return v.error();
    *field = *v;
  }
  p->groups = 1;
  if (expected == 10) {
    auto groups = attrs.get<int64_t>("groups");
    if (groups.has_error()) return groups.error();
    p->groups = *groups;
  }
  return ffi::Error::Success();
}

ffi::Error conv_handler(ConvOp op, ffi::AnyBuffer a, ffi::AnyBuffer b,
                        ffi::Result<ffi::AnyBuffer> out, const ffi::Dictionary& attrs) {
  const std::string name = op_name(op);
  if (!isa_cap().error.empty()) return invalid(name, isa_cap().error);
  ConvParams params;
  if (ffi::Error e = decode_conv_params(name, attrs, &params); e.failure()) return e;
  if (!is_rank4(a) || !is_rank4(b) || !is_rank4(*out))
    return invalid(name, "operands and result must have rank 4");
  const ffi::DataType dtype = a.element_type();
  if (!supported_dtype(dtype, /*allow_f64=*/true))
    return invalid(name, "dtype must be float32, bfloat16, float16 or float64");
  if (b.element_type() != dtype || out->element_type() != dtype)
    return invalid(name, "operands and result must share one dtype");

  const int64_t* da = &a.dimensions()[0];
  const int64_t* db = &b.dimensions()[0];
  const int64_t* dout = &out->dimensions()[0];
  const int64_t *images = da, *filters = db, *hidden = dout;
  if (op == ConvOp::kImageActs) images = dout, hidden = da;
  if (op == ConvOp::kWeightActs) filters = dout, hidden = db;
  ConvGeometry g;
  const std::string error = make_conv_geometry(params, images, filters, hidden, &g);
  if (!error.empty()) return invalid(name, error);
  // Every precision computes in full float32 (float64) on the CPU; only the value is checked.
  if (params.precision != Precision::kDefault && params.precision != Precision::kHigh &&
      params.precision != Precision::kHighest)
    return invalid(name, "precision must be 0, 1 or 2");

  return run_guarded(name, [&] {
    switch (dtype) {
      case ffi::DataType::F32:
        return compute(op, g, static_cast<const float*>(a.untyped_data()),
                       static_cast<const float*>(b.untyped_data()),
                       static_cast<float*>(out->untyped_data()));
      case ffi::DataType::F64:
        return compute(op, g, static_cast<const double*>(a.untyped_data()),
                       static_cast<const double*>(b.untyped_data()),
                       static_cast<double*>(out->untyped_data()));
      case ffi::DataType::BF16:
        return compute_16bit<float_to_bf16, bf16_to_float>(op, g, a, b, *out);
      default:
        return compute_16bit<float_to_f16, f16_to_float>(op, g, a, b, *out);
    }
  });
}

ffi::Error filter_acts(ffi::AnyBuffer images, ffi::AnyBuffer filters,
                       ffi::Result<ffi::AnyBuffer> hidden, ffi::Dictionary attrs) {
  return conv_handler(ConvOp::kFilterActs, images, filters, hidden, attrs);
}

ffi::Error image_acts(ffi::AnyBuffer hidden, ffi::AnyBuffer filters,
                      ffi::Result<ffi::AnyBuffer> images, ffi::Dictionary attrs) {
  return conv_handler(ConvOp::kImageActs, hidden, filters, images, attrs);
}

ffi::Error weight_acts(ffi::AnyBuffer images, ffi::AnyBuffer hidden,
                       ffi::Result<ffi::AnyBuffer> filters, ffi::Dictionary attrs) {
  return conv_handler(ConvOp::kWeightActs, images, hidden, filters, attrs);
}

}  // namespace
}  // namespace jax_convnet::cpu

#define JCN_CONV_BINDING                                                                        \
  ::xla::ffi::Ffi::Bind()                                                                       \
      .Arg<::xla::ffi::AnyBuffer>()                                                             \
      .Arg<::xla::ffi::AnyBuffer>()                                                             \
      .Ret<::xla::ffi::AnyBuffer>()                                                             \
      .Attrs()

XLA_FFI_DEFINE_HANDLER_SYMBOL(FilterActsCpu, jax_convnet::cpu::filter_acts, JCN_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ImageActsCpu, jax_convnet::cpu::image_acts, JCN_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(WeightActsCpu, jax_convnet::cpu::weight_acts, JCN_CONV_BINDING);
