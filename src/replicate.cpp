#include <torch_dp/replicate.h>

#include "message.h"
#include "test_access.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <algorithm>

// Note [Persistent replicas]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~
// torch.nn.DataParallel rebuilds every replica on every forward: it broadcasts every parameter and buffer and
// copies every submodule, even when nothing changed since the last step. The Replicator keeps, per replica
// slot, what that slot needs:
//  - On a parameter's own device there is nothing to copy: the replica uses the parameter itself. Its gradient
//    then accumulates straight into the original's .grad, which is the sum over replicas that PyTorch's
//    broadcast backward computes, with no reduction step at all. (With device_ids=[0, 0] or ["cpu"] * 4,
//    every replica is on the source device, so replication costs nothing but a few version checks.) Where other
//    devices hold copies as well ([0, 0, 1, 1]), only the first of those replicas adds into .grad directly, and
//    the others' gradients go through the broadcast node (Note [Gradients summed in slot order]).
//  - Buffers are updated in place by forward (BatchNorm's running statistics). PyTorch keeps replica 0's
//    updates, because replica 0 aliases the original buffers, and drops the others'. The first slot on the
//    source device therefore uses the original buffers; every other slot gets private copies, brought back to
//    the source's values before each forward (Note [Coalesced copies], Note [Stale copies]).
//  - Copies on other devices are cached the same way and wrapped, per call, in one broadcast autograd node
//    (Note [Broadcast grad]) so their gradients are reduce-added onto the source device.
// The same engine serves the C++ module, whose replicas are clones reading their own member tensors: a clone's
// slot is bound to those tensors, which the engine points at the sources' memory (set_data) or at the copies',
// and which carry the broadcast node themselves (Note [C++ replicas] in data_parallel.cpp).

namespace torch_dp {

namespace {

bool same_objects(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(), [](const at::Tensor& x, const at::Tensor& y) {
    return x.unsafeGetTensorImpl() == y.unsafeGetTensorImpl();
  });
}

}  // namespace

bool Replicator::has_sources(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& buffers) const {
  return same_objects(params, params_) && same_objects(buffers, buffers_);
}

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

void detail::check_module_device(at::TensorList params, at::TensorList buffers, c10::Device expected) {
  for (const auto list : {params, buffers}) {
    for (const auto& t : list) {
      TORCH_DP_CHECK(
          t.device() == expected, "module must have its parameters and buffers on device ", expected.str(),
          " (device_ids[0]) but found one of them on device: ", t.device().str());
    }
  }
}

void Replicator::check_device(c10::Device expected) const {
  detail::check_module_device(params_, buffers_, expected);
}

void Replicator::set_devices(at::ArrayRef<c10::Device> devices) {
  if (devices_.size() == devices.size() && std::equal(devices_.begin(), devices_.end(), devices.begin())) {
    return;
  }
  slots_.clear();
  changed_.clear();
  const size_t total = params_.size() + buffers_.size();
  for (size_t j = 0; j < devices.size(); ++j) {
    Slot slot;
    slot.device = devices[j];
    slot.first_on_device = std::find(devices.begin(), devices.begin() + j, devices[j]) == devices.begin() + j;
    slot.copy_index.assign(total, -1);
    for (size_t k = 0; k < total; ++k) {
      const bool param_like = k < params_.size() || source(k).requires_grad();
      const bool shared = source(k).device() == slot.device &&
                          (copy_everything_ ? slot.first_on_device : (param_like || slot.first_on_device));
      if (!shared) {
        slot.copy_index[k] = static_cast<int64_t>(slot.copied_sources.size());
        slot.copied_sources.push_back(source(k));
      }
    }
    lay_out_copies(slot);
    slots_.push_back(std::move(slot));
  }
  devices_.assign(devices.begin(), devices.end());
}

bool Replicator::uses_sources(size_t slot) const {
  TORCH_DP_CHECK(slot < slots_.size(), "Replicator: slot ", slot, " does not exist (", slots_.size(), " slots)");
  return slots_[slot].first_on_device && slots_[slot].copied_sources.empty();
}

void Replicator::bind(size_t slot_index, std::vector<at::Tensor> tensors) {
  TORCH_DP_CHECK(
      slot_index < slots_.size(), "Replicator: slot ", slot_index, " does not exist (", slots_.size(), " slots)");
  const size_t total = params_.size() + buffers_.size();
  TORCH_DP_CHECK(
      tensors.size() == total, "Replicator::bind: expected ", total, " tensors (", params_.size(), " parameters and ",
      buffers_.size(), " buffers), got ", tensors.size());
  auto& slot = slots_[slot_index];
  slot.bound = std::move(tensors);
  slot.last.clear();
  lay_out_copies(slot);
}

void Replicator::lay_out_copies(Slot& slot) {
  if (slot.copied_sources.empty()) {
    return;
  }
  slot.copies.emplace(slot.copied_sources, slot.device, trust_version_counters_);
  if (!slot.bound.empty()) {
    std::vector<at::Tensor> aliases;
    for (size_t k = 0; k < slot.bound.size(); ++k) {
      if (slot.copy_index[k] >= 0) {
        aliases.push_back(slot.bound[k]);
      }
    }
    slot.copies->bind(std::move(aliases));
  }
}

