// Device pieces of the tensor-core weight GEMVs (quant_gemv.cu: int4 / int8 / fp8; gguf_gemv.cu:
// the GGUF blocks): the MMA and its bit tricks, the streamed weight load, the PDL handshake, and
// the block's final reduction. Anonymous namespace: each translation unit keeps its own copy.
#pragma once

#include <type_traits>

#include "cuda_utils.h"

namespace fuselm {
namespace {
constexpr int kTileRows = 16;  // weight rows of one MMA tile
constexpr int kBatch = 8;      // the MMA's N: batch rows
constexpr int kStepBytes = 64;  // bytes of a row one warp step reads (4 lanes x 16 bytes)

// The weight formats: int4 (group-wise scales and zeros), the byte formats int8 and fp8 e4m3
// (per-channel scales, applied to the finished dot product), and the GGUF blocks Q4_K and Q8_0
// (their scales applied per block inside the K loop).
enum class WKind { kInt4, kInt8, kFp8, kQ4K, kQ8_0 };

// Whether the kind's per-row scale multiplies the finished dot product.
template <WKind kW>
constexpr bool kHasRowScale = kW == WKind::kInt8 || kW == WKind::kFp8;

template <typename T>
struct Num;
template <>
struct Num<__nv_bfloat16> {
  static constexpr uint32_t kOff = 0x43004300u;  // (128, 128)
  static constexpr uint32_t kOne = 0x3F803F80u;  // (1, 1)
};
template <>
struct Num<__half> {
  static constexpr uint32_t kOff = 0x64006400u;  // (1024, 1024)
  static constexpr uint32_t kOne = 0x3C003C00u;
};

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));  // (a & b) | c
  return d;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

template <typename T>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
}

// d += A B for one 16 x 16 weight tile (a0: row g, a1: row g + 8, a2/a3: their next 8 columns)
// and the batch fragment (b0, b1).
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// 16 weight bytes, streamed (no L1 allocation, 256-byte L2 fetches: the block's other warps
// read the neighbouring bytes); zeros where !pred. Weights are never written by a kernel, so
// they may be read before the PDL wait.
__device__ __forceinline__ uint4 load_weights(const uint8_t* ptr, bool pred) {
  uint4 v;
  asm volatile(
      "{\n"
      "  .reg .pred p;\n"
      "  setp.ne.b32 p, %5, 0;\n"
      "  mov.b32 %0, 0;\n"
      "  mov.b32 %1, 0;\n"
      "  mov.b32 %2, 0;\n"
      "  mov.b32 %3, 0;\n"
      "  @p ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      "}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr), "r"(static_cast<int>(pred)));
  return v;
}

// 16 bytes where pred, else unspecified values (no zero fill, no copy of the register's
// old value): for a lane past a row, step or batch end, whose products reach only outputs
// that are never stored. kStream: weights (as load_weights); else cached (x, read by every
// block).
template <bool kStream>
__device__ __forceinline__ uint4 load16_or_any(const void* ptr, bool pred) {
  uint4 v;
  if constexpr (kStream) {
    asm volatile(
        "{\n"
        "  .reg .pred p;\n"
        "  setp.ne.b32 p, %5, 0;\n"
        "  @p ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
        "}\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(ptr), "r"(static_cast<int>(pred)));
  } else {
    asm volatile(
        "{\n"
        "  .reg .pred p;\n"
        "  setp.ne.b32 p, %5, 0;\n"
        "  @p ld.global.v4.u32 {%0, %1, %2, %3}, [%4];\n"
        "}\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(ptr), "r"(static_cast<int>(pred)));
  }
  return v;
}

__device__ __forceinline__ float load_scale(const void* s, int64_t i, DType dtype) {
  switch (dtype) {
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(s)[i]);
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(s)[i]);
    default:
      return static_cast<const float*>(s)[i];
  }
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ void pdl_wait_then_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Signed bytes 2p and 2p + 1 of word v (already xor 0x80: b + 128) as an exact pair of T.
template <typename T>
__device__ __forceinline__ uint32_t byte_pair(uint32_t v, int p) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    // b + 128 in the mantissa of 2^23, minus 2^23 + 128: exact b, whose top half is its bf16
    const float lo = __uint_as_float(prmt(v, 0x4B000000u, 0x7540u + 2 * p)) - 8388736.f;
    const float hi = __uint_as_float(prmt(v, 0x4B000000u, 0x7541u + 2 * p)) - 8388736.f;
    return prmt(__float_as_uint(lo), __float_as_uint(hi), 0x7632u);
  } else {
    // (1024 + b + 128) fp16 pairs minus 1152
    const uint32_t f = prmt(v, 0x64646464u, p == 0 ? 0x4140u : 0x4342u);
    return fma2<T>(f, Num<T>::kOne, 0xE480E480u);
  }
}

