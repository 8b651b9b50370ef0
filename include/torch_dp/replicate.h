#pragma once
// replicate: the tensors of a module's replicas, kept between calls and refreshed before each one.

#include <torch_dp/comm.h>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace torch_dp {

namespace detail {
struct TestAccess;  // torch_dp's own tests, src/test_access.h

/// Throws, with PyTorch's DataParallel message, if one of a module's parameters or buffers is not on `expected`.
void check_module_device(at::TensorList params, at::TensorList buffers, c10::Device expected);
}  // namespace detail

/// The tensors of a module's replicas, persistent between forwards: the one replication engine, behind both the
/// Python package's replicas and the C++ DataParallel module's (Note [Persistent replicas] in replicate.cpp).
///
/// The sources are the module's parameters and buffers. For replica slot j on device d:
///  - a parameter (or a buffer that requires grad) on d is the source tensor itself, so gradients accumulate
///    straight into the original;
///  - a buffer on d is the source tensor itself for the first slot on d (PyTorch's replica 0, whose in-place
///    updates such as BatchNorm's running statistics are kept) and a private copy for later slots;
///  - anything on another device is a copy, refreshed on every call (Note [Stale copies] in
///    coalesced_copies.cpp), one coalesced copy per dtype; with `differentiable`, copies of tensors that require
///    grad carry a broadcast autograd node that sums their gradients onto the source device (Note [Broadcast
///    grad] in comm.cpp).
/// A slot may be bound to tensors the caller owns (a C++ replica's own parameters and buffers, which its forward
/// reads): the engine then fills those tensors in place, pointing them at the sources' memory or at the
/// copies', and gives them the broadcast node, instead of handing out other tensors.
class Replicator {
 public:
  /// `trust_version_counters`: refresh a copy only when its source's version counter or data pointer moved
  /// (detail::CoalescedCopies; misses fused optimizers, `.data` edits and BatchNorm's statistics).
  explicit Replicator(bool trust_version_counters = false) : trust_version_counters_(trust_version_counters) {}

  /// Sets the tensors to replicate (dropping every slot, copy and binding). All must be on one device.
  void set_sources(std::vector<at::Tensor> params, std::vector<at::Tensor> buffers);

  /// Throws, with PyTorch's DataParallel message, if a source is not on `expected`.
  void check_device(c10::Device expected) const;

  /// Lays out one slot per entry of `devices` (a no-op for the devices of the last call; other devices drop
  /// every slot, copy and binding).
  void set_devices(at::ArrayRef<c10::Device> devices);

  /// Whether slot j (of the devices last set) is the sources' own: the first slot on their device, using the
  /// sources themselves for every tensor, so that its replica can be the module itself.
  bool uses_sources(size_t slot) const;

  /// Binds slot j (of the devices last set) to `tensors`, one per source (parameters, then buffers), which
  /// replicate() fills in place from then on.
  void bind(size_t slot, std::vector<at::Tensor> tensors);

  /// Tensors for the first `num_slots` replica slots of `devices`: result[j] = [params..., buffers...] for
  /// slot j. Slot layouts are kept for the whole device list, so a smaller last batch costs nothing.
  std::vector<std::vector<at::Tensor>> replicate(
      at::ArrayRef<c10::Device> devices, size_t num_slots, bool differentiable);

  /// changed()[j]: whether the last replicate() returned, for slot j, other tensor objects than the call
  /// before it (so a caller that installs them into replica modules can skip unchanged slots).
  const std::vector<bool>& changed() const { return changed_; }

  /// Whether `params` and `buffers` are the tensor objects set_sources() got, in the same order.
  bool has_sources(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& buffers) const;

  const std::vector<at::Tensor>& params() const { return params_; }
  const std::vector<at::Tensor>& buffers() const { return buffers_; }

 private:
  friend struct detail::TestAccess;
  struct Slot {
    c10::Device device{c10::kCPU};
    bool first_on_device = false;
    std::vector<int64_t> copy_index;  // per source: index into copies, or -1 when shared
    std::vector<at::Tensor> copied_sources;
    std::optional<detail::CoalescedCopies> copies;
    std::vector<at::Tensor> bound;  // see bind(); empty when unbound
    std::vector<at::Tensor> last;   // what replicate() returned last time
  };
  const at::Tensor& source(size_t k) const { return k < params_.size() ? params_[k] : buffers_[k - params_.size()]; }
  void lay_out_copies(Slot& slot);
  void refresh(Slot& slot);
  void attach_grad(std::vector<std::vector<at::Tensor>>& result);

  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> buffers_;
  std::vector<c10::Device> devices_;
  std::vector<Slot> slots_;
  std::vector<bool> changed_;
  bool trust_version_counters_ = false;
  bool copy_everything_ = false;  // detail::TestAccess: later slots on the sources' device copy everything too
};

}  // namespace torch_dp
