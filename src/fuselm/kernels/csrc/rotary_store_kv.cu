// Neox rotary embedding of q and k fused with the paged KV-cache write (see ops.h).
//
// One block per token. A work item is one pack of V dims of the first rotary half of one head
// together with the matching pack of the second half: both are loaded (16 bytes each on the fast
// path), rotated in fp32 with cos/sin of the token's position, stored back in place and, for k,
// into the cache slot. v (and the pass-through dims of k beyond rot_dim) are copied pack by pack.
// Every byte of q, k, v and of the cache slots moves once.
#include "cuda_utils.h"

namespace fuselm {
namespace {

template <typename T, int V>
__device__ __forceinline__ void rotate_pack(T* head, T* cache_head, int c, int half,
                                            const float* __restrict__ cos,
                                            const float* __restrict__ sin) {
  using P = Pack<T, V>;
  P* p1 = reinterpret_cast<P*>(head + c);
  P* p2 = reinterpret_cast<P*>(head + half + c);
  P a = *p1;
  P b = *p2;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float cs = cos[c + j];
    const float sn = sin[c + j];
    const float x1 = to_float(a.v[j]);
    const float x2 = to_float(b.v[j]);
    a.v[j] = from_float<T>(x1 * cs - x2 * sn);
    b.v[j] = from_float<T>(x2 * cs + x1 * sn);
  }
  *p1 = a;
  *p2 = b;
  if (cache_head != nullptr) {
    *reinterpret_cast<P*>(cache_head + c) = a;
    *reinterpret_cast<P*>(cache_head + half + c) = b;
  }
}

template <typename T, int V>
__global__ void rotary_store_kv_kernel(const RotaryStoreKVParams p) {
  using P = Pack<T, V>;
  const int64_t t = blockIdx.x;
  const int64_t pos = p.positions[t];
  const int64_t slot = p.slot_mapping[t];
  const int half = p.rot_dim / 2;
  const int packs = half / V;  // packs per rotary half of one head
  const float* cos = p.cos_sin_cache + pos * p.cos_sin_stride;
  const float* sin = cos + half;

  T* q = static_cast<T*>(p.q) + t * p.q_token_stride;
  for (int i = threadIdx.x; i < p.num_heads * packs; i += blockDim.x) {
    const int h = i / packs;
    rotate_pack<T, V>(q + h * p.q_head_stride, nullptr, (i - h * packs) * V, half, cos, sin);
  }

  T* kc = nullptr;
  T* vc = nullptr;
  if (slot >= 0) {
    const int64_t block = slot / p.block_size;
    const int64_t offset = slot - block * p.block_size;
    kc = static_cast<T*>(p.key_cache) + block * p.kc_block_stride + offset * p.kc_slot_stride;
    vc = static_cast<T*>(p.value_cache) + block * p.vc_block_stride + offset * p.vc_slot_stride;
  }
  T* k = static_cast<T*>(p.k) + t * p.k_token_stride;
  for (int i = threadIdx.x; i < p.num_kv_heads * packs; i += blockDim.x) {
    const int h = i / packs;
    rotate_pack<T, V>(k + h * p.k_head_stride, kc ? kc + h * p.kc_head_stride : nullptr,
                      (i - h * packs) * V, half, cos, sin);
  }
  if (slot < 0) return;

  // dims beyond rot_dim pass through: copy them of k to the cache
  const int tail_packs = (p.head_size - p.rot_dim) / V;
  for (int i = threadIdx.x; i < p.num_kv_heads * tail_packs; i += blockDim.x) {
    const int h = i / tail_packs;
    const int c = p.rot_dim + (i - h * tail_packs) * V;
    *reinterpret_cast<P*>(kc + h * p.kc_head_stride + c) =
        *reinterpret_cast<const P*>(k + h * p.k_head_stride + c);
  }
  const T* v = static_cast<const T*>(p.v) + t * p.v_token_stride;
  const int head_packs = p.head_size / V;
  for (int i = threadIdx.x; i < p.num_kv_heads * head_packs; i += blockDim.x) {
    const int h = i / head_packs;
    const int c = (i - h * head_packs) * V;
    *reinterpret_cast<P*>(vc + h * p.vc_head_stride + c) =
        *reinterpret_cast<const P*>(v + h * p.v_head_stride + c);
  }
}

template <typename T>
bool can_vectorize(const RotaryStoreKVParams& p) {
  constexpr int V = kVec<T>;
  const int64_t strides[] = {p.q_token_stride,  p.q_head_stride,   p.k_token_stride,
                             p.k_head_stride,   p.v_token_stride,  p.v_head_stride,
                             p.kc_block_stride, p.kc_slot_stride,  p.kc_head_stride,
                             p.vc_block_stride, p.vc_slot_stride,  p.vc_head_stride};
  for (const int64_t s : strides)
    if (s % V != 0) return false;
  return (p.rot_dim / 2) % V == 0 && p.head_size % V == 0 && is_aligned16(p.q) &&
         is_aligned16(p.k) && is_aligned16(p.v) && is_aligned16(p.key_cache) &&
         is_aligned16(p.value_cache);
}

template <typename T>
cudaError_t launch(const RotaryStoreKVParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.rot_dim % 2 != 0 || p.rot_dim > p.head_size || p.block_size <= 0)
    return cudaErrorInvalidValue;
  const int half = p.rot_dim / 2;
  const int heads = p.num_heads > 2 * p.num_kv_heads ? p.num_heads : 2 * p.num_kv_heads;
  const unsigned grid = static_cast<unsigned>(p.num_tokens);
  if (can_vectorize<T>(p)) {
    constexpr int V = kVec<T>;
    const int threads = min(256, round_up32(static_cast<int64_t>(heads) * half / V));
    rotary_store_kv_kernel<T, V><<<grid, threads, 0, stream>>>(p);
  } else {
    const int threads = min(256, round_up32(static_cast<int64_t>(heads) * half));
    rotary_store_kv_kernel<T, 1><<<grid, threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rotary_store_kv(const RotaryStoreKVParams& params, DType dtype,
                                   cudaStream_t stream) {
  FUSELM_DISPATCH_FLOAT(dtype, T, return launch<T>(params, stream));
  return cudaErrorInvalidValue;
}

}  // namespace fuselm
