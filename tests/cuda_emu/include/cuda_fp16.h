// CPU stand-in for cuda_fp16.h (see cuda_runtime.h here): IEEE binary16 via GCC's _Float16.
#pragma once
#include <cstring>

struct __half {
  unsigned short bits;
};

inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // round to nearest even
  __half r;
  std::memcpy(&r.bits, &h, sizeof r.bits);
  return r;
}

inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, sizeof v);
  return static_cast<float>(v);
}
