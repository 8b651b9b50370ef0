#include <torch_dp/detail/loss_rules.h>

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <string>
#include <utility>

// Note [Reducing a loss over chunks]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// The mean of a loss over a batch is a sum over its elements divided by a denominator, and both are sums over the
// rows of the batch, so each replica computes its chunk's sum (the loss with reduction "sum") and its chunk's
// denominator, and the result is sum(sums) / sum(denominators) on the output device. Averaging the replicas'
// means, or dividing their sum by the replica count (PyTorch-Encoding's DataParallelCriterion), weighs every
// replica equally and is wrong for uneven chunks, and for class weights or ignore_index even with equal chunks.
// The denominators, read from PyTorch's implementation:
//  - MSE, L1, SmoothL1, Huber, BCE, BCEWithLogits, KLDiv "mean": the number of elements (weights and pos_weight
//    rescale elements but do not enter the denominator);
//  - KLDiv "batchmean": input.size(0), summed over the chunks when the batch is split along dim 0, once otherwise;
//  - NLL and CrossEntropy with class indices: the sum of weight[target] over the targets not equal to
//    ignore_index (their count without weight); CrossEntropy's label smoothing term is divided by the same sum
//    (cross_entropy_loss_label_smoothing in aten/src/ATen/native/LossNLL.cpp), so the sum-reduced loss of a chunk
//    and this denominator give the mean with label smoothing too;
//  - CrossEntropy with class probabilities (target shaped like input): input.numel() / C, with or without weight.
// reduction "sum" is sum(sums); reduction "none" gathers the per-element losses like DataParallel's gather.
// The losses are computed as torch.nn.functional computes them (its size checks and warnings included), so
// both languages' ParallelCriterion give the whole batch's loss of the same module.

