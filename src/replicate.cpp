#include <torch_dp/replicate.h>

#include "message.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

// Note [Persistent replicas]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~
// torch.nn.DataParallel rebuilds every replica on every forward: it broadcasts every parameter and buffer and
// copies every submodule, even when nothing changed since the last step. The Replicator keeps, per replica
// slot, what that slot needs:
//  - On a parameter's own device there is nothing to copy: the replica uses the parameter itself. Its gradient
//    then accumulates straight into the original's .grad, which is the sum over replicas that PyTorch's
//    broadcast backward computes, with no reduction step at all. (With device_ids=[0, 0] or ["cpu"] * 4,
//    every replica is on the source device, so replication costs nothing but a few version checks.)
//  - Buffers are updated in place by forward (BatchNorm's running statistics). PyTorch keeps replica 0's
//    updates, because replica 0 aliases the original buffers, and drops the others'. The first slot on the
//    source device therefore uses the original buffers; every other slot gets private copies, brought back to
//    the source's values before each forward (Note [Coalesced copies], Note [Stale copies]).
//  - Copies on other devices are cached the same way and wrapped, per call, in one broadcast autograd node
//    (Note [Broadcast grad]) so their gradients are reduce-added onto the source device.

namespace torch_dp {

void Replicator::set_sources(std::vector<at::Tensor> params, std::vector<at::Tensor> buffers) {
  for (size_t k = 0; k < params.size(); ++k) {
    TORCH_DP_CHECK(params[k].defined(), "replicate: parameter ", k, " is undefined");
  }
  for (size_t k = 0; k < buffers.size(); ++k) {
    TORCH_DP_CHECK(buffers[k].defined(), "replicate: buffer ", k, " is undefined");
  }
  params_ = std::move(params);
  buffers_ = std::move(buffers);
  devices_.clear();
  slots_.clear();
  changed_.clear();
}

void Replicator::check_device(c10::Device expected) const {
  for (const auto* list : {&params_, &buffers_}) {
    for (const auto& t : *list) {
      TORCH_DP_CHECK(
          t.device() == expected, "module must have its parameters and buffers on device ", expected.str(),
          " (device_ids[0]) but found one of them on device: ", t.device().str());
    }
  }
}

void Replicator::build_slots(at::ArrayRef<c10::Device> devices) {
  slots_.clear();
  const size_t num_params = params_.size();
  const size_t total = num_params + buffers_.size();
  for (size_t j = 0; j < devices.size(); ++j) {
    Slot slot;
    slot.device = devices[j];
    const bool first_on_device = std::find(devices.begin(), devices.begin() + j, devices[j]) == devices.begin() + j;
    slot.copy_index.assign(total, -1);
    for (size_t k = 0; k < total; ++k) {
      const auto& source = k < num_params ? params_[k] : buffers_[k - num_params];
      const bool param_like = k < num_params || source.requires_grad();
      const bool shared = source.device() == slot.device &&
          (copy_everything_ ? first_on_device : (param_like || first_on_device));
      if (!shared) {
        slot.copy_index[k] = static_cast<int64_t>(slot.copied_sources.size());
        slot.copied_sources.push_back(source);
      }
    }
    if (!slot.copied_sources.empty()) {
      slot.copies.emplace(slot.copied_sources, slot.device, trust_version_counters_);
    }
    slots_.push_back(std::move(slot));
  }
  devices_.assign(devices.begin(), devices.end());
}

std::vector<std::vector<at::Tensor>> Replicator::replicate(
    at::ArrayRef<c10::Device> devices, size_t num_slots, bool differentiable) {
  TORCH_DP_CHECK(
      num_slots <= devices.size(), "replicate: asked for ", num_slots, " replicas but only ", devices.size(),
      " devices were given");
  if (devices_.size() != devices.size() || !std::equal(devices_.begin(), devices_.end(), devices.begin())) {
    build_slots(devices);
  }
  const size_t num_params = params_.size();
  const size_t total = num_params + buffers_.size();
  std::vector<std::vector<at::Tensor>> result(num_slots);
  for (size_t j = 0; j < num_slots; ++j) {
    auto& slot = slots_[j];
    if (slot.copies && !slot.copies->refresh(slot.copied_sources)) {
      // A source changed shape, dtype or layout (`module.double()`, `.data = ...`): lay the copies out anew.
      slot.copies.emplace(slot.copied_sources, slot.device, trust_version_counters_);
      slot.copies->refresh(slot.copied_sources);
    }
    auto& tensors = result[j];
    tensors.reserve(total);
    for (size_t k = 0; k < total; ++k) {
      const auto index = slot.copy_index[k];
      if (index < 0) {
        tensors.push_back(k < num_params ? params_[k] : buffers_[k - num_params]);
      } else {
        tensors.push_back(slot.copies->copies()[static_cast<size_t>(index)]);
      }
    }
  }

  if (differentiable && c10::GradMode::is_enabled()) {
    // Copies of tensors that require grad get a broadcast node, shared by every slot that copies them.
    std::vector<size_t> needs_grad;
    for (size_t k = 0; k < total; ++k) {
      const auto& source = k < num_params ? params_[k] : buffers_[k - num_params];
      if (source.requires_grad()) {
        needs_grad.push_back(k);
      }
    }
    std::vector<size_t> cross_slots;
    for (size_t j = 0; j < num_slots && !needs_grad.empty(); ++j) {
      if (slots_[j].copy_index[needs_grad[0]] >= 0) {
        cross_slots.push_back(j);  // a slot copies all tensors that require grad or none (it is off-device)
      }
    }
    if (!cross_slots.empty()) {
      std::vector<at::Tensor> sources(params_);
      sources.insert(sources.end(), buffers_.begin(), buffers_.end());
      detail::attach_broadcast_grad(result, sources, needs_grad, cross_slots);
    }
  }

  changed_.assign(num_slots, false);
  for (size_t j = 0; j < num_slots; ++j) {
    auto& last = slots_[j].last;
    bool same = last.size() == result[j].size();
    for (size_t k = 0; same && k < last.size(); ++k) {
      same = last[k].unsafeGetTensorImpl() == result[j][k].unsafeGetTensorImpl();
    }
    changed_[j] = !same;
    if (!same) {
      last = result[j];
    }
  }
  return result;
}

} // namespace torch_dp
