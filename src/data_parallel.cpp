#include <torch_dp/data_parallel.h>

#include "message.h"
#include "test_access.h"

#include <torch_dp/detail/replica_slots.h>
#include <torch_dp/replicate.h>

#include <ATen/ATen.h>
#include <ATen/DeviceAccelerator.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>
#include <c10/util/Type.h>

#include <algorithm>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <typeinfo>
#include <utility>

// Note [C++ replicas]
// ~~~~~~~~~~~~~~~~~~~
// torch::nn::parallel::data_parallel clones the whole module for every device on every call, the module's own
// device included. DataParallel clones once per replica slot and keeps the clones; their tensors come from the
// same Replicator as the Python package's replicas (Note [Persistent replicas] in replicate.cpp):
//  - The first slot on the module's device runs the module itself: no copy, and its in-place buffer updates
//    (BatchNorm) land in the module, which is PyTorch's replica-0 rule.
//  - Every other slot is a clone bound to the Replicator, which fills the clone's own tensors in place before
//    every forward: a later slot on the module's device points its parameters at the module's memory
//    (set_data), so an optimizer step is seen without any copy, and its buffers at private copies; a slot on
//    another device points everything at coalesced copies (Note [Stale copies] in coalesced_copies.cpp).
// With grad mode on, the clone's parameters carry the broadcast node (Note [Broadcast grad] in comm.cpp),
// whose edges lead to the module's parameters, so gradients accumulate in the module's .grad like the
// unwrapped module's. If the module's parameters or buffers are replaced (other tensors, other count) or the
// devices change, the replicas are built again.
// The slots are a detail::ReplicaSlots (replica_slots.h), the container ScriptReplicas keeps too; what is
// DataParallel's own is the clone (clone_slot) and train()/eval() carried over per submodule
// (sync_training_modes). Clones are made only for the slots a forward uses, and kept.

