#pragma once
// The C++ module's arguments per replica: tensors, alone or inside IValues, split with scatter (src/scatter.cpp);
// anything else given to every replica as it is. Used by data_parallel.h; users need not read it.

#include <torch_dp/scatter.h>

#include <ATen/core/ivalue.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace torch_dp::detail {

/// How one forward splits its arguments: devices, sizes and dim, and how many replicas it runs. plan_split
/// chunks every tensor argument at once, since the replica count depends on all of them (Note [Which tensors set
/// the batch], python/torch_dp/scatter_gather.py); split_argument then hands the chunks out in argument order.
struct SplitPlan {
  std::vector<c10::Device> devices;
  std::optional<std::vector<int64_t>> sizes;
  int64_t dim = 0;
  int64_t count = -1;                           // replicas that run; -1 until plan_split
  std::vector<std::vector<at::Tensor>> chunks;  // each tensor argument's chunks, one per replica, in order
  size_t next = 0;                              // the tensor argument split_tensor hands out next
};

/// The indices of the devices that run a replica: all of them, less those whose chunk size is 0.
std::vector<size_t> devices_that_run(const std::optional<std::vector<int64_t>>& sizes, size_t num_devices);

/// Adds the tensors inside `value` (alone, or inside tuples, lists and dicts) to `tensors`, in the order
/// split_ivalue hands their chunks out.
void collect_tensors(const c10::IValue& value, std::vector<at::Tensor>& tensors);
/// Chunks every tensor argument (scatter), and sets the number of replicas that run.
void plan_split(SplitPlan& plan, const std::vector<at::Tensor>& tensors);
/// The next tensor argument's chunks.
std::vector<at::Tensor> split_tensor(const at::Tensor& tensor, SplitPlan& plan);
/// An IValue argument per replica: its tensors' chunks, in the same tuples, lists and dicts.
std::vector<c10::IValue> split_ivalue(const c10::IValue& value, SplitPlan& plan);

/// Replica i's arguments from per-argument splits: element i of each (per_argument[k][i] for every k).
template <typename T>
std::vector<T> replica_column(const std::vector<std::vector<T>>& per_argument, size_t i) {
  std::vector<T> column;
  column.reserve(per_argument.size());
  for (const auto& per_replica : per_argument) {
    column.push_back(per_replica[i]);
  }
  return column;
}

/// Marks a forward argument that every replica receives as it is.
struct Unsplit {};

/// Adds the tensors of one forward argument (itself, or those inside an IValue) to `tensors`.
template <typename T>
void collect_argument(const T& value, std::vector<at::Tensor>& tensors) {
  if constexpr (std::is_same_v<T, at::Tensor>) {
    tensors.push_back(value);
  } else if constexpr (std::is_same_v<T, c10::IValue>) {
    collect_tensors(value, tensors);
  }
}

/// Per-replica copies of one forward argument: tensors (alone or inside IValues) are split, anything else
/// (ints, options, strings) is given to every replica as it is.
template <typename T>
auto split_argument(const T& value, SplitPlan& plan) {
  if constexpr (std::is_same_v<T, at::Tensor>) {
    return split_tensor(value, plan);
  } else if constexpr (std::is_same_v<T, c10::IValue>) {
    return split_ivalue(value, plan);
  } else {
    return Unsplit{};
  }
}

/// Replica i's value of an argument: its chunk, or the argument itself.
template <typename T, typename PerReplica>
const T& replica_argument(const T& original, const PerReplica& per_replica, size_t i) {
  if constexpr (std::is_same_v<PerReplica, Unsplit>) {
    return original;
  } else {
    return per_replica[i];
  }
}

}  // namespace torch_dp::detail
