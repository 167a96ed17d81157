// Weight-only GEMV at batch 1..8: W4A16 (group-wise zeros) and W8A16 (per-channel scales) on
// the canonical layouts, read as is (see ops.h for the contract).
//
// Tensor cores do the math: one mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate) multiplies
// 16 weight rows by 16 columns of the batch (the MMA's N = 8 is the batch; rows past M are 0),
// so M = 1..8 cost the same and every weight byte is read once. A warp step covers 16 rows x
// 64 bytes: lane (g, t) = (lane / 4, lane % 4) loads 16 bytes (one LDG.128) of rows g and g + 8
// at byte 16 t, which are its A fragments: a dot product does not care about the order of k,
// so each lane feeds the MMA its own columns in the order the magic-number conversion yields
// them, and x (the B fragment, batch row g) is permuted the same way, once per step for all
// the rows of the block.
//
// int4: a step is 128 columns, one group when G % 128 == 0 (the 4 lanes of a quad hold one
// row's 128 columns): the 8 MMAs of a step sum sum_k (q - z) x exactly in fp32 and the group's
// scale multiplies that sum (fp32). A LOP3 puts two nibbles (i and i + 4 of a word) under the
// exponent of OFF (bf16 128, fp16 1024), one FMA2 subtracts OFF + z: q - z, two at a time.
// int8: a step is 64 columns (4 MMAs); b + 128 under the exponent of 2^23 (fp32, minus
// 2^23 + 128: exact b, its top half the bf16 b) or of 1024 (fp16x2, minus 1152); the
// per-channel scale multiplies the finished dot product.
//
// Block: 16 rows; num_warps warps split K; their partial sums meet in shared memory. Weight
// streams (num_stages; 3 and 13, the lean ring, are described at its kernel): 1, strided: warp
// w takes steps w, w + num_warps, ..., two steps' weights (2 KB a warp) requested at a time, at
// most 8 batch rows; 2 or 4, the ring: warp w takes
// one contiguous run of steps and keeps 2 or 4 steps in flight all along it, a quad loads the
// scales and zeros of 4 steps at once, and up to 16 batch rows (two MMA tiles sharing the A
// fragments). Neither wins every shape on the H200 (the ring: down and o at M = 1, every M 9-16
// shape; the strided: int8, qkv), so the tuning tables choose. With PDL the first steps'
// weights are requested before waiting for the previous kernel. Slower on every Llama-3-8B
// shape (so not built): 32 rows a block (x reused twice), four strided steps in flight a warp,
// a cp.async ring of 4..8 steps a warp in shared memory (int4 gate_up M = 1: 29.8 us here,
// 43.7 us with the best ring, which holds 108-124 registers). Nsight Compute on int4 gate_up
// M = 1 (strided, 8 warps): 40 % of DRAM bandwidth, 0.62 instructions issued per scheduler
// cycle at 44 % occupancy (60 registers), about 300 instructions per warp step: bound by
// instruction issue and latency together, not by the loads.
#include "quant_mma.cuh"

