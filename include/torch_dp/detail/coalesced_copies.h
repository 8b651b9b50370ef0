#pragma once
// Copies of a module's tensors on one device, kept between calls and refreshed in one copy per dtype: the
// memory behind broadcast_coalesced and the Replicator. Users need not read it.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace torch_dp::detail {

/// Copies of some source tensors on one device, packed into one flat buffer per dtype (Note [Coalesced
/// copies] and Note [Stale copies] in coalesced_copies.cpp).
class CoalescedCopies {
 public:
  /// With `trust_version_counters`, refresh() skips a dtype group whose sources' version counters and data
  /// pointers did not move, which misses writes that move neither (fused optimizers, `.data`, BatchNorm's
  /// running statistics, raw pointers). Without it, every refresh copies everything.
  CoalescedCopies(at::TensorList sources, c10::Device device, bool trust_version_counters = false);

  /// Brings the copies up to date with `sources` (the same tensors, in the same order, as at construction),
  /// one copy per dtype group. Copies handed out under grad mode since the last refresh may be saved by an
  /// autograd graph, so unbound copies are then written into new memory rather than overwritten (copies()
  /// returns new tensors). Returns false, copying nothing, when a source changed shape, dtype, device or
  /// layout: the caller must build new CoalescedCopies.
  bool refresh(at::TensorList sources);

  /// Makes `aliases` (tensors the caller owns, such as a replica module's parameters, one per source) share
  /// the copies' memory (set_data), and treats a write through any of them as a change that the next refresh
  /// undoes. Call again after building new CoalescedCopies.
  void bind(std::vector<at::Tensor> aliases);

  const std::vector<at::Tensor>& copies() const { return copies_; }
  c10::Device device() const { return device_; }

 private:
  struct Stamp {
    const void* data = nullptr;
    int64_t version = -1;
  };
  struct Group {
    at::Tensor flat;              // empty for sparse sources, which are copied one by one
    std::vector<size_t> members;  // indices into sources / copies_
    int64_t flat_version = -1;    // the flat buffer's version after our last write
  };
  bool layout_matches(at::TensorList sources) const;
  bool group_is_stale(const Group& group, at::TensorList sources) const;
  void view_copies_in(const Group& group);  // copies_[k], for k in the group: views of its flat buffer

  c10::Device device_;
  bool trust_version_counters_ = false;
  bool handed_out_with_grad_ = false;  // the copies since the last refresh may be saved by autograd
  std::vector<at::Tensor> copies_;
  std::vector<Group> groups_;
  std::vector<Stamp> stamps_;        // per source, as of the last refresh
  std::vector<at::Tensor> aliases_;  // see bind(); empty when unbound
  std::vector<int64_t> alias_versions_;
  std::vector<std::vector<int64_t>> sizes_;
  std::vector<at::ScalarType> dtypes_;
  std::vector<c10::Device> source_devices_;
  std::vector<bool> strided_;
};

}  // namespace torch_dp::detail
