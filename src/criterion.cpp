#include <torch_dp/criterion.h>

#include <torch_dp/gather.h>
#include <torch_dp/scatter.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/enum.h>

#include <string>
#include <utility>
#include <variant>
#include <vector>

// ParallelCriterion runs the exact rules of loss_rules.h (Note [Reducing a loss over chunks] there) or a callable on
// every replica's chunk, and reduces the parts on the output device.

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

// The rule of a torch::nn loss module: its name, and its options as they are when the rule is read.
template <typename Loss>
detail::RuleReader rule_of(std::string name, Loss loss, void (*fill)(const Loss&, detail::LossRule&)) {
  return {[name = std::move(name), loss = std::move(loss), fill] {
    detail::LossRule rule;
    rule.name = name;
    rule.reduction = reduction_name(loss->options.reduction());
    if (fill != nullptr) {
      fill(loss, rule);
    }
    return rule;
  }};
}

}  // namespace

ParallelCriterion::ParallelCriterion(detail::RuleReader rule, Options options)
    : rule_(std::move(rule)), options_(std::move(options)) {
  const auto current = rule_.read();
  TORCH_CHECK_VALUE(
      !options_.reduction().has_value(), "ParallelCriterion takes the reduction of ", current.name,
      " from the module (reduction \"", current.reduction, "\"); set it in the module's options instead");
  detail::check_loss_reduction(current);
}

ParallelCriterion::ParallelCriterion(torch::nn::CrossEntropyLoss loss, Options options)
    : ParallelCriterion(
          rule_of<torch::nn::CrossEntropyLoss>(
              "CrossEntropyLoss", std::move(loss),
              [](const torch::nn::CrossEntropyLoss& m, detail::LossRule& rule) {
                rule.weight = m->weight;
                rule.ignore_index = m->options.ignore_index();
                rule.label_smoothing = m->options.label_smoothing();
              }),
          std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::NLLLoss loss, Options options)
    : ParallelCriterion(
          rule_of<torch::nn::NLLLoss>(
              "NLLLoss", std::move(loss),
              [](const torch::nn::NLLLoss& m, detail::LossRule& rule) {
                rule.weight = m->weight;
                rule.ignore_index = m->options.ignore_index();
              }),
          std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::MSELoss loss, Options options)
    : ParallelCriterion(rule_of<torch::nn::MSELoss>("MSELoss", std::move(loss), nullptr), std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::L1Loss loss, Options options)
    : ParallelCriterion(rule_of<torch::nn::L1Loss>("L1Loss", std::move(loss), nullptr), std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::SmoothL1Loss loss, Options options)
    : ParallelCriterion(
          rule_of<torch::nn::SmoothL1Loss>(
              "SmoothL1Loss", std::move(loss),
              [](const torch::nn::SmoothL1Loss& m, detail::LossRule& rule) {
                rule.beta = m->options.beta().value_or(1.0);
              }),
          std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::HuberLoss loss, Options options)
    : ParallelCriterion(
          rule_of<torch::nn::HuberLoss>(
              "HuberLoss", std::move(loss),
              [](const torch::nn::HuberLoss& m, detail::LossRule& rule) { rule.delta = m->options.delta(); }),
          std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::BCELoss loss, Options options)
    : ParallelCriterion(
          rule_of<torch::nn::BCELoss>(
              "BCELoss", std::move(loss),
              [](const torch::nn::BCELoss& m, detail::LossRule& rule) { rule.weight = m->options.weight(); }),
          std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::BCEWithLogitsLoss loss, Options options)
    : ParallelCriterion(
          rule_of<torch::nn::BCEWithLogitsLoss>(
              "BCEWithLogitsLoss", std::move(loss),
              [](const torch::nn::BCEWithLogitsLoss& m, detail::LossRule& rule) {
                rule.weight = m->weight;
                rule.pos_weight = m->pos_weight;
              }),
          std::move(options)) {}

ParallelCriterion::ParallelCriterion(torch::nn::KLDivLoss loss, Options options)
    : ParallelCriterion(
          rule_of<torch::nn::KLDivLoss>(
              "KLDivLoss", std::move(loss),
              [](const torch::nn::KLDivLoss& m, detail::LossRule& rule) { rule.log_target = m->options.log_target(); }),
          std::move(options)) {}

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

  const bool exact = static_cast<bool>(rule_.read);
  detail::LossRule rule;
  if (exact) {
    rule = rule_.read();
    detail::check_loss_reduction(rule);
  }
  const auto mode =
      exact ? (rule.reduction == "none" ? LossReduction::kNone
                                        : (rule.reduction == "sum" ? LossReduction::kSum : LossReduction::kMean))
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
      std::tie(values[slot], counts[slot]) = detail::loss_part(rule, input, chunk_target, outputs.dim, slot == 0);
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
    return torch_dp::gather(values, destination, exact ? detail::none_gather_dim(rule, values[0], dim) : dim);
  }
  std::vector<int64_t> rows;
  for (auto i : runs) {
    rows.push_back(sizes[i]);
  }
  const bool with_counts = exact || static_cast<bool>(sum_and_count_);
  return detail::reduce_loss_parts(
      values, with_counts ? counts : std::vector<at::Tensor>{}, mode == LossReduction::kSum, rows, destination);
}

}  // namespace torch_dp
