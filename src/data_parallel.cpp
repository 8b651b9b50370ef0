#include <torch_dp/data_parallel.h>

#include "message.h"
#include "test_access.h"

#include <torch_dp/comm.h>

#include <ATen/ATen.h>
#include <ATen/DeviceAccelerator.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <algorithm>
#include <map>
#include <memory>
#include <numeric>
#include <ostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

// Note [C++ replicas]
// ~~~~~~~~~~~~~~~~~~~
// torch::nn::parallel::data_parallel clones the whole module for every device on every call, the module's own
// device included. DataParallel clones once per replica slot and keeps the clones:
//  - The first slot on the module's device runs the module itself: no copy, and its in-place buffer updates
//    (BatchNorm) land in the module, which is PyTorch's replica-0 rule.
//  - A later slot on that device points its parameters at the module's memory (set_data), so an optimizer
//    step is seen without any copy, and keeps private buffers, refreshed from the module's before every
//    forward (detail::CoalescedCopies, bound to the replica's own tensors; Note [Stale copies]).
//  - A slot on another device holds coalesced copies of parameters and buffers, refreshed the same way.
// A clone's parameters are tensors of their own, so on each forward with grad mode on they get one
// ReplicaGrad node per slot (torch::autograd::set_history) whose edges lead to the module's parameters: their
// gradients pass through (same device) or are reduce-added onto the module's device (coalesced), and
// accumulate in the module's .grad like the unwrapped module's. If the module's parameters or buffers are
// replaced (other tensors, other count) or the devices change, the replicas are built again.

namespace torch_dp {
namespace detail {
namespace {

// Routes a replica's parameter gradients to the module's parameters.
// Autograd holds nodes in std::shared_ptr up to torch 2.11 (the GPU machine's torch) and in c10::intrusive_ptr
// in later releases: make a node the way the torch being compiled against holds it.
template <typename NodeType, typename... Args>
auto make_node(Args&&... args) {
  using NodePointer = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<NodePointer, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<NodeType>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<NodeType>(std::forward<Args>(args)...);
  }
}

struct ReplicaGrad : public torch::autograd::Node {
  ReplicaGrad(c10::Device destination, bool cross_device) : destination_(destination), cross_device_(cross_device) {}

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    if (!cross_device_) {
      return std::move(grads);
    }
    return reduce_add_coalesced({grads}, destination_);
  }

  std::string name() const override { return "torch_dp::ReplicaGradBackward"; }

 private:
  c10::Device destination_;
  bool cross_device_;
};

bool same_tensors(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) {
    return false;
  }
  for (size_t k = 0; k < a.size(); ++k) {
    if (a[k].unsafeGetTensorImpl() != b[k].unsafeGetTensorImpl()) {
      return false;
    }
  }
  return true;
}

} // namespace

struct ReplicaSet {
  struct Slot {
    c10::Device device{c10::kCPU};
    ModuleCaller module;
    bool is_original = false;
    std::vector<std::pair<torch::nn::Module*, torch::nn::Module*>> trees;  // (module's, replica's), pre-order
    std::vector<at::Tensor> params;                    // the replica's, in the module's order
    std::vector<size_t> shared_params;                 // params pointing at the module's memory
    std::vector<const void*> shared_data;              // the memory each was last pointed at
    std::vector<at::Tensor> copied_sources;            // the module's tensors this slot copies
    std::vector<at::Tensor> copied_aliases;            // the replica's tensors they are copied into
    std::optional<CoalescedCopies> copies;
  };

  std::mutex mutex;
  WorkerPool pool;
  bool trust_version_counters = false;
  bool copy_everything = false;  // test hook: later slots on the module's device copy parameters too
  std::vector<at::Tensor> params;
  std::vector<at::Tensor> buffers;
  std::vector<c10::Device> devices;
  std::vector<Slot> slots;
};

