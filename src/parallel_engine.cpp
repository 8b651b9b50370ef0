#include <torch_dp/detail/parallel_engine.h>

#include "message.h"

#include <torch_dp/parallel_apply.h>

#include <ATen/DeviceAccelerator.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <string>
#include <utility>

// Note [One C++ engine]
// ~~~~~~~~~~~~~~~~~~~~~
// DataParallel, ScriptDataParallel and PackageDataParallel run one pipeline: resolve and check the devices once,
// then for every forward, one at a time, plan the split of every tensor argument, cut the arguments, make the
// replicas current, run them as the issuing rules say, and gather. ParallelEngine holds everything of it that
// does not depend on what a replica is:
//  - the options, the devices they resolve to and those that run a replica (resolve_devices,
//    check_devices_exist), and the output device;
//  - the lock (one forward at a time: the replicas are shared state) and the worker pool, which a
//    ScatteredOutputs keeps alive after the forward;
//  - the split rule (split_plan: the chunk sizes and dim of the options over the devices, detail::plan_split in
//    scatter) and the issuing rule (issue: run_replicas with the options' issuing and reproducible);
//  - the order of the steps (run).
// A front-end supplies only what is its own, the way torch's BatchNormImplBase variants override one hook:
//  - its replicas, "replica i" for the first count replica devices, made current: the module itself and clones
//    bound to a Replicator (DataParallel, Note [C++ replicas]), the module itself and deep copies (ScriptDataParallel,
//    Note [TorchScript replicas]), one loaded package per device (PackageDataParallel, Note [Package replicas]).
//    Checking that the module is on the first device belongs here, before the replicas are laid out;
//  - the kind of its arguments and how they are cut (typed arguments, IValues and keyword arguments, flat tensors)
//    and how replica i is called on its share;
//  - what FrontEnd says: its name in messages, whether its first device may run nothing (a package's loaders are
//    all its own; a module's first replica is the module itself), whether `reproducible` applies, and a check of
//    the resolved devices before they are checked to exist (a package's device type);
//  - the gather of its outputs and its direct call when there is no device.
// A change to how a batch is split or how replicas are issued is made in split_plan or issue, and every front-end
// follows. The Python front-ends, whose replicas are Python modules, have their own engine on the same C++ steps
// (Note [One engine] in python/torch_dp/engine.py).

namespace torch_dp::detail {

// A device index past the device count is refused when the options are given, as the Python package refuses it,
// rather than failing inside the first forward (as the backend's error, after replicas ran, or on CUDA as
// "invalid device ordinal"). A device type this build of torch has no runtime for is left to the caller's own
// checks. Not part of resolve_devices: PackageDataParallel first compares the types with its package's.
void check_devices_exist(at::ArrayRef<c10::Device> devices, const std::optional<c10::Device>& output_device) {
  auto check = [](const c10::Device& device, const char* what) {
    if (device.is_cpu() || !device.has_index() || !c10::impl::hasDeviceGuardImpl(device.type())) {
      return;
    }
    const auto count = c10::impl::VirtualGuardImpl(device.type()).deviceCount();
    const auto type = c10::DeviceTypeName(device.type(), /*lower_case=*/true);
    TORCH_DP_CHECK(
        device.index() < count, "DataParallel: ", what, " ", device.str(), " does not exist: this machine has ", count,
        " ", type, " device(s)", count > 0 ? ", indices 0 to " + std::to_string(count - 1) : std::string());
  };
  for (const auto& device : devices) {
    check(device, "device");
  }
  if (output_device) {
    check(*output_device, "output_device");
  }
}

ParallelDevices resolve_devices(const DataParallelOptions& options, bool first_may_be_empty) {
  ParallelDevices result;
  result.devices = options.devices();
  if (result.devices.empty()) {
    // Every accelerator device, as torch.nn.DataParallel does; none: forward calls the module directly.
    if (auto accelerator = at::getAccelerator(false)) {
      c10::impl::VirtualGuardImpl impl(*accelerator);
      for (c10::DeviceIndex i = 0; i < impl.deviceCount(); ++i) {
        result.devices.emplace_back(*accelerator, i);
      }
    }
  }
  for (const auto& device : result.devices) {
    TORCH_DP_CHECK(
        device.is_cpu() || device.has_index(), "DataParallel: device ", device.str(),
        " has no index; give every accelerator device an index, e.g. cuda:0");
  }
  result.replica_devices = result.devices;
  if (options.chunk_sizes()) {
    const auto& sizes = *options.chunk_sizes();
    TORCH_DP_CHECK(
        sizes.size() == result.devices.size(), "DataParallel: expected one chunk size per ", "device (",
        result.devices.size(), " devices), but got ", sizes.size(), " chunk sizes");
    for (size_t i = 0; i < sizes.size(); ++i) {
      TORCH_DP_CHECK(
          sizes[i] >= 0, "DataParallel: chunk sizes must be non-negative, but chunk ", i, " has size ", sizes[i]);
    }
    // Note [Empty chunks] (python/torch_dp/arguments.py): a device whose size is 0 runs no replica, except the
    // first, whose replica is the module itself and keeps its buffer updates.
    TORCH_DP_CHECK(
        first_may_be_empty || sizes.empty() || sizes[0] > 0,
        "DataParallel: the first chunk size must not be 0, but got ", sizes,
        ": the first device's replica is the module itself, which keeps its buffer updates ",
        "(BatchNorm's running statistics); give it at least one row (a 0 is allowed for the other ",
        "devices, which then run no replica)");
    result.replica_devices.clear();
    for (auto i : devices_that_run(sizes, result.devices.size())) {
      result.replica_devices.push_back(result.devices[i]);
    }
  }
  return result;
}

ParallelEngine::ParallelEngine(DataParallelOptions options, FrontEnd front_end)
    : options_(std::move(options)), front_end_(std::move(front_end)), pool_(std::make_shared<WorkerPool>()) {
  auto resolved = resolve_devices(options_, front_end_.first_may_be_empty);
  if (front_end_.check_devices) {
    front_end_.check_devices(resolved.devices);
  }
  check_devices_exist(resolved.devices, options_.output_device());
  devices_ = std::move(resolved.devices);
  replica_devices_ = std::move(resolved.replica_devices);
}

c10::Device ParallelEngine::output_device() const {
  if (options_.output_device()) {
    return *options_.output_device();
  }
  TORCH_DP_CHECK(!devices_.empty(), front_end_.name, ": no devices");
  return devices_[0];
}

SplitPlan ParallelEngine::split_plan(const std::vector<at::Tensor>& tensors) const {
  SplitPlan plan;
  plan.devices = devices_;
  plan.sizes = options_.chunk_sizes();
  plan.dim = options_.dim();
  // Without tensor arguments, every device that runs a replica runs one on the same arguments.
  plan_split(plan, tensors);
  return plan;
}

void ParallelEngine::issue(size_t count, const std::function<void(size_t)>& task) {
  run_replicas(
      *pool_, at::ArrayRef<c10::Device>(replica_devices_).slice(0, count), task, options_.issuing(),
      front_end_.orders_random_ops && options_.reproducible());
}

}  // namespace torch_dp::detail
