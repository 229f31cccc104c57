// Int4 x fp16/bf16 matmul for M <= 16 activation rows on tensor cores (mma.sync m16n8k16).
//
// Kernel templates; instantiated per activation dtype in mma_int4_half.cu / mma_int4_bf16.cu and
// launched from mma_int4.cu. Built by kernels/cuda/extension.py; the load-time repack that
// produces its weight layout is kernels/cuda/mma.py (``repack``), which documents the layout.
//
// The product is computed transposed, y^T = W x^T, so the weights fill the instruction's 16-row
// operand A (16 output columns x 16 input positions) and the activations its 8-column operand B
// (16 positions x 8 rows of x): one instruction serves M <= 8, two serve M <= 16, and the cost
// per weight does not grow with M.
//
// Work split. A "chunk" is 16 output columns (a tile) x 64 input positions: 512 contiguous bytes
// of packed codes, one 16-byte load per lane. Lane (g, t) = (lane / 4, lane % 4) owns columns
// g and g + 8 of the tile and positions 16t .. 16t + 15 of the chunk; its four words are the A
// fragments of the chunk's four mma steps (step s covers positions 16t + 4s .. 16t + 4s + 3 of
// every lane; the fragment slots 2t, 2t+1, 2t+8, 2t+9 map to positions +0, +1, +2, +3). The B
// fragments of the same step are x[m][16t + 4s .. +3], so a lane's activations for a chunk are
// 16 contiguous halves: two 16-byte loads per 8 rows. A block of W warps owns one tile and a
// range of chunks (the split); warp w takes chunks w, w + W, ... of the range, U at a time
// (with PF the next U chunks' codes are loaded before the current ones are multiplied).
//
// Dequantization (per 32-bit word = 8 codes): a nibble OR-ed into the mantissa of the 16-bit
// magic number (1024 in fp16, 128 in bf16) gives magic + q exactly; subtracting magic + zero
// gives q - z exactly; multiplying by the scale rounds once, as the reference's dequantized
// weight does. For fp16 the odd nibbles are taken in place (magic + 16 q) and brought to q - z
// by one fma with 1/16 and -(64 + z) (exact), saving a shift. The scale is per (group, column);
// a lane's 16 positions lie inside one group for every group size that is a multiple of 16.
//
// Reduction: the block's warps are summed in shared memory; with several splits along K each
// block stores its fp32 partial and the last block of the tile (ticket counter) sums the
// partials in split order (deterministic), adds the bias and writes y; counters are zero at rest.

#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

#include <cstdint>
#include <optional>

namespace nq_mma {

constexpr int kTileN = 16;
constexpr int kChunkK = 64;
constexpr int kMaxWarps = 8;

struct Params {
  const void* x;
  const uint4* w;           // (tiles, chunks, 32 lanes) uint4
  const uint32_t* scales;   // (tiles, groups, 8) pairs (s[g], s[g + 8]), fp16 or bf16 (scales_bf16)
  const uint32_t* zeros;    // (tiles, groups, 8) pairs (z[g], z[g + 8]) as 16-bit integers; null if symmetric
  const void* bias;         // nullptr: none
  void* out;
  float* partial;           // (splits, M, N) fp32, only with splits > 1
  int32_t* tickets;         // one counter per tile, zero at rest
  int64_t stride_xm;
  int64_t stride_om;
  int M, N, K, num_chunks, num_groups, group_size, chunks_per_split, bias_kind;
  int scales_bf16;  // scale pairs hold bf16 (else fp16)
  int group_shift;  // log2(group length): a group is 2^group_shift positions (31: one group)
  int pdl;  // launched as a programmatic dependent launch
};

template <typename T>
struct Ops;

template <>
struct Ops<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // (1024, 1024)
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();  // mma.sync m16n8k16 needs sm_80; mma.py never launches below that
#endif
  }
};

template <>
struct Ops<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // (128, 128)
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();  // mma.sync m16n8k16 needs sm_80; mma.py never launches below that
#endif
  }
};

template <typename T2>
__device__ __forceinline__ T2 as2(uint32_t u) {
  return *reinterpret_cast<T2*>(&u);
}
template <typename T2>
__device__ __forceinline__ uint32_t bits_of(T2 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}

// Per-chunk constants of one lane: for column g (index 0) and g + 8 (index 1), the scale pair
// (s, s), magic + zero, and (fp16 only) -(64 + zero).
template <typename T>
struct Consts {
  uint32_t scale[2];
  uint32_t magic_zero[2];
  uint32_t neg_64_zero[2];
};

