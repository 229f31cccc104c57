// Int4 x fp16/bf16 matmul for M <= 16 activation rows on tensor cores (mma.sync m16n8k16), reading
// the GPTQ layout in kernel order directly (no repacked copy of the weights).
//
// Kernel templates; instantiated per activation dtype in mma_int4_half.cu / mma_int4_bf16.cu and
// launched from mma_int4.cu. Built by kernels/cuda/extension.py. Notation as in gemv_int4.cu:
//
//   qweight (K/8, N) int32, word r holds the codes of positions 8r .. 8r+7 (code j in bits 4j..)
//   scales  (G, N) fp16 or bf16, qzeros (G, ceil(N/8)) int32 holding zero - 1 (unused if symmetric)
//   y[m, n] = sum_k x[m, perm[k]] * scales[g(k), n] * (q[k, n] - zero[g(k), n]) (+ bias[n])
//
// The product is computed transposed, y^T = W x^T, so the weights fill the instruction's 16-row
// operand A (16 output columns x 16 input positions) and the activations its 8-column operand B
// (16 positions x 8 rows of x): one instruction serves M <= 8, two serve M <= 16, and the cost
// per weight does not grow with M.
//
// Fragment map. Lane (g, t) = (lane / 4, lane % 4) holds rows g and g + 8 of A, slots 2t, 2t+1,
// 2t+8, 2t+9 of K, and column g of B. The rows of A are mapped to ADJACENT output columns, row g
// to column 2g and row g + 8 to column 2g + 1 of a 16-column m-tile, so a lane's two columns are
// one 8-byte load of a packed GPTQ row (a permutation of A's rows only permutes the outputs).
// The slots of K are mapped to the nibbles of that row's words: in mma step p (0, 1) of a packed
// row r, slots 2t, 2t+1 hold positions 8r + 2p, 8r + 2p + 4 (nibbles 2p, 2p + 4: one mask of the
// word shifted by 8p) and slots 2t+8, 2t+9 positions 8r + 2p + 1, 8r + 2p + 5. B follows the same
// map, so the activations x[8r .. 8r+7] (one 16-byte load) are paired by two byte permutes per
// step. Every lane t reads its own packed rows: a "chunk" of 64 positions is packed rows
// 8c .. 8c+7, and lane t takes rows 8c + 2t, 8c + 2t + 1 (positions 16t .. 16t + 15 of the chunk,
// which lie inside one group for every group length that is a multiple of 16).
//
// With NT m-tiles per warp (NT = 2: 32 columns), a lane owns 2 NT adjacent columns (one 16-byte
// load per packed row) and every activation fragment feeds NT instructions.
//
// Work split. A block of W warps owns one tile of 16 NT columns and a range of chunks (the split
// along K); warp w takes chunks w, w + W, ... of the range, U at a time (with PF the next U
// chunks' codes are loaded before the current ones are multiplied). (Blocks of several warps side
// by side along N, reading longer runs of every packed row, were measured no faster on H100.)
//
// Dequantization (per 32-bit word = 8 codes): a nibble OR-ed into the mantissa of the 16-bit
// magic number (1024 in fp16, 128 in bf16) gives magic + q exactly; subtracting magic + zero
// gives q - z exactly; multiplying by the scale rounds once, as the reference's dequantized
// weight does. For fp16 the odd nibbles are taken in place (magic + 16 q) and brought to q - z
// by one fma with 1/16 and -(64 + z) (exact), saving a shift. For group lengths that are
// multiples of 64 (a chunk in one group) the scale multiplies the fp32 accumulator once per
// chunk instead (SA).
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

constexpr int kChunkK = 64;  // input positions per chunk (8 packed rows)
constexpr int kMaxWarps = 8;

