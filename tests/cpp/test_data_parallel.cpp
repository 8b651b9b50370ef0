// Tests for torch_dp::DataParallel (the torch::nn module) and torch_dp::data_parallel (the drop-in for
// torch::nn::parallel::data_parallel), on CPU replica lists, in float64: training and parity, i.e. outputs,
// gradients and parameters after SGD against the unwrapped module and LibTorch's own data parallelism. The other
// concerns have files of their own: test_data_parallel_module.cpp (the module's API: forward forms, options,
// names, serialization, clone), test_data_parallel_stale_state.cpp (changes between forwards reach every
// replica), test_data_parallel_chunks.cpp (how a batch is split over the replicas) and
// test_data_parallel_errors.cpp (a failing replica, inputs that are refused).
//
// About the comparison with LibTorch's own torch::nn::parallel::data_parallel: with a CPU-only torch (2.13 here)
// it cannot be used at all. Its header includes torch/csrc/autograd/functions/comm.h, which includes
// ATen/cuda/CUDAContext.h and so needs cuda_runtime_api.h; its Scatter/Gather live in libtorch_cuda only, and
// Gather rejects non-CUDA inputs ("All inputs to Gather must be CUDA tensors"). So:
//  - everywhere, the tests compare against the unwrapped module (outputs, gradients, parameters after SGD);
//  - with a CUDA build of torch (ATen/cuda/CUDAConfig.h present), they also compare against LibTorch's pipeline
//    on CPU replicas, assembled from its pieces that run on CPU (torch::nn::parallel::replicate: clone() plus
//    ReduceAdd gradient edges; torch::nn::parallel::parallel_apply; chunk/cat in place of Scatter/Gather), and,
//    with a GPU, against torch::nn::parallel::data_parallel itself on devices {cuda:0, ...}.

#if __has_include(<ATen/cuda/CUDAConfig.h>)
#define TORCH_DP_TEST_LIBTORCH_HAS_CUDA 1
#else
#define TORCH_DP_TEST_LIBTORCH_HAS_CUDA 0
#endif

// Torch first, then hand CHECK back to Catch2 (c10's logging header defines a glog-style CHECK).
#include <torch/torch.h>
#if TORCH_DP_TEST_LIBTORCH_HAS_CUDA
#include <torch/nn/parallel/data_parallel.h>
#endif
#include <c10/util/Logging.h>
#undef CHECK

#include <torch_dp/torch_dp.h>

#include "helpers.h"  // catch.h, and TDP_CUDA_TEST_CASE

#include <memory>
#include <mutex>
#include <vector>

using tdp_test::clone_of;
using tdp_test::close64;
using tdp_test::ConvBn;
using tdp_test::cpus;
using tdp_test::f64;
using tdp_test::make_net;
using tdp_test::Probe;
using tdp_test::Recorder;
using tdp_test::same_grads;
using tdp_test::same_parameters;
using torch::Tensor;

#if TORCH_DP_TEST_LIBTORCH_HAS_CUDA
namespace {

// LibTorch's data_parallel algorithm from its CPU-capable pieces: replicate() (clone() per device plus
// ReduceAdd gradient edges to the original), parallel_apply(), and chunk/cat for Scatter/Gather.
template <typename Holder>
Tensor libtorch_pipeline(const Holder& module, const Tensor& input, size_t n) {
  auto devices = cpus(n);
  auto chunks = input.chunk(static_cast<int64_t>(n), 0);
  devices.resize(chunks.size(), c10::Device(c10::kCPU));
  auto replicas = torch::nn::parallel::replicate(module, devices);
  auto outputs = torch::nn::parallel::parallel_apply(replicas, chunks, devices);
  return torch::cat(outputs, 0);
}

}  // namespace
#endif

