// The torch backend's decode closure in C++ (fastcl._serving): in decode each patched layer runs
// three products on a single token, and the Python between them (argument parsing for five
// torch calls a layer, 210 layers a token for SmolLM2) cost about as much as the adapter's own
// arithmetic.
//
// Two paths, chosen per call:
//   - a few rows of fp32 on the CPU (decode): x W^T + b through ATen, then the adapter's two small
//     products as one loop over A and B^T in this file, with no ATen call, allocation or dispatch
//     between them. Equal to the Python closure within fp32 rounding (its sums run in another
//     order), not bit for bit.
//   - everything else (prefill, bf16, GPUs): the same three ATen calls in the same order as
//     fastcl/ops/reference.py's serving_forward, so the output is bit-identical to it.
#include <torch/extension.h>

#include <cstdint>

namespace {

// Above this many rows a GEMM beats the loop below (prefill); decode serves one row a sequence.
// The default of the closure's max_fused_rows (0 turns the loop off, for side-by-side timing).
constexpr int64_t kFusedMaxRows = 4;
// s = x A^T for one row lives on the stack.
constexpr int64_t kFusedMaxRank = 256;
// Independent partial sums of x . A[k]: the compiler turns them into vector lanes (a single
// running sum could not be vectorized without reassociating it).
constexpr int kLanes = 16;

// One build serves every x86-64 CPU: the loop is compiled for AVX-512, AVX2 and the baseline,
// and the loader picks one for this CPU (an ifunc: glibc only; elsewhere the baseline build).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && __GNUC__ >= 12
#define FASTCL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTCL_CPU_CLONES
#endif

// y[m] += scale (x[m] A^T) B^T for each row m. A (rank, d_in) and Bt = B^T (rank, d_out) are
// row-major, so both products stream their operand once, front to back.
FASTCL_CPU_CLONES
void add_adapter_rows(const float* x, int64_t rows, int64_t d_in, const float* A, int64_t rank, const float* Bt,
                      int64_t d_out, float scale, float* y) {
  float s[kFusedMaxRank];
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * d_in;
    float* ym = y + m * d_out;
    for (int64_t k = 0; k < rank; ++k) {
      const float* a = A + k * d_in;
      float lanes[kLanes] = {0.f};
      int64_t i = 0;
      for (; i + kLanes <= d_in; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) lanes[l] += xm[i + l] * a[i + l];
      }
      float total = 0.f;
      for (; i < d_in; ++i) total += xm[i] * a[i];
      for (int l = 0; l < kLanes; ++l) total += lanes[l];
      s[k] = scale * total;
    }
    for (int64_t k = 0; k < rank; ++k) {
      const float c = s[k];
      const float* b = Bt + k * d_out;
      for (int64_t j = 0; j < d_out; ++j) ym[j] += c * b[j];
    }
  }
}

// Whether At = A^T is a view of a row-major A (rank, d_in), read from strides: no view is made
// on the decode path.
bool is_transposed_row_major(const torch::Tensor& At) {
  const int64_t d_in = At.size(0), rank = At.size(1);
  return (d_in == 1 || At.stride(0) == 1) && (rank == 1 || At.stride(1) == d_in);
}

// Whether add_adapter_rows serves this call (else the three ATen calls do).
bool fused_adapter_applies(const torch::Tensor& x2, const torch::Tensor& At, const torch::Tensor& Bt,
                           int64_t max_fused_rows) {
  const auto f32 = torch::kFloat32;
  return x2.device().is_cpu() && At.device().is_cpu() && Bt.device().is_cpu() && x2.scalar_type() == f32 &&
         At.scalar_type() == f32 && Bt.scalar_type() == f32 && x2.size(0) <= max_fused_rows &&
         At.size(1) <= kFusedMaxRank && x2.is_contiguous() && is_transposed_row_major(At) && Bt.is_contiguous();
}

void check_input(const torch::Tensor& Wt, const torch::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == Wt.size(0), "fastcl serving forward: input has ",
              x.dim() >= 1 ? x.size(-1) : 0, " features, the layer takes ", Wt.size(0));
}

// x (..., d_in) -> x W^T + b + scale (x A^T) B^T, with the operands as the Python closure binds
// them: Wt = W^T and At = A^T (views), Bt = B^T cast to x's dtype and made row-major. The
// operands come first so that functools.partial can bind them and leave x as the one argument.
torch::Tensor serving_forward(const torch::Tensor& Wt, const c10::optional<torch::Tensor>& bias,
                              const torch::Tensor& At, const torch::Tensor& Bt, double scale,
                              int64_t max_fused_rows, const torch::Tensor& x) {
  check_input(Wt, x);
  const int64_t d_in = Wt.size(0), d_out = Wt.size(1);
  const auto x2 = x.reshape({-1, d_in});
  auto y = bias.has_value() ? at::addmm(*bias, x2, Wt) : at::mm(x2, Wt);
  if (fused_adapter_applies(x2, At, Bt, max_fused_rows) && y.is_contiguous()) {
    add_adapter_rows(x2.data_ptr<float>(), x2.size(0), d_in, At.data_ptr<float>(), At.size(1), Bt.data_ptr<float>(),
                     d_out, static_cast<float>(scale), y.data_ptr<float>());
  } else {
    y.addmm_(at::mm(x2, At), Bt, /*beta=*/1, /*alpha=*/scale);
  }
  auto shape = x.sizes().vec();
  shape.back() = d_out;
  return y.view(shape);
}

// For tests and fastcl.info(): which path serving_forward takes for this input.
bool uses_fused_adapter(const torch::Tensor& Wt, const torch::Tensor& At, const torch::Tensor& Bt,
                        int64_t max_fused_rows, const torch::Tensor& x) {
  check_input(Wt, x);
  return fused_adapter_applies(x.reshape({-1, Wt.size(0)}), At, Bt, max_fused_rows);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL, as torch's own Python bindings run ops: a server's other Python threads
  // (learning, tokenizing) go on while the products run.
  m.def("serving_forward", &serving_forward, "x W^T + b + scale (x A^T) B^T for decode (operands bound first)",
        py::call_guard<py::gil_scoped_release>());
  m.def("uses_fused_adapter", &uses_fused_adapter,
        "whether serving_forward(Wt, bias, At, Bt, scale, max_fused_rows, x) runs the adapter as one CPU loop");
  m.attr("FUSED_MAX_ROWS") = kFusedMaxRows;
}