namespace fuselm {
namespace {

// One int4 step of one row tile: d += sum (q - z) x over the lane's 32 columns of rows g and
// g + 8 (w[0], w[1]); nz: -(OFF + z) of each row as a pair; xv: the 32 x values (batch g).
template <typename T>
__device__ __forceinline__ void int4_step(float (&d)[4], const uint4 (&w)[2],
                                          const uint32_t (&nz)[2], const uint4 (&xv)[4]) {
  constexpr uint32_t kMask = 0x000F000Fu;
#pragma unroll
  for (int j = 0; j < 4; ++j) {  // word j: columns 8 j .. 8 j + 7, nibble i = column 8 j + i
    const uint4& xj = xv[j];
    // (x_i, x_{i+4}) pairs, the order of the nibble pairs below
    const uint32_t b[4] = {prmt(xj.x, xj.z, 0x5410), prmt(xj.x, xj.z, 0x7632),
                           prmt(xj.y, xj.w, 0x5410), prmt(xj.y, xj.w, 0x7632)};
    const uint32_t vg = word(w[0], j);
    const uint32_t vh = word(w[1], j);
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // nibble pairs (2h, 2h + 4) and (2h + 1, 2h + 5)
      const uint32_t a0 = fma2<T>(lop3_and_or(vg >> (8 * h), kMask, Num<T>::kOff), Num<T>::kOne,
                                  nz[0]);
      const uint32_t a2 = fma2<T>(lop3_and_or(vg >> (8 * h + 4), kMask, Num<T>::kOff),
                                  Num<T>::kOne, nz[0]);
      const uint32_t a1 = fma2<T>(lop3_and_or(vh >> (8 * h), kMask, Num<T>::kOff), Num<T>::kOne,
                                  nz[1]);
      const uint32_t a3 = fma2<T>(lop3_and_or(vh >> (8 * h + 4), kMask, Num<T>::kOff),
                                  Num<T>::kOne, nz[1]);
      mma<T>(d, a0, a1, a2, a3, b[2 * h], b[2 * h + 1]);
    }
  }
}

// e4m3 bytes 2p and 2p + 1 of word v as an exact pair of T. fp16: the hardware conversion.
// bf16: each byte under the top of a half, its exponent and mantissa moved down 4 bits
// under the bf16 exponent (the sign stays) and the pair times 2^120 (the bias difference,
// exact for the subnormals too). NaN bytes are not weights.
template <typename T>
__device__ __forceinline__ uint32_t fp8_pair(uint32_t v, int p) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const uint32_t x = prmt(v, 0u, p == 0 ? 0x1404u : 0x3424u);  // (b << 8) in each half
    const uint32_t r = lop3_and_or(x >> 4, 0x07F007F0u, x & 0x80008000u);
    return fma2<T>(r, 0x7B807B80u, 0x80008000u);  // r * 2^120 + (-0)
  } else {
    uint32_t d;
    const uint16_t h = static_cast<uint16_t>(v >> (16 * p));
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(d) : "h"(h));
    return d;
  }
}

// A weight word of a byte format ready for weight_pair (int8: b + 128 in each byte).
template <WKind kW>
__device__ __forceinline__ uint32_t byte_word(uint32_t v) {
  return kW == WKind::kInt8 ? v ^ 0x80808080u : v;
}

template <typename T, WKind kW>
__device__ __forceinline__ uint32_t weight_pair(uint32_t v, int p) {
  if constexpr (kW == WKind::kFp8) {
    return fp8_pair<T>(v, p);
  } else {
    return byte_pair<T>(v, p);
  }
}

// One int8 step of one row tile: d += sum b x over the lane's 16 columns of rows g and g + 8.
template <typename T, WKind kW>
__device__ __forceinline__ void int8_step(float (&d)[4], const uint4 (&w)[2],
                                          const uint4 (&xv)[2]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {  // word j: columns 4 j .. 4 j + 3
    const uint32_t vg = byte_word<kW>(word(w[0], j));
    const uint32_t vh = byte_word<kW>(word(w[1], j));
    const uint4& xj = xv[j / 2];
    const uint32_t b0 = j % 2 ? xj.z : xj.x;  // x[4 j], x[4 j + 1]
    const uint32_t b1 = j % 2 ? xj.w : xj.y;  // x[4 j + 2], x[4 j + 3]
    mma<T>(d, weight_pair<T, kW>(vg, 0), weight_pair<T, kW>(vh, 0), weight_pair<T, kW>(vg, 1),
           weight_pair<T, kW>(vh, 1), b0, b1);
  }
}

// Threads a block of R row tiles and U steps in flight may have (more would spill). The
// strided stream is built with R = 1, U = 2 only: the best of the H200 sweep (R = 2 and U = 4
// were slower).
template <int R, int U>
constexpr int kMaxThreads = R * U >= 8 ? 256 : 512;

