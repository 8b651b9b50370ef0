#pragma once
// data_parallel: torch_dp::DataParallel, a torch::nn module that runs the module it wraps in parallel over
// devices, and torch_dp::data_parallel, a drop-in for torch::nn::parallel::data_parallel.

#include <torch_dp/data_parallel_options.h>
#include <torch_dp/detail/gather_outputs.h>
#include <torch_dp/detail/module_caller.h>
#include <torch_dp/detail/parallel_engine.h>
#include <torch_dp/detail/split_arguments.h>
#include <torch_dp/scattered_outputs.h>
#include <torch_dp/worker_pool.h>

#include <ATen/core/ivalue.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

namespace torch_dp {

namespace detail {

struct ReplicaSet;  // persistent replicas, data_parallel.cpp
struct TestAccess;  // test hooks, src/test_access.h

}  // namespace detail

/// Data parallelism for LibTorch: the input is split along `dim` into one chunk per device, the wrapped module
/// runs on each chunk in a replica on persistent worker threads, and the outputs are concatenated on
/// `output_device`.
///
/// Unlike torch::nn::parallel::data_parallel, replicas are built once (with clone()) and kept: the replica on
/// the module's own device is the module itself, others share its parameters' memory where they are on the
/// same device, and copies elsewhere are refreshed before every forward. Gradients reach the
/// wrapped module's parameters, BatchNorm statistics follow PyTorch's rule (the first replica's updates are
/// kept), grad mode and autocast reach the workers, and a failing replica is rethrown as a ReplicaError that
/// names it. The wrapped module must implement clone() (derive from torch::nn::Cloneable<Net>) when more than one
/// replica is used; a plain torch::nn::Module is refused then with a c10::Error that shows the fix, when the
/// DataParallel is built where its type shows it (Note [Plain modules]). One device that holds it needs no clone.
class DataParallelImpl : public torch::nn::Cloneable<DataParallelImpl> {
 public:
  explicit DataParallelImpl(detail::ModuleCaller module, DataParallelOptions options = {});

  explicit DataParallelImpl(torch::nn::AnyModule module, DataParallelOptions options = {})
      : DataParallelImpl(detail::ModuleCaller(std::move(module)), std::move(options)) {}

  template <typename ModuleType>
  explicit DataParallelImpl(std::shared_ptr<ModuleType> module, DataParallelOptions options = {})
      : DataParallelImpl(detail::ModuleCaller::of(std::move(module)), std::move(options)) {}

  template <typename ModuleType>
  explicit DataParallelImpl(torch::nn::ModuleHolder<ModuleType> module, DataParallelOptions options = {})
      : DataParallelImpl(detail::ModuleCaller::of(module.ptr()), std::move(options)) {}

  void reset() override;

  /// A DataParallel around a clone of the wrapped module (its replicas are built anew on first use).
  std::shared_ptr<torch::nn::Module> clone(const std::optional<c10::Device>& device = std::nullopt) const override;

  void pretty_print(std::ostream& stream) const override;

  /// The common case: one tensor in, one tensor out.
  at::Tensor forward(const at::Tensor& input) { return forward_as<at::Tensor>(input); }

  /// The general case. Tensor arguments, and tensors inside IValue arguments, are split; other arguments are
  /// given to every replica as they are. Tensors that hold one value per replica (expanded along dim, or one equal
  /// row per device) may give more chunks than the batch and are cut to the replicas that run, as upstream; any
  /// other difference in chunk counts is an error (Note [Which tensors set the batch]). Each replica calls the wrapped
  /// module's forward with its arguments, which must return ReturnType: a Tensor, std::vector<Tensor>, std::tuple of
  /// Tensors, or an IValue of tensors inside tuples, lists and dicts. The outputs are gathered on the output device.
  template <typename ReturnType = at::Tensor, typename... ArgumentTypes>
  ReturnType forward_as(const ArgumentTypes&... arguments);

  /// forward_as without its gather: the replicas' outputs stay on the devices that computed them, with those
  /// devices and their chunk sizes along dim, for a ParallelCriterion (the loss computed on the replicas, so that
  /// the output device never holds the whole output and its gradient). .gather() gives what forward_as returns.
  template <typename ReturnType = at::Tensor, typename... ArgumentTypes>
  ScatteredOutputs<ReturnType> forward_scattered(const ArgumentTypes&... arguments);

  /// The wrapped module (registered as the submodule "module", so parameters are named "module.<name>").
  std::shared_ptr<torch::nn::Module> module() const { return module_.ptr(); }

  /// The wrapped module as the type it was given as: module_as<NetImpl>() gives a std::shared_ptr<NetImpl>,
  /// module_as<Net>() (a module holder, TORCH_MODULE) a Net. Throws a c10::Error naming both types when the
  /// module is not a ModuleType. Code that expects the module's own interface takes it from here: it is the
  /// module itself, not a copy, so its members, submodules and weights are the ones DataParallel trains.
  template <typename ModuleType>
  auto module_as() const;

  /// Read when the DataParallel is made and by reset(): change them, then call reset().
  DataParallelOptions options;

  /// The devices forward uses (the options' devices, or every accelerator device); empty means a direct call.
  const std::vector<c10::Device>& devices() const { return engine_->devices(); }
  c10::Device output_device() const { return engine_->output_device(); }

