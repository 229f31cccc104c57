// Split-K int4 GEMV for one or two activation rows (M <= 2), GPTQ layout in kernel order.
//
// Built lazily by kernels/cuda/gemv.py with torch's extension loader (load_inline); see that
// module for when it is used. Notation as in kernels/triton/common.py:
//
//   x       (M, K_in) fp16/bf16, row stride stride_xm; with act-order the k-th kernel position
//           reads column perm[k] of x
//   qweight (ceil(K/8), N) int32, word r holds codes of positions 8r .. 8r+7 (code j in bits 4j..)
//   scales  (G, N) fp16 or bf16, qzeros (G, ceil(N/8)) int32 holding zero - 1
//   groups  g(k) = k / group_size (a group size >= K means one group)
//
//   y[m, n] = sum_k x[m, perm[k]] * scales[g(k), n] * (q[k, n] - zero[g(k), n]) (+ bias[n])
//
// Work split. A "unit" is 8 packed rows (64 input positions) x 128 columns; one warp owns a unit,
// each lane 4 adjacent columns, so a row of the unit is one 16-byte load per lane and 512
// contiguous bytes per warp; the 8 loads of a unit are issued together and the next unit's loads
// are issued before the current one is consumed where PF is set (up to 16 x 16 bytes in flight
// per lane; without PF fewer registers and more warps per SM hide the latency instead).
// A block of W warps covers one 128-column tile and W x units_per_warp consecutive units; the
// grid is (column tiles, splits). The block's activations (fp32) sit in shared memory.
//
// Dequantization without int->float conversion (the idea of gemv_rows.py): one shift moves the
// two codes of a byte into mantissa bits 15..18 and 19..22 of the fp32 number 1.0, giving
// f_lo = 1 + q_lo/256 and f_hi = 1 + q_hi/16 (one LOP3 each). The activation of the even slot is
// stored premultiplied by 16 (alpha = 16, else 1), so alpha*x*f = alpha*x + x*q/16 in both
// slots. Per lane, column and run of positions inside one group:
//
//   A = sum alpha x f = S_alpha + sum x q / 16  =>  sum x (q - z) s = s (16 (A - S_alpha) - z S_x)
//
// so the zero and the scale are applied once per group run, not per weight. Products are exact
// in fp32; the cancellation costs a few of fp32's 24 bits, far under fp16 rounding.
//
// Split-K reduction in one launch: every block sums its warps in shared memory and, when the
// grid has several splits, stores its fp32 partial, fences, and takes a ticket from the tile's
// counter; the block with the last ticket sums the partials in split order (deterministic),
// adds the bias, writes the output and resets the counter to 0 (counters are zero at rest).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

#include <cstdint>
#include <optional>

namespace nq_gemv {

constexpr int kRows = 8;      // packed rows per unit
constexpr int kUnitK = 64;    // input positions per unit
constexpr int kTileN = 128;   // columns per block (32 lanes x 4)
constexpr uint32_t kOne = 0x3F800000u;

struct Params {
  const void* x;
  const uint32_t* qweight;
  const uint16_t* scales;
  const uint32_t* qzeros;
  const int32_t* perm;   // nullptr: identity
  const void* bias;      // nullptr: none
  void* out;
  float* partial;        // (splits, M, N) fp32, only with splits > 1
  int32_t* tickets;      // one counter per column tile, zero at rest
  int64_t stride_xm;
  int64_t stride_om;
  int M, N, K, n_words, num_groups, packed_n, group_size;
  int num_units, units_per_warp;
  int scales_bf16, symmetric, bias_kind;  // bias_kind: 0 fp16, 1 bf16, 2 fp32
};

template <typename T>
struct Act;
template <>
struct Act<__half> {
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __half2float(static_cast<const __half*>(p)[i]);
  }
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  }
};
template <>
// Same as Act<__half> with the bf16 conversions: a specialisation on purpose.
struct Act<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
};

__device__ __forceinline__ float bits16_to_float(uint32_t bits, int is_bf16) {
  if (is_bf16) return __uint_as_float(bits << 16);
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}


// Raw data of one unit for one lane: 8 rows x 4 columns of words, and the scales / zero nibbles
// of each group run (GSUB rows each) of the unit.
template <int GSUB>
struct Unit {
  static constexpr int kRuns = kRows / GSUB;
  uint4 w[kRows];
  uint2 s[kRuns];
  uint32_t z[kRuns];
};