// R row tiles (16 R rows) a block, U steps a warp in flight.
template <typename T, WKind kW, int R, int U>
__global__ void __launch_bounds__(kMaxThreads<R, U>) quant_gemv_kernel(const QuantGemvParams p) {
  constexpr bool kInt4 = kW == WKind::kInt4;
  extern __shared__ float partial[];  // [num_warps][16 R][kBatch]
  constexpr int kCols = kInt4 ? 2 * kStepBytes : kStepBytes;  // columns of a step
  constexpr int kXVecs = kCols / 4 / 8;  // 16-byte x loads a lane a step (8 values each)
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * (kTileRows * R);
  const int steps = static_cast<int>(p.k / kCols);
  const int steps_per_group = kInt4 ? static_cast<int>(p.group_size / kCols) : 1;
  const uint8_t* qw = static_cast<const uint8_t*>(p.qweight);
  const bool has_x = g < p.m;
  const T* x_lane = static_cast<const T*>(p.x) + (has_x ? g : 0) * p.x_stride + t * (kCols / 4);

  float acc[R][4];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.f;

  bool waited = false;
  for (int s0 = warp; s0 < steps; s0 += num_warps * U) {
    uint4 wq[U][R][2];
    float sc[U][R][2];
    uint32_t nz[U][R][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = s0 + u * num_warps;
      const int grp = kInt4 ? s / steps_per_group : 0;
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t row = row0 + kTileRows * r + 8 * h + g;
          const bool ok = s < steps && row < p.n;
          wq[u][r][h] = load_weights(
              qw + row * p.qw_stride + static_cast<int64_t>(s) * kStepBytes + 16 * t, ok);
          if constexpr (kInt4) {
            sc[u][r][h] = ok ? load_scale(p.scales, row * p.s_stride + grp, p.scale_dtype) : 0.f;
            const uint32_t z = ok ? p.zeros[row * p.z_stride + grp] : 0u;
            nz[u][r][h] = (Num<T>::kOff | (z * 0x00010001u)) ^ 0x80008000u;  // -(OFF + z)
          }
        }
      }
    }
    if (!waited) {  // x is the previous kernel's output
      pdl_wait_then_release();
      waited = true;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = s0 + u * num_warps;
      if (s >= steps) break;  // warp-uniform
      uint4 xv[kXVecs];
      const uint4* xp = reinterpret_cast<const uint4*>(x_lane + static_cast<int64_t>(s) * kCols);
#pragma unroll
      for (int i = 0; i < kXVecs; ++i) xv[i] = has_x ? xp[i] : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if constexpr (kInt4) {
          float d[4] = {0.f, 0.f, 0.f, 0.f};
          int4_step<T>(d, wq[u][r], nz[u][r], xv);
          acc[r][0] += sc[u][r][0] * d[0];  // row g, batch 2 t and 2 t + 1
          acc[r][1] += sc[u][r][0] * d[1];
          acc[r][2] += sc[u][r][1] * d[2];  // row g + 8
          acc[r][3] += sc[u][r][1] * d[3];
        } else {
          int8_step<T, kW>(acc[r], wq[u][r], xv);
        }
      }
    }
  }
  if (!waited) pdl_wait_then_release();  // out may be memory the previous kernel still reads

  static_assert(R == 1, "the partial sums meet as one MMA tile's (store_block_nb)");
  store_block_nb<T, kW, 1>(p, partial, acc, row0, warp, num_warps, g, t);
}

// ---- the ring stream (stages = its depth, 2 or 4) ------------------------------------------
// Warp w takes one contiguous run of K steps and keeps `kDepth` steps' weights in flight all
// along it (each step's registers are refilled with the step kDepth ahead before it is used),
// so a warp never waits with nothing requested. The scales and zeros of 4 steps come in one
// load a quad: lane t reads those of step s + t and the quad shares them with shuffles (a
// quarter of the small scattered loads). NB batch tiles of 8 rows (M <= 8 NB) share each
// step's A fragments.
constexpr int kQuadSteps = 4;

