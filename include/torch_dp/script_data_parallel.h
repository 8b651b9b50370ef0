#pragma once
// script_data_parallel: data parallelism for TorchScript modules (torch::jit::load, torch.jit.script):
// torch_dp::ScriptDataParallel, with DataParallel's options, and ScriptReplicas, the persistent replicas behind it
// and behind the Python package's DataParallel over a ScriptModule.

#include <torch_dp/data_parallel_options.h>
#include <torch_dp/detail/replica_slots.h>
#include <torch_dp/parallel_apply.h>
#include <torch_dp/replicate.h>

#include <ATen/core/ivalue.h>
#include <c10/core/Device.h>
#include <torch/csrc/jit/api/module.h>

#include <cstddef>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace torch_dp {

namespace detail {
struct TestAccess;  // torch_dp's own tests, src/test_access.h
}  // namespace detail

/// Persistent replicas of a TorchScript module over a device list (Note [TorchScript replicas] in
/// script_data_parallel.cpp). The first slot on the module's device is the module itself; every other slot is a
/// deep copy of it, made once, whose parameters and buffers the Replicator fills in place before every call
/// (shared memory on the module's device, refreshed copies elsewhere, gradients routed to the module's
/// parameters), and whose other attributes (the `training` flags, ints, floats, tensors that are not buffers)
/// are copied from the module's on every call. Replaced parameters, buffers or submodules make the copies anew.
class ScriptReplicas {
 public:
  explicit ScriptReplicas(bool trust_version_counters = false) : slots_(trust_version_counters) {}

  /// Makes the replicas of `module` for `devices` anew if the module, its submodules, parameters or buffers, or
  /// the devices changed since the last call.
  void sync(const torch::jit::Module& module, at::ArrayRef<c10::Device> devices);

  /// Throws, with PyTorch's DataParallel message, if the module's parameters and buffers are not on `expected`.
  void check_device(c10::Device expected) const { slots_.replicator.check_device(expected); }

  /// The replicas for the first `count` devices of the last sync(), current. `differentiable`: with grad mode on,
  /// copies route their gradients to the module's parameters.
  std::vector<torch::jit::Module> get(size_t count, bool differentiable);

  /// Whether slot j's replica is the module itself (the first slot on the module's device).
  bool uses_module(size_t slot) const { return slots_.replicator.uses_sources(slot); }

  /// How many times the replicas were made (anew); a caller that wraps them (Python) wraps them again when it moved.
  size_t generation() const { return generation_; }

 private:
  friend struct detail::TestAccess;
  bool needs_build(const torch::jit::Module& module, at::ArrayRef<c10::Device> devices) const;

  detail::ReplicaSlots<torch::jit::Module, c10::ivalue::Object> slots_;  // copies' objects paired with the module's
  std::vector<c10::ivalue::Object*> objects_;  // the module's submodule objects when built, pre-order
  size_t generation_ = 0;
};

/// DataParallel for a TorchScript module: a loaded torch::jit::Module runs over several devices, with the C++
/// module's options and contract. The input is split along `dim` into one chunk per device, each replica runs
/// the module's forward on its chunk on persistent worker threads, and the outputs are concatenated on the output
/// device. Replicas persist between calls (ScriptReplicas): every change to the module between calls (weights,
/// by an optimizer or in place, train()/eval(), attributes, replaced parameters) is seen by the next call;
/// gradients reach the module's own parameters, and BatchNorm statistics follow PyTorch's rule (the first
/// replica's updates are kept).
///
///     auto module = torch::jit::load("model.pt");
///     torch_dp::ScriptDataParallel parallel(module, torch_dp::DataParallelOptions({torch::kCUDA, ...}));
///     auto output = parallel.forward({input}).toTensor();
///
/// Like a jit::Module, a ScriptDataParallel is a handle: copies share the module, the replicas and the workers.
class ScriptDataParallel {
 public:
  explicit ScriptDataParallel(torch::jit::Module module, DataParallelOptions options = {});

  /// The module's forward over the devices. Tensors among the inputs and keyword arguments, alone or inside
  /// tuples, lists and dicts, are split; anything else is given to every replica as it is. The outputs (tensors
  /// inside tuples, lists and dicts) are gathered on the output device.
  c10::IValue forward(const std::vector<c10::IValue>& inputs, const torch::jit::Kwargs& kwargs = {});

  /// The common case: one tensor in, one tensor out.
  at::Tensor forward(const at::Tensor& input) { return forward(std::vector<c10::IValue>{input}).toTensor(); }

  /// The module's train()/eval(), seen by every replica at the next call.
  void train(bool on = true) { module().train(on); }
  void eval() { train(false); }
  bool is_training() const { return module().is_training(); }

  /// The wrapped module itself (not a copy): load weights into it, give its parameters to an optimizer.
  torch::jit::Module& module() const;
  /// The module's parameters, for an optimizer.
  std::vector<at::Tensor> parameters() const;

  const DataParallelOptions& options() const;
  /// The devices forward uses; empty: forward calls the module directly.
  const std::vector<c10::Device>& devices() const;
  c10::Device output_device() const;
  WorkerPool& pool();

 private:
  friend struct detail::TestAccess;
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace torch_dp
