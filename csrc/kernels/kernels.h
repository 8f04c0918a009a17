// Launcher API of the CUDA kernels: raw pointers, sizes, a dtype tag and a stream.
// No torch headers here or in the .cu files, so nvcc compiles each kernel file on its own;
// the torch wrappers in csrc/ops_cuda.cpp validate tensors and call these.
//
// Row counts live in device memory (`count`, one int32): kernels read it on the device and
// programs past it exit at once, so nothing here syncs with the host and every launch has a
// fixed shape that a CUDA graph can capture.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace layerroute {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// index[0:count) = ascending positions i with mask[i] true, index[count:n) = -1, *count set.
// n may be 0. One block, no host sync.
cudaError_t launch_compact_rows(const bool* mask, int32_t* index, int32_t* count, int64_t n,
                                cudaStream_t stream);

// out[i, :] = x[index[i], :] for i < *count (rows i >= *count untouched).
// x: [n_x, d], out: [m, d], both contiguous, same dtype. index[i] must lie in [0, n_x).
cudaError_t launch_gather_rows(const void* x, const int32_t* index, const int32_t* count,
                               void* out, int64_t n_x, int64_t m, int64_t d, DType dtype,
                               cudaStream_t stream);

// residual[index[i], :] += src[i, :] for i < *count, accumulated in fp32, rounded once.
// residual: [n_res, d], src: [m, d], both contiguous, same dtype; the indices are unique.
cudaError_t launch_scatter_add_rows(void* residual, const void* src, const int32_t* index,
                                    const int32_t* count, int64_t n_res, int64_t m, int64_t d,
                                    DType dtype, cudaStream_t stream);

}  // namespace layerroute
