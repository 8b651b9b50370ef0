#pragma once
// The forward every data-parallel front-end shares (DataParallel, ScriptDataParallel, PackageDataParallel): the
// devices, the lock, the worker pool, the split plan, the run and the output device, written once (Note [One
// engine] in src/parallel_engine.cpp). Used by the front-ends' headers; users need not read it.

#include <torch_dp/data_parallel_options.h>
#include <torch_dp/detail/split_arguments.h>
#include <torch_dp/worker_pool.h>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace torch_dp::detail {

/// The devices a front-end's options name (every accelerator device when they name none), checked, and those
/// of them that run a replica (less those whose chunk size is 0). `first_may_be_empty`: the first device may have
/// a chunk size of 0 (not for a module's replicas, whose first is the module itself: Note [Empty chunks]).
struct ParallelDevices {
  std::vector<c10::Device> devices;
  std::vector<c10::Device> replica_devices;
};
ParallelDevices resolve_devices(const DataParallelOptions& options, bool first_may_be_empty = false);

/// Throws a c10::Error naming the device, the device count and the valid indices if a device or the output device
/// has an index past its type's device count. Types this build of torch has no runtime for are left alone.
void check_devices_exist(at::ArrayRef<c10::Device> devices, const std::optional<c10::Device>& output_device);

/// What sets a front-end's engine apart, besides its replicas and the kind of its arguments.
struct FrontEnd {
  explicit FrontEnd(std::string name_ = "DataParallel") : name(std::move(name_)) {}

  /// The front-end's name, in messages.
  std::string name;
  /// The first device may run no replica (chunk size 0): true where no replica is the wrapped model itself.
  bool first_may_be_empty = false;
  /// Whether DataParallelOptions::reproducible orders the replicas (false: a model without random ops to order).
  bool orders_random_ops = true;
  /// Sees the resolved devices before they are checked to exist (a package compares their type with its own).
  std::function<void(const std::vector<c10::Device>&)> check_devices;
};

/// Split, run the replicas, hand their outputs back: one forward of any front-end less its gather, with the state
/// it needs (the options, the resolved devices, the lock, the worker pool). The front-end supplies its replicas
/// and the kind of its arguments; run() strings them together (Note [One C++ engine]).
class ParallelEngine {
 public:
  explicit ParallelEngine(DataParallelOptions options, FrontEnd front_end = FrontEnd());
  ParallelEngine(const ParallelEngine&) = delete;
  ParallelEngine& operator=(const ParallelEngine&) = delete;

  const DataParallelOptions& options() const { return options_; }
  /// The devices forward uses (the options' devices, or every accelerator device); empty: a direct call.
  const std::vector<c10::Device>& devices() const { return devices_; }
  /// devices() less those whose chunk size is 0: replica i runs on replica_devices()[i].
  const std::vector<c10::Device>& replica_devices() const { return replica_devices_; }
  /// The options' output device, default devices()[0].
  c10::Device output_device() const;
  /// The worker pool the replicas run on; shared_pool() keeps it alive for as long as a ScatteredOutputs needs it.
  WorkerPool& pool() { return *pool_; }
  const std::shared_ptr<WorkerPool>& shared_pool() const { return pool_; }
  /// One forward at a time: the replicas are shared state.
  std::unique_lock<std::mutex> lock() { return std::unique_lock<std::mutex>(mutex_); }

  /// One forward, under the lock, its outputs in replica order:
  ///  - split(plan): the front-end's arguments cut by the plan made from `tensors` (every tensor among them, in
  ///    the order split hands their chunks out), one set per replica that runs;
  ///  - replicas(count): the front-end's replicas for the first `count` replica devices, made current (indexable,
  ///    replicas(count)[i] is replica i);
  ///  - call(replica, arguments, i): replica i run on its arguments, returning its Output.
  template <typename Output, typename Split, typename Replicas, typename Call>
  std::vector<Output> run(const std::vector<at::Tensor>& tensors, Split&& split, Replicas&& replicas, Call&& call);

 private:
  /// The split rule: every tensor argument chunked over the devices, as options and tensors say.
  SplitPlan split_plan(const std::vector<at::Tensor>& tensors) const;
  /// The issuing rule: task(i) for each of the first `count` replicas, as the options say (run_replicas).
  void issue(size_t count, const std::function<void(size_t)>& task);

  DataParallelOptions options_;
  FrontEnd front_end_;
  std::vector<c10::Device> devices_;
  std::vector<c10::Device> replica_devices_;
  std::mutex mutex_;
  std::shared_ptr<WorkerPool> pool_;
};

template <typename Output, typename Split, typename Replicas, typename Call>
std::vector<Output> ParallelEngine::run(
    const std::vector<at::Tensor>& tensors, Split&& split, Replicas&& replicas, Call&& call) {
  auto guard = lock();
  auto plan = split_plan(tensors);
  auto arguments = split(plan);
  const auto count = static_cast<size_t>(plan.count);
  auto current = replicas(count);
  std::vector<std::optional<Output>> results(count);
  issue(count, [&](size_t i) { results[i] = call(current[i], arguments, i); });
  guard.unlock();
  std::vector<Output> outputs;
  outputs.reserve(count);
  for (auto& result : results) {
    TORCH_INTERNAL_ASSERT(result.has_value(), "a replica did not run");
    outputs.push_back(std::move(*result));
  }
  return outputs;
}

}  // namespace torch_dp::detail
