#pragma once
// data_parallel_options: DataParallelOptions, the options every data-parallel front-end takes (DataParallel,
// ScriptDataParallel, PackageDataParallel).

#include <torch_dp/worker_pool.h>

#include <c10/core/Device.h>
#include <torch/arg.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace torch_dp {

/// Options for DataParallel.
struct DataParallelOptions {
  DataParallelOptions() = default;
  /* implicit */ DataParallelOptions(std::vector<c10::Device> devices) : devices_(std::move(devices)) {}

  /// The replicas' devices, repeats allowed (several replicas per device) and CPU allowed. Empty: every
  /// accelerator device; without any accelerator, forward calls the module directly.
  TORCH_ARG(std::vector<c10::Device>, devices);
  /// Where the outputs are gathered; default devices[0].
  TORCH_ARG(std::optional<c10::Device>, output_device) = std::nullopt;
  /// The dimension inputs are split along and outputs concatenated along.
  TORCH_ARG(int64_t, dim) = 0;
  /// Rows per device instead of torch.chunk's split (one per device, adding up to the batch). A device whose
  /// size is 0 runs no replica; the first device's size must not be 0 (its replica is the module itself).
  TORCH_ARG(std::optional<std::vector<int64_t>>, chunk_sizes) = std::nullopt;
  /// How replicas are run: kThreads (at once, on persistent worker threads), kSerial (one after another on the
  /// calling thread) or kAuto: threads across devices, and for replicas sharing one device whichever of the
  /// two was faster over the first forwards (Note [Issuing replicas]).
  TORCH_ARG(Issuing, issuing) = Issuing::kAuto;
  /// Opt-in, for inference on several devices: copy the module's tensors to a replica again only when their
  /// version counter or data pointer moved. Off by default because writes that move neither are missed:
  /// fused optimizers (`fused=true`), BatchNorm's running statistics updated by the module itself, edits
  /// through `.data()` or a raw pointer (Note [Stale copies]).
  TORCH_ARG(bool, trust_version_counters) = false;
  /// Two runs with the same seed give bitwise equal results, random ops in the forward (dropout) included:
  /// replicas sharing a device run one after another in index order (on the calling thread for the first
  /// device), so they draw from the device's generator as the chunks run one after another would; distinct
  /// devices still run at once, and Issuing::kAuto measures nothing (Note [Reproducible replicas]).
  TORCH_ARG(bool, reproducible) = false;
};

}  // namespace torch_dp
