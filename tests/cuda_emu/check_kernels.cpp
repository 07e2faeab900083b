// Runs the kernels of csrc/lowrank_linear_kernels.cuh on the CPU, through the same plan
// (kernel choice, grids, operand strides) that csrc/lowrank_linear.cu launches on a GPU, and
// compares every output with a float64 reference of the formulas:
//
//   s = x A^T,  y = x W^T + b + c s B^T,  grad_B += c dY^T s,  dX = dY W + c (dY B) A
//
// Built with AddressSanitizer by tests/test_cuda_emulation.py, so an out-of-bounds read or
// write of any operand fails the run. Prints one line per failing case; exits 1 if any.
// This checks the kernels' logic, not the GPU: timing, the memory model, real tensor cores and
// the launch itself are the GPU tests' job (tests/test_cuda_backend.py).

#include <cuda_runtime.h>  // the emulation (tests/cuda_emu/include)

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "lowrank_linear_kernels.cuh"

using fastcl::DType;

namespace {

struct EmulatedLaunch {
  template <typename Params>
  void operator()(void (*kernel)(Params), dim3 grid, int threads, const Params& params) const {
    emu::launch(kernel, grid, threads, params);
  }
};

const char* name(DType d) { return d == DType::kFloat32 ? "fp32" : d == DType::kFloat16 ? "fp16" : "bf16"; }
size_t elem_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// A tensor stored in one dtype, in a heap block of exactly its size (so ASan sees overruns).
struct Buffer {
  DType dtype;
  size_t n;
  std::vector<unsigned char> bytes;
  Buffer(DType d, size_t count) : dtype(d), n(count), bytes(count * elem_size(d)) {}
  void* data() { return n ? bytes.data() : nullptr; }
  double get(size_t i) const {
    if (dtype == DType::kFloat32) { float v; std::memcpy(&v, &bytes[4 * i], 4); return v; }
    if (dtype == DType::kFloat16) { __half h; std::memcpy(&h, &bytes[2 * i], 2); return __half2float(h); }
    __nv_bfloat16 b; std::memcpy(&b, &bytes[2 * i], 2); return __bfloat162float(b);
  }
  void set(size_t i, double v) {  // rounds to the buffer's dtype
    if (dtype == DType::kFloat32) { float f = static_cast<float>(v); std::memcpy(&bytes[4 * i], &f, 4); }
    else if (dtype == DType::kFloat16) { __half h = __float2half_rn(static_cast<float>(v)); std::memcpy(&bytes[2 * i], &h, 2); }
    else { __nv_bfloat16 b = __float2bfloat16_rn(static_cast<float>(v)); std::memcpy(&bytes[2 * i], &b, 2); }
  }
};

struct Tolerance { double rtol, atol, grad; };
Tolerance tolerance(DType d) {  // tests/helpers.py TOLERANCES; `grad` is TOL_DB of tests/test_op.py
  if (d == DType::kFloat32) return {1e-5, 1e-5, 1e-5};
  if (d == DType::kFloat16) return {5e-3, 5e-3, 5e-3};
  return {3e-2, 2e-2, 2e-2};
}

struct Case {
  DType dtype;
  int M, K, N, r;
  bool bias, transposed, needs_dx;
  std::string str() const {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s M=%d d_in=%d d_out=%d r=%d bias=%d transposed_weight=%d needs_dx=%d", name(dtype),
                  M, K, N, r, bias, transposed, needs_dx);
    return buf;
  }
};

int failures = 0;

// Compare an output with its reference; report the first bad element, as tests/helpers.py does.
void expect_close(const Case& c, const char* what, size_t count, double rtol, double atol,
                  const std::function<double(size_t)>& actual, const std::function<double(size_t)>& expected) {
  for (size_t i = 0; i < count; ++i) {
    const double a = actual(i), e = expected(i);
    if (!(std::fabs(a - e) <= atol + rtol * std::fabs(e))) {  // also catches NaN
      size_t bad = 0;
      for (size_t j = 0; j < count; ++j) bad += !(std::fabs(actual(j) - expected(j)) <= atol + rtol * std::fabs(expected(j)));
      std::printf("FAIL %s: %s: %zu/%zu elements off; first at flat index %zu: %.6g vs %.6g (rtol %g, atol %g)\n",
                  c.str().c_str(), what, bad, count, i, a, e, rtol, atol);
      ++failures;
      return;
    }
  }
}

