// Tests for DataParallel::forward_scattered and torch_dp::ParallelCriterion on CPU replica lists: the loss computed
// on the replicas equals the whole batch's loss, with the same input and parameter gradients over several SGD
// steps, for uneven chunks, a device given no rows and a batch smaller than the device count (float64).

#include "helpers.h"

#include <torch_dp/torch_dp.h>

#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

using tdp_test::clone_of;
using tdp_test::close64;
using tdp_test::Contains;
using tdp_test::cpus;
using tdp_test::f64;
using tdp_test::make_net;
using tdp_test::same_grads;
using tdp_test::same_parameters;
using torch::Tensor;
using torch_dp::LossReduction;
using torch_dp::ParallelCriterion;
using torch_dp::ParallelCriterionOptions;
using torch_dp::SumAndCount;

namespace {

constexpr int64_t kClasses = 5;  // tdp_test::Net's outputs

Tensor class_targets(int64_t n) {
  return torch::randint(0, kClasses, {n}, torch::kLong);
}
Tensor ignored_targets(int64_t n) {
  auto t = class_targets(n);
  t.masked_fill_(torch::rand({n}) < 0.4, -1);
  t[0] = -1;
  t[n - 1] = 2;  // not every target ignored (the mean would be 0 / 0, NaN, as for the whole batch)
  return t;
}
Tensor soft_targets(int64_t n) {
  return torch::softmax(torch::randn({n, kClasses}, f64), 1);
}
Tensor dense_targets(int64_t n) {
  return torch::randn({n, kClasses}, f64);
}
Tensor unit_targets(int64_t n) {
  return torch::rand({n, kClasses}, f64);
}
Tensor class_weight() {
  return torch::rand({kClasses}, f64) + 0.1;
}

using Transform = std::function<Tensor(const Tensor&)>;
Tensor identity(const Tensor& x) {
  return x;
}
Tensor log_probs(const Tensor& x) {
  return torch::log_softmax(x, 1);
}
Tensor probs(const Tensor& x) {
  return torch::sigmoid(x);
}

struct Case {
  std::string name;
  std::function<ParallelCriterion()> criterion;
  std::function<Tensor(const Tensor&, const Tensor&)> reference;  // (whole output, whole target) -> loss
  std::function<Tensor(int64_t)> target;
};

// A case for a torch::nn loss: the model's output goes through `transform` (log_softmax, sigmoid) before the loss,
// in the reference and, through ParallelCriterionOptions::prepare, on every replica.
template <typename Loss>
Case loss_case(std::string name, Loss loss, std::function<Tensor(int64_t)> target, Transform transform = identity) {
  Case c;
  c.name = std::move(name);
  c.criterion = [loss, transform] {
    return ParallelCriterion(loss, ParallelCriterionOptions().prepare([transform](const Tensor& out, const Tensor& y) {
      return std::make_tuple(transform(out), y);
    }));
  };
  c.reference = [loss, transform](const Tensor& out, const Tensor& y) mutable { return loss(transform(out), y); };
  c.target = std::move(target);
  return c;
}

template <typename Options>
Options with_reduction(Options options, const std::string& reduction) {
  if (reduction == "mean") {
    options.reduction(torch::kMean);
  } else if (reduction == "sum") {
    options.reduction(torch::kSum);
  } else {
    options.reduction(torch::kNone);
  }
  return options;
}

std::vector<Case> cases_for(const std::string& r) {
  namespace nn = torch::nn;
  std::vector<Case> cases;
  cases.push_back(
      loss_case("ce", nn::CrossEntropyLoss(with_reduction(nn::CrossEntropyLossOptions(), r)), class_targets));
  cases.push_back(loss_case(
      "ce weight ignore_index label_smoothing",
      nn::CrossEntropyLoss(with_reduction(
          nn::CrossEntropyLossOptions().weight(class_weight()).ignore_index(-1).label_smoothing(0.2), r)),
      ignored_targets));
  cases.push_back(loss_case(
      "ce ignore_index", nn::CrossEntropyLoss(with_reduction(nn::CrossEntropyLossOptions().ignore_index(-1), r)),
      ignored_targets));
  cases.push_back(loss_case(
      "ce probabilities weight label_smoothing",
      nn::CrossEntropyLoss(
          with_reduction(nn::CrossEntropyLossOptions().weight(class_weight()).label_smoothing(0.1), r)),
      soft_targets));
  cases.push_back(loss_case(
      "nll weight ignore_index",
      nn::NLLLoss(with_reduction(nn::NLLLossOptions().weight(class_weight()).ignore_index(-1), r)), ignored_targets,
      log_probs));
  cases.push_back(loss_case("mse", nn::MSELoss(with_reduction(nn::MSELossOptions(), r)), dense_targets));
  cases.push_back(loss_case("l1", nn::L1Loss(with_reduction(nn::L1LossOptions(), r)), dense_targets));
  cases.push_back(
      loss_case("smooth_l1", nn::SmoothL1Loss(with_reduction(nn::SmoothL1LossOptions().beta(0.5), r)), dense_targets));
  cases.push_back(
      loss_case("huber", nn::HuberLoss(with_reduction(nn::HuberLossOptions().delta(0.7), r)), dense_targets));
  cases.push_back(loss_case(
      "bce weight", nn::BCELoss(with_reduction(nn::BCELossOptions().weight(class_weight()), r)), unit_targets, probs));
  cases.push_back(loss_case(
      "bce_with_logits weight pos_weight",
      nn::BCEWithLogitsLoss(
          with_reduction(nn::BCEWithLogitsLossOptions().weight(class_weight()).pos_weight(class_weight() * 3), r)),
      unit_targets));
  cases.push_back(loss_case(
      "kl_div log_target", nn::KLDivLoss(with_reduction(nn::KLDivLossOptions().log_target(true), r)),
      [](int64_t n) { return soft_targets(n).log(); }, log_probs));
  if (r == "mean") {
    cases.push_back(loss_case(
        "kl_div batchmean", nn::KLDivLoss(nn::KLDivLossOptions().reduction(torch::kBatchMean)), soft_targets,
        log_probs));
  }
  return cases;
}

struct Layout {
  std::string name;
  std::vector<c10::Device> devices;
  std::optional<std::vector<int64_t>> chunk_sizes;
  int64_t rows;
};

std::vector<Layout> layouts() {
  return {
      {"uneven 3 3 1", cpus(3), std::nullopt, 7},
      {"chunk_sizes 4 0 3", cpus(3), std::vector<int64_t>{4, 0, 3}, 7},
      {"batch 3 on 4 devices", cpus(4), std::nullopt, 3},
      {"equal 2 2 2 2", cpus(4), std::nullopt, 8},
      {"one device", cpus(1), std::nullopt, 5},
  };
}

// Trains a module through DataParallel + ParallelCriterion and a clone on the whole batch's loss side by side.
void check_training(const Case& c, const Layout& layout, int steps = 3) {
  INFO(c.name << " on " << layout.name);
  auto net = make_net();
  auto reference = clone_of(net);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(layout.devices).chunk_sizes(layout.chunk_sizes));
  auto criterion = c.criterion();
  torch::optim::SGD optim(dp->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  torch::optim::SGD optim_ref(reference->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  for (int step = 0; step < steps; ++step) {
    auto x = torch::randn({layout.rows, 10}, f64);
    auto y = c.target(layout.rows);
    auto x_dp = x.clone().requires_grad_();
    auto x_ref = x.clone().requires_grad_();
    auto got = criterion(dp->forward_scattered(x_dp), y);
    auto expected = c.reference(reference->forward(x_ref), y);
    REQUIRE(close64(got, expected));
    if (expected.dim() > 0) {  // reduction "none": a weighted sum, so that every element's gradient counts
      auto r = torch::rand(expected.sizes(), f64);
      got = (got * r).sum();
      expected = (expected * r).sum();
    }
    optim.zero_grad();
    optim_ref.zero_grad();
    got.backward();
    expected.backward();
    REQUIRE(close64(x_dp.grad(), x_ref.grad()));
    REQUIRE(same_grads(*net, *reference, 1e-11));
    optim.step();
    optim_ref.step();
  }
  REQUIRE(same_parameters(*net, *reference, 1e-11));
}

}  // namespace

TEST_CASE("ParallelCriterion equals the whole batch's loss, with its gradients", "[criterion]") {
  torch::manual_seed(0);
  for (const std::string reduction : {"mean", "sum", "none"}) {
    for (const auto& c : cases_for(reduction)) {
      for (const auto& layout : layouts()) {
        check_training(c, layout);
      }
    }
  }
}

TEST_CASE("dividing by the replica count would not pass these checks", "[criterion]") {
  torch::manual_seed(1);
  auto net = make_net();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(3)));
  auto x = torch::randn({7, 10}, f64);
  auto y = class_targets(7);
  auto scattered = dp->forward_scattered(x);
  auto exact = ParallelCriterion(torch::nn::CrossEntropyLoss())(scattered, y);
  auto chunks = y.split_with_sizes({3, 3, 1});
  auto naive =
      (torch::cross_entropy_loss(scattered[0], chunks[0]) + torch::cross_entropy_loss(scattered[1], chunks[1]) +
       torch::cross_entropy_loss(scattered[2], chunks[2])) /
      3;
  REQUIRE(close64(exact, torch::cross_entropy_loss(net->forward(x), y)));
  REQUIRE_FALSE(at::allclose(naive, exact, 1e-6, 0));
}

