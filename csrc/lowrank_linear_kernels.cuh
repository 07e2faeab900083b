// The kernels of the low-rank fast-weight linear, and the plan that picks and parameterises
// them for one call. Device code plus plain host C++: no CUDA runtime API call and no torch.
//
// It is included by csrc/lowrank_linear.cu, which launches the plan on a stream, and by the CPU
// emulation test (tests/cuda_emu/), which runs the same plan and the same kernels on the CPU
// with one fiber per thread. That way the kernels' index arithmetic, the strides each pass
// feeds them and the dispatch are checked on machines without a GPU.
//
// One kernel serves both passes. The forward and the backward have the same shape:
//
//   forward:  y  = x  W^T + b + c (x  A^T) B^T     reduce over d_in,  sketch operand A^T, epilogue B^T
//   backward: dX = dY W       + c (dY B  ) A       reduce over d_out, sketch operand B,   epilogue A
//
// that is  out[M, P] = in[M, Q] Wm[Q, P] + bias + c (in[M, Q] S[Q, r]) E[r, P].
// The r sketch columns ride beside the GEMM's column tile in the same reduction loop, so `in`
// is read once for both; each block keeps its (in S) rows in fp32 and applies E in the
// epilogue. Every column block recomputes the sketch of its rows: round_up(r, 16) / 64 extra
// tensor-core work (a quarter at r <= 16), traded for no second pass over `in` and no
// dependency between blocks. Whether the trade wins is for the benchmark to say. The backward also adds c dY^T s into grad_B from the dY tiles it has already
// loaded, so dY is read once for dX and dB together (DESIGN.md: "one pass").
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "lowrank_linear.h"