TEST_CASE("DataParallel: numerical equivalence with the unwrapped module over SGD steps", "[data_parallel]") {
  // After LibTorch's DataParallelNumericalEquivalence: same init (clone), SGD on each, 3 steps, params allclose.
  const size_t n = GENERATE(1, 2, 3, 4);
  const int64_t batch = GENERATE(16, 15);  // 15 over 4: chunks 4, 4, 4, 3
  const auto issuing = GENERATE(torch_dp::Issuing::kAuto, torch_dp::Issuing::kSerial);
  CAPTURE(n, batch, torch_dp::issuing_name(issuing));
  torch::manual_seed(0);
  auto model = make_net();
  auto model_dp = clone_of(model);
  REQUIRE(same_parameters(*model, *model_dp, 0));
  torch_dp::DataParallel dp(model_dp, torch_dp::DataParallelOptions(cpus(n)).issuing(issuing));
  torch::optim::SGD optim(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.5));
  torch::optim::SGD optim_dp(dp->parameters(), torch::optim::SGDOptions(0.1).momentum(0.5));
  for (int step = 0; step < 3; ++step) {
    auto input = torch::randn({batch, 10}, f64);
    auto target = torch::randn({batch, 5}, f64);
    optim.zero_grad();
    optim_dp.zero_grad();
    auto output = model->forward(input);
    auto output_dp = dp->forward(input);
    REQUIRE(close64(output, output_dp));
    torch::mse_loss(output, target).backward();
    torch::mse_loss(output_dp, target).backward();
    REQUIRE(same_grads(*model, *model_dp));
    optim.step();
    optim_dp.step();
  }
  CHECK(same_parameters(*model, *model_dp));
}

TEST_CASE("data_parallel: the free function matches the unwrapped module", "[data_parallel]") {
  const size_t n = GENERATE(1, 2, 4);
  CAPTURE(n);
  torch::manual_seed(12);
  auto net = make_net();
  auto reference = clone_of(net);
  for (int call = 0; call < 3; ++call) {
    auto input = torch::randn({7, 10}, f64);
    auto out = torch_dp::data_parallel(net, input, cpus(n), c10::Device(c10::kCPU));
    auto expected = reference->forward(input);
    REQUIRE(close64(out, expected));
    out.pow(2).sum().backward();
    expected.pow(2).sum().backward();
    REQUIRE(same_grads(*net, *reference));
  }
  CHECK(net->fc1->weight.device().is_cpu());
  // With dim = 1 on a module that works per column.
  torch::nn::Functional twice([](const Tensor& x) { return x * 2; });
  auto wide = torch::randn({3, 8}, f64);
  CHECK(close64(torch_dp::data_parallel(twice, wide, cpus(n), std::nullopt, 1), wide * 2));
}

#if TORCH_DP_TEST_LIBTORCH_HAS_CUDA
TEST_CASE("DataParallel: same outputs and gradients as LibTorch's data-parallel pipeline", "[data_parallel]") {
  const size_t n = GENERATE(2, 3, 4);
  CAPTURE(n);
  torch::manual_seed(1);
  auto reference = make_net();
  auto ours = clone_of(reference);
  torch_dp::DataParallel dp(ours, torch_dp::DataParallelOptions(cpus(n)));
  auto input = torch::randn({11, 10}, f64);
  auto input_ref = input.clone().requires_grad_(true);
  auto input_dp = input.clone().requires_grad_(true);
  auto out_ref = libtorch_pipeline(reference, input_ref, n);
  auto out_dp = dp->forward(input_dp);
  REQUIRE(close64(out_ref, out_dp));
  auto grad = torch::randn_like(out_ref);
  out_ref.backward(grad);
  out_dp.backward(grad);
  CHECK(same_grads(*reference, *ours));
  CHECK(close64(input_ref.grad(), input_dp.grad()));

  // The drop-in free function gives the same, and keeps the module where it is.
  auto again = torch_dp::data_parallel(ours, input, cpus(n));
  CHECK(close64(again, out_ref.detach()));
  CHECK(ours->fc1->weight.device().is_cpu());
}