TEST_CASE("ParallelCriterion reads the module's options at every call", "[criterion]") {
  torch::manual_seed(2);
  auto net = make_net();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(3)));
  auto x = torch::randn({7, 10}, f64);
  auto y = torch::tensor({0, 1, 2, 3, 4, 1, 1}, torch::kLong);
  torch::nn::CrossEntropyLoss loss;
  ParallelCriterion criterion(loss);
  const std::vector<std::function<void()>> changes = {
      [] {},
      [&] { loss->options.ignore_index(1); },
      [&] { loss->options.label_smoothing(0.3); },
      [&] { loss->options.reduction(torch::kSum); },
  };
  for (const auto& change : changes) {
    change();
    REQUIRE(close64(criterion(dp->forward_scattered(x), y), loss(net->forward(x), y)));
  }
}

TEST_CASE("ParallelCriterion checks target sizes as torch.nn.functional does", "[criterion]") {
  auto net = make_net();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(3)));
  auto x = torch::randn({7, 10}, f64);
  auto y = torch::rand({7, 1}, f64);
  REQUIRE_THROWS_WITH(
      ParallelCriterion(torch::nn::BCELoss())(dp->forward_scattered(x), y),
      Contains("BCELoss needs a target of the input's size, but got target size [3, 1] for input size [3, 5]"));
  REQUIRE_THROWS_WITH(
      ParallelCriterion(torch::nn::BCEWithLogitsLoss())(dp->forward_scattered(x), y),
      Contains("BCEWithLogitsLoss needs a target of the input's size"));
}