__device__ __forceinline__ float scale_to_float(uint32_t bits16, int is_bf16) {
  return is_bf16 ? __uint_as_float(bits16 << 16) : __half2float(__ushort_as_half(static_cast<unsigned short>(bits16)));
}

template <typename T, int SYM>
__device__ __forceinline__ Consts<T> make_consts(float s_lo, float s_hi, uint32_t zero_pair) {
  Consts<T> k;
  if constexpr (Ops<T>::kMagic == 0x64006400u) {
    k.scale[0] = bits_of(__float2half2_rn(s_lo));
    k.scale[1] = bits_of(__float2half2_rn(s_hi));
  } else {
    k.scale[0] = bits_of(__float2bfloat162_rn(s_lo));
    k.scale[1] = bits_of(__float2bfloat162_rn(s_hi));
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint32_t z = SYM ? 8u : ((i == 0 ? zero_pair : (zero_pair >> 16)) & 0xFFFFu);
    k.magic_zero[i] = Ops<T>::kMagic | (z | (z << 16));  // magic + z: z < 2^mantissa bits, exact
    if constexpr (Ops<T>::kMagic == 0x64006400u) {
      const uint32_t b = __half_as_ushort(__float2half_rn(-(64.f + static_cast<float>(z))));
      k.neg_64_zero[i] = b | (b << 16);
    } else {
      k.neg_64_zero[i] = 0u;
    }
  }
  return k;
}

// (a & MASK) | MAGIC in one LOP3 (C++ would give an AND and an OR: LOP3 takes one immediate).
template <uint32_t MASK, uint32_t MAGIC>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "n"(MASK), "n"(MAGIC));
  return r;
}

template <typename T, int SA>
__device__ __forceinline__ void dequant(uint32_t w, const Consts<T>& k, uint32_t (&a)[4]) {
  using T2 = typename Ops<T>::T2;
  T2 d[4];
  if constexpr (Ops<T>::kMagic == 0x64006400u) {
    const __half2 sixteenth = __floats2half2_rn(0.0625f, 0.0625f);
    const uint32_t w8 = w >> 8;
    const uint32_t h0 = and_or<0x000F000Fu, 0x64006400u>(w);   // 1024 + q, column g
    const uint32_t h1 = and_or<0x00F000F0u, 0x64006400u>(w);   // 1024 + 16 q, column g + 8
    const uint32_t h2 = and_or<0x000F000Fu, 0x64006400u>(w8);
    const uint32_t h3 = and_or<0x00F000F0u, 0x64006400u>(w8);
    d[0] = __hsub2(as2<__half2>(h0), as2<__half2>(k.magic_zero[0]));
    d[1] = __hfma2(as2<__half2>(h1), sixteenth, as2<__half2>(k.neg_64_zero[1]));
    d[2] = __hsub2(as2<__half2>(h2), as2<__half2>(k.magic_zero[0]));
    d[3] = __hfma2(as2<__half2>(h3), sixteenth, as2<__half2>(k.neg_64_zero[1]));
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t h = and_or<0x000F000Fu, 0x43004300u>(w >> (4 * i));  // 128 + q
      d[i] = __hsub2(as2<T2>(h), as2<T2>(k.magic_zero[i & 1]));          // odd nibbles: column g + 8
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (SA != 0) {
      a[i] = bits_of(d[i]);
    } else {
      a[i] = bits_of(__hmul2(d[i], as2<T2>(k.scale[i & 1])));
    }
  }
}

// What a lane prefetches for one chunk: its four words of codes, the scale / zero pairs of its
// group and, with XPF, its activations (else they are loaded when the chunk is multiplied: they
// are shared by every tile, so they come from L1 or L2, and registers go to codes instead).
template <int MB, int XPF>
struct Chunk {
  uint4 w;
  uint32_t s;
  uint32_t z;
  uint4 x[XPF ? MB : 1][2];
};


// Codes are read once. LD 0: read-only path; 1: bypass L1 (kept for activations) and ask L2 for
// 256-byte sectors; 2: bypass L1 only.
template <int LD>
__device__ __forceinline__ uint4 load_codes(const uint4* ptr) {
  uint4 v;
  if constexpr (LD == 1) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
  } else if constexpr (LD == 2) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
  } else {
    v = __ldg(ptr);
  }
  return v;
}

