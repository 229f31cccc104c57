// __half instances of the int4 tensor-core kernel (templates in mma_int4.cuh).
#include "mma_int4.cuh"

namespace nq_mma {
void launch_half(int block_m, int variant, bool symmetric, dim3 grid, dim3 block, cudaStream_t stream,
                 const Params& p) {
  launch_typed<__half>(block_m, variant, symmetric, grid, block, stream, p);
}
}  // namespace nq_mma
