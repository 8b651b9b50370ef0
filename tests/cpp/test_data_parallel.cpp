// Tests for torch_dp::DataParallel (the torch::nn module) and torch_dp::data_parallel (the drop-in for
// torch::nn::parallel::data_parallel), on CPU replica lists, in float64.
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

#include "test_access.h"

#include "helpers.h"  // catch.h, and TDP_CUDA_TEST_CASE

#include <atomic>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace {

using torch::Tensor;

std::vector<c10::Device> cpu_devices(size_t n) {
  return std::vector<c10::Device>(n, c10::Device(c10::kCPU));
}

const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

bool close(const Tensor& a, const Tensor& b, double tol = 1e-12) {
  return a.defined() && b.defined() && a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         a.device() == b.device() && torch::allclose(a, b, tol, tol);
}

bool same_impl_check(const Tensor& a, const Tensor& b) {
  return a.unsafeGetTensorImpl() == b.unsafeGetTensorImpl();
}

bool same_parameters(torch::nn::Module& a, torch::nn::Module& b, double tol = 1e-12) {
  auto pa = a.named_parameters();
  auto pb = b.named_parameters();
  if (pa.size() != pb.size()) {
    return false;
  }
  for (const auto& item : pa) {
    const auto* other = pb.find(item.key());
    if (other == nullptr || !close(item.value(), *other, tol)) {
      return false;
    }
  }
  return true;
}

bool same_grads(torch::nn::Module& a, torch::nn::Module& b, double tol = 1e-12) {
  auto pa = a.parameters();
  auto pb = b.parameters();
  if (pa.size() != pb.size()) {
    return false;
  }
  for (size_t k = 0; k < pa.size(); ++k) {
    if (!pa[k].grad().defined() && !pb[k].grad().defined()) {
      continue;
    }
    if (!close(pa[k].grad(), pb[k].grad(), tol)) {
      return false;
    }
  }
  return true;
}