// kChains (1 or 2) accumulators: nibble pairs h go to d[h % kChains], two MMA chains of 4 a
// step instead of one of 8 (the caller sums them).
template <typename T, int NB, int kChains = 1>
__device__ __forceinline__ void int4_step_nb(float (&d)[kChains][NB][4], const uint4 (&w)[2],
                                             const uint32_t nz0, const uint32_t nz1,
                                             const uint4 (&xv)[NB][4]) {
  constexpr uint32_t kMask = 0x000F000Fu;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t b[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      const uint4& xj = xv[nb][j];
      b[nb][0] = prmt(xj.x, xj.z, 0x5410);
      b[nb][1] = prmt(xj.x, xj.z, 0x7632);
      b[nb][2] = prmt(xj.y, xj.w, 0x5410);
      b[nb][3] = prmt(xj.y, xj.w, 0x7632);
    }
    const uint32_t vg = word(w[0], j);
    const uint32_t vh = word(w[1], j);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t a0 =
          fma2<T>(lop3_and_or(vg >> (8 * h), kMask, Num<T>::kOff), Num<T>::kOne, nz0);
      const uint32_t a2 =
          fma2<T>(lop3_and_or(vg >> (8 * h + 4), kMask, Num<T>::kOff), Num<T>::kOne, nz0);
      const uint32_t a1 =
          fma2<T>(lop3_and_or(vh >> (8 * h), kMask, Num<T>::kOff), Num<T>::kOne, nz1);
      const uint32_t a3 =
          fma2<T>(lop3_and_or(vh >> (8 * h + 4), kMask, Num<T>::kOff), Num<T>::kOne, nz1);
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
        mma<T>(d[h % kChains][nb], a0, a1, a2, a3, b[nb][2 * h], b[nb][2 * h + 1]);
    }
  }
}

template <typename T, WKind kW, int NB>
__device__ __forceinline__ void int8_step_nb(float (&d)[NB][4], const uint4 (&w)[2],
                                             const uint4 (&xv)[NB][2]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t vg = byte_word<kW>(word(w[0], j));
    const uint32_t vh = byte_word<kW>(word(w[1], j));
    const uint32_t a0 = weight_pair<T, kW>(vg, 0), a1 = weight_pair<T, kW>(vh, 0);
    const uint32_t a2 = weight_pair<T, kW>(vg, 1), a3 = weight_pair<T, kW>(vh, 1);
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      const uint4& xj = xv[nb][j / 2];
      mma<T>(d[nb], a0, a1, a2, a3, j % 2 ? xj.z : xj.x, j % 2 ? xj.w : xj.y);
    }
  }
}

// -(OFF + z) pair and the scale of row `row`, group of step s; zeros where !ok.
template <typename T>
__device__ __forceinline__ void load_group(const QuantGemvParams& p, int64_t row, int grp,
                                           bool ok, float& sc, uint32_t& nz) {
  sc = ok ? load_scale(p.scales, row * p.s_stride + grp, p.scale_dtype) : 0.f;
  const uint32_t z = ok ? p.zeros[row * p.z_stride + grp] : 0u;
  nz = (Num<T>::kOff | (z * 0x00010001u)) ^ 0x80008000u;
}

