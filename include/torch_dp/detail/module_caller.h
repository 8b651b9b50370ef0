#pragma once
// The module a C++ DataParallel wraps, and a way to call its forward. Used by data_parallel.h.

#include <c10/util/Type.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>

#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>

namespace torch_dp::detail {

// Note [Plain modules]
// ~~~~~~~~~~~~~~~~~~~~
// Every replica but the first on the module's device is a clone() of the module, and torch::nn::Module::clone()
// throws unless the module type overrides it (torch::nn::Cloneable<Net> does). C++ cannot ask whether a virtual
// function is overridden without calling it, but it can ask where the function a type sees is declared:
// `&Net::clone` has type `std::shared_ptr<Module> (Module::*)(...) const` exactly when no class between Module and
// Net declares clone(). That is known for the type DataParallel is given (shared_ptr<Net>, a module holder), so a
// plain module that needs more than one replica is refused when the DataParallel is built, at no cost; where the
// type is erased (an AnyModule) or the plain module sits inside a container (nn::Sequential clones its parts), the
// first clone's error is turned into the same message when replicas are first built (data_parallel.cpp). One
// replica on the module's device needs no clone, so a plain module works there.

template <typename MemberFunction>
struct member_function_class {
  using type = void;
};
template <typename Result, typename Class, typename... Arguments>
struct member_function_class<Result (Class::*)(Arguments...) const> {
  using type = Class;
};

template <typename ModuleType, typename = void>
struct clone_declared_in {
  using type = void;  // unknown: clone is overloaded or not accessible
};
template <typename ModuleType>
struct clone_declared_in<ModuleType, std::void_t<decltype(&ModuleType::clone)>> {
  using type = typename member_function_class<decltype(&ModuleType::clone)>::type;
};

/// True when ModuleType inherits torch::nn::Module::clone(), which throws "clone() has not been implemented".
template <typename ModuleType>
inline constexpr bool inherits_unimplemented_clone =
    std::is_same_v<typename clone_declared_in<ModuleType>::type, torch::nn::Module>;

/// Throws the error of Note [Plain modules]: `culprit` (the module of type `type`, or a module inside it) cannot
/// be cloned, and a replica (`needed_for`, e.g. "2 replicas, on cpu, cpu") needs a clone.
[[noreturn]] void throw_not_cloneable(
    const std::string& type, const std::string& culprit, const std::string& needed_for);

/// Throws DataParallel::module_as's error: `module` is not of the type whose typeid name is `requested`.
[[noreturn]] void throw_wrong_module_type(const torch::nn::Module& module, const char* requested);

/// The wrapped module and a way to call its forward: through AnyModule, or, for nn::Sequential (which
/// AnyModule cannot hold, its forward being a template), through Sequential's own forward.
class ModuleCaller {
 public:
  ModuleCaller() = default;
  explicit ModuleCaller(torch::nn::AnyModule any) : any_(std::move(any)) {}
  explicit ModuleCaller(std::shared_ptr<torch::nn::SequentialImpl> sequential) : sequential_(std::move(sequential)) {}

  template <typename ModuleType>
  static ModuleCaller of(std::shared_ptr<ModuleType> module) {
    ModuleCaller caller;
    if constexpr (std::is_base_of_v<torch::nn::SequentialImpl, ModuleType>) {
      caller = ModuleCaller(std::static_pointer_cast<torch::nn::SequentialImpl>(std::move(module)));
    } else {
      caller = ModuleCaller(torch::nn::AnyModule(std::move(module)));
    }
    if constexpr (inherits_unimplemented_clone<ModuleType>) {
      caller.unimplemented_clone_ = c10::demangle(typeid(ModuleType).name());
    }
    return caller;
  }

  std::shared_ptr<torch::nn::Module> ptr() const { return sequential_ ? sequential_ : any_.ptr(); }
  bool empty() const { return !sequential_ && any_.is_empty(); }
  ModuleCaller clone(const std::optional<c10::Device>& device) const;
  /// The module's type name if it is known not to implement clone() (Note [Plain modules]); else empty.
  const std::string& unimplemented_clone() const { return unimplemented_clone_; }

  template <typename ReturnType, typename... ArgumentTypes>
  ReturnType forward(const ArgumentTypes&... arguments) {
    if (sequential_) {
      return sequential_->forward<ReturnType>(arguments...);
    }
    return any_.forward<ReturnType>(arguments...);
  }

 private:
  torch::nn::AnyModule any_;
  std::shared_ptr<torch::nn::SequentialImpl> sequential_;
  std::string unimplemented_clone_;
};

}  // namespace torch_dp::detail
