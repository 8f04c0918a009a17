// Argument checks shared by the CPU and CUDA wrappers. Each failure names the op, the
// argument and what was expected; dtype problems raise TypeError, the rest ValueError.
#pragma once

#include <cstdint>
#include <limits>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace layerroute {

inline bool is_row_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_device(const char* op, const at::Tensor& t, const char* name,
                         const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": `", name,
                    "` must be on the same device as `", ref_name, "` (", ref.device(), "), got ",
                    t.device());
}

// A contiguous [rows, D] matrix of float32, float16 or bfloat16.
inline void check_rows(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_row_dtype(t.scalar_type()), op, ": `", name,
                   "` must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": `", name, "` must be 2-D [rows, D], got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": `", name, "` must be contiguous");
}

// `index`: contiguous int32 [M]; `count`: int32 [1]; both on the device of `ref`.
inline void check_index_count(const char* op, const at::Tensor& index, const at::Tensor& count,
                              const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kInt, op, ": `index` must be int32, got ",
                   index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 1, op, ": `index` must be 1-D [M], got shape ", index.sizes());
  TORCH_CHECK_VALUE(index.is_contiguous(), op, ": `index` must be contiguous");
  TORCH_CHECK_VALUE(index.size(0) <= std::numeric_limits<int32_t>::max(), op, ": `index` has ",
                    index.size(0), " rows, more than int32 indexes");
  TORCH_CHECK_TYPE(count.scalar_type() == at::kInt, op, ": `count` must be int32, got ",
                   count.scalar_type());
  TORCH_CHECK_VALUE(count.dim() == 1 && count.size(0) == 1, op,
                    ": `count` must have shape [1], got ", count.sizes());
  check_device(op, index, "index", ref, ref_name);
  check_device(op, count, "count", ref, ref_name);
}

inline void check_compact_rows_args(const at::Tensor& mask) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "compact_rows: `mask` must be bool, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 1, "compact_rows: `mask` must be 1-D [N], got shape ",
                    mask.sizes());
  TORCH_CHECK_VALUE(mask.is_contiguous(), "compact_rows: `mask` must be contiguous");
  TORCH_CHECK_VALUE(mask.size(0) <= std::numeric_limits<int32_t>::max(),
                    "compact_rows: `mask` has ", mask.size(0), " rows, more than int32 indexes");
}

inline void check_gather_rows_args(const at::Tensor& x, const at::Tensor& index,
                                   const at::Tensor& count, const at::Tensor& out) {
  constexpr const char* op = "gather_rows";
  check_rows(op, x, "x");
  check_rows(op, out, "out");
  check_index_count(op, index, count, x, "x");
  check_device(op, out, "out", x, "x");
  TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), op, ": `out` must have the dtype of `x` (",
                   x.scalar_type(), "), got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.size(0) == index.size(0) && out.size(1) == x.size(1), op,
                    ": `out` must have shape [M, D] = [", index.size(0), ", ", x.size(1),
                    "] (M from `index`, D from `x`), got ", out.sizes());
}

inline void check_scatter_add_rows_args(const at::Tensor& residual, const at::Tensor& src,
                                        const at::Tensor& index, const at::Tensor& count) {
  constexpr const char* op = "scatter_add_rows";
  check_rows(op, residual, "residual");
  check_rows(op, src, "src");
  check_index_count(op, index, count, residual, "residual");
  check_device(op, src, "src", residual, "residual");
  TORCH_CHECK_TYPE(src.scalar_type() == residual.scalar_type(), op,
                   ": `src` must have the dtype of `residual` (", residual.scalar_type(), "), got ",
                   src.scalar_type());
  TORCH_CHECK_VALUE(src.size(0) == index.size(0) && src.size(1) == residual.size(1), op,
                    ": `src` must have shape [M, D] = [", index.size(0), ", ", residual.size(1),
                    "] (M from `index`, D from `residual`), got ", src.sizes());
}

}  // namespace layerroute
