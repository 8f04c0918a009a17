// CPU implementations of the layerroute ops. They read `count` on the host (it is host memory
// here) and report bad counts and indices as errors, which the CUDA kernels cannot do without
// a sync.
#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include "checks.h"
#include "ops.h"

namespace layerroute {
namespace {

// Rows per parallel_for task: about 32k elements each, as ATen's own loops split work.
int64_t row_grain(int64_t d) {
  constexpr int64_t kGrainElements = 32768;
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(d, 1));
}

// The live row count, checked against the M rows of `index`.
int64_t read_count(const char* op, const at::Tensor& count, const at::Tensor& index) {
  const int64_t live = count.const_data_ptr<int32_t>()[0];
  TORCH_CHECK_VALUE(live >= 0 && live <= index.size(0), op, ": `count` is ", live,
                    ", outside [0, M = ", index.size(0), "]");
  return live;
}

// index[0:live) must lie in [0, n_rows); with `unique`, no row may appear twice.
void check_live_indices(const char* op, const int32_t* index, int64_t live, int64_t n_rows,
                        bool unique) {
  std::vector<bool> seen(unique ? n_rows : 0, false);
  for (int64_t i = 0; i < live; ++i) {
    const int64_t row = index[i];
    TORCH_CHECK_INDEX(row >= 0 && row < n_rows, op, ": index[", i, "] = ", row,
                      " is outside [0, ", n_rows, ")");
    if (unique) {
      TORCH_CHECK_VALUE(!seen[row], op, ": row ", row, " appears twice in index[0:count]");
      seen[row] = true;
    }
  }
}

}  // namespace

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

void gather_rows_cpu(const at::Tensor& x, const at::Tensor& index, const at::Tensor& count,
                     at::Tensor& out) {
  constexpr const char* op = "gather_rows";
  check_gather_rows_args(x, index, count, out);
  const int64_t live = read_count(op, count, index);
  const int32_t* idx = index.const_data_ptr<int32_t>();
  check_live_indices(op, idx, live, x.size(0), /*unique=*/false);

  const int64_t row_bytes = x.size(1) * x.element_size();
  const char* from = static_cast<const char*>(x.const_data_ptr());
  char* to = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, live, row_grain(x.size(1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(to + i * row_bytes, from + idx[i] * row_bytes, row_bytes);
    }
  });
}

void scatter_add_rows_cpu(at::Tensor& residual, const at::Tensor& src, const at::Tensor& index,
                          const at::Tensor& count) {
  constexpr const char* op = "scatter_add_rows";
  check_scatter_add_rows_args(residual, src, index, count);
  const int64_t live = read_count(op, count, index);
  const int32_t* idx = index.const_data_ptr<int32_t>();
  // Unique rows let the tasks below write without races.
  check_live_indices(op, idx, live, residual.size(0), /*unique=*/true);

  const int64_t d = residual.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), op, [&] {
    scalar_t* res = residual.data_ptr<scalar_t>();
    const scalar_t* add = src.const_data_ptr<scalar_t>();
    at::parallel_for(0, live, row_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* to = res + idx[i] * d;
        const scalar_t* from = add + i * d;
        for (int64_t j = 0; j < d; ++j) {
          to[j] = static_cast<scalar_t>(static_cast<float>(to[j]) + static_cast<float>(from[j]));
        }
      }
    });
  });
}

}  // namespace layerroute
