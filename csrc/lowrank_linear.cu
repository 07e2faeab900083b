// The CUDA launchers of the low-rank fast-weight linear (lowrank_linear.h): run the plan of
// lowrank_linear_kernels.cuh on the caller's stream and device, and report launch errors.
//
// Only CUDA headers are included here, never torch's: torch's CPU wheel cannot compile its CUDA
// headers, and with this split CI compiles this file for sm_80 and sm_90a on a machine without
// a GPU (DESIGN.md, "Building CUDA on machines without a GPU").

#include <cuda_runtime.h>

#include "lowrank_linear.h"
#include "lowrank_linear_kernels.cuh"

namespace fastcl {
namespace {

// Launch on the tensors' device and give the caller back its own current device. (The torch
// binding cannot set the device itself: c10's CUDA guard needs torch's CUDA headers.)
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) {
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && current != device && cudaSetDevice(device) == cudaSuccess)
      previous_ = current;
  }
  ~ScopedDevice() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

 private:
  int previous_ = -1;
};

struct StreamLaunch {
  cudaStream_t stream;
  template <typename Params>
  void operator()(void (*kernel)(Params), dim3 grid, int threads, const Params& params) const {
    kernel<<<grid, threads, 0, stream>>>(params);
  }
};

// A launch error (a bad configuration, or no kernel image for this GPU's architecture) is
// reported by the launch itself; errors while a kernel runs surface at the next sync.
const char* launch_status(const char* plan_error) {
  if (plan_error != nullptr) return plan_error;
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* lowrank_linear_fwd(const LowrankFwdArgs& args, int device, void* stream) {
  ScopedDevice on(device);
  return launch_status(kernels::run_fwd(args, StreamLaunch{static_cast<cudaStream_t>(stream)}));
}

const char* lowrank_linear_bwd(const LowrankBwdArgs& args, int device, void* stream) {
  ScopedDevice on(device);
  return launch_status(kernels::run_bwd(args, StreamLaunch{static_cast<cudaStream_t>(stream)}));
}

}  // namespace fastcl
