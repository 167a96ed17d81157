// Split-KV paged decode attention (see ops.h and kernels/paged_attention.py for the contract).
//
// Kernel 1: one block of 4 warps per (sequence, KV head [, head chunk], partition). Each token's
// K row is read by LANES lanes as 16-byte packs (D=128 bf16: 16 lanes, two tokens a warp), dotted
// with the q rows of all the query heads of the group held in registers, reduced with shuffles;
// the partition's logits (log2 domain) go to shared memory, get a softmax per head, and a second
// pass over V accumulates p * V in registers, summed across token slots with shared-memory
// atomics. A sequence that fits one partition writes its output; otherwise the partition writes a
// normalised partial output with its max logit and exp-sum to the workspace.
// Kernel 2: one block per (sequence, query head) merges the partitions of multi-partition
// sequences. The partition count launched depends on shapes only (CUDA-graph safe); programs of
// empty partitions exit at once.
#include <algorithm>
#include <cfloat>

#include "cuda_utils.h"

namespace fuselm {
namespace {

constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * 32;
constexpr int kUnroll = 4;  // tokens a lane has in flight: K/V loads issued before their use

template <typename T, int HEAD_SIZE>
struct Layout {
  static constexpr int V = kVec<T>;                     // elements per 16-byte pack
  static constexpr int NVEC = HEAD_SIZE / V;            // packs per row
  static constexpr int LANES = NVEC < 32 ? NVEC : 32;   // lanes per token
  static constexpr int VPL = NVEC / LANES;              // packs per lane
  static constexpr int TPW = 32 / LANES;                // tokens per warp step
  static constexpr int TPS = TPW * kNumWarps;           // tokens per block step
  static_assert(NVEC * V == HEAD_SIZE && VPL * LANES == NVEC && TPW * LANES == 32,
                "head size must be a power-of-2 number of 16-byte packs");
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <typename T>
__device__ __forceinline__ const T* kv_row(const T* cache, const int* bt_row, int tok,
                                           int block_size, int64_t block_stride,
                                           int64_t slot_stride, int64_t head_offset) {
  const int64_t blk = bt_row[tok / block_size];
  return cache + blk * block_stride + static_cast<int64_t>(tok % block_size) * slot_stride +
         head_offset;
}

template <typename T, int HEAD_SIZE, int GMAX>
__global__ void __launch_bounds__(kThreads)
    paged_attention_partition_kernel(const PagedAttentionParams p, int head_chunks,
                                     float qk_scale) {
  using L = Layout<T, HEAD_SIZE>;
  using P = Pack<T, L::V>;
  const int seq = blockIdx.x;
  const int kv_head = blockIdx.y / head_chunks;
  const int chunk = blockIdx.y % head_chunks;
  const int part = blockIdx.z;
  const int group = p.num_heads / p.num_kv_heads;
  const int head0 = kv_head * group + chunk * GMAX;
  const int nh = min(GMAX, group - chunk * GMAX);  // query heads of this block
  const int seq_len = p.seq_lens[seq];
  const int start = part * p.partition_size;
  if (part > 0 && start >= seq_len) return;  // empty partition (0 also zeroes seq_len 0)
  const int n = max(0, min(p.partition_size, seq_len - start));
  // Clamped to the launch: a sequence longer than the workspace allows (a broken precondition)
  // gets attention over its first gridDim.z partitions, never an unwritten output.
  const int num_parts = min((seq_len + p.partition_size - 1) / p.partition_size,
                            static_cast<int>(gridDim.z));

  extern __shared__ float smem[];
  float* logits = smem;                             // [GMAX][partition_size]
  float* out_s = logits + GMAX * p.partition_size;  // [GMAX][HEAD_SIZE]
  float* stats = out_s + GMAX * HEAD_SIZE;          // max [GMAX], sum [GMAX]

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int sub = lane / L::LANES;  // token slot within the warp
  const int l = lane % L::LANES;    // lane within the token
  const int* bt_row = p.block_tables + static_cast<int64_t>(seq) * p.bt_stride;
  const T* kc = static_cast<const T*>(p.key_cache);
  const T* vc = static_cast<const T*>(p.value_cache);

  // q rows of the group, this lane's packs, in fp32 registers.
  float q_r[GMAX][L::VPL][L::V];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    const P* q_row = reinterpret_cast<const P*>(
        static_cast<const T*>(p.q) + static_cast<int64_t>(seq) * p.q_seq_stride +
        static_cast<int64_t>(head0 + g) * p.q_head_stride);
#pragma unroll
    for (int i = 0; i < L::VPL; ++i) {
      P pk;
      if (g < nh) pk = q_row[l + i * L::LANES];
#pragma unroll
      for (int e = 0; e < L::V; ++e) q_r[g][i][e] = g < nh ? to_float(pk.v[e]) : 0.f;
    }
  }