struct Params {
  const void* x;
  const uint32_t* qweight;  // (rows, N) int32, GPTQ codes in kernel order
  const void* scales;       // (G, N) fp16 or bf16 (scales_bf16)
  const uint32_t* qzeros;   // (G, zero_words) GPTQ packed zeros - 1; null if symmetric
  const void* bias;         // nullptr: none
  void* out;
  float* partial;           // (splits, M, N) fp32, only with splits > 1
  int32_t* tickets;         // one counter per tile, zero at rest
  int64_t stride_xm;
  int64_t stride_om;
  int M, N, K, rows, zero_words, num_chunks, num_groups, chunks_per_split, bias_kind;
  int scales_bf16;  // scales hold bf16 (else fp16)
  int group_shift;  // log2(group length): a group is 2^group_shift positions (31: one group)
  int pdl;          // launched as a programmatic dependent launch
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
// Same as Ops<__half> but for the bf16 mma instruction and magic number: a specialisation on purpose.
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

// Per-chunk constants of one lane and m-tile: for its columns 2g (index 0) and 2g + 1 (index 1),
// the scale pair (s, s), magic + zero, and (fp16 only) -(64 + zero).
template <typename T>
struct Consts {
  uint32_t scale[2];
  uint32_t magic_zero[2];
  uint32_t neg_64_zero[2];
};

__device__ __forceinline__ float scale_to_float(uint32_t bits16, int is_bf16) {
  return is_bf16 ? __uint_as_float(bits16 << 16) : __half2float(__ushort_as_half(static_cast<unsigned short>(bits16)));
}

// zeros: the two stored zeros (zero - 1) of the columns in bits 0..3 and 4..7 (SYM: unused, zero 8).
template <typename T, int SYM>
__device__ __forceinline__ Consts<T> make_consts(float s0, float s1, uint32_t zeros) {
  Consts<T> k;
  if constexpr (Ops<T>::kMagic == 0x64006400u) {
    k.scale[0] = bits_of(__float2half2_rn(s0));
    k.scale[1] = bits_of(__float2half2_rn(s1));
  } else {
    k.scale[0] = bits_of(__float2bfloat162_rn(s0));
    k.scale[1] = bits_of(__float2bfloat162_rn(s1));
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint32_t z = SYM ? 8u : ((zeros >> (4 * i)) & 0xFu) + 1u;
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

// The A fragments of the two mma steps of one packed row: w0, w1 are the words of columns 2g and
// 2g + 1. Step p, register 0 / 1: nibbles (2p, 2p + 4) of w0 / w1; registers 2 / 3: nibbles
// (2p + 1, 2p + 5).
template <typename T, int SA>
__device__ __forceinline__ void dequant_row(uint32_t w0, uint32_t w1, const Consts<T>& k, uint32_t (&a)[2][4]) {
  using T2 = typename Ops<T>::T2;
  T2 d[2][4];
  if constexpr (Ops<T>::kMagic == 0x64006400u) {
    const __half2 sixteenth = __floats2half2_rn(0.0625f, 0.0625f);
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const uint32_t u0 = p ? (w0 >> 8) : w0;
      const uint32_t u1 = p ? (w1 >> 8) : w1;
      d[p][0] = __hsub2(as2<__half2>(and_or<0x000F000Fu, 0x64006400u>(u0)), as2<__half2>(k.magic_zero[0]));
      d[p][1] = __hsub2(as2<__half2>(and_or<0x000F000Fu, 0x64006400u>(u1)), as2<__half2>(k.magic_zero[1]));
      d[p][2] = __hfma2(as2<__half2>(and_or<0x00F000F0u, 0x64006400u>(u0)), sixteenth, as2<__half2>(k.neg_64_zero[0]));
      d[p][3] = __hfma2(as2<__half2>(and_or<0x00F000F0u, 0x64006400u>(u1)), sixteenth, as2<__half2>(k.neg_64_zero[1]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // nibbles (i, i + 4): step i / 2, registers 2 (i % 2) and 2 (i % 2) + 1
      d[i >> 1][2 * (i & 1)] = __hsub2(as2<T2>(and_or<0x000F000Fu, 0x43004300u>(w0 >> (4 * i))),
                                       as2<T2>(k.magic_zero[0]));
      d[i >> 1][2 * (i & 1) + 1] = __hsub2(as2<T2>(and_or<0x000F000Fu, 0x43004300u>(w1 >> (4 * i))),
                                           as2<T2>(k.magic_zero[1]));
    }
  }
#pragma unroll
  for (int p = 0; p < 2; ++p) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      if constexpr (SA != 0) {
        a[p][r] = bits_of(d[p][r]);
      } else {
        a[p][r] = bits_of(__hmul2(d[p][r], as2<T2>(k.scale[r & 1])));
      }
    }
  }
}

// What a lane loads for one chunk: the words of its 2 NT columns in its two packed rows, the
// scales and stored zeros of its group and its activations (16 positions per row block of 8).
template <int NT, int MB>
struct Chunk {
  uint32_t w[2][2 * NT];
  uint32_t s[NT];  // scale pairs (columns 2i, 2i + 1 of the lane)
  uint32_t z;      // 4-bit stored zeros of the lane's columns
  uint4 x[MB][2];
};

// Codes are read once: LD 0 read-only path, 1 bypass L1 (kept for the activations) and ask L2
// for 256-byte sectors, 2 bypass L1 only.
template <int LD>
__device__ __forceinline__ uint2 load_u2(const uint32_t* ptr) {
  uint2 v;
  if constexpr (LD == 1) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(ptr));
  } else if constexpr (LD == 2) {
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(ptr));
  } else {
    v = __ldg(reinterpret_cast<const uint2*>(ptr));
  }
  return v;
}
template <int LD>
__device__ __forceinline__ uint4 load_u4(const uint32_t* ptr) {
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
    v = __ldg(reinterpret_cast<const uint4*>(ptr));
  }
  return v;
}

