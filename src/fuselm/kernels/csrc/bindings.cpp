// The one registration file of the fuselm_C extension: schemas, tensor checks, launches.
//
// Kernel sources (*.cu) never see torch: this file checks shapes, dtypes, devices and strides,
// takes the current stream and calls the raw-pointer launchers declared in ops.h.
// Ops write their outputs into arguments marked `Tensor!` and return nothing.
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "ops.h"

namespace {

// Numbers and shapes in check messages become C strings first: on the device image a long
// streamed into c10's message stream from this library crashed (the number formatting this
// library's libstdc++ headers inline), while C strings stream fine.
std::string num(int64_t v) { return std::to_string(v); }

std::string shape_of(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

fuselm::DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return fuselm::DType::kFloat32;
    case at::kHalf:
      return fuselm::DType::kFloat16;
    case at::kBFloat16:
      return fuselm::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fuselm_C: unsupported dtype ", t.scalar_type());
  }
  return fuselm::DType::kFloat32;  // unreachable
}

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "fuselm_C: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2, "fuselm_C: ", name, " must be 2-D [rows, cols], got ",
              shape_of(t.sizes()).c_str());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "fuselm_C: ", name,
              " must be contiguous in its last dimension");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fuselm_C: ", name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "fuselm_C: ", name, " is on another device");
}

void check_ok(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fuselm_C::", op, " launch failed: ", cudaGetErrorString(err));
}

// ---- rms_norm ----------------------------------------------------------------------------

void check_weight(const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.stride(0) == 1,
              "fuselm_C: weight must be a contiguous [", num(x.size(1)).c_str(), "] tensor");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              "fuselm_C: weight must have x's dtype and device");
}

void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x", x);
  check_rows(out, "out", x);
  TORCH_CHECK(out.sizes() == x.sizes(), "fuselm_C: out must have x's shape");
  check_weight(weight, x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_ok(fuselm::launch_rms_norm(out.data_ptr(), x.data_ptr(), weight.data_ptr(), x.size(0),
                                   x.size(1), out.stride(0), x.stride(0),
                                   static_cast<float>(eps), to_dtype(x),
                                   c10::cuda::getCurrentCUDAStream()),
           "rms_norm");
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                        double eps) {
  check_rows(x, "x", x);
  check_rows(residual, "residual", x);
  TORCH_CHECK(residual.sizes() == x.sizes(), "fuselm_C: residual must have x's shape");
  check_weight(weight, x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_ok(fuselm::launch_fused_add_rms_norm(
               x.data_ptr(), residual.data_ptr(), weight.data_ptr(), x.size(0), x.size(1),
               x.stride(0), residual.stride(0), static_cast<float>(eps), to_dtype(x),
               c10::cuda::getCurrentCUDAStream()),
           "fused_add_rms_norm");
}

// ---- silu_and_mul ------------------------------------------------------------------------

void silu_and_mul(at::Tensor& out, const at::Tensor& x) {
  check_rows(x, "x", x);
  check_rows(out, "out", x);
  TORCH_CHECK(x.size(1) % 2 == 0, "fuselm_C: silu_and_mul needs an even last dimension");
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == x.size(1) / 2,
              "fuselm_C: out must be [rows, cols / 2]");
  TORCH_CHECK(x.size(0) < (int64_t{1} << 31), "fuselm_C: too many rows");
  const c10::cuda::CUDAGuard guard(x.device());
  check_ok(fuselm::launch_silu_and_mul(out.data_ptr(), x.data_ptr(), x.size(0), out.size(1),
                                       out.stride(0), x.stride(0), to_dtype(x),
                                       c10::cuda::getCurrentCUDAStream()),
           "silu_and_mul");
}

// ---- rotary_store_kv ---------------------------------------------------------------------

void check_heads(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "fuselm_C: ", name,
              " must be a CUDA tensor on q's device");
  TORCH_CHECK(t.dim() == 3, "fuselm_C: ", name, " must be [tokens, heads, head_size]");
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) <= 1, "fuselm_C: ", name,
              " must be contiguous in head_size");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fuselm_C: ", name, " has another dtype");
}

