// scatter_add_rows: residual[index[i]] += src[i] for the rows i below the device-side count.
#include <cstdint>

#include "kernels.h"
#include "utils.cuh"

namespace layerroute {
namespace {

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// One block per source row; kVec elements per access (16 bytes where alignment allows).
// Each element is added in fp32 and rounded once. The indices are unique (they come from
// compact_rows), so no two blocks write the same residual row and no atomics are needed.
// An index outside [0, n_res) is a caller bug: the row is skipped rather than written out of
// bounds (the CPU op reports it as an error).
template <typename T, int kVec>
__global__ void scatter_add_rows_kernel(T* __restrict__ residual, const T* __restrict__ src,
                                        const int32_t* __restrict__ index,
                                        const int32_t* __restrict__ count, int64_t n_res,
                                        int64_t d) {
  using P = Pack<T, kVec>;
  const int64_t row = blockIdx.x;
  if (row >= *count) return;
  const int64_t dst = index[row];
  if (dst < 0 || dst >= n_res) return;
  P* to = reinterpret_cast<P*>(residual + dst * d);
  const P* from = reinterpret_cast<const P*>(src + row * d);
  for (int64_t j = threadIdx.x; j < d / kVec; j += blockDim.x) {
    P acc = to[j];
    const P add = from[j];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      acc.v[k] = from_float<T>(to_float(acc.v[k]) + to_float(add.v[k]));
    }
    to[j] = acc;
  }
}

template <typename T>
cudaError_t launch(void* residual, const void* src, const int32_t* index, const int32_t* count,
                   int64_t n_res, int64_t m, int64_t d, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const uint64_t align = reinterpret_cast<uintptr_t>(residual) |
                         reinterpret_cast<uintptr_t>(src) | static_cast<uint64_t>(d * sizeof(T));
  const unsigned blocks = static_cast<unsigned>(m);
  if (align % 16 == 0) {
    scatter_add_rows_kernel<T, kVec><<<blocks, threads_for_row(d / kVec), 0, stream>>>(
        static_cast<T*>(residual), static_cast<const T*>(src), index, count, n_res, d);
  } else {
    scatter_add_rows_kernel<T, 1><<<blocks, threads_for_row(d), 0, stream>>>(
        static_cast<T*>(residual), static_cast<const T*>(src), index, count, n_res, d);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_scatter_add_rows(void* residual, const void* src, const int32_t* index,
                                    const int32_t* count, int64_t n_res, int64_t m, int64_t d,
                                    DType dtype, cudaStream_t stream) {
  if (m == 0 || d == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(residual, src, index, count, n_res, m, d, stream);
    case DType::kFloat16:
      return launch<__half>(residual, src, index, count, n_res, m, d, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(residual, src, index, count, n_res, m, d, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace layerroute