// A small MLP, Cloneable, so that it can be replicated.
struct NetImpl : torch::nn::Cloneable<NetImpl> {
  NetImpl() { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(10, 20));
    fc2 = register_module("fc2", torch::nn::Linear(20, 5));
  }
  Tensor forward(const Tensor& x) { return fc2(torch::tanh(fc1(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Net);

Net make_net() {
  Net net;
  net->to(torch::kFloat64);
  return net;
}

template <typename Holder>
Holder clone_of(const Holder& module) {
  return Holder(std::dynamic_pointer_cast<typename Holder::ContainedType>(module->clone()));
}

// A conv net with BatchNorm, for the buffer and train/eval tests.
// Two SGD steps of dp (wrapping `net`) and of `reference` (an unwrapped clone of net) side by side on batches of
// `rows`: outputs and gradients after each, parameters at the end.
void check_trains_like(torch_dp::DataParallel& dp, NetImpl& net, NetImpl& reference, int64_t rows, int steps) {
  torch::optim::SGD optim(dp->parameters(), 0.1);
  torch::optim::SGD optim_ref(reference.parameters(), 0.1);
  for (int step = 0; step < steps; ++step) {
    auto input = torch::randn({rows, 10}, f64);
    optim.zero_grad();
    optim_ref.zero_grad();
    auto out = dp->forward(input);
    auto expected = reference.forward(input);
    REQUIRE(close(out, expected));
    out.pow(2).sum().backward();
    expected.pow(2).sum().backward();
    REQUIRE(same_grads(net, reference));
    optim.step();
    optim_ref.step();
  }
  CHECK(same_parameters(net, reference));
}

struct ConvBnImpl : torch::nn::Cloneable<ConvBnImpl> {
  ConvBnImpl() { reset(); }
  void reset() override {
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 4, 3).padding(1)));
    bn = register_module("bn", torch::nn::BatchNorm2d(4));
    fc = register_module("fc", torch::nn::Linear(4, 2));
  }
  Tensor forward(const Tensor& x) {
    auto h = torch::relu(bn(conv(x)));
    return fc(h.mean({2, 3}));
  }
  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(ConvBn);

// Several tensor inputs and a non-tensor one, two tensor outputs.
struct TwoInTwoOutImpl : torch::nn::Cloneable<TwoInTwoOutImpl> {
  TwoInTwoOutImpl() { reset(); }
  void reset() override { w = register_parameter("w", torch::randn({3}, f64)); }
  std::tuple<Tensor, Tensor> forward(const Tensor& a, const Tensor& b, double scale) {
    return {(a * w + b) * scale, (a * b).sum(1)};
  }
  Tensor w;
};
TORCH_MODULE(TwoInTwoOut);

// IValues in and out: takes a tuple (a, b), returns (a * w, {"sum": a + b, "rows": a.sum(1)}).
struct IValueModuleImpl : torch::nn::Cloneable<IValueModuleImpl> {
  IValueModuleImpl() { reset(); }
  void reset() override { w = register_parameter("w", torch::randn({3}, f64)); }
  c10::IValue forward(const c10::IValue& input) {
    const auto& elements = input.toTupleRef().elements();
    auto a = elements[0].toTensor();
    auto b = elements[1].toTensor();
    c10::Dict<std::string, Tensor> dict;
    dict.insert("sum", a + b);
    dict.insert("rows", a.sum(1));
    return c10::ivalue::Tuple::create({c10::IValue(a * w), c10::IValue(dict)});
  }
  Tensor w;
};
TORCH_MODULE(IValueModule);

// Records, per call, the thread-local modes a replica ran under. The recorder is shared by the clones (a
// Cloneable clone copy-constructs the module, so the shared_ptr is copied).
struct Recorder {
  std::mutex mutex;
  std::vector<bool> grad_enabled;
  std::vector<bool> training;
  std::vector<bool> inference;
  void clear() {
    std::lock_guard<std::mutex> lock(mutex);
    grad_enabled.clear();
    training.clear();
    inference.clear();
  }
};

struct ProbeImpl : torch::nn::Cloneable<ProbeImpl> {
  explicit ProbeImpl(std::shared_ptr<Recorder> recorder) : recorder(std::move(recorder)) { reset(); }
  void reset() override { w = register_parameter("w", torch::full({1}, 2.0, f64)); }
  Tensor forward(const Tensor& x) {
    {
      std::lock_guard<std::mutex> lock(recorder->mutex);
      recorder->grad_enabled.push_back(torch::GradMode::is_enabled());
      recorder->training.push_back(is_training());
      recorder->inference.push_back(c10::InferenceMode::is_enabled());
    }
    return x * w;
  }
  std::shared_ptr<Recorder> recorder;
  Tensor w;
};
TORCH_MODULE(Probe);

// Throws where the first element of its chunk is odd.
struct OddFailsImpl : torch::nn::Cloneable<OddFailsImpl> {
  OddFailsImpl() { reset(); }
  void reset() override { w = register_parameter("w", torch::ones({1}, f64)); }
  Tensor forward(const Tensor& x) {
    const auto first = static_cast<int64_t>(x[0][0].item<double>());
    if (first % 2 == 1) {
      throw std::runtime_error("Badness! odd chunk " + std::to_string(first));
    }
    return x * w;
  }
  Tensor w;
};
TORCH_MODULE(OddFails);

// Reports, per row, the index of the replica's device (as LibTorch's DataParallelUsesAllAvailableCUDADevices).
struct ReplicaDeviceIndexImpl : torch::nn::Cloneable<ReplicaDeviceIndexImpl> {
  void reset() override {}
  Tensor forward(const Tensor& x) {
    return torch::full({x.size(0)}, static_cast<double>(x.device().index()), x.options().dtype(torch::kFloat64));
  }
};
TORCH_MODULE(ReplicaDeviceIndex);

#if TORCH_DP_TEST_LIBTORCH_HAS_CUDA
// LibTorch's data_parallel algorithm from its CPU-capable pieces: replicate() (clone() per device plus
// ReduceAdd gradient edges to the original), parallel_apply(), and chunk/cat for Scatter/Gather.
template <typename Holder>
Tensor libtorch_pipeline(const Holder& module, const Tensor& input, size_t n) {
  auto devices = cpu_devices(n);
  auto chunks = input.chunk(static_cast<int64_t>(n), 0);
  devices.resize(chunks.size(), c10::Device(c10::kCPU));
  auto replicas = torch::nn::parallel::replicate(module, devices);
  auto outputs = torch::nn::parallel::parallel_apply(replicas, chunks, devices);
  return torch::cat(outputs, 0);
}

#endif

}  // namespace

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
  torch_dp::DataParallel dp(model_dp, torch_dp::DataParallelOptions(cpu_devices(n)).issuing(issuing));
  torch::optim::SGD optim(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.5));
  torch::optim::SGD optim_dp(dp->parameters(), torch::optim::SGDOptions(0.1).momentum(0.5));
  for (int step = 0; step < 3; ++step) {
    auto input = torch::randn({batch, 10}, f64);
    auto target = torch::randn({batch, 5}, f64);
    optim.zero_grad();
    optim_dp.zero_grad();
    auto output = model->forward(input);
    auto output_dp = dp->forward(input);
    REQUIRE(close(output, output_dp));
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
    auto out = torch_dp::data_parallel(net, input, cpu_devices(n), c10::Device(c10::kCPU));
    auto expected = reference->forward(input);
    REQUIRE(close(out, expected));
    out.pow(2).sum().backward();
    expected.pow(2).sum().backward();
    REQUIRE(same_grads(*net, *reference));
  }
  CHECK(net->fc1->weight.device().is_cpu());
  // With dim = 1 on a module that works per column.
  torch::nn::Functional twice([](const Tensor& x) { return x * 2; });
  auto wide = torch::randn({3, 8}, f64);
  CHECK(close(torch_dp::data_parallel(twice, wide, cpu_devices(n), std::nullopt, 1), wide * 2));
}

