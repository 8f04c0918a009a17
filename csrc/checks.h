// Argument checks shared by the CPU and CUDA wrappers. Each failure names the op, the
// argument and what was expected; dtype problems raise TypeError, the rest ValueError.
#pragma once

#include <cstdint>
#include <limits>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace layerroute {

inline void check_compact_rows_args(const at::Tensor& mask) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "compact_rows: `mask` must be bool, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 1, "compact_rows: `mask` must be 1-D [N], got shape ",
                    mask.sizes());
  TORCH_CHECK_VALUE(mask.is_contiguous(), "compact_rows: `mask` must be contiguous");
  TORCH_CHECK_VALUE(mask.size(0) <= std::numeric_limits<int32_t>::max(),
                    "compact_rows: `mask` has ", mask.size(0), " rows, more than int32 indexes");
}

}  // namespace layerroute