template <int NT, int LD>
__device__ __forceinline__ void load_words(uint32_t (&w)[2 * NT], const uint32_t* ptr) {
  if constexpr (NT == 1) {
    const uint2 v = load_u2<LD>(ptr);
    w[0] = v.x;
    w[1] = v.y;
  } else {
    const uint4 v = load_u4<LD>(ptr);
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  }
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

// Where a lane reads. Chunk c of lane (g, t) is
//   codes        qweight + (8c + 2t) N + col    (packed rows 8c + 2t and 8c + 2t + 1; + N for the second)
//   activations  x + m stride + 64c + 16t       (rows m = g + 8j; + 8 elements for the second row)
// so the warp's next chunk, c + W, is every pointer plus a constant (8 W N words, 64 W elements):
// the loops advance pointers instead of recomputing addresses from c. Lanes whose columns lie past
// N read column 0 and rows past M read row 0 (those outputs are never stored), so only the last,
// partial chunk of K (K % 64 != 0) needs bounds checks (CHECKED).
template <typename T, int MB>
struct Cursor {
  const uint32_t* w;
  const T* x[MB];
  int c;
};

// Per-lane constants of the loads: first column, bit offset of its zero in a qzeros word, 2t, 16t,
// and the warp's chunk step (chunks, code words, activation elements).
struct LaneGeometry {
  int col;
  int zero_shift;
  int row0;
  int pos0;
  int chunk_step;
  int64_t w_step;
  int x_step;
};

template <typename T, int MB, int CHECKED>
__device__ __forceinline__ void load_x(uint4 (&xv)[MB][2], const Params& p, const T* const (&x)[MB], int pos) {
#pragma unroll
  for (int j = 0; j < MB; ++j) {
    const uint4* src = reinterpret_cast<const uint4*>(x[j]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      xv[j][h] = (!CHECKED || pos + 8 * h < p.K) ? __ldg(src + h) : make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// One chunk of the lane at codes `w`, activations `x`. Positions past K (CHECKED) read as zero
// activations and zero codes (the codes are not read).
template <typename T, int NT, int MB, int LD, int SA, int SYM, int CHECKED>
__device__ __forceinline__ void load_chunk(Chunk<NT, MB>& ch, const Params& p, const LaneGeometry& lg,
                                           const uint32_t* w, const T* const (&x)[MB], int c) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (!CHECKED || c * 8 + lg.row0 + h < p.rows) {
      load_words<NT, LD>(ch.w[h], w + (h ? p.N : 0));
    } else {
#pragma unroll
      for (int i = 0; i < 2 * NT; ++i) ch.w[h][i] = 0u;
    }
  }
  // SA: a group holds whole chunks, so the group is the same for all lanes
  int group = SA ? c >> (p.group_shift - 6) : (c * kChunkK + lg.pos0) >> p.group_shift;
  if (CHECKED) group = min(group, p.num_groups - 1);  // padding positions: the last group
  const int at = group * p.N + lg.col;
  if constexpr (NT == 1) {
    ch.s[0] = __ldg(reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(p.scales) + at));
  } else {
    const uint2 s = __ldg(reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(p.scales) + at));
    ch.s[0] = s.x;
    ch.s[1] = s.y;
  }
  if constexpr (!SYM) ch.z = __ldg(p.qzeros + group * p.zero_words + (lg.col >> 3)) >> lg.zero_shift;
  load_x<T, MB, CHECKED>(ch.x, p, x, c * kChunkK + lg.pos0);
}

