// Launchers of fuselm's CUDA kernels: raw pointers, element strides and a stream, no torch
// headers, so that the .cu files compile fast and bindings.cpp alone talks to torch.
//
// Each launcher returns the launch's cudaError_t (cudaSuccess when there is nothing to do) and
// never synchronizes or allocates, so that the ops can be captured in CUDA graphs.
// Conventions: a "row" is the last, contiguous dimension; *_stride are in elements.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fuselm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- rms_norm.cu --------------------------------------------------------------------------
// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * weight, for r < num_rows; fp32 math.
// x, out: [num_rows, hidden]; weight: [hidden] of the same dtype. out may not alias x.
cudaError_t launch_rms_norm(void* out, const void* x, const void* weight, int64_t num_rows,
                            int64_t hidden, int64_t out_stride, int64_t x_stride, float eps,
                            DType dtype, cudaStream_t stream);

// In place: residual[r] += x[r] (rounded to dtype); x[r] = rms_norm(residual[r]).
cudaError_t launch_fused_add_rms_norm(void* x, void* residual, const void* weight,
                                      int64_t num_rows, int64_t hidden, int64_t x_stride,
                                      int64_t residual_stride, float eps, DType dtype,
                                      cudaStream_t stream);

// ---- silu_and_mul.cu ----------------------------------------------------------------------
// out[r, i] = silu(x[r, i]) * x[r, d + i] for i < d; x: [num_rows, 2 d], out: [num_rows, d].
cudaError_t launch_silu_and_mul(void* out, const void* x, int64_t num_rows, int64_t d,
                                int64_t out_stride, int64_t x_stride, DType dtype,
                                cudaStream_t stream);

// ---- rotary_store_kv.cu -------------------------------------------------------------------
// Neox rotary of q and k in place, then k and v written to the paged cache at slot_mapping
// (slot -1: not stored). Caches: [num_blocks, block_size, num_kv_heads, head_size] with the
// strides below; q, k, v: [num_tokens, heads, head_size] with the strides below.
struct RotaryStoreKVParams {
  void* q;
  void* k;
  const void* v;
  const int64_t* positions;     // [num_tokens]
  const float* cos_sin_cache;   // [max_position, rot_dim]: cos | sin
  void* key_cache;
  void* value_cache;
  const int64_t* slot_mapping;  // [num_tokens]
  int64_t num_tokens;
  int num_heads;
  int num_kv_heads;
  int head_size;
  int rot_dim;
  int block_size;
  int64_t cos_sin_stride;
  int64_t q_token_stride, q_head_stride;
  int64_t k_token_stride, k_head_stride;
  int64_t v_token_stride, v_head_stride;
  int64_t kc_block_stride, kc_slot_stride, kc_head_stride;
  int64_t vc_block_stride, vc_slot_stride, vc_head_stride;
};

cudaError_t launch_rotary_store_kv(const RotaryStoreKVParams& params, DType dtype,
                                   cudaStream_t stream);

// ---- quant_gemv.cu ------------------------------------------------------------------------
// Weight-only out[b, n] = sum_k x[b, k] W[n, k] for b < m <= 16 (8 for stages 1), fp32
// accumulation, out in x's dtype (fp16 / bf16). int4 (W4A16): qweight uint8 [n, k / 2] (byte j:
// column 2 j in its low nibble, 2 j + 1 in its high one), scales [n, k / G] of scale_dtype,
// zeros uint8 [n, k / G], W = (q - z) s; needs k % 128 == 0 and G % 128 == 0. int8 (W8A16):
// qweight int8 [n, k], scales [n], W = q s; needs k % 64 == 0. Both: qweight rows and x rows
// 16-byte aligned. A block takes 16 rows; num_warps (1..16) warps split K; stages picks the
// weight stream: 1 strided, 2 or 4 the ring of that depth (see quant_gemv.cu). pdl launches it
// with programmatic stream serialization (weights are read before waiting for the previous
// kernel).
struct QuantGemvParams {
  void* out;
  const void* x;
  const void* qweight;
  const void* scales;
  const uint8_t* zeros;  // int4 only
  int64_t m, n, k;
  int64_t out_stride, x_stride;  // elements
  int64_t qw_stride;             // bytes
  int64_t s_stride, z_stride;    // elements (int4)
  int64_t group_size;            // int4
  DType dtype;                   // x and out
  DType scale_dtype;
  int num_warps;
  int stages;
  bool pdl;
};

cudaError_t launch_int4_gemv(const QuantGemvParams& params, cudaStream_t stream);
cudaError_t launch_int8_gemv(const QuantGemvParams& params, cudaStream_t stream);
// fp8 (W8A16 with e4m3 weights): qweight e4m3 bytes [n, k], scales [n]; as int8 otherwise.
cudaError_t launch_fp8_gemv(const QuantGemvParams& params, cudaStream_t stream);

// ---- gguf_gemv.cu ---------------------------------------------------------------------------
// out [m, n] = x @ W.T for GGUF rows (qweight uint8 [n, row bytes], row stride qw_stride bytes,
// rows 16-byte aligned): ggml_type kGgmlQ4K, the file's blocks, or kGgmlQ8_0Split, Q8_0 rows in
// fuselm's split layout (gguf_matmul.q8_0_split; K % 64 == 0); m <= 16 (above 8: num_warps
// <= 8); scales and zeros unused; fp32 accumulation.
constexpr int kGgmlQ4K = 12;  // gguf.GGMLQuantizationType.Q4_K
constexpr int kGgmlQ8_0Split = 1008;  // gguf_matmul.Q8_0_SPLIT
cudaError_t launch_gguf_gemv(const QuantGemvParams& params, int ggml_type, cudaStream_t stream);

}  // namespace fuselm