#if TORCH_DP_TEST_LIBTORCH_HAS_CUDA
TEST_CASE("DataParallel: same outputs and gradients as LibTorch's data-parallel pipeline", "[data_parallel]") {
  const size_t n = GENERATE(2, 3, 4);
  CAPTURE(n);
  torch::manual_seed(1);
  auto reference = make_net();
  auto ours = clone_of(reference);
  torch_dp::DataParallel dp(ours, torch_dp::DataParallelOptions(cpu_devices(n)));
  auto input = torch::randn({11, 10}, f64);
  auto input_ref = input.clone().requires_grad_(true);
  auto input_dp = input.clone().requires_grad_(true);
  auto out_ref = libtorch_pipeline(reference, input_ref, n);
  auto out_dp = dp->forward(input_dp);
  REQUIRE(close(out_ref, out_dp));
  auto grad = torch::randn_like(out_ref);
  out_ref.backward(grad);
  out_dp.backward(grad);
  CHECK(same_grads(*reference, *ours));
  CHECK(close(input_ref.grad(), input_dp.grad()));

  // The drop-in free function gives the same, and keeps the module where it is.
  auto again = torch_dp::data_parallel(ours, input, cpu_devices(n));
  CHECK(close(again, out_ref.detach()));
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
    REQUIRE(close(out_ref, out_dp, 1e-10));
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
  CHECK(close(out_ref, out_ours, 1e-10));
}

#endif

TEST_CASE("DataParallel: several tensor inputs and a tuple output through forward_as", "[data_parallel]") {
  const size_t n = GENERATE(1, 2, 4);
  CAPTURE(n);
  torch::manual_seed(3);
  TwoInTwoOut module;
  auto reference = clone_of(module);
  torch_dp::DataParallel dp(module, torch_dp::DataParallelOptions(cpu_devices(n)));
  auto a = torch::randn({9, 3}, f64);
  auto b = torch::randn({9, 3}, f64);
  auto [y, rows] = dp->forward_as<std::tuple<Tensor, Tensor>>(a, b, 0.5);
  auto [y_ref, rows_ref] = reference->forward(a, b, 0.5);
  CHECK(close(y, y_ref));
  CHECK(close(rows, rows_ref));
  (y.sum() + rows.sum()).backward();
  (y_ref.sum() + rows_ref.sum()).backward();
  CHECK(close(module->w.grad(), reference->w.grad()));
}

TEST_CASE("DataParallel: IValue input and tuple/dict output", "[data_parallel]") {
  const size_t n = GENERATE(1, 3);
  CAPTURE(n);
  torch::manual_seed(4);
  IValueModule module;
  auto reference = clone_of(module);
  torch_dp::DataParallel dp(module, torch_dp::DataParallelOptions(cpu_devices(n)));
  auto a = torch::randn({7, 3}, f64);
  auto b = torch::randn({7, 3}, f64);
  auto input = c10::IValue(c10::ivalue::Tuple::create({c10::IValue(a), c10::IValue(b)}));
  auto out = dp->forward_as<c10::IValue>(input);
  auto expected = reference->forward(input);
  REQUIRE(out.isTuple());
  const auto& elements = out.toTupleRef().elements();
  REQUIRE(elements.size() == 2);
  const auto& expected_elements = expected.toTupleRef().elements();
  CHECK(close(elements[0].toTensor(), expected_elements[0].toTensor()));
  REQUIRE(elements[1].isGenericDict());
  auto dict = elements[1].toGenericDict();
  auto expected_dict = expected_elements[1].toGenericDict();
  REQUIRE(dict.size() == 2);
  CHECK(close(dict.at("sum").toTensor(), expected_dict.at("sum").toTensor()));
  CHECK(close(dict.at("rows").toTensor(), expected_dict.at("rows").toTensor()));
  // Keys keep replica 0's order.
  std::vector<std::string> keys;
  for (const auto& entry : dict) {
    keys.push_back(entry.key().toStringRef());
  }
  const std::vector<std::string> expected_keys{"sum", "rows"};
  CHECK(keys == expected_keys);
  elements[0].toTensor().sum().backward();
  expected_elements[0].toTensor().sum().backward();
  CHECK(close(module->w.grad(), reference->w.grad()));
}

