// CPU implementations of the layerroute ops.
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include "checks.h"
#include "ops.h"

namespace layerroute {

std::tuple<at::Tensor, at::Tensor> compact_rows_cpu(const at::Tensor& mask) {
  check_compact_rows_args(mask);
  const int64_t n = mask.size(0);
  at::Tensor index = at::full({n}, -1, mask.options().dtype(at::kInt));
  at::Tensor count = at::empty({1}, mask.options().dtype(at::kInt));
  const bool* m = mask.const_data_ptr<bool>();
  int32_t* idx = index.data_ptr<int32_t>();
  int32_t live = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (m[i]) idx[live++] = static_cast<int32_t>(i);
  }
  count.data_ptr<int32_t>()[0] = live;
  return {index, count};
}

}  // namespace layerroute
