// Tests for DataParallelOptions::reproducible and run_replicas(..., reproducible) (Note [Reproducible replicas]
// in src/parallel_apply.cpp): two runs with the same seed are bitwise equal, random ops in the forward included,
// for replicas sharing a device, and equal to running the chunks one after another through the unwrapped module.
//
// Thread timing is what makes runs differ without the option, and on a quiet machine it may happen to repeat. So
// the module sleeps, before its random ops, for a time read from its chunk of a `delay` input: one run lets the
// last replica draw first, the other the first replica. Without the option (or with the mechanism broken) that
// reorders the draws and the runs differ, as the last test checks.

#include "helpers.h"  // torch, then catch.h

#include <torch_dp/torch_dp.h>

#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

namespace {

using at::Tensor;
using tdp_test::cpus;
using torch_dp::Issuing;

using tdp_test::f64;

// Linear, dropout, Linear, plus noise from randn_like: forward(x, delay) sleeps delay[0] milliseconds first.
struct DropNetImpl : torch::nn::Cloneable<DropNetImpl> {
  DropNetImpl() { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(6, 16));
    fc2 = register_module("fc2", torch::nn::Linear(16, 3));
    to(torch::kFloat64);
  }
  Tensor forward(const Tensor& x, const Tensor& delay) {
    std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(delay[0].item<double>()));
    auto h = torch::dropout(torch::relu(fc1->forward(x)), 0.5, is_training());
    auto y = fc2->forward(h);
    return is_training() ? y + 0.1 * torch::randn_like(y) : y;
  }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(DropNet);

constexpr int64_t kReplicas = 3;
constexpr int64_t kRowsPerReplica = 4;
constexpr int kForwards = 8;  // past kAuto's warm-up and into its alternation

// Per row, the milliseconds its replica sleeps: replica r sleeps 25 * r ms (`last_first` false) or
// 25 * (kReplicas - 1 - r) ms (true, so that the last replica draws first when replicas run at once).
Tensor delays(bool last_first) {
  auto replica = torch::arange(kReplicas, f64).repeat_interleave(kRowsPerReplica);
  return 25.0 * (last_first ? (kReplicas - 1) - replica : replica);
}

struct Run {
  std::vector<Tensor> outputs;
  std::vector<Tensor> grads;  // every parameter's gradient, per forward
};

void record(Run& run, DropNet& net, const Tensor& out) {
  out.pow(2).sum().backward();
  run.outputs.push_back(out.detach().clone());
  for (auto& p : net->parameters()) {
    run.grads.push_back(p.grad().clone());
    p.mutable_grad().zero_();
  }
}

// Input rows, and a net with the same weights each time; the random ops then start from seed 1.
Tensor input() {
  torch::manual_seed(7);
  return torch::randn({kReplicas * kRowsPerReplica, 6}, f64);
}
DropNet fresh_net() {
  torch::manual_seed(0);
  return DropNet();
}

Run run_parallel(Issuing issuing, bool reproducible, bool last_first) {
  const auto x = input();
  auto net = fresh_net();
  torch_dp::DataParallel dp(
      net, torch_dp::DataParallelOptions(cpus(kReplicas)).issuing(issuing).reproducible(reproducible));
  const auto delay = delays(last_first);
  torch::manual_seed(1);
  Run run;
  for (int k = 0; k < kForwards; ++k) {
    record(run, net, dp->forward_as<Tensor>(x, delay));
  }
  return run;
}

// The chunks one after another through the unwrapped module, after the same seed.
Run run_chunks() {
  const auto x = input();
  auto net = fresh_net();
  const auto no_delay = torch::zeros({kRowsPerReplica}, f64);
  torch::manual_seed(1);
  Run run;
  for (int k = 0; k < kForwards; ++k) {
    std::vector<Tensor> outs;
    for (const auto& chunk : x.chunk(kReplicas)) {
      outs.push_back(net->forward(chunk, no_delay));
    }
    record(run, net, torch::cat(outs));
  }
  return run;
}

bool bitwise_equal(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
  if (a.size() != b.size()) {
    return false;
  }
  for (size_t i = 0; i < a.size(); ++i) {
    if (!at::equal(a[i], b[i])) {
      return false;
    }
  }
  return true;
}

}  // namespace

TEST_CASE(
    "reproducible: two runs with the same seed are bitwise equal, and equal the chunks run in order",
    "[reproducible]") {
  const auto chunks = run_chunks();
  for (auto issuing : {Issuing::kThreads, Issuing::kAuto, Issuing::kSerial}) {
    INFO("issuing " << torch_dp::issuing_name(issuing));
    const auto first = run_parallel(issuing, /*reproducible=*/true, /*last_first=*/true);
    const auto second = run_parallel(issuing, /*reproducible=*/true, /*last_first=*/false);
    CHECK(bitwise_equal(first.outputs, second.outputs));
    CHECK(bitwise_equal(first.grads, second.grads));
    CHECK(bitwise_equal(first.outputs, chunks.outputs));
    CHECK(bitwise_equal(first.grads, chunks.grads));
  }
}

