#pragma once
// package_data_parallel: torch_dp::PackageDataParallel, data-parallel inference over an AOTInductor package
// (.pt2, torch._inductor.aoti_compile_and_package), with DataParallel's options.

#include <torch_dp/data_parallel_options.h>
#include <torch_dp/parallel_apply.h>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>

#include <cstddef>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace torch_dp {

/// Data-parallel inference over an AOTInductor package (a .pt2 file written by
/// torch._inductor.aoti_compile_and_package): every input is split along `dim` into one chunk per device, as
/// DataParallel splits its inputs, each chunk runs through the package's compiled model on persistent worker
/// threads, and the outputs are concatenated on the output device.
///
///     torch_dp::PackageDataParallel parallel("model.pt2", torch_dp::DataParallelOptions({torch::kCPU, torch::kCPU}));
///     at::Tensor output = parallel.forward(input);                    // one tensor in, one out
///     std::vector<at::Tensor> outputs = parallel.forward({a, b});     // the package's flat inputs and outputs
///
/// The package is loaded once per device in the list (torch::inductor::AOTIModelPackageLoader; CUDA device i as
/// device_index i), when the PackageDataParallel is made, and the loaders are kept for its lifetime. A package runs
/// on the device type it was compiled for: a CPU package on "cpu" entries (several allowed: each runs its own
/// loader on its own thread), a CUDA package on CUDA devices. The constructor checks this before anything is loaded,
/// and throws a c10::Error naming the file when it is missing, is not an AOTInductor package, or fails to load
/// (for example, compiled by another torch).
///
/// Inference only: a package holds no autograd graph, so its outputs never require grad. A forward with grad mode
/// on and an input that requires grad throws instead of silently dropping the gradient; call it under
/// torch::NoGradGuard (or on detached inputs). Forward itself runs under no-grad.
///
/// Like a loader shared between threads, one PackageDataParallel serves one forward at a time; concurrent calls
/// wait for each other. Copies share the loaders and the workers.
class PackageDataParallel {
 public:
  /// Loads the package at `path` (its model "model") on every device of `options`. Empty devices: the CPU for a CPU
  /// package, every accelerator device otherwise. `options.trust_version_counters` and `options.reproducible` have
  /// no effect (a package has no weights to refresh and no random ops to order). `options.chunk_sizes` may give the
  /// first device 0 rows too (every device's loader is its own; DataParallel's first replica is the module itself).
  explicit PackageDataParallel(const std::string& path, DataParallelOptions options = {});

  /// The package's flat inputs (as AOTIModelPackageLoader::run takes them), each split along dim; the package's
  /// flat outputs, each gathered along dim on the output device. A device whose chunk is empty (chunk_sizes with a
  /// 0, or a batch smaller than the device count) runs nothing.
  std::vector<at::Tensor> forward(const std::vector<at::Tensor>& inputs);

  /// The common case: one tensor in, one tensor out.
  at::Tensor forward(const at::Tensor& input);

  /// The package's file, as given.
  const std::string& path() const;
  /// The package's metadata (AOTIModelPackageLoader::get_metadata()), e.g. "AOTI_DEVICE_KEY": "cpu".
  const std::unordered_map<std::string, std::string>& metadata() const;
  /// The serialized pytree specs of the inputs and outputs of the exported module (get_call_spec()).
  const std::vector<std::string>& call_spec() const;
  /// The device type the package was compiled for.
  c10::DeviceType package_device_type() const;

  const DataParallelOptions& options() const;
  /// The devices the package was loaded on, one loader each.
  const std::vector<c10::Device>& devices() const;
  c10::Device output_device() const;
  /// The worker pool the loaders run on.
  WorkerPool& pool();

  /// How many loaders this PackageDataParallel has made: devices().size(), however many forwards ran.
  size_t num_loads() const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

namespace detail {
/// The metadata of the AOTInductor package at `path`, read without loading it; a c10::ValueError when the file is
/// missing or is not a package.
std::unordered_map<std::string, std::string> read_package_metadata(const std::string& path);
/// A c10::ValueError naming both device types unless every device is of the type the package was compiled for.
void check_package_devices(
    const std::string& path, const std::unordered_map<std::string, std::string>& metadata,
    at::ArrayRef<c10::Device> devices);
}  // namespace detail

}  // namespace torch_dp