namespace torch_dp::detail {
namespace {

constexpr std::array<const char*, 9> kExactRules = {"CrossEntropyLoss", "NLLLoss",           "MSELoss",
                                                    "L1Loss",           "SmoothL1Loss",      "HuberLoss",
                                                    "BCELoss",          "BCEWithLogitsLoss", "KLDivLoss"};

at::Tensor count_of(int64_t n) {
  return at::scalar_tensor(static_cast<double>(n), at::kDouble);
}

std::optional<at::Tensor> on(const at::Tensor& tensor, const at::Tensor& like) {
  if (!tensor.defined()) {
    return std::nullopt;
  }
  return tensor.to(like.device());
}

// The denominator of NLL's and CrossEntropy's mean over class-index targets: the weights of the targets not
// ignored (their count without weight).
at::Tensor class_count(const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index) {
  auto keep = target.ne(ignore_index);
  if (!weight) {
    return keep.sum();
  }
  auto w = weight->index_select(0, target.masked_fill(keep.logical_not(), 0).flatten());
  return at::where(keep.flatten(), w, at::zeros({}, w.options())).sum();
}

int64_t elements(const at::Tensor& input, const at::Tensor& target) {
  int64_t n = 1;
  for (auto size : at::infer_size(input.sizes(), target.sizes())) {
    n *= size;
  }
  return n;
}

// The elementwise losses broadcast input and target, and warn where they differ, as torch.nn.functional does.
int64_t broadcast_elements(const char* name, const at::Tensor& input, const at::Tensor& target) {
  if (input.sizes() != target.sizes()) {
    TORCH_WARN(
        name, ": using a target size (", target.sizes(), ") that is different to the input size (", input.sizes(),
        "). This will likely lead to incorrect results due to broadcasting. Please ensure they have the same size.");
  }
  return elements(input, target);
}

void check_same_size(const char* name, const at::Tensor& input, const at::Tensor& target) {
  TORCH_CHECK_VALUE(
      input.sizes() == target.sizes(), name, " needs a target of the input's size, but got target size ",
      target.sizes(), " for input size ", input.sizes());
}

int64_t normalized(int64_t dim, int64_t ndim) {
  return ndim == 0 ? 0 : ((dim % ndim) + ndim) % ndim;
}

// A BCE weight that differs along the split dimension would have to be split with the batch.
void check_not_per_row(
    const std::string& name, const char* what, const at::Tensor& tensor, const at::Tensor& input, int64_t dim) {
  if (!tensor.defined() || tensor.dim() == 0 || input.dim() == 0) {
    return;
  }
  const auto position = normalized(dim, input.dim()) - (input.dim() - tensor.dim());
  TORCH_CHECK_VALUE(
      position < 0 || tensor.size(position) == 1, "ParallelCriterion: ", name, "'s ", what, " has size ",
      position >= 0 ? tensor.size(position) : 1, " along the dimension the batch is split on (dim ", dim,
      " of the input), so it cannot be given to every replica whole; pass per-row weights as a target to a "
      "callable instead (they are split with the batch)");
}

}  // namespace

bool has_exact_rule(const std::string& name) {
  for (const char* rule : kExactRules) {
    if (name == rule) {
      return true;
    }
  }
  return false;
}

std::string exact_rule_names() {
  std::string names;
  for (const char* rule : kExactRules) {
    names += names.empty() ? "" : ", ";
    names += rule;
  }
  return names;
}

void check_loss_reduction(const LossRule& rule) {
  TORCH_CHECK_TYPE(
      has_exact_rule(rule.name), "ParallelCriterion has no exact rule for ", rule.name, " (it has one for ",
      exact_rule_names(), ")");
  const auto& r = rule.reduction;
  const bool kl = rule.name == "KLDivLoss";
  TORCH_CHECK_VALUE(
      r == "mean" || r == "sum" || r == "none" || (kl && r == "batchmean"),
      "ParallelCriterion supports reduction 'mean', 'sum', 'none'", kl ? ", 'batchmean'" : "", " for ", rule.name,
      ", but got '", r, "'");
}

std::pair<at::Tensor, at::Tensor> loss_part(
    const LossRule& rule, const at::Tensor& input, const at::Tensor& target, int64_t split_dim, bool first) {
  check_loss_reduction(rule);
  const auto& name = rule.name;
  const int64_t reduction = rule.reduction == "none" ? at::Reduction::None : at::Reduction::Sum;
  if (name == "CrossEntropyLoss") {
    const auto weight = on(rule.weight, input);
    auto value = at::cross_entropy_loss(input, target, weight, reduction, rule.ignore_index, rule.label_smoothing);
    if (input.sizes() == target.sizes()) {  // class probabilities: divided by the number of samples
      const auto classes = input.dim() > 1 ? input.size(1) : input.size(0);
      return {value, count_of(classes == 0 ? 0 : input.numel() / classes)};
    }
    return {value, class_count(target, weight, rule.ignore_index)};
  }
  if (name == "NLLLoss") {
    const auto weight = on(rule.weight, input);
    return {
        at::nll_loss_nd(input, target, weight, reduction, rule.ignore_index),
        class_count(target, weight, rule.ignore_index)};
  }
  if (name == "MSELoss") {
    const auto n = broadcast_elements("mse_loss", input, target);
    return {at::mse_loss(input, target, reduction), count_of(n)};
  }
  if (name == "L1Loss") {
    const auto n = broadcast_elements("l1_loss", input, target);
    return {at::l1_loss(input, target, reduction), count_of(n)};
  }
  if (name == "SmoothL1Loss") {
    const auto n = broadcast_elements("smooth_l1_loss", input, target);
    // beta 0 is L1, whose backward, unlike smooth_l1's, is defined at 0 (as torch.nn.functional does)
    auto value = rule.beta == 0.0 ? at::l1_loss(input, target, reduction)
                                  : at::smooth_l1_loss(input, target, reduction, rule.beta);
    return {value, count_of(n)};
  }
  if (name == "HuberLoss") {
    const auto n = broadcast_elements("huber_loss", input, target);
    return {at::huber_loss(input, target, reduction, rule.delta), count_of(n)};
  }
  if (name == "BCELoss") {
    check_same_size("BCELoss", input, target);
    check_not_per_row(name, "weight", rule.weight, input, split_dim);
    auto weight = on(rule.weight, input);
    if (weight) {
      weight = weight->expand(at::infer_size(target.sizes(), weight->sizes()));
    }
    return {at::binary_cross_entropy(input, target, weight, reduction), count_of(input.numel())};
  }
  if (name == "BCEWithLogitsLoss") {
    check_same_size("BCEWithLogitsLoss", input, target);
    check_not_per_row(name, "weight", rule.weight, input, split_dim);
    check_not_per_row(name, "pos_weight", rule.pos_weight, input, split_dim);
    auto value = at::binary_cross_entropy_with_logits(
        input, target, on(rule.weight, input), on(rule.pos_weight, input), reduction);
    return {value, count_of(input.numel())};
  }
  // KLDivLoss
  auto value = at::kl_div(input, target, reduction, rule.log_target);
  if (rule.reduction != "batchmean") {
    return {value, count_of(elements(input, target))};
  }
  // batchmean divides by input.size(0): the sum of the chunks' when the batch is split along dim 0.
  if (input.dim() == 0) {
    return {value, count_of(first ? 1 : 0)};
  }
  const bool rows = normalized(split_dim, input.dim()) == 0;
  return {value, count_of(rows || first ? input.size(0) : 0)};
}

int64_t none_gather_dim(const LossRule& rule, const at::Tensor& part, int64_t split_dim) {
  const bool drops_class_dim = rule.name == "CrossEntropyLoss" || rule.name == "NLLLoss";
  if (drops_class_dim && split_dim > 0 && part.dim() < split_dim + 1) {
    return split_dim - 1;
  }
  return split_dim;
}

at::Tensor reduce_loss_parts(
    const std::vector<at::Tensor>& values, const std::vector<at::Tensor>& counts, bool sum,
    const std::vector<int64_t>& rows, c10::Device destination) {
  TORCH_CHECK(!values.empty(), "ParallelCriterion: no replica's loss to reduce");
  TORCH_CHECK(
      rows.size() == values.size(), "ParallelCriterion: ", values.size(), " losses but ", rows.size(), " chunk sizes");
  TORCH_CHECK(
      counts.empty() || counts.size() == values.size(), "ParallelCriterion: ", values.size(), " losses but ",
      counts.size(), " counts");
  const bool weighted = !sum && counts.empty();
  int64_t all_rows = 0;
  for (auto n : rows) {
    all_rows += n;
  }
  at::Tensor total;
  for (size_t i = 0; i < values.size(); ++i) {
    TORCH_CHECK(values[i].defined(), "ParallelCriterion: the loss returned an undefined tensor");
    auto part = values[i].to(destination);
    if (weighted) {
      part = part * (all_rows == 0 ? 1.0 : static_cast<double>(rows[i]) / static_cast<double>(all_rows));
    }
    total = total.defined() ? total + part : part;
  }
  if (sum || weighted) {
    return total;
  }
  at::Tensor count;
  for (const auto& c : counts) {
    TORCH_CHECK(c.defined(), "ParallelCriterion: a chunk's count is undefined");
    auto moved = c.to(destination);
    count = count.defined() ? count + moved : moved;
  }
  return total / count.to(total.scalar_type());
}

}  // namespace torch_dp::detail