void rotary_store_kv(at::Tensor& q, at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& positions, const at::Tensor& cos_sin_cache,
                     at::Tensor& key_cache, at::Tensor& value_cache,
                     const at::Tensor& slot_mapping) {
  check_heads(q, "q", q);
  check_heads(k, "k", q);
  check_heads(v, "v", q);
  const int64_t num_tokens = q.size(0);
  TORCH_CHECK(k.size(0) == num_tokens && v.size(0) == num_tokens, "fuselm_C: token counts differ");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(2) == q.size(2), "fuselm_C: k, v shapes");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "fuselm_C: num_heads % num_kv_heads != 0");
  for (const at::Tensor* c : {&key_cache, &value_cache}) {
    TORCH_CHECK(c->dim() == 4 && c->size(2) == k.size(1) && c->size(3) == k.size(2),
                "fuselm_C: caches must be [num_blocks, block_size, num_kv_heads, head_size]");
    TORCH_CHECK(c->stride(3) == 1 && c->scalar_type() == k.scalar_type() &&
                    c->device() == q.device(),
                "fuselm_C: caches must be contiguous in head_size, of k's dtype and device");
  }
  TORCH_CHECK(key_cache.size(1) == value_cache.size(1), "fuselm_C: cache block sizes differ");
  for (const at::Tensor* t : {&positions, &slot_mapping}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == num_tokens && t->scalar_type() == at::kLong &&
                    t->is_contiguous() && t->device() == q.device(),
                "fuselm_C: positions and slot_mapping must be contiguous int64 [num_tokens]");
  }
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.scalar_type() == at::kFloat &&
                  cos_sin_cache.stride(1) == 1 && cos_sin_cache.device() == q.device(),
              "fuselm_C: cos_sin_cache must be float32 [max_position, rot_dim]");
  const int64_t rot_dim = cos_sin_cache.size(1);
  TORCH_CHECK(rot_dim % 2 == 0 && rot_dim <= q.size(2), "fuselm_C: bad rot_dim ",
              num(rot_dim).c_str());

  fuselm::RotaryStoreKVParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.positions = positions.data_ptr<int64_t>();
  p.cos_sin_cache = cos_sin_cache.data_ptr<float>();
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.num_tokens = num_tokens;
  p.num_heads = static_cast<int>(q.size(1));
  p.num_kv_heads = static_cast<int>(k.size(1));
  p.head_size = static_cast<int>(q.size(2));
  p.rot_dim = static_cast<int>(rot_dim);
  p.block_size = static_cast<int>(key_cache.size(1));
  p.cos_sin_stride = cos_sin_cache.stride(0);
  p.q_token_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_token_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v_token_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.kc_block_stride = key_cache.stride(0);
  p.kc_slot_stride = key_cache.stride(1);
  p.kc_head_stride = key_cache.stride(2);
  p.vc_block_stride = value_cache.stride(0);
  p.vc_slot_stride = value_cache.stride(1);
  p.vc_head_stride = value_cache.stride(2);
  const c10::cuda::CUDAGuard guard(q.device());
  check_ok(fuselm::launch_rotary_store_kv(p, to_dtype(q), c10::cuda::getCurrentCUDAStream()),
           "rotary_store_kv");
}

// ---- int4_gemv / int8_gemv (quant_gemv.cu) -----------------------------------------------

fuselm::QuantGemvParams gemv_params(at::Tensor& out, const at::Tensor& x,
                                    const at::Tensor& qweight, int64_t num_warps, int64_t stages,
                                    bool pdl) {
  check_rows(x, "x", x);
  check_rows(out, "out", x);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "fuselm_C: quantized gemv needs fp16 or bf16 x, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) <= 16, "fuselm_C: quantized gemv takes at most 16 rows, got ",
              num(x.size(0)).c_str());
  TORCH_CHECK(qweight.is_cuda() && qweight.device() == x.device() && qweight.dim() == 2 &&
                  qweight.stride(1) == 1,
              "fuselm_C: qweight must be a 2-D CUDA tensor on x's device, contiguous in K");
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == qweight.size(0),
              "fuselm_C: out must be [M, N]");
  fuselm::QuantGemvParams p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.qweight = qweight.data_ptr();
  p.m = x.size(0);
  p.n = qweight.size(0);
  p.k = x.size(1);
  p.out_stride = out.stride(0);
  p.x_stride = x.stride(0);
  p.qw_stride = qweight.stride(0);
  p.dtype = to_dtype(x);
  p.num_warps = static_cast<int>(num_warps);
  p.stages = static_cast<int>(stages);
  p.pdl = pdl;
  return p;
}