namespace torch_dp {
namespace detail {

// The module's replicas: the module itself and clones, their submodules paired with the module's (pre-order).
struct ReplicaSet : ReplicaSlots<ModuleCaller, torch::nn::Module> {
  using ReplicaSlots::ReplicaSlots;
};

namespace {

// The unqualified name, for the struct line of the fix ("Net" for "app::Net"); a template's name as it is.
std::string unqualified(const std::string& type) {
  const auto colons = type.rfind("::");
  return type.find('<') != std::string::npos || colons == std::string::npos ? type : type.substr(colons + 2);
}

}  // namespace

[[noreturn]] void throw_not_cloneable(
    const std::string& type, const std::string& culprit, const std::string& needed_for) {
  const auto name = unqualified(culprit);
  const auto what = culprit == type ? std::string("it") : culprit + ", used inside " + type + ",";
  TORCH_DP_CHECK(
      false, "DataParallel: cannot replicate ", type, ": ", what,
      " derives from torch::nn::Module, which does not implement clone(). DataParallel runs the module itself ",
      "as its first replica and a copy made with clone() as every other (here: ", needed_for,
      "), and a torch::nn module gets clone() by deriving from torch::nn::Cloneable. Declare it as\n", "    struct ",
      name, " : torch::nn::Cloneable<", name, "> {  // instead of torch::nn::Module\n",
      "      void reset() override { /* register_module / register_parameter calls */ }\n",
      "and call reset() from the constructor (clone() calls it to build the copy's submodules and parameters). ",
      "A single device that holds the module needs no copy.");
  TORCH_INTERNAL_ASSERT(false);  // TORCH_DP_CHECK(false, ...) has thrown
}

void throw_wrong_module_type(const torch::nn::Module& module, const char* requested) {
  const auto wrapped = c10::demangle(typeid(module).name());
  TORCH_DP_CHECK(
      false, "DataParallel::module_as<", c10::demangle(requested), ">: the wrapped module is a ", wrapped, ", not a ",
      c10::demangle(requested), " (nor derived from it); ask for module_as<", wrapped, ">()");
  TORCH_INTERNAL_ASSERT(false);  // TORCH_DP_CHECK(false, ...) has thrown
}

namespace {

// The module's clone for a replica on `device`, or an error that says what the module lacks (Note [Plain modules]
// in module_caller.h).
ModuleCaller clone_for_replica(const ModuleCaller& module, c10::Device device) {
  const auto type = c10::demangle(typeid(*module.ptr()).name());
  ModuleCaller clone;
  try {
    clone = module.clone(device);
  } catch (const c10::Error& error) {
    const std::string text = error.what_without_backtrace();
    // torch's text: "clone() has not been implemented for <name>. Subclass torch::nn::Cloneable<<name>> ..."
    const std::string marker = "clone() has not been implemented for ";
    const auto at = text.find(marker);
    if (at == std::string::npos) {
      throw;
    }
    const auto begin = at + marker.size();
    const auto end = text.find(". Subclass", begin);
    const auto culprit = end == std::string::npos ? type : text.substr(begin, end - begin);
    throw_not_cloneable(type, culprit, "a replica on device " + device.str());
  }
  TORCH_DP_CHECK(
      clone.ptr() != nullptr, "DataParallel: ", type, "::clone() did not return a ", type,
      " (a module deriving from another module's Cloneable<Base> is cloned as a Base); give ", type,
      " its own clone(): derive it from torch::nn::Cloneable<", type, ">");
  return clone;
}

// Restores the CPU generator's state when it goes out of scope: clone() runs the clone's reset(), which
// initialises parameters from the generator before the module's values replace them, and under `reproducible`
// building replicas must draw nothing from the caller's random stream (Note [Reproducible replicas] in
// parallel_apply.cpp).
class KeepCpuGenerator {
 public:
  KeepCpuGenerator() : generator_(at::globalContext().defaultGenerator(c10::kCPU)) {
    std::lock_guard<std::mutex> lock(generator_.mutex());
    state_ = generator_.get_state();
  }
  ~KeepCpuGenerator() {
    std::lock_guard<std::mutex> lock(generator_.mutex());
    generator_.set_state(state_);
  }
  KeepCpuGenerator(const KeepCpuGenerator&) = delete;
  KeepCpuGenerator& operator=(const KeepCpuGenerator&) = delete;

 private:
  at::Generator generator_;
  at::Tensor state_;
};

// Makes slot's clone of the module for `device` and returns its parameters and buffers, for the Replicator.
std::vector<at::Tensor> clone_slot(
    ReplicaSet::Slot& slot, const ModuleCaller& module, const Replicator& replicator, c10::Device device) {
  slot.module = clone_for_replica(module, device);
  auto original_root = module.ptr();
  auto replica_root = slot.module.ptr();
  auto tensors = replica_root->parameters();
  const auto num_params = tensors.size();
  auto replica_buffers = replica_root->buffers();
  const auto& params = replicator.params();
  const auto& buffers = replicator.buffers();
  TORCH_DP_CHECK(
      num_params == params.size() && replica_buffers.size() == buffers.size(), "DataParallel: the clone of the ",
      "module has ", num_params, " parameters and ", replica_buffers.size(), " buffers, but the module has ",
      params.size(), " and ", buffers.size(), "; the module's clone() must reproduce its parameters and buffers");
  auto original_modules = original_root->modules();
  auto replica_modules = replica_root->modules();
  TORCH_DP_CHECK(
      original_modules.size() == replica_modules.size(), "DataParallel: the clone of the module has ",
      replica_modules.size(), " submodules, but the module has ", original_modules.size());
  for (size_t m = 0; m < original_modules.size(); ++m) {
    slot.parts.emplace_back(original_modules[m].get(), replica_modules[m].get());
  }
  tensors.insert(tensors.end(), replica_buffers.begin(), replica_buffers.end());
  return tensors;
}

// A clone follows the module's train()/eval(), per submodule.
void sync_training_modes(const ReplicaSet::Slot& slot) {
  bool modes_differ = false;
  for (const auto& [original, replica] : slot.parts) {
    modes_differ = modes_differ || original->is_training() != replica->is_training();
  }
  if (modes_differ) {
    for (const auto& [original, replica] : slot.parts) {  // pre-order: a child's own call comes last
      replica->train(original->is_training());
    }
  }
}

}  // namespace

namespace {
bool same_options(const DataParallelOptions& a, const DataParallelOptions& b) {
  return a.devices() == b.devices() && a.output_device() == b.output_device() && a.dim() == b.dim() &&
         a.chunk_sizes() == b.chunk_sizes() && a.issuing() == b.issuing() &&
         a.trust_version_counters() == b.trust_version_counters() && a.reproducible() == b.reproducible();
}
}  // namespace

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

}  // namespace detail

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
  engine_ = std::make_shared<detail::ParallelEngine>(options);
  const auto& replica_devices = engine_->replica_devices();
  if (!module_.unimplemented_clone().empty() && replica_devices.size() > 1) {
    std::string devices;
    for (const auto& device : replica_devices) {
      devices += (devices.empty() ? "" : ", ") + device.str();
    }
    detail::throw_not_cloneable(
        module_.unimplemented_clone(), module_.unimplemented_clone(),
        std::to_string(replica_devices.size()) + " replicas, on " + devices);
  }
  replica_set_ = std::make_shared<detail::ReplicaSet>(engine_->options().trust_version_counters());
}

