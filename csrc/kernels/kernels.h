// Launcher API of the CUDA kernels: raw pointers, sizes and a stream.
// No torch headers here or in the .cu files, so nvcc compiles each kernel file on its own;
// the torch wrappers in csrc/ops_cuda.cpp validate tensors and call these.
//
// Row counts live in device memory (`count`, one int32), written there by the kernel, so
// nothing here syncs with the host and every launch has a fixed shape that a CUDA graph can
// capture.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace layerroute {

// index[0:count) = ascending positions i with mask[i] true, index[count:n) = -1, *count set.
// n may be 0. One block, no host sync.
cudaError_t launch_compact_rows(const bool* mask, int32_t* index, int32_t* count, int64_t n,
                                cudaStream_t stream);

}  // namespace layerroute