namespace fastcl {
namespace kernels {

using namespace nvcuda;

// ---------------------------------------------------------------------------------------------
// Element conversions. torch builds extensions with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so every conversion is spelled out; all arithmetic is fp32.

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---------------------------------------------------------------------------------------------
// The tiled kernel.
//
// A block computes a kBM x kBP tile of `out`, stepping through the reduction dimension kBQ at a
// time. 64 x 64 tiles with 4 warps (each 32 x 32) are the smallest tiles where a warp's
// tensor-core fragments are reused (2 x 2), and small enough that the fp32 staging of the
// epilogue plus a 64-wide sketch fits in 48 KiB of static shared memory, so the launch needs
// no opt-in attribute. The loop is single-buffered (load, barrier, multiply, barrier): the
// simplest correct pipeline; latency is hidden by several resident blocks per SM rather than
// by cp.async stages. Correctness first: a multi-stage pipeline is the next step if the
// benchmark asks for it.

constexpr int kBM = 64;              // rows of `in` per block (tokens)
constexpr int kBP = 64;              // output columns per block
constexpr int kBQ = 32;              // reduction step
constexpr int kThreads = 128;        // 4 warps, 2 x 2 over the block tile
constexpr int kWarpsP = 2;
constexpr int kWarpTile = 32;        // each warp owns 32 x 32 of the output
constexpr int kRankTile = 16;        // sketch columns are processed 16 at a time (one MMA width)
constexpr int kMaxRankTiles = static_cast<int>(kMaxRank) / kRankTile;
// With 2 warps across P, warp_p handles rank tiles warp_p, warp_p + 2: at most 2 each.
constexpr int kRankTilesPerWarp = kMaxRankTiles / kWarpsP;
// Without dX the backward only accumulates grad_B; this many blocks split the d_out loop.
constexpr int kGradOnlySplit = 32;

static_assert(kMaxRank % kRankTile == 0, "the rank tiles must cover kMaxRank");
static_assert(kBP == kWarpsP * kWarpTile && kBM == 2 * kWarpTile && kThreads == 4 * 32, "2 x 2 warps");

// Row padding of the shared tiles: 16 bytes keeps WMMA's leading dimension legal (a multiple of
// 16 bytes) while shifting successive rows across shared-memory banks.
template <typename T> struct Pad { static constexpr int value = 16 / sizeof(T); };

// Shared memory of the main loop. `in` is [row][q]; `w` and `sk` are [q][column], so the
// multiply reads both row-major (the layout WMMA's row_major fragments want).
template <typename T> struct MainTiles {
  static constexpr bool kTensorCores = !std::is_same<T, float>::value;
  T in[kBM][kBQ + Pad<T>::value];
  T w[kBQ][kBP + Pad<T>::value];
  T sk[kBQ][kMaxRank + Pad<T>::value];
  T saved[kBM][kMaxRank + Pad<T>::value];            // backward: the forward's sketch s
  float grad[kTensorCores ? kBQ : 1][kMaxRank + 4];  // backward, tensor-core path: dB staging
};

// Shared memory of the epilogue, reusing the main loop's bytes: fp32 accumulators, the fp32
// sketch, and 16 rows of E at a time (a whole 64 x 64 E tile would not fit beside the rest).
struct EpilogueTiles {
  float out[kBM][kBP + 4];
  float sk[kBM][kMaxRank + 4];
  float e[kRankTile][kBP];
};

template <typename T> constexpr size_t smem_bytes() {
  return sizeof(MainTiles<T>) > sizeof(EpilogueTiles) ? sizeof(MainTiles<T>) : sizeof(EpilogueTiles);
}
static_assert(smem_bytes<float>() <= 48 * 1024, "fp32 tiles exceed static shared memory");
static_assert(smem_bytes<__half>() <= 48 * 1024, "fp16 tiles exceed static shared memory");
// WMMA needs 256-bit aligned fragment pointers: every array starts on a 32-byte boundary.
static_assert(sizeof(MainTiles<__half>::in) % 32 == 0 && sizeof(MainTiles<__half>::w) % 32 == 0 &&
              sizeof(MainTiles<__half>::sk) % 32 == 0 && sizeof(MainTiles<__half>::saved) % 32 == 0,
              "shared tiles must keep 32-byte alignment");
static_assert(sizeof(EpilogueTiles::out) % 32 == 0 && sizeof(EpilogueTiles::sk) % 32 == 0,
              "shared tiles must keep 32-byte alignment");

// The kernel's operands, each a strided view so that one kernel reads the forward's A^T and
// B^T, the backward's B and A, and a weight stored either way (nn.Linear (N, K) or GPT-2
// Conv1D (K, N)) without copies.
template <typename T, typename TS, typename TE> struct TiledParams {
  const T* in;       int64_t ld_in;           // [M][Q]
  const T* w;        int64_t w_sq, w_sp;      // Wm[q][p] = w[q * w_sq + p * w_sp]
  const TS* sk;      int64_t s_sq, s_sj;      // S[q][j]
  const TE* e;       int64_t e_sj, e_sp;      // E[j][p]
  const T* bias;                              // [P] or nullptr
  T* out;                                     // [M][P], or nullptr: backward without dX
  T* sketch_out;                              // [M][r] or nullptr (forward: s)
  const T* saved;                             // [M][r] or nullptr (backward: s)
  float* grad;                                // [Q][r] or nullptr (backward: grad_B)
  float scale;
  int M, Q, P, r;
};

// Copy a rows x cols tile of a strided matrix into shared memory, converting to TDst and
// zero-filling outside [0, row_limit) x [0, col_limit), so the multiply needs no bounds
// checks and padding rows and rank columns contribute exact zeros. Consecutive threads walk
// along whichever dimension is contiguous in global memory, so a warp's loads coalesce.
// One element per load keeps this correct for any stride and alignment; 16-byte vector loads
// (and cp.async) are the first optimisation to try once a GPU profile shows the cost.
template <typename TDst, typename TSrc>
__device__ __forceinline__ void load_tile(TDst* dst, int ld_dst, const TSrc* src, int64_t s_row, int64_t s_col,
                                          int row0, int col0, int row_limit, int col_limit, int rows, int cols) {
  const bool along_rows = s_row == 1 && s_col != 1;
  for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
    const int rr = along_rows ? idx % rows : idx / cols;
    const int cc = along_rows ? idx / rows : idx % cols;
    const int row = row0 + rr, col = col0 + cc;
    float v = 0.0f;
    if (row < row_limit && col < col_limit) v = to_float(src[row * s_row + col * s_col]);
    dst[rr * ld_dst + cc] = from_float<TDst>(v);
  }
}

// How a warp multiplies its share of the shared tiles: tensor cores for fp16/bf16 (fp32
// accumulate), plain FMAs for fp32. TF32 tensor cores would be faster but keep only 10
// mantissa bits, which the fp32 tolerance (1e-5) does not allow.
template <typename T> struct TensorCoreWarp {
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  FragC out[2][2];                     // the warp's 32 x 32 output block
  FragC sk[2][kRankTilesPerWarp];      // its 32 rows x rank tiles warp_p, warp_p + 2

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(out[i][j], 0.0f);
#pragma unroll
      for (int t = 0; t < kRankTilesPerWarp; ++t) wmma::fill_fragment(sk[i][t], 0.0f);
    }
  }

  __device__ void multiply(const MainTiles<T>& sm, int warp_m, int warp_p, int rank_tiles) {
#pragma unroll
    for (int kk = 0; kk < kBQ; kk += 16) {
      FragA a[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &sm.in[warp_m * kWarpTile + i * 16][kk], kBQ + Pad<T>::value);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        FragB b;
        wmma::load_matrix_sync(b, &sm.w[kk][warp_p * kWarpTile + j * 16], kBP + Pad<T>::value);
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::mma_sync(out[i][j], a[i], b, out[i][j]);
      }
#pragma unroll
      for (int t = 0; t < kRankTilesPerWarp; ++t) {
        const int tile = warp_p + kWarpsP * t;
        if (tile < rank_tiles) {  // warp-uniform: the fragment ops stay converged
          FragB b;
          wmma::load_matrix_sync(b, &sm.sk[kk][tile * kRankTile], kMaxRank + Pad<T>::value);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(sk[i][t], a[i], b, sk[i][t]);
        }
      }
    }
  }

  __device__ void store(EpilogueTiles& ep, int warp_m, int warp_p, int rank_tiles) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = warp_m * kWarpTile + i * 16;
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&ep.out[row][warp_p * kWarpTile + j * 16], out[i][j], kBP + 4, wmma::mem_row_major);
#pragma unroll
      for (int t = 0; t < kRankTilesPerWarp; ++t) {
        const int tile = warp_p + kWarpsP * t;
        if (tile < rank_tiles)
          wmma::store_matrix_sync(&ep.sk[row][tile * kRankTile], sk[i][t], kMaxRank + 4, wmma::mem_row_major);
      }
    }
  }
};

