#include <torch_dp/comm.h>

#include "message.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/custom_function.h>

#include <map>

// Note [Coalesced copies]
// ~~~~~~~~~~~~~~~~~~~~~~~
// A model has hundreds of small tensors; copying them one by one costs a kernel launch (and on the way back a
// reduction) each. CoalescedCopies lays the copies of all sources of one dtype end to end in one flat buffer
// on the target device, each copy a view of it. Refreshing a group is then one `cat` into the flat buffer (on
// the source's device) or one `cat` plus one copy (across devices).
//
// Note [Stale copies]
// ~~~~~~~~~~~~~~~~~~~
// A replica must never run on state older than the module's, and nothing cheap proves that a tensor is
// unchanged: torch's fused optimizers (`fused=True`), the batch-norm op's running-statistics update, an
// in-place edit through `.data` and a write through `data_ptr()` from an extension move neither the version
// counter nor the data pointer. So every refresh copies every group, as torch.nn.DataParallel's broadcast does
// on every forward (coalesced here, into memory that is kept). `trust_version_counters` is the opt-in
// exception: a group is copied again only if a source's version counter or data pointer moved, or one of the
// copies was written to (they are views of the flat buffer and share its version counter); inference tensors
// have no version counter, so a group holding one is always copied.
//
// Copies handed out under grad mode may be saved by that forward's autograd graph (a Linear saves its weight),
// and a graph may be run backward after a later forward (two forwards, one loss). Overwriting them in place
// would make that backward fail with a version-counter error where torch.nn.DataParallel, which broadcasts into
// new tensors, works. So an unbound group handed out under grad mode is refreshed into new memory; in
// inference, and for copies bound into a C++ replica's own tensors (bind(), whose tensors the replica keeps),
// it is overwritten in place.

namespace torch_dp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int64_t version_of(const at::Tensor& t) {
  if (t.is_inference()) {
    return -2;  // never matches: always stale
  }
  return static_cast<int64_t>(t._version());
}

c10::Device common_device(at::TensorList tensors, const char* what) {
  TORCH_DP_CHECK(!tensors.empty(), what, ": expected at least one tensor");
  const auto device = tensors[0].device();
  for (size_t k = 1; k < tensors.size(); ++k) {
    TORCH_DP_CHECK(
        tensors[k].device() == device, what, ": expected all tensors on one device, but tensor 0 is on ",
        device.str(), " and tensor ", k, " is on ", tensors[k].device().str());
  }
  return device;
}

// Gradients of broadcast copies, reduce-added onto the sources' device (Note [Broadcast grad] below).
struct BroadcastFunction : public torch::autograd::Function<BroadcastFunction> {
  static variable_list forward(
      AutogradContext* ctx,
      at::TensorList sources,
      const std::vector<std::vector<at::Tensor>>& copies) {
    const auto device = sources[0].device();
    ctx->saved_data["device_type"] = static_cast<int64_t>(device.type());
    ctx->saved_data["device_index"] = static_cast<int64_t>(device.index());
    ctx->saved_data["num_sources"] = static_cast<int64_t>(sources.size());
    variable_list out;
    out.reserve(copies.size() * sources.size());
    for (const auto& slot : copies) {
      for (const auto& copy : slot) {
        // A fresh alias per call: the cached copy itself never gets a grad_fn.
        out.push_back(copy.detach());
      }
    }
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const c10::Device device(
        static_cast<c10::DeviceType>(ctx->saved_data["device_type"].toInt()),
        static_cast<c10::DeviceIndex>(ctx->saved_data["device_index"].toInt()));
    const auto num_sources = static_cast<size_t>(ctx->saved_data["num_sources"].toInt());
    std::vector<std::vector<at::Tensor>> per_slot;
    for (size_t start = 0; start < grads.size(); start += num_sources) {
      per_slot.emplace_back(grads.begin() + start, grads.begin() + start + num_sources);
    }
    auto result = reduce_add_coalesced(per_slot, device);
    result.emplace_back();  // copies
    return result;
  }
};

} // namespace

