// RMSNorm and fused residual-add + RMSNorm (see ops.h for the contract).
//
// Fast path (hidden % 8 == 0 for 16-bit types, 16-byte aligned rows): every thread loads its
// part of the row as 16-byte packs, keeps them in registers, reduces the sum of squares
// (warp shuffles, then one shared-memory round when a block owns the row) and writes the
// normalised row: one read and one write of each element. Rows of up to 1024 16-bit elements
// take one warp each (4 rows a block), wider rows one block each. Anything else takes the
// generic path, which re-reads the row (from L1/L2) for the second pass.
#include "cuda_utils.h"

namespace fuselm {
namespace {

template <typename T, int NV, bool ADD, bool WARP_PER_ROW>
__global__ void rms_norm_vec_kernel(T* out, T* residual, const T* x, const T* __restrict__ weight,
                                    int64_t num_rows, int hidden, int64_t out_stride,
                                    int64_t residual_stride, int64_t x_stride, float eps) {
  constexpr int V = kVec<T>;
  using P = Pack<T, V>;
  int64_t row;
  int num_threads;
  if constexpr (WARP_PER_ROW) {
    row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
    num_threads = 32;
    if (row >= num_rows) return;  // whole warp: no block-wide barrier on this path
  } else {
    row = blockIdx.x;
    num_threads = blockDim.x;
  }
  const int tid = threadIdx.x;
  const int num_vecs = hidden / V;
  const P* x_row = reinterpret_cast<const P*>(x + row * x_stride);
  P* r_row = ADD ? reinterpret_cast<P*>(residual + row * residual_stride) : nullptr;

  P vals[NV];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int idx = tid + i * num_threads;
    if (idx < num_vecs) {
      P a = x_row[idx];
      if constexpr (ADD) {
        const P b = r_row[idx];
#pragma unroll
        for (int j = 0; j < V; ++j) a.v[j] = from_float<T>(to_float(a.v[j]) + to_float(b.v[j]));
        r_row[idx] = a;  // the sum rounded to T, as an unfused add would store it
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float f = to_float(a.v[j]);
        sum_sq += f * f;
      }
      vals[i] = a;
    }
  }
  if constexpr (WARP_PER_ROW) {
    sum_sq = warp_sum(sum_sq);
  } else {
    __shared__ float smem[32];
    sum_sq = block_sum(sum_sq, smem);
  }
  const float rstd = rsqrtf(sum_sq / hidden + eps);

  const P* w = reinterpret_cast<const P*>(weight);
  P* o_row = reinterpret_cast<P*>(out + row * out_stride);
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int idx = tid + i * num_threads;
    if (idx < num_vecs) {
      const P wv = w[idx];
      P o;
#pragma unroll
      for (int j = 0; j < V; ++j)
        o.v[j] = from_float<T>(to_float(vals[i].v[j]) * rstd * to_float(wv.v[j]));
      o_row[idx] = o;
    }
  }
}

// Any hidden size, stride and alignment; one block per row, two passes.
template <typename T, bool ADD>
__global__ void rms_norm_generic_kernel(T* out, T* residual, const T* x,
                                        const T* __restrict__ weight, int hidden,
                                        int64_t out_stride, int64_t residual_stride,
                                        int64_t x_stride, float eps) {
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * x_stride;
  T* r_row = ADD ? residual + row * residual_stride : nullptr;
  float sum_sq = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float f = to_float(x_row[i]);
    if constexpr (ADD) {
      const T s = from_float<T>(f + to_float(r_row[i]));
      r_row[i] = s;
      f = to_float(s);
    }
    sum_sq += f * f;
  }
  __shared__ float smem[32];
  sum_sq = block_sum(sum_sq, smem);
  const float rstd = rsqrtf(sum_sq / hidden + eps);
  T* o_row = out + row * out_stride;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float f = to_float(ADD ? r_row[i] : x_row[i]);  // this thread's own store when ADD
    o_row[i] = from_float<T>(f * rstd * to_float(weight[i]));
  }
}

