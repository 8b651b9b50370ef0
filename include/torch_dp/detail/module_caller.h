#pragma once
// The module a C++ DataParallel wraps, and a way to call its forward. Used by data_parallel.h.

#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>

#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

namespace torch_dp::detail {

/// The wrapped module and a way to call its forward: through AnyModule, or, for nn::Sequential (which
/// AnyModule cannot hold, its forward being a template), through Sequential's own forward.
class ModuleCaller {
 public:
  ModuleCaller() = default;
  explicit ModuleCaller(torch::nn::AnyModule any) : any_(std::move(any)) {}
  explicit ModuleCaller(std::shared_ptr<torch::nn::SequentialImpl> sequential) : sequential_(std::move(sequential)) {}

  template <typename ModuleType>
  static ModuleCaller of(std::shared_ptr<ModuleType> module) {
    if constexpr (std::is_base_of_v<torch::nn::SequentialImpl, ModuleType>) {
      return ModuleCaller(std::static_pointer_cast<torch::nn::SequentialImpl>(std::move(module)));
    } else {
      return ModuleCaller(torch::nn::AnyModule(std::move(module)));
    }
  }

  std::shared_ptr<torch::nn::Module> ptr() const { return sequential_ ? sequential_ : any_.ptr(); }
  bool empty() const { return !sequential_ && any_.is_empty(); }
  ModuleCaller clone(const std::optional<c10::Device>& device) const;

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
};

}  // namespace torch_dp::detail
