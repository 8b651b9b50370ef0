#pragma once
// loss_rules: the exact rules of ParallelCriterion, written once for both languages (Note [Reducing a loss over
// chunks] in loss_rules.cpp): for each torch.nn loss with one, a chunk's part of the loss and its denominator.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace torch_dp::detail {

/// A torch.nn loss with an exact rule, as the rule reads it: its class name and the options that enter the loss
/// (each named as the torch.nn module's attribute; the ones a loss does not have keep their defaults). The C++
/// ParallelCriterion fills one from a torch::nn module, the Python one from a torch.nn module, before every call,
/// so changes to the module's options between calls are seen.
struct LossRule {
  std::string name;       // "CrossEntropyLoss", "NLLLoss", "MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss",
                          // "BCELoss", "BCEWithLogitsLoss" or "KLDivLoss"
  std::string reduction;  // the module's: "mean", "sum", "none" ("batchmean": KLDivLoss)
  at::Tensor weight;
  at::Tensor pos_weight;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double beta = 1.0;
  double delta = 1.0;
  bool log_target = false;
};

/// Whether `name` is a loss with an exact rule.
bool has_exact_rule(const std::string& name);

/// The names of the losses with an exact rule, for error messages: "CrossEntropyLoss, NLLLoss, ...".
std::string exact_rule_names();

/// Throws a ValueError unless rule.reduction is one the rule supports for rule.name.
void check_loss_reduction(const LossRule& rule);

/// One chunk's part of the loss: (the loss with reduction "none" when the module's is "none", else its sum over
/// the chunk; the chunk's denominator of the batch's mean). `split_dim` is the dimension the batch is split along,
/// `first` whether this is the first chunk that runs (KLDivLoss's "batchmean" of a batch not split along its rows
/// counts the rows once).
std::pair<at::Tensor, at::Tensor> loss_part(
    const LossRule& rule, const at::Tensor& input, const at::Tensor& target, int64_t split_dim, bool first);

/// The dimension the chunks' per-element losses of reduction "none" are gathered along: `split_dim`, less one for
/// CrossEntropyLoss and NLLLoss, which drop the class dimension (1) of an input that has one.
int64_t none_gather_dim(const LossRule& rule, const at::Tensor& part, int64_t split_dim);

/// The replicas' parts of a loss reduced on `destination` to the loss of the whole batch: sum(values) when `sum`;
/// else sum(values) / sum(counts) where counts are given (an exact rule's, or a callable's SumAndCount), and
/// without counts the values weighted by their chunk's share of the batch, sum(values[i] * rows[i] / sum(rows)).
at::Tensor reduce_loss_parts(
    const std::vector<at::Tensor>& values, const std::vector<at::Tensor>& counts, bool sum,
    const std::vector<int64_t>& rows, c10::Device destination);

}  // namespace torch_dp::detail
