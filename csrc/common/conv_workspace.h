// The workspace of the conv family's CUDA custom calls: one rule, asked by the lowering (through
// the CPU module's conv_workspace, jax_convnet/conv.py) to size the extra uint8 result, and by the
// CUDA host code (csrc/cuda/conv_launch.cuh) to find its parts. The paths that need temporary
// memory, in the order the rule gives it:
//   FFT       stride-1 convolutions with large filters: the three spectra (fft_conv_plan); the
//             whole workspace when it applies.
//   columns   image_acts into at most kIaColumnMaxChannels channels with large filters: a float32
//             column buffer of whole images (conv_image_acts_columns.cuh).
//   TF32      float32 on Hopper's TMA kernel, which reads both operands k-contiguous only:
//             copies of the operands that are not (run_tma, run_tma_c01b_tf32,
//             run_tma_weights_nhwc_tf32); above default precision (3xTF32) first the TF32
//             residues of both GEMM operands (tf32_residue_bytes), at the workspace's start.
//   partial   weight_acts' partial sums of one launch and a float32 running sum of the filters,
//   sums      then a copy of NHWC images of fewer than kWaPaddedChannels channels padded with
//             zero channels (conv_weight_acts_padding.cuh).
// The kernels take a path where the workspace holds what it needs, so a cap of 0 (the lowering's
// switches) turns that path off. A batch the lowering does not know (a symbolic dimension under
// jax.export) turns off every part whose size depends on it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "geometry.h"

