// CPU stand-in for mma.h's nvcuda::wmma (see cuda_runtime.h here).
//
// A fragment holds its whole 16 x 16 tile. The operations are warp-collective on the GPU; here
// lane 0 of the warp performs each one for the warp and the other lanes only count it, so
// that the emulation costs one tile product per warp, not 32, and a lane that skips an
// operation its warp-mates issue (divergent WMMA code) is caught at the next barrier.
// Loads and stores check WMMA's documented requirements: a 256-bit aligned pointer and a
// leading dimension that is a multiple of 16 bytes.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16 is emulated");
  float v[16][16];
};

namespace detail {
inline float as_float(float x) { return x; }
inline float as_float(__half x) { return __half2float(x); }
inline float as_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// True for the lane that performs the warp's operation; every lane counts it.
inline bool issue() {
  emu::Thread& t = emu::this_thread();
  ++t.tensor_core_ops;
  return emu::block()->current % 32 == 0;
}

template <typename T>
inline void check(const T* ptr, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) emu::fail("wmma: pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) emu::fail("wmma: leading dimension not a multiple of 16 bytes");
}
}  // namespace detail

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ldm) {
  static_assert(std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value,
                "a matrix_a/matrix_b fragment needs its layout");
  if (!detail::issue()) return;
  detail::check(ptr, ldm);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.v[i][j] = detail::as_float(std::is_same<Layout, row_major>::value ? ptr[i * ldm + j] : ptr[j * ldm + i]);
}

template <typename T>
inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, T value) {
  if (!detail::issue()) return;
  for (auto& row : f.v)
    for (float& x : row) x = static_cast<float>(value);
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  if (!detail::issue()) return;
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = c.v[i][j];
      for (int k = 0; k < 16; ++k) acc += a.v[i][k] * b.v[k][j];
      out[i][j] = acc;
    }
  std::memcpy(d.v, out, sizeof out);
}

inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t layout) {
  if (!detail::issue()) return;
  detail::check(ptr, ldm);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) (layout == mem_row_major ? ptr[i * ldm + j] : ptr[j * ldm + i]) = f.v[i][j];
}

}  // namespace wmma
}  // namespace nvcuda