template <int GSUB>
__device__ __forceinline__ void load_unit(Unit<GSUB>& u, const Params& p, int unit, int n0, bool valid) {
  const int row0 = unit * kRows;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = row0 + r;
    if (valid && row < p.n_words) {
      u.w[r] = __ldg(reinterpret_cast<const uint4*>(p.qweight + static_cast<int64_t>(row) * p.N + n0));
    } else {
      u.w[r] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
#pragma unroll
  for (int g = 0; g < Unit<GSUB>::kRuns; ++g) {
    if (valid) {
      int group = ((row0 + g * GSUB) * 8) / p.group_size;
      group = min(group, p.num_groups - 1);
      u.s[g] = __ldg(reinterpret_cast<const uint2*>(p.scales + static_cast<int64_t>(group) * p.N + n0));
      u.z[g] = p.symmetric ? 0u : (__ldg(p.qzeros + static_cast<int64_t>(group) * p.packed_n + (n0 >> 3)) >> ((n0 & 7) * 4));
    } else {
      u.s[g] = make_uint2(0u, 0u);
      u.z[g] = 0u;
    }
  }
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int c) {
  return c == 0 ? v.x : (c == 1 ? v.y : (c == 2 ? v.z : v.w));
}

// xs: this unit's activations in shared memory, row m at xs[m * k_span], alpha-premultiplied;
// sums: this unit's (S_alpha, S_x) per group run, row m at sums[m * runs_span].
template <int MB, int GSUB>
__device__ __forceinline__ void compute_unit(const Unit<GSUB>& u, const Params& p, const float* xs, int k_span,
                                             const float2* sums, int runs_span, float (&total)[MB][4]) {
#pragma unroll
  for (int g = 0; g < Unit<GSUB>::kRuns; ++g) {
    float acc[MB][4];
#pragma unroll
    for (int m = 0; m < MB; ++m) {
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[m][c] = 0.f;
    }
#pragma unroll
    for (int r = 0; r < GSUB; ++r) {
      const int row = g * GSUB + r;
      float xv[MB][8];
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        const float4 a = *reinterpret_cast<const float4*>(xs + m * k_span + row * 8);
        const float4 b = *reinterpret_cast<const float4*>(xs + m * k_span + row * 8 + 4);
        xv[m][0] = a.x; xv[m][1] = a.y; xv[m][2] = a.z; xv[m][3] = a.w;
        xv[m][4] = b.x; xv[m][5] = b.y; xv[m][6] = b.z; xv[m][7] = b.w;
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint32_t word = word_of(u.w[row], c);
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t t = (b == 0) ? (word << 15) : (b == 1) ? (word << 7) : (b == 2) ? (word >> 1) : (word >> 9);
          const float f_lo = __uint_as_float((t & 0x00078000u) | kOne);  // 1 + q_{2b} / 256
          const float f_hi = __uint_as_float((t & 0x00780000u) | kOne);  // 1 + q_{2b+1} / 16
#pragma unroll
          for (int m = 0; m < MB; ++m) {
            acc[m][c] = fmaf(xv[m][2 * b], f_lo, acc[m][c]);
            acc[m][c] = fmaf(xv[m][2 * b + 1], f_hi, acc[m][c]);
          }
        }
      }
    }
    float scale[4], zero[4];
    scale[0] = bits16_to_float(u.s[g].x & 0xFFFFu, p.scales_bf16);
    scale[1] = bits16_to_float(u.s[g].x >> 16, p.scales_bf16);
    scale[2] = bits16_to_float(u.s[g].y & 0xFFFFu, p.scales_bf16);
    scale[3] = bits16_to_float(u.s[g].y >> 16, p.scales_bf16);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      zero[c] = p.symmetric ? 8.f : static_cast<float>(((u.z[g] >> (4 * c)) & 0xFu) + 1u);
    }
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      const float2 run_sums = sums[m * runs_span + g];
      const float s_alpha = run_sums.x;
      const float s_x = run_sums.y;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        total[m][c] = fmaf(scale[c], 16.f * (acc[m][c] - s_alpha) - zero[c] * s_x, total[m][c]);
      }
    }
  }
}

// Shared memory of a block: activations [MB][k_span] fp32, then run sums [MB][runs_span] float2;
// after the main loop the first warps * MB * kTileN floats are reused for the warp reduction.
__host__ __device__ inline int runs_span_of(int k_span, int gsub) { return k_span / (gsub * 8); }
__host__ __device__ inline size_t shared_bytes_of(int block_m, int warps, int units_per_warp, int gsub) {
  const int k_span = warps * units_per_warp * kUnitK;
  const size_t main_bytes = static_cast<size_t>(block_m) * (k_span + 2 * runs_span_of(k_span, gsub)) * sizeof(float);
  const size_t red_bytes = static_cast<size_t>(warps) * block_m * kTileN * sizeof(float);
  return main_bytes > red_bytes ? main_bytes : red_bytes;
}

