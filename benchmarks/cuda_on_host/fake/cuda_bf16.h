#pragma once
#include "conv_numeric.h"
struct __nv_bfloat16 { uint16_t v; };
inline float __bfloat162float(__nv_bfloat16 h) { return jax_convnet::cpu::bf16_to_float(h.v); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {jax_convnet::cpu::float_to_bf16(f)}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return {v}; }
