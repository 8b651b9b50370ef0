#pragma once
// replicate: the tensors of a module's replicas, kept between calls and refreshed before each one.

#include <torch_dp/comm.h>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace torch_dp {

/// Tensor-level replication of one module, persistent between forwards (Note [Persistent replicas] in
/// replicate.cpp).
///
/// The sources are the module's parameters and buffers. For replica slot j on device d:
///  - a parameter (or a buffer that requires grad) on d is the source tensor itself, so gradients accumulate
///    straight into the original;
///  - a buffer on d is the source tensor itself for the first slot on d (PyTorch's replica 0, whose in-place
///    updates such as BatchNorm's running statistics are kept) and a private copy for later slots;
///  - anything on another device is a copy, refreshed on every call (Note [Stale copies] in comm.cpp), one
///    coalesced copy per dtype; with `differentiable`, copies of tensors that require grad carry a broadcast
///    autograd node that reduce-adds their gradients onto the source device.
class Replicator {
 public:
  Replicator() = default;

  /// `trust_version_counters`: refresh a copy only when its source's version counter or data pointer moved
  /// (detail::CoalescedCopies; misses fused optimizers, `.data` edits and BatchNorm's statistics).
  ///
  /// With `copy_everything`, only the first slot on the sources' device shares them; every later slot gets
  /// copies of everything, as if it were on another device, and so takes that path (coalesced copies,
  /// broadcast gradients). That path is otherwise only reachable with several accelerators; this lets
  /// CPU-only tests exercise it.
  explicit Replicator(bool trust_version_counters, bool copy_everything = false)
      : trust_version_counters_(trust_version_counters), copy_everything_(copy_everything) {}

  /// Sets the tensors to replicate (dropping every cached copy). All must be on one device.
  void set_sources(std::vector<at::Tensor> params, std::vector<at::Tensor> buffers);

  /// Throws, with PyTorch's DataParallel message, if a source is not on `expected`.
  void check_device(c10::Device expected) const;

  /// Tensors for the first `num_slots` replica slots of `devices`: result[j] = [params..., buffers...] for
  /// slot j. Slot layouts are kept for the whole device list, so a smaller last batch costs nothing.
  std::vector<std::vector<at::Tensor>> replicate(
      at::ArrayRef<c10::Device> devices, size_t num_slots, bool differentiable);

  /// changed()[j]: whether the last replicate() returned, for slot j, other tensor objects than the call
  /// before it (so a caller that installs them into replica modules can skip unchanged slots).
  const std::vector<bool>& changed() const { return changed_; }

  size_t num_params() const { return params_.size(); }
  size_t num_buffers() const { return buffers_.size(); }

 private:
  struct Slot {
    c10::Device device{c10::kCPU};
    std::vector<int64_t> copy_index;                 // per source: index into copies, or -1 when shared
    std::vector<at::Tensor> copied_sources;
    std::optional<detail::CoalescedCopies> copies;
    std::vector<at::Tensor> last;                    // what replicate() returned last time
  };
  void build_slots(at::ArrayRef<c10::Device> devices);

  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> buffers_;
  std::vector<c10::Device> devices_;
  std::vector<Slot> slots_;
  std::vector<bool> changed_;
  bool trust_version_counters_ = false;
  bool copy_everything_ = false;
};

} // namespace torch_dp
