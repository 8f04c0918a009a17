// gather_rows: out[i] = x[index[i]] for the rows i below the device-side count.
#include <cstdint>

#include "kernels.h"
#include "utils.cuh"

namespace layerroute {
namespace {

// One block per output row, copying the row as `Vec` words (16 bytes where alignment allows).
// An index outside [0, n_x) is a caller bug: the row is left alone rather than read out of
// bounds (the CPU op reports it as an error).
template <typename Vec>
__global__ void gather_rows_kernel(const Vec* __restrict__ x, const int32_t* __restrict__ index,
                                   const int32_t* __restrict__ count, Vec* __restrict__ out,
                                   int64_t n_x, int64_t row_vecs) {
  const int64_t row = blockIdx.x;
  if (row >= *count) return;
  const int64_t src = index[row];
  if (src < 0 || src >= n_x) return;
  const Vec* from = x + src * row_vecs;
  Vec* to = out + row * row_vecs;
  for (int64_t j = threadIdx.x; j < row_vecs; j += blockDim.x) to[j] = from[j];
}

template <typename Vec>
cudaError_t launch(const void* x, const int32_t* index, const int32_t* count, void* out,
                   int64_t n_x, int64_t m, int64_t row_bytes, cudaStream_t stream) {
  const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(Vec));
  gather_rows_kernel<Vec><<<static_cast<unsigned>(m), threads_for_row(row_vecs), 0, stream>>>(
      static_cast<const Vec*>(x), index, count, static_cast<Vec*>(out), n_x, row_vecs);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gather_rows(const void* x, const int32_t* index, const int32_t* count,
                               void* out, int64_t n_x, int64_t m, int64_t d, DType dtype,
                               cudaStream_t stream) {
  const int64_t row_bytes = d * (dtype == DType::kFloat32 ? 4 : 2);
  if (m == 0 || row_bytes == 0) return cudaSuccess;
  // The widest word that divides the row size and both base addresses.
  const uint64_t align = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(out) |
                         static_cast<uint64_t>(row_bytes);
  if (align % 16 == 0) return launch<uint4>(x, index, count, out, n_x, m, row_bytes, stream);
  if (align % 8 == 0) return launch<uint2>(x, index, count, out, n_x, m, row_bytes, stream);
  if (align % 4 == 0) return launch<uint32_t>(x, index, count, out, n_x, m, row_bytes, stream);
  return launch<uint16_t>(x, index, count, out, n_x, m, row_bytes, stream);
}

}  // namespace layerroute