struct FmaWarp {
  // Lane (lr, lc) = (lane / 8, lane % 8) owns rows lr + 4 i and columns lc + 8 j of the warp's
  // block: neighbouring lanes read neighbouring columns (no bank conflicts), and lanes sharing
  // a row read the same `in` element (a broadcast).
  float out[8][4];
  float sk[kRankTilesPerWarp][8][2];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) out[i][j] = 0.0f;
#pragma unroll
      for (int t = 0; t < kRankTilesPerWarp; ++t) sk[t][i][0] = sk[t][i][1] = 0.0f;
    }
  }

  __device__ void multiply(const MainTiles<float>& sm, int warp_m, int warp_p, int rank_tiles) {
    const int lr = (threadIdx.x % 32) / 8, lc = threadIdx.x % 8;
    const int row0 = warp_m * kWarpTile + lr, col0 = warp_p * kWarpTile + lc;
#pragma unroll 4
    for (int k = 0; k < kBQ; ++k) {
      float a[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = sm.in[row0 + 4 * i][k];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float b = sm.w[k][col0 + 8 * j];
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i][j] = fmaf(a[i], b, out[i][j]);
      }
#pragma unroll
      for (int t = 0; t < kRankTilesPerWarp; ++t) {
        const int tile = warp_p + kWarpsP * t;
        if (tile < rank_tiles) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float b = sm.sk[k][tile * kRankTile + lc + 8 * j];
#pragma unroll
            for (int i = 0; i < 8; ++i) sk[t][i][j] = fmaf(a[i], b, sk[t][i][j]);
          }
        }
      }
    }
  }

  __device__ void store(EpilogueTiles& ep, int warp_m, int warp_p, int rank_tiles) {
    const int lr = (threadIdx.x % 32) / 8, lc = threadIdx.x % 8;
    const int row0 = warp_m * kWarpTile + lr, col0 = warp_p * kWarpTile + lc;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) ep.out[row0 + 4 * i][col0 + 8 * j] = out[i][j];
