// Host stand-ins for the bits of CUDA that csrc/cuda/local.cu uses (see ../run.sh): one block
// at a time, one std::thread per CUDA thread, __syncthreads as a std::barrier.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>
struct Dim { unsigned x = 0; };
inline thread_local Dim threadIdx, blockIdx;
inline Dim gridDim, blockDim;
inline std::barrier<>* g_barrier = nullptr;
inline void __syncthreads() { g_barrier->arrive_and_wait(); }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
typedef struct CUstream_st* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "?"; }
template <typename F>
void emu_launch(int64_t blocks, int threads, F body) {
  gridDim.x = static_cast<unsigned>(blocks);
  blockDim.x = threads;
  for (int64_t b = 0; b < blocks; ++b) {
    std::barrier<> bar(threads);
    g_barrier = &bar;
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&, t] { threadIdx.x = t; blockIdx.x = static_cast<unsigned>(b); body(); });
    for (auto& th : ts) th.join();
  }
}