template <typename T, WKind kW, int NB, int kDepth>
__global__ void __launch_bounds__(512) quant_gemv_ring_kernel(const QuantGemvParams p) {
  constexpr bool kInt4 = kW == WKind::kInt4;
  static_assert(kDepth == 2 || kDepth == 4, "the ring holds 2 or 4 steps");
  extern __shared__ float partial[];  // [num_warps][16][8 NB]
  constexpr int kCols = kInt4 ? 2 * kStepBytes : kStepBytes;
  constexpr int kXVecs = kCols / 4 / 8;
  constexpr unsigned kFull = 0xFFFFFFFFu;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int steps = static_cast<int>(p.k / kCols);
  const int per = (steps + num_warps - 1) / num_warps;
  const int s_begin = min(steps, warp * per);
  const int s_end = min(steps, s_begin + per);
  const int steps_per_group = kInt4 ? static_cast<int>(p.group_size / kCols) : 1;
  const int64_t rows[2] = {row0 + g, row0 + 8 + g};
  const bool row_ok[2] = {rows[0] < p.n, rows[1] < p.n};
  const uint8_t* qw = static_cast<const uint8_t*>(p.qweight);
  const uint8_t* wrow[2] = {qw + (row_ok[0] ? rows[0] : 0) * p.qw_stride + 16 * t,
                            qw + (row_ok[1] ? rows[1] : 0) * p.qw_stride + 16 * t};
  bool has_x[NB];
  const T* x_lane[NB];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    const int b = 8 * nb + g;
    has_x[nb] = b < p.m;
    x_lane[nb] = static_cast<const T*>(p.x) + (has_x[nb] ? b : 0) * p.x_stride + t * (kCols / 4);
  }

  uint4 wq[kDepth][2];
#pragma unroll
  for (int u = 0; u < kDepth; ++u) {
    const int s = s_begin + u;
#pragma unroll
    for (int h = 0; h < 2; ++h)
      wq[u][h] = load_weights(wrow[h] + static_cast<int64_t>(s) * kStepBytes,
                              s < s_end && row_ok[h]);
  }
  float sc[2] = {0.f, 0.f};
  uint32_t nz[2] = {0u, 0u};
  if constexpr (kInt4) {
    const int s = s_begin + t;
#pragma unroll
    for (int h = 0; h < 2; ++h)
      load_group<T>(p, rows[h], s / steps_per_group, s < s_end && row_ok[h], sc[h], nz[h]);
  }
  pdl_wait_then_release();  // x is the previous kernel's output; out may be what it reads

  float acc[NB][4];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;

  for (int c = s_begin; c < s_end; c += kQuadSteps) {
    float next_sc[2] = {0.f, 0.f};
    uint32_t next_nz[2] = {0u, 0u};
    if constexpr (kInt4) {
      const int s = c + kQuadSteps + t;
#pragma unroll
      for (int h = 0; h < 2; ++h)
        load_group<T>(p, rows[h], s / steps_per_group, s < s_end && row_ok[h], next_sc[h],
                      next_nz[h]);
    }
#pragma unroll
    for (int u = 0; u < kQuadSteps; ++u) {
      const int s = c + u;
      if (s >= s_end) break;  // warp-uniform
      const int slot = u % kDepth;  // a run's step s sits in slot (s - s_begin) % kDepth
      const uint4 w[2] = {wq[slot][0], wq[slot][1]};
      const int sn = s + kDepth;
#pragma unroll
      for (int h = 0; h < 2; ++h)
        wq[slot][h] = load_weights(wrow[h] + static_cast<int64_t>(sn) * kStepBytes,
                                   sn < s_end && row_ok[h]);
      uint4 xv[NB][kXVecs];
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        const uint4* xp =
            reinterpret_cast<const uint4*>(x_lane[nb] + static_cast<int64_t>(s) * kCols);
#pragma unroll
        for (int i = 0; i < kXVecs; ++i) xv[nb][i] = has_x[nb] ? xp[i] : make_uint4(0u, 0u, 0u, 0u);
      }
      if constexpr (kInt4) {
        const int src = (lane & ~3) | u;
        const float s0 = __shfl_sync(kFull, sc[0], src);
        const float s1 = __shfl_sync(kFull, sc[1], src);
        const uint32_t z0 = __shfl_sync(kFull, nz[0], src);
        const uint32_t z1 = __shfl_sync(kFull, nz[1], src);
        float d[1][NB][4] = {};
        int4_step_nb<T, NB>(d, w, z0, z1, xv);
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
          acc[nb][0] += s0 * d[0][nb][0];  // row g, batch 8 nb + 2 t and + 1
          acc[nb][1] += s0 * d[0][nb][1];
          acc[nb][2] += s1 * d[0][nb][2];  // row g + 8
          acc[nb][3] += s1 * d[0][nb][3];
        }
      } else {
        int8_step_nb<T, kW, NB>(acc, w, xv);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      sc[h] = next_sc[h];
      nz[h] = next_nz[h];
    }
  }
  store_block_nb<T, kW, NB>(p, partial, acc, row0, warp, num_warps, g, t);
}