void Replicator::refresh(Slot& slot) {
  if (!slot.bound.empty()) {
    // A bound tensor of a shared source points at the source's memory; again if the source was given other
    // memory or another shape (`.data = ...`, `module.to(dtype)`).
    c10::InferenceMode not_inference(false);
    at::NoGradGuard no_grad;
    for (size_t k = 0; k < slot.bound.size(); ++k) {
      auto& tensor = slot.bound[k];
      const auto& original = source(k);
      if (slot.copy_index[k] < 0 &&
          (tensor.const_data_ptr() != original.const_data_ptr() || tensor.sizes() != original.sizes() ||
           tensor.strides() != original.strides() || tensor.scalar_type() != original.scalar_type())) {
        tensor.set_data(original);
      }
    }
  }
  if (slot.copies && !slot.copies->refresh(slot.copied_sources)) {
    // A source changed shape, dtype or layout (`module.double()`, `.data = ...`): lay the copies out anew.
    lay_out_copies(slot);
    slot.copies->refresh(slot.copied_sources);
  }
}

std::vector<std::vector<at::Tensor>> Replicator::replicate(
    at::ArrayRef<c10::Device> devices, size_t num_slots, bool differentiable) {
  TORCH_DP_CHECK(
      num_slots <= devices.size(), "replicate: asked for ", num_slots, " replicas but only ", devices.size(),
      " devices were given");
  set_devices(devices);
  const size_t total = params_.size() + buffers_.size();
  std::vector<std::vector<at::Tensor>> result(num_slots);
  for (size_t j = 0; j < num_slots; ++j) {
    auto& slot = slots_[j];
    refresh(slot);
    if (!slot.bound.empty()) {
      result[j] = slot.bound;
      continue;
    }
    auto& tensors = result[j];
    tensors.reserve(total);
    for (size_t k = 0; k < total; ++k) {
      const auto index = slot.copy_index[k];
      tensors.push_back(index < 0 ? source(k) : slot.copies->copies()[static_cast<size_t>(index)]);
    }
  }
  if (differentiable && c10::GradMode::is_enabled()) {
    attach_grad(result);
  }
  changed_.assign(num_slots, false);
  for (size_t j = 0; j < num_slots; ++j) {
    auto& last = slots_[j].last;
    const bool same = same_objects(last, result[j]);
    changed_[j] = !same;
    if (!same) {
      last = result[j];
    }
  }
  return result;
}

// Note [Gradients summed in slot order]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Autograd adds the gradients that reach one tensor in the order they arrive. A source's gradients come from the
// replicas that use it directly, on the autograd engine's thread of the source's device, and from the broadcast
// node, which runs once the other devices' threads delivered theirs. With two replicas or more using the source
// directly and the node besides ([0, 0, 1]: replicas 0 and 1 on device 0, replica 2's copy on device 1), the
// node's sum lands before, between or after the direct ones depending on the threads' timing: (a + b) + c on one
// run, (a + c) + b on the next, and two runs differ in their last bits, reproducible=True or not. So where a
// source has the node, only the first slot using it directly keeps doing so; the later ones get an alias that
// carries the node, whose backward adds their gradients in slot order (Note [Broadcast grad] in comm.cpp). The
// source then gets two gradients, and a + b == b + a. Without the node (every replica on the source's device)
// everything arrives on one thread, in an order that does not change between runs.

void Replicator::attach_grad(std::vector<std::vector<at::Tensor>>& result) {
  // Every tensor of a slot that is not its source itself and whose source requires grad routes its gradient to
  // the source, through one node per call (Note [Broadcast grad] in comm.cpp), and so do the sources used
  // directly by any slot but the first where the node exists (Note [Gradients summed in slot order]).
  std::vector<std::vector<size_t>> indices(result.size());
  std::vector<bool> bound(result.size());
  const size_t total = params_.size() + buffers_.size();
  std::vector<char> has_node(total, 0);  // some slot's tensor k carries the node
  for (size_t j = 0; j < result.size(); ++j) {
    bound[j] = !slots_[j].bound.empty();
    for (size_t k = 0; k < total; ++k) {
      has_node[k] = has_node[k] || (source(k).requires_grad() && (bound[j] || slots_[j].copy_index[k] >= 0));
    }
  }
  std::vector<char> used_directly(total, 0);  // by an earlier slot
  bool any = false;
  for (size_t j = 0; j < result.size(); ++j) {
    auto& slot = slots_[j];
    for (size_t k = 0; k < result[j].size(); ++k) {
      if (source(k).requires_grad()) {
        if (bound[j] || slot.copy_index[k] >= 0) {
          indices[j].push_back(k);
        } else if (has_node[k] && used_directly[k]) {
          indices[j].push_back(k);  // an alias of the source, carrying the node
        } else {
          used_directly[k] = 1;
        }
      } else if (bound[j] && slot.bound[k].requires_grad()) {
        // Frozen in the module, so frozen in the replica: a clone's parameters start out requiring grad, and one
        // trainable at an earlier forward still carries that forward's node. Left so, the replica would compute
        // (and keep) gradients the module does not want, and its outputs would require grad where the module's
        // do not.
        slot.bound[k].detach_();
      }
    }
    any = any || !indices[j].empty();
  }
  if (!any) {
    return;
  }
  std::vector<at::Tensor> sources(params_);
  sources.insert(sources.end(), buffers_.begin(), buffers_.end());
  detail::attach_broadcast_grad(result, sources, indices, bound);
}

void detail::TestAccess::copy_everything(Replicator& replicator) {
  replicator.copy_everything_ = true;
  replicator.devices_.clear();
  replicator.slots_.clear();
  replicator.changed_.clear();
}

}  // namespace torch_dp
