#pragma once
#include "conv_numeric.h"
struct __half { uint16_t v; };
inline float __half2float(__half h) { return jax_convnet::cpu::f16_to_float(h.v); }
inline __half __float2half_rn(float f) { return {jax_convnet::cpu::float_to_f16(f)}; }
inline __half __ushort_as_half(unsigned short v) { return {v}; }