// PF: issue the next unit's loads before consuming the current one (more registers, fewer warps).
template <typename T, int MB, int GSUB, int PF>
__global__ void __launch_bounds__(256) gemv_int4_kernel(const Params p) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  __shared__ int is_last;

  const int warps = blockDim.x >> 5;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int tile = blockIdx.x;
  const int split = blockIdx.y;
  const int splits = gridDim.y;
  const int units_per_block = warps * p.units_per_warp;
  const int unit_begin = split * units_per_block;
  const int k_span = units_per_block * kUnitK;
  const int n0 = tile * kTileN + lane * 4;
  const bool col_ok = n0 < p.N;

  // first unit's loads go out before anything else
  Unit<GSUB> cur;
  {
    const int unit = unit_begin + warp;
    load_unit<GSUB>(cur, p, unit, n0, col_ok && unit < p.num_units);
  }

  // activations of the block's positions, fp32, alpha-premultiplied, zero past K. One thread per
  // chunk of 16 positions issues the chunk's loads at once; the chunks of one group run sit in
  // adjacent lanes and their sums are combined by xor shuffles (same order in every lane).
  constexpr int kRunK = GSUB * 8;
  constexpr int kChunk = 16;
  constexpr int kChunksPerRun = kRunK / kChunk;
  const int k_begin = unit_begin * kUnitK;
  const int runs_span = runs_span_of(k_span, GSUB);
  float2* sums = reinterpret_cast<float2*>(smem + MB * k_span);
  const int chunks_per_row = k_span / kChunk;
  for (int base = 0; base < MB * chunks_per_row; base += blockDim.x) {
    const int chunk = base + threadIdx.x;
    const bool active = chunk < MB * chunks_per_row;
    const int m = active ? chunk / chunks_per_row : 0;
    const int kl = (chunk - m * chunks_per_row) * kChunk;
    int src[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      const int k = k_begin + kl + j;
      src[j] = (active && m < p.M && k < p.K) ? (p.perm != nullptr ? __ldg(p.perm + k) : k) : -1;
    }
    float v[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      v[j] = src[j] >= 0 ? Act<T>::load(p.x, static_cast<int64_t>(m) * p.stride_xm + src[j]) : 0.f;
    }
    float s_alpha = 0.f, s_x = 0.f;
#pragma unroll
    for (int j = 0; j < kChunk; j += 4) {
      const float4 q = make_float4(16.f * v[j], v[j + 1], 16.f * v[j + 2], v[j + 3]);
      s_alpha += (q.x + q.y) + (q.z + q.w);
      s_x += (v[j] + v[j + 1]) + (v[j + 2] + v[j + 3]);
      if (active) *reinterpret_cast<float4*>(smem + m * k_span + kl + j) = q;
    }
#pragma unroll
    for (int offset = 1; offset < kChunksPerRun; offset <<= 1) {
      s_alpha += __shfl_xor_sync(0xffffffffu, s_alpha, offset);
      s_x += __shfl_xor_sync(0xffffffffu, s_x, offset);
    }
    if (active && (chunk % kChunksPerRun) == 0) sums[m * runs_span + kl / kRunK] = make_float2(s_alpha, s_x);
  }
  __syncthreads();

  float total[MB][4];