__device__ __forceinline__ void prefetch_l2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(ptr));
}
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// A lane's pointers: codes of its tile (+ 32 uint4 per chunk), scale / zero pairs of its columns
// (+ 8 per group), activations of its rows g, g + 8 at position 16t (+ 64 per chunk).
template <typename T, int MB>
struct Lane {
  const uint4* w;
  const uint32_t* s;
  const uint32_t* z;
  const T* x[MB];
  bool row_ok[MB];
  int pos0;  // 16t
};

// Activations of positions c·64 + 16t … + 15 for rows g, g + 8. Rows past M are left as they are
// (their output columns are never stored); positions past K are zero (their codes are padding).
template <typename T, int MB>
__device__ __forceinline__ void load_x(uint4 (&xv)[MB][2], const Params& p, const Lane<T, MB>& ln, int c) {
  const int pos = c * kChunkK + ln.pos0;
#pragma unroll
  for (int j = 0; j < MB; ++j) {
    if (ln.row_ok[j]) {
      if (pos < p.K) {
        const uint4* src = reinterpret_cast<const uint4*>(ln.x[j] + c * kChunkK);
        xv[j][0] = __ldg(src);
        xv[j][1] = __ldg(src + 1);
      } else {
        xv[j][0] = make_uint4(0u, 0u, 0u, 0u);
        xv[j][1] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  }
}

template <typename T, int MB, int XPF, int LD, int SYM>
__device__ __forceinline__ void load_chunk(Chunk<MB, XPF>& ch, const Params& p, const Lane<T, MB>& ln, int c) {
  ch.w = load_codes<LD>(ln.w + c * 32);
  const int group = min((c * kChunkK + ln.pos0) >> p.group_shift, p.num_groups - 1);  // padding: last group
  ch.s = __ldg(ln.s + group * 8);
  if constexpr (!SYM) ch.z = __ldg(ln.z + group * 8);
  if constexpr (XPF != 0) load_x<T, MB>(ch.x, p, ln, c);
}

template <typename T, int MB, int XPF, int SA, int SYM>
__device__ __forceinline__ void compute_chunk(const Chunk<MB, XPF>& ch, const Params& p, const Lane<T, MB>& ln,
                                              int c, float (&total)[MB][4]) {
  uint4 xv[MB][2];
  if constexpr (XPF != 0) {
#pragma unroll
    for (int j = 0; j < MB; ++j) {
      xv[j][0] = ch.x[j][0];
      xv[j][1] = ch.x[j][1];
    }
  } else {
    load_x<T, MB>(xv, p, ln, c);
  }
  // the scales are stored in the checkpoint's dtype (p.scales_bf16), whatever the activations' dtype
  const float s_lo = scale_to_float(ch.s & 0xFFFFu, p.scales_bf16);
  const float s_hi = scale_to_float(ch.s >> 16, p.scales_bf16);
  const Consts<T> k = make_consts<T, SYM>(s_lo, s_hi, SYM ? 0u : ch.z);
  const uint32_t words[4] = {ch.w.x, ch.w.y, ch.w.z, ch.w.w};
  float acc[MB][4];
#pragma unroll
  for (int j = 0; j < MB; ++j) {
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[j][r] = 0.f;
  }
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    uint32_t a[4];
    dequant<T, SA>(words[s], k, a);
#pragma unroll
    for (int j = 0; j < MB; ++j) {
      const uint4& x = xv[j][s >> 1];
      const uint32_t b0 = (s & 1) ? x.z : x.x;
      const uint32_t b1 = (s & 1) ? x.w : x.y;
      Ops<T>::mma(SA ? acc[j] : total[j], a, b0, b1);
    }
  }
  if constexpr (SA != 0) {
    // one group per chunk: y += s * sum x (q - z), in fp32 (rows 0, 1: column g; 2, 3: g + 8)
#pragma unroll
    for (int j = 0; j < MB; ++j) {
      total[j][0] = fmaf(acc[j][0], s_lo, total[j][0]);
      total[j][1] = fmaf(acc[j][1], s_lo, total[j][1]);
      total[j][2] = fmaf(acc[j][2], s_hi, total[j][2]);
      total[j][3] = fmaf(acc[j][3], s_hi, total[j][3]);
    }
  }
}


// MB: blocks of 8 activation rows (1: M <= 8, 2: M <= 16); U: chunks per warp per batch;
// PF: issue the next batch's loads before multiplying the current one; SYM: zero = 8 everywhere.
template <typename T, int MB, int U, int PF, int XPF, int LD, int SA, int SYM>
__global__ void __launch_bounds__(256) mma_int4_kernel(const Params p) {
  __shared__ float red[kMaxWarps * MB * 8 * kTileN];
  __shared__ int is_last;

  const int warps = blockDim.x >> 5;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int tile = blockIdx.x;
  const int split = blockIdx.y;
  const int splits = gridDim.y;
  const int c_begin = split * p.chunks_per_split;
  const int c_end = min(c_begin + p.chunks_per_split, p.num_chunks);

  Lane<T, MB> ln;
  ln.w = p.w + static_cast<int64_t>(tile) * p.num_chunks * 32 + lane;
  ln.s = p.scales + static_cast<int64_t>(tile) * p.num_groups * 8 + g;
  ln.z = SYM ? nullptr : p.zeros + static_cast<int64_t>(tile) * p.num_groups * 8 + g;
  ln.pos0 = 16 * t;
#pragma unroll
  for (int j = 0; j < MB; ++j) {
    const int m = g + 8 * j;
    ln.row_ok[j] = m < p.M;
    ln.x[j] = static_cast<const T*>(p.x) + static_cast<int64_t>(ln.row_ok[j] ? m : 0) * p.stride_xm + ln.pos0;
  }

  float total[MB][4];
#pragma unroll
  for (int j = 0; j < MB; ++j) {
#pragma unroll
    for (int r = 0; r < 4; ++r) total[j][r] = 0.f;
  }

  const int stride = U * warps;
  // Programmatic dependent launch (p.pdl, launched with the attribute): the codes do not depend on
  // the kernel before, so the warp's first chunks are fetched into L2 while it finishes; the
  // activations and the tickets are touched only after griddepcontrol.wait.
  if (p.pdl) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c_begin + warp + u * warps;
      if (c < c_end) prefetch_l2(ln.w + c * 32);
    }
    grid_dependency_wait();
  }
  // Chunks past the range are neither loaded nor multiplied (their registers are left as they are).
  if constexpr (PF != 0) {
    Chunk<MB, XPF> cur[U];
    int base = c_begin + warp;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = base + u * warps;
      if (c < c_end) load_chunk<T, MB, XPF, LD, SYM>(cur[u], p, ln, c);
    }
