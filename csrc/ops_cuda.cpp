// CUDA wrappers of the layerroute ops: validate, then launch the kernels of csrc/kernels on
// the current stream. Nothing here reads device memory on the host.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "kernels/kernels.h"
#include "ops.h"

namespace layerroute {

std::tuple<at::Tensor, at::Tensor> compact_rows_cuda(const at::Tensor& mask) {
  check_compact_rows_args(mask);
  const c10::cuda::CUDAGuard guard(mask.device());
  at::Tensor index = at::empty({mask.size(0)}, mask.options().dtype(at::kInt));
  at::Tensor count = at::empty({1}, mask.options().dtype(at::kInt));
  C10_CUDA_CHECK(launch_compact_rows(mask.const_data_ptr<bool>(), index.data_ptr<int32_t>(),
                                     count.data_ptr<int32_t>(), mask.size(0),
                                     c10::cuda::getCurrentCUDAStream()));
  return {index, count};
}

}  // namespace layerroute
