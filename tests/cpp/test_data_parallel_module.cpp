// Tests for torch_dp::DataParallel as a torch::nn module, on CPU replica lists: forward with several tensors
// (forward_as) and with IValues, options (output_device, dim), the names of its parameters and buffers,
// torch::save / torch::load, wrapping a Sequential, clone(). Training and parity: test_data_parallel.cpp.

#include "helpers.h"

#include <torch_dp/torch_dp.h>

#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

using tdp_test::clone_of;
using tdp_test::close64;
using tdp_test::ConvBn;
using tdp_test::cpus;
using tdp_test::f64;
using tdp_test::IValueModule;
using tdp_test::make_net;
using tdp_test::same_grads;
using tdp_test::same_impl;
using tdp_test::same_parameters;
using tdp_test::StartsWith;
using tdp_test::TwoInTwoOut;
using torch::Tensor;

namespace {

// Reports, per row, the index of the replica's device (as LibTorch's DataParallelUsesAllAvailableCUDADevices).
struct ReplicaDeviceIndexImpl : torch::nn::Cloneable<ReplicaDeviceIndexImpl> {
  void reset() override {}
  Tensor forward(const Tensor& x) {
    return torch::full({x.size(0)}, static_cast<double>(x.device().index()), x.options().dtype(torch::kFloat64));
  }
};
TORCH_MODULE(ReplicaDeviceIndex);

}  // namespace

TEST_CASE("DataParallel: several tensor inputs and a tuple output through forward_as", "[data_parallel]") {
  const size_t n = GENERATE(1, 2, 4);
  CAPTURE(n);
  torch::manual_seed(3);
  TwoInTwoOut module;
  auto reference = clone_of(module);
  torch_dp::DataParallel dp(module, torch_dp::DataParallelOptions(cpus(n)));
  auto a = torch::randn({9, 3}, f64);
  auto b = torch::randn({9, 3}, f64);
  auto [y, rows] = dp->forward_as<std::tuple<Tensor, Tensor>>(a, b, 0.5);
  auto [y_ref, rows_ref] = reference->forward(a, b, 0.5);
  CHECK(close64(y, y_ref));
  CHECK(close64(rows, rows_ref));
  (y.sum() + rows.sum()).backward();
  (y_ref.sum() + rows_ref.sum()).backward();
  CHECK(close64(module->w.grad(), reference->w.grad()));
}

TEST_CASE("DataParallel: IValue input and tuple/dict output", "[data_parallel]") {
  const size_t n = GENERATE(1, 3);
  CAPTURE(n);
  torch::manual_seed(4);
  IValueModule module;
  auto reference = clone_of(module);
  torch_dp::DataParallel dp(module, torch_dp::DataParallelOptions(cpus(n)));
  auto a = torch::randn({7, 3}, f64);
  auto b = torch::randn({7, 3}, f64);
  auto input = c10::IValue(c10::ivalue::Tuple::create({c10::IValue(a), c10::IValue(b)}));
  auto out = dp->forward_as<c10::IValue>(input);
  auto expected = reference->forward(input);
  REQUIRE(out.isTuple());
  const auto& elements = out.toTupleRef().elements();
  REQUIRE(elements.size() == 2);
  const auto& expected_elements = expected.toTupleRef().elements();
  CHECK(close64(elements[0].toTensor(), expected_elements[0].toTensor()));
  REQUIRE(elements[1].isGenericDict());
  auto dict = elements[1].toGenericDict();
  auto expected_dict = expected_elements[1].toGenericDict();
  REQUIRE(dict.size() == 2);
  CHECK(close64(dict.at("sum").toTensor(), expected_dict.at("sum").toTensor()));
  CHECK(close64(dict.at("rows").toTensor(), expected_dict.at("rows").toTensor()));
  // Keys keep replica 0's order.
  std::vector<std::string> keys;
  for (const auto& entry : dict) {
    keys.push_back(entry.key().toStringRef());
  }
  const std::vector<std::string> expected_keys{"sum", "rows"};
  CHECK(keys == expected_keys);
  elements[0].toTensor().sum().backward();
  expected_elements[0].toTensor().sum().backward();
  CHECK(close64(module->w.grad(), reference->w.grad()));
}