// The warps' partial sums of the block's 16 rows meet in shared memory (lane (g, t): rows g
// and g + 8, batch rows 8 nb + 2 t and + 1); out[b, row] for b < M (int8: times the scale).
template <typename T, WKind kW, int NB>
__device__ __forceinline__ void store_block_nb(const QuantGemvParams& p, float* partial,
                                               const float (&acc)[NB][4], int64_t row0,
                                               int warp, int num_warps, int g, int t) {
  constexpr int kB = 8 * NB;
  float* mine = partial + warp * (kTileRows * kB);
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    const int lo = g * kB + 8 * nb + 2 * t;
    const int hi = lo + 8 * kB;
    mine[lo] = acc[nb][0];
    mine[lo + 1] = acc[nb][1];
    mine[hi] = acc[nb][2];
    mine[hi + 1] = acc[nb][3];
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out);
  for (int i = threadIdx.x; i < kTileRows * kB; i += blockDim.x) {
    const int b = i / kTileRows;  // consecutive threads: consecutive rows of one batch row
    const int rl = i % kTileRows;
    const int64_t row = row0 + rl;
    if (b >= p.m || row >= p.n) continue;
    float sum = 0.f;
    for (int w = 0; w < num_warps; ++w) sum += partial[(w * kTileRows + rl) * kB + b];
    if constexpr (kHasRowScale<kW>) sum *= load_scale(p.scales, row, p.scale_dtype);
    out[b * p.out_stride + row] = from_float<T>(sum);
  }
}

// The launch of a GEMV over 16-row tiles: one block of num_warps warps a tile, on `stream`,
// with programmatic dependent launch when p.pdl (`attr` holds that attribute).
inline cudaLaunchConfig_t tile_launch_config(const QuantGemvParams& p, cudaStream_t stream,
                                             cudaLaunchAttribute& attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>((p.n + kTileRows - 1) / kTileRows));
  cfg.blockDim = dim3(static_cast<unsigned>(32 * p.num_warps));
  cfg.stream = stream;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = p.pdl ? 1 : 0;
  return cfg;
}

// Whether a 16-row-tile GEMV takes p: 1..16 batch rows, K a multiple of the step's `cols`,
// 1..16 warps, weight rows and x rows 16-byte aligned.
inline bool tile_shape_ok(const QuantGemvParams& p, int64_t cols) {
  return p.m <= 2 * kBatch && p.k % cols == 0 && p.num_warps >= 1 && p.num_warps <= 16 &&
         p.qw_stride % 16 == 0 && p.x_stride % 8 == 0 && is_aligned16(p.qweight) &&
         is_aligned16(p.x);
}

// launch(T{}) for x's dtype T (bf16 or fp16); cudaErrorInvalidValue for another dtype.
template <typename Launch>
cudaError_t with_x_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kBFloat16:
      return launch(__nv_bfloat16{});
    case DType::kFloat16:
      return launch(__half{});
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace fuselm
