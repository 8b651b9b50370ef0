#include <torch_dp/script_data_parallel.h>

#include "message.h"
#include "test_access.h"

#include <torch_dp/detail/gather_outputs.h>
#include <torch_dp/detail/parallel_engine.h>
#include <torch_dp/detail/split_arguments.h>

#include <ATen/ATen.h>
#include <ATen/core/class_type.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

// Note [TorchScript replicas]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A TorchScript module keeps its state in C++ objects (c10::ivalue::Object, one per submodule, with one slot per
// attribute), which the module's compiled methods read with prim::GetAttr on every call. A replica is therefore
// a copy of those objects, made once per slot with Module::deepcopy (same types, hence the same compiled methods),
// whose slots are kept current:
//  - Parameters and buffers are bound to the Replicator (Note [Persistent replicas] in replicate.cpp), which
//    fills the copy's tensors in place before every call: the module's memory on its own device, refreshed
//    coalesced copies elsewhere, the first slot on the module's device being the module itself (PyTorch's replica
//    0, whose buffer updates are kept), and the broadcast node that routes gradients to the module's parameters.
//  - Every other attribute (each submodule's `training` flag, ints, floats, strings, tensors that are not
//    buffers) is copied from the module's object into the copy's on every call: a slot assignment each, so that
//    train()/eval() and any attribute the user set are seen, as the drop-in's contract requires. A tensor attribute
//    on another device than the replica's is copied there.
//  - A replaced parameter or buffer (other tensor objects, another count) or a replaced submodule (other objects)
//    makes the copies anew.
// Replicas of one module share its compiled methods (and their graph executors, which are safe to run from several
// threads), so running them at once on the worker pool needs nothing more.
// The slots are a detail::ReplicaSlots (replica_slots.h), the container DataParallel keeps too; what is
// TorchScript's own is the deep copy and the attributes copied over (copy_attributes).

namespace torch_dp {

namespace {

std::vector<at::Tensor> tensors_of(const torch::jit::Module& module, bool buffers) {
  std::vector<at::Tensor> result;
  if (buffers) {
    for (const auto& tensor : module.buffers()) {
      result.push_back(tensor);
    }
  } else {
    for (const auto& tensor : module.parameters()) {
      result.push_back(tensor);
    }
  }
  return result;
}

std::vector<c10::ivalue::Object*> objects_of(const torch::jit::Module& module) {
  std::vector<c10::ivalue::Object*> result;
  for (const auto& submodule : module.modules()) {
    result.push_back(submodule._ivalue().get());
  }
  return result;
}

bool is_module_type(const c10::TypePtr& type) {
  const auto class_type = type->cast<c10::ClassType>();
  return class_type && class_type->is_module();
}

// Copies every attribute that is not a parameter, a buffer or a submodule from `from` into `to` (Note
// [TorchScript replicas]).
void copy_attributes(const c10::ivalue::Object& from, c10::ivalue::Object& to, c10::Device device) {
  const auto& type = from.type();
  for (size_t i = 0; i < type->numAttributes(); ++i) {
    if (type->is_parameter(i) || type->is_buffer(i) || is_module_type(type->getAttribute(i))) {
      continue;
    }
    const auto& value = from.getSlot(i);
    if (value.isTensor() && value.toTensor().defined() && value.toTensor().device() != device) {
      to.setSlot(i, value.toTensor().to(device));
    } else {
      to.setSlot(i, value);
    }
  }
}

}  // namespace

bool ScriptReplicas::needs_build(const torch::jit::Module& module, at::ArrayRef<c10::Device> devices) const {
  return slots_.slots.empty() || !slots_.holds(tensors_of(module, false), tensors_of(module, true), devices) ||
         objects_of(module) != objects_;
}

void ScriptReplicas::sync(const torch::jit::Module& module, at::ArrayRef<c10::Device> devices) {
  if (!needs_build(module, devices)) {
    return;
  }
  slots_.lay_out(tensors_of(module, false), tensors_of(module, true), devices);
  objects_ = objects_of(module);
  while (slots_.slots.size() < devices.size()) {
    slots_.add(module, [&](auto& slot, c10::Device) {
      // deepcopy() without a device: with one, a tensor already there is kept, not copied, and the copy would
      // share it with the module. The Replicator points every tensor at the right memory anyway.
      at::NoGradGuard no_grad;
      slot.module = module.deepcopy();
      const auto copies = objects_of(slot.module);
      TORCH_INTERNAL_ASSERT(
          copies.size() == objects_.size(), "a deep copy of a TorchScript module has other submodules");
      for (size_t m = 0; m < copies.size(); ++m) {
        slot.parts.emplace_back(objects_[m], copies[m]);
      }
      auto tensors = tensors_of(slot.module, false);
      auto buffers = tensors_of(slot.module, true);
      tensors.insert(tensors.end(), buffers.begin(), buffers.end());
      return tensors;
    });
  }
  ++generation_;
}

std::vector<torch::jit::Module> ScriptReplicas::get(size_t count, bool differentiable) {
  TORCH_DP_CHECK(
      count <= slots_.slots.size(), "replicate: asked for ", count, " replicas but only ", slots_.slots.size(),
      " devices were given");
  std::vector<torch::jit::Module> result;
  result.reserve(count);
  slots_.refresh(count, differentiable, [&](auto& slot, c10::Device device) {
    for (const auto& [original, copy] : slot.parts) {
      copy_attributes(*original, *copy, device);
    }
    result.push_back(slot.module);
  });
  return result;
}

struct ScriptDataParallel::State {
  State(torch::jit::Module module_, DataParallelOptions options)
      : module(std::move(module_)),
        engine(std::move(options), detail::FrontEnd("ScriptDataParallel")),
        replicas(engine.options().trust_version_counters()) {}