// Chunks cur.c + u W (u < U) of the lane; CHECKED: only those before c_end, the last maybe partial.
template <typename T, int NT, int MB, int U, int LD, int SA, int SYM, int CHECKED>
__device__ __forceinline__ void load_batch(Chunk<NT, MB> (&batch)[U], const Params& p, const LaneGeometry& lg,
                                           const Cursor<T, MB>& cur, int c_end) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = cur.c + u * lg.chunk_step;
    if (!CHECKED || c < c_end) {
      const T* x[MB];
#pragma unroll
      for (int j = 0; j < MB; ++j) x[j] = cur.x[j] + u * lg.x_step;
      load_chunk<T, NT, MB, LD, SA, SYM, CHECKED>(batch[u], p, lg, cur.w + u * lg.w_step, x, c);
    }
  }
}

template <typename T, int MB, int U>
__device__ __forceinline__ void advance(Cursor<T, MB>& cur, const LaneGeometry& lg) {
  cur.c += U * lg.chunk_step;
  cur.w += U * lg.w_step;
#pragma unroll
  for (int j = 0; j < MB; ++j) cur.x[j] += U * lg.x_step;
}

template <typename T, int NT, int MB, int SA, int SYM>
__device__ __forceinline__ void compute_chunk(const Chunk<NT, MB>& ch, const Params& p, float (&total)[NT][MB][4]) {
  float s0[NT], s1[NT];
  Consts<T> k[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    // the scales are stored in the checkpoint's dtype (p.scales_bf16), whatever the activations' dtype
    s0[i] = scale_to_float(ch.s[i] & 0xFFFFu, p.scales_bf16);
    s1[i] = scale_to_float(ch.s[i] >> 16, p.scales_bf16);
    k[i] = make_consts<T, SYM>(s0[i], s1[i], SYM ? 0u : ch.z >> (8 * i));
  }
  float acc[NT][MB][4];
  if constexpr (SA != 0) {
#pragma unroll
    for (int i = 0; i < NT; ++i) {
#pragma unroll
      for (int j = 0; j < MB; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    // B of step p: (x[2p], x[2p + 4]) and (x[2p + 1], x[2p + 5]) of the row's 8 positions
    uint32_t b[MB][2][2];
#pragma unroll
    for (int j = 0; j < MB; ++j) {
      const uint4 x = ch.x[j][h];
      b[j][0][0] = __byte_perm(x.x, x.z, 0x5410);
      b[j][0][1] = __byte_perm(x.x, x.z, 0x7632);
      b[j][1][0] = __byte_perm(x.y, x.w, 0x5410);
      b[j][1][1] = __byte_perm(x.y, x.w, 0x7632);
    }
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      uint32_t a[2][4];
      dequant_row<T, SA>(ch.w[h][2 * i], ch.w[h][2 * i + 1], k[i], a);
#pragma unroll
      for (int step = 0; step < 2; ++step) {
#pragma unroll
        for (int j = 0; j < MB; ++j) {
          Ops<T>::mma(SA ? acc[i][j] : total[i][j], a[step], b[j][step][0], b[j][step][1]);
        }
      }
    }
  }
  if constexpr (SA != 0) {
    // one group per chunk: y += s * sum x (q - z), in fp32 (registers 0, 1: column 2g; 2, 3: 2g + 1)
#pragma unroll
    for (int i = 0; i < NT; ++i) {
#pragma unroll
      for (int j = 0; j < MB; ++j) {
        total[i][j][0] = fmaf(acc[i][j][0], s0[i], total[i][j][0]);
        total[i][j][1] = fmaf(acc[i][j][1], s0[i], total[i][j][1]);
        total[i][j][2] = fmaf(acc[i][j][2], s1[i], total[i][j][2]);
        total[i][j][3] = fmaf(acc[i][j][3], s1[i], total[i][j][3]);
      }
    }
  }
}

// NT: 16-column m-tiles per warp (tile = 16 NT columns); MB: blocks of 8 activation rows (1: M <= 8,
// 2: M <= 16); U: chunks per warp per batch; PF: issue the next batch's loads before multiplying
// the current one; LD: code load mode; SA: scale on the accumulator; SYM: zero = 8 everywhere.
template <typename T, int NT, int MB, int U, int PF, int LD, int SA, int SYM>
__global__ void __launch_bounds__(256) mma_int4_kernel(const Params p) {
  constexpr int kTileN = 16 * NT;
  constexpr int kRows = MB * 8;
  __shared__ float red[kMaxWarps * kRows * kTileN];
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

  const int col = tile * kTileN + 2 * NT * g;
  LaneGeometry lg;
  lg.col = col < p.N ? col : 0;
  lg.zero_shift = 4 * (lg.col & 7);
  lg.row0 = 2 * t;
  lg.pos0 = 16 * t;
  lg.chunk_step = warps;
  lg.w_step = static_cast<int64_t>(warps) * 8 * p.N;
  lg.x_step = warps * kChunkK;
  Cursor<T, MB> cur;
  cur.c = c_begin + warp;
  cur.w = p.qweight + static_cast<int64_t>(8 * cur.c + lg.row0) * p.N + lg.col;
#pragma unroll
  for (int j = 0; j < MB; ++j) {
    const int m = g + 8 * j;
    cur.x[j] = static_cast<const T*>(p.x) + static_cast<int64_t>(m < p.M ? m : 0) * p.stride_xm +
               cur.c * kChunkK + lg.pos0;
  }

  float total[NT][MB][4];
#pragma unroll
  for (int i = 0; i < NT; ++i) {
#pragma unroll
    for (int j = 0; j < MB; ++j) {
#pragma unroll
      for (int r = 0; r < 4; ++r) total[i][j][r] = 0.f;
    }
  }

  // Programmatic dependent launch (p.pdl, launched with the attribute): the codes do not depend on
  // the kernel before, so the warp's first chunks are fetched into L2 while it finishes; the
  // activations and the tickets are touched only after griddepcontrol.wait.
  if (p.pdl) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = cur.c + u * warps;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (c < c_end && c * 8 + lg.row0 + h < p.rows) prefetch_l2(cur.w + u * lg.w_step + (h ? p.N : 0));
      }
    }
    grid_dependency_wait();
  }
  // Full batches (U chunks of the warp, all inside K) without bounds checks, then the rest of the
  // warp's chunks (fewer than U, the last maybe partial) as one checked batch.
  const int full_end = min(c_end, p.rows >> 3);  // chunks before it hold 64 positions inside K
  const int last_offset = (U - 1) * warps;       // the batch's last chunk, from its first
  if constexpr (PF != 0) {
    if (cur.c + last_offset < full_end) {
      Chunk<NT, MB> now[U];
      load_batch<T, NT, MB, U, LD, SA, SYM, 0>(now, p, lg, cur, c_end);
#pragma unroll 1
      for (;;) {
        Cursor<T, MB> next = cur;
        advance<T, MB, U>(next, lg);
        const bool more = next.c + last_offset < full_end;
        Chunk<NT, MB> ahead[U];
        if (more) load_batch<T, NT, MB, U, LD, SA, SYM, 0>(ahead, p, lg, next, c_end);
#pragma unroll
        for (int u = 0; u < U; ++u) compute_chunk<T, NT, MB, SA, SYM>(now[u], p, total);
        cur = next;
        if (!more) break;
#pragma unroll
        for (int u = 0; u < U; ++u) now[u] = ahead[u];
      }
    }
  } else {
#pragma unroll 1
    for (; cur.c + last_offset < full_end; advance<T, MB, U>(cur, lg)) {
      Chunk<NT, MB> now[U];
      load_batch<T, NT, MB, U, LD, SA, SYM, 0>(now, p, lg, cur, c_end);
#pragma unroll
      for (int u = 0; u < U; ++u) compute_chunk<T, NT, MB, SA, SYM>(now[u], p, total);
    }
  }
  if (cur.c < c_end) {
    Chunk<NT, MB> now[U];
    load_batch<T, NT, MB, U, LD, SA, SYM, 1>(now, p, lg, cur, c_end);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (cur.c + u * warps < c_end) compute_chunk<T, NT, MB, SA, SYM>(now[u], p, total);
    }
  }

  if (p.pdl) launch_dependents();

  // accumulator of m-tile i (A row, B column): c0, c1 = (g, 2t), (g, 2t+1); c2, c3 = (g+8, 2t),
  // (g+8, 2t+1); A row g is column 2 NT g + 2i of the tile, row g + 8 the column after it