// The float scales of a quantized gemv into p.
void set_scales(fuselm::QuantGemvParams& p, const at::Tensor& scales, const at::Tensor& x) {
  TORCH_CHECK(scales.is_cuda() && scales.device() == x.device() && scales.is_floating_point(),
              "fuselm_C: scales must be a float CUDA tensor on x's device");
  p.scales = scales.data_ptr();
  p.scale_dtype = to_dtype(scales);
}

void int4_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
               const at::Tensor& scales, const at::Tensor& zeros, int64_t group_size,
               int64_t num_warps, int64_t stages, bool pdl) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 &&
                  2 * qweight.size(1) == x.size(1),
              "fuselm_C: int4_gemv qweight must be uint8 [N, K / 2]");
  fuselm::QuantGemvParams p = gemv_params(out, x, qweight, num_warps, stages, pdl);
  set_scales(p, scales, x);
  TORCH_CHECK(group_size > 0 && x.size(1) % group_size == 0, "fuselm_C: bad group_size");
  const int64_t groups = x.size(1) / group_size;
  for (const at::Tensor* t : {&scales, &zeros}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == p.n && t->size(1) == groups &&
                    (groups <= 1 || t->stride(1) == 1) && t->device() == x.device(),
                "fuselm_C: int4_gemv scales and zeros must be [N, K / group_size], contiguous "
                "in their last dimension");
  }
  TORCH_CHECK(zeros.scalar_type() == at::kByte, "fuselm_C: int4_gemv zeros must be uint8");
  p.zeros = zeros.data_ptr<uint8_t>();
  p.s_stride = scales.stride(0);
  p.z_stride = zeros.stride(0);
  p.group_size = group_size;
  const c10::cuda::CUDAGuard guard(x.device());
  check_ok(fuselm::launch_int4_gemv(p, c10::cuda::getCurrentCUDAStream()), "int4_gemv");
}

// int8_gemv / fp8_gemv: one byte a weight, a scale per row; `launch` is the format's kernel.
using ByteGemvLaunch = cudaError_t (*)(const fuselm::QuantGemvParams&, cudaStream_t);

void byte_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
               const at::Tensor& scales, int64_t num_warps, int64_t stages, bool pdl,
               at::ScalarType qtype, const char* op, ByteGemvLaunch launch) {
  TORCH_CHECK(qweight.scalar_type() == qtype && qweight.dim() == 2 &&
                  qweight.size(1) == x.size(1),
              "fuselm_C: ", op, " qweight must be ", qtype, " [N, K]");
  fuselm::QuantGemvParams p = gemv_params(out, x, qweight, num_warps, stages, pdl);
  set_scales(p, scales, x);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == p.n && scales.stride(0) == 1,
              "fuselm_C: ", op, " scales must be a contiguous [N]");
  const c10::cuda::CUDAGuard guard(x.device());
  check_ok(launch(p, c10::cuda::getCurrentCUDAStream()), op);
}

void int8_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
               const at::Tensor& scales, int64_t num_warps, int64_t stages, bool pdl) {
  byte_gemv(out, x, qweight, scales, num_warps, stages, pdl, at::kChar, "int8_gemv",
            fuselm::launch_int8_gemv);
}

void fp8_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
              const at::Tensor& scales, int64_t num_warps, int64_t stages, bool pdl) {
  byte_gemv(out, x, qweight, scales, num_warps, stages, pdl, at::kFloat8_e4m3fn, "fp8_gemv",
            fuselm::launch_fp8_gemv);
}

