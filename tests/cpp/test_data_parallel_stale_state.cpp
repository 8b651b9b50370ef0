// Tests for torch_dp::DataParallel, on CPU replica lists: whatever changes on the wrapped module between two
// forwards (weights edited in place or through .data or raw pointers, a dtype, train/eval) reaches every replica
// of the next forward, and trust_version_counters opts out of that (as tests/python/test_stale_state.py).

#include "helpers.h"

#include <torch_dp/torch_dp.h>

#include "test_access.h"

#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

using tdp_test::clone_of;
using tdp_test::close64;
using tdp_test::cpus;
using tdp_test::f64;
using tdp_test::make_net;
using tdp_test::Probe;
using tdp_test::Recorder;
using tdp_test::same_parameters;
using torch::Tensor;

TEST_CASE("DataParallel: in-place weight changes between forwards reach every replica", "[data_parallel]") {
  const size_t n = GENERATE(2, 4);
  CAPTURE(n);
  torch::manual_seed(9);
  auto net = make_net();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(n)));
  auto input = torch::randn({8, 10}, f64);
  auto first = dp->forward(input);
  REQUIRE(close64(first, net->forward(input)));
  torch::optim::SGD optim(dp->parameters(), 0.5);
  first.pow(2).sum().backward();
  optim.step();
  CHECK(close64(dp->forward(input), net->forward(input)));
  {
    torch::NoGradGuard no_grad;
    net->fc2->weight.mul_(-2);
    net->fc1->bias.add_(1);
  }
  CHECK(close64(dp->forward(input), net->forward(input)));
  // A parameter given new memory (set_data) and a dtype change are picked up too.
  {
    torch::NoGradGuard no_grad;
    net->fc1->weight.set_data(torch::randn({20, 10}, f64));
  }
  CHECK(close64(dp->forward(input), net->forward(input)));
  net->to(torch::kFloat32);
  auto input32 = input.to(torch::kFloat32);
  CHECK(close64(dp->forward(input32), net->forward(input32), 1e-6));
}

TEST_CASE(
    "DataParallel: writes that move no version counter reach every replica, on both replica paths", "[data_parallel]") {
  // torch's fused optimizers, `.data` edits (variable_data() in C++), the batch-norm op's running statistics
  // and writes through raw pointers move neither a tensor's version counter nor its data pointer.
  const bool copy_path = GENERATE(false, true);  // true: every replica but the first copies the parameters too
  CAPTURE(copy_path);
  torch::manual_seed(11);
  torch::nn::Sequential net(
      torch::nn::Linear(6, 8), torch::nn::BatchNorm1d(8), torch::nn::ReLU(), torch::nn::Linear(8, 3));
  net->to(torch::kFloat64);
  net->eval();  // whole-batch BatchNorm equals chunk-wise BatchNorm only with running statistics
  auto reference = clone_of(net);
  reference->eval();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(3)));
  if (copy_path) {
    torch_dp::detail::TestAccess::copy_everything(*dp);
  }
  auto input = torch::randn({9, 6}, f64);

  // A fused optimizer: SGD steps written into the parameters' memory without moving their version counters.
  for (int step = 0; step < 4; ++step) {
    auto batch = torch::randn({9, 6}, f64);
    auto target = torch::randn({9, 3}, f64);
    auto output = dp->forward(batch);
    auto reference_output = reference->forward(batch);
    INFO("step " << step);
    REQUIRE(close64(output, reference_output));
    torch::mse_loss(output, target).backward();
    torch::mse_loss(reference_output, target).backward();
    for (auto* module :
         {static_cast<torch::nn::Module*>(net.get()), static_cast<torch::nn::Module*>(reference.get())}) {
      for (auto& p : module->parameters()) {
        p.variable_data().sub_(0.1 * p.grad());
        p.mutable_grad().zero_();
      }
    }
  }
  CHECK(same_parameters(*net, *reference));
  CHECK(close64(dp->forward(input), reference->forward(input)));

  // BatchNorm's running mean edited through .data.
  torch::NoGradGuard no_grad;
  auto* bn = net[1]->as<torch::nn::BatchNorm1dImpl>();
  bn->running_mean.variable_data().add_(5.0);
  CHECK(close64(dp->forward(input), net->forward(input)));
  // BatchNorm recalibrated by running the module itself in training mode.
  net->train();
  net->forward(torch::randn({16, 6}, f64) * 2 + 3);
  net->eval();
  CHECK(close64(dp->forward(input), net->forward(input)));
  // A write through the raw pointer, as a CUDA extension's optimizer writes.
  auto weight = net[3]->as<torch::nn::LinearImpl>()->weight;
  const auto replacement = torch::randn(weight.sizes(), f64);
  std::memcpy(weight.data_ptr(), replacement.const_data_ptr(), weight.nbytes());
  CHECK(close64(dp->forward(input), net->forward(input)));
}

TEST_CASE(
    "DataParallel: trust_version_counters opts out of refreshing copies and misses such writes", "[data_parallel]") {
  torch::manual_seed(12);
  torch::nn::BatchNorm1d bn(torch::nn::BatchNorm1dOptions(4));
  bn->to(torch::kFloat64);
  bn->eval();
  torch_dp::DataParallel dp(bn, torch_dp::DataParallelOptions(cpus(2)).trust_version_counters(true));
  auto input = torch::randn({4, 4}, f64);
  torch::NoGradGuard no_grad;
  const auto before = dp->forward(input);
  bn->running_mean.variable_data().add_(5.0);
  const auto after = dp->forward(input);
  // Replica 0 is the module itself and sees the edit; replica 1's copy does not.
  CHECK(close64(after.slice(0, 0, 2), bn->forward(input.slice(0, 0, 2))));
  CHECK(close64(after.slice(0, 2, 4), before.slice(0, 2, 4)));
  CHECK_FALSE(close64(after.slice(0, 2, 4), bn->forward(input.slice(0, 2, 4))));
}

TEST_CASE("DataParallel: train() and eval() reach the replicas", "[data_parallel]") {
  auto recorder = std::make_shared<Recorder>();
  Probe probe(recorder);
  const size_t n = 3;
  torch_dp::DataParallel dp(probe, torch_dp::DataParallelOptions(cpus(n)));
  auto input = torch::randn({6, 1}, f64);
  dp->forward(input);
  dp->eval();
  CHECK_FALSE(probe->is_training());
  recorder->clear();
  dp->forward(input);
  {
    std::lock_guard<std::mutex> lock(recorder->mutex);
    CHECK(recorder->training == std::vector<bool>(n, false));
  }
  dp->train();
  recorder->clear();
  dp->forward(input);
  {
    std::lock_guard<std::mutex> lock(recorder->mutex);
    CHECK(recorder->training == std::vector<bool>(n, true));
  }
  // Switching the wrapped module itself (not the wrapper) is seen as well.
  probe->eval();
  recorder->clear();
  dp->forward(input);
  std::lock_guard<std::mutex> lock(recorder->mutex);
  CHECK(recorder->training == std::vector<bool>(n, false));
}