namespace {

bool all_on(const std::vector<at::Tensor>& tensors, c10::Device device) {
  for (const auto& t : tensors) {
    if (t.device() != device) {
      return false;
    }
  }
  return true;
}

void build_slot(ReplicaSet& set, const ModuleCaller& module, size_t j) {
  ReplicaSet::Slot slot;
  slot.device = set.devices[j];
  const bool first_on_device =
      std::find(set.devices.begin(), set.devices.begin() + j, slot.device) == set.devices.begin() + j;
  if (first_on_device && all_on(set.params, slot.device) && all_on(set.buffers, slot.device)) {
    slot.is_original = true;
    slot.module = module;
    set.slots.push_back(std::move(slot));
    return;
  }
  slot.module = module.clone(slot.device);
  auto original_root = module.ptr();
  auto replica_root = slot.module.ptr();
  slot.params = replica_root->parameters();
  auto replica_buffers = replica_root->buffers();
  TORCH_DP_CHECK(
      slot.params.size() == set.params.size() && replica_buffers.size() == set.buffers.size(),
      "DataParallel: the clone of the module has ", slot.params.size(), " parameters and ", replica_buffers.size(),
      " buffers, but the module has ", set.params.size(), " and ", set.buffers.size(),
      "; the module's clone() must reproduce its parameters and buffers");
  auto original_modules = original_root->modules();
  auto replica_modules = replica_root->modules();
  TORCH_DP_CHECK(original_modules.size() == replica_modules.size(), "DataParallel: the clone of the module has ",
                 replica_modules.size(), " submodules, but the module has ", original_modules.size());
  for (size_t m = 0; m < original_modules.size(); ++m) {
    slot.trees.emplace_back(original_modules[m].get(), replica_modules[m].get());
  }
  for (size_t k = 0; k < set.params.size(); ++k) {
    if (set.params[k].device() == slot.device && !set.copy_everything) {
      slot.shared_params.push_back(k);
    } else {
      slot.copied_sources.push_back(set.params[k]);
      slot.copied_aliases.push_back(slot.params[k]);
    }
  }
  for (size_t k = 0; k < set.buffers.size(); ++k) {
    slot.copied_sources.push_back(set.buffers[k]);
    slot.copied_aliases.push_back(replica_buffers[k]);
  }
  slot.shared_data.assign(slot.shared_params.size(), nullptr);
  if (!slot.copied_sources.empty()) {
    slot.copies.emplace(slot.copied_sources, slot.device, set.trust_version_counters);
    slot.copies->bind(slot.copied_aliases);
  }
  set.slots.push_back(std::move(slot));
}

void refresh_slot(ReplicaSet& set, ReplicaSet::Slot& slot) {
  if (slot.is_original) {
    return;
  }
  {
    c10::InferenceMode not_inference(false);
    at::NoGradGuard no_grad;
    for (size_t n = 0; n < slot.shared_params.size(); ++n) {
      const auto k = slot.shared_params[n];
      const auto& source = set.params[k];
      if (slot.shared_data[n] != source.const_data_ptr() || slot.params[k].sizes() != source.sizes() ||
          slot.params[k].strides() != source.strides() || slot.params[k].scalar_type() != source.scalar_type()) {
        slot.params[k].set_data(source);
        slot.shared_data[n] = source.const_data_ptr();
      }
    }
    if (slot.copies && !slot.copies->refresh(slot.copied_sources)) {
      slot.copies.emplace(slot.copied_sources, slot.device, set.trust_version_counters);  // new shape or dtype
      slot.copies->bind(slot.copied_aliases);
      slot.copies->refresh(slot.copied_sources);
    }
  }
  bool modes_differ = false;
  for (const auto& [original, replica] : slot.trees) {
    modes_differ = modes_differ || original->is_training() != replica->is_training();
  }
  if (modes_differ) {
    for (const auto& [original, replica] : slot.trees) {  // pre-order: a child's own call comes last
      replica->train(original->is_training());
    }
  }
  if (!c10::GradMode::is_enabled()) {
    return;
  }
  std::vector<size_t> needs_grad;
  for (size_t k = 0; k < set.params.size(); ++k) {
    if (set.params[k].requires_grad()) {
      needs_grad.push_back(k);
    } else if (slot.params[k].requires_grad()) {
      // Frozen in the module, so frozen in the replica: a clone's parameters start out requiring grad (reset()
      // makes fresh ones), and one trainable at an earlier forward still carries that forward's ReplicaGrad.
      // Left so, the replica would compute (and keep) gradients the module does not want, and its outputs would
      // require grad where the module's do not.
      slot.params[k].detach_();
    }
  }
  if (needs_grad.empty()) {
    return;
  }
  const auto source_device = set.params[needs_grad[0]].device();
  auto node = make_node<ReplicaGrad>(source_device, source_device != slot.device);
  for (auto k : needs_grad) {
    node->add_next_edge(torch::autograd::impl::gradient_edge(set.params[k]));
  }
  for (auto k : needs_grad) {
    torch::autograd::set_history(slot.params[k], node);
  }
}

} // namespace

