#include <torch_dp/comm.h>

#include "autograd_functions.h"
#include "message.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/StreamGuard.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>

namespace torch_dp {
namespace {

using torch::autograd::variable_list;

c10::Device common_device(at::TensorList tensors, const char* what) {
  TORCH_DP_CHECK(!tensors.empty(), what, ": expected at least one tensor");
  const auto device = tensors[0].device();
  for (size_t k = 1; k < tensors.size(); ++k) {
    TORCH_DP_CHECK(
        tensors[k].device() == device, what, ": expected all tensors on one device, but tensor 0 is on ", device.str(),
        " and tensor ", k, " is on ", tensors[k].device().str());
  }
  return device;
}

// Autograd holds nodes in std::shared_ptr up to torch 2.11 and in c10::intrusive_ptr in later releases: make a
// node the way the torch being compiled against holds it.
template <typename NodeType, typename... Args>
auto make_node(Args&&... args) {
  using NodePointer = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<NodePointer, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<NodeType>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<NodeType>(std::forward<Args>(args)...);
  }
}

// The gradients of copies (or aliases) of sources, summed onto the sources' device (Note [Broadcast grad]).
// Input i is the gradient of one copy of source `output_of[i]`, made in slot `slot_of[i]`.
struct BroadcastBackward : public torch::autograd::Node {
  BroadcastBackward(c10::Device destination, std::vector<size_t> slot_of, std::vector<size_t> output_of)
      : destination_(destination), slot_of_(std::move(slot_of)), output_of_(std::move(output_of)) {}

  // An output none of whose copies took part in the loss gets zeros, as torch.nn.DataParallel's broadcast gives
  // an unused parameter.
  void add_output(const at::Tensor& source) {
    add_next_edge(torch::autograd::impl::gradient_edge(source));
    output_sizes_.push_back(source.sizes().vec());
    output_options_.push_back(source.options());
  }

  // The current streams of the devices this node spans, at the forward (Note [Streams of a backward across
  // devices] in scatter.cpp).
  void set_streams(std::vector<c10::Stream> streams) { streams_ = std::move(streams); }

  variable_list apply(variable_list&& grads) override {
    const c10::MultiStreamGuard streams(streams_);
    variable_list result(num_outputs());
    std::map<size_t, std::vector<at::Tensor>> other_devices;  // per slot: its gradients, by output
    for (size_t i = 0; i < grads.size(); ++i) {
      auto& grad = grads[i];
      if (!grad.defined()) {
        continue;  // that copy did not take part in the loss
      }
      auto& sum = result[output_of_[i]];
      if (grad.device() == destination_) {
        sum = sum.defined() ? sum + grad : std::move(grad);
      } else {
        auto& per_output = other_devices[slot_of_[i]];
        per_output.resize(result.size());
        per_output[output_of_[i]] = std::move(grad);
      }
    }
    if (!other_devices.empty()) {
      std::vector<std::vector<at::Tensor>> per_slot;
      for (auto& [slot, per_output] : other_devices) {
        per_slot.push_back(std::move(per_output));
      }
      auto reduced = reduce_add_coalesced(per_slot, destination_);
      for (size_t k = 0; k < result.size(); ++k) {
        if (reduced[k].defined()) {
          result[k] = result[k].defined() ? result[k] + reduced[k] : reduced[k];
        }
      }
    }
    for (size_t k = 0; k < result.size(); ++k) {
      if (!result[k].defined()) {
        result[k] = at::zeros(output_sizes_[k], output_options_[k]);
      }
    }
    return result;
  }

  std::string name() const override { return "torch_dp::BroadcastBackward"; }

 private:
  c10::Device destination_;
  std::vector<size_t> slot_of_;
  std::vector<size_t> output_of_;
  std::vector<std::vector<int64_t>> output_sizes_;
  std::vector<at::TensorOptions> output_options_;
  std::vector<c10::Stream> streams_;
};

}  // namespace

// Note [Broadcast grad]
// ~~~~~~~~~~~~~~~~~~~~~
// Copies are made without autograd (the Replicator keeps them between calls). Each call gives the copies of
// the tensors that require grad one BroadcastBackward node, with an edge to each source, so the gradients of
// every replica's copies meet in one node: those on the sources' device are added, the others reduce-added
// onto it in coalesced buckets, and the sum reaches the sources' .grad once. An unbound copy is handed out as
// a fresh alias carrying the node (the cached copy itself never gets a grad_fn); a tensor the caller owns (a
// C++ replica's parameter, which the replica's forward reads) carries the node itself. This is the one
// gradient path of every copy, whether made by broadcast_coalesced, for a Python replica or for a C++ one.
// The backward is written with differentiable ops, so double backward works.

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
  std::vector<std::vector<size_t>> per_slot(devices.size());
  for (auto i : cross) {
    per_slot[i] = needs_grad;
  }
  detail::attach_broadcast_grad(result, tensors, per_slot, /*bound=*/{});
  return result;
}

namespace {

using PerDevice = std::vector<std::vector<at::Tensor>>;

// The first device's gradient of tensor k, after checking that every device's agrees with it; nullptr if no
// device produced one.
const at::Tensor* first_defined(const PerDevice& inputs, size_t k) {
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
        t.sizes() == first->sizes() && t.scalar_type() == first->scalar_type(), "reduce_add_coalesced: tensor ", k,
        " has shape ", t.sizes(), " and dtype ", t.scalar_type(), " on one device but shape ", first->sizes(),
        " and dtype ", first->scalar_type(), " on another");
  }
  return first;
}

