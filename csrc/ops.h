// The device implementations of the layerroute ops, registered in torch_bindings.cpp.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace layerroute {

std::tuple<at::Tensor, at::Tensor> compact_rows_cpu(const at::Tensor& mask);
void gather_rows_cpu(const at::Tensor& x, const at::Tensor& index, const at::Tensor& count,
                     at::Tensor& out);
void scatter_add_rows_cpu(at::Tensor& residual, const at::Tensor& src, const at::Tensor& index,
                          const at::Tensor& count);

#ifdef LAYERROUTE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> compact_rows_cuda(const at::Tensor& mask);
void gather_rows_cuda(const at::Tensor& x, const at::Tensor& index, const at::Tensor& count,
                      at::Tensor& out);
void scatter_add_rows_cuda(at::Tensor& residual, const at::Tensor& src, const at::Tensor& index,
                           const at::Tensor& count);
#endif

}  // namespace layerroute