#pragma unroll
      for (int t = 0; t < kRankTilesPerWarp; ++t) {
        const int tile = warp_p + kWarpsP * t;
        if (tile < rank_tiles) {
          ep.sk[row0 + 4 * i][tile * kRankTile + lc] = sk[t][i][0];
          ep.sk[row0 + 4 * i][tile * kRankTile + lc + 8] = sk[t][i][1];
        }
      }
    }
  }
};

// grad[q0 + qq][j] += scale * sum_m in[m][qq] saved[m][j] for the chunk's kBQ rows of grad_B:
// this block's tokens' share of dB = c dY^T s, from the dY tile already in shared memory.
// Blocks of different row tiles add into the same rows of grad_B, hence the fp32 atomics: the
// sum is exact up to fp32 rounding, but its order (and last bit) varies from run to run.
template <typename T>
__device__ void accumulate_grad_chunk(MainTiles<T>& sm, float* grad, int q0, int Q, int r, int rank_tiles, float scale) {
  if constexpr (MainTiles<T>::kTensorCores) {
    // Warp w computes rows (w % 2) * 16 of the chunk against rank tiles w / 2 and w / 2 + 2.
    // dY^T is read from the row-major dY tile as a col_major matrix_a: no transposed copy.
    const int warp = threadIdx.x / 32;
    const int q_frag = warp % 2;
#pragma unroll
    for (int t = 0; t < kRankTilesPerWarp; ++t) {
      const int tile = warp / 2 + kWarpsP * t;
      if (tile < rank_tiles) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.0f);
#pragma unroll
        for (int mm = 0; mm < kBM; mm += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(a, &sm.in[mm][q_frag * 16], kBQ + Pad<T>::value);
          wmma::load_matrix_sync(b, &sm.saved[mm][tile * kRankTile], kMaxRank + Pad<T>::value);
          wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(&sm.grad[q_frag * 16][tile * kRankTile], acc, kMaxRank + 4, wmma::mem_row_major);
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < kBQ * r; idx += kThreads) {
      const int qq = idx / r, j = idx % r;  // consecutive threads: consecutive grad_B addresses
      if (q0 + qq < Q) atomicAdd(&grad[static_cast<int64_t>(q0 + qq) * r + j], scale * sm.grad[qq][j]);
    }
  } else {
    for (int idx = threadIdx.x; idx < kBQ * r; idx += kThreads) {
      const int qq = idx / r, j = idx % r;
      if (q0 + qq >= Q) continue;
      float acc = 0.0f;
#pragma unroll 8
      for (int m = 0; m < kBM; ++m) acc = fmaf(sm.in[m][qq], sm.saved[m][j], acc);
      atomicAdd(&grad[static_cast<int64_t>(q0 + qq) * r + j], scale * acc);
    }
  }
}

