// SwiGLU gate: out[r, i] = silu(x[r, i]) * x[r, d + i] (see ops.h for the contract).
//
// Grid (rows, column tiles); each thread reads one 16-byte pack of the gate and one of the up
// half and writes one pack: every byte moves once, no reduction, no shared memory. The generic
// kernel handles any d, stride or alignment one element a thread.
#include "cuda_utils.h"

namespace fuselm {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.f + expf(-g)) * u; }

template <typename T>
__global__ void silu_and_mul_vec_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t d,
                                        int64_t out_stride, int64_t x_stride) {
  constexpr int V = kVec<T>;
  using P = Pack<T, V>;
  const int64_t row = blockIdx.x;
  const int64_t idx = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (idx >= d / V) return;
  const P* gate = reinterpret_cast<const P*>(x + row * x_stride);
  const P* up = reinterpret_cast<const P*>(x + row * x_stride + d);
  const P g = gate[idx];
  const P u = up[idx];
  P o;
#pragma unroll
  for (int j = 0; j < V; ++j) o.v[j] = from_float<T>(silu_mul(to_float(g.v[j]), to_float(u.v[j])));
  reinterpret_cast<P*>(out + row * out_stride)[idx] = o;
}

template <typename T>
__global__ void silu_and_mul_generic_kernel(T* __restrict__ out, const T* __restrict__ x,
                                            int64_t d, int64_t out_stride, int64_t x_stride) {
  const int64_t row = blockIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (i >= d) return;
  const T* x_row = x + row * x_stride;
  out[row * out_stride + i] = from_float<T>(silu_mul(to_float(x_row[i]), to_float(x_row[d + i])));
}

template <typename T>
cudaError_t launch(T* out, const T* x, int64_t num_rows, int64_t d, int64_t out_stride,
                   int64_t x_stride, cudaStream_t stream) {
  if (num_rows == 0 || d == 0) return cudaSuccess;
  constexpr int V = kVec<T>;
  const bool vec = d % V == 0 && x_stride % V == 0 && out_stride % V == 0 && is_aligned16(x) &&
                   is_aligned16(out);
  const int64_t items = vec ? d / V : d;
  const int threads = items >= kThreads ? kThreads : round_up32(items);
  const dim3 grid(static_cast<unsigned>(num_rows), static_cast<unsigned>((items + threads - 1) / threads));
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;
  if (vec) {
    silu_and_mul_vec_kernel<T><<<grid, threads, 0, stream>>>(out, x, d, out_stride, x_stride);
  } else {
    silu_and_mul_generic_kernel<T><<<grid, threads, 0, stream>>>(out, x, d, out_stride, x_stride);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_silu_and_mul(void* out, const void* x, int64_t num_rows, int64_t d,
                                int64_t out_stride, int64_t x_stride, DType dtype,
                                cudaStream_t stream) {
  FUSELM_DISPATCH_FLOAT(dtype, T,
                        return launch<T>(static_cast<T*>(out), static_cast<const T*>(x), num_rows,
                                         d, out_stride, x_stride, stream));
  return cudaErrorInvalidValue;
}

}  // namespace fuselm
