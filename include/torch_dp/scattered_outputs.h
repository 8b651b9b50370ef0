#pragma once
// scattered_outputs: the outputs of a DataParallel forward left on the devices that computed them
// (DataParallel::forward_scattered), for a ParallelCriterion (criterion.h) or a gather later.

#include <torch_dp/detail/gather_outputs.h>
#include <torch_dp/worker_pool.h>

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <c10/core/Device.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace torch_dp {

namespace detail {
/// The first tensor of an output (in the order gather visits them); undefined when it holds none.
inline at::Tensor first_tensor(const at::Tensor& output) {
  return output;
}
inline at::Tensor first_tensor(const std::vector<at::Tensor>& output) {
  return output.empty() ? at::Tensor() : output.front();
}
at::Tensor first_tensor(const c10::IValue& output);
template <typename... Ts>
at::Tensor first_tensor(const std::tuple<Ts...>& output) {
  if constexpr (sizeof...(Ts) == 0) {
    return at::Tensor();
  } else {
    return first_tensor(std::get<0>(output));
  }
}
/// The size along dim of the output's first tensor; -1 when it has no tensor or no such dimension.
int64_t rows_along(const at::Tensor& tensor, int64_t dim);
}  // namespace detail

/// The outputs of a DataParallel forward left where the replicas computed them: outputs[i] (a Tensor,
/// std::vector<Tensor>, std::tuple of Tensors or IValue) on devices[i], chunk_sizes[i] its first tensor's size
/// along dim (-1 where it has none). gather() gives what forward_as<Output> would have returned. `pool`,
/// `issuing` and `reproducible` are how a ParallelCriterion runs its tasks: as the DataParallel's forward did
/// (a null pool: the criterion's own).
template <typename Output = at::Tensor>
struct ScatteredOutputs {
  std::vector<Output> outputs;
  std::vector<c10::Device> devices;
  std::vector<int64_t> chunk_sizes;
  int64_t dim = 0;
  c10::Device output_device = c10::kCPU;
  std::shared_ptr<WorkerPool> pool;
  Issuing issuing = Issuing::kAuto;
  bool reproducible = false;

  size_t size() const { return outputs.size(); }
  const Output& operator[](size_t i) const { return outputs[i]; }

  /// The outputs concatenated along dim on `destination` (default output_device), as forward_as gathers them.
  Output gather(std::optional<c10::Device> destination = std::nullopt) const {
    auto copies = outputs;
    return detail::gather_outputs<Output>(copies, destination.value_or(output_device), dim);
  }

  /// fn applied to every output, the devices and everything else kept (chunk sizes from fn's results): e.g. the
  /// logits out of an IValue output, for a ParallelCriterion, which takes tensors.
  template <typename Fn>
  auto map(Fn&& fn) const -> ScatteredOutputs<std::decay_t<std::invoke_result_t<Fn&, const Output&>>> {
    ScatteredOutputs<std::decay_t<std::invoke_result_t<Fn&, const Output&>>> result;
    for (const auto& output : outputs) {
      result.outputs.push_back(fn(output));
    }
    result.devices = devices;
    result.dim = dim;
    result.output_device = output_device;
    result.pool = pool;
    result.issuing = issuing;
    result.reproducible = reproducible;
    result.fill_chunk_sizes();
    return result;
  }

  /// chunk_sizes from outputs and dim.
  void fill_chunk_sizes() {
    chunk_sizes.clear();
    for (const auto& output : outputs) {
      chunk_sizes.push_back(detail::rows_along(detail::first_tensor(output), dim));
    }
  }
};

}  // namespace torch_dp