template <typename T, typename TS, typename TE>
__global__ void __launch_bounds__(kThreads) fused_lowrank_kernel(const TiledParams<T, TS, TE> p) {
  // Static shared memory as raw bytes: the main-loop tiles and the epilogue tiles share it,
  // and __half arrays cannot sit in a union.
  __shared__ __align__(128) unsigned char smem[smem_bytes<T>()];
  auto& sm = *reinterpret_cast<MainTiles<T>*>(smem);
  auto& ep = *reinterpret_cast<EpilogueTiles*>(smem);
  using Warp = std::conditional_t<MainTiles<T>::kTensorCores, TensorCoreWarp<T>, FmaWarp>;

  const int warp = threadIdx.x / 32;
  const int warp_m = warp / kWarpsP, warp_p = warp % kWarpsP;
  const int m0 = blockIdx.x * kBM, p0 = blockIdx.y * kBP;
  const int rank_tiles = (p.r + kRankTile - 1) / kRankTile;
  const int rank_pad = rank_tiles * kRankTile;
  const int chunks = (p.Q + kBQ - 1) / kBQ;
  const bool computes_out = p.out != nullptr;
  // Chunk c's share of grad_B is added by the block with blockIdx.y == c % gridDim.y: each
  // (row tile, chunk) pair exactly once, spread over the blocks of a row tile.
  const bool adds_grad = p.grad != nullptr && static_cast<int>(blockIdx.y) < chunks;

  if (adds_grad)
    load_tile(&sm.saved[0][0], kMaxRank + Pad<T>::value, p.saved, p.r, 1, m0, 0, p.M, p.r, kBM, rank_pad);

  Warp acc;
  acc.zero();
  for (int c = 0; c < chunks; ++c) {
    const bool grad_here = adds_grad && c % gridDim.y == blockIdx.y;
    if (!computes_out && !grad_here) continue;  // uniform across the block
    const int q0 = c * kBQ;
    load_tile(&sm.in[0][0], kBQ + Pad<T>::value, p.in, p.ld_in, 1, m0, q0, p.M, p.Q, kBM, kBQ);
    if (computes_out) {
      load_tile(&sm.w[0][0], kBP + Pad<T>::value, p.w, p.w_sq, p.w_sp, q0, p0, p.Q, p.P, kBQ, kBP);
      load_tile(&sm.sk[0][0], kMaxRank + Pad<T>::value, p.sk, p.s_sq, p.s_sj, q0, 0, p.Q, p.r, kBQ, rank_pad);
    }
    __syncthreads();
    if (computes_out) acc.multiply(sm, warp_m, warp_p, rank_tiles);
    if (grad_here) accumulate_grad_chunk<T>(sm, p.grad, q0, p.Q, p.r, rank_tiles, p.scale);
    __syncthreads();  // the next chunk (or the epilogue) overwrites these tiles
  }
  if (!computes_out) return;

  // Epilogue: out = acc + bias + scale * (in S) E, with (in S) kept in fp32 (the reference
  // rounds it to x's dtype first; keeping fp32 is at least as accurate).
  acc.store(ep, warp_m, warp_p, rank_tiles);
  __syncthreads();
  constexpr int kPerThread = kBM * kBP / kThreads;
  float low_rank[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) low_rank[i] = 0.0f;
  for (int t = 0; t < rank_tiles; ++t) {
    load_tile(&ep.e[0][0], kBP, p.e, p.e_sj, p.e_sp, t * kRankTile, p0, p.r, p.P, kRankTile, kBP);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      // Consecutive threads take consecutive columns of one row: coalesced stores below,
      // conflict-free reads of ep.e, broadcast reads of ep.sk.
      const int idx = threadIdx.x + i * kThreads, mm = idx / kBP, pp = idx % kBP;
#pragma unroll
      for (int jj = 0; jj < kRankTile; ++jj) low_rank[i] = fmaf(ep.sk[mm][t * kRankTile + jj], ep.e[jj][pp], low_rank[i]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int idx = threadIdx.x + i * kThreads, mm = idx / kBP, pp = idx % kBP;
    const int m = m0 + mm, col = p0 + pp;
    if (m < p.M && col < p.P) {
      float v = ep.out[mm][pp] + p.scale * low_rank[i];
      if (p.bias != nullptr) v += to_float(p.bias[col]);
      p.out[static_cast<int64_t>(m) * p.P + col] = from_float<T>(v);
    }
  }
  // Every column block computed the same sketch rows; the first one writes them.
  if (p.sketch_out != nullptr && blockIdx.y == 0) {
    for (int idx = threadIdx.x; idx < kBM * p.r; idx += kThreads) {
      const int mm = idx / p.r, j = idx % p.r;
      if (m0 + mm < p.M) p.sketch_out[static_cast<int64_t>(m0 + mm) * p.r + j] = from_float<T>(ep.sk[mm][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The decode path (M <= kDecodeMaxRows, row-major weight).
//
// With a handful of tokens the op is bound by reading W once. A 64-row tile would waste most of
// its tensor-core work on padding, and its grid (one block per 64 columns) is too small to
// keep enough loads in flight. Instead one warp reads one row of W with 16-byte loads and dots
// it with every token. The sketch s = x A^T is needed by every output column, so it comes
// first from its own tiny kernel; recomputing it per warp would read A once per column.

constexpr int kDecodeThreads = 256;
constexpr int kDecodeRows = static_cast<int>(kDecodeMaxRows);

template <typename T> struct DecodeParams {
  const T* x;                 // [M][K]
  const T* w;  int64_t ldw;   // [N][K], row-major
  const T* bias;              // [N] or nullptr
  const T* A;                 // [r][K]
  const float* B;             // [N][r]
  T* s;                       // [M][r]: written by the sketch kernel, read by the GEMV
  T* y;                       // [M][N]
  float scale;
  int M, K, N, r;
  bool vectorized;            // x, w, K and ldw allow 16-byte loads
};

// s[m][j] = sum_k x[m][k] A[j][k]: one block per rank j.
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) decode_sketch_kernel(const DecodeParams<T> p) {
  const int j = blockIdx.x;
  float acc[kDecodeRows];
#pragma unroll
  for (int m = 0; m < kDecodeRows; ++m) acc[m] = 0.0f;
  for (int k = threadIdx.x; k < p.K; k += kDecodeThreads) {
    const float a = to_float(p.A[static_cast<int64_t>(j) * p.K + k]);
#pragma unroll
    for (int m = 0; m < kDecodeRows; ++m)
      if (m < p.M) acc[m] = fmaf(to_float(p.x[static_cast<int64_t>(m) * p.K + k]), a, acc[m]);
  }
  __shared__ float partial[kDecodeThreads / 32][kDecodeRows];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < kDecodeRows; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0) partial[warp][m] = v;
  }
  __syncthreads();
  const int m = threadIdx.x;
  if (m < p.M) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kDecodeThreads / 32; ++w) v += partial[w][m];
    p.s[static_cast<int64_t>(m) * p.r + j] = from_float<T>(v);
  }
}

// y[m][n] = x[m] . W[n] + bias[n] + scale * s[m] . B[n]: one warp per output column n.
// The low-rank term reads s rounded to x's dtype, as the reference does.
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) decode_gemv_kernel(const DecodeParams<T> p) {
  const int lane = threadIdx.x % 32;
  const int n = blockIdx.x * (kDecodeThreads / 32) + threadIdx.x / 32;
  if (n >= p.N) return;  // a whole warp leaves; no block barrier follows
  const T* w = p.w + static_cast<int64_t>(n) * p.ldw;
  float acc[kDecodeRows];
#pragma unroll
  for (int m = 0; m < kDecodeRows; ++m) acc[m] = 0.0f;
  if (p.vectorized) {
    // One 16-byte load per operand; memcpy moves the bytes into typed registers. (Reading the
    // T values through the uint4 object itself would break strict aliasing: GCC at -O2 did
    // miscompile that in the CPU emulation, and nvcc's LLVM back end has the same license.)
    constexpr int kVec = 16 / sizeof(T);
    for (int k = lane * kVec; k < p.K; k += 32 * kVec) {
      const uint4 w_raw = *reinterpret_cast<const uint4*>(w + k);
      T w_vals[kVec];
      memcpy(w_vals, &w_raw, sizeof w_raw);
#pragma unroll
      for (int m = 0; m < kDecodeRows; ++m) {
        if (m < p.M) {
          const uint4 x_raw = *reinterpret_cast<const uint4*>(p.x + static_cast<int64_t>(m) * p.K + k);
          T x_vals[kVec];
          memcpy(x_vals, &x_raw, sizeof x_raw);
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[m] = fmaf(to_float(x_vals[e]), to_float(w_vals[e]), acc[m]);
        }
      }
    }
  } else {
    for (int k = lane; k < p.K; k += 32) {
      const float wk = to_float(w[k]);
#pragma unroll
      for (int m = 0; m < kDecodeRows; ++m)
        if (m < p.M) acc[m] = fmaf(to_float(p.x[static_cast<int64_t>(m) * p.K + k]), wk, acc[m]);
    }
  }
  // Every lane ends with every row's sum; lane m finishes row m. (Selecting acc[lane] by a
  // loop keeps acc in registers; indexing it by lane would spill it to local memory.)
  float dot = 0.0f;
#pragma unroll
  for (int m = 0; m < kDecodeRows; ++m) {
    const float v = warp_sum(acc[m]);
    if (m == lane) dot = v;
  }
  if (lane < p.M) {
    float low_rank = 0.0f;
    for (int j = 0; j < p.r; ++j)
      low_rank = fmaf(to_float(p.s[static_cast<int64_t>(lane) * p.r + j]), p.B[static_cast<int64_t>(n) * p.r + j], low_rank);
    float v = dot + p.scale * low_rank;
    if (p.bias != nullptr) v += to_float(p.bias[n]);
    p.y[static_cast<int64_t>(lane) * p.N + n] = from_float<T>(v);
  }
}