  // Phase 1: logits. Loop bounds are uniform across the warp (shuffles need every lane).
  const int64_t kc_head = static_cast<int64_t>(kv_head) * p.kc_head_stride;
  for (int base = warp * L::TPW; base < n; base += L::TPS * kUnroll) {
    P kv[kUnroll][L::VPL];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * L::TPS + sub;
      if (t < n) {
        const P* row = reinterpret_cast<const P*>(kv_row(kc, bt_row, start + t, p.block_size,
                                                         p.kc_block_stride, p.kc_slot_stride,
                                                         kc_head));
#pragma unroll
        for (int i = 0; i < L::VPL; ++i) kv[u][i] = row[l + i * L::LANES];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * L::TPS + sub;
      float dots[GMAX];
#pragma unroll
      for (int g = 0; g < GMAX; ++g) dots[g] = 0.f;
      if (t < n) {
#pragma unroll
        for (int i = 0; i < L::VPL; ++i)
#pragma unroll
          for (int e = 0; e < L::V; ++e) {
            const float kf = to_float(kv[u][i].v[e]);
#pragma unroll
            for (int g = 0; g < GMAX; ++g) dots[g] += kf * q_r[g][i][e];
          }
      }
#pragma unroll
      for (int g = 0; g < GMAX; ++g)
#pragma unroll
        for (int offset = L::LANES / 2; offset > 0; offset >>= 1)
          dots[g] += __shfl_xor_sync(0xffffffffu, dots[g], offset);
      if (t < n && l == 0) {
#pragma unroll
        for (int g = 0; g < GMAX; ++g)
          if (g < nh) logits[g * p.partition_size + t] = dots[g] * qk_scale;
      }
    }
  }
  __syncthreads();

  // Softmax per head over the partition: a warp per head.
  for (int g = warp; g < nh; g += kNumWarps) {
    float* row = logits + g * p.partition_size;
    float m = -FLT_MAX;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, row[i]);
    m = warp_max(m);
    float s = 0.f;
    for (int i = lane; i < n; i += 32) {
      const float e = exp2f(row[i] - m);
      row[i] = e;
      s += e;
    }
    s = warp_sum(s);
    if (lane == 0) {
      stats[g] = m;
      stats[GMAX + g] = s;
    }
  }
  for (int i = threadIdx.x; i < GMAX * HEAD_SIZE; i += kThreads) out_s[i] = 0.f;
  __syncthreads();