TDP_CUDA_TEST_CASE("DataParallel: same as torch::nn::parallel::data_parallel on CUDA", "[data_parallel][cuda]") {
  const c10::Device cuda0(c10::kCUDA, 0);
  const size_t n = GENERATE(1, 2, 4);
  CAPTURE(n);
  const std::vector<c10::Device> devices(n, cuda0);
  torch::manual_seed(2);
  auto reference = make_net();
  reference->to(cuda0);
  auto ours = clone_of(reference);
  torch_dp::DataParallel dp(ours, torch_dp::DataParallelOptions(devices));
  torch::optim::SGD optim(reference->parameters(), 0.1);
  torch::optim::SGD optim_dp(dp->parameters(), 0.1);
  for (int step = 0; step < 3; ++step) {
    auto input = torch::randn({16, 10}, f64.device(cuda0));
    optim.zero_grad();
    optim_dp.zero_grad();
    auto out_ref = torch::nn::parallel::data_parallel(reference, input, devices);
    auto out_dp = dp->forward(input);
    REQUIRE(close64(out_ref, out_dp, 1e-10));
    out_ref.pow(2).sum().backward();
    out_dp.pow(2).sum().backward();
    REQUIRE(same_grads(*reference, *ours, 1e-10));
    optim.step();
    optim_dp.step();
  }
  CHECK(same_parameters(*reference, *ours, 1e-10));
  // The free function, with LibTorch's signature.
  auto input = torch::randn({16, 10}, f64.device(cuda0));
  auto out_ref = torch::nn::parallel::data_parallel(reference, input, devices, c10::Device(c10::kCPU));
  auto out_ours = torch_dp::data_parallel(ours, input, devices, c10::Device(c10::kCPU));
  CHECK(out_ours.device().is_cpu());
  CHECK(close64(out_ref, out_ours, 1e-10));
}

#endif

TEST_CASE("DataParallel: BatchNorm statistics follow the replica-0 rule", "[data_parallel]") {
  const size_t n = GENERATE(1, 2, 4);
  CAPTURE(n);
  torch::manual_seed(5);
  torch::nn::BatchNorm1d bn(torch::nn::BatchNorm1dOptions(4).momentum(0.3));
  bn->to(torch::kFloat64);
  auto reference = clone_of(bn);
  torch_dp::DataParallel dp(bn, torch_dp::DataParallelOptions(cpus(n)));
  dp->train();
  for (int step = 0; step < 2; ++step) {
    auto input = torch::randn({12, 4}, f64) * 3 + 1;
    auto out = dp->forward(input);
    auto chunks = input.chunk(static_cast<int64_t>(n), 0);
    // Each replica normalises its chunk with its chunk's statistics (a copy of the reference does that here)...
    std::vector<Tensor> expected;
    for (size_t i = 0; i < chunks.size(); ++i) {
      auto copy = clone_of(reference);
      expected.push_back(copy->forward(chunks[i]));
    }
    CHECK(close64(out, torch::cat(expected, 0)));
    // ...and only replica 0's update of the running statistics is kept.
    reference->forward(chunks[0]);
    CHECK(close64(bn->running_mean, reference->running_mean));
    CHECK(close64(bn->running_var, reference->running_var));
    CHECK(bn->num_batches_tracked.item<int64_t>() == step + 1);
  }
  // In eval mode, the running statistics are used and left alone.
  dp->eval();
  auto input = torch::randn({12, 4}, f64);
  auto before = bn->running_mean.clone();
  reference->eval();
  CHECK(close64(dp->forward(input), reference->forward(input)));
  CHECK(close64(bn->running_mean, before));
}

TEST_CASE("DataParallel: grad mode and inference mode reach every replica", "[data_parallel]") {
  auto recorder = std::make_shared<Recorder>();
  Probe probe(recorder);
  const size_t n = 4;
  torch_dp::DataParallel dp(probe, torch_dp::DataParallelOptions(cpus(n)));
  auto input = torch::randn({8, 1}, f64);
  {
    auto out = dp->forward(input);
    CHECK(out.requires_grad());
    std::lock_guard<std::mutex> lock(recorder->mutex);
    CHECK(recorder->grad_enabled == std::vector<bool>(n, true));
  }
  recorder->clear();
  {
    torch::NoGradGuard no_grad;
    auto out = dp->forward(input);
    CHECK_FALSE(out.requires_grad());
    std::lock_guard<std::mutex> lock(recorder->mutex);
    CHECK(recorder->grad_enabled == std::vector<bool>(n, false));
  }
  CHECK(torch::GradMode::is_enabled());
  recorder->clear();
  {
    c10::InferenceMode inference;
    auto x = torch::randn({8, 1}, f64);
    auto out = dp->forward(x);
    CHECK(out.is_inference());
    CHECK(close64(out, x * 2));
    std::lock_guard<std::mutex> lock(recorder->mutex);
    CHECK(recorder->inference == std::vector<bool>(n, true));
    CHECK(recorder->grad_enabled == std::vector<bool>(n, false));
  }
  recorder->clear();
  // Grad mode back on after the guards: gradients flow again.
  auto out = dp->forward(input);
  out.sum().backward();
  CHECK(close64(probe->w.grad(), input.sum().reshape({1})));
  std::lock_guard<std::mutex> lock(recorder->mutex);
  CHECK(recorder->grad_enabled == std::vector<bool>(n, true));
  CHECK(recorder->inference == std::vector<bool>(n, false));
}