TEST_CASE("DataParallel: BatchNorm statistics follow the replica-0 rule", "[data_parallel]") {
  const size_t n = GENERATE(1, 2, 4);
  CAPTURE(n);
  torch::manual_seed(5);
  torch::nn::BatchNorm1d bn(torch::nn::BatchNorm1dOptions(4).momentum(0.3));
  bn->to(torch::kFloat64);
  auto reference = clone_of(bn);
  torch_dp::DataParallel dp(bn, torch_dp::DataParallelOptions(cpu_devices(n)));
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
    CHECK(close(out, torch::cat(expected, 0)));
    // ...and only replica 0's update of the running statistics is kept.
    reference->forward(chunks[0]);
    CHECK(close(bn->running_mean, reference->running_mean));
    CHECK(close(bn->running_var, reference->running_var));
    CHECK(bn->num_batches_tracked.item<int64_t>() == step + 1);
  }
  // In eval mode, the running statistics are used and left alone.
  dp->eval();
  auto input = torch::randn({12, 4}, f64);
  auto before = bn->running_mean.clone();
  reference->eval();
  CHECK(close(dp->forward(input), reference->forward(input)));
  CHECK(close(bn->running_mean, before));
}

TEST_CASE("DataParallel: grad mode and inference mode reach every replica", "[data_parallel]") {
  auto recorder = std::make_shared<Recorder>();
  Probe probe(recorder);
  const size_t n = 4;
  torch_dp::DataParallel dp(probe, torch_dp::DataParallelOptions(cpu_devices(n)));
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
    CHECK(close(out, x * 2));
    std::lock_guard<std::mutex> lock(recorder->mutex);
    CHECK(recorder->inference == std::vector<bool>(n, true));
    CHECK(recorder->grad_enabled == std::vector<bool>(n, false));
  }
  recorder->clear();
  // Grad mode back on after the guards: gradients flow again.
  auto out = dp->forward(input);
  out.sum().backward();
  CHECK(close(probe->w.grad(), input.sum().reshape({1})));
  std::lock_guard<std::mutex> lock(recorder->mutex);
  CHECK(recorder->grad_enabled == std::vector<bool>(n, true));
  CHECK(recorder->inference == std::vector<bool>(n, false));
}

TEST_CASE("DataParallel: a failing replica is rethrown as ReplicaError naming the lowest one", "[data_parallel]") {
  OddFails module;
  torch_dp::DataParallel dp(module, torch_dp::DataParallelOptions(cpu_devices(4)));
  // Chunks start with 0, 1, 2, 3: replicas 1 and 3 throw; replica 1 is reported.
  auto bad = torch::arange(4, f64).reshape({4, 1});
  bool caught = false;
  try {
    dp->forward(bad);
  } catch (const torch_dp::ReplicaError& e) {
    caught = true;
    CHECK(e.replica() == 1);
    CHECK(e.device().str() == "cpu");
    const std::string what = e.what();
    CAPTURE(what);
    CHECK(what.find("in replica 1 on device cpu") != std::string::npos);
    CHECK(what.find("Badness! odd chunk 1") != std::string::npos);
    CHECK_THROWS_AS(std::rethrow_exception(e.original()), std::runtime_error);
  }
  CHECK(caught);
  // The next forward works, on every replica.
  auto good = torch::tensor({0.0, 2.0, 4.0, 6.0}, f64).reshape({4, 1});
  CHECK(close(dp->forward(good), good));
  CHECK(close(dp->forward(good * 2), good * 2));
  // Replica 0 failing is reported as replica 0.
  try {
    dp->forward(bad + 1);
    FAIL("expected a ReplicaError");
  } catch (const torch_dp::ReplicaError& e) {
    CHECK(e.replica() == 0);
  }
}

TEST_CASE("DataParallel: output placed on options.output_device", "[data_parallel]") {
  auto net = make_net();
  auto input = torch::randn({6, 10}, f64);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpu_devices(3)).output_device(c10::kCPU));
  CHECK(dp->output_device().str() == "cpu");
  auto out = dp->forward(input);
  CHECK(out.device().str() == "cpu");
  CHECK(close(out, net->forward(input)));
  // Without output_device: devices[0].
  torch_dp::DataParallel by_default(net, torch_dp::DataParallelOptions(cpu_devices(2)));
  CHECK(by_default->output_device().str() == "cpu");
  CHECK(by_default->forward(input).device().is_cpu());
  // dim = 1: split and gathered along the second dimension.
  torch::nn::Functional scale([](const Tensor& x) { return x * 3; });
  torch_dp::DataParallel along1(scale, torch_dp::DataParallelOptions(cpu_devices(2)).dim(1));
  auto wide = torch::randn({2, 5}, f64);
  CHECK(close(along1->forward(wide), wide * 3));
}