#pragma unroll
  for (int i = 0; i < NT; ++i) {
#pragma unroll
    for (int j = 0; j < MB; ++j) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int m = 8 * j + 2 * t + (r & 1);
        const int n = 2 * NT * g + 2 * i + (r >> 1);
        red[(warp * kRows + m) * kTileN + n] = total[i][j][r];
      }
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

  // Split-K ticket reduction as in gemv_int4.cu, inlined per kernel on purpose: the tile indexing differs.
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

template <typename T, int NT, int MB, int U, int PF, int LD, int SA>
void launch_sym(bool symmetric, dim3 grid, dim3 block, cudaStream_t stream, const Params& p) {
  if (symmetric) {
    launch_kernel(mma_int4_kernel<T, NT, MB, U, PF, LD, SA, 1>, p.pdl != 0, grid, block, stream, p);
  } else {
    launch_kernel(mma_int4_kernel<T, NT, MB, U, PF, LD, SA, 0>, p.pdl != 0, grid, block, stream, p);
  }
}

// The instantiated variants (id, m-tiles per warp NT, chunks per batch U, prefetch PF, code load
// mode LD); mma.py lists the same table (VARIANTS).
#define NQ_MMA_VARIANTS(X) \
  X(0, 1, 2, 0, 2)         \
  X(1, 1, 4, 0, 2)         \
  X(2, 1, 2, 1, 2)         \
  X(3, 2, 1, 1, 2)         \
  X(4, 2, 2, 0, 2)         \
  X(5, 2, 1, 0, 2)         \
  X(6, 1, 2, 0, 1)

// Columns per block of a variant (0: no such variant).
inline int variant_tile_n(int variant) {
#define NQ_MMA_TILE_N(id, NT, U, PF, LD) \
  if (variant == id) return 16 * NT;
  NQ_MMA_VARIANTS(NQ_MMA_TILE_N)
#undef NQ_MMA_TILE_N
  return 0;
}

// SA: every chunk lies in one group (group length a multiple of 64), so the scale multiplies the
// fp32 accumulator once per chunk instead of every weight.
template <typename T, int MB>
void launch_variant(int variant, bool one_group_per_chunk, bool symmetric, dim3 grid, dim3 block,
                    cudaStream_t stream, const Params& p) {
#define NQ_MMA_CASE(id, NT, U, PF, LD)                                                \
  case id:                                                                            \
    if (one_group_per_chunk) {                                                        \
      launch_sym<T, NT, MB, U, PF, LD, 1>(symmetric, grid, block, stream, p);         \
    } else {                                                                          \
      launch_sym<T, NT, MB, U, PF, LD, 0>(symmetric, grid, block, stream, p);         \
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
  const bool one_group_per_chunk = p.group_shift >= 6;
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
