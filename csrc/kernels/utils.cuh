// Small helpers shared by the kernel files (plain CUDA, no torch headers).
#pragma once

namespace layerroute {

constexpr int kWarpSize = 32;

}  // namespace layerroute