// gguf_gemv: Q4_K blocks as is, Q8_0 rows split (gguf_gemv.cu).
void gguf_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
               int64_t ggml_type, int64_t num_warps, bool pdl) {
  const bool q8 = ggml_type == fuselm::kGgmlQ8_0Split;
  TORCH_CHECK(q8 || ggml_type == fuselm::kGgmlQ4K,
              "fuselm_C: gguf_gemv takes Q4_K (12) and Q8_0 split (1008) rows, got type ",
              num(ggml_type).c_str());
  const int64_t elems = q8 ? 32 : 256;
  const int64_t bytes = q8 ? 34 : 144;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 &&
                  x.size(1) % elems == 0 && qweight.size(1) == x.size(1) / elems * bytes,
              "fuselm_C: gguf_gemv qweight must be uint8 [N, K / ", num(elems).c_str(), " * ",
              num(bytes).c_str(), "]");
  TORCH_CHECK(x.size(0) <= 16 && (x.size(0) <= 8 || num_warps <= 8),
              "fuselm_C: gguf_gemv takes at most 16 rows (above 8 at most 8 warps), got ",
              num(x.size(0)).c_str(), " rows, ", num(num_warps).c_str(), " warps");
  fuselm::QuantGemvParams p = gemv_params(out, x, qweight, num_warps, 1, pdl);
  const c10::cuda::CUDAGuard guard(x.device());
  check_ok(fuselm::launch_gguf_gemv(p, static_cast<int>(ggml_type),
                                    c10::cuda::getCurrentCUDAStream()),
           "gguf_gemv");
}

}  // namespace

TORCH_LIBRARY(fuselm_C, m) {
  m.def("rms_norm(Tensor! out, Tensor x, Tensor weight, float eps) -> ()");
  m.impl("rms_norm", c10::kCUDA, &rms_norm);
  m.def("fused_add_rms_norm(Tensor! x, Tensor! residual, Tensor weight, float eps) -> ()");
  m.impl("fused_add_rms_norm", c10::kCUDA, &fused_add_rms_norm);
  m.def("silu_and_mul(Tensor! out, Tensor x) -> ()");
  m.impl("silu_and_mul", c10::kCUDA, &silu_and_mul);
  m.def(
      "rotary_store_kv(Tensor! q, Tensor! k, Tensor v, Tensor positions, Tensor cos_sin_cache, "
      "Tensor! key_cache, Tensor! value_cache, Tensor slot_mapping) -> ()");
  m.impl("rotary_store_kv", c10::kCUDA, &rotary_store_kv);
  m.def(
      "int4_gemv(Tensor! out, Tensor x, Tensor qweight, Tensor scales, Tensor zeros, "
      "int group_size, int num_warps, int stages, bool pdl) -> ()");
  m.impl("int4_gemv", c10::kCUDA, &int4_gemv);
  m.def(
      "int8_gemv(Tensor! out, Tensor x, Tensor qweight, Tensor scales, int num_warps, "
      "int stages, bool pdl) -> ()");
  m.impl("int8_gemv", c10::kCUDA, &int8_gemv);
  m.def(
      "fp8_gemv(Tensor! out, Tensor x, Tensor qweight, Tensor scales, int num_warps, "
      "int stages, bool pdl) -> ()");
  m.impl("fp8_gemv", c10::kCUDA, &fp8_gemv);
  m.def(
      "gguf_gemv(Tensor! out, Tensor x, Tensor qweight, int ggml_type, int num_warps, "
      "bool pdl) -> ()");
  m.impl("gguf_gemv", c10::kCUDA, &gguf_gemv);
}

// An importable module (`import fuselm._C` loads the library and so registers the ops); the
// loader uses torch.ops.load_library, which needs no module object.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define FUSELM_CONCAT_(a, b) a##b
#define FUSELM_CONCAT(a, b) FUSELM_CONCAT_(a, b)
#define FUSELM_STR_(a) #a
#define FUSELM_STR(a) FUSELM_STR_(a)
PyMODINIT_FUNC FUSELM_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, FUSELM_STR(TORCH_EXTENSION_NAME),
                                      nullptr, 0, nullptr};
  return PyModule_Create(&module);
}