  /// The worker pool the replicas run on; its settled_auto_issuing() says how Issuing::kAuto issues them.
  WorkerPool& pool() { return engine_->pool(); }

 private:
  /// Replica i for the first `count` replica devices, current (Note [C++ replicas]): the front-end's one hook.
  std::vector<detail::ModuleCaller*> replicas(size_t count);
  /// Split, replicate, run: the outputs of the replicas that ran, in order (forward_as less the gather).
  template <typename ReturnType, typename... ArgumentTypes>
  std::vector<ReturnType> replica_outputs(const ArgumentTypes&... arguments);
  friend struct detail::TestAccess;

  detail::ModuleCaller module_;
  std::shared_ptr<detail::ParallelEngine> engine_;  // devices, lock, pool, split and run (Note [One C++ engine])
  std::shared_ptr<detail::ReplicaSet> replica_set_;
};

TORCH_MODULE(DataParallel);

template <typename ModuleType>
auto DataParallelImpl::module_as() const {
  if constexpr (torch::detail::is_module_holder<ModuleType>::value) {
    return ModuleType(module_as<typename ModuleType::ContainedType>());
  } else {
    auto module = std::dynamic_pointer_cast<ModuleType>(module_.ptr());
    if (!module) {
      detail::throw_wrong_module_type(*module_.ptr(), typeid(ModuleType).name());
    }
    return module;
  }
}

template <typename ReturnType, typename... ArgumentTypes>
ReturnType DataParallelImpl::forward_as(const ArgumentTypes&... arguments) {
  if (devices().empty()) {
    return module_.forward<ReturnType>(arguments...);
  }
  auto outputs = replica_outputs<ReturnType>(arguments...);
  return detail::gather_outputs<ReturnType>(outputs, output_device(), engine_->options().dim());
}

template <typename ReturnType, typename... ArgumentTypes>
ScatteredOutputs<ReturnType> DataParallelImpl::forward_scattered(const ArgumentTypes&... arguments) {
  ScatteredOutputs<ReturnType> result;
  result.dim = engine_->options().dim();
  if (devices().empty()) {  // no device: the module's own output, where it is
    result.outputs.push_back(module_.forward<ReturnType>(arguments...));
    auto first = detail::first_tensor(result.outputs.front());
    result.output_device = first.defined() ? first.device() : c10::Device(c10::kCPU);
    result.devices = {result.output_device};
  } else {
    result.outputs = replica_outputs<ReturnType>(arguments...);
    const auto& used = engine_->replica_devices();
    result.devices.assign(used.begin(), used.begin() + result.outputs.size());
    result.output_device = output_device();
    result.pool = engine_->shared_pool();
    result.issuing = engine_->options().issuing();
    result.reproducible = engine_->options().reproducible();
  }
  result.fill_chunk_sizes();
  return result;
}

template <typename ReturnType, typename... ArgumentTypes>
std::vector<ReturnType> DataParallelImpl::replica_outputs(const ArgumentTypes&... arguments) {
  std::vector<at::Tensor> tensors;
  (detail::collect_argument(arguments, tensors), ...);
  return engine_->run<ReturnType>(
      tensors,
      // Braces, not make_tuple: the arguments take their chunks in order, and only a braced list orders its calls.
      [&](detail::SplitPlan& plan) { return std::tuple{detail::split_argument(arguments, plan)...}; },
      [&](size_t count) { return replicas(count); },
      [&](detail::ModuleCaller* replica, const auto& split, size_t i) {
        return std::apply(
            [&](const auto&... per_replica) {
              return replica->template forward<ReturnType>(detail::replica_argument(arguments, per_replica, i)...);
            },
            split);
      });
}

/// A drop-in for torch::nn::parallel::data_parallel with the same signature, on torch_dp's engine: replicas
/// are kept per module between calls instead of cloned on every call, and the module is not moved. `module`
/// is what upstream takes: a std::shared_ptr<M> or a module holder (Net, torch::nn::Linear, nn::Sequential).
/// `devices` defaults to every accelerator device; without one, the module is called directly.
template <typename ModuleType>
at::Tensor data_parallel(
    ModuleType module, at::Tensor input, std::optional<std::vector<c10::Device>> devices = std::nullopt,
    std::optional<c10::Device> output_device = std::nullopt, int64_t dim = 0);

namespace detail {
/// The cached DataParallel for a module (weakly keyed by the module), made or updated for these options.
DataParallel cached_data_parallel(const ModuleCaller& module, const DataParallelOptions& options);

/// The module behind what data_parallel accepts: a std::shared_ptr<M> or a module holder.
template <typename ModuleType>
std::shared_ptr<ModuleType> module_pointer(const std::shared_ptr<ModuleType>& module) {
  return module;
}
template <typename ModuleType>
std::shared_ptr<ModuleType> module_pointer(const torch::nn::ModuleHolder<ModuleType>& module) {
  return module.ptr();
}
}  // namespace detail

template <typename ModuleType>
at::Tensor data_parallel(
    ModuleType module, at::Tensor input, std::optional<std::vector<c10::Device>> devices,
    std::optional<c10::Device> output_device, int64_t dim) {
  DataParallelOptions options;
  if (devices) {
    options.devices(*devices);
  }
  options.output_device(output_device).dim(dim);
  return detail::cached_data_parallel(detail::ModuleCaller::of(detail::module_pointer(module)), options)
      ->forward(input);
}

}  // namespace torch_dp