// Note [Broadcast grad]
// ~~~~~~~~~~~~~~~~~~~~~
// Copies on other devices are made without autograd (they are cached between calls). Each call wraps them in
// one BroadcastFunction node whose inputs are the sources and whose outputs are fresh aliases of the copies, so
// the gradients of every replica's copies meet in one node and are reduce-added onto the source device in
// coalesced buckets. The backward is written with differentiable ops, so double backward works.

std::vector<std::vector<at::Tensor>> broadcast_coalesced(at::TensorList tensors, at::ArrayRef<c10::Device> devices) {
  std::vector<std::vector<at::Tensor>> result(devices.size());
  if (tensors.empty()) {
    return result;
  }
  const auto source = common_device(tensors, "broadcast_coalesced");
  std::vector<size_t> cross;  // devices that get copies
  {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < devices.size(); ++i) {
      if (devices[i] == source) {
        result[i] = tensors.vec();
      } else {
        detail::CoalescedCopies copies(tensors, devices[i]);
        copies.refresh(tensors);
        result[i] = copies.copies();
        cross.push_back(i);
      }
    }
  }
  if (!c10::GradMode::is_enabled() || cross.empty()) {
    return result;
  }
  std::vector<size_t> needs_grad;
  for (size_t k = 0; k < tensors.size(); ++k) {
    if (tensors[k].requires_grad()) {
      needs_grad.push_back(k);
    }
  }
  if (needs_grad.empty()) {
    return result;
  }
  detail::attach_broadcast_grad(result, tensors, needs_grad, cross);
  return result;
}

std::vector<at::Tensor> reduce_add_coalesced(
    const std::vector<std::vector<at::Tensor>>& inputs,
    c10::Device destination) {
  TORCH_DP_CHECK(!inputs.empty(), "reduce_add_coalesced: expected tensors from at least one device");
  const size_t count = inputs[0].size();
  for (size_t i = 1; i < inputs.size(); ++i) {
    TORCH_DP_CHECK(
        inputs[i].size() == count, "reduce_add_coalesced: expected ", count, " tensors from every device (as from "
        "device 0), but got ", inputs[i].size(), " from device ", i);
  }
  std::vector<at::Tensor> result(count);
  // Group the dense tensors by dtype; sparse tensors are summed one by one.
  std::map<at::ScalarType, std::vector<size_t>> groups;
  for (size_t k = 0; k < count; ++k) {
    const at::Tensor* first = nullptr;
    for (const auto& per_device : inputs) {
      const auto& t = per_device[k];
      if (!t.defined()) {
        continue;
      }
      if (first == nullptr) {
        first = &t;
        continue;
      }
      TORCH_DP_CHECK(
          t.sizes() == first->sizes() && t.scalar_type() == first->scalar_type(),
          "reduce_add_coalesced: tensor ", k, " has shape ", t.sizes(), " and dtype ", t.scalar_type(),
          " on one device but shape ", first->sizes(), " and dtype ", first->scalar_type(), " on another");
    }
    if (first == nullptr) {
      continue;  // no device produced this gradient
    }
    bool dense = true;
    for (const auto& per_device : inputs) {
      dense = dense && (!per_device[k].defined() || per_device[k].layout() == c10::kStrided);
    }
    if (dense) {
      groups[first->scalar_type()].push_back(k);
      continue;
    }
    at::Tensor sum;
    for (const auto& per_device : inputs) {
      if (per_device[k].defined()) {
        auto moved = per_device[k].to(destination);
        sum = sum.defined() ? sum + moved : moved;
      }
    }
    result[k] = sum;
  }
  for (const auto& [dtype, members] : groups) {
    at::Tensor sum;
    for (const auto& per_device : inputs) {
      std::vector<at::Tensor> flat_parts;
      bool any = false;
      for (auto k : members) {
        const auto& t = per_device[k];
        any = any || t.defined();
      }
      if (!any) {
        continue;
      }
      for (auto k : members) {
        const auto& t = per_device[k];
        if (t.defined()) {
          flat_parts.push_back(t.reshape({-1}));
        } else {
          // Shape from another device's gradient: an unused tensor contributes zeros.
          for (const auto& other : inputs) {
            if (other[k].defined()) {
              flat_parts.push_back(at::zeros({other[k].numel()}, other[k].options()));
              break;
            }
          }
        }
      }
      auto flat = flat_parts.size() == 1 ? flat_parts[0] : at::cat(flat_parts);
      auto moved = flat.to(destination);
      sum = sum.defined() ? sum + moved : moved;
    }
    int64_t offset = 0;
    for (auto k : members) {
      at::Tensor shape_source;
      for (const auto& per_device : inputs) {
        if (per_device[k].defined()) {
          shape_source = per_device[k];
          break;
        }
      }
      const int64_t numel = shape_source.numel();
      result[k] = sum.narrow(0, offset, numel).view(shape_source.sizes());
      offset += numel;
    }
  }
  return result;
}

