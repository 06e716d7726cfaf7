"""Writes wgmma_ops.cuh: python3 csrc/cuda/gen_wgmma_ops.py > csrc/cuda/wgmma_ops.cuh"""

HEADER = """\
// wgmma.mma_async with float32 accumulators, N = 64, 128, 192, 256, both operands in shared
// memory (descriptors da, db): d (64 x N per warpgroup) += A (64 x 16) * B (16 x N) for bf16 /
// f16 (m64nNk16; kTransA / kTransB: the operand is MN-major), and A (64 x 8) * B (8 x N) for
// TF32 (m64nNk8_tf32; both operands K-major, the only form TF32 has). Written by
// gen_wgmma_ops.py (the operand lists are too long to write by hand); sm_90a code only.
#pragma once

#include <cstdint>

namespace jax_convnet {
namespace cuda_conv {
"""

FOOTER = """\
}  // namespace cuda_conv
}  // namespace jax_convnet"""


def wrapper(n):
    r = n // 2
    regs = ", ".join(f"%{i}" for i in range(r))
    cons = ", ".join(f'"+f"(d[{i}])' for i in range(r))
    body = []
    for ty, cond in (("bf16", "if constexpr (kBf16) {"), ("f16", "} else {")):
        body.append(f"""  {cond}
    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{r + 2}, 0;\\n"
                 "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} "
                 "{{{regs}}}, %{r}, %{r + 1}, p, 1, 1, %{r + 3}, %{r + 4};\\n}}\\n"
                 : {cons}
                 : "l"(da), "l"(db), "r"(1), "n"(kTransA), "n"(kTransB));""")
    return (f"template <int kTransA, int kTransB, bool kBf16>\n"
            f"__device__ __forceinline__ void wgmma_m64n{n}k16(float (&d)[{r}], uint64_t da, "
            f"uint64_t db) {{\n" + "\n".join(body) + "\n  }\n}\n")


def wrapper_tf32(n):
    r = n // 2
    regs = ", ".join(f"%{i}" for i in range(r))
    cons = ", ".join(f'"+f"(d[{i}])' for i in range(r))
    return (f"__device__ __forceinline__ void wgmma_m64n{n}k8_tf32(float (&d)[{r}], uint64_t da, "
            f"uint64_t db) {{\n"
            f'  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{r + 2}, 0;\\n"\n'
            f'               "wgmma.mma_async.sync.aligned.m64n{n}k8.f32.tf32.tf32 "\n'
            f'               "{{{regs}}}, %{r}, %{r + 1}, p, 1, 1;\\n}}\\n"\n'
            f"               : {cons}\n"
            f'               : "l"(da), "l"(db), "r"(1));\n}}\n')


if __name__ == "__main__":
    print(HEADER)
    for n in (64, 128, 192, 256):
        print(wrapper(n))
    for n in (64, 128, 192, 256):
        print(wrapper_tf32(n))
    print(FOOTER)
