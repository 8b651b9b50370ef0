#pragma once
// criterion: ParallelCriterion, a loss computed on every replica's chunk (ScatteredOutputs, from
// DataParallel::forward_scattered) and reduced to the loss of the whole batch.

#include <torch_dp/detail/loss_rules.h>
#include <torch_dp/parallel_apply.h>
#include <torch_dp/scattered_outputs.h>

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <c10/core/Device.h>
#include <torch/arg.h>
#include <torch/nn/modules/loss.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace torch_dp {

/// What a loss callable returns for one chunk to have its mean reduced exactly: the loss summed over the chunk,
/// and what the whole batch's loss divides by, for this chunk (rows, a sum of class weights, tokens not ignored).
/// The reduced loss is sum(total) / sum(count) over the replicas (sum(total) for LossReduction::kSum).
struct SumAndCount {
  at::Tensor total;
  at::Tensor count;
};

/// How a ParallelCriterion over a callable combines the replicas' results.
enum class LossReduction {
  /// SumAndCount: sum(total) / sum(count). A tensor: the replicas' values weighted by their chunk's share of the
  /// batch, sum(loss_i * chunk_sizes[i] / sum(chunk_sizes)), the whole batch's loss for a mean over rows.
  kMean,
  /// The sum of the replicas' values (of their totals for SumAndCount).
  kSum,
  /// The replicas' per-element losses gathered along dim.
  kNone,
};

struct ParallelCriterionOptions {
  /// The dimension the target is split along; default the outputs' dim.
  TORCH_ARG(std::optional<int64_t>, dim) = std::nullopt;
  /// For callables (default kMean). A torch::nn loss takes its own reduction: giving one here is an error.
  TORCH_ARG(std::optional<LossReduction>, reduction) = std::nullopt;
  /// Runs on each replica before the loss: (output, target) -> (input, target) for the loss, e.g. flattening a
  /// language model's (batch, sequence, vocabulary) logits and (batch, sequence) targets. The exact rules apply
  /// to what it returns.
  using Prepare = std::function<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>;
  TORCH_ARG(Prepare, prepare) = nullptr;
};

namespace detail {
/// Reads a torch::nn loss's rule with its options as they are now (a struct, so that no loss module converts to it
/// while the constructors are being chosen).
struct RuleReader {
  std::function<LossRule()> read;
};
template <typename T>
inline constexpr bool kAlwaysFalse = false;
}  // namespace detail

/// A loss computed where the replicas' outputs are, reduced on the output device to the loss of the whole batch
/// (Note [Reducing a loss over chunks] in loss_rules.cpp). criterion(outputs, target) splits target along dim into
/// the outputs' chunk_sizes on their devices, runs the loss for every replica on the DataParallel's worker pool
/// (the caller's grad mode and autocast state, the replica's device and current stream), and reduces:
///  - for CrossEntropyLoss and NLLLoss (weight, ignore_index, label_smoothing, class-probability targets),
///    MSELoss, L1Loss, SmoothL1Loss, HuberLoss, BCELoss, BCEWithLogitsLoss (weight, pos_weight) and KLDivLoss
///    (log_target), with their own reduction, exactly: "mean"/"batchmean" as the chunks' sums over the sum of
///    their denominators, "sum" as the sum, "none" gathered; other torch::nn modules do not compile here (wrap
///    them in a lambda);
///  - for a callable (input, target) -> Tensor or -> SumAndCount, as LossReduction says.
/// A replica with an empty chunk does not run the loss (unless all are empty) and adds nothing.
class ParallelCriterion {
 public:
  using Options = ParallelCriterionOptions;
  using LossFn = std::function<at::Tensor(const at::Tensor& input, const at::Tensor& target)>;
  using SumAndCountFn = std::function<SumAndCount(const at::Tensor& input, const at::Tensor& target)>;

  explicit ParallelCriterion(torch::nn::CrossEntropyLoss loss, Options options = {});
  explicit ParallelCriterion(torch::nn::NLLLoss loss, Options options = {});
  explicit ParallelCriterion(torch::nn::MSELoss loss, Options options = {});
  explicit ParallelCriterion(torch::nn::L1Loss loss, Options options = {});
  explicit ParallelCriterion(torch::nn::SmoothL1Loss loss, Options options = {});
  explicit ParallelCriterion(torch::nn::HuberLoss loss, Options options = {});
  explicit ParallelCriterion(torch::nn::BCELoss loss, Options options = {});
  explicit ParallelCriterion(torch::nn::BCEWithLogitsLoss loss, Options options = {});
  explicit ParallelCriterion(torch::nn::KLDivLoss loss, Options options = {});
  explicit ParallelCriterion(LossFn loss, Options options = {});
  explicit ParallelCriterion(SumAndCountFn loss, Options options = {});

  /// Any other torch::nn module: no exact rule; a compile-time error that says what to do.
  template <typename Impl>
  explicit ParallelCriterion(const torch::nn::ModuleHolder<Impl>& /*loss*/, Options /*options*/ = {}) {
    static_assert(
        detail::kAlwaysFalse<Impl>,
        "ParallelCriterion has an exact rule for CrossEntropyLoss, NLLLoss, MSELoss, L1Loss, SmoothL1Loss, "
        "HuberLoss, BCELoss, BCEWithLogitsLoss and KLDivLoss; wrap other losses in a lambda returning a mean over "
        "the chunk's rows (LossReduction::kMean weights it by the chunk's share) or a torch_dp::SumAndCount");
  }

  at::Tensor operator()(const ScatteredOutputs<at::Tensor>& outputs, const at::Tensor& target) const {
    return forward(outputs, target);
  }
  at::Tensor forward(const ScatteredOutputs<at::Tensor>& outputs, const at::Tensor& target) const;

  const Options& options() const { return options_; }

 private:
  ParallelCriterion(detail::RuleReader rule, Options options);

  detail::RuleReader rule_;      // a torch::nn loss, its options read at every call (loss_rules.h) ...
  LossFn loss_;                  // or a callable returning a tensor
  SumAndCountFn sum_and_count_;  // or one returning SumAndCount
  Options options_;
  std::shared_ptr<WorkerPool> own_pool_;
};

}  // namespace torch_dp