// ---------------------------------------------------------------------------------------------
// The plan: which kernels one call runs, on what grid, with which operand strides. Plain host
// C++. `launch(kernel, grid, threads, params)` runs one kernel: lowrank_linear.cu passes a
// launch on the caller's CUDA stream, the emulation test a launch on the CPU.

inline const char* check_sizes(int64_t M, int64_t K, int64_t N, int64_t r) {
  if (r < 1 || r > kMaxRank)
    return "fastcl._C: rank must be between 1 and 64 (the fused kernels keep the sketch in shared memory)";
  if (M < 0 || K < 1 || N < 1) return "fastcl._C: need M >= 0 and d_in, d_out >= 1";
  // Tile indices are 32-bit (global offsets are 64-bit), and grid.y is at most 65535.
  if (M > INT_MAX - kBM || K > INT_MAX - kBP || N > INT_MAX - kBP) return "fastcl._C: a dimension exceeds 2^31 - 64";
  if ((N + kBP - 1) / kBP > 65535 || (K + kBP - 1) / kBP > 65535)
    return "fastcl._C: d_in or d_out exceeds the grid limit (65535 * 64)";
  return nullptr;
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The GEMV reads rows of W, so the decode path needs W row-major (nn.Linear). A transposed
// (Conv1D) weight takes the tiled kernel, whose loader handles either layout.
inline bool uses_decode_path(const LowrankFwdArgs& a) { return a.M <= kDecodeMaxRows && a.weight_stride_k == 1; }

template <typename T, typename Launch>
void plan_fwd(const LowrankFwdArgs& a, Launch&& launch) {
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K), N = static_cast<int>(a.N), r = static_cast<int>(a.r);
  const auto* x = static_cast<const T*>(a.x);
  const auto* w = static_cast<const T*>(a.weight);
  if (uses_decode_path(a)) {
    constexpr int kVec = 16 / sizeof(T);
    DecodeParams<T> p{};
    p.x = x;  p.w = w;  p.ldw = a.weight_stride_n;
    p.bias = static_cast<const T*>(a.bias);
    p.A = static_cast<const T*>(a.A);
    p.B = a.B;
    p.s = static_cast<T*>(a.s);
    p.y = static_cast<T*>(a.y);
    p.scale = a.scale;
    p.M = M; p.K = K; p.N = N; p.r = r;
    p.vectorized = aligned16(x) && aligned16(w) && K % kVec == 0 && a.weight_stride_n % kVec == 0;
    launch(decode_sketch_kernel<T>, dim3(r), kDecodeThreads, p);
    const int warps = kDecodeThreads / 32;
    launch(decode_gemv_kernel<T>, dim3((N + warps - 1) / warps), kDecodeThreads, p);
    return;
  }
  // out = x W^T: Wm[q=k][p=n] = W[n][k]. S = A^T: S[k][j] = A[j][k]. E = B^T: E[j][n] = B[n][j].
  TiledParams<T, T, float> p{};
  p.in = x;                              p.ld_in = K;
  p.w = w;                               p.w_sq = a.weight_stride_k; p.w_sp = a.weight_stride_n;
  p.sk = static_cast<const T*>(a.A);     p.s_sq = 1; p.s_sj = K;
  p.e = a.B;                             p.e_sj = 1; p.e_sp = r;
  p.bias = static_cast<const T*>(a.bias);
  p.out = static_cast<T*>(a.y);
  p.sketch_out = static_cast<T*>(a.s);
  p.scale = a.scale;
  p.M = M; p.Q = K; p.P = N; p.r = r;
  launch(fused_lowrank_kernel<T, T, float>, dim3((M + kBM - 1) / kBM, (N + kBP - 1) / kBP), kThreads, p);
}