#pragma unroll
  for (int m = 0; m < MB; ++m) {
#pragma unroll
    for (int c = 0; c < 4; ++c) total[m][c] = 0.f;
  }

  constexpr int kRunsPerUnit = Unit<GSUB>::kRuns;
  if constexpr (PF != 0) {
#pragma unroll 1
    for (int i = 0; i < p.units_per_warp; ++i) {
      const int unit = unit_begin + i * warps + warp;
      const int next = unit + warps;
      Unit<GSUB> nxt;
      load_unit<GSUB>(nxt, p, next, n0, col_ok && i + 1 < p.units_per_warp && next < p.num_units);
      if (col_ok && unit < p.num_units) {
        const int local = i * warps + warp;
        compute_unit<MB, GSUB>(cur, p, smem + local * kUnitK, k_span, sums + local * kRunsPerUnit, runs_span, total);
      }
      cur = nxt;
    }
  } else {
#pragma unroll 1
    for (int i = 0; i < p.units_per_warp; ++i) {
      const int unit = unit_begin + i * warps + warp;
      if (i > 0) load_unit<GSUB>(cur, p, unit, n0, col_ok && unit < p.num_units);
      if (col_ok && unit < p.num_units) {
        const int local = i * warps + warp;
        compute_unit<MB, GSUB>(cur, p, smem + local * kUnitK, k_span, sums + local * kRunsPerUnit, runs_span, total);
      }
    }
  }

  // reduce the block's warps (shared memory reused)
  __syncthreads();
  float* red = smem;  // [warps][MB][kTileN]
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    *reinterpret_cast<float4*>(red + (warp * MB + m) * kTileN + lane * 4) =
        make_float4(total[m][0], total[m][1], total[m][2], total[m][3]);
  }
  __syncthreads();

  const int outputs = MB * kTileN;
  if (splits == 1) {
    for (int idx = threadIdx.x; idx < outputs; idx += blockDim.x) {
      const int m = idx / kTileN;
      const int c = idx - m * kTileN;
      const int n = tile * kTileN + c;
      if (m < p.M && n < p.N) {
        float v = 0.f;
        for (int w = 0; w < warps; ++w) v += red[(w * MB + m) * kTileN + c];
        if (p.bias != nullptr) v += nq_cuda::load_bias(p.bias, p.bias_kind, n);
        Act<T>::store(p.out, static_cast<int64_t>(m) * p.stride_om + n, v);
      }
    }
    return;
  }

  // Split-K ticket reduction as in mma_int4.cuh, inlined per kernel on purpose: the tile indexing differs.
  for (int idx = threadIdx.x; idx < outputs; idx += blockDim.x) {
    const int m = idx / kTileN;
    const int c = idx - m * kTileN;
    const int n = tile * kTileN + c;
    if (m < p.M && n < p.N) {
      float v = 0.f;
      for (int w = 0; w < warps; ++w) v += red[(w * MB + m) * kTileN + c];
      p.partial[(static_cast<int64_t>(split) * p.M + m) * p.N + n] = v;
    }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int ticket = atomicAdd(p.tickets + tile, 1);
    is_last = (ticket == splits - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int idx = threadIdx.x; idx < outputs; idx += blockDim.x) {
    const int m = idx / kTileN;
    const int c = idx - m * kTileN;
    const int n = tile * kTileN + c;
    if (m < p.M && n < p.N) {
      float v = 0.f;
      const float* src = p.partial + static_cast<int64_t>(m) * p.N + n;
      const int64_t step = static_cast<int64_t>(p.M) * p.N;
#pragma unroll 4
      for (int s = 0; s < splits; ++s) v += __ldcg(src + s * step);
      if (p.bias != nullptr) v += nq_cuda::load_bias(p.bias, p.bias_kind, n);
      Act<T>::store(p.out, static_cast<int64_t>(m) * p.stride_om + n, v);
    }
  }
  if (threadIdx.x == 0) atomicExch(p.tickets + tile, 0);
}

template <typename T, int MB, int GSUB>
void launch_pf(int prefetch, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const Params& p) {
  if (prefetch) {
    gemv_int4_kernel<T, MB, GSUB, 1><<<grid, block, smem, stream>>>(p);
  } else {
    gemv_int4_kernel<T, MB, GSUB, 0><<<grid, block, smem, stream>>>(p);
  }
}

template <typename T, int MB>
void launch_gsub(int gsub, int prefetch, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const Params& p) {
  if (gsub == 8) {
    launch_pf<T, MB, 8>(prefetch, grid, block, smem, stream, p);
  } else {
    launch_pf<T, MB, 4>(prefetch, grid, block, smem, stream, p);
  }
}

template <typename T>
void launch_typed(int block_m, int gsub, int prefetch, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                  const Params& p) {
  if (block_m == 1) {
    launch_gsub<T, 1>(gsub, prefetch, grid, block, smem, stream, p);
  } else {
    launch_gsub<T, 2>(gsub, prefetch, grid, block, smem, stream, p);
  }
}

}  // namespace nq_gemv

