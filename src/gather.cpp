#include <torch_dp/gather.h>

#include <torch_dp/detail/gather_outputs.h>

#include "message.h"

#include "autograd_functions.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/GradMode.h>
#include <c10/core/StreamGuard.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

namespace torch_dp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor concatenate_on(const std::vector<at::Tensor>& inputs, c10::Device destination, int64_t dim) {
  // Keep the first input's memory format (channels_last survives a gather, as with PyTorch's comm.gather) unless
  // the inputs disagree. at::cat keeps it on the CPU but not on CUDA, so only contiguous inputs take it.
  auto format = inputs[0].suggest_memory_format();
  bool all_on_destination = true;
  for (const auto& t : inputs) {
    all_on_destination = all_on_destination && t.device() == destination;
    if (t.suggest_memory_format() != format) {
      format = c10::MemoryFormat::Contiguous;
    }
  }
  if (all_on_destination && format == c10::MemoryFormat::Contiguous) {
    return at::cat(inputs, dim);
  }
  auto shape = inputs[0].sizes().vec();
  shape[dim] = 0;
  for (const auto& t : inputs) {
    shape[dim] += t.size(dim);
  }
  c10::OptionalDeviceGuard guard;
  if (!destination.is_cpu()) {
    guard.reset_device(destination);
  }
  auto out = at::empty(shape, inputs[0].options().device(destination).memory_format(format));
  // A copy to the CPU must be synchronous: the caller reads the result right away.
  const bool non_blocking = !destination.is_cpu();
  int64_t offset = 0;
  for (const auto& t : inputs) {
    out.narrow(dim, offset, t.size(dim)).copy_(t, non_blocking);
    offset += t.size(dim);
  }
  return out;
}

struct GatherFunction : public torch::autograd::Function<GatherFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs, c10::Device destination, int64_t dim) {
    std::vector<c10::Device> devices;
    std::vector<int64_t> sizes;
    for (const auto& t : inputs) {
      devices.push_back(t.device());
      sizes.push_back(t.size(dim));
    }
    ctx->saved_data["device_types"] = detail::device_types(devices);
    ctx->saved_data["device_indices"] = detail::device_indices(devices);
    ctx->saved_data["sizes"] = sizes;
    ctx->saved_data["dim"] = dim;
    // Note [Streams of a backward across devices] in scatter.cpp
    devices.push_back(destination);
    ctx->saved_data["streams"] = detail::pack_streams(detail::current_streams(devices));
    return {concatenate_on(inputs.vec(), destination, dim)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto devices = detail::devices_from(
        ctx->saved_data["device_types"].toIntVector(), ctx->saved_data["device_indices"].toIntVector());
    const auto sizes = ctx->saved_data["sizes"].toIntVector();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const c10::MultiStreamGuard streams(detail::unpack_streams(ctx->saved_data["streams"].toIntVector()));
    auto result = detail::scatter_function(grads[0], devices, sizes, dim);
    result.emplace_back();  // destination
    result.emplace_back();  // dim
    return result;
  }
};

}  // namespace

at::Tensor gather(at::TensorList tensors, c10::Device destination, int64_t dim) {
  TORCH_DP_CHECK(!tensors.empty(), "gather: expected at least one tensor to gather from");
  TORCH_DP_CHECK(
      destination.is_cpu() || destination.has_index(), "gather: destination device ", destination.str(),
      " has no index; give an accelerator destination an index");
  std::vector<at::Tensor> inputs(tensors.begin(), tensors.end());
  for (size_t i = 0; i < inputs.size(); ++i) {
    TORCH_DP_CHECK(inputs[i].defined(), "gather: tensor at index ", i, " is undefined");
    // A tensor on another device than its replica's is copied like any other (as PyTorch does); one without
    // data cannot be, and would otherwise fail deep inside copy_ without saying which replica returned it.
    TORCH_DP_CHECK(
        !inputs[i].is_meta() || destination.is_meta(), "gather: tensor at index ", i, " (replica ", i,
        "'s output) is on device meta, which holds no data to copy to ", destination.str(),
        "; expected a tensor with data, on its replica's device");
  }
  bool all_scalars = true;
  for (const auto& t : inputs) {
    all_scalars = all_scalars && t.dim() == 0;
  }
  if (all_scalars && dim == 0) {
    TORCH_DP_WARN(
        "Was asked to gather along dimension 0, but all input tensors were scalars; will instead unsqueeze "
        "and return a vector.");
    for (auto& t : inputs) {
      t = t.view({1});
    }
  }
  const auto& first = inputs[0];
  TORCH_DP_CHECK(
      first.dim() > 0, "gather: cannot concatenate 0-dim tensors along dim ", dim, "; tensor at index 0 is a scalar");
  dim = c10::maybe_wrap_dim(dim, first.dim());
  for (size_t i = 1; i < inputs.size(); ++i) {
    const auto& t = inputs[i];
    TORCH_DP_CHECK(
        t.dim() == first.dim(),
        "gather: expected all tensors to have the same number of dimensions, but tensor at "
        "index ",
        i, " has ", t.dim(), " (shape ", t.sizes(), ") and tensor at index 0 has ", first.dim(), " (shape ",
        first.sizes(), ")");
    TORCH_DP_CHECK(
        t.scalar_type() == first.scalar_type(),
        "gather: expected all tensors to have the same dtype, but tensor at "
        "index ",
        i, " is ", t.scalar_type(), " and tensor at index 0 is ", first.scalar_type());
    for (int64_t d = 0; d < t.dim(); ++d) {
      if (d != dim) {
        TORCH_DP_CHECK(
            t.size(d) == first.size(d), "gather: tensor at index ", i, " has invalid shape ", t.sizes(),
            ", but expected the shape of tensor 0, ", first.sizes(), ", in every dimension but dim ", dim);
      }
    }
  }
  if (inputs.size() == 1 && first.device() == destination) {
    return first;
  }
  return detail::gather_function(inputs, destination, dim);
}