#pragma unroll 1
    for (; base < c_end; base += stride) {
      Chunk<MB, XPF> nxt[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = base + stride + u * warps;
        if (c < c_end) load_chunk<T, MB, XPF, LD, SYM>(nxt[u], p, ln, c);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = base + u * warps;
        if (c < c_end) compute_chunk<T, MB, XPF, SA, SYM>(cur[u], p, ln, c, total);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) cur[u] = nxt[u];
    }
  } else {
#pragma unroll 1
    for (int base = c_begin + warp; base < c_end; base += stride) {
      Chunk<MB, XPF> cur[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = base + u * warps;
        if (c < c_end) load_chunk<T, MB, XPF, LD, SYM>(cur[u], p, ln, c);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = base + u * warps;
        if (c < c_end) compute_chunk<T, MB, XPF, SA, SYM>(cur[u], p, ln, c, total);
      }
    }
  }

  if (p.pdl) launch_dependents();

  // accumulator (row n of the tile, column m): c0, c1 = (g, 2t), (g, 2t+1); c2, c3 = (g+8, 2t), (g+8, 2t+1)
  constexpr int kRows = MB * 8;
#pragma unroll
  for (int j = 0; j < MB; ++j) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int m = 8 * j + 2 * t + (r & 1);
      const int n = g + 8 * (r >> 1);
      red[(warp * kRows + m) * kTileN + n] = total[j][r];
    }
  }
  __syncthreads();

  const int outputs = p.M * kTileN;  // M <= kRows
  const int n_base = tile * kTileN;
  if (splits == 1) {
    for (int idx = threadIdx.x; idx < outputs; idx += blockDim.x) {
      const int m = idx / kTileN;
      const int n = n_base + (idx % kTileN);
      if (n < p.N) {
        float v = 0.f;
        for (int w = 0; w < warps; ++w) v += red[(w * kRows + m) * kTileN + (idx % kTileN)];
        if (p.bias != nullptr) v += nq_cuda::load_bias(p.bias, p.bias_kind, n);
        Ops<T>::store(p.out, static_cast<int64_t>(m) * p.stride_om + n, v);
      }
    }
    return;
  }

  for (int idx = threadIdx.x; idx < outputs; idx += blockDim.x) {
    const int m = idx / kTileN;
    const int n = n_base + (idx % kTileN);
    if (n < p.N) {
      float v = 0.f;
      for (int w = 0; w < warps; ++w) v += red[(w * kRows + m) * kTileN + (idx % kTileN)];
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
    const int n = n_base + (idx % kTileN);
    if (n < p.N) {
      float v = 0.f;
      const float* src = p.partial + static_cast<int64_t>(m) * p.N + n;
      const int64_t step = static_cast<int64_t>(p.M) * p.N;
      for (int s = 0; s < splits; ++s) v += __ldcg(src + s * step);
      if (p.bias != nullptr) v += nq_cuda::load_bias(p.bias, p.bias_kind, n);
      Ops<T>::store(p.out, static_cast<int64_t>(m) * p.stride_om + n, v);
    }
  }
  if (threadIdx.x == 0) atomicExch(p.tickets + tile, 0);
}