namespace jax_convnet {

enum class ConvOp { kFilterActs = 0, kImageActs = 1, kWeightActs = 2 };


// Caps on the parts the lowering may give (bytes; 0: that path is off).
struct ConvWorkspaceCaps {
  int64_t fft = kFftMaxBytes;
  int64_t ia_columns = int64_t(256) << 20;  // fewer, larger chunks of images run faster
  int64_t wa_padded_images = int64_t(1) << 30;
};

constexpr int64_t kIaColumnMaxChannels = 4;
// channels * taps below this: the direct kernel is cheaper than writing and reading the buffer.
constexpr int64_t kIaColumnMinRows = 64;
constexpr int64_t kWaPaddedChannels = 4;
constexpr int64_t kWaMinPartialSumBytes = int64_t(16) << 20;

// image_acts' column buffer: as many whole images' columns (4 * channels * fh * fw * Ho * Wo
// bytes each) as the cap holds and the batch has; 0 where the path does not apply.
inline int64_t ia_column_bytes(const ConvGeometry& g, bool batch_known, int64_t cap) {
  const int64_t rows = g.channels * g.filter_h * g.filter_w;
  if (g.channels > kIaColumnMaxChannels || rows < kIaColumnMinRows || !batch_known) return 0;
  const int64_t image_bytes = 4 * rows * g.out_h * g.out_w;
  return std::min(g.batch, cap / image_bytes) * image_bytes;
}

// weight_acts' partial sums of one launch (at least 16 MiB, or one float32 copy of the filters if
// larger) and a float32 running sum of the filters, rounded up to 256 bytes.
inline int64_t wa_partial_sum_bytes(int64_t filter_elems) {
  return round_up(std::max(kWaMinPartialSumBytes, 4 * filter_elems) + 4 * filter_elems, 256);
}

inline int64_t wa_padded_image_bytes(int64_t pixels, int64_t itemsize) {
  return round_up(pixels * kWaPaddedChannels * itemsize, 256);
}

constexpr int64_t kTmaKBlockBytes = 128;  // a k-block of the TMA kernels: 128 bytes of k
// Whether the TMA kernels take a convolution of cin input and cout output channels of itemsize
// bytes: both in 16-byte vectors, the input channels filling at least 3/4 of their k-blocks, and
// at least 48 output channels (3/4 of the narrowest tile; narrower convolutions, e.g. the
// CIFAR-10 net's 32 channels, run faster on the other kernels:
// benchmarks/history/2026-12-02_session9_tma_core.md).
inline bool tma_channels_fit(int64_t cin, int64_t cout, int64_t itemsize) {
  const int64_t V = 16 / itemsize, kK = kTmaKBlockBytes / itemsize;
  return cin % V == 0 && cout % V == 0 && cout >= 48 && 4 * cin >= 3 * round_up(cin, kK);
}

// 3xTF32 on the TMA core (float32 above default precision): until it has run on a GPU, only where
// JAX_CONVNET_TMA_3XTF32=1 (the other kernels give float32 accuracy everywhere).
inline bool tma_3xtf32_enabled() {
  const char* env = std::getenv("JAX_CONVNET_TMA_3XTF32");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

// 3xTF32's residues (x minus its TF32 truncation, which the tensor cores read for x) of an op's
// two GEMM operands, dense, each rounded up to 256 bytes: filter_acts the images and the taps,
// image_acts the hidden tensor and the filters, weight_acts the images and the hidden tensor.
struct Tf32Residues {
  int64_t first = 0, second = 0;
  int64_t total() const { return first + second; }
};
inline Tf32Residues tf32_residue_bytes(ConvOp op, const ConvGeometry& g) {
  const int64_t images = round_up(4 * g.batch * g.in_h * g.in_w * g.channels, 256);
  const int64_t hidden = round_up(4 * g.batch * g.out_h * g.out_w * g.filters, 256);
  const int64_t taps = round_up(4 * g.channels * g.filters * g.filter_h * g.filter_w, 256);
  switch (op) {
    case ConvOp::kFilterActs: return {images, taps};
    case ConvOp::kImageActs: return {hidden, taps};
    case ConvOp::kWeightActs: return {images, hidden};
  }
  return {};
}

// The TF32 kernel's copies: NHWC filter_acts its taps; C01B filter_acts the images and the hidden
// tensor as NHWC, then its taps; C01B image_acts at stride 1 the hidden tensor and the images as
// NHWC; NHWC weight_acts the images and the hidden tensor as C01B (each tensor rounded up to 256
// bytes); above default precision (3xTF32) the residues before them. 0 elsewhere, and where the
// kernel cannot take the channels (tma_channels_fit; the C01B kernel also a batch in 4s of at
// least 64).
inline int64_t tf32_copies_bytes(ConvOp op, const ConvGeometry& g, bool batch_known) {
  const bool split = g.precision != Precision::kDefault;
  if (!batch_known || (split && !tma_3xtf32_enabled())) return 0;
  const bool c01b = g.layout == Layout::kC01B;
  const int64_t cin = op == ConvOp::kImageActs ? g.filters : g.channels;
  const int64_t cout = op == ConvOp::kImageActs ? g.channels : g.filters;
  if (!tma_channels_fit(cin, cout, 4)) return 0;
  const int64_t images = round_up(4 * g.batch * g.in_h * g.in_w * g.channels, 256);
  const int64_t hidden = round_up(4 * g.batch * g.out_h * g.out_w * g.filters, 256);
  const int64_t taps = 4 * g.channels * g.filters * g.filter_h * g.filter_w;
  const bool stride_1 = g.stride_h == 1 && g.stride_w == 1;
  const int64_t residues = split ? tf32_residue_bytes(op, g).total() : 0;
  switch (op) {
    case ConvOp::kFilterActs:
      return residues + (c01b ? images + hidden + taps : taps);
    case ConvOp::kImageActs:
      return !stride_1 ? 0 : residues + (c01b ? images + hidden : 0);
    case ConvOp::kWeightActs:
      if (c01b) return residues;
      return g.batch % 4 == 0 && g.batch >= 64 ? residues + images + hidden : 0;
  }
  return 0;
}

// The workspace of one call, by part (bytes; at most one of fft and the rest is nonzero).
struct ConvWorkspace {
  int64_t fft = 0, ia_columns = 0, tf32_copies = 0, wa_partial_sums = 0, wa_padded_images = 0;
  // image_acts: the column buffer and the TF32 copies share the same bytes (one path runs).
  int64_t total() const {
    return fft + std::max(ia_columns, tf32_copies) + wa_partial_sums + wa_padded_images;
  }
};

// `float32`: the operands are float32 (TF32's copies are for float32 only); `itemsize` their
// element size.
inline ConvWorkspace conv_workspace(ConvOp op, const ConvGeometry& g, int64_t itemsize,
                                    bool float32, bool batch_known, const ConvWorkspaceCaps& caps) {
  ConvWorkspace w;
  if (batch_known) {
    const FftConvPlan fft = fft_conv_plan(op == ConvOp::kWeightActs, g, itemsize, caps.fft);
    if (fft.bytes > 0) {
      w.fft = fft.bytes;
      return w;
    }
  }
  if (float32) w.tf32_copies = tf32_copies_bytes(op, g, batch_known);
  if (op == ConvOp::kImageActs) {
    w.ia_columns = ia_column_bytes(g, batch_known, caps.ia_columns);
  } else if (op == ConvOp::kWeightActs) {
    w.wa_partial_sums = wa_partial_sum_bytes(g.filters * g.channels * g.filter_h * g.filter_w);
    if (g.layout == Layout::kNHWC && g.channels < kWaPaddedChannels && batch_known) {
      const int64_t padded = wa_padded_image_bytes(g.batch * g.in_h * g.in_w, itemsize);
      if (padded <= caps.wa_padded_images) w.wa_padded_images = padded;
    }
  }
  return w;
}

}  // namespace jax_convnet