namespace detail {

at::Tensor gather_function(const std::vector<at::Tensor>& inputs, c10::Device destination, int64_t dim) {
  if (!c10::GradMode::is_enabled()) {
    return concatenate_on(inputs, destination, dim);  // Note [No graph without grad mode] in scatter.cpp
  }
  // TensorList, not std::vector: autograd only tracks tensors it sees as Tensor or TensorList arguments.
  return GatherFunction::apply(at::TensorList(inputs), destination, dim)[0];
}

}  // namespace detail
// ---- the C++ module's outputs, gathered ----------------------------------------------------------------------

namespace detail {

c10::IValue gather_ivalues(const std::vector<c10::IValue>& outputs, c10::Device destination, int64_t dim) {
  TORCH_DP_CHECK(!outputs.empty(), "DataParallel: no outputs to gather");
  const auto& first = outputs[0];
  auto mismatch = [&](size_t i) {
    return detail::message(
        "DataParallel: replica ", i, " returned a ", outputs[i].tagKind(), " where replica 0 returned a ",
        first.tagKind(), "; every replica must return the same structure");
  };
  if (first.isTensor()) {
    std::vector<at::Tensor> tensors;
    for (size_t i = 0; i < outputs.size(); ++i) {
      TORCH_DP_CHECK(outputs[i].isTensor(), mismatch(i));
      tensors.push_back(outputs[i].toTensor());
    }
    return gather(tensors, destination, dim);
  }
  if (first.isNone()) {
    return first;
  }
  if (first.isTuple()) {
    const auto size = first.toTupleRef().elements().size();
    std::vector<c10::IValue> gathered;
    for (size_t e = 0; e < size; ++e) {
      std::vector<c10::IValue> column;
      for (size_t i = 0; i < outputs.size(); ++i) {
        TORCH_DP_CHECK(
            outputs[i].isTuple() && outputs[i].toTupleRef().elements().size() == size, mismatch(i),
            " (tuples of the same size)");
        column.push_back(outputs[i].toTupleRef().elements()[e]);
      }
      gathered.push_back(gather_ivalues(column, destination, dim));
    }
    return c10::ivalue::Tuple::create(std::move(gathered));
  }
  if (first.isList()) {
    const auto size = first.toList().size();
    c10::impl::GenericList gathered(first.toList().elementType());
    for (size_t e = 0; e < size; ++e) {
      std::vector<c10::IValue> column;
      for (size_t i = 0; i < outputs.size(); ++i) {
        TORCH_DP_CHECK(
            outputs[i].isList() && outputs[i].toList().size() == size, mismatch(i), " (lists of the same size)");
        column.push_back(outputs[i].toList().get(e));
      }
      gathered.push_back(gather_ivalues(column, destination, dim));
    }
    return gathered;
  }
  if (first.isGenericDict()) {
    auto dict = first.toGenericDict();
    c10::impl::GenericDict gathered(dict.keyType(), dict.valueType());
    for (const auto& entry : dict) {
      std::vector<c10::IValue> column;
      for (size_t i = 0; i < outputs.size(); ++i) {
        TORCH_DP_CHECK(outputs[i].isGenericDict(), mismatch(i));
        auto other = outputs[i].toGenericDict();
        TORCH_DP_CHECK(
            other.size() == dict.size() && other.contains(entry.key()), "DataParallel: replica ", i,
            " returned a dict with other keys than replica 0's; all dicts must have the same keys");
        column.push_back(other.at(entry.key()));
      }
      gathered.insert(entry.key(), gather_ivalues(column, destination, dim));
    }
    return gathered;
  }
  TORCH_DP_CHECK(
      false,
      "DataParallel can only gather tensors, alone or inside tuples, lists and dicts (and None), "
      "but replica 0 returned a ",
      first.tagKind(), "; return a tensor instead");
}

}  // namespace detail
}  // namespace torch_dp
