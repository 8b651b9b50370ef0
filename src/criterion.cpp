#include <torch_dp/criterion.h>

#include <torch_dp/gather.h>
#include <torch_dp/scatter.h>

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <c10/util/Exception.h>
#include <torch/enum.h>

#include <algorithm>
#include <set>
#include <string>
#include <utility>
#include <variant>
#include <vector>

// Note [Reducing a loss over chunks]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// The same rule as the Python package's ParallelCriterion (python/torch_dp/criterion.py, where the denominators
// read from PyTorch's implementation are listed): the mean of a loss over a batch is a sum over its elements
// divided by a denominator, both sums over the rows of the batch, so every replica computes its chunk's sum (the
// loss with reduction "sum") and its chunk's denominator, and the result is sum(sums) / sum(denominators) on the
// output device. Dividing the replicas' sum by their count (PyTorch-Encoding's DataParallelCriterion) is wrong
// for uneven chunks, and for class weights or ignore_index even with equal chunks.

namespace torch_dp {
namespace {

template <typename Variant>
std::string reduction_name(const Variant& reduction) {
  return std::visit(
      [](const auto& value) -> std::string {
        using T = std::decay_t<decltype(value)>;
        if constexpr (std::is_same_v<T, torch::enumtype::kMean>) {
          return "mean";
        } else if constexpr (std::is_same_v<T, torch::enumtype::kSum>) {
          return "sum";
        } else if constexpr (std::is_same_v<T, torch::enumtype::kNone>) {
          return "none";
        } else {
          return "batchmean";
        }
      },
      reduction);
}

at::Tensor count_of(int64_t n) {
  return at::scalar_tensor(static_cast<double>(n), at::kDouble);
}

int64_t broadcast_numel(const at::Tensor& a, const at::Tensor& b) {
  int64_t n = 1;
  for (auto size : at::infer_size(a.sizes(), b.sizes())) {
    n *= size;
  }
  return n;
}

std::optional<at::Tensor> on(const at::Tensor& tensor, const at::Tensor& like) {
  if (!tensor.defined()) {
    return std::nullopt;
  }
  return tensor.to(like.device());
}

// The denominator of NLL's and CrossEntropy's mean over class-index targets: the weights of the targets not
// ignored (their count without weight).
at::Tensor class_count(const at::Tensor& target, const at::Tensor& weight, int64_t ignore_index) {
  auto keep = target.ne(ignore_index);
  if (!weight.defined()) {
    return keep.sum();
  }
  auto w = weight.to(target.device()).index_select(0, target.masked_fill(keep.logical_not(), 0).flatten());
  return at::where(keep.flatten(), w, at::zeros({}, w.options())).sum();
}

// A BCE weight that differs along the split dimension would have to be split with the batch.
void check_not_per_row(
    const char* name, const char* what, const at::Tensor& tensor, const at::Tensor& input, int64_t dim) {
  if (!tensor.defined() || tensor.dim() == 0 || input.dim() == 0) {
    return;
  }
  const auto position = ((dim % input.dim()) + input.dim()) % input.dim() - (input.dim() - tensor.dim());
  TORCH_CHECK(
      position < 0 || tensor.size(position) == 1, "ParallelCriterion: ", name, "'s ", what, " has size ",
      position >= 0 ? tensor.size(position) : 1, " along the dimension the batch is split on (dim ", dim,
      " of the input), so it cannot be given to every replica whole; pass per-row weights to a callable instead");
}

int64_t normalized(int64_t dim, int64_t ndim) {
  return ndim == 0 ? 0 : ((dim % ndim) + ndim) % ndim;
}

}  // namespace

ParallelCriterion::ParallelCriterion(
    std::string name, detail::ExactRule rule, std::function<std::string()> reduction, bool drops_class_dim,
    Options options)
    : name_(std::move(name)),
      exact_(std::move(rule)),
      reduction_(std::move(reduction)),
      drops_class_dim_(drops_class_dim),
      options_(std::move(options)) {
  TORCH_CHECK(
      !options_.reduction().has_value(), "ParallelCriterion takes the reduction of ", name_,
      " from the module (reduction \"", reduction_(), "\"); set it in the module's options instead");
  const auto current = reduction_();
  TORCH_CHECK(
      current != "batchmean" || name_ == "KLDivLoss", "ParallelCriterion: reduction \"batchmean\" is KLDivLoss's only");
}

ParallelCriterion::ParallelCriterion(torch::nn::CrossEntropyLoss loss, Options options)
    : ParallelCriterion(
          "CrossEntropyLoss",
          [loss](const at::Tensor& input, const at::Tensor& target, int64_t reduction, int64_t, bool) {
            const auto& o = loss->options;
            auto value = at::cross_entropy_loss(
                input, target, on(loss->weight, input), reduction, o.ignore_index(), o.label_smoothing());
            if (input.sizes() == target.sizes()) {  // class probabilities: divided by the number of samples
              const auto classes = input.dim() > 1 ? input.size(1) : input.size(0);
              return std::make_pair(value, count_of(classes == 0 ? 0 : input.numel() / classes));
            }
            return std::make_pair(value, class_count(target, loss->weight, o.ignore_index()));
          },
          [loss] { return reduction_name(loss->options.reduction()); }, true, std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::NLLLoss loss, Options options)
    : ParallelCriterion(
          "NLLLoss",
          [loss](const at::Tensor& input, const at::Tensor& target, int64_t reduction, int64_t, bool) {
            const auto& o = loss->options;
            auto value = at::nll_loss_nd(input, target, on(loss->weight, input), reduction, o.ignore_index());
            return std::make_pair(value, class_count(target, loss->weight, o.ignore_index()));
          },
          [loss] { return reduction_name(loss->options.reduction()); }, true, std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::MSELoss loss, Options options)
    : ParallelCriterion(
          "MSELoss",
          [](const at::Tensor& input, const at::Tensor& target, int64_t reduction, int64_t, bool) {
            return std::make_pair(at::mse_loss(input, target, reduction), count_of(broadcast_numel(input, target)));
          },
          [loss] { return reduction_name(loss->options.reduction()); }, false, std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::L1Loss loss, Options options)
    : ParallelCriterion(
          "L1Loss",
          [](const at::Tensor& input, const at::Tensor& target, int64_t reduction, int64_t, bool) {
            return std::make_pair(at::l1_loss(input, target, reduction), count_of(broadcast_numel(input, target)));
          },
          [loss] { return reduction_name(loss->options.reduction()); }, false, std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::SmoothL1Loss loss, Options options)
    : ParallelCriterion(
          "SmoothL1Loss",
          [loss](const at::Tensor& input, const at::Tensor& target, int64_t reduction, int64_t, bool) {
            const double beta = loss->options.beta().value_or(1.0);
            return std::make_pair(
                at::smooth_l1_loss(input, target, reduction, beta), count_of(broadcast_numel(input, target)));
          },
          [loss] { return reduction_name(loss->options.reduction()); }, false, std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::HuberLoss loss, Options options)
    : ParallelCriterion(
          "HuberLoss",
          [loss](const at::Tensor& input, const at::Tensor& target, int64_t reduction, int64_t, bool) {
            return std::make_pair(
                at::huber_loss(input, target, reduction, loss->options.delta()),
                count_of(broadcast_numel(input, target)));
          },
          [loss] { return reduction_name(loss->options.reduction()); }, false, std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::BCELoss loss, Options options)
    : ParallelCriterion(
          "BCELoss",
          [loss](const at::Tensor& input, const at::Tensor& target, int64_t reduction, int64_t dim, bool) {
            const auto& weight = loss->options.weight();
            check_not_per_row("BCELoss", "weight", weight, input, dim);
            return std::make_pair(
                at::binary_cross_entropy(input, target, on(weight, input), reduction), count_of(input.numel()));
          },
          [loss] { return reduction_name(loss->options.reduction()); }, false, std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::BCEWithLogitsLoss loss, Options options)
    : ParallelCriterion(
          "BCEWithLogitsLoss",
          [loss](const at::Tensor& input, const at::Tensor& target, int64_t reduction, int64_t dim, bool) {
            check_not_per_row("BCEWithLogitsLoss", "weight", loss->weight, input, dim);
            check_not_per_row("BCEWithLogitsLoss", "pos_weight", loss->pos_weight, input, dim);
            auto value = at::binary_cross_entropy_with_logits(
                input, target, on(loss->weight, input), on(loss->pos_weight, input), reduction);
            return std::make_pair(value, count_of(input.numel()));
          },
          [loss] { return reduction_name(loss->options.reduction()); }, false, std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::KLDivLoss loss, Options options)
    : ParallelCriterion(
          "KLDivLoss",
          [loss](const at::Tensor& input, const at::Tensor& target, int64_t reduction, int64_t dim, bool first) {
            auto value = at::kl_div(input, target, reduction, loss->options.log_target());
            if (reduction_name(loss->options.reduction()) != "batchmean") {
              return std::make_pair(value, count_of(broadcast_numel(input, target)));
            }
            // batchmean divides by input.size(0): the sum of the chunks' when the batch is split along dim 0.
            if (input.dim() == 0) {
              return std::make_pair(value, count_of(first ? 1 : 0));
            }
            const bool rows = normalized(dim, input.dim()) == 0;
            return std::make_pair(value, count_of(rows || first ? input.size(0) : 0));
          },
          [loss] { return reduction_name(loss->options.reduction()); }, false, std::move(options)) {}

ParallelCriterion::ParallelCriterion(LossFn loss, Options options)
    : loss_(std::move(loss)), options_(std::move(options)) {
  TORCH_CHECK(loss_, "ParallelCriterion needs a loss, but got an empty std::function");
}

ParallelCriterion::ParallelCriterion(SumAndCountFn loss, Options options)
    : sum_and_count_(std::move(loss)), options_(std::move(options)) {
  TORCH_CHECK(sum_and_count_, "ParallelCriterion needs a loss, but got an empty std::function");
}

at::Tensor ParallelCriterion::forward(const ScatteredOutputs<at::Tensor>& outputs, const at::Tensor& target) const {
  const auto n = outputs.outputs.size();
  TORCH_CHECK(n > 0, "ParallelCriterion: the ScatteredOutputs hold no output");
  TORCH_CHECK(
      outputs.devices.size() == n, "ParallelCriterion: the ScatteredOutputs hold ", n, " outputs but ",
      outputs.devices.size(), " devices");
  std::vector<int64_t> sizes;
  for (const auto& output : outputs.outputs) {
    const auto rows = detail::rows_along(output, outputs.dim);
    TORCH_CHECK(
        rows >= 0, "ParallelCriterion splits the target by the outputs' sizes along dim ", outputs.dim,
        ", but an output has no dim ", outputs.dim);
    sizes.push_back(rows);
  }
  int64_t total_rows = 0;
  for (auto size : sizes) {
    total_rows += size;
  }
  const auto dim = options_.dim().value_or(outputs.dim);
  TORCH_CHECK(
      target.dim() > 0 && dim >= -target.dim() && dim < target.dim() && target.size(dim) == total_rows,
      "ParallelCriterion splits the target along dim ", dim, " into the outputs' chunk sizes (", total_rows,
      " rows), but the target has ",
      target.dim() > 0 && dim >= -target.dim() && dim < target.dim() ? target.size(dim) : -1, " rows there (",
      target.dim(), " dimensions)");
  auto targets = torch_dp::scatter(target, outputs.devices, sizes, dim);

  std::vector<size_t> runs;
  for (size_t i = 0; i < n; ++i) {
    if (sizes[i] > 0) {
      runs.push_back(i);
    }
  }
  if (runs.empty()) {
    runs.push_back(0);
  }
  std::vector<c10::Device> devices;
  for (auto i : runs) {
    devices.push_back(outputs.devices[i]);
  }

  const bool exact = static_cast<bool>(exact_);
  const std::string reduction = exact ? reduction_() : "";
  if (exact) {
    TORCH_CHECK(
        reduction == "mean" || reduction == "sum" || reduction == "none" ||
            (reduction == "batchmean" && name_ == "KLDivLoss"),
        "ParallelCriterion: unsupported reduction \"", reduction, "\" for ", name_);
  }
  const auto mode = exact ? (reduction == "none" ? LossReduction::kNone
                                                 : (reduction == "sum" ? LossReduction::kSum : LossReduction::kMean))
                          : options_.reduction().value_or(LossReduction::kMean);

  std::vector<at::Tensor> values(runs.size());
  std::vector<at::Tensor> counts(runs.size());
  auto task = [&](size_t slot) {
    const auto i = runs[slot];
    at::Tensor input = outputs.outputs[i];
    at::Tensor chunk_target = targets[i];
    if (options_.prepare()) {
      std::tie(input, chunk_target) = options_.prepare()(input, chunk_target);
    }
    if (exact) {
      const auto at_reduction = mode == LossReduction::kNone ? at::Reduction::None : at::Reduction::Sum;
      std::tie(values[slot], counts[slot]) = exact_(input, chunk_target, at_reduction, outputs.dim, slot == 0);
    } else if (sum_and_count_) {
      auto result = sum_and_count_(input, chunk_target);
      values[slot] = result.total;
      counts[slot] = result.count;
    } else {
      values[slot] = loss_(input, chunk_target);
    }
  };
  auto pool = outputs.pool;
  if (!pool) {
    static const auto shared = std::make_shared<WorkerPool>();
    pool = shared;
  }
  run_replicas(*pool, devices, task, issuing_after_forward(outputs.issuing, *pool, devices), outputs.reproducible);

  const auto destination = outputs.output_device;
  if (mode == LossReduction::kNone) {
    TORCH_CHECK(!sum_and_count_, "ParallelCriterion: LossReduction::kNone needs a callable returning a tensor");
    auto gather_dim = dim;
    if (drops_class_dim_ && dim > 0 && values[0].dim() < dim + 1) {
      gather_dim = dim - 1;  // CrossEntropy and NLL drop the class dimension (1) of an input that has one
    }
    return torch_dp::gather(values, destination, gather_dim);
  }
  if (mode == LossReduction::kMean && !exact && !sum_and_count_) {
    // A tensor per replica: weighted by the chunk's share of the batch.
    at::Tensor weighted;
    for (size_t slot = 0; slot < runs.size(); ++slot) {
      TORCH_CHECK(values[slot].defined(), "ParallelCriterion: the loss returned an undefined tensor");
      const double share =
          total_rows == 0 ? 1.0 : static_cast<double>(sizes[runs[slot]]) / static_cast<double>(total_rows);
      auto part = values[slot].to(destination) * share;
      weighted = weighted.defined() ? weighted + part : part;
    }
    return weighted;
  }
  at::Tensor total;
  for (auto& value : values) {
    TORCH_CHECK(value.defined(), "ParallelCriterion: the loss returned an undefined tensor");
    auto moved = value.to(destination);
    total = total.defined() ? total + moved : moved;
  }
  if (mode == LossReduction::kSum) {
    return total;
  }
  at::Tensor count;
  for (auto& c : counts) {
    TORCH_CHECK(c.defined(), "ParallelCriterion: SumAndCount::count is undefined");
    auto moved = c.to(destination);
    count = count.defined() ? count + moved : moved;
  }
  return total / count.to(total.scalar_type());
}

}  // namespace torch_dp