template <typename T, typename Launch>
void plan_bwd(const LowrankBwdArgs& a, Launch&& launch) {
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K), N = static_cast<int>(a.N), r = static_cast<int>(a.r);
  // dX = dY W: Wm[q=n][p=k] = W[n][k]. S = B: S[n][j] = B[n][j]. E = A: E[j][k] = A[j][k].
  TiledParams<T, float, T> p{};
  p.in = static_cast<const T*>(a.dy);    p.ld_in = N;
  p.w = static_cast<const T*>(a.weight); p.w_sq = a.weight_stride_n; p.w_sp = a.weight_stride_k;
  p.sk = a.B;                            p.s_sq = r; p.s_sj = 1;
  p.e = static_cast<const T*>(a.A);      p.e_sj = K; p.e_sp = 1;
  p.out = static_cast<T*>(a.dx);
  p.saved = static_cast<const T*>(a.s);
  p.grad = a.grad_B;
  p.scale = a.scale;
  p.M = M; p.Q = N; p.P = K; p.r = r;
  // With dX every block walks all of d_out anyway; without, the walk is split across blocks.
  const int chunks = (N + kBQ - 1) / kBQ;
  const int blocks_p = a.dx != nullptr ? (K + kBP - 1) / kBP : (chunks < kGradOnlySplit ? chunks : kGradOnlySplit);
  launch(fused_lowrank_kernel<T, float, T>, dim3((M + kBM - 1) / kBM, blocks_p), kThreads, p);
}

template <typename Args, typename Plan>
const char* run_checked(const Args& a, Plan&& plan) {
  if (const char* err = check_sizes(a.M, a.K, a.N, a.r)) return err;
  if (a.M == 0) return nullptr;  // an empty batch: nothing to launch (a zero grid is an error)
  switch (a.dtype) {
    case DType::kFloat32: plan(float{}); return nullptr;
    case DType::kFloat16: plan(__half{}); return nullptr;
    case DType::kBFloat16: plan(__nv_bfloat16{}); return nullptr;
  }
  return "fastcl._C: unknown dtype tag";
}

template <typename Launch>
const char* run_fwd(const LowrankFwdArgs& a, Launch&& launch) {
  return run_checked(a, [&](auto tag) { plan_fwd<decltype(tag)>(a, launch); });
}

template <typename Launch>
const char* run_bwd(const LowrankBwdArgs& a, Launch&& launch) {
  return run_checked(a, [&](auto tag) { plan_bwd<decltype(tag)>(a, launch); });
}

}  // namespace kernels
}  // namespace fastcl