// Needs a GPU at run time only (no LibTorch data_parallel involved), so it is compiled everywhere (and registered
// only where a CUDA device is available).
TDP_CUDA_TEST_CASE(
    "DataParallel: output on the requested CUDA device, replicas on their devices", "[data_parallel][cuda]") {
  const c10::Device cuda0(c10::kCUDA, 0);
  auto net = make_net();
  net->to(cuda0);
  auto input = torch::randn({8, 10}, f64.device(cuda0));
  auto expected = net->forward(input).cpu();
  torch_dp::DataParallel on_gpu(net, torch_dp::DataParallelOptions({cuda0, cuda0}));
  CHECK(on_gpu->forward(input).device().str() == "cuda:0");
  torch_dp::DataParallel to_cpu(net, torch_dp::DataParallelOptions({cuda0, cuda0}).output_device(c10::kCPU));
  auto out = to_cpu->forward(input);
  CHECK(out.device().is_cpu());
  CHECK(close(out, expected, 1e-10));
  // A CPU input is scattered to the replicas' device.
  CHECK(close(to_cpu->forward(input.cpu()), expected, 1e-10));
  // Every replica runs on its device (default devices: every CUDA device).
  torch_dp::DataParallel all(ReplicaDeviceIndex{});
  const auto count = static_cast<int64_t>(torch::cuda::device_count());
  auto indices = all->forward(torch::zeros({count, 1}, f64.device(cuda0)));
  CHECK(close(indices.cpu(), torch::arange(count, f64)));
}
TEST_CASE("DataParallel: parameters and buffers are named under module.", "[data_parallel]") {
  ConvBn net;
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpu_devices(2)));
  auto params = dp->named_parameters();
  REQUIRE(params.size() == net->named_parameters().size());
  for (const auto& item : params) {
    CAPTURE(item.key());
    CHECK(item.key().rfind("module.", 0) == 0);
  }
  CHECK(params.contains("module.conv.weight"));
  CHECK(params.contains("module.fc.bias"));
  CHECK(same_impl_check(params["module.conv.weight"], net->conv->weight));
  auto buffers = dp->named_buffers();
  CHECK(buffers.contains("module.bn.running_mean"));
  CHECK(buffers.contains("module.bn.num_batches_tracked"));
  // A forward does not add the replicas' tensors to the wrapper.
  dp->forward(torch::randn({4, 3, 5, 5}));
  CHECK(dp->named_parameters().size() == params.size());
  CHECK(dp->named_buffers().size() == buffers.size());
  CHECK(dp->module().get() == net.ptr().get());
}

TEST_CASE("DataParallel: torch::save / torch::load round trip", "[data_parallel]") {
  torch::manual_seed(6);
  ConvBn net;
  net->to(torch::kFloat64);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpu_devices(2)));
  dp->forward(torch::randn({4, 3, 5, 5}, f64));  // running statistics that differ from the initial ones
  std::stringstream stream;
  torch::save(dp, stream);

  torch::manual_seed(7);
  ConvBn other;
  other->to(torch::kFloat64);
  torch_dp::DataParallel loaded(other, torch_dp::DataParallelOptions(cpu_devices(3)));
  auto input = torch::randn({6, 3, 5, 5}, f64);
  loaded->forward(input);  // replicas built before the load must see the loaded tensors
  torch::load(loaded, stream);
  CHECK(same_parameters(*loaded, *dp, 0));
  auto buffers = dp->named_buffers();
  for (const auto& item : loaded->named_buffers()) {
    CAPTURE(item.key());
    CHECK(torch::equal(item.value(), buffers[item.key()]));
  }
  dp->eval();
  loaded->eval();
  CHECK(close(loaded->forward(input), dp->forward(input)));
  dp->train();
  loaded->train();
  // In train mode all three replicas of `loaded` (two of them clones) use the loaded weights.
  auto ref = clone_of(net);
  auto chunks = input.chunk(3, 0);
  std::vector<Tensor> expected;
  for (const auto& chunk : chunks) {
    expected.push_back(clone_of(ref)->forward(chunk));
  }
  CHECK(close(loaded->forward(input), torch::cat(expected, 0)));
}

TEST_CASE("DataParallel: wraps a torch::nn::Sequential directly", "[data_parallel]") {
  torch::manual_seed(8);
  torch::nn::Sequential seq(torch::nn::Linear(6, 8), torch::nn::ReLU(), torch::nn::Linear(8, 2));
  seq->to(torch::kFloat64);
  auto reference = clone_of(seq);
  torch_dp::DataParallel dp(seq, torch_dp::DataParallelOptions(cpu_devices(3)));
  auto input = torch::randn({10, 6}, f64);
  auto out = dp->forward(input);
  auto expected = reference->forward(input);
  CHECK(close(out, expected));
  out.sum().backward();
  expected.sum().backward();
  CHECK(same_grads(*seq, *reference));
  CHECK(dp->named_parameters().contains("module.0.weight"));
  // And through the free function.
  CHECK(close(torch_dp::data_parallel(seq, input, cpu_devices(2)), expected.detach()));
}

