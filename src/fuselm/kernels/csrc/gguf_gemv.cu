// GGUF GEMV at batch 1..16: Q4_K rows as the file's blocks, Q8_0 rows as their bytes in the
// split layout (see ops.h).
//
// The tensor-core scheme of quant_gemv.cu: one mma.sync m16n8k16 multiplies 16 weight rows by
// the batch (the MMA's N), lane (g, t) = (lane / 4, lane % 4) holds rows g and g + 8, and since
// a dot product takes k in any order, each lane feeds the MMA the columns its loads give it and
// loads x at the same columns. Here every MMA's 16 k come from one 32-value (sub-)block, so the
// MMA's sum over exact integer weights is scaled once by that block's scale, in fp32.
//
// Q4_K (256 values in 144 bytes: fp16 d and dmin, 12 bytes of 6-bit scales and mins, 128 bytes
// of nibbles; w = d sc_s q - dmin m_s in sub-block s of 32): a step is half a block, 128 values,
// four sub-blocks. Lane t reads bytes 8 t .. 8 t + 7 of each of the step's two 32-byte chunks
// (an LDG.64 each); a chunk's low nibbles are sub-block 2 c and its high nibbles sub-block
// 2 c + 1, so the low nibbles of a word are an A fragment of one sub-block and the high nibbles
// of the next. The block's 16-byte head (d, dmin, scales) is one LDG.128. The min term needs
// the sum of x over each sub-block: an MMA whose A is all ones gives it in the layout of the
// lane's outputs. Per step and row: d sum_s sc_s (q . x)_s - dmin sum_s m_s (sum x)_s.
//
// Q8_0 (32 values in 34 bytes: fp16 d, int8 q[32]; w = d q) in fuselm's split layout
// (gguf_matmul.q8_0_split: the same bytes a row, the K values first, then the K / 32 scales):
// a step is two blocks; lane t's 16 bytes (one LDG.128) are values 8 t .. 8 t + 7 of each, so
// two of its words are each block's A fragments; each block's two MMAs are scaled by its d.
// (The file's 34-byte blocks are 2-byte aligned: read as is, with 4-byte loads, this scheme
// reached 42 % of the H200's copy bandwidth at batch 1; split, 70 %.)
//
// Block: 16 rows; num_warps warps split K, warp w taking steps w, w + num_warps, ... two at a
// time in flight; batch rows 9..16 are a second MMA tile on the same A fragments; the partial
// sums meet in shared memory (store_block_nb). With PDL the first steps' weights are requested
// before waiting for the previous kernel.
#include "quant_mma.cuh"

namespace fuselm {
namespace {

constexpr int kQ4KBlockBytes = 144;

// 8 weight bytes, streamed as load_weights; zeros where !pred.
__device__ __forceinline__ uint2 load_weights8(const uint8_t* ptr, bool pred) {
  uint2 v;
  asm volatile(
      "{\n"
      "  .reg .pred p;\n"
      "  setp.ne.b32 p, %3, 0;\n"
      "  mov.b32 %0, 0;\n"
      "  mov.b32 %1, 0;\n"
      "  @p ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0, %1}, [%2];\n"
      "}\n"
      : "=r"(v.x), "=r"(v.y)
      : "l"(ptr), "r"(static_cast<int>(pred)));
  return v;
}

// 4 weight bytes (a step's scales); zeros where !pred.
__device__ __forceinline__ uint32_t load_weights4(const uint8_t* ptr, bool pred) {
  uint32_t v;
  asm volatile(
      "{\n"
      "  .reg .pred p;\n"
      "  setp.ne.b32 p, %2, 0;\n"
      "  mov.b32 %0, 0;\n"
      "  @p ld.global.nc.u32 %0, [%1];\n"
      "}\n"
      : "=r"(v)
      : "l"(ptr), "r"(static_cast<int>(pred)));
  return v;
}

// The fp16 in half `hi` of word v, as float.
__device__ __forceinline__ float half_float(uint32_t v, int hi) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(hi ? v >> 16 : v & 0xFFFFu)));
}