TEST_CASE("reproducible: without the option, thread timing changes the draws", "[reproducible]") {
  // What the test above would see with the mechanism broken: replicas on threads drawing in the order they run.
  const auto first = run_parallel(Issuing::kThreads, /*reproducible=*/false, /*last_first=*/true);
  const auto second = run_parallel(Issuing::kThreads, /*reproducible=*/false, /*last_first=*/false);
  CHECK_FALSE(bitwise_equal(first.outputs, second.outputs));
}

TEST_CASE("reproducible: off, replicas run as before", "[reproducible]") {
  // Serial issuing already runs the replicas in index order (the chunks' equality aside: without the option,
  // building the replicas draws from the generator); threads give the module's result without random ops.
  const auto first = run_parallel(Issuing::kSerial, /*reproducible=*/false, /*last_first=*/true);
  const auto second = run_parallel(Issuing::kSerial, /*reproducible=*/false, /*last_first=*/false);
  CHECK(bitwise_equal(first.outputs, second.outputs));
  CHECK(bitwise_equal(first.grads, second.grads));

  const auto x = input();
  auto net = fresh_net();
  net->eval();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(kReplicas)).issuing(Issuing::kThreads));
  const auto out = dp->forward_as<Tensor>(x, torch::zeros({x.size(0)}, f64));
  CHECK(tdp_test::close64(out, net->forward(x, torch::zeros({1}, f64))));
  CHECK(dp->pool().num_threads() == kReplicas - 1);
}

TEST_CASE("reproducible: kAuto on one device neither measures nor starts workers", "[reproducible]") {
  auto net = fresh_net();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(kReplicas)).reproducible(true));
  const auto x = input();
  const auto delay = torch::zeros({x.size(0)}, f64);
  for (int k = 0; k < 20; ++k) {
    dp->forward_as<Tensor>(x, delay);
  }
  CHECK(dp->pool().settled_auto_issuing() == Issuing::kAuto);
  CHECK(dp->pool().num_threads() == 0);
}

TEST_CASE("reproducible: run_replicas runs each device's replicas in index order on one thread", "[reproducible]") {
  // All CPU devices share the CPU generator, whatever their index; replicas on another device run on their own
  // thread (meta stands in for an accelerator: it has a device guard and no generator to worry about).
  const std::vector<c10::Device> devices = {
      c10::Device(c10::kCPU), c10::Device(c10::kMeta, 0), c10::Device(c10::kCPU, 0), c10::Device(c10::kMeta, 0),
      c10::Device(c10::kCPU)};
  for (auto issuing : {Issuing::kThreads, Issuing::kAuto, Issuing::kSerial}) {
    INFO("issuing " << torch_dp::issuing_name(issuing));
    torch_dp::WorkerPool pool;
    std::mutex mutex;
    std::vector<size_t> order;
    std::vector<std::thread::id> threads(devices.size());
    torch_dp::run_replicas(
        pool, devices,
        [&](size_t i) {
          std::this_thread::sleep_for(std::chrono::milliseconds(5 * (devices.size() - i)));
          std::lock_guard<std::mutex> lock(mutex);
          order.push_back(i);
          threads[i] = std::this_thread::get_id();
        },
        issuing, /*reproducible=*/true);
    const auto caller = std::this_thread::get_id();
    CHECK((threads[0] == caller && threads[2] == caller && threads[4] == caller));
    CHECK(threads[1] == threads[3]);
    CHECK((threads[1] == caller) == (issuing == Issuing::kSerial));
    std::vector<size_t> cpu_order, meta_order;
    for (auto i : order) {
      (devices[i].is_cpu() ? cpu_order : meta_order).push_back(i);
    }
    CHECK(cpu_order == std::vector<size_t>{0, 2, 4});
    CHECK(meta_order == std::vector<size_t>{1, 3});
  }
}

TEST_CASE("reproducible: a failing replica is rethrown after the others ran", "[reproducible]") {
  torch_dp::WorkerPool pool;
  std::vector<int> ran(4, 0);
  try {
    torch_dp::run_replicas(
        pool, cpus(4),
        [&](size_t i) {
          ran[i] = 1;
          if (i == 1 || i == 2) {
            throw std::runtime_error("boom " + std::to_string(i));
          }
        },
        Issuing::kThreads, /*reproducible=*/true);
    FAIL("expected a ReplicaError");
  } catch (const torch_dp::ReplicaError& e) {
    CHECK(e.replica() == 1);
    CHECK_THAT(e.what(), tdp_test::Contains("boom 1"));
  }
  CHECK(ran == std::vector<int>{1, 1, 1, 1});
}