TEST_CASE("DataParallel: in-place weight changes between forwards reach every replica", "[data_parallel]") {
  const size_t n = GENERATE(2, 4);
  CAPTURE(n);
  torch::manual_seed(9);
  auto net = make_net();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpu_devices(n)));
  auto input = torch::randn({8, 10}, f64);
  auto first = dp->forward(input);
  REQUIRE(close(first, net->forward(input)));
  torch::optim::SGD optim(dp->parameters(), 0.5);
  first.pow(2).sum().backward();
  optim.step();
  CHECK(close(dp->forward(input), net->forward(input)));
  {
    torch::NoGradGuard no_grad;
    net->fc2->weight.mul_(-2);
    net->fc1->bias.add_(1);
  }
  CHECK(close(dp->forward(input), net->forward(input)));
  // A parameter given new memory (set_data) and a dtype change are picked up too.
  {
    torch::NoGradGuard no_grad;
    net->fc1->weight.set_data(torch::randn({20, 10}, f64));
  }
  CHECK(close(dp->forward(input), net->forward(input)));
  net->to(torch::kFloat32);
  auto input32 = input.to(torch::kFloat32);
  CHECK(close(dp->forward(input32), net->forward(input32), 1e-6));
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
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpu_devices(3)));
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
    REQUIRE(close(output, reference_output));
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
  CHECK(close(dp->forward(input), reference->forward(input)));

  // BatchNorm's running mean edited through .data.
  torch::NoGradGuard no_grad;
  auto* bn = net[1]->as<torch::nn::BatchNorm1dImpl>();
  bn->running_mean.variable_data().add_(5.0);
  CHECK(close(dp->forward(input), net->forward(input)));
  // BatchNorm recalibrated by running the module itself in training mode.
  net->train();
  net->forward(torch::randn({16, 6}, f64) * 2 + 3);
  net->eval();
  CHECK(close(dp->forward(input), net->forward(input)));
  // A write through the raw pointer, as a CUDA extension's optimizer writes.
  auto weight = net[3]->as<torch::nn::LinearImpl>()->weight;
  const auto replacement = torch::randn(weight.sizes(), f64);
  std::memcpy(weight.data_ptr(), replacement.const_data_ptr(), weight.nbytes());
  CHECK(close(dp->forward(input), net->forward(input)));
}

TEST_CASE(
    "DataParallel: trust_version_counters opts out of refreshing copies and misses such writes", "[data_parallel]") {
  torch::manual_seed(12);
  torch::nn::BatchNorm1d bn(torch::nn::BatchNorm1dOptions(4));
  bn->to(torch::kFloat64);
  bn->eval();
  torch_dp::DataParallel dp(bn, torch_dp::DataParallelOptions(cpu_devices(2)).trust_version_counters(true));
  auto input = torch::randn({4, 4}, f64);
  torch::NoGradGuard no_grad;
  const auto before = dp->forward(input);
  bn->running_mean.variable_data().add_(5.0);
  const auto after = dp->forward(input);
  // Replica 0 is the module itself and sees the edit; replica 1's copy does not.
  CHECK(close(after.slice(0, 0, 2), bn->forward(input.slice(0, 0, 2))));
  CHECK(close(after.slice(0, 2, 4), before.slice(0, 2, 4)));
  CHECK_FALSE(close(after.slice(0, 2, 4), bn->forward(input.slice(0, 2, 4))));
}

TEST_CASE("DataParallel: train() and eval() reach the replicas", "[data_parallel]") {
  auto recorder = std::make_shared<Recorder>();
  Probe probe(recorder);
  const size_t n = 3;
  torch_dp::DataParallel dp(probe, torch_dp::DataParallelOptions(cpu_devices(n)));
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

TEST_CASE("DataParallel: train/eval of a BatchNorm conv net matches the unwrapped module", "[data_parallel]") {
  torch::manual_seed(10);
  ConvBn net;
  net->to(torch::kFloat64);
  auto reference = clone_of(net);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpu_devices(2)));
  auto input = torch::randn({8, 3, 6, 6}, f64);
  dp->eval();
  reference->eval();
  auto out = dp->forward(input);
  auto expected = reference->forward(input);
  CHECK(close(out, expected));
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
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpu_devices(n)));
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
    CHECK(close(params[k].grad(), before[k]));
  }
}

TEST_CASE("DataParallel: frozen parameters stay frozen in every replica", "[data_parallel]") {
  const size_t n = GENERATE(2, 3);
  CAPTURE(n);
  torch::manual_seed(13);
  auto net = make_net();
  auto reference = clone_of(net);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpu_devices(n)));
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
  REQUIRE(close(out, expected));
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
  torch_dp::DataParallel fresh(net, torch_dp::DataParallelOptions(cpu_devices(n)));
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

TEST_CASE("DataParallel: a batch smaller than the device list uses fewer replicas", "[data_parallel]") {
  auto net = make_net();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpu_devices(4)));
  for (int64_t rows : {1, 2, 3, 5, 4}) {
    CAPTURE(rows);
    auto input = torch::randn({rows, 10}, f64);
    auto out = dp->forward(input);
    CHECK(close(out, net->forward(input)));
    out.sum().backward();
  }
}