// The lean ring: the ring's schedule with the per-step address arithmetic hoisted (lane
// pointers advanced by constants), no zero fills (a lane past a row, step or batch end feeds
// unspecified values: their products reach only outputs that are never stored), the group
// index counted (no division in the loop), scales read as S, and the next step's x loaded
// one step ahead.
template <typename S>
__device__ __forceinline__ float scale_value(const S* s, int64_t i) {
  if constexpr (std::is_same_v<S, float>) {
    return s[i];
  } else if constexpr (std::is_same_v<S, __half>) {
    return __half2float(s[i]);
  } else {
    return __bfloat162float(s[i]);
  }
}

template <typename T, typename S, WKind kW, bool kTwoAcc>
__global__ void __launch_bounds__(512) quant_gemv_lean_kernel(const QuantGemvParams p) {
  constexpr bool kInt4 = kW == WKind::kInt4;
  constexpr int NB = 1;  // one 8-row batch tile (M <= 8): two spill at 128 registers
  constexpr int kDepth = 2;  // steps in flight (4 was slower on every 8B shape: 128 registers)
  extern __shared__ float partial[];  // [num_warps][16][8]
  constexpr int kCols = kInt4 ? 2 * kStepBytes : kStepBytes;
  constexpr int kXVecs = kCols / 4 / 8;
  constexpr unsigned kFull = 0xFFFFFFFFu;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int steps = static_cast<int>(p.k / kCols);
  const int per = (steps + num_warps - 1) / num_warps;
  const int s_begin = min(steps, warp * per);
  const int n_steps = min(steps, s_begin + per) - s_begin;  // this warp's run
  const int64_t rows[2] = {row0 + g, row0 + 8 + g};
  // a row past N loads nothing: its run is empty
  const int lim[2] = {rows[0] < p.n ? n_steps : 0, rows[1] < p.n ? n_steps : 0};
  const uint8_t* qw = static_cast<const uint8_t*>(p.qweight);
  const uint8_t* wp[2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
    wp[h] = qw + (lim[h] ? rows[h] : 0) * p.qw_stride + 16 * t +
            static_cast<int64_t>(s_begin) * kStepBytes;
  bool has_x[NB];
  const T* xp[NB];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    const int b = 8 * nb + g;
    has_x[nb] = b < p.m;
    xp[nb] = static_cast<const T*>(p.x) + (has_x[nb] ? b : 0) * p.x_stride + t * (kCols / 4) +
             static_cast<int64_t>(s_begin) * kCols;
  }
  // int4 groups: lane t reads the scale and zero of the run's step c + t for the quad of
  // steps from c; (grp, in_grp) = that step's group and its place in it, advanced by counting
  const int spg = kInt4 ? static_cast<int>(p.group_size / kCols) : 1;
  int grp = (s_begin + t) / spg;
  int in_grp = (s_begin + t) - grp * spg;
  // 32-bit offsets of the rows' scales and zeros (N x groups < 2^31): cheap to keep
  const S* scales = static_cast<const S*>(p.scales);
  int s_row[2], z_row[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    s_row[h] = static_cast<int>((lim[h] ? rows[h] : 0) * p.s_stride);
    z_row[h] = static_cast<int>((lim[h] ? rows[h] : 0) * p.z_stride);
  }
  auto next_quad_group = [&] {  // (grp, in_grp) of the step 4 later
    in_grp += kQuadSteps;
    while (in_grp >= spg) {
      in_grp -= spg;
      ++grp;
    }
  };

  uint4 wq[kDepth][2];
#pragma unroll
  for (int u = 0; u < kDepth; ++u) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      wq[u][h] = load16_or_any<true>(wp[h] + u * kStepBytes, u < lim[h]);
    }
  }
  float sc[2] = {0.f, 0.f};
  uint32_t nz[2] = {0u, 0u};
  if constexpr (kInt4) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (t < lim[h]) {
        sc[h] = scale_value(scales, s_row[h] + grp);
        nz[h] = (Num<T>::kOff | (static_cast<uint32_t>(p.zeros[z_row[h] + grp]) * 0x00010001u)) ^
                0x80008000u;
      }
    }
  }
  pdl_wait_then_release();  // x is the previous kernel's output; out may be what it reads

  uint4 xv[2][NB][kXVecs];  // this step's x and the next one's
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
    for (int i = 0; i < kXVecs; ++i) {
      xv[0][nb][i] = load16_or_any<false>(xp[nb] + 8 * i, has_x[nb] && n_steps > 0);
    }
  }

  float acc[NB][4];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;

  for (int c = 0; c < n_steps; c += kQuadSteps) {
    float next_sc[2] = {0.f, 0.f};
    uint32_t next_nz[2] = {0u, 0u};
    if constexpr (kInt4) {
      const int s = c + kQuadSteps + t;
      next_quad_group();
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (s < lim[h]) {
          next_sc[h] = scale_value(scales, s_row[h] + grp);
          next_nz[h] = (Num<T>::kOff | (static_cast<uint32_t>(p.zeros[z_row[h] + grp]) *
                                        0x00010001u)) ^
                       0x80008000u;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kQuadSteps; ++u) {
      const int i = c + u;
      if (i >= n_steps) break;  // warp-uniform
      const int slot = u % kDepth;  // the run's step i sits in slot i % kDepth (c % 4 == 0)
      const uint4 w[2] = {wq[slot][0], wq[slot][1]};
#pragma unroll
      for (int h = 0; h < 2; ++h)
        wq[slot][h] =
            load16_or_any<true>(wp[h] + (u + kDepth) * kStepBytes, i + kDepth < lim[h]);
      const int cur = u & 1;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
        for (int v = 0; v < kXVecs; ++v)
          xv[cur ^ 1][nb][v] = load16_or_any<false>(xp[nb] + (u + 1) * kCols + 8 * v,
                                                    has_x[nb] && i + 1 < n_steps);
      }
      if constexpr (kInt4) {
        const int src = (lane & ~3) | u;
        const float s0 = __shfl_sync(kFull, sc[0], src);
        const float s1 = __shfl_sync(kFull, sc[1], src);
        const uint32_t z0 = __shfl_sync(kFull, nz[0], src);
        const uint32_t z1 = __shfl_sync(kFull, nz[1], src);
        constexpr int kChains = kTwoAcc ? 2 : 1;
        float d[kChains][NB][4] = {};
        int4_step_nb<T, NB, kChains>(d, w, z0, z1, xv[cur]);
#pragma unroll
        for (int i = 1; i < kChains; ++i)
#pragma unroll
          for (int r = 0; r < 4; ++r) d[0][0][r] += d[i][0][r];
        acc[0][0] += s0 * d[0][0][0];  // row g, batch 2 t and 2 t + 1
        acc[0][1] += s0 * d[0][0][1];
        acc[0][2] += s1 * d[0][0][2];  // row g + 8
        acc[0][3] += s1 * d[0][0][3];
      } else {
        int8_step_nb<T, kW, NB>(acc, w, xv[cur]);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      sc[h] = next_sc[h];
      nz[h] = next_nz[h];
      wp[h] += kQuadSteps * kStepBytes;
    }
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) xp[nb] += kQuadSteps * kCols;
  }
  store_block_nb<T, kW, NB>(p, partial, acc, row0, warp, num_warps, g, t);
}

