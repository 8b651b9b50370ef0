#include <torch_dp/detail/split_arguments.h>

#include "message.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

// The C++ front-ends' arguments, split per replica: the tensors among them chunked with scatter, the same for
// every argument, and the IValues around them rebuilt per replica.

namespace torch_dp {
namespace detail {

// The indices of the devices that run a replica: all of them, less those whose chunk size is 0 (Note [Empty
// chunks], python/torch_dp/arguments.py).
std::vector<size_t> devices_that_run(const std::optional<std::vector<int64_t>>& sizes, size_t num_devices) {
  std::vector<size_t> runs;
  for (size_t i = 0; i < num_devices; ++i) {
    if (!sizes || i >= sizes->size() || (*sizes)[i] != 0) {
      runs.push_back(i);
    }
  }
  return runs;
}

namespace {

// The rule of Note [Which tensors set the batch] (python/torch_dp/scatter_gather.py), for the C++ module's arguments:
bool is_expanded(const at::Tensor& tensor, int64_t dim) {
  return tensor.layout() == at::kStrided && tensor.size(dim) > 1 && tensor.stride(dim) == 0;
}

// Whether dropping some of the tensor's chunks loses nothing: it holds one value per replica.
bool is_per_replica(const at::Tensor& tensor, int64_t dim, size_t num_devices) {
  const auto size = tensor.size(dim);
  if (size == 0 || is_expanded(tensor, dim)) {
    return true;
  }
  if (size != static_cast<int64_t>(num_devices) || tensor.layout() != at::kStrided) {
    return false;
  }
  const auto values = tensor.detach();
  return at::equal(values, values.narrow(dim, 0, 1).expand_as(values));
}

void cut_to_batch(SplitPlan& plan, const std::vector<at::Tensor>& tensors) {
  // The smallest chunk count among the tensors not expanded along dim; among all of them if every one is.
  int64_t count = -1;
  int64_t count_of_all = -1;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const auto chunks = static_cast<int64_t>(plan.chunks[k].size());
    count_of_all = count_of_all < 0 ? chunks : std::min(count_of_all, chunks);
    if (!is_expanded(tensors[k], plan.dim)) {
      count = count < 0 ? chunks : std::min(count, chunks);
    }
  }
  count = count < 0 ? count_of_all : count;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const auto chunks = static_cast<int64_t>(plan.chunks[k].size());
    if (chunks < count || (chunks > count && !is_per_replica(tensors[k], plan.dim, plan.devices.size()))) {
      // torch::nn::parallel::data_parallel has one input; torch.nn.DataParallel silently drops the extra chunks.
      std::string counts;
      for (size_t j = 0; j < tensors.size(); ++j) {
        counts += detail::message(
            j == 0 ? "" : "; ", "tensor argument ", j, " of shape ", tensors[j].sizes(), " -> ", plan.chunks[j].size(),
            " chunks");
      }
      TORCH_DP_CHECK(
          false, "DataParallel: the tensor arguments split into different numbers of chunks over ", plan.devices.size(),
          " devices along dim ", plan.dim, ": ", counts, "; give every tensor argument the same size along dim ",
          plan.dim, " (only a tensor that holds ", "one value per replica, expanded along dim ", plan.dim,
          " or with one equal row per device, may ",
          "give more chunks than the batch: it is cut to the replicas that run)");
    }
  }
  for (auto& chunks : plan.chunks) {
    chunks.resize(static_cast<size_t>(count));
  }
}

}  // namespace

void collect_tensors(const c10::IValue& value, std::vector<at::Tensor>& tensors) {
  // The order split_ivalue hands the chunks out in.
  if (value.isTensor()) {
    tensors.push_back(value.toTensor());
  } else if (value.isTuple()) {
    for (const auto& e : value.toTupleRef().elements()) {
      collect_tensors(e, tensors);
    }
  } else if (value.isList()) {
    for (const auto& e : value.toList()) {
      collect_tensors(e, tensors);
    }
  } else if (value.isGenericDict()) {
    for (const auto& entry : value.toGenericDict()) {
      collect_tensors(entry.value(), tensors);
    }
  }
}

