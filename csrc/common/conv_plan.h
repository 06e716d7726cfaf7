// The plan of a conv call on the GPU: the route that runs it and, on the TMA core, its tile, from
// the geometry, the element type, the device and the call's workspace (conv_workspace.h). One
// function, plan_conv, that the CUDA host code (csrc/cuda/conv_launch.cuh) follows and the
// lowering asks through the CPU module (jax_convnet.explain) for a described device. Routes:
//   kTma                     Hopper's TMA-fed wgmma core (conv_tma.cuh): filter_acts, and
//                            image_acts at stride 1, reading both operands in place (NHWC float32
//                            filter_acts through a k-contiguous copy of its taps);
//   kTmaViaNhwc              float32 (TF32) C01B filter_acts / image_acts: the input copied to
//                            NHWC, the NHWC kernel, the output copied back;
//   kTmaWeights              weight_acts on the TMA core, partial sums in the workspace;
//   kTmaWeightsViaC01b       float32 (TF32) NHWC weight_acts through C01B copies;
//   kFft                     stride-1 convolutions with large filters through 2-d FFTs;
//   kCudaCores               the other kernels (column buffer, direct, mma / wgmma / wmma /
//                            FFMA tiles), chosen at launch from the operands' alignment.
// The host code checks at launch what the plan cannot see (the pointers' 16-byte alignment) and
// runs the next route where that fails.
#pragma once

#include <algorithm>
#include <cstdint>

#include "conv_workspace.h"
#include "geometry.h"