std::shared_ptr<torch::nn::Module> DataParallelImpl::clone(const std::optional<c10::Device>& device) const {
  return std::make_shared<DataParallelImpl>(module_.clone(device), options);
}

void DataParallelImpl::pretty_print(std::ostream& stream) const {
  // Devices are formatted with str(), never streamed (src/message.h says why).
  std::string devices;
  for (const auto& device : this->devices()) {
    devices += (devices.empty() ? "" : ", ") + device.str();
  }
  stream << "torch_dp::DataParallel(devices=[" << devices << "], dim=" << std::to_string(engine_->options().dim())
         << ")";
}

std::vector<detail::ModuleCaller*> DataParallelImpl::replicas(size_t count) {
  auto& set = *replica_set_;
  const auto& replica_devices = engine_->replica_devices();
  auto root = module_.ptr();
  auto params = root->parameters();
  auto buffers = root->buffers();
  // As torch.nn.DataParallel, before any replica runs: the first replica is the module itself, so the module's
  // tensors must be on the first device (a copy there instead would keep its BatchNorm updates from the module).
  // Checked before the replicas are laid out, which they are for tensors on that device.
  detail::check_module_device(params, buffers, replica_devices[0]);
  if (!set.holds(params, buffers, replica_devices)) {
    set.lay_out(std::move(params), std::move(buffers), replica_devices);
  }
  if (set.slots.size() < count) {
    std::optional<detail::KeepCpuGenerator> keep_generator;
    if (engine_->options().reproducible()) {
      keep_generator.emplace();
    }
    while (set.slots.size() < count) {
      set.add(module_, [&](detail::ReplicaSet::Slot& slot, c10::Device device) {
        return detail::clone_slot(slot, module_, set.replicator, device);
      });
    }
  }
  std::vector<detail::ModuleCaller*> result;
  set.refresh(count, /*differentiable=*/true, [&](detail::ReplicaSet::Slot& slot, c10::Device) {
    detail::sync_training_modes(slot);
    result.push_back(&slot.module);
  });
  return result;
}

void detail::TestAccess::copy_everything(DataParallelImpl& parallel) {
  auto guard = parallel.engine_->lock();
  copy_everything(parallel.replica_set_->replicator);
  parallel.replica_set_->slots.clear();
  parallel.replica_set_->devices.clear();
}

}  // namespace torch_dp