void run_case(const Case& c, std::mt19937& rng) {
  std::normal_distribution<double> normal;
  const int M = c.M, K = c.K, N = c.N, r = c.r;
  const double scale = 0.5;
  const DType dt = c.dtype;
  Buffer x(dt, size_t(M) * K), w(dt, size_t(N) * K), bias(dt, c.bias ? N : 0), A(dt, size_t(r) * K);
  Buffer B(DType::kFloat32, size_t(N) * r), y(dt, size_t(M) * N), s(dt, size_t(M) * r);
  // Sizes chosen so the low-rank term is as large as the base term: an error in either shows.
  for (size_t i = 0; i < x.n; ++i) x.set(i, normal(rng));
  for (size_t i = 0; i < w.n; ++i) w.set(i, normal(rng) / std::sqrt(double(K)));
  for (size_t i = 0; i < bias.n; ++i) bias.set(i, normal(rng));
  for (size_t i = 0; i < A.n; ++i) A.set(i, normal(rng) / std::sqrt(double(K)));
  for (size_t i = 0; i < B.n; ++i) B.set(i, normal(rng));
  // W[n][k]: nn.Linear stores (N, K); GPT-2's Conv1D stores (K, N) and is passed transposed.
  const int64_t ws_n = c.transposed ? 1 : K, ws_k = c.transposed ? N : 1;
  auto W = [&](int n, int k) { return w.get(size_t(n) * ws_n + size_t(k) * ws_k); };

  fastcl::LowrankFwdArgs fa{};
  fa.dtype = dt; fa.x = x.data(); fa.weight = w.data(); fa.weight_stride_n = ws_n; fa.weight_stride_k = ws_k;
  fa.bias = c.bias ? bias.data() : nullptr; fa.A = A.data(); fa.B = static_cast<const float*>(B.data());
  fa.scale = static_cast<float>(scale); fa.M = M; fa.K = K; fa.N = N; fa.r = r; fa.y = y.data(); fa.s = s.data();
  if (const char* err = fastcl::kernels::run_fwd(fa, EmulatedLaunch{})) {
    std::printf("FAIL %s: forward refused: %s\n", c.str().c_str(), err);
    ++failures;
    return;
  }
  std::vector<double> s_ref(size_t(M) * r), y_ref(size_t(M) * N);
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < r; ++j) {
      double acc = 0;
      for (int k = 0; k < K; ++k) acc += x.get(size_t(m) * K + k) * A.get(size_t(j) * K + k);
      s_ref[size_t(m) * r + j] = acc;
    }
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double acc = c.bias ? bias.get(n) : 0.0, low = 0;
      for (int k = 0; k < K; ++k) acc += x.get(size_t(m) * K + k) * W(n, k);
      for (int j = 0; j < r; ++j) low += s_ref[size_t(m) * r + j] * B.get(size_t(n) * r + j);
      y_ref[size_t(m) * N + n] = acc + scale * low;
    }
  const Tolerance tol = tolerance(dt);
  expect_close(c, "y", y.n, tol.rtol, tol.atol, [&](size_t i) { return y.get(i); }, [&](size_t i) { return y_ref[i]; });
  expect_close(c, "s", s.n, tol.rtol, tol.atol, [&](size_t i) { return s.get(i); }, [&](size_t i) { return s_ref[i]; });

  // Backward, from a fresh dY and saved sketch, into an accumulator that already holds values.
  Buffer dy(dt, size_t(M) * N), saved(dt, size_t(M) * r), grad(DType::kFloat32, size_t(N) * r);
  Buffer dx(dt, c.needs_dx ? size_t(M) * K : 0);
  for (size_t i = 0; i < dy.n; ++i) dy.set(i, normal(rng));
  for (size_t i = 0; i < saved.n; ++i) saved.set(i, normal(rng));
  std::vector<double> grad0(grad.n);
  for (size_t i = 0; i < grad.n; ++i) { grad.set(i, normal(rng)); grad0[i] = grad.get(i); }
  fastcl::LowrankBwdArgs ba{};
  ba.dtype = dt; ba.dy = dy.data(); ba.s = saved.data(); ba.weight = w.data(); ba.weight_stride_n = ws_n;
  ba.weight_stride_k = ws_k; ba.A = A.data(); ba.B = static_cast<const float*>(B.data());
  ba.grad_B = static_cast<float*>(grad.data()); ba.scale = static_cast<float>(scale);
  ba.M = M; ba.K = K; ba.N = N; ba.r = r; ba.dx = c.needs_dx ? dx.data() : nullptr;
  if (const char* err = fastcl::kernels::run_bwd(ba, EmulatedLaunch{})) {
    std::printf("FAIL %s: backward refused: %s\n", c.str().c_str(), err);
    ++failures;
    return;
  }
  std::vector<double> inc(grad.n);
  double inc_max = 0;
  for (int n = 0; n < N; ++n)
    for (int j = 0; j < r; ++j) {
      double acc = 0;
      for (int m = 0; m < M; ++m) acc += dy.get(size_t(m) * N + n) * saved.get(size_t(m) * r + j);
      inc[size_t(n) * r + j] = scale * acc;
      inc_max = std::fmax(inc_max, std::fabs(scale * acc));
    }
  expect_close(c, "grad_B increment", grad.n, tol.rtol, tol.grad * inc_max, [&](size_t i) { return grad.get(i) - grad0[i]; },
               [&](size_t i) { return inc[i]; });
  if (!c.needs_dx) return;
  std::vector<double> dx_ref(dx.n);
  for (int m = 0; m < M; ++m) {
    std::vector<double> u(r, 0.0);  // dY B
    for (int j = 0; j < r; ++j)
      for (int n = 0; n < N; ++n) u[j] += dy.get(size_t(m) * N + n) * B.get(size_t(n) * r + j);
    for (int k = 0; k < K; ++k) {
      double acc = 0, low = 0;
      for (int n = 0; n < N; ++n) acc += dy.get(size_t(m) * N + n) * W(n, k);
      for (int j = 0; j < r; ++j) low += u[j] * A.get(size_t(j) * K + k);
      dx_ref[size_t(m) * K + k] = acc + scale * low;
    }
  }
  // dX sums d_out products of O(1) terms; scale atol with that growth as for y (which sums d_in).
  expect_close(c, "dX", dx.n, tol.rtol, tol.atol * std::sqrt(double(N) / K > 1 ? double(N) / K : 1.0),
               [&](size_t i) { return dx.get(i); }, [&](size_t i) { return dx_ref[i]; });
}

