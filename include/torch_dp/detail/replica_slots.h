#pragma once
// The persistent replicas of one module over a device list, whatever a replica is (a torch::nn clone, a TorchScript
// copy): the one replica container behind DataParallel and ScriptReplicas. Users need not read it.

#include <torch_dp/replicate.h>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>

#include <algorithm>
#include <cstddef>
#include <utility>
#include <vector>

namespace torch_dp::detail {

/// One slot per replica device: slot j is the module itself where the Replicator says so (the first slot on the
/// module's device, PyTorch's replica 0), and otherwise a copy made once by the front-end's hook, whose parameters
/// and buffers are bound to the Replicator, which fills them in place before every call. A slot also pairs the
/// module's parts (submodules, objects) with the copy's, so that the front-end can carry across, before every call,
/// the state that is not a tensor (train()/eval(), attributes). Copies are made anew when the module's parameters
/// or buffers or the devices change.
template <typename Module, typename Part>
struct ReplicaSlots {
  struct Slot {
    Module module;                               // the module itself, or a copy
    std::vector<std::pair<Part*, Part*>> parts;  // (module's, copy's), pre-order; empty for the module itself
  };

  explicit ReplicaSlots(bool trust_version_counters) : replicator(trust_version_counters) {}

  /// Whether the slots are laid out for these parameters and buffers (the same tensor objects) and devices.
  bool holds(
      const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& buffers,
      at::ArrayRef<c10::Device> on) const {
    return devices.size() == on.size() && std::equal(devices.begin(), devices.end(), on.begin()) &&
           replicator.has_sources(params, buffers);
  }

  /// Drops every slot and lays the Replicator out for these sources and devices.
  void lay_out(std::vector<at::Tensor> params, std::vector<at::Tensor> buffers, at::ArrayRef<c10::Device> on) {
    slots.clear();
    devices.assign(on.begin(), on.end());
    replicator.set_sources(std::move(params), std::move(buffers));
    replicator.set_devices(devices);
  }

  /// Adds the next slot: `module` itself, or copy(slot, device), which sets slot.module and slot.parts and returns
  /// the copy's parameters and buffers (one per source, in order) for the Replicator to fill.
  template <typename Copy>
  void add(const Module& module, Copy&& copy) {
    const auto j = slots.size();
    Slot slot;
    if (replicator.uses_sources(j)) {
      slot.module = module;
    } else {
      replicator.bind(j, copy(slot, devices[j]));
    }
    slots.push_back(std::move(slot));
  }

  /// Refreshes the first `count` slots' tensors (with `differentiable`, copies route their gradients to the
  /// sources), then sync(slot, device) for each, in order.
  template <typename Sync>
  void refresh(size_t count, bool differentiable, Sync&& sync) {
    // Fills the copies' tensors in place; their values are read by the copies' forwards, not from the result.
    replicator.replicate(devices, count, differentiable);
    for (size_t j = 0; j < count; ++j) {
      sync(slots[j], devices[j]);
    }
  }

  Replicator replicator;
  std::vector<c10::Device> devices;
  std::vector<Slot> slots;
};

}  // namespace torch_dp::detail