TEST_CASE(
    "DataParallel: chunk_sizes gives each replica its rows, results as the module on the whole batch",
    "[data_parallel]") {
  const std::vector<int64_t> sizes = {1, 4, 2};
  // Each replica reports its own row count on each of its rows: the gathered column shows who got which rows.
  torch::nn::Functional rows(
      [](const Tensor& x) { return torch::full({x.size(0), 1}, static_cast<double>(x.size(0)), x.options()); });
  torch_dp::DataParallel counted(rows, torch_dp::DataParallelOptions(cpu_devices(3)).chunk_sizes(sizes));
  CHECK(close(
      counted->forward(torch::randn({7, 10}, f64)), torch::tensor({1., 4., 4., 4., 4., 2., 2.}, f64).unsqueeze(1)));

  torch::manual_seed(21);
  auto net = make_net();
  auto reference = clone_of(net);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpu_devices(3)).chunk_sizes(sizes));
  check_trains_like(dp, *net, *reference, 7, 2);
  // Any other batch size is an error naming the sizes, before any replica runs.
  CHECK_THROWS_WITH(
      dp->forward(torch::randn({8, 10}, f64)),
      tdp_test::Contains("the chunk sizes add up to 7 but the tensor has 8 elements along dim 0"));
}

TEST_CASE("DataParallel: tensor arguments giving different chunk counts are an error", "[data_parallel][errors]") {
  // torch.chunk splits 8 rows into 4 chunks over 4 devices but 3 rows into 3; upstream drops the extra chunk.
  TwoInTwoOut module;
  auto before = module->w.clone();
  torch_dp::DataParallel dp(module, torch_dp::DataParallelOptions(cpu_devices(4)));
  auto call = [&] {
    dp->forward_as<std::tuple<Tensor, Tensor>>(torch::randn({8, 3}, f64), torch::randn({3, 3}, f64), 1.0);
  };
  CHECK_THROWS_WITH(
      call(), tdp_test::Contains("DataParallel: the tensor arguments split into different numbers of "
                                 "chunks over 4 devices along dim 0: tensor argument 0 of shape [8, 3] "
                                 "-> 4 chunks; tensor argument 1 of shape [3, 3] -> 3 chunks; give "
                                 "every tensor argument the same size along dim 0"));
  CHECK(!module->w.grad().defined());
  CHECK(torch::equal(module->w, before));
  // Sizes with the same chunk count are split, as upstream: 8 and 7 rows both give 4 chunks (2 + 2 + 2 + 1 rows
  // of b; the last replica's 1 row broadcasts against its 2 rows of a).
  auto a = torch::randn({8, 3}, f64);
  auto b = torch::randn({7, 3}, f64);
  auto [y, rows] = dp->forward_as<std::tuple<Tensor, Tensor>>(a, b, 1.0);
  std::vector<Tensor> expected_y, expected_rows;
  for (int64_t i = 0; i < 4; ++i) {
    auto [yi, rowsi] = module->forward(a.chunk(4)[i], b.chunk(4)[i], 1.0);
    expected_y.push_back(yi);
    expected_rows.push_back(rowsi);
  }
  CHECK(close(y, torch::cat(expected_y)));
  CHECK(close(rows, torch::cat(expected_rows)));
}