// Byte i of word v (an unsigned integer < 256) as float: under the mantissa of 2^23.
__device__ __forceinline__ float byte_float(uint32_t v, int i) {
  return __uint_as_float(prmt(v, 0x4B000000u, 0x7540u + i)) - 8388608.f;
}

// The nibbles at bits `shift` and `shift + 16` of v as an exact pair of T.
template <typename T>
__device__ __forceinline__ uint32_t nibble_pair(uint32_t v, int shift) {
  return fma2<T>(lop3_and_or(v >> shift, 0x000F000Fu, Num<T>::kOff), Num<T>::kOne,
                 Num<T>::kOff ^ 0x80008000u);
}

// x fragments of 4 consecutive values (u0: x0 x1, u1: x2 x3) in the order of a word's byte
// pairs (0, 2) and (1, 3), as nibble_pair takes them.
__device__ __forceinline__ void x_pairs02(uint32_t u0, uint32_t u1, uint32_t& b0, uint32_t& b1) {
  b0 = prmt(u0, u1, 0x5410);
  b1 = prmt(u0, u1, 0x7632);
}

template <WKind kW>
struct Gguf;

template <>
struct Gguf<WKind::kQ4K> {
  static constexpr int kCols = 128;  // values a step
  static constexpr int kXVecs = 4;   // x loads a lane a step: 8 values of each sub-block

  struct Regs {
    uint4 head;   // d, dmin, scales[12]
    uint2 qs[2];  // bytes 8 t .. 8 t + 7 of the step's two chunks
  };

  __device__ static Regs load(const uint8_t* row, int s, int t, bool ok, int64_t) {
    const uint8_t* block = row + static_cast<int64_t>(s >> 1) * kQ4KBlockBytes;
    const uint8_t* qs = block + 16 + 64 * (s & 1) + 8 * t;
    return {load_weights(block, ok), {load_weights8(qs, ok), load_weights8(qs + 32, ok)}};
  }

  // The 6-bit scales and mins of sub-blocks 4 half .. 4 half + 3, one a byte.
  __device__ static void scales(const uint4& head, int half, uint32_t& sc, uint32_t& mn) {
    if (half == 0) {
      sc = head.y & 0x3F3F3F3Fu;
      mn = head.z & 0x3F3F3F3Fu;
    } else {  // low 4 bits in bytes 12..15, the top 2 in bits 6..7 of bytes 4..11
      sc = (head.w & 0x0F0F0F0Fu) | ((head.y >> 2) & 0x30303030u);
      mn = ((head.w >> 4) & 0x0F0F0F0Fu) | ((head.z >> 2) & 0x30303030u);
    }
  }

