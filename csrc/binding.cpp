// fastcl._C: the torch-facing half of the CUDA extension. It checks the tensors, allocates the
// outputs and calls the launchers of lowrank_linear.h with raw pointers.
//
// Only torch/extension.h is included, never a CUDA or c10/cuda header, so this file compiles
// against torch's CPU wheel too (CI syntax-checks it there) and is the same code whatever torch
// it is built against. The stream therefore comes from Python as an integer
// (torch.cuda.current_stream(device).cuda_stream): fastcl/ops/cuda_backend.py passes it.
//
// Checks run in a fixed order: ranks and dtypes, then shapes, then layouts, and the device last,
// so each error names the first thing wrong, in the caller's terms.

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <utility>

#include "lowrank_linear.h"

namespace {

fastcl::DType dtype_tag(const torch::Tensor& x) {
  switch (x.scalar_type()) {
    case torch::kFloat32: return fastcl::DType::kFloat32;
    case torch::kFloat16: return fastcl::DType::kFloat16;
    case torch::kBFloat16: return fastcl::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastcl._C: x has dtype ", x.scalar_type(),
                  "; the CUDA kernels take float32, float16 or bfloat16");
  }
}

void check_dtype(const torch::Tensor& t, const char* name, torch::ScalarType expected, const char* why) {
  TORCH_CHECK(t.scalar_type() == expected, "fastcl._C: ", name, " has dtype ", t.scalar_type(), ", expected ",
              expected, " (", why, ")");
}

void check_shape(const torch::Tensor& t, const char* name, torch::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "fastcl._C: ", name, " has shape ", t.sizes(), ", expected ", expected);
}

void check_contiguous(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "fastcl._C: ", name, " must be contiguous (strides ", t.strides(), ")");
}

void check_device(const torch::Tensor& t, const char* name, const torch::Device& device) {
  TORCH_CHECK(t.is_cuda(), "fastcl._C: ", name, " is on ", t.device(), "; the CUDA backend needs CUDA tensors");
  TORCH_CHECK(t.device() == device, "fastcl._C: ", name, " is on ", t.device(), " but the input is on ", device);
}

// The weight (d_out, d_in) may be row-major (nn.Linear) or column-major (the transposed view of
// a GPT-2 Conv1D weight, stored (d_in, d_out)); the kernels take either through its strides.
std::pair<int64_t, int64_t> weight_strides(const torch::Tensor& weight) {
  const int64_t sn = weight.size(0) == 1 ? weight.size(1) : weight.stride(0);
  const int64_t sk = weight.size(1) == 1 ? 1 : weight.stride(1);
  const bool row_major = sk == 1 && sn == weight.size(1);
  const bool col_major = weight.stride(0) == 1 && weight.stride(1) == weight.size(0);
  if (row_major) return {sn, 1};
  if (col_major) return {1, weight.stride(1)};
  TORCH_CHECK(false, "fastcl._C: weight must be row-major (nn.Linear) or its transpose (Conv1D); got strides ",
              weight.strides(), " for shape ", weight.sizes());
}

void check_rank(int64_t r) {
  TORCH_CHECK(r >= 1 && r <= fastcl::kMaxRank, "fastcl._C: rank ", r, " is outside 1..", fastcl::kMaxRank,
              " (the fused kernels keep the sketch beside the output tile in shared memory); "
              "use backend \"torch\" or \"triton\" for larger ranks");
}