// Note [Which tensors set the batch] (python/torch_dp/scatter_gather.py): as upstream, a tensor that holds one value
// per replica (expanded, or one equal row per device, as Hugging Face's Trainer passes num_items_in_batch) is cut to
// the replicas the batch runs; rows of any other tensor are never dropped.
TEST_CASE("DataParallel: a tensor holding one value per replica is cut to the batch", "[data_parallel]") {
  torch::manual_seed(31);
  TwoInTwoOut module;
  auto reference = clone_of(module);
  SECTION("expanded, 1 row on 2 devices") {
    torch_dp::DataParallel dp(module, torch_dp::DataParallelOptions(cpu_devices(2)));
    auto a = torch::randn({1, 3}, f64);
    auto b = torch::randn({1, 3}, f64).expand({2, 3});
    auto [y, rows] = dp->forward_as<std::tuple<Tensor, Tensor>>(a, b, 2.0);
    auto [y_ref, rows_ref] = reference->forward(a, b.narrow(0, 0, 1), 2.0);
    CHECK(close(y, y_ref));
    CHECK(close(rows, rows_ref));
  }
  SECTION("equal rows, one per device, 9 rows on 4 devices (3 chunks)") {
    torch_dp::DataParallel dp(module, torch_dp::DataParallelOptions(cpu_devices(4)));
    auto a = torch::randn({9, 3}, f64);
    auto b = torch::randn({1, 3}, f64).expand({4, 3}).contiguous();
    auto [y, rows] = dp->forward_as<std::tuple<Tensor, Tensor>>(a, b, 1.0);
    auto [y_ref, rows_ref] = reference->forward(a, b.narrow(0, 0, 1), 1.0);
    CHECK(close(y, y_ref));
    CHECK(close(rows, rows_ref));
    y.sum().backward();
    y_ref.sum().backward();
    CHECK(close(module->w.grad(), reference->w.grad()));
  }
  SECTION("inside an IValue") {
    IValueModule ivalue_module;
    auto ivalue_reference = clone_of(ivalue_module);
    torch_dp::DataParallel dp(ivalue_module, torch_dp::DataParallelOptions(cpu_devices(3)));
    auto a = torch::randn({2, 3}, f64);
    auto b = torch::randn({1, 3}, f64).expand({3, 3});
    auto out = dp->forward_as<c10::IValue>(c10::IValue(c10::ivalue::Tuple::create({c10::IValue(a), c10::IValue(b)})));
    auto expected = ivalue_reference->forward(
        c10::IValue(c10::ivalue::Tuple::create({c10::IValue(a), c10::IValue(b.narrow(0, 0, 2))})));
    CHECK(close(out.toTupleRef().elements()[0].toTensor(), expected.toTupleRef().elements()[0].toTensor()));
    CHECK(close(
        out.toTupleRef().elements()[1].toGenericDict().at("sum").toTensor(),
        expected.toTupleRef().elements()[1].toGenericDict().at("sum").toTensor()));
  }
  SECTION("distinct rows are never dropped") {
    torch_dp::DataParallel dp(module, torch_dp::DataParallelOptions(cpu_devices(2)));
    auto call = [&] {
      dp->forward_as<std::tuple<Tensor, Tensor>>(torch::randn({1, 3}, f64), torch::randn({2, 3}, f64), 1.0);
    };
    CHECK_THROWS_WITH(
        call(),
        tdp_test::Contains("tensor argument 0 of shape [1, 3] -> 1 chunks; tensor argument 1 of shape [2, 3] -> 2 "
                           "chunks; give every tensor argument the same size along dim 0 (only a tensor that holds "
                           "one value per replica"));
    CHECK(!module->w.grad().defined());
  }
}

TEST_CASE("DataParallel: a chunk size of 0 runs no replica; the first may not be 0", "[data_parallel]") {
  // Fails on an empty chunk, as Hugging Face's BERT does; each row reports its chunk's size.
  torch::nn::Functional rows([](const Tensor& x) {
    TORCH_CHECK(x.size(0) > 0, "ran on an empty chunk");
    return torch::full({x.size(0), 1}, static_cast<double>(x.size(0)), x.options());
  });
  torch_dp::DataParallel counted(rows, torch_dp::DataParallelOptions(cpu_devices(4)).chunk_sizes({{3, 0, 2, 0}}));
  CHECK(close(counted->forward(torch::randn({5, 10}, f64)), torch::tensor({3., 3., 3., 2., 2.}, f64).unsqueeze(1)));

  torch::manual_seed(32);
  auto net = make_net();
  auto reference = clone_of(net);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpu_devices(3)).chunk_sizes({{4, 0, 3}}));
  check_trains_like(dp, *net, *reference, 7, 2);
  // A tensor holding one value per replica gives each replica that runs its device's row.
  TwoInTwoOut module;
  torch_dp::DataParallel two(module, torch_dp::DataParallelOptions(cpu_devices(3)).chunk_sizes({{2, 0, 1}}));
  auto a = torch::randn({3, 3}, f64);
  auto b = torch::randn({1, 3}, f64).expand({3, 3});
  auto [y, sums] = two->forward_as<std::tuple<Tensor, Tensor>>(a, b, 1.0);
  auto [y_ref, sums_ref] = module->forward(a, b.narrow(0, 0, 1), 1.0);
  CHECK(close(y, y_ref));

  CHECK_THROWS_WITH(
      torch_dp::DataParallel(make_net(), torch_dp::DataParallelOptions(cpu_devices(2)).chunk_sizes({{0, 4}})),
      tdp_test::Contains("the first chunk size must not be 0, but got [0, 4]"));
  CHECK_THROWS_WITH(
      torch_dp::DataParallel(make_net(), torch_dp::DataParallelOptions(cpu_devices(2)).chunk_sizes({{4, -1}})),
      tdp_test::Contains("chunk sizes must be non-negative, but chunk 1 has size -1"));
}

TEST_CASE("DataParallel: clone() gives an independent DataParallel", "[data_parallel]") {
  auto net = make_net();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpu_devices(2)));
  auto input = torch::randn({4, 10}, f64);
  auto expected = dp->forward(input);
  auto copy = std::dynamic_pointer_cast<torch_dp::DataParallelImpl>(dp->clone());
  REQUIRE(copy);
  CHECK(copy->module().get() != net.ptr().get());
  const bool same_devices = copy->options.devices() == dp->options.devices();
  CHECK(same_devices);
  CHECK(close(copy->forward(input), expected));
  {
    torch::NoGradGuard no_grad;
    net->fc2->bias.add_(1);
  }
  CHECK(close(copy->forward(input), expected));
  CHECK_FALSE(close(dp->forward(input), expected));
}