// Sums tensor k over the devices, one by one (sparse tensors).
at::Tensor sum_one(const PerDevice& inputs, size_t k, c10::Device destination) {
  at::Tensor sum;
  for (const auto& per_device : inputs) {
    if (per_device[k].defined()) {
      auto moved = per_device[k].to(destination);
      sum = sum.defined() ? sum + moved : moved;
    }
  }
  return sum;
}

// Sums the dense tensors `members` (one dtype) over the devices: one flat buffer per device, one copy and one
// add each; an unused tensor contributes zeros. result[k] is a view of the sum.
void sum_flat(
    const PerDevice& inputs, const std::vector<size_t>& members, const std::vector<const at::Tensor*>& first,
    c10::Device destination, std::vector<at::Tensor>& result) {
  at::Tensor sum;
  for (const auto& per_device : inputs) {
    const auto used = std::find_if(members.begin(), members.end(), [&](size_t k) { return per_device[k].defined(); });
    if (used == members.end()) {
      continue;
    }
    const auto device = per_device[*used].device();  // zeros for the unused tensors go where the others are
    std::vector<at::Tensor> flat_parts;
    for (auto k : members) {
      const auto& t = per_device[k];
      flat_parts.push_back(
          t.defined() ? t.reshape({-1}) : at::zeros({first[k]->numel()}, first[k]->options().device(device)));
    }
    auto flat = flat_parts.size() == 1 ? flat_parts[0] : at::cat(flat_parts);
    auto moved = flat.to(destination);
    sum = sum.defined() ? sum + moved : moved;
  }
  int64_t offset = 0;
  for (auto k : members) {
    const int64_t numel = first[k]->numel();
    result[k] = sum.narrow(0, offset, numel).view(first[k]->sizes());
    offset += numel;
  }
}

}  // namespace

std::vector<at::Tensor> reduce_add_coalesced(const PerDevice& inputs, c10::Device destination) {
  TORCH_DP_CHECK(!inputs.empty(), "reduce_add_coalesced: expected tensors from at least one device");
  const size_t count = inputs[0].size();
  for (size_t i = 1; i < inputs.size(); ++i) {
    TORCH_DP_CHECK(
        inputs[i].size() == count, "reduce_add_coalesced: expected ", count,
        " tensors from every device (as from "
        "device 0), but got ",
        inputs[i].size(), " from device ", i);
  }
  std::vector<at::Tensor> result(count);
  std::vector<const at::Tensor*> first(count, nullptr);
  // Group the dense tensors by dtype; sparse tensors are summed one by one.
  std::map<at::ScalarType, std::vector<size_t>> groups;
  for (size_t k = 0; k < count; ++k) {
    first[k] = first_defined(inputs, k);
    if (first[k] == nullptr) {
      continue;  // no device produced this gradient
    }
    const bool dense = std::all_of(inputs.begin(), inputs.end(), [&](const std::vector<at::Tensor>& per_device) {
      return !per_device[k].defined() || per_device[k].layout() == c10::kStrided;
    });
    if (dense) {
      groups[first[k]->scalar_type()].push_back(k);
    } else {
      result[k] = sum_one(inputs, k, destination);
    }
  }
  for (const auto& [dtype, members] : groups) {
    sum_flat(inputs, members, first, destination, result);
  }
  return result;
}

namespace detail {

std::vector<std::vector<at::Tensor>> attach_broadcast_grad(
    at::TensorList sources, const std::vector<std::vector<at::Tensor>>& copies) {
  common_device(sources, "broadcast");
  for (const auto& slot : copies) {
    TORCH_DP_CHECK(
        slot.size() == sources.size(), "broadcast: expected ", sources.size(), " copies per device, got ", slot.size());
  }
  std::vector<size_t> indices(sources.size());
  std::iota(indices.begin(), indices.end(), size_t{0});
  std::vector<std::vector<size_t>> per_slot(copies.size(), indices);
  auto result = copies;
  attach_broadcast_grad(result, sources, per_slot, /*bound=*/{});
  return result;
}

void attach_broadcast_grad(
    std::vector<std::vector<at::Tensor>>& tensors, at::TensorList sources,
    const std::vector<std::vector<size_t>>& indices, const std::vector<bool>& bound) {
  std::vector<size_t> output_of_source(sources.size(), SIZE_MAX);
  std::vector<size_t> slot_of;
  std::vector<size_t> output_of;
  std::vector<size_t> outputs;  // the sources with an edge, in output order
  for (size_t j = 0; j < indices.size(); ++j) {
    for (auto k : indices[j]) {
      if (output_of_source[k] == SIZE_MAX) {
        output_of_source[k] = outputs.size();
        outputs.push_back(k);
      }
      slot_of.push_back(j);
      output_of.push_back(output_of_source[k]);
    }
  }
  if (outputs.empty()) {
    return;
  }
  const auto destination = sources[outputs[0]].device();
  std::vector<c10::Device> spanned{destination};
  for (size_t j = 0; j < indices.size(); ++j) {
    if (!indices[j].empty()) {
      spanned.push_back(tensors[j][indices[j].front()].device());
    }
  }
  auto node = make_node<BroadcastBackward>(destination, std::move(slot_of), std::move(output_of));
  node->set_streams(current_streams(spanned));
  for (auto k : outputs) {
    node->add_output(sources[k]);
  }
  for (size_t j = 0; j < indices.size(); ++j) {
    const bool in_place = j < bound.size() && bound[j];
    for (auto k : indices[j]) {
      auto& tensor = tensors[j][k];
      if (!in_place) {
        tensor = tensor.detach();  // a fresh alias, so the cached copy itself never gets a grad_fn
      }
      torch::autograd::set_history(tensor, node);
    }
  }
}

}  // namespace detail
}  // namespace torch_dp