namespace detail {

CoalescedCopies::CoalescedCopies(at::TensorList sources, c10::Device device, bool trust_version_counters)
    : device_(device), trust_version_counters_(trust_version_counters) {
  c10::InferenceMode not_inference(false);
  at::NoGradGuard no_grad;
  c10::OptionalDeviceGuard guard;
  if (!device.is_cpu()) {
    guard.reset_device(device);
  }
  const size_t n = sources.size();
  copies_.resize(n);
  stamps_.resize(n);
  std::map<at::ScalarType, std::vector<size_t>> by_dtype;
  for (size_t k = 0; k < n; ++k) {
    const auto& s = sources[k];
    sizes_.push_back(s.sizes().vec());
    dtypes_.push_back(s.scalar_type());
    source_devices_.push_back(s.device());
    strided_.push_back(s.layout() == c10::kStrided);
    if (strided_.back()) {
      by_dtype[s.scalar_type()].push_back(k);
    } else {
      groups_.push_back(Group{at::Tensor(), {k}, -1});
    }
  }
  for (const auto& [dtype, members] : by_dtype) {
    int64_t total = 0;
    for (auto k : members) {
      total += sources[k].numel();
    }
    Group group{at::empty({total}, at::TensorOptions().dtype(dtype).device(device)), members, -1};
    view_copies_in(group);
    groups_.push_back(std::move(group));
  }
}

void CoalescedCopies::view_copies_in(const Group& group) {
  int64_t offset = 0;
  for (auto k : group.members) {
    const auto& sizes = sizes_[k];
    const int64_t numel = c10::multiply_integers(sizes);
    copies_[k] = group.flat.narrow(0, offset, numel).view(sizes);
    offset += numel;
  }
}

bool CoalescedCopies::layout_matches(at::TensorList sources) const {
  if (sources.size() != sizes_.size()) {
    return false;
  }
  for (size_t k = 0; k < sources.size(); ++k) {
    const auto& s = sources[k];
    if (s.scalar_type() != dtypes_[k] || s.device() != source_devices_[k] ||
        (s.layout() == c10::kStrided) != strided_[k] || s.sizes() != c10::IntArrayRef(sizes_[k])) {
      return false;
    }
  }
  return true;
}

bool CoalescedCopies::group_is_stale(const Group& group, at::TensorList sources) const {
  if (!trust_version_counters_ || group.flat_version < 0 || version_of(group.flat) != group.flat_version) {
    return true;
  }
  for (auto k : group.members) {
    const auto& s = sources[k];
    if (stamps_[k].data != s.const_data_ptr() || stamps_[k].version < 0 || version_of(s) != stamps_[k].version ||
        (!aliases_.empty() && version_of(aliases_[k]) != alias_versions_[k])) {
      return true;
    }
  }
  return false;
}

bool CoalescedCopies::refresh(at::TensorList sources) {
  if (!layout_matches(sources)) {
    return false;
  }
  // Read before the guards below: whether the copies handed out after this refresh may be saved by autograd.
  const bool with_grad = c10::GradMode::is_enabled();
  c10::InferenceMode not_inference(false);
  at::NoGradGuard no_grad;
  c10::OptionalDeviceGuard guard;
  if (!device_.is_cpu()) {
    guard.reset_device(device_);
  }
  // Note [Stale copies]: never overwrite unbound copies that an autograd graph may have saved.
  const bool into_new_memory = handed_out_with_grad_ && aliases_.empty();
  for (auto& group : groups_) {
    if (!group.flat.defined()) {
      const auto k = group.members[0];
      copies_[k] = sources[k].to(device_);  // sparse: a new copy every time
      if (!aliases_.empty()) {
        aliases_[k].set_data(copies_[k]);
      }
      continue;
    }
    if (!group_is_stale(group, sources)) {
      continue;
    }
    if (into_new_memory) {
      group.flat = at::empty_like(group.flat);
      view_copies_in(group);
    }
    if (group.members.size() == 1) {
      const auto k = group.members[0];
      copies_[k].copy_(sources[k], /*non_blocking=*/true);
    } else {
      std::vector<at::Tensor> parts;
      parts.reserve(group.members.size());
      for (auto k : group.members) {
        parts.push_back(sources[k].reshape({-1}));
      }
      if (source_devices_[group.members[0]] == device_) {
        at::cat_out(group.flat, parts, 0);
      } else {
        group.flat.copy_(at::cat(parts, 0), /*non_blocking=*/true);
      }
    }
    for (auto k : group.members) {
      stamps_[k] = Stamp{sources[k].const_data_ptr(), version_of(sources[k])};
      if (!aliases_.empty()) {
        alias_versions_[k] = version_of(aliases_[k]);
      }
    }
    group.flat_version = version_of(group.flat);
  }
  handed_out_with_grad_ = with_grad;
  return true;
}

void CoalescedCopies::bind(std::vector<at::Tensor> aliases) {
  TORCH_DP_CHECK(
      aliases.size() == copies_.size(), "CoalescedCopies::bind: expected ", copies_.size(), " tensors, got ",
      aliases.size());
  c10::InferenceMode not_inference(false);
  at::NoGradGuard no_grad;
  alias_versions_.assign(aliases.size(), -1);
  for (size_t k = 0; k < aliases.size(); ++k) {
    if (copies_[k].defined()) {
      aliases[k].set_data(copies_[k]);
    }
    alias_versions_[k] = version_of(aliases[k]);
  }
  aliases_ = std::move(aliases);
}

std::vector<std::vector<at::Tensor>> attach_broadcast_grad(
    at::TensorList sources,
    const std::vector<std::vector<at::Tensor>>& copies) {
  common_device(sources, "broadcast");
  for (const auto& slot : copies) {
    TORCH_DP_CHECK(
        slot.size() == sources.size(), "broadcast: expected ", sources.size(), " copies per device, got ",
        slot.size());
  }
  auto flat = BroadcastFunction::apply(sources, copies);
  std::vector<std::vector<at::Tensor>> result(copies.size());
  for (size_t j = 0; j < copies.size(); ++j) {
    result[j].assign(flat.begin() + j * sources.size(), flat.begin() + (j + 1) * sources.size());
  }
  return result;
}

void attach_broadcast_grad(
    std::vector<std::vector<at::Tensor>>& tensors,
    at::TensorList sources,
    const std::vector<size_t>& indices,
    const std::vector<size_t>& slots) {
  if (indices.empty() || slots.empty()) {
    return;
  }
  std::vector<at::Tensor> selected;
  for (auto k : indices) {
    selected.push_back(sources[k]);
  }
  std::vector<std::vector<at::Tensor>> copies;
  for (auto j : slots) {
    std::vector<at::Tensor> slot;
    for (auto k : indices) {
      slot.push_back(tensors[j][k]);
    }
    copies.push_back(std::move(slot));
  }
  auto with_grad = attach_broadcast_grad(selected, copies);
  for (size_t c = 0; c < slots.size(); ++c) {
    for (size_t n = 0; n < indices.size(); ++n) {
      tensors[slots[c]][indices[n]] = with_grad[c][n];
    }
  }
}

} // namespace detail
} // namespace torch_dp
