// Bit-exact conversions between float32 and the 16-bit storage types (bfloat16, IEEE float16).
// The CPU conv kernels compute in float32 and round the result once with these.
#pragma once

#include <cstdint>
#include <cstring>

namespace jax_convnet::cpu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// bfloat16 is the top half of a float32: widening is exact.
inline float bf16_to_float(uint16_t h) { return bits_float(uint32_t{h} << 16); }

// Round to nearest, ties to even; NaNs stay NaN (quieted).
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE binary16 -> binary32, exact for every input (subnormals, infinities, NaN payloads).
inline float f16_to_float(uint16_t h) {
  uint32_t sign = uint32_t{h & 0x8000u} << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24 is exact in float32.
  return bits_float(sign | float_bits(static_cast<float>(mantissa) * 0x1p-24f));
}

// binary32 -> binary16, round to nearest even, overflow to infinity, NaN -> quiet NaN.
inline uint16_t float_to_f16(float f) {
  uint32_t u = float_bits(f);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  uint16_t magnitude;
  if (u >= 0x47800000u) {  // >= 65536 (or inf / NaN): beyond the largest finite rounding
    magnitude = u > 0x7f800000u ? 0x7e00 : 0x7c00;
  } else if (u < 0x38800000u) {  // below 2^-14: the result is subnormal or zero
    // Adding 0.5f aligns the float's mantissa so that the FPU's own round-to-nearest-even
    // lands the half's subnormal bits in the low mantissa bits.
    const float magic = 0.5f;
    magnitude = static_cast<uint16_t>(float_bits(bits_float(u) + magic) - float_bits(magic));
  } else {
    uint32_t odd = (u >> 13) & 1u;
    u += 0xc8000fffu + odd;  // rebias exponent (127 -> 15) and round at bit 13
    magnitude = static_cast<uint16_t>(u >> 13);  // a mantissa carry may roll over into inf
  }
  return sign | magnitude;
}

}  // namespace jax_convnet::cpu