TEST_CASE("forward_scattered keeps the outputs on their replicas", "[criterion]") {
  auto net = make_net();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(3)).chunk_sizes(std::vector<int64_t>{2, 0, 5}));
  auto x = torch::randn({7, 10}, f64);
  auto scattered = dp->forward_scattered(x);
  REQUIRE(scattered.size() == 2);  // the device given no rows ran no replica
  REQUIRE(scattered.chunk_sizes == std::vector<int64_t>{2, 5});
  REQUIRE(scattered.devices.size() == 2);
  REQUIRE(scattered.devices[1].is_cpu());
  REQUIRE(scattered.output_device.is_cpu());
  REQUIRE(close64(scattered[1], net->forward(x).narrow(0, 2, 5)));
  REQUIRE(close64(scattered.gather(), dp->forward(x)));

  SECTION("IValue outputs, and map to the tensor a criterion takes") {
    tdp_test::IValueModule ivalue_module;
    torch_dp::DataParallel tuple_net(ivalue_module, torch_dp::DataParallelOptions(cpus(3)));
    auto a = torch::randn({5, 3}, f64);
    auto input = c10::IValue(c10::ivalue::Tuple::create({c10::IValue(a), c10::IValue(torch::randn({5, 3}, f64))}));
    auto outputs = tuple_net->forward_scattered<c10::IValue>(input);
    REQUIRE(outputs.chunk_sizes == std::vector<int64_t>{2, 2, 1});
    auto gathered = outputs.gather();
    auto direct = tuple_net->forward_as<c10::IValue>(input);
    REQUIRE(torch_dp::detail::first_tensor(gathered).equal(torch_dp::detail::first_tensor(direct)));
    auto firsts = outputs.map([](const c10::IValue& v) { return torch_dp::detail::first_tensor(v); });
    REQUIRE(firsts.chunk_sizes == std::vector<int64_t>{2, 2, 1});
  }
}

TEST_CASE("ParallelCriterion over callables", "[criterion]") {
  torch::manual_seed(2);
  auto net = make_net();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(3)).chunk_sizes(std::vector<int64_t>{1, 4, 2}));
  auto x = torch::randn({7, 10}, f64);

  SECTION("a mean is weighted by each chunk's share of the batch") {
    auto y = dense_targets(7);
    ParallelCriterion criterion([](const Tensor& out, const Tensor& t) { return (out - t).pow(2).mean(); });
    auto got = criterion(dp->forward_scattered(x), y);
    REQUIRE(close64(got, torch::mse_loss(net->forward(x), y)));
  }
  SECTION("kSum adds the chunks") {
    auto y = dense_targets(7);
    ParallelCriterion criterion(
        [](const Tensor& out, const Tensor& t) { return (out - t).abs().sum(); },
        ParallelCriterionOptions().reduction(LossReduction::kSum));
    REQUIRE(close64(criterion(dp->forward_scattered(x), y), (net->forward(x) - y).abs().sum()));
  }
  SECTION("SumAndCount is exact where shares of rows are not") {
    auto y = ignored_targets(7);
    ParallelCriterion criterion([](const Tensor& out, const Tensor& t) {
      return SumAndCount{torch::nll_loss(torch::log_softmax(out, 1), t, {}, at::Reduction::Sum, -1), t.ne(-1).sum()};
    });
    auto x_dp = x.clone().requires_grad_();
    auto x_ref = x.clone().requires_grad_();
    auto got = criterion(dp->forward_scattered(x_dp), y);
    auto expected = torch::nll_loss(torch::log_softmax(net->forward(x_ref), 1), y, {}, at::Reduction::Mean, -1);
    REQUIRE(close64(got, expected));
    auto g_got = torch::autograd::grad({got}, {x_dp})[0];
    auto g_exp = torch::autograd::grad({expected}, {x_ref})[0];
    REQUIRE(close64(g_got, g_exp));
  }
  SECTION("kNone gathers") {
    auto y = dense_targets(7);
    ParallelCriterion criterion(
        [](const Tensor& out, const Tensor& t) { return (out - t).pow(2); },
        ParallelCriterionOptions().reduction(LossReduction::kNone));
    REQUIRE(close64(criterion(dp->forward_scattered(x), y), (net->forward(x) - y).pow(2)));
  }
}

