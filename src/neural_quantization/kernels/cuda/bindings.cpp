// Python bindings of the CUDA kernels (built by extension.py).
#include <torch/extension.h>

#include <optional>

at::Tensor gemv_int4(at::Tensor x, at::Tensor qweight, at::Tensor scales, at::Tensor qzeros,
                     std::optional<at::Tensor> perm, std::optional<at::Tensor> bias, at::Tensor tickets,
                     int64_t group_size, int64_t in_features, bool symmetric, int64_t block_m, int64_t warps,
                     int64_t units_per_warp, int64_t prefetch);

at::Tensor mma_int4(at::Tensor x, at::Tensor qweight, at::Tensor scales, at::Tensor qzeros, bool symmetric,
                    std::optional<at::Tensor> perm, std::optional<at::Tensor> bias, at::Tensor tickets,
                    int64_t group_size, int64_t in_features, int64_t block_m, int64_t warps, int64_t variant,
                    int64_t splits, bool pdl);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_int4", &gemv_int4, "int4 split-K GEMV, M <= 2 (gemv_int4.cu)");
  m.def("mma_int4", &mma_int4, "int4 x fp16/bf16 on tensor cores, M <= 16 (mma_int4.cu)");
}