template <typename Kernel>
void launch_kernel(Kernel kernel, bool pdl, dim3 grid, dim3 block, cudaStream_t stream, const Params& p) {
  if (!pdl) {
    kernel<<<grid, block, 0, stream>>>(p);
    return;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
}

template <typename T, int MB, int U, int PF, int XPF, int LD, int SA>
void launch_sym(bool symmetric, dim3 grid, dim3 block, cudaStream_t stream, const Params& p) {
  if (symmetric) {
    launch_kernel(mma_int4_kernel<T, MB, U, PF, XPF, LD, SA, 1>, p.pdl != 0, grid, block, stream, p);
  } else {
    launch_kernel(mma_int4_kernel<T, MB, U, PF, XPF, LD, SA, 0>, p.pdl != 0, grid, block, stream, p);
  }
}

// The instantiated variants (id, chunks per batch U, prefetch PF, activations prefetched XPF, code
// load mode LD); mma.py lists the same table (VARIANTS).
#define NQ_MMA_VARIANTS(X) \
  X(0, 1, 1, 1, 1)         \
  X(1, 2, 1, 1, 1)         \
  X(2, 4, 0, 1, 1)         \
  X(3, 2, 0, 1, 1)         \
  X(4, 6, 0, 1, 1)         \
  X(5, 4, 0, 1, 2)

// SA: every chunk lies in one group (group length a multiple of 64), so the scale multiplies the
// fp32 accumulator once per chunk instead of every weight.
template <typename T, int MB>
void launch_variant(int variant, bool one_group_per_chunk, bool symmetric, dim3 grid, dim3 block,
                    cudaStream_t stream, const Params& p) {
#define NQ_MMA_CASE(id, U, PF, XPF, LD)                                               \
  case id:                                                                            \
    if (one_group_per_chunk) {                                                        \
      launch_sym<T, MB, U, PF, XPF, LD, 1>(symmetric, grid, block, stream, p);        \
    } else {                                                                          \
      launch_sym<T, MB, U, PF, XPF, LD, 0>(symmetric, grid, block, stream, p);        \
    }                                                                                 \
    break;
  switch (variant) {
    NQ_MMA_VARIANTS(NQ_MMA_CASE)
    default:
      TORCH_CHECK(false, "unknown mma_int4 variant ", variant);
  }
#undef NQ_MMA_CASE
}

template <typename T>
void launch_typed(int block_m, int variant, bool symmetric, dim3 grid, dim3 block, cudaStream_t stream,
                  const Params& p) {
  const bool one_group_per_chunk = p.group_size % kChunkK == 0;
  if (block_m <= 8) {
    launch_variant<T, 1>(variant, one_group_per_chunk, symmetric, grid, block, stream, p);
  } else {
    launch_variant<T, 2>(variant, one_group_per_chunk, symmetric, grid, block, stream, p);
  }
}
// defined in mma_int4_half.cu and mma_int4_bf16.cu (one compilation unit per dtype builds in parallel)
void launch_half(int block_m, int variant, bool symmetric, dim3 grid, dim3 block, cudaStream_t stream,
                 const Params& p);
void launch_bf16(int block_m, int variant, bool symmetric, dim3 grid, dim3 block, cudaStream_t stream,
                 const Params& p);

}  // namespace nq_mma
