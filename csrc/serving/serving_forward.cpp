// The torch backend's decode closure in C++ (fastcl._serving): in decode each patched layer runs
// three ATen products on a single token, and the Python between them (argument parsing for
// five torch calls a layer, 210 layers a token for SmolLM2) cost about as much as the adapter's
// own arithmetic. The same ATen calls in the same order as fastcl/ops/reference.py's
// serving_forward, so the output is bit-identical to it; any device, any dtype ATen takes.
#include <torch/extension.h>

namespace {

// x (..., d_in) -> x W^T + b + scale (x A^T) B^T, with the operands as the Python closure binds
// them: Wt = W^T and At = A^T (views), Bt = B^T cast to x's dtype and made row-major. The
// operands come first so that functools.partial can bind them and leave x as the one argument.
torch::Tensor serving_forward(const torch::Tensor& Wt, const c10::optional<torch::Tensor>& bias,
                              const torch::Tensor& At, const torch::Tensor& Bt, double scale,
                              const torch::Tensor& x) {
  const int64_t d_in = Wt.size(0), d_out = Wt.size(1);
  TORCH_CHECK(x.size(-1) == d_in, "fastcl serving forward: input has ", x.size(-1), " features, the layer takes ",
              d_in);
  const auto x2 = x.reshape({-1, d_in});
  auto y = bias.has_value() ? at::addmm(*bias, x2, Wt) : at::mm(x2, Wt);
  y.addmm_(at::mm(x2, At), Bt, /*beta=*/1, /*alpha=*/scale);
  auto shape = x.sizes().vec();
  shape.back() = d_out;
  return y.view(shape);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL, as torch's own Python bindings run ops: a server's other Python threads
  // (learning, tokenizing) go on while the products run.
  m.def("serving_forward", &serving_forward, "x W^T + b + scale (x A^T) B^T for decode (operands bound first)",
        py::call_guard<py::gil_scoped_release>());
}