// y = x[:, perm] @ W^T + bias for x (M <= block_m, K_in); returns (M, N) in x's dtype.
at::Tensor gemv_int4(at::Tensor x, at::Tensor qweight, at::Tensor scales, at::Tensor qzeros,
                     std::optional<at::Tensor> perm, std::optional<at::Tensor> bias, at::Tensor tickets,
                     int64_t group_size, int64_t in_features, bool symmetric, int64_t block_m, int64_t warps,
                     int64_t units_per_warp, int64_t prefetch) {
  using namespace nq_gemv;
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "x must be a CUDA (M, K) tensor with unit column stride");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "x must be fp16 or bf16");
  TORCH_CHECK(block_m == 1 || block_m == 2, "block_m must be 1 or 2");
  const int64_t M = x.size(0);
  TORCH_CHECK(M <= block_m, "more rows than block_m");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.is_contiguous() && qweight.dim() == 2, "qweight: int32 (K/8, N)");
  const int64_t N = qweight.size(1);
  const int64_t n_words = qweight.size(0);
  TORCH_CHECK(N % 4 == 0 && reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0, "qweight: N % 4 and 16-byte alignment");
  TORCH_CHECK(in_features >= 1 && n_words * 8 >= in_features && x.size(1) >= in_features, "K does not match");
  TORCH_CHECK((scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16) && scales.is_contiguous() &&
                  scales.dim() == 2 && scales.size(1) == N && reinterpret_cast<uintptr_t>(scales.data_ptr()) % 8 == 0,
              "scales: fp16/bf16 (G, N), contiguous");
  TORCH_CHECK(qzeros.scalar_type() == at::kInt && qzeros.is_contiguous() && qzeros.dim() == 2 &&
                  qzeros.size(0) == scales.size(0) && qzeros.size(1) * 8 >= N,
              "qzeros: int32 (G, N/8)");
  TORCH_CHECK(group_size >= in_features || group_size % 32 == 0, "group size must be >= K or a multiple of 32");
  TORCH_CHECK(warps >= 1 && warps <= 8 && units_per_warp >= 1, "bad warps / units_per_warp");
  TORCH_CHECK(tickets.scalar_type() == at::kInt && tickets.is_cuda(), "tickets: int32 CUDA");

  const int gsub = (group_size >= in_features || group_size % 64 == 0) ? 8 : 4;
  const int64_t num_units = (n_words + kRows - 1) / kRows;
  const int64_t units_per_block = warps * units_per_warp;
  const int64_t splits = (num_units + units_per_block - 1) / units_per_block;
  const int64_t tiles = (N + kTileN - 1) / kTileN;
  TORCH_CHECK(splits <= 65535, "too many splits");
  const size_t smem = shared_bytes_of(static_cast<int>(block_m), static_cast<int>(warps),
                                      static_cast<int>(units_per_warp), gsub);
  TORCH_CHECK(smem <= 46 * 1024, "shared memory over 46 KB: fewer warps or units per warp");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  at::Tensor partial;
  if (splits > 1) {
    TORCH_CHECK(tickets.numel() >= tiles, "ticket buffer too small");
    partial = at::empty({splits, M, N}, x.options().dtype(at::kFloat));
  }
  if (perm.has_value()) {
    TORCH_CHECK(perm->scalar_type() == at::kInt && perm->is_contiguous() && perm->numel() >= in_features, "perm: int32 (K,)");
  }
  const nq_cuda::Bias bias_arg = nq_cuda::prepare_bias(bias, N);

  // Params filled field by field as in mma_int4.cu: each extension has its own Params struct.
  Params p;
  p.x = x.data_ptr();
  p.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  p.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  p.qzeros = reinterpret_cast<const uint32_t*>(qzeros.data_ptr<int32_t>());
  p.perm = perm.has_value() ? perm->data_ptr<int32_t>() : nullptr;
  p.bias = bias_arg.data();
  p.out = out.data_ptr();
  p.partial = splits > 1 ? partial.data_ptr<float>() : nullptr;
  p.tickets = tickets.data_ptr<int32_t>();
  p.stride_xm = x.stride(0);
  p.stride_om = out.stride(0);
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(in_features);
  p.n_words = static_cast<int>(n_words);
  p.num_groups = static_cast<int>(scales.size(0));
  p.packed_n = static_cast<int>(qzeros.size(1));
  p.group_size = static_cast<int>(group_size >= in_features ? in_features + 8 : group_size);
  p.num_units = static_cast<int>(num_units);
  p.units_per_warp = static_cast<int>(units_per_warp);
  p.scales_bf16 = scales.scalar_type() == at::kBFloat16 ? 1 : 0;
  p.symmetric = symmetric ? 1 : 0;
  p.bias_kind = bias_arg.kind;

  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  const dim3 block(static_cast<unsigned>(warps * 32));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  if (x.scalar_type() == at::kHalf) {
    launch_typed<__half>(static_cast<int>(block_m), gsub, prefetch ? 1 : 0, grid, block, smem, stream, p);
  } else {
    launch_typed<__nv_bfloat16>(static_cast<int>(block_m), gsub, prefetch ? 1 : 0, grid, block, smem, stream, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