namespace {

// The indices of the devices that run a replica: all of them, less those whose chunk size is 0 (Note [Empty
// chunks], python/torch_dp/data_parallel.py).
std::vector<size_t> devices_that_run(const std::optional<std::vector<int64_t>>& sizes, size_t num_devices) {
  std::vector<size_t> runs;
  for (size_t i = 0; i < num_devices; ++i) {
    if (!sizes || i >= sizes->size() || (*sizes)[i] != 0) {
      runs.push_back(i);
    }
  }
  return runs;
}

// The rule of Note [Which tensors set the batch] (python/torch_dp/parallel.py), for the C++ module's arguments:
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
        counts += detail::message(j == 0 ? "" : "; ", "tensor argument ", j, " of shape ", tensors[j].sizes(), " -> ",
                                  plan.chunks[j].size(), " chunks");
      }
      TORCH_DP_CHECK(false, "DataParallel: the tensor arguments split into different numbers of chunks over ",
                     plan.devices.size(), " devices along dim ", plan.dim, ": ", counts,
                     "; give every tensor argument the same size along dim ", plan.dim, " (only a tensor that holds ",
                     "one value per replica, expanded along dim ", plan.dim, " or with one equal row per device, may ",
                     "give more chunks than the batch: it is cut to the replicas that run)");
    }
  }
  for (auto& chunks : plan.chunks) {
    chunks.resize(static_cast<size_t>(count));
  }
}

} // namespace

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
        TORCH_DP_CHECK(runs.back() < chunks.size(), "DataParallel: a tensor argument of shape ", tensor.sizes(),
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
  TORCH_DP_CHECK(plan.next < plan.chunks.size(), "DataParallel: the tensor of shape ", tensor.sizes(),
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

c10::IValue gather_ivalues(const std::vector<c10::IValue>& outputs, c10::Device destination, int64_t dim) {
  TORCH_DP_CHECK(!outputs.empty(), "DataParallel: no outputs to gather");
  const auto& first = outputs[0];
  auto mismatch = [&](size_t i) {
    return detail::message("DataParallel: replica ", i, " returned a ", outputs[i].tagKind(),
                           " where replica 0 returned a ", first.tagKind(),
                           "; every replica must return the same structure");
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
        TORCH_DP_CHECK(outputs[i].isTuple() && outputs[i].toTupleRef().elements().size() == size, mismatch(i),
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
        TORCH_DP_CHECK(outputs[i].isList() && outputs[i].toList().size() == size, mismatch(i),
                       " (lists of the same size)");
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
        TORCH_DP_CHECK(other.size() == dict.size() && other.contains(entry.key()), "DataParallel: replica ", i,
                       " returned a dict with other keys than replica 0's; all dicts must have the same keys");
        column.push_back(other.at(entry.key()));
      }
      gathered.insert(entry.key(), gather_ivalues(column, destination, dim));
    }
    return gathered;
  }
  TORCH_DP_CHECK(false, "DataParallel can only gather tensors, alone or inside tuples, lists and dicts (and None), "
                 "but replica 0 returned a ", first.tagKind(), "; return a tensor instead");
}

namespace {
bool same_options(const DataParallelOptions& a, const DataParallelOptions& b) {
  return a.devices() == b.devices() && a.output_device() == b.output_device() && a.dim() == b.dim() &&
      a.chunk_sizes() == b.chunk_sizes() && a.issuing() == b.issuing() &&
      a.trust_version_counters() == b.trust_version_counters();
}
} // namespace

DataParallel cached_data_parallel(const ModuleCaller& caller, const DataParallelOptions& options) {
  const auto module = caller.ptr();
  struct Entry {
    std::weak_ptr<torch::nn::Module> module;
    DataParallel parallel{nullptr};
  };
  static std::mutex mutex;
  static std::map<const torch::nn::Module*, Entry> cache;
  std::lock_guard<std::mutex> lock(mutex);
  for (auto it = cache.begin(); it != cache.end();) {
    it = it->second.module.expired() ? cache.erase(it) : std::next(it);
  }
  auto& entry = cache[module.get()];
  if (entry.module.lock() != module || !entry.parallel || !same_options(entry.parallel->options, options)) {
    entry = Entry{module, DataParallel(std::make_shared<DataParallelImpl>(caller, options))};
  }
  return entry.parallel;
}

ModuleCaller ModuleCaller::clone(const std::optional<c10::Device>& device) const {
  if (sequential_) {
    return ModuleCaller(std::dynamic_pointer_cast<torch::nn::SequentialImpl>(sequential_->clone(device)));
  }
  return ModuleCaller(any_.clone(device));
}

} // namespace detail

DataParallelImpl::DataParallelImpl(detail::ModuleCaller module, DataParallelOptions options_)
    : options(std::move(options_)), module_(std::move(module)) {
  TORCH_DP_CHECK(!module_.empty(), "DataParallel: expected a module to wrap, but got an empty module");
  reset();
}

