#include <torch_dp/detail/coalesced_copies.h>

#include "message.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <map>
#include <utility>

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

namespace torch_dp::detail {
namespace {

int64_t version_of(const at::Tensor& t) {
  if (t.is_inference()) {
    return -2;  // never matches: always stale
  }
  return static_cast<int64_t>(t._version());
}

}  // namespace

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

}  // namespace torch_dp::detail
