// The device implementations of the layerroute ops, registered in torch_bindings.cpp.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace layerroute {

std::tuple<at::Tensor, at::Tensor> compact_rows_cpu(const at::Tensor& mask);

#ifdef LAYERROUTE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> compact_rows_cuda(const at::Tensor& mask);
#endif

}  // namespace layerroute
