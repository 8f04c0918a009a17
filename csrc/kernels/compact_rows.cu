// compact_rows: the positions of the true entries of a bool mask, in order, and their count,
// both written on the device.
#include "kernels.h"
#include "utils.cuh"

namespace layerroute {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kItems = 4;  // mask entries per thread per chunk

__device__ __forceinline__ int warp_inclusive_scan(int v) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, v, offset);
    if (lane >= offset) v += up;
  }
  return v;
}

// Exclusive prefix sum of `v` over the block in thread order; `*total` gets the block's sum.
// Two barriers suffice between calls: a warp only ever rereads its own `warp_sums` entry, and
// warp 0 rewrites the entries only after every warp has reached the next call's first barrier.
__device__ __forceinline__ int block_exclusive_scan(int v, int* total) {
  __shared__ int warp_sums[kMaxThreads / kWarpSize];
  __shared__ int block_sum;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;

  const int inclusive = warp_inclusive_scan(v);
  if (lane == kWarpSize - 1) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int sum = lane < n_warps ? warp_sums[lane] : 0;
    const int sums_inclusive = warp_inclusive_scan(sum);
    warp_sums[lane] = sums_inclusive - sum;
    if (lane == kWarpSize - 1) block_sum = sums_inclusive;
  }
  __syncthreads();
  *total = block_sum;
  return warp_sums[warp] + inclusive - v;
}

// One block walks the mask in chunks of blockDim.x * kItems entries. A true entry i goes to
// index[trues before i]; a false entry i writes -1 to index[n - 1 - falses before i], so the
// false entries fill the tail [count, n) in the same pass.
__global__ void compact_rows_kernel(const bool* __restrict__ mask, int32_t* __restrict__ index,
                                    int32_t* __restrict__ count, int64_t n) {
  int64_t trues_before_chunk = 0;
  for (int64_t base = 0; base < n; base += static_cast<int64_t>(blockDim.x) * kItems) {
    const int64_t first = base + static_cast<int64_t>(threadIdx.x) * kItems;
    bool set[kItems];
    int n_set = 0;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      set[k] = first + k < n && mask[first + k];
      n_set += set[k];
    }
    int chunk_total;
    int64_t trues_before = trues_before_chunk + block_exclusive_scan(n_set, &chunk_total);
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t i = first + k;
      if (i >= n) break;
      if (set[k]) {
        index[trues_before++] = static_cast<int32_t>(i);
      } else {
        index[n - 1 - (i - trues_before)] = -1;
      }
    }
    trues_before_chunk += chunk_total;
  }
  if (threadIdx.x == 0) *count = static_cast<int32_t>(trues_before_chunk);
}

}  // namespace

cudaError_t launch_compact_rows(const bool* mask, int32_t* index, int32_t* count, int64_t n,
                                cudaStream_t stream) {
  const int64_t warps = (n + kWarpSize * kItems - 1) / (kWarpSize * kItems);
  const int max_warps = kMaxThreads / kWarpSize;
  const int threads = static_cast<int>(warps < 1 ? 1 : (warps > max_warps ? max_warps : warps)) *
                      kWarpSize;
  compact_rows_kernel<<<1, threads, 0, stream>>>(mask, index, count, n);
  return cudaGetLastError();
}

}  // namespace layerroute