  // acc[nb] += the step's dot products with batch tile nb; w[h]: rows g and g + 8; xv[nb][sb]:
  // x of sub-block sb.
  template <typename T, int NB>
  __device__ static void step(float (&acc)[NB][4], const Regs (&w)[2], int s,
                              const uint4 (&xv)[NB][4]) {
    constexpr uint32_t kOne = Num<T>::kOne;
    uint32_t sc[2], mn[2];
    scales(w[0].head, s & 1, sc[0], mn[0]);
    scales(w[1].head, s & 1, sc[1], mn[1]);
    float ssum[NB][4] = {};  // sum_s sc_s (q . x)_s
    float msum[NB][4] = {};  // sum_s m_s (sum x)_s
#pragma unroll
    for (int sb = 0; sb < 4; ++sb) {
      const int q = sb >> 1;  // chunk
      const int shift = 4 * (sb & 1);  // its low or high nibbles
      float d[NB][4] = {};
      float e[NB][4] = {};
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const uint32_t vg = j ? w[0].qs[q].y : w[0].qs[q].x;
        const uint32_t vh = j ? w[1].qs[q].y : w[1].qs[q].x;
        const uint32_t a0 = nibble_pair<T>(vg, shift), a1 = nibble_pair<T>(vh, shift);
        const uint32_t a2 = nibble_pair<T>(vg, shift + 8), a3 = nibble_pair<T>(vh, shift + 8);
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
          uint32_t b0, b1;
          x_pairs02(j ? xv[nb][sb].z : xv[nb][sb].x, j ? xv[nb][sb].w : xv[nb][sb].y, b0, b1);
          mma<T>(d[nb], a0, a1, a2, a3, b0, b1);
          mma<T>(e[nb], kOne, kOne, kOne, kOne, b0, b1);
        }
      }
      const float sg = byte_float(sc[0], sb), sh = byte_float(sc[1], sb);
      const float mg = byte_float(mn[0], sb), mh = byte_float(mn[1], sb);
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        ssum[nb][0] += sg * d[nb][0];  // row g, batch 8 nb + 2 t and + 1
        ssum[nb][1] += sg * d[nb][1];
        ssum[nb][2] += sh * d[nb][2];  // row g + 8
        ssum[nb][3] += sh * d[nb][3];
        msum[nb][0] += mg * e[nb][0];
        msum[nb][1] += mg * e[nb][1];
        msum[nb][2] += mh * e[nb][0];
        msum[nb][3] += mh * e[nb][1];
      }
    }
    const float dg = half_float(w[0].head.x, 0), ming = half_float(w[0].head.x, 1);
    const float dh = half_float(w[1].head.x, 0), minh = half_float(w[1].head.x, 1);
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      acc[nb][0] += dg * ssum[nb][0] - ming * msum[nb][0];
      acc[nb][1] += dg * ssum[nb][1] - ming * msum[nb][1];
      acc[nb][2] += dh * ssum[nb][2] - minh * msum[nb][2];
      acc[nb][3] += dh * ssum[nb][3] - minh * msum[nb][3];
    }
  }
};

template <>
struct Gguf<WKind::kQ8_0> {
  static constexpr int kCols = 64;  // two blocks a step
  static constexpr int kXVecs = 2;  // 8 values of each block

  struct Regs {
    uint4 q;     // words 2 b + j: values 8 t + 4 j .. + 3 of the step's block b
    uint32_t d;  // the two blocks' fp16 scales
  };

  __device__ static Regs load(const uint8_t* row, int s, int t, bool ok, int64_t k) {
    return {load_weights(row + static_cast<int64_t>(s) * kCols + 16 * t, ok),
            load_weights4(row + k + 4 * static_cast<int64_t>(s), ok)};
  }

  template <typename T, int NB>
  __device__ static void step(float (&acc)[NB][4], const Regs (&w)[2], int,
                              const uint4 (&xv)[NB][2]) {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      float d[NB][4] = {};
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const uint32_t vg = word(w[0].q, 2 * b + j) ^ 0x80808080u;  // b + 128, as byte_pair
        const uint32_t vh = word(w[1].q, 2 * b + j) ^ 0x80808080u;  // takes them
        const uint32_t a0 = byte_pair<T>(vg, 0), a1 = byte_pair<T>(vh, 0);
        const uint32_t a2 = byte_pair<T>(vg, 1), a3 = byte_pair<T>(vh, 1);
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
          mma<T>(d[nb], a0, a1, a2, a3, j ? xv[nb][b].z : xv[nb][b].x,
                 j ? xv[nb][b].w : xv[nb][b].y);
      }
      const float dg = half_float(w[0].d, b), dh = half_float(w[1].d, b);
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        acc[nb][0] += dg * d[nb][0];
        acc[nb][1] += dg * d[nb][1];
        acc[nb][2] += dh * d[nb][2];
        acc[nb][3] += dh * d[nb][3];
      }
    }
  }
};

// NB batch tiles of 8 rows (M <= 8 NB) share each step's A fragments; two tiles take 8 warps
// at most (the registers of Q4_K's would spill at 16).
template <int NB>
constexpr int kMaxThreads = NB == 1 ? 512 : 256;