TEST_CASE("ParallelCriterion for a language model's output, flattened by prepare", "[criterion]") {
  torch::manual_seed(3);
  // (batch, sequence) tokens -> (batch, sequence, vocabulary) logits; the loss over every token.
  auto lm = torch::nn::Sequential(torch::nn::Embedding(11, 6), torch::nn::Tanh(), torch::nn::Linear(6, 11));
  lm->to(torch::kFloat64);
  auto reference = clone_of(lm);
  torch_dp::DataParallel dp(lm, torch_dp::DataParallelOptions(cpus(3)));
  auto tokens = torch::randint(0, 11, {5, 4}, torch::kLong);
  auto labels = torch::randint(0, 11, {5, 4}, torch::kLong);
  labels.masked_fill_(labels < 4, -100);
  ParallelCriterion criterion(
      torch::nn::CrossEntropyLoss(torch::nn::CrossEntropyLossOptions().label_smoothing(0.1)),
      ParallelCriterionOptions().prepare(
          [](const Tensor& out, const Tensor& t) { return std::make_tuple(out.flatten(0, 1), t.flatten()); }));
  auto got = criterion(dp->forward_scattered(tokens), labels);
  auto expected = torch::nn::functional::cross_entropy(
      reference->forward(tokens).flatten(0, 1), labels.flatten(),
      torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(0.1));
  REQUIRE(close64(got, expected));
  got.backward();
  expected.backward();
  REQUIRE(same_grads(*lm, *reference));
}

TEST_CASE("ParallelCriterion runs on the worker threads with the caller's grad mode", "[criterion]") {
  auto net = make_net();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(4)).issuing(torch_dp::Issuing::kThreads));
  std::mutex mutex;
  std::set<std::thread::id> threads;
  bool any_grad = false;
  ParallelCriterion criterion([&](const Tensor& out, const Tensor& t) {
    std::lock_guard<std::mutex> hold(mutex);
    threads.insert(std::this_thread::get_id());
    any_grad = any_grad || torch::GradMode::is_enabled();
    return torch::mse_loss(out, t);
  });
  torch::NoGradGuard no_grad;
  auto result = criterion(dp->forward_scattered(torch::randn({8, 10}, f64)), dense_targets(8));
  REQUIRE_FALSE(result.requires_grad());
  REQUIRE_FALSE(any_grad);
  REQUIRE(threads.size() == 4);
}

TEST_CASE("ParallelCriterion errors", "[criterion]") {
  auto net = make_net();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(2)));
  auto x = torch::randn({6, 10}, f64);
  ParallelCriterion criterion{torch::nn::CrossEntropyLoss()};
  REQUIRE_THROWS_WITH(
      criterion(dp->forward_scattered(x), class_targets(5)),
      Contains("splits the target along dim 0 into the outputs' chunk sizes (6 rows), but the target has 5 rows"));
  REQUIRE_THROWS_WITH(
      ParallelCriterion(torch::nn::MSELoss(), ParallelCriterionOptions().reduction(LossReduction::kSum)),
      Contains("takes the reduction of MSELoss from the module"));
  ParallelCriterion bce{
      torch::nn::BCEWithLogitsLoss(torch::nn::BCEWithLogitsLossOptions().weight(torch::rand({6, 1}, f64)))};
  REQUIRE_THROWS_WITH(
      bce(dp->forward_scattered(x), unit_targets(6)),
      Contains("BCEWithLogitsLoss's weight has size 6 along the dimension the batch is split on"));
  ParallelCriterion failing([](const Tensor& out, const Tensor&) -> Tensor {
    TORCH_CHECK(out.size(0) != 3, "boom");
    return out.sum();
  });
  REQUIRE_THROWS_WITH(failing(dp->forward_scattered(x), torch::randn({6})), Contains("in replica 0 on device cpu"));
}
