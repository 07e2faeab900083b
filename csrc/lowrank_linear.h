// The CUDA launchers of the low-rank fast-weight linear, as seen from the torch binding.
//
//   forward:  s = x A^T,  y = x W^T + b + scale s B^T
//   backward: grad_B += scale dY^T s,  dX = dY W + scale (dY B) A
//
// This header is the seam between the two halves of the extension (DESIGN.md, "Building CUDA
// on machines without a GPU"): it includes no CUDA and no torch header, so csrc/binding.cpp
// (torch only) and csrc/lowrank_linear.cu (CUDA only) can each be compiled where the other
// cannot. Tensors cross it as raw pointers, sizes, strides and a dtype tag; the stream as an
// opaque pointer (a cudaStream_t).
#pragma once

#include <cstdint>

namespace fastcl {

// The dtype of x, weight, bias, A and of the outputs y, s, dX. B and grad_B are always fp32.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The fused kernels keep the sketch (up to 64 columns) beside the output tile in shared memory
// and registers; a larger rank would not fit the 48 KiB of static shared memory per block.
constexpr int64_t kMaxRank = 64;

// The forward uses the decode path (a GEMV per output column) up to this many rows; above it,
// the tiled tensor-core kernel. See csrc/lowrank_linear.cu for why.
constexpr int64_t kDecodeMaxRows = 8;

struct LowrankFwdArgs {
  DType dtype;
  const void* x;          // (M, K), row-major
  const void* weight;     // (N, K): element (n, k) at weight[n * weight_stride_n + k * weight_stride_k]
  int64_t weight_stride_n;
  int64_t weight_stride_k;
  const void* bias;       // (N,) or nullptr
  const void* A;          // (r, K), row-major
  const float* B;         // (N, r), row-major, fp32
  float scale;
  int64_t M, K, N, r;
  void* y;                // (M, N), row-major, written
  void* s;                // (M, r), row-major, written
};

struct LowrankBwdArgs {
  DType dtype;
  const void* dy;         // (M, N), row-major
  const void* s;          // (M, r), row-major: the sketch saved by the forward
  const void* weight;     // (N, K), strides as in LowrankFwdArgs
  int64_t weight_stride_n;
  int64_t weight_stride_k;
  const void* A;          // (r, K), row-major
  const float* B;         // (N, r), row-major, fp32
  float* grad_B;          // (N, r), row-major, fp32: scale dY^T s is added into it
  float scale;
  int64_t M, K, N, r;
  void* dx;               // (M, K), row-major, written; nullptr when dX is not needed
};

// Each returns nullptr on success, or a message naming what went wrong (invalid arguments, or
// the CUDA error of the launch). `device` is the CUDA device index the tensors live on; the
// kernels are launched there and the caller's current device is restored afterwards. Kernel
// launches are asynchronous: errors raised while a kernel runs surface at the next sync.
const char* lowrank_linear_fwd(const LowrankFwdArgs& args, int device, void* stream);
const char* lowrank_linear_bwd(const LowrankBwdArgs& args, int device, void* stream);

}  // namespace fastcl