TEST_CASE("DataParallel: output placed on options.output_device", "[data_parallel]") {
  auto net = make_net();
  auto input = torch::randn({6, 10}, f64);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(3)).output_device(c10::kCPU));
  CHECK(dp->output_device().str() == "cpu");
  auto out = dp->forward(input);
  CHECK(out.device().str() == "cpu");
  CHECK(close64(out, net->forward(input)));
  // Without output_device: devices[0].
  torch_dp::DataParallel by_default(net, torch_dp::DataParallelOptions(cpus(2)));
  CHECK(by_default->output_device().str() == "cpu");
  CHECK(by_default->forward(input).device().is_cpu());
  // dim = 1: split and gathered along the second dimension.
  torch::nn::Functional scale([](const Tensor& x) { return x * 3; });
  torch_dp::DataParallel along1(scale, torch_dp::DataParallelOptions(cpus(2)).dim(1));
  auto wide = torch::randn({2, 5}, f64);
  CHECK(close64(along1->forward(wide), wide * 3));
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
  CHECK(close64(out, expected, 1e-10));
  // A CPU input is scattered to the replicas' device.
  CHECK(close64(to_cpu->forward(input.cpu()), expected, 1e-10));
  // Every replica runs on its device (default devices: every CUDA device).
  torch_dp::DataParallel all(ReplicaDeviceIndex{});
  const auto count = static_cast<int64_t>(torch::cuda::device_count());
  auto indices = all->forward(torch::zeros({count, 1}, f64.device(cuda0)));
  CHECK(close64(indices.cpu(), torch::arange(count, f64)));
}

TEST_CASE("DataParallel: parameters and buffers are named under module.", "[data_parallel]") {
  ConvBn net;
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(2)));
  auto params = dp->named_parameters();
  REQUIRE(params.size() == net->named_parameters().size());
  for (const auto& item : params) {
    CAPTURE(item.key());
    CHECK_THAT(item.key(), StartsWith("module."));
  }
  CHECK(params.contains("module.conv.weight"));
  CHECK(params.contains("module.fc.bias"));
  CHECK(same_impl(params["module.conv.weight"], net->conv->weight));
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
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(2)));
  dp->forward(torch::randn({4, 3, 5, 5}, f64));  // running statistics that differ from the initial ones
  std::stringstream stream;
  torch::save(dp, stream);

  torch::manual_seed(7);
  ConvBn other;
  other->to(torch::kFloat64);
  torch_dp::DataParallel loaded(other, torch_dp::DataParallelOptions(cpus(3)));
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
  CHECK(close64(loaded->forward(input), dp->forward(input)));
  dp->train();
  loaded->train();
  // In train mode all three replicas of `loaded` (two of them clones) use the loaded weights.
  auto ref = clone_of(net);
  auto chunks = input.chunk(3, 0);
  std::vector<Tensor> expected;
  for (const auto& chunk : chunks) {
    expected.push_back(clone_of(ref)->forward(chunk));
  }
  CHECK(close64(loaded->forward(input), torch::cat(expected, 0)));
}

TEST_CASE("DataParallel: wraps a torch::nn::Sequential directly", "[data_parallel]") {
  torch::manual_seed(8);
  torch::nn::Sequential seq(torch::nn::Linear(6, 8), torch::nn::ReLU(), torch::nn::Linear(8, 2));
  seq->to(torch::kFloat64);
  auto reference = clone_of(seq);
  torch_dp::DataParallel dp(seq, torch_dp::DataParallelOptions(cpus(3)));
  auto input = torch::randn({10, 6}, f64);
  auto out = dp->forward(input);
  auto expected = reference->forward(input);
  CHECK(close64(out, expected));
  out.sum().backward();
  expected.sum().backward();
  CHECK(same_grads(*seq, *reference));
  CHECK(dp->named_parameters().contains("module.0.weight"));
  // And through the free function.
  CHECK(close64(torch_dp::data_parallel(seq, input, cpus(2)), expected.detach()));
}

TEST_CASE("DataParallel: clone() gives an independent DataParallel", "[data_parallel]") {
  auto net = make_net();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(2)));
  auto input = torch::randn({4, 10}, f64);
  auto expected = dp->forward(input);
  auto copy = std::dynamic_pointer_cast<torch_dp::DataParallelImpl>(dp->clone());
  REQUIRE(copy);
  CHECK(copy->module().get() != net.ptr().get());
  const bool same_devices = copy->options.devices() == dp->options.devices();
  CHECK(same_devices);
  CHECK(close64(copy->forward(input), expected));
  {
    torch::NoGradGuard no_grad;
    net->fc2->bias.add_(1);
  }
  CHECK(close64(copy->forward(input), expected));
  CHECK_FALSE(close64(dp->forward(input), expected));
}
