#include <torch_dp/scatter.h>

#include "message.h"

#include "autograd_functions.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/GradMode.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <numeric>
#include <string>

namespace torch_dp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The chunks of input, each on its device: ScatterFunction's forward.
variable_list split_to_devices(
    const at::Tensor& input, const std::vector<c10::Device>& devices, const std::vector<int64_t>& sizes, int64_t dim) {
  auto chunks = input.split_with_sizes(sizes, dim);
  for (size_t i = 0; i < chunks.size(); ++i) {
    if (devices[i] != input.device()) {
      // Allocate under the target's guard so the copy is ordered on that device's current stream.
      c10::OptionalDeviceGuard guard;
      if (!devices[i].is_cpu()) {
        guard.reset_device(devices[i]);
      }
      chunks[i] = chunks[i].to(
          chunks[i].options().device(devices[i]), /*non_blocking=*/true, /*copy=*/false, c10::MemoryFormat::Preserve);
    }
  }
  return chunks;
}

struct ScatterFunction : public torch::autograd::Function<ScatterFunction> {
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const std::vector<c10::Device>& devices,
      const std::vector<int64_t>& sizes, int64_t dim) {
    ctx->saved_data["input_device_type"] = static_cast<int64_t>(input.device().type());
    ctx->saved_data["input_device_index"] = static_cast<int64_t>(input.device().index());
    ctx->saved_data["dim"] = dim;
    std::vector<c10::Device> spanned(devices);
    spanned.push_back(input.device());
    ctx->saved_data["streams"] = detail::pack_streams(detail::current_streams(spanned));
    return split_to_devices(input, devices, sizes, dim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const c10::Device input_device(
        static_cast<c10::DeviceType>(ctx->saved_data["input_device_type"].toInt()),
        static_cast<c10::DeviceIndex>(ctx->saved_data["input_device_index"].toInt()));
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const c10::MultiStreamGuard streams(detail::unpack_streams(ctx->saved_data["streams"].toIntVector()));
    return {detail::gather_function(grads, input_device, dim), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::vector<int64_t> chunk_sizes(int64_t size, int64_t num_chunks) {
  TORCH_DP_CHECK(num_chunks > 0, "chunk_sizes: the number of chunks must be positive, but got ", num_chunks);
  TORCH_DP_CHECK(size >= 0, "chunk_sizes: the size must be non-negative, but got ", size);
  if (size == 0) {
    return std::vector<int64_t>(num_chunks, 0);
  }
  const int64_t split = (size + num_chunks - 1) / num_chunks;
  std::vector<int64_t> sizes;
  for (int64_t left = size; left > 0; left -= split) {
    sizes.push_back(std::min(split, left));
  }
  return sizes;
}

std::vector<at::Tensor> scatter(
    const at::Tensor& input, at::ArrayRef<c10::Device> devices, const std::optional<std::vector<int64_t>>& sizes,
    int64_t dim) {
  TORCH_DP_CHECK(input.defined(), "scatter: expected a tensor, but got an undefined tensor");
  TORCH_DP_CHECK(!devices.empty(), "scatter: expected at least one device to scatter to");
  TORCH_DP_CHECK(
      input.dim() > 0, "scatter: cannot split a 0-dim (scalar) tensor along dim ", dim,
      "; DataParallel splits tensor inputs along the batch dimension, so pass tensors with at least one dimension");
  dim = c10::maybe_wrap_dim(dim, input.dim());
  const int64_t length = input.size(dim);
  std::vector<int64_t> split;
  if (sizes) {
    TORCH_DP_CHECK(
        sizes->size() == devices.size(), "scatter: expected one chunk size per device, but got ", sizes->size(),
        " chunk sizes for ", devices.size(), " devices");
    for (size_t i = 0; i < sizes->size(); ++i) {
      TORCH_DP_CHECK(
          (*sizes)[i] >= 0, "scatter: chunk sizes must be non-negative, but chunk ", i, " has size ", (*sizes)[i]);
    }
    const int64_t total = std::accumulate(sizes->begin(), sizes->end(), int64_t{0});
    TORCH_DP_CHECK(
        total == length, "scatter: the chunk sizes add up to ", total, " but the tensor has ", length,
        " elements along dim ", dim, " (sizes ", c10::IntArrayRef(*sizes), ", tensor shape ", input.sizes(), ")");
    split = *sizes;
  } else {
    split = chunk_sizes(length, static_cast<int64_t>(devices.size()));
  }
  std::vector<c10::Device> used(devices.begin(), devices.begin() + split.size());
  for (const auto& device : used) {
    TORCH_DP_CHECK(
        device.is_cpu() || device.has_index(), "scatter: device ", device.str(),
        " has no index; give every accelerator device an index");
  }
  if (used.size() == 1 && used[0] == input.device()) {
    // Note [One chunk where the input is]
    // ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    // The whole tensor on the device it is on: the input itself, as the module called directly gets it. A split
    // into one view would cost more than the rest of the step (a view op and its autograd node) for the same
    // values and gradients; one-device DataParallels, the commonest, scatter every forward.
    return {input};
  }
  return detail::scatter_function(input, used, split, dim);
}

namespace detail {

std::vector<at::Tensor> scatter_function(
    const at::Tensor& input, const std::vector<c10::Device>& devices, const std::vector<int64_t>& sizes, int64_t dim) {
  if (!c10::GradMode::is_enabled()) {
    // Note [No graph without grad mode]
    // ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    // Without grad mode an autograd Function records nothing: it runs its forward with grad mode off and returns
    // what the forward made (new tensors and views alike) as they are. The forward alone gives the same tensors,
    // without the node, its saved data and the wrapping of outputs, which cost more than the split itself for a
    // small batch (BENCHMARKS.md, per-forward overhead). The same holds for gather_function.
    return split_to_devices(input, devices, sizes, dim);
  }
  return ScatterFunction::apply(input, devices, sizes, dim);
}

std::vector<int64_t> device_types(const std::vector<c10::Device>& devices) {
  std::vector<int64_t> out;
  out.reserve(devices.size());
  for (const auto& d : devices) {
    out.push_back(static_cast<int64_t>(d.type()));
  }
  return out;
}

std::vector<int64_t> device_indices(const std::vector<c10::Device>& devices) {
  std::vector<int64_t> out;
  out.reserve(devices.size());
  for (const auto& d : devices) {
    out.push_back(static_cast<int64_t>(d.index()));
  }
  return out;
}

std::vector<c10::Device> devices_from(c10::ArrayRef<int64_t> types, c10::ArrayRef<int64_t> indices) {
  std::vector<c10::Device> out;
  out.reserve(types.size());
  for (size_t i = 0; i < types.size(); ++i) {
    out.emplace_back(static_cast<c10::DeviceType>(types[i]), static_cast<c10::DeviceIndex>(indices[i]));
  }
  return out;
}

// Note [Streams of a backward across devices]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A forward queues its work on the caller's current stream of each device (replicas included: run_replicas
// gives every worker the caller's streams), and the autograd engine runs each node's backward on the stream its
// forward ran on, but for one device only: that of the node's first input. A node that spans devices (scatter,
// gather, the broadcast of copies) would otherwise copy from the other devices on whatever stream is current
// there on the engine's thread, their default stream, while the gradients it copies were computed on the
// caller's streams: with a current stream other than the default (`with torch.cuda.stream(s)`), the copy races
// the computation and reads what was there before (NaN on the simulated devices). So these nodes keep the
// current stream of every device they span at forward time and make them current for their backward; their
// cross-device copies are then ordered after the work that produced what they read, and the work on each device
// that follows, on the same streams, after the copies (as ATen orders a copy between devices).
std::vector<c10::Stream> current_streams(at::ArrayRef<c10::Device> devices) {
  std::vector<c10::Stream> streams;
  for (const auto& device : devices) {
    if (device.is_cpu() || !device.has_index()) {
      continue;
    }
    if (std::none_of(streams.begin(), streams.end(), [&](const c10::Stream& s) { return s.device() == device; })) {
      streams.push_back(c10::impl::VirtualGuardImpl(device.type()).getStream(device));
    }
  }
  return streams;
}

std::vector<int64_t> pack_streams(const std::vector<c10::Stream>& streams) {
  std::vector<int64_t> packed;
  packed.reserve(3 * streams.size());
  for (const auto& stream : streams) {
    const auto data = stream.pack3();
    packed.push_back(data.stream_id);
    packed.push_back(data.device_index);
    packed.push_back(static_cast<int64_t>(data.device_type));
  }
  return packed;
}

std::vector<c10::Stream> unpack_streams(c10::ArrayRef<int64_t> packed) {
  std::vector<c10::Stream> streams;
  for (size_t i = 0; i + 2 < packed.size(); i += 3) {
    streams.push_back(c10::Stream::unpack3(
        packed[i], static_cast<c10::DeviceIndex>(packed[i + 1]), static_cast<c10::DeviceType>(packed[i + 2])));
  }
  return streams;
}

}  // namespace detail
}  // namespace torch_dp
