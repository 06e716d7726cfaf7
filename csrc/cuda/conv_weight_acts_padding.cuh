// weight_acts of NHWC images with fewer than 4 channels (RGB first layers: L1, AlexNet conv1):
// the images are first copied into the workspace with zero channels up to kPaddedChannels, so
// that the tensor cores' loader reads a pixel's channels in one copy (8 bytes in 16-bit types,
// 16 in float32) instead of one element at a time (16-bit types: no tensor cores at all, since
// cp.async moves 4 bytes at least). The GEMM gets 4 / C times the rows (M = 4 * fh * fw); the
// padded rows' sums are never stored (OpWA::out_row, KParams::C_out). The host side, and the
// workspace rule it shares with jax_convnet/geometry.py, is run_wa_padding in conv_launch.cuh.
#pragma once

#include "conv_common.cuh"

namespace jax_convnet {
namespace cuda_conv {

constexpr int kPaddedChannels = 4;  // jcn::kWaPaddedChannels (conv_workspace.h)

// dst[px][0..3] = src[px][0..C-1], then zeros; one pixel per thread (one vector store).
template <typename T>
__global__ void __launch_bounds__(256)
    wa_pad_channels_kernel(const T* __restrict__ src, T* __restrict__ dst, int64_t pixels, int C) {
  for (int64_t px = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; px < pixels;
       px += int64_t(gridDim.x) * blockDim.x) {
    Vec<T, kPaddedChannels> v;
#pragma unroll
    for (int c = 0; c < kPaddedChannels; ++c) v.v[c] = c < C ? src[px * C + c] : zero_elem<T>();
    *reinterpret_cast<Vec<T, kPaddedChannels>*>(dst + px * kPaddedChannels) = v;
  }
}

}  // namespace cuda_conv
}  // namespace jax_convnet