void* stream_pointer(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

void raise_if_failed(const char* error, const char* pass) {
  TORCH_CHECK(error == nullptr, "fastcl._C: ", pass, " failed: ", error);
}

// y = x W^T + b + scale (x A^T) B^T and s = x A^T, for x (M, d_in).
std::tuple<torch::Tensor, torch::Tensor> lowrank_linear_fwd(const torch::Tensor& x, const torch::Tensor& weight,
                                                      const std::optional<torch::Tensor>& bias, const torch::Tensor& A,
                                                      const torch::Tensor& B, double scale, int64_t stream) {
  TORCH_CHECK(x.dim() == 2, "fastcl._C: x must be 2-D (tokens, d_in), got shape ", x.sizes(),
              " (fastcl.ops.cuda_backend flattens leading dimensions)");
  TORCH_CHECK(weight.dim() == 2 && A.dim() == 2 && B.dim() == 2,
              "fastcl._C: weight, A and B must be 2-D, got shapes ", weight.sizes(), ", ", A.sizes(), ", ", B.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = A.size(0);
  check_rank(r);
  const fastcl::DType tag = dtype_tag(x);
  check_dtype(weight, "weight", x.scalar_type(), "the weight shares x's dtype");
  check_dtype(A, "A", x.scalar_type(), "A shares x's dtype");
  check_dtype(B, "B", torch::kFloat32, "the fast weights are kept in fp32");
  check_shape(weight, "weight", {N, K});
  check_shape(A, "A", {r, K});
  check_shape(B, "B", {N, r});
  if (bias) {
    check_dtype(*bias, "bias", x.scalar_type(), "the bias shares x's dtype");
    check_shape(*bias, "bias", {N});
  }
  check_contiguous(x, "x");
  check_contiguous(A, "A");
  check_contiguous(B, "B");
  if (bias) check_contiguous(*bias, "bias");
  const auto [stride_n, stride_k] = weight_strides(weight);
  const torch::Device device = x.device();
  check_device(x, "x", device);
  check_device(weight, "weight", device);
  check_device(A, "A", device);
  check_device(B, "B", device);
  if (bias) check_device(*bias, "bias", device);

  torch::Tensor y = torch::empty({M, N}, x.options());
  torch::Tensor s = torch::empty({M, r}, x.options());
  fastcl::LowrankFwdArgs args{};
  args.dtype = tag;
  args.x = x.data_ptr();
  args.weight = weight.data_ptr();
  args.weight_stride_n = stride_n;
  args.weight_stride_k = stride_k;
  args.bias = bias ? bias->data_ptr() : nullptr;
  args.A = A.data_ptr();
  args.B = B.data_ptr<float>();
  args.scale = static_cast<float>(scale);
  args.M = M; args.K = K; args.N = N; args.r = r;
  args.y = y.data_ptr();
  args.s = s.data_ptr();
  raise_if_failed(fastcl::lowrank_linear_fwd(args, device.index(), stream_pointer(stream)), "forward");
  return {y, s};
}

// grad_B += scale dY^T s (in place) and, if needs_dx, return dX = dY W + scale (dY B) A.
std::optional<torch::Tensor> lowrank_linear_bwd(const torch::Tensor& dy, const torch::Tensor& s,
                                                const torch::Tensor& weight, const torch::Tensor& A,
                                                const torch::Tensor& B, torch::Tensor grad_B, double scale,
                                                bool needs_dx, int64_t stream) {
  TORCH_CHECK(dy.dim() == 2 && s.dim() == 2, "fastcl._C: dy and s must be 2-D (tokens, features), got shapes ",
              dy.sizes(), " and ", s.sizes());
  TORCH_CHECK(weight.dim() == 2 && A.dim() == 2 && B.dim() == 2 && grad_B.dim() == 2,
              "fastcl._C: weight, A, B and grad_B must be 2-D");
  const int64_t M = dy.size(0), N = dy.size(1), K = weight.size(1), r = A.size(0);
  check_rank(r);
  const fastcl::DType tag = dtype_tag(dy);
  check_dtype(s, "s", dy.scalar_type(), "the saved sketch shares dy's dtype");
  check_dtype(weight, "weight", dy.scalar_type(), "the weight shares dy's dtype");
  check_dtype(A, "A", dy.scalar_type(), "A shares dy's dtype");
  check_dtype(B, "B", torch::kFloat32, "the fast weights are kept in fp32");
  check_dtype(grad_B, "grad_B", torch::kFloat32, "the accumulator is fp32");
  check_shape(s, "s", {M, r});
  check_shape(weight, "weight", {N, K});
  check_shape(A, "A", {r, K});
  check_shape(B, "B", {N, r});
  check_shape(grad_B, "grad_B", {N, r});
  check_contiguous(dy, "dy");
  check_contiguous(s, "s");
  check_contiguous(A, "A");
  check_contiguous(B, "B");
  check_contiguous(grad_B, "grad_B (it is updated in place, so it cannot be copied)");
  const auto [stride_n, stride_k] = weight_strides(weight);
  const torch::Device device = dy.device();
  check_device(dy, "dy", device);
  check_device(s, "s", device);
  check_device(weight, "weight", device);
  check_device(A, "A", device);
  check_device(B, "B", device);
  check_device(grad_B, "grad_B", device);

  std::optional<torch::Tensor> dx;
  if (needs_dx) dx = torch::empty({M, K}, dy.options());
  fastcl::LowrankBwdArgs args{};
  args.dtype = tag;
  args.dy = dy.data_ptr();
  args.s = s.data_ptr();
  args.weight = weight.data_ptr();
  args.weight_stride_n = stride_n;
  args.weight_stride_k = stride_k;
  args.A = A.data_ptr();
  args.B = B.data_ptr<float>();
  args.grad_B = grad_B.data_ptr<float>();
  args.scale = static_cast<float>(scale);
  args.M = M; args.K = K; args.N = N; args.r = r;
  args.dx = dx ? dx->data_ptr() : nullptr;
  raise_if_failed(fastcl::lowrank_linear_bwd(args, device.index(), stream_pointer(stream)), "backward");
  return dx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcl CUDA kernels: the fused low-rank fast-weight linear (see csrc/lowrank_linear.h)";
  m.def("lowrank_linear_fwd", &lowrank_linear_fwd, "y, s = x W^T + b + scale (x A^T) B^T, x A^T", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("A"), py::arg("B"), py::arg("scale"), py::arg("stream"));
  m.def("lowrank_linear_bwd", &lowrank_linear_bwd,
        "grad_B += scale dy^T s (in place); returns dX = dy W + scale (dy B) A, or None", py::arg("dy"), py::arg("s"),
        py::arg("weight"), py::arg("A"), py::arg("B"), py::arg("grad_B"), py::arg("scale"), py::arg("needs_dx"),
        py::arg("stream"));
  m.attr("MAX_RANK") = fastcl::kMaxRank;
  m.attr("DECODE_MAX_ROWS") = fastcl::kDecodeMaxRows;
}