void expect_refused(const char* what, int64_t r, int64_t M) {
  float dummy[1] = {0};
  fastcl::LowrankFwdArgs fa{};
  fa.dtype = DType::kFloat32; fa.x = fa.weight = fa.A = dummy; fa.B = dummy; fa.y = fa.s = dummy;
  fa.weight_stride_n = 4; fa.weight_stride_k = 1; fa.M = M; fa.K = 4; fa.N = 4; fa.r = r;
  const char* err = fastcl::kernels::run_fwd(fa, EmulatedLaunch{});
  if (err == nullptr) {
    std::printf("FAIL %s: accepted\n", what);
    ++failures;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  std::mt19937 rng(2024);
  std::vector<Case> cases;
  int i = 0;
  // The sweep of tests/test_op.py (M 1/7/133, d 72/200, r 1/8/16), plus the decode boundary
  // (8 | 9 rows), a full 64-row tile, and the largest rank.
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    for (int M : {1, 7, 8, 9, 64, 133})
      for (auto KN : {std::pair<int, int>{72, 200}, {200, 72}})
        for (int r : {1, 8, 16, 64}) {
          if (quick && (M == 8 || M == 64 || r == 64)) continue;
          cases.push_back({dt, M, KN.first, KN.second, r, i % 2 == 0, i % 3 == 0, i % 4 != 3});
          ++i;
        }
  // Shapes that are nobody's multiple: unaligned rows (no 16-byte loads), ranks between tiles,
  // single rows and columns, and a d_out long enough that each grad-only block takes several
  // chunks (more than kGradOnlySplit * kBQ = 1024).
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    cases.push_back({dt, 3, 73, 45, 17, true, false, true});
    cases.push_back({dt, 70, 73, 45, 33, false, true, true});
    cases.push_back({dt, 1, 1, 1, 1, true, false, true});
    cases.push_back({dt, 65, 1, 130, 5, true, true, true});
    cases.push_back({dt, 5, 40, 1100, 3, false, false, false});
    cases.push_back({dt, 1, 64, 96, 16, true, true, true});  // decode-sized, transposed: tiled kernel
  }
  cases.push_back({DType::kFloat32, 0, 16, 16, 4, true, false, true});  // empty batch: no launch
  for (const Case& c : cases) run_case(c, rng);
  expect_refused("rank 65", 65, 4);
  expect_refused("rank 0", 0, 4);
  expect_refused("negative M", 4, -1);
  std::printf("%zu cases, %d failures\n", cases.size(), failures);
  return failures == 0 ? 0 : 1;
}
