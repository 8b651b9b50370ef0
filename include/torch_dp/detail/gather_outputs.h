#pragma once
// The C++ module's outputs gathered: a Tensor, std::vector<Tensor>, std::tuple of Tensors, or IValues holding
// tensors inside tuples, lists and dicts (src/gather.cpp). Used by data_parallel.h; users need not read it.

#include <torch_dp/gather.h>

#include <ATen/core/ivalue.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace torch_dp::detail {

/// Gathers IValues that hold tensors alone or inside tuples, lists and dicts (and None) along `dim`.
c10::IValue gather_ivalues(const std::vector<c10::IValue>& outputs, c10::Device destination, int64_t dim);

template <typename T>
struct IsTensorTuple : std::false_type {};
template <typename... Ts>
struct IsTensorTuple<std::tuple<Ts...>> : std::bool_constant<(std::is_same_v<Ts, at::Tensor> && ...)> {};

/// Gathers the replicas' outputs: a Tensor, std::vector<Tensor>, std::tuple of Tensors, or an IValue holding
/// tensors inside tuples, lists and dicts.
template <typename ReturnType>
ReturnType gather_outputs(std::vector<ReturnType>& outputs, c10::Device destination, int64_t dim) {
  if constexpr (std::is_same_v<ReturnType, at::Tensor>) {
    return gather(outputs, destination, dim);
  } else if constexpr (std::is_same_v<ReturnType, c10::IValue>) {
    return gather_ivalues(outputs, destination, dim);
  } else if constexpr (std::is_same_v<ReturnType, std::vector<at::Tensor>> || IsTensorTuple<ReturnType>::value) {
    std::vector<c10::IValue> values;
    values.reserve(outputs.size());
    for (auto& output : outputs) {
      values.emplace_back(std::move(output));
    }
    return gather_ivalues(values, destination, dim).template to<ReturnType>();
  } else {
    static_assert(
        std::is_same_v<ReturnType, at::Tensor>,
        "DataParallel gathers Tensor, std::vector<Tensor>, std::tuple<Tensor...> or IValue outputs");
  }
}

}  // namespace torch_dp::detail