// Whether the lean ring's 32-bit scale and zero offsets hold p's (N x groups < 2^31).
inline bool lean_offsets_fit(const QuantGemvParams& p) {
  return p.n * std::max(p.s_stride, p.z_stride) < (int64_t{1} << 31);
}

template <typename T, WKind kW, bool kTwoAcc>
cudaError_t launch_lean(const QuantGemvParams& p, cudaLaunchConfig_t& cfg) {
  cfg.dynamicSmemBytes = static_cast<size_t>(p.num_warps) * kTileRows * kBatch * sizeof(float);
  if constexpr (kW == WKind::kInt4) {
    switch (p.scale_dtype) {
      case DType::kFloat32:
        return cudaLaunchKernelEx(&cfg, quant_gemv_lean_kernel<T, float, kW, kTwoAcc>, p);
      case DType::kFloat16:
        return cudaLaunchKernelEx(&cfg, quant_gemv_lean_kernel<T, __half, kW, kTwoAcc>, p);
      case DType::kBFloat16:
        return cudaLaunchKernelEx(&cfg, quant_gemv_lean_kernel<T, __nv_bfloat16, kW, kTwoAcc>,
                                  p);
      default:
        return cudaErrorInvalidValue;
    }
  } else {  // the per-row scale is read once a row, by store_block_nb
    return cudaLaunchKernelEx(&cfg, quant_gemv_lean_kernel<T, T, kW, false>, p);
  }
}

