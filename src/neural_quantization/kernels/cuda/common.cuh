// Pieces both CUDA kernels use (gemv_int4.cu, mma_int4.cuh): the optional bias, read in its own dtype.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>

namespace nq_cuda {

// bias kinds: 0 fp16, 1 bf16, 2 fp32 (any other dtype is converted to fp32 on the host)
__device__ __forceinline__ float load_bias(const void* bias, int kind, int n) {
  if (kind == 0) return __half2float(static_cast<const __half*>(bias)[n]);
  if (kind == 1) return __bfloat162float(static_cast<const __nv_bfloat16*>(bias)[n]);
  return static_cast<const float*>(bias)[n];
}

struct Bias {
  at::Tensor tensor;  // undefined where there is no bias
  int kind = 0;
  const void* data() const { return tensor.defined() ? tensor.data_ptr() : nullptr; }
};

inline Bias prepare_bias(const std::optional<at::Tensor>& bias, int64_t N) {
  Bias out;
  if (!bias.has_value()) return out;
  out.tensor = bias->contiguous();
  TORCH_CHECK(out.tensor.numel() == N, "bias: (N,)");
  if (out.tensor.scalar_type() == at::kHalf) {
    out.kind = 0;
  } else if (out.tensor.scalar_type() == at::kBFloat16) {
    out.kind = 1;
  } else {
    out.tensor = out.tensor.to(at::kFloat);
    out.kind = 2;
  }
  return out;
}

}  // namespace nq_cuda