TEST_CASE("DataParallel: train/eval of a BatchNorm conv net matches the unwrapped module", "[data_parallel]") {
  torch::manual_seed(10);
  ConvBn net;
  net->to(torch::kFloat64);
  auto reference = clone_of(net);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(2)));
  auto input = torch::randn({8, 3, 6, 6}, f64);
  dp->eval();
  reference->eval();
  auto out = dp->forward(input);
  auto expected = reference->forward(input);
  CHECK(close64(out, expected));
  out.sum().backward();
  expected.sum().backward();
  CHECK(same_grads(*net, *reference));
}

TEST_CASE("DataParallel: gradients accumulate in the original parameters", "[data_parallel]") {
  const size_t n = GENERATE(2, 3);
  CAPTURE(n);
  torch::manual_seed(11);
  auto net = make_net();
  auto reference = clone_of(net);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(n)));
  for (int micro = 0; micro < 3; ++micro) {
    auto input = torch::randn({9, 10}, f64);
    dp->forward(input).pow(2).mean().backward();
    reference->forward(input).pow(2).mean().backward();
    REQUIRE(same_grads(*net, *reference));
  }
  // The gradients are the wrapped module's own: the wrapper's parameters are the module's tensors.
  for (const auto& p : dp->parameters()) {
    CHECK(p.grad().defined());
  }
  // A forward under no_grad between accumulations leaves the gradients alone.
  std::vector<Tensor> before;
  for (const auto& p : net->parameters()) {
    before.push_back(p.grad().clone());
  }
  {
    torch::NoGradGuard no_grad;
    dp->forward(torch::randn({9, 10}, f64));
  }
  auto params = net->parameters();
  for (size_t k = 0; k < params.size(); ++k) {
    CHECK(close64(params[k].grad(), before[k]));
  }
}

TEST_CASE("DataParallel: frozen parameters stay frozen in every replica", "[data_parallel]") {
  const size_t n = GENERATE(2, 3);
  CAPTURE(n);
  torch::manual_seed(13);
  auto net = make_net();
  auto reference = clone_of(net);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(n)));
  auto input = torch::randn({9, 10}, f64);
  dp->forward(input).sum().backward();  // replicas built and used with every parameter trainable
  net->zero_grad();
  // Freeze the first layer (fine-tuning): the replicas must neither compute nor keep gradients for it.
  for (auto& p : net->fc1->parameters()) {
    p.requires_grad_(false);
  }
  for (auto& p : reference->fc1->parameters()) {
    p.requires_grad_(false);
  }
  auto out = dp->forward(input);
  auto expected = reference->forward(input);
  REQUIRE(close64(out, expected));
  out.pow(2).sum().backward();
  expected.pow(2).sum().backward();
  CHECK(same_grads(*net, *reference));
  CHECK_FALSE(net->fc1->weight.grad().defined());
  // Everything frozen: the output does not require grad, as the unwrapped module's does not.
  for (auto& p : net->parameters()) {
    p.requires_grad_(false);
  }
  CHECK_FALSE(dp->forward(input).requires_grad());
  // ...also where the replicas are built (cloned) after the freezing.
  torch_dp::DataParallel fresh(net, torch_dp::DataParallelOptions(cpus(n)));
  CHECK_FALSE(fresh->forward(input).requires_grad());
  // Trainable again: gradients flow to the first layer once more.
  for (auto& p : net->parameters()) {
    p.requires_grad_(true);
  }
  for (auto& p : reference->fc1->parameters()) {
    p.requires_grad_(true);
  }
  net->zero_grad();
  reference->zero_grad();
  dp->forward(input).sum().backward();
  reference->forward(input).sum().backward();
  CHECK(same_grads(*net, *reference));
}
