// Host wrapper of the int4 tensor-core kernel (mma_int4.cuh): argument checks, act-order gather,
// output and split-K buffers, launch.
#include "mma_int4.cuh"

// y = x[:, perm] @ W^T + bias for x (M <= block_m <= 16, K); returns (M, N) in x's dtype. The weights
// are the GPTQ tensors in kernel order (layout.py): qweight (K/8, N), scales (G, N), qzeros.
at::Tensor mma_int4(at::Tensor x, at::Tensor qweight, at::Tensor scales, at::Tensor qzeros, bool symmetric,
                    std::optional<at::Tensor> perm, std::optional<at::Tensor> bias, at::Tensor tickets,
                    int64_t group_size, int64_t in_features, int64_t block_m, int64_t warps, int64_t variant,
                    int64_t splits, bool pdl) {
  using namespace nq_mma;
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "x must be a CUDA (M, K) tensor");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "x must be fp16 or bf16");
  TORCH_CHECK(block_m == 8 || block_m == 16, "block_m must be 8 or 16");
  const int64_t M = x.size(0);
  TORCH_CHECK(M <= block_m, "more rows than block_m");
  const int64_t K = in_features, N = scales.size(1);
  const int64_t tile_n = variant_tile_n(static_cast<int>(variant));
  TORCH_CHECK(tile_n > 0, "unknown mma_int4 variant ", variant);
  TORCH_CHECK(warps >= 1 && warps <= kMaxWarps, "warps must be 1..8");
  TORCH_CHECK(K % 8 == 0 && K >= 8, "K must be a positive multiple of 8");
  TORCH_CHECK(N % (tile_n / 8) == 0, "N must be a multiple of ", tile_n / 8, " for this variant");
  TORCH_CHECK(group_size >= K || (group_size >= 16 && (group_size & (group_size - 1)) == 0),
              "group size must be a power of two >= 16, or >= K (one group)");
  const int64_t rows = K / 8;
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.is_contiguous() && qweight.dim() == 2 &&
                  qweight.size(0) == rows && qweight.size(1) == N &&
                  reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0,
              "qweight: contiguous, aligned int32 (K / 8, N) in kernel order");
  TORCH_CHECK((scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16) &&
                  scales.is_contiguous() && scales.dim() == 2 && reinterpret_cast<uintptr_t>(scales.data_ptr()) % 8 == 0,
              "scales: contiguous fp16 or bf16 (G, N)");
  const int64_t num_groups = scales.size(0);
  const int64_t zero_words = (N + 7) / 8;
  if (!symmetric) {
    TORCH_CHECK(qzeros.scalar_type() == at::kInt && qzeros.is_contiguous() && qzeros.dim() == 2 &&
                    qzeros.size(0) == num_groups && qzeros.size(1) == zero_words,
                "qzeros: contiguous int32 (G, ceil(N / 8))");
  }
  const int64_t tiles = (N + tile_n - 1) / tile_n;
  const int64_t num_chunks = (K + kChunkK - 1) / kChunkK;
  TORCH_CHECK(splits >= 1 && splits <= num_chunks && splits <= 65535, "bad splits");
  TORCH_CHECK(tickets.scalar_type() == at::kInt && tickets.is_cuda(), "tickets: int32 CUDA");

  const c10::cuda::CUDAGuard guard(x.device());
  if (perm.has_value()) {
    TORCH_CHECK(perm->scalar_type() == at::kInt || perm->scalar_type() == at::kLong, "perm: integer (K,)");
    x = x.index_select(1, *perm);
  }
  if (x.stride(1) != 1 || x.stride(0) % 8 != 0 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) {
    x = x.contiguous();
    if (x.stride(0) % 8 != 0 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) {
      at::Tensor padded = at::zeros({M, (K + 7) / 8 * 8}, x.options());
      padded.narrow(1, 0, K).copy_(x.narrow(1, 0, K));
      x = padded;
    }
  }
  TORCH_CHECK(x.size(1) >= K, "x has fewer columns than in_features");

  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const int64_t chunks_per_split = (num_chunks + splits - 1) / splits;
  const int64_t used_splits = (num_chunks + chunks_per_split - 1) / chunks_per_split;
  at::Tensor partial;
  if (used_splits > 1) {
    TORCH_CHECK(tickets.numel() >= tiles, "ticket buffer too small");
    partial = at::empty({used_splits, M, N}, x.options().dtype(at::kFloat));
  }
  const nq_cuda::Bias bias_arg = nq_cuda::prepare_bias(bias, N);

  Params p;
  p.x = x.data_ptr();
  p.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  p.scales = scales.data_ptr();
  p.qzeros = symmetric ? nullptr : reinterpret_cast<const uint32_t*>(qzeros.data_ptr<int32_t>());
  p.bias = bias_arg.data();
  p.out = out.data_ptr();
  p.partial = used_splits > 1 ? partial.data_ptr<float>() : nullptr;
  p.tickets = tickets.data_ptr<int32_t>();
  p.stride_xm = x.stride(0);
  p.stride_om = out.stride(0);
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.rows = static_cast<int>(rows);
  p.zero_words = static_cast<int>(zero_words);
  p.num_chunks = static_cast<int>(num_chunks);
  p.num_groups = static_cast<int>(num_groups);
  p.chunks_per_split = static_cast<int>(chunks_per_split);
  p.bias_kind = bias_arg.kind;
  p.pdl = pdl ? 1 : 0;
  p.scales_bf16 = scales.scalar_type() == at::kBFloat16 ? 1 : 0;
  p.group_shift = 31;  // one group (group_size >= K)
  for (int shift = 0; shift < 31; ++shift) {
    if ((int64_t{1} << shift) == group_size) p.group_shift = shift;
  }

  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(used_splits));
  const dim3 block(static_cast<unsigned>(warps * 32));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  if (x.scalar_type() == at::kHalf) {
    launch_half(static_cast<int>(block_m), static_cast<int>(variant), symmetric, grid, block, stream, p);
  } else {
    launch_bf16(static_cast<int>(block_m), static_cast<int>(variant), symmetric, grid, block, stream, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
