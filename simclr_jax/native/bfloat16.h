// bfloat16 values for the FFI kernels in this directory: read as float32, written rounded to
// nearest even (as XLA's and NumPy's conversions do), NaNs kept NaN.

#ifndef SIMCLR_JAX_NATIVE_BFLOAT16_H_
#define SIMCLR_JAX_NATIVE_BFLOAT16_H_

#include <cstdint>
#include <cstring>

namespace simclr_native {

// A bfloat16 value: the high half of a float32's bits.
struct Bf16 {
  uint16_t bits;
};

inline float ToFloat(float v) { return v; }
inline float ToFloat(Bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void Store(float* p, float v) { *p = v; }
inline void Store(Bf16* p, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  bits = nan ? (bits | 0x00400000u) : bits + 0x7fffu + ((bits >> 16) & 1u);
  p->bits = static_cast<uint16_t>(bits >> 16);
}

}  // namespace simclr_native

#endif  // SIMCLR_JAX_NATIVE_BFLOAT16_H_
