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
namespace {

DType kernel_dtype(at::ScalarType t) {
  if (t == at::kHalf) return DType::kFloat16;
  if (t == at::kBFloat16) return DType::kBFloat16;
  return DType::kFloat32;  // check_rows admits only these three
}

}  // namespace

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

void gather_rows_cuda(const at::Tensor& x, const at::Tensor& index, const at::Tensor& count,
                      at::Tensor& out) {
  check_gather_rows_args(x, index, count, out);
  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(launch_gather_rows(x.const_data_ptr(), index.const_data_ptr<int32_t>(),
                                    count.const_data_ptr<int32_t>(), out.data_ptr(), x.size(0),
                                    out.size(0), x.size(1), kernel_dtype(x.scalar_type()),
                                    c10::cuda::getCurrentCUDAStream()));
}

void scatter_add_rows_cuda(at::Tensor& residual, const at::Tensor& src, const at::Tensor& index,
                           const at::Tensor& count) {
  check_scatter_add_rows_args(residual, src, index, count);
  const c10::cuda::CUDAGuard guard(residual.device());
  C10_CUDA_CHECK(launch_scatter_add_rows(residual.data_ptr(), src.const_data_ptr(),
                                         index.const_data_ptr<int32_t>(),
                                         count.const_data_ptr<int32_t>(), residual.size(0),
                                         src.size(0), residual.size(1),
                                         kernel_dtype(residual.scalar_type()),
                                         c10::cuda::getCurrentCUDAStream()));
}

}  // namespace layerroute