template <typename T, WKind kW, int NB>
__global__ void __launch_bounds__(kMaxThreads<NB>) gguf_gemv_kernel(const QuantGemvParams p) {
  using G = Gguf<kW>;
  constexpr int kInFlight = 2;  // steps a warp requests at a time
  extern __shared__ float partial[];  // [num_warps][16][8 NB]
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int steps = static_cast<int>(p.k / G::kCols);
  const int64_t rows[2] = {row0 + g, row0 + 8 + g};
  const bool row_ok[2] = {rows[0] < p.n, rows[1] < p.n};
  const uint8_t* qw = static_cast<const uint8_t*>(p.qweight);
  const uint8_t* wrow[2] = {qw + (row_ok[0] ? rows[0] : 0) * p.qw_stride,
                            qw + (row_ok[1] ? rows[1] : 0) * p.qw_stride};
  bool has_x[NB];
  const T* x_lane[NB];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    const int b = 8 * nb + g;
    has_x[nb] = b < p.m;
    x_lane[nb] = static_cast<const T*>(p.x) + (has_x[nb] ? b : 0) * p.x_stride + 8 * t;
  }

  float acc[NB][4] = {};
  bool waited = false;
  for (int s0 = warp; s0 < steps; s0 += num_warps * kInFlight) {
    typename G::Regs w[kInFlight][2];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int s = s0 + u * num_warps;
#pragma unroll
      for (int h = 0; h < 2; ++h) w[u][h] = G::load(wrow[h], s, t, s < steps && row_ok[h], p.k);
    }
    if (!waited) {  // x is the previous kernel's output
      pdl_wait_then_release();
      waited = true;
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int s = s0 + u * num_warps;
      if (s >= steps) break;  // warp-uniform
      uint4 xv[NB][G::kXVecs];
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        const T* xs = x_lane[nb] + static_cast<int64_t>(s) * G::kCols;
#pragma unroll
        for (int i = 0; i < G::kXVecs; ++i)
          xv[nb][i] = has_x[nb] ? *reinterpret_cast<const uint4*>(xs + 32 * i)
                                : make_uint4(0u, 0u, 0u, 0u);
      }
      G::template step<T, NB>(acc, w[u], s, xv);
    }
  }
  if (!waited) pdl_wait_then_release();  // out may be memory the previous kernel still reads
  store_block_nb<T, kW, NB>(p, partial, acc, row0, warp, num_warps, g, t);
}

template <typename T, WKind kW>
cudaError_t launch_typed(const QuantGemvParams& p, cudaLaunchConfig_t& cfg) {
  const int nb = p.m <= kBatch ? 1 : 2;
  if (32 * p.num_warps > (nb == 1 ? kMaxThreads<1> : kMaxThreads<2>)) return cudaErrorInvalidValue;
  cfg.dynamicSmemBytes =
      static_cast<size_t>(p.num_warps) * kTileRows * kBatch * nb * sizeof(float);
  if (nb == 1) return cudaLaunchKernelEx(&cfg, gguf_gemv_kernel<T, kW, 1>, p);
  return cudaLaunchKernelEx(&cfg, gguf_gemv_kernel<T, kW, 2>, p);
}

template <WKind kW>
cudaError_t launch(const QuantGemvParams& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  if (!tile_shape_ok(p, Gguf<kW>::kCols)) return cudaErrorInvalidValue;
  cudaLaunchAttribute attr;
  cudaLaunchConfig_t cfg = tile_launch_config(p, stream, attr);
  return with_x_dtype(p.dtype, [&](auto x) { return launch_typed<decltype(x), kW>(p, cfg); });
}

}  // namespace

cudaError_t launch_gguf_gemv(const QuantGemvParams& params, int ggml_type, cudaStream_t stream) {
  switch (ggml_type) {
    case kGgmlQ8_0Split:
      return launch<WKind::kQ8_0>(params, stream);
    case kGgmlQ4K:
      return launch<WKind::kQ4K>(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace fuselm