  // Phase 2: p @ V, each lane accumulating its packs for every head of the group.
  float acc[GMAX][L::VPL][L::V];
#pragma unroll
  for (int g = 0; g < GMAX; ++g)
#pragma unroll
    for (int i = 0; i < L::VPL; ++i)
#pragma unroll
      for (int e = 0; e < L::V; ++e) acc[g][i][e] = 0.f;
  const int64_t vc_head = static_cast<int64_t>(kv_head) * p.vc_head_stride;
  for (int base = warp * L::TPW; base < n; base += L::TPS * kUnroll) {
    P vv[kUnroll][L::VPL];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * L::TPS + sub;
      if (t < n) {
        const P* row = reinterpret_cast<const P*>(kv_row(vc, bt_row, start + t, p.block_size,
                                                         p.vc_block_stride, p.vc_slot_stride,
                                                         vc_head));
#pragma unroll
        for (int i = 0; i < L::VPL; ++i) vv[u][i] = row[l + i * L::LANES];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * L::TPS + sub;
      if (t < n) {
        float pg[GMAX];
#pragma unroll
        for (int g = 0; g < GMAX; ++g) pg[g] = g < nh ? logits[g * p.partition_size + t] : 0.f;
#pragma unroll
        for (int i = 0; i < L::VPL; ++i)
#pragma unroll
          for (int e = 0; e < L::V; ++e) {
            const float vf = to_float(vv[u][i].v[e]);
#pragma unroll
            for (int g = 0; g < GMAX; ++g) acc[g][i][e] += pg[g] * vf;
          }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g < nh) {
#pragma unroll
      for (int i = 0; i < L::VPL; ++i)
#pragma unroll
        for (int e = 0; e < L::V; ++e)
          atomicAdd(&out_s[g * HEAD_SIZE + (l + i * L::LANES) * L::V + e], acc[g][i][e]);
    }
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < nh * HEAD_SIZE; idx += kThreads) {
    const int g = idx / HEAD_SIZE;
    const int d = idx % HEAD_SIZE;
    const float s = stats[GMAX + g];
    const float val = out_s[idx] / (s > 0.f ? s : 1.f);  // seq_len 0: zeros
    const int head = head0 + g;
    if (num_parts <= 1) {
      T* o = static_cast<T*>(p.out) + static_cast<int64_t>(seq) * p.out_seq_stride +
             static_cast<int64_t>(head) * p.out_head_stride;
      o[d] = from_float<T>(val);
    } else {
      const int64_t ws = (static_cast<int64_t>(seq) * p.num_heads + head) * p.max_partitions + part;
      p.tmp_out[ws * HEAD_SIZE + d] = val;
      if (d == 0) {
        p.max_logits[ws] = stats[g];
        p.exp_sums[ws] = s;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    paged_attention_reduce_kernel(const PagedAttentionParams p, int num_launched) {
  const int seq = blockIdx.x;
  const int head = blockIdx.y;
  const int seq_len = p.seq_lens[seq];
  const int num_parts = min((seq_len + p.partition_size - 1) / p.partition_size, num_launched);
  if (num_parts <= 1) return;  // written directly by the partition kernel
  const int64_t base = (static_cast<int64_t>(seq) * p.num_heads + head) * p.max_partitions;
  extern __shared__ float weights[];  // [num_launched]
  float m = -FLT_MAX;
  for (int i = 0; i < num_parts; ++i) m = fmaxf(m, p.max_logits[base + i]);
  float total = 0.f;
  for (int i = 0; i < num_parts; ++i) total += p.exp_sums[base + i] * exp2f(p.max_logits[base + i] - m);
  for (int i = threadIdx.x; i < num_parts; i += kThreads)
    weights[i] = p.exp_sums[base + i] * exp2f(p.max_logits[base + i] - m);
  __syncthreads();
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* o = static_cast<T*>(p.out) + static_cast<int64_t>(seq) * p.out_seq_stride +
         static_cast<int64_t>(head) * p.out_head_stride;
  for (int d = threadIdx.x; d < p.head_size; d += kThreads) {
    float acc = 0.f;
    for (int i = 0; i < num_parts; ++i) acc += weights[i] * p.tmp_out[(base + i) * p.head_size + d];
    o[d] = from_float<T>(acc * inv);
  }
}

constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int HEAD_SIZE, int GMAX>
cudaError_t launch_partitions(const PagedAttentionParams& p, int num_launched,
                              cudaStream_t stream) {
  const int group = p.num_heads / p.num_kv_heads;
  const int chunks = (group + GMAX - 1) / GMAX;
  const size_t smem = sizeof(float) * (static_cast<size_t>(GMAX) * (p.partition_size + HEAD_SIZE) + 2 * GMAX);
  auto kernel = paged_attention_partition_kernel<T, HEAD_SIZE, GMAX>;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(p.num_seqs, p.num_kv_heads * chunks, num_launched);
  kernel<<<grid, kThreads, smem, stream>>>(p, chunks, p.scale * kLog2e);
  return cudaGetLastError();
}

template <typename T, int HEAD_SIZE>
cudaError_t launch_head_size(const PagedAttentionParams& p, int num_launched,
                             cudaStream_t stream) {
  const int group = p.num_heads / p.num_kv_heads;
  if (group == 1) return launch_partitions<T, HEAD_SIZE, 1>(p, num_launched, stream);
  if (group <= 4) return launch_partitions<T, HEAD_SIZE, 4>(p, num_launched, stream);
  return launch_partitions<T, HEAD_SIZE, 8>(p, num_launched, stream);  // > 8: head chunks
}

template <typename T>
cudaError_t launch_typed(const PagedAttentionParams& p, cudaStream_t stream) {
  if (p.num_seqs == 0) return cudaSuccess;
  const int64_t max_context = static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;
  const int64_t wanted = (max_context + p.partition_size - 1) / p.partition_size;
  const int num_launched = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(p.max_partitions, wanted)));
  cudaError_t err;
  switch (p.head_size) {
    case 64:
      err = launch_head_size<T, 64>(p, num_launched, stream);
      break;
    case 128:
      err = launch_head_size<T, 128>(p, num_launched, stream);
      break;
    case 256:
      err = launch_head_size<T, 256>(p, num_launched, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess || num_launched == 1) return err;
  paged_attention_reduce_kernel<T><<<dim3(p.num_seqs, p.num_heads), kThreads,
                                     sizeof(float) * num_launched, stream>>>(p, num_launched);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_paged_attention(const PagedAttentionParams& params, DType dtype,
                                   cudaStream_t stream) {
  const int v = dtype == DType::kFloat32 ? 4 : 8;
  const bool ok = params.partition_size > 0 && params.num_kv_heads > 0 &&
                  params.num_heads % params.num_kv_heads == 0 && params.head_size % v == 0 &&
                  is_aligned16(params.q) && is_aligned16(params.key_cache) &&
                  is_aligned16(params.value_cache) && params.q_seq_stride % v == 0 &&
                  params.q_head_stride % v == 0 && params.kc_block_stride % v == 0 &&
                  params.kc_slot_stride % v == 0 && params.kc_head_stride % v == 0 &&
                  params.vc_block_stride % v == 0 && params.vc_slot_stride % v == 0 &&
                  params.vc_head_stride % v == 0;
  if (!ok) return cudaErrorInvalidValue;
  FUSELM_DISPATCH_FLOAT(dtype, T, return launch_typed<T>(params, stream));
  return cudaErrorInvalidValue;
}

}  // namespace fuselm