void DataParallelImpl::reset() {
  if (named_children().contains("module")) {
    replace_module("module", module_.ptr());
  } else {
    register_module("module", module_.ptr());
  }
  devices_ = options.devices();
  if (devices_.empty()) {
    // Every accelerator device, as torch.nn.DataParallel does; none: forward calls the module directly.
    if (auto accelerator = at::getAccelerator(false)) {
      c10::impl::VirtualGuardImpl impl(*accelerator);
      for (c10::DeviceIndex i = 0; i < impl.deviceCount(); ++i) {
        devices_.emplace_back(*accelerator, i);
      }
    }
  }
  for (const auto& device : devices_) {
    TORCH_DP_CHECK(device.is_cpu() || device.has_index(), "DataParallel: device ", device.str(),
                   " has no index; give every accelerator device an index, e.g. cuda:0");
  }
  replica_devices_ = devices_;
  if (options.chunk_sizes()) {
    const auto& sizes = *options.chunk_sizes();
    TORCH_DP_CHECK(sizes.size() == devices_.size(), "DataParallel: expected one chunk size per ",
                   "device (", devices_.size(), " devices), but got ", sizes.size(), " chunk sizes");
    for (size_t i = 0; i < sizes.size(); ++i) {
      TORCH_DP_CHECK(sizes[i] >= 0, "DataParallel: chunk sizes must be non-negative, but chunk ", i, " has size ",
                     sizes[i]);
    }
    // Note [Empty chunks] (python/torch_dp/data_parallel.py): a device whose size is 0 runs no replica, except the
    // first, whose replica is the module itself and keeps its buffer updates.
    TORCH_DP_CHECK(sizes.empty() || sizes[0] > 0, "DataParallel: the first chunk size must not be 0, but got ",
                   sizes, ": the first device's replica is the module itself, which keeps its buffer updates ",
                   "(BatchNorm's running statistics); give it at least one row (a 0 is allowed for the other ",
                   "devices, which then run no replica)");
    replica_devices_.clear();
    for (auto i : detail::devices_that_run(sizes, devices_.size())) {
      replica_devices_.push_back(devices_[i]);
    }
  }
  replica_set_ = std::make_shared<detail::ReplicaSet>();
  replica_set_->trust_version_counters = options.trust_version_counters();
}

std::shared_ptr<torch::nn::Module> DataParallelImpl::clone(const std::optional<c10::Device>& device) const {
  return std::make_shared<DataParallelImpl>(module_.clone(device), options);
}

void DataParallelImpl::pretty_print(std::ostream& stream) const {
  // Devices are formatted with str(), never streamed (see DESIGN.md, rule 7).
  std::string devices;
  for (const auto& device : devices_) {
    devices += (devices.empty() ? "" : ", ") + device.str();
  }
  stream << "torch_dp::DataParallel(devices=[" << devices << "], dim=" << std::to_string(options.dim()) << ")";
}

c10::Device DataParallelImpl::output_device() const {
  if (options.output_device()) {
    return *options.output_device();
  }
  TORCH_DP_CHECK(!devices_.empty(), "DataParallel: no devices");
  return devices_[0];
}

std::vector<detail::ModuleCaller*> DataParallelImpl::replicas(size_t count) {
  auto& set = *replica_set_;
  auto root = module_.ptr();
  auto params = root->parameters();
  auto buffers = root->buffers();
  if (!detail::same_tensors(params, set.params) || !detail::same_tensors(buffers, set.buffers) ||
      set.devices != replica_devices_) {
    set.slots.clear();
    set.params = std::move(params);
    set.buffers = std::move(buffers);
    set.devices = replica_devices_;
  }
  while (set.slots.size() < count) {
    detail::build_slot(set, module_, set.slots.size());
  }
  std::vector<detail::ModuleCaller*> result;
  for (size_t j = 0; j < count; ++j) {
    detail::refresh_slot(set, set.slots[j]);
    result.push_back(&set.slots[j].module);
  }
  return result;
}

void detail::TestAccess::copy_everything(DataParallelImpl& parallel) {
  auto guard = parallel.lock();
  parallel.replica_set_->copy_everything = true;
  parallel.replica_set_->slots.clear();
}

WorkerPool& DataParallelImpl::pool() {
  return replica_set_->pool;
}

std::unique_lock<std::mutex> DataParallelImpl::lock() {
  return std::unique_lock<std::mutex>(replica_set_->mutex);
}

} // namespace torch_dp