  torch::jit::Module module;
  detail::ParallelEngine engine;  // devices, lock, pool, split and run (Note [One C++ engine])
  ScriptReplicas replicas;
};

ScriptDataParallel::ScriptDataParallel(torch::jit::Module module, DataParallelOptions options) {
  TORCH_DP_CHECK(
      module.find_method("forward").has_value(), "ScriptDataParallel: the module ",
      module.type()->name() ? module.type()->name()->qualifiedName() : std::string("given"),
      " has no forward method; expected a TorchScript module with a forward (torch.jit.script or torch::jit::load)");
  state_ = std::make_shared<State>(std::move(module), std::move(options));
}

namespace {

// Kwargs in name order: the order their tensors are split in must not depend on a hash map's.
std::map<std::string, c10::IValue> ordered(const torch::jit::Kwargs& kwargs) {
  return {kwargs.begin(), kwargs.end()};
}

}  // namespace

c10::IValue ScriptDataParallel::forward(const std::vector<c10::IValue>& inputs, const torch::jit::Kwargs& kwargs) {
  auto& state = *state_;
  if (state.engine.devices().empty()) {
    return state.module.forward(inputs, kwargs);
  }
  const auto named = ordered(kwargs);
  std::vector<at::Tensor> tensors;
  for (const auto& input : inputs) {
    detail::collect_tensors(input, tensors);
  }
  for (const auto& [name, value] : named) {
    detail::collect_tensors(value, tensors);
  }
  struct Split {
    std::vector<std::vector<c10::IValue>> inputs;                            // inputs[k][i]
    std::vector<std::pair<std::string, std::vector<c10::IValue>>> keywords;  // (name, value per replica)
  };
  auto outputs = state.engine.run<c10::IValue>(
      tensors,
      [&](detail::SplitPlan& plan) {
        Split split;
        for (const auto& input : inputs) {
          split.inputs.push_back(detail::split_ivalue(input, plan));
        }
        for (const auto& [name, value] : named) {
          split.keywords.emplace_back(name, detail::split_ivalue(value, plan));
        }
        return split;
      },
      [&](size_t count) {
        // Before the replicas are laid out, which they are for the module's tensors on the first device: a module
        // moved there after this error is then replicated as one that was there all along.
        detail::check_module_device(
            tensors_of(state.module, false), tensors_of(state.module, true), state.engine.devices()[0]);
        state.replicas.sync(state.module, state.engine.replica_devices());
        return state.replicas.get(count, /*differentiable=*/true);
      },
      [](torch::jit::Module& replica, const Split& split, size_t i) {
        torch::jit::Kwargs keywords;
        for (const auto& [name, per_replica] : split.keywords) {
          keywords.emplace(name, per_replica[i]);
        }
        return replica.forward(detail::replica_column(split.inputs, i), keywords);
      });
  return detail::gather_ivalues(outputs, output_device(), state.engine.options().dim());
}

torch::jit::Module& ScriptDataParallel::module() const {
  return state_->module;
}

std::vector<at::Tensor> ScriptDataParallel::parameters() const {
  return tensors_of(state_->module, false);
}

const DataParallelOptions& ScriptDataParallel::options() const {
  return state_->engine.options();
}

const std::vector<c10::Device>& ScriptDataParallel::devices() const {
  return state_->engine.devices();
}

c10::Device ScriptDataParallel::output_device() const {
  return state_->engine.output_device();
}

WorkerPool& ScriptDataParallel::pool() {
  return state_->engine.pool();
}

void detail::TestAccess::copy_everything(ScriptReplicas& replicas) {
  copy_everything(replicas.slots_.replicator);
  replicas.slots_.slots.clear();
}

void detail::TestAccess::copy_everything(ScriptDataParallel& parallel) {
  auto lock = parallel.state_->engine.lock();
  copy_everything(parallel.state_->replicas);
}

}  // namespace torch_dp