template <typename T, bool ADD, bool WARP>
void launch_vec(int nv, dim3 grid, dim3 block, cudaStream_t stream, T* out, T* residual,
                const T* x, const T* weight, int64_t num_rows, int hidden, int64_t out_stride,
                int64_t residual_stride, int64_t x_stride, float eps) {
#define FUSELM_NORM_CASE(N)                                                                \
  case N:                                                                                  \
    rms_norm_vec_kernel<T, N, ADD, WARP><<<grid, block, 0, stream>>>(                      \
        out, residual, x, weight, num_rows, hidden, out_stride, residual_stride, x_stride, \
        eps);                                                                              \
    break;
  switch (nv) {
    FUSELM_NORM_CASE(1)
    FUSELM_NORM_CASE(2)
    FUSELM_NORM_CASE(3)
    FUSELM_NORM_CASE(4)
    FUSELM_NORM_CASE(8)
    default:
      break;
  }
#undef FUSELM_NORM_CASE
}

template <typename T, bool ADD>
cudaError_t launch_norm(T* out, T* residual, const T* x, const T* weight, int64_t num_rows,
                        int64_t hidden, int64_t out_stride, int64_t residual_stride,
                        int64_t x_stride, float eps, cudaStream_t stream) {
  if (num_rows == 0 || hidden == 0) return cudaSuccess;
  constexpr int V = kVec<T>;
  const bool vec = hidden % V == 0 && x_stride % V == 0 && out_stride % V == 0 &&
                   is_aligned16(out) && is_aligned16(x) && is_aligned16(weight) &&
                   (!ADD || (residual_stride % V == 0 && is_aligned16(residual)));
  const int64_t num_vecs = hidden / V;
  const int h = static_cast<int>(hidden);
  if (vec && num_vecs <= 32 * 4) {
    // One warp a row, 4 rows a block (576 bf16: 72 packs, 2-3 per lane).
    constexpr int kRows = 4;
    const int nv = static_cast<int>((num_vecs + 31) / 32);
    const dim3 grid(static_cast<unsigned>((num_rows + kRows - 1) / kRows)), block(32, kRows);
    launch_vec<T, ADD, true>(nv, grid, block, stream, out, residual, x, weight, num_rows, h,
                             out_stride, residual_stride, x_stride, eps);
  } else if (vec && num_vecs <= 1024 * 8) {
    // One block a row, 2 packs a thread up to 2048 packs (16384 bf16: 1024 threads).
    const int nv = num_vecs <= 2048 ? 2 : (num_vecs <= 4096 ? 4 : 8);
    const int threads = round_up32((num_vecs + nv - 1) / nv);
    launch_vec<T, ADD, false>(nv, dim3(static_cast<unsigned>(num_rows)), dim3(threads), stream,
                              out, residual, x, weight, num_rows, h, out_stride,
                              residual_stride, x_stride, eps);
  } else {
    const int threads = hidden >= 1024 ? 1024 : round_up32(hidden);
    rms_norm_generic_kernel<T, ADD><<<static_cast<unsigned>(num_rows), threads, 0, stream>>>(
        out, residual, x, weight, h, out_stride, residual_stride, x_stride, eps);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rms_norm(void* out, const void* x, const void* weight, int64_t num_rows,
                            int64_t hidden, int64_t out_stride, int64_t x_stride, float eps,
                            DType dtype, cudaStream_t stream) {
  FUSELM_DISPATCH_FLOAT(dtype, T,
                        return launch_norm<T, false>(
                            static_cast<T*>(out), nullptr, static_cast<const T*>(x),
                            static_cast<const T*>(weight), num_rows, hidden, out_stride, 0,
                            x_stride, eps, stream));
  return cudaErrorInvalidValue;
}

cudaError_t launch_fused_add_rms_norm(void* x, void* residual, const void* weight,
                                      int64_t num_rows, int64_t hidden, int64_t x_stride,
                                      int64_t residual_stride, float eps, DType dtype,
                                      cudaStream_t stream) {
  FUSELM_DISPATCH_FLOAT(dtype, T,
                        return launch_norm<T, true>(
                            static_cast<T*>(x), static_cast<T*>(residual),
                            static_cast<const T*>(x), static_cast<const T*>(weight), num_rows,
                            hidden, x_stride, residual_stride, x_stride, eps, stream));
  return cudaErrorInvalidValue;
}

}  // namespace fuselm