namespace jax_convnet {

// What the plan reads of the device and the build.
struct ConvDevice {
  int cc_major = 0, cc_minor = 0;
  int64_t sm_count = 1;
  int64_t smem_optin = 0;  // shared memory per block, opt-in
  bool tma = false;  // sm_90a kernels built and the driver's tensor-map encoders usable
};

enum class ConvRoute : int {
  kCudaCores = 0,
  kTma = 1,
  kTmaViaNhwc = 2,
  kTmaWeights = 3,
  kTmaWeightsViaC01b = 4,
  kFft = 5,
};

inline const char* route_name(ConvRoute r) {
  switch (r) {
    case ConvRoute::kTma: return "tma";
    case ConvRoute::kTmaViaNhwc: return "tma_via_nhwc_copies";
    case ConvRoute::kTmaWeights: return "tma_weights";
    case ConvRoute::kTmaWeightsViaC01b: return "tma_weights_via_c01b_copies";
    case ConvRoute::kFft: return "fft";
    case ConvRoute::kCudaCores: return "cuda_cores";
  }
  return "?";
}

// ---- The TMA core's rules (conv_tma.cuh checks its constants against these) ----

constexpr int64_t kTmaRows = 128;         // rows of an A tile (kTmaBM)
constexpr int64_t kTmaStageBudget = 200 * 1024;
// Shared memory of the TMA kernel with a tile of bn columns (TmaPlan<bn>::SMEM).
constexpr int64_t tma_smem_bytes(int64_t bn) {
  const int64_t a = kTmaRows * 128, b = bn * 128, stages = std::min<int64_t>(
                                                      8, kTmaStageBudget / (a + b));
  return stages * (a + b) + 2 * 8 * stages + 1024;
}
// Sizes of swap_outer_inner's grids: outer and inner at most this.
constexpr int64_t kMaxSwapped = int64_t(65535) * 32;


// The convolution a TMA kernel runs: X (cin channels) by W's taps into Y (cout channels), with
// X / W / Y's element strides (W's n stride: its filters).
struct TmaProblem {
  int64_t batch, cin, cout, in_h, in_w, out_h, out_w, fh, fw, sh, sw, pt, pl, pb, pr;
  Strides4 xs, ws, ys;
};
// filter_acts' problem, or image_acts' at stride 1 (X = hidden, Y = images, the taps flipped and
// transposed: out(y) = sum_i hid(y - (fh - 1 - pt) + i) w(fh - 1 - i)).
inline TmaProblem tma_problem(bool image_acts, const ConvGeometry& g, int64_t pad_bottom,
                              int64_t pad_right) {
  if (!image_acts)
    return {g.batch,    g.channels, g.filters, g.in_h,    g.in_w,    g.out_h,
            g.out_w,    g.filter_h, g.filter_w, g.stride_h, g.stride_w, g.pad_top,
            g.pad_left, pad_bottom, pad_right, g.image,   g.filter,  g.hidden};
  return {g.batch,     g.filters,   g.channels,
          g.out_h,     g.out_w,     g.in_h,
          g.in_w,      g.filter_h,  g.filter_w,
          1,           1,           g.filter_h - 1 - g.pad_top,
          g.filter_w - 1 - g.pad_left, g.in_h - g.out_h + g.pad_top, g.in_w - g.out_w + g.pad_left,
          g.hidden,    g.filter,    g.image};
}

// Element strides (n, c, y, x) of a dense NHWC tensor of `c` channels, w columns and h rows.
inline bool dense_nhwc(const Strides4& s, int64_t c, int64_t w, int64_t h) {
  return s.c == 1 && s.x == c && s.y == w * c && s.n == h * s.y;
}
// ... and of a dense C01B tensor of `batch` images, w columns and `pixels` pixels per channel.
inline bool dense_c01b(const Strides4& s, int64_t batch, int64_t w, int64_t pixels) {
  return s.n == 1 && s.x == batch && s.y == w * batch && s.c == pixels * batch;
}

// Whether the TMA kernels can read pr's X (the images, or image_acts' hidden tensor), on the
// geometry alone: sizes within 31 bits, 16-byte strides, filters contiguous, the channels the
// kernels take (tma_channels_fit); C01B: batch contiguous, runs of 64 images; NHWC: im2col's
// corner and offset ranges, and the corners' box holding out_h x out_w pixels.
inline bool tma_reads(Layout layout, int64_t itemsize, const TmaProblem& pr) {
  const int64_t V = 16 / itemsize;
  const int64_t lim = int64_t(1) << 31;
  for (int64_t v : {pr.batch, pr.cin, pr.cout, pr.in_h, pr.in_w, pr.out_h, pr.out_w,
                    pr.batch * pr.out_h * pr.out_w, pr.batch * pr.in_h * pr.in_w})
    if (v >= lim) return false;
  if (pr.ws.n != 1 || !tma_channels_fit(pr.cin, pr.cout, itemsize)) return false;
  for (int64_t s : {pr.xs.c, pr.xs.y, pr.xs.x, pr.xs.n, pr.ws.c, pr.ws.y, pr.ws.x})
    if (s % V != 0 && s != 1) return false;
  if (layout == Layout::kC01B) return pr.xs.n == 1 && pr.batch % V == 0 && pr.batch >= 64;
  if (pr.xs.c != 1) return false;
  for (int64_t corner : {-pr.pl, -pr.pt, pr.pr - (pr.fw - 1), pr.pb - (pr.fh - 1)})
    if (corner < -128 || corner > 127) return false;
  return pr.fh <= 255 && pr.fw <= 255 && pr.pt >= 0 && pr.pl >= 0 &&
         conv_out_size(pr.in_h, pr.fh, pr.sh, pr.pt, pr.pb) == pr.out_h &&
         conv_out_size(pr.in_w, pr.fw, pr.sw, pr.pl, pr.pr) == pr.out_w;
}

// The tile width: of 64, 128, 192 and 256 columns, the one with the fewest rounds of tiles over
// the SMs times a tile's cost (its width plus a fixed share for operand A); ties to the widest.
inline int tma_tile_columns(int64_t tiles_m, int64_t cout, int64_t nsm) {
  int best = 0;
  int64_t best_cost = 0;
  for (int bn : {256, 192, 128, 64}) {
    const int64_t cost = ceil_div(tiles_m * ceil_div(cout, bn), nsm) * (bn + 64);
    if (best == 0 || cost < best_cost) best = bn, best_cost = cost;
  }
  return best;
}

// filter_acts / image_acts (`flip`) on the TMA kernel: its tile width, or 0 where it cannot run
// (image_acts at stride 1 only; Y contiguous along the batch in C01B, dense in NHWC; float32
// filter_acts needs room in the workspace for the taps' k-contiguous copy; tiles within 31 bits).
inline int tma_forward_tile(Layout layout, int64_t itemsize, bool flip, const TmaProblem& pr,
                            int64_t workspace_bytes, int64_t nsm) {
  const bool c01b = layout == Layout::kC01B;
  if (!tma_reads(layout, itemsize, pr) || (flip && (pr.sh != 1 || pr.sw != 1))) return 0;
  if (!(c01b ? pr.ys.n == 1 : dense_nhwc(pr.ys, pr.cout, pr.out_w, pr.out_h))) return 0;
  if (itemsize == 4 && !flip && workspace_bytes < 4 * pr.cin * pr.cout * pr.fh * pr.fw) return 0;
  const int64_t b_runs = ceil_div(pr.batch, 64);
  const int64_t tiles_m = c01b ? pr.out_h * ceil_div(pr.out_w, 2) * b_runs
                               : ceil_div(pr.batch * pr.out_h * pr.out_w, kTmaRows);
  const int bn = tma_tile_columns(tiles_m, pr.cout, nsm);
  return tiles_m * ceil_div(pr.cout, bn) < (int64_t(1) << 31) ? bn : 0;
}

// The NHWC problem of float32 C01B filter_acts / image_acts run through NHWC copies.
inline TmaProblem tma_nhwc_copies_problem(const TmaProblem& pr) {
  TmaProblem pn = pr;
  pn.xs = {pr.in_h * pr.in_w * pr.cin, 1, pr.in_w * pr.cin, pr.cin};
  pn.ys = {pr.out_h * pr.out_w * pr.cout, 1, pr.out_w * pr.cout, pr.cout};
  return pn;
}
// The copies' bytes at the workspace's start: X then Y, each rounded up to 256 bytes.
inline int64_t tma_copy_bytes(int64_t batch, int64_t pixels, int64_t channels) {
  return round_up(4 * batch * pixels * channels, 256);
}

// float32 C01B filter_acts / image_acts through NHWC copies: the tile width, or 0.
inline int tma_via_nhwc_tile(bool flip, const TmaProblem& pr, int64_t workspace_bytes,
                             int64_t nsm) {
  const int64_t x_pixels = pr.in_h * pr.in_w, y_pixels = pr.out_h * pr.out_w;
  if (!dense_c01b(pr.xs, pr.batch, pr.in_w, x_pixels) ||
      !dense_c01b(pr.ys, pr.batch, pr.out_w, y_pixels) || (flip && (pr.sh != 1 || pr.sw != 1)) ||
      std::max({pr.batch, pr.cin, pr.cout}) > kMaxSwapped)
    return 0;
  const int64_t rest = workspace_bytes - tma_copy_bytes(pr.batch, x_pixels, pr.cin) -
                       tma_copy_bytes(pr.batch, y_pixels, pr.cout);
  if (rest < (flip ? 0 : 4 * pr.cin * pr.cout * pr.fh * pr.fw)) return 0;
  return tma_forward_tile(Layout::kNHWC, 4, flip, tma_nhwc_copies_problem(pr), rest, nsm);
}

// weight_acts on the TMA kernel (pr: filter_acts' problem, Y = the hidden tensor): the split of
// K (the output pixels) into ranges whose float32 sums land in the workspace, and the tile width.
struct TmaWeightsPlan {
  int bn = 0;  // 0: the kernel cannot run
  int64_t tiles_m = 0, tiles_n = 0, kblocks = 0, kblocks_per_split = 0, splits = 0;
};
// passes: 3 for 3xTF32, which runs K three times.
inline TmaWeightsPlan tma_weights_plan(Layout layout, int64_t itemsize, const TmaProblem& pr,
                                       int64_t workspace_bytes, int64_t nsm, int64_t passes = 1) {
  TmaWeightsPlan none, p;
  const bool c01b = layout == Layout::kC01B;
  const int64_t V = 16 / itemsize, kK = kTmaKBlockBytes / itemsize;
  const Strides4& hs = pr.ys;
  if ((!c01b && itemsize == 4) || !tma_reads(layout, itemsize, pr)) return none;
  const bool hid_ok = c01b ? hs.n == 1 && hs.x % V == 0 && hs.y % V == 0 && hs.c % V == 0
                           : dense_nhwc(hs, pr.cout, pr.out_w, pr.out_h);
  const int64_t taps = pr.fh * pr.fw, E = pr.cout * pr.cin * taps;
  const int64_t cap = workspace_bytes / (4 * E);  // splits whose sums the workspace holds
  if (!hid_ok || cap < 1) return none;
  const int64_t columns = taps * ceil_div(pr.cin, 64) * 64;
  p.bn = int(std::min<int64_t>(columns, 256));
  p.tiles_m = ceil_div(pr.cout, kTmaRows);
  p.tiles_n = ceil_div(columns, p.bn);
  p.kblocks = passes * (c01b ? pr.out_h * pr.out_w * ceil_div(pr.batch, kK)
                              : ceil_div(pr.batch * pr.out_h * pr.out_w, kK));
  if (p.kblocks >= (int64_t(1) << 31) || p.tiles_n >= (int64_t(1) << 20)) return none;
  // Splits: the fewest rounds of tiles over the SMs per unit of work, within the workspace.
  const int64_t tiles = p.tiles_m * p.tiles_n;
  int64_t splits = 1;
  double best = 0;
  for (int64_t s = 1; s <= std::min<int64_t>({cap, p.kblocks, 4 * nsm}); ++s) {
    const double cost = double(ceil_div(tiles * s, nsm)) / double(s);
    if (s == 1 || cost < best * 0.999) best = cost, splits = s;
  }
  p.kblocks_per_split = ceil_div(p.kblocks, splits);
  p.splits = ceil_div(p.kblocks, p.kblocks_per_split);
  if (tiles * p.splits >= (int64_t(1) << 31)) return none;
  return p;
}

// The C01B problem of float32 NHWC weight_acts run through C01B copies.
inline TmaProblem tma_c01b_copies_problem(const TmaProblem& pr) {
  TmaProblem pc = pr;
  const int64_t x_pixels = pr.in_h * pr.in_w, h_pixels = pr.out_h * pr.out_w;
  pc.xs = {1, x_pixels * pr.batch, pr.in_w * pr.batch, pr.batch};
  pc.ys = {1, h_pixels * pr.batch, pr.out_w * pr.batch, pr.batch};
  return pc;
}

// float32 NHWC weight_acts through C01B copies of the images and the hidden tensor.
inline TmaWeightsPlan tma_weights_via_c01b_plan(const TmaProblem& pr, int64_t workspace_bytes,
                                                int64_t nsm, int64_t passes = 1) {
  const int64_t x_pixels = pr.in_h * pr.in_w, h_pixels = pr.out_h * pr.out_w;
  if (!dense_nhwc(pr.xs, pr.cin, pr.in_w, pr.in_h) ||
      !dense_nhwc(pr.ys, pr.cout, pr.out_w, pr.out_h) ||
      std::max({pr.batch, pr.cin, pr.cout}) > kMaxSwapped)
    return {};
  const int64_t rest = workspace_bytes - tma_copy_bytes(pr.batch, x_pixels, pr.cin) -
                       tma_copy_bytes(pr.batch, h_pixels, pr.cout);
  if (rest < 4 * pr.cin * pr.cout * pr.fh * pr.fw) return {};
  return tma_weights_plan(Layout::kC01B, 4, tma_c01b_copies_problem(pr), rest, nsm, passes);
}

// ---- The plan ----

struct ConvPlan {
  ConvRoute route = ConvRoute::kCudaCores;
  int tile_n = 0;      // the TMA kernel's tile width (columns of 128-row tiles)
  bool split = false;  // the TMA core as 3xTF32: its residues at the workspace's start
};

// Whether a tensor of these sizes (n, c, y, x) and element strides fills its extent exactly (so
// that a dense copy with the same strides, such as its TF32 residue, holds it).
inline bool fills_extent(const Strides4& s, int64_t n, int64_t c, int64_t y, int64_t x) {
  const int64_t elements = n * c * y * x;
  if (elements == 0 || s.n < 0 || s.c < 0 || s.y < 0 || s.x < 0) return false;
  return 1 + (n - 1) * s.n + (c - 1) * s.c + (y - 1) * s.y + (x - 1) * s.x == elements;
}
// 3xTF32's residues are dense copies with the strides of the operands the kernel reads in place:
// those operands must fill their extent (the copies of the other routes always do).
inline bool residues_fit(ConvOp op, ConvRoute route, const ConvGeometry& g) {
  const bool images = fills_extent(g.image, g.batch, g.channels, g.in_h, g.in_w);
  const bool filters = fills_extent(g.filter, g.filters, g.channels, g.filter_h, g.filter_w);
  const bool hidden = fills_extent(g.hidden, g.batch, g.filters, g.out_h, g.out_w);
  switch (route) {
    case ConvRoute::kTma:
      return op == ConvOp::kFilterActs ? images : hidden && filters;
    case ConvRoute::kTmaViaNhwc:
      return op == ConvOp::kFilterActs || filters;
    case ConvRoute::kTmaWeights:
      return images && hidden;
    default:
      return true;
  }
}

// The route of one call. float32 at default precision runs on the TMA core as TF32 (16-bit types
// as they are); at precision High / Highest as 3xTF32 where tma_3xtf32_enabled(), its residues
// taking the workspace's first bytes, else the other kernels give float32 accuracy. The FFT path
// where the workspace has exactly its plan's size: after the TMA core for TF32 filter_acts and
// C01B weight_acts, which outrun it there, before it elsewhere and before 3xTF32
// (benchmarks/history/2026-12-02_session10_tf32_tma.md).
inline ConvPlan plan_conv(ConvOp op, const ConvGeometry& g, int64_t pad_bottom, int64_t pad_right,
                          int64_t itemsize, bool float32, const ConvDevice& dev,
                          int64_t workspace_bytes) {
  const bool c01b = g.layout == Layout::kC01B;
  const Layout layout = g.layout;
  const bool split = float32 && g.precision != Precision::kDefault;
  const auto tma_route = [&](int64_t workspace_bytes) -> ConvPlan {
    if (!(itemsize == 2 || float32) || (split && !tma_3xtf32_enabled()) || !dev.tma ||
        dev.cc_major != 9 || dev.cc_minor != 0 || tma_smem_bytes(256) > dev.smem_optin ||
        workspace_bytes < 0)
      return {};
    const int64_t nsm = std::max<int64_t>(dev.sm_count, 1), passes = split ? 3 : 1;
    if (op == ConvOp::kWeightActs) {
      const TmaProblem pr = tma_problem(false, g, pad_bottom, pad_right);
      if (float32 && !c01b) {
        const TmaWeightsPlan w = tma_weights_via_c01b_plan(pr, workspace_bytes, nsm, passes);
        return w.bn ? ConvPlan{ConvRoute::kTmaWeightsViaC01b, w.bn} : ConvPlan{};
      }
      const TmaWeightsPlan w =
          tma_weights_plan(layout, itemsize, pr, workspace_bytes, nsm, passes);
      return w.bn ? ConvPlan{ConvRoute::kTmaWeights, w.bn} : ConvPlan{};
    }
    const bool flip = op == ConvOp::kImageActs;
    if (flip && (g.stride_h != 1 || g.stride_w != 1)) return {};
    const TmaProblem pr = tma_problem(flip, g, pad_bottom, pad_right);
    if (float32 && c01b) {
      const int bn = tma_via_nhwc_tile(flip, pr, workspace_bytes, nsm);
      return bn ? ConvPlan{ConvRoute::kTmaViaNhwc, bn} : ConvPlan{};
    }
    const int bn = tma_forward_tile(layout, itemsize, flip, pr, workspace_bytes, nsm);
    return bn ? ConvPlan{ConvRoute::kTma, bn} : ConvPlan{};
  };
  const auto tma = [&]() -> ConvPlan {
    if (!split) return tma_route(workspace_bytes);
    ConvPlan p = tma_route(workspace_bytes - tf32_residue_bytes(op, g).total());
    if (p.route == ConvRoute::kCudaCores || !residues_fit(op, p.route, g)) return {};
    p.split = true;
    return p;
  };
  const auto fft = [&]() -> ConvPlan {
    const FftConvPlan f = fft_conv_plan(op == ConvOp::kWeightActs, g, itemsize);
    return f.ph != 0 && workspace_bytes == f.bytes ? ConvPlan{ConvRoute::kFft, 0} : ConvPlan{};
  };
  const bool tma_first = float32 && !split && (op == ConvOp::kFilterActs ||
                                               (op == ConvOp::kWeightActs && c01b));
  const ConvPlan first = tma_first ? tma() : fft();
  if (first.route != ConvRoute::kCudaCores) return first;
  return tma_first ? fft() : tma();
}

}  // namespace jax_convnet