void plan_split(SplitPlan& plan, const std::vector<at::Tensor>& tensors) {
  const auto runs = devices_that_run(plan.sizes, plan.devices.size());
  std::vector<c10::Device> run_devices;
  std::vector<int64_t> run_sizes;
  for (auto i : runs) {
    run_devices.push_back(plan.devices[i]);
    if (plan.sizes && i < plan.sizes->size()) {
      run_sizes.push_back((*plan.sizes)[i]);
    }
  }
  plan.chunks.clear();
  plan.next = 0;
  if (!plan.sizes) {
    for (const auto& tensor : tensors) {
      plan.chunks.push_back(scatter(tensor, plan.devices, std::nullopt, plan.dim));
    }
    for (const auto& chunks : plan.chunks) {
      if (chunks.size() != plan.chunks[0].size()) {
        cut_to_batch(plan, tensors);
        break;
      }
    }
  } else {
    const auto total = std::accumulate(plan.sizes->begin(), plan.sizes->end(), int64_t{0});
    for (const auto& tensor : tensors) {
      if (tensor.dim() > 0 && tensor.size(plan.dim) != total && is_per_replica(tensor, plan.dim, plan.devices.size())) {
        // One value per replica: split as without chunk sizes, each replica that runs taking its device's chunk.
        auto chunks = scatter(tensor, plan.devices, std::nullopt, plan.dim);
        TORCH_DP_CHECK(
            runs.back() < chunks.size(), "DataParallel: a tensor argument of shape ", tensor.sizes(),
            " that holds one value per replica gives ", chunks.size(), " chunks over ", plan.devices.size(),
            " devices along dim ", plan.dim, ", but device ", runs.back(),
            " runs a replica; give it one row per device");
        std::vector<at::Tensor> kept;
        for (auto i : runs) {
          kept.push_back(chunks[i]);
        }
        plan.chunks.push_back(std::move(kept));
      } else if (tensor.dim() > 0 && tensor.size(plan.dim) == total) {
        plan.chunks.push_back(scatter(tensor, run_devices, run_sizes, plan.dim));
      } else {
        plan.chunks.push_back(scatter(tensor, plan.devices, plan.sizes, plan.dim));  // raises, naming the sizes
      }
    }
  }
  plan.count = plan.chunks.empty() ? static_cast<int64_t>(runs.size()) : static_cast<int64_t>(plan.chunks[0].size());
}

std::vector<at::Tensor> split_tensor(const at::Tensor& tensor, SplitPlan& plan) {
  TORCH_DP_CHECK(
      plan.next < plan.chunks.size(), "DataParallel: the tensor of shape ", tensor.sizes(),
      " was not planned (plan_split must see every tensor argument first)");
  return plan.chunks[plan.next++];
}

std::vector<c10::IValue> split_ivalue(const c10::IValue& value, SplitPlan& plan) {
  if (value.isTensor()) {
    auto chunks = split_tensor(value.toTensor(), plan);
    return std::vector<c10::IValue>(chunks.begin(), chunks.end());
  }
  const auto count = static_cast<size_t>(plan.count);
  if (value.isTuple()) {
    std::vector<std::vector<c10::IValue>> parts;
    for (const auto& e : value.toTupleRef().elements()) {
      parts.push_back(split_ivalue(e, plan));
    }
    std::vector<c10::IValue> result;
    for (size_t r = 0; r < count; ++r) {
      std::vector<c10::IValue> items;
      for (auto& part : parts) {
        items.push_back(part[r]);
      }
      result.emplace_back(c10::ivalue::Tuple::create(std::move(items)));
    }
    return result;
  }
  if (value.isList()) {
    auto list = value.toList();
    std::vector<std::vector<c10::IValue>> parts;
    for (const auto& e : list) {
      parts.push_back(split_ivalue(e, plan));
    }
    std::vector<c10::IValue> result;
    for (size_t r = 0; r < count; ++r) {
      c10::impl::GenericList items(list.elementType());
      for (auto& part : parts) {
        items.push_back(part[r]);
      }
      result.emplace_back(std::move(items));
    }
    return result;
  }
  if (value.isGenericDict()) {
    auto dict = value.toGenericDict();
    std::vector<std::pair<c10::IValue, std::vector<c10::IValue>>> parts;
    for (const auto& entry : dict) {
      parts.emplace_back(entry.key(), split_ivalue(entry.value(), plan));
    }
    std::vector<c10::IValue> result;
    for (size_t r = 0; r < count; ++r) {
      c10::impl::GenericDict items(dict.keyType(), dict.valueType());
      for (auto& [key, part] : parts) {
        items.insert(key, part[r]);
      }
      result.emplace_back(std::move(items));
    }
    return result;
  }
  return std::vector<c10::IValue>(count, value);
}

}  // namespace detail
}  // namespace torch_dp