template <typename T, WKind kW, int NB>
cudaError_t launch_ring(const QuantGemvParams& p, cudaLaunchConfig_t& cfg) {
  cfg.dynamicSmemBytes = static_cast<size_t>(p.num_warps) * kTileRows * 8 * NB * sizeof(float);
  if (p.stages == 2) return cudaLaunchKernelEx(&cfg, quant_gemv_ring_kernel<T, kW, NB, 2>, p);
  return cudaLaunchKernelEx(&cfg, quant_gemv_ring_kernel<T, kW, NB, 4>, p);
}

template <typename T, WKind kW>
cudaError_t launch_typed(const QuantGemvParams& p, cudaStream_t stream) {
  cudaLaunchAttribute attr;
  cudaLaunchConfig_t cfg = tile_launch_config(p, stream, attr);
  if (p.stages == 1) {  // the strided stream
    if (p.m > kBatch) return cudaErrorInvalidValue;
    cfg.dynamicSmemBytes = static_cast<size_t>(p.num_warps) * kTileRows * kBatch * sizeof(float);
    return cudaLaunchKernelEx(&cfg, quant_gemv_kernel<T, kW, 1, 2>, p);
  }
  if (p.stages == 3 || p.stages == 13) {  // the lean ring (13: two accumulators)
    if (p.m > kBatch || !lean_offsets_fit(p)) return cudaErrorInvalidValue;
    if (p.stages == 13) return launch_lean<T, kW, true>(p, cfg);
    return launch_lean<T, kW, false>(p, cfg);
  }
  if (p.stages != 2 && p.stages != 4) return cudaErrorInvalidValue;
  if (p.m <= kBatch) return launch_ring<T, kW, 1>(p, cfg);
  return launch_ring<T, kW, 2>(p, cfg);
}

template <WKind kW>
cudaError_t launch(const QuantGemvParams& p, cudaStream_t stream) {
  constexpr bool kInt4 = kW == WKind::kInt4;
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  const int64_t cols = kInt4 ? 2 * kStepBytes : kStepBytes;
  if (!tile_shape_ok(p, cols) ||
      (kInt4 && (p.group_size <= 0 || p.group_size % cols != 0))) {
    return cudaErrorInvalidValue;
  }
  return with_x_dtype(p.dtype, [&](auto x) { return launch_typed<decltype(x), kW>(p, stream); });
}

}  // namespace

cudaError_t launch_int4_gemv(const QuantGemvParams& params, cudaStream_t stream) {
  return launch<WKind::kInt4>(params, stream);
}

cudaError_t launch_int8_gemv(const QuantGemvParams& params, cudaStream_t stream) {
  return launch<WKind::kInt8>(params, stream);
}

cudaError_t launch_fp8_gemv(const QuantGemvParams& params, cudaStream_t stream) {
  return launch<WKind::kFp8>(params, stream);
}

}  // namespace fuselm
