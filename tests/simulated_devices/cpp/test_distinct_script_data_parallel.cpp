// torch_dp::ScriptDataParallel on 2, 3 and 4 distinct devices of the simulated accelerator: TorchScript modules
// (built with torch::jit::Module::define, as tests/cpp/test_script_data_parallel.cpp builds them, and one saved and
// loaded onto a device with torch::jit::load) against an independent reference in float64: the same module made on
// the CPU, run chunk by chunk (torch.nn.DataParallel's semantics by hand).

#include "helpers.h"

#include "distinct.h"

#include <torch_dp/script_data_parallel.h>

#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>

#include <cstdint>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

using tdp_test::close64;
using tdp_test::close_cpu;
using tdp_test::Contains;
using tdp_test::f64;
using tdp_test::names;
using tdp_test::on;
using tdp_test::sgd_step;
using tdp_test::sim;
using tdp_test::sims;
using torch::Tensor;

namespace {

// The device lists the tests run on: 2, 3 and 4 devices, and the module on a device other than 0.
std::vector<c10::Device> device_list(int which) {
  static const std::vector<std::vector<int>> lists = {{0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {2, 0, 1}};
  return sims(lists.at(static_cast<size_t>(which)));
}

/// The module and its reference: two modules made from the same seed (a deepcopy's parameters would not require
/// grad), the module moved to `device`, the reference left on the CPU.
std::pair<torch::jit::Module, torch::jit::Module> net_on(c10::Device device, uint64_t seed) {
  torch::manual_seed(seed);
  auto module = tdp_test::make_scripted_net();
  torch::manual_seed(seed);
  auto reference = tdp_test::make_scripted_net();
  module.to(device);
  return {module, reference};
}

/// Parameters and buffers by name, whatever their devices: equal up to `tol`.
bool same_state(const torch::jit::Module& a, const torch::jit::Module& b, double tol = 1e-12) {
  auto named = [](const torch::jit::Module& module) {
    std::vector<std::pair<std::string, Tensor>> result;
    for (const auto& item : module.named_parameters()) {
      result.emplace_back(item.name, item.value);
    }
    for (const auto& item : module.named_buffers()) {
      result.emplace_back(item.name, item.value);
    }
    return result;
  };
  const auto mine = named(a);
  const auto theirs = named(b);
  if (mine.size() != theirs.size()) {
    return false;
  }
  for (size_t k = 0; k < mine.size(); ++k) {
    if (mine[k].first != theirs[k].first || !close_cpu(mine[k].second, theirs[k].second, tol)) {
      return false;
    }
  }
  return true;
}

bool same_grads(const torch::jit::Module& a, const torch::jit::Module& b, double tol = 1e-12) {
  std::vector<Tensor> mine, theirs;
  for (const auto& p : a.parameters()) {
    mine.push_back(p.grad());
  }
  for (const auto& p : b.parameters()) {
    theirs.push_back(p.grad());
  }
  if (mine.size() != theirs.size()) {
    return false;
  }
  for (size_t k = 0; k < mine.size(); ++k) {
    if (!close_cpu(mine[k], theirs[k], tol)) {
      return false;
    }
  }
  return true;
}

/// One training step's checks: the output on `device` and equal to the reference's; after a backward through
/// both, equal gradients, parameters and buffers.
void check_training_step(
    const Tensor& output, const Tensor& expected, c10::Device device, const torch::jit::Module& module,
    const torch::jit::Module& reference) {
  REQUIRE(on(output, device));
  REQUIRE(close_cpu(output, expected));
  output.pow(2).sum().backward();
  expected.pow(2).sum().backward();
  REQUIRE(same_grads(module, reference));
  REQUIRE(same_state(module, reference));
}

/// Parameters and buffers copied to the CPU, to check that nothing changed.
std::vector<Tensor> snapshot(const torch::jit::Module& module) {
  std::vector<Tensor> result;
  for (const auto& p : module.parameters()) {
    result.push_back(p.detach().cpu());
    result.push_back(p.grad().defined() ? p.grad().cpu() : torch::empty({0}));
  }
  for (const auto& b : module.buffers()) {
    result.push_back(b.cpu());
  }
  return result;
}

bool same_snapshot(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
  if (a.size() != b.size()) {
    return false;
  }
  for (size_t k = 0; k < a.size(); ++k) {
    if (a[k].sizes() != b[k].sizes() || !a[k].equal(b[k])) {
      return false;
    }
  }
  return true;
}

/// The reference: the module's forward on the chunks `replicas` replicas get (torch.chunk's split, or `sizes`),
/// one after another, concatenated. Only the first chunk's buffer updates are kept, as torch.nn.DataParallel keeps
/// replica 0's.
Tensor chunk_by_chunk(
    torch::jit::Module& module, const Tensor& input, size_t replicas, const std::vector<int64_t>& sizes = {}) {
  auto chunks = sizes.empty() ? input.chunk(static_cast<int64_t>(replicas), 0) : input.split_with_sizes(sizes, 0);
  std::vector<Tensor> outputs;
  std::vector<Tensor> after_first;
  for (const auto& chunk : chunks) {
    if (chunk.size(0) == 0) {
      continue;
    }
    outputs.push_back(module.forward({chunk}).toTensor());
    if (after_first.empty()) {
      for (const auto& b : module.buffers()) {
        after_first.push_back(b.detach().clone());
      }
    }
  }
  // Through variable_data(), which moves no version counter (as the batch-norm op's own update moves none): the
  // forward's graph saved the running statistics.
  size_t k = 0;
  for (const auto& b : module.buffers()) {
    b.variable_data().copy_(after_first[k++]);
  }
  return torch::cat(outputs, 0);
}

}  // namespace

TEST_CASE(
    "ScriptDataParallel on distinct devices: training with BatchNorm matches the module run chunk by chunk",
    "[distinct]") {
  const auto devices = device_list(GENERATE(0, 1, 2, 3));
  const int64_t batch = GENERATE(11, 6);  // 11 over 4: 3, 3, 3, 2; 6 over 4: 2, 2, 2, three replicas
  CAPTURE(names(devices), batch);
  const auto source = devices[0];
  auto [module, reference] = net_on(source, 1);
  torch_dp::ScriptDataParallel parallel(module, torch_dp::DataParallelOptions(devices));
  for (int step = 0; step < 3; ++step) {
    INFO("step " << step);
    const auto input = torch::randn({batch, 4}, f64);
    const auto target = torch::randn({batch, 3}, f64);
    auto x = input.to(source).requires_grad_();
    auto x_reference = input.clone().requires_grad_();
    auto output = parallel.forward(x);
    auto expected = chunk_by_chunk(reference, x_reference, devices.size());
    REQUIRE(on(output, source));
    REQUIRE(close_cpu(output, expected));
    (output - target.to(source)).pow(2).sum().backward();
    (expected - target).pow(2).sum().backward();
    REQUIRE(close_cpu(x.grad(), x_reference.grad()));
    REQUIRE(same_grads(module, reference));
    // The running statistics are those the first chunk gave the module; parameters and gradients on its device.
    REQUIRE(same_state(module, reference));
    for (const auto& p : module.parameters()) {
      REQUIRE(on(p, source));
      REQUIRE(on(p.grad(), source));
    }
    sgd_step(module, 0.05);
    sgd_step(reference, 0.05);
  }
  CHECK(same_state(module, reference));
  // In eval mode every replica normalises with the module's running statistics, and leaves them alone.
  parallel.eval();
  reference.eval();
  const auto input = torch::randn({batch, 4}, f64);
  CHECK(close_cpu(parallel.forward(input.to(source)), chunk_by_chunk(reference, input, devices.size())));
  CHECK(same_state(module, reference));
}

TEST_CASE("ScriptDataParallel on distinct devices: every change to the module is seen on every device", "[distinct]") {
  const auto devices = sims({0, 1, 2, 3});
  const auto source = devices[0];
  auto [module, reference] = net_on(source, 2);
  module.eval();
  reference.eval();
  torch_dp::ScriptDataParallel parallel(module, torch_dp::DataParallelOptions(devices));
  const auto input = torch::randn({8, 4}, f64);
  auto expect_reference = [&](const char* after) {
    INFO("after " << after);
    torch::NoGradGuard no_grad;
    const auto output = parallel.forward(input.to(source));
    const auto expected = chunk_by_chunk(reference, input, devices.size());
    for (int64_t i = 0; i < 4; ++i) {  // rows 2i, 2i + 1 are replica i's, on devices[i]
      CAPTURE(i);
      CHECK(close_cpu(output.slice(0, 2 * i, 2 * i + 2), expected.slice(0, 2 * i, 2 * i + 2)));
    }
  };
  auto both = [&](const std::function<void(torch::jit::Module&)>& change) {
    torch::NoGradGuard no_grad;
    change(module);
    change(reference);
  };
  expect_reference("nothing");
  both([](torch::jit::Module& m) { m.attr("fc1").toModule().attr("weight").toTensor().mul_(-2.0); });
  expect_reference("an in-place edit");
  both([](torch::jit::Module& m) { m.attr("fc2").toModule().attr("bias").toTensor().variable_data().add_(1.0); });
  expect_reference("a write through .data");
  both([](torch::jit::Module& m) { m.setattr("scale", int64_t{3}); });
  expect_reference("a plain attribute");
  both([](torch::jit::Module& m) { m.attr("bn").toModule().attr("running_mean").toTensor().fill_(0.7); });
  expect_reference("a buffer edited in place");
  {
    const auto bias = torch::randn({3}, f64);
    module.attr("fc2").toModule().setattr("bias", bias.to(source).requires_grad_());
    reference.attr("fc2").toModule().setattr("bias", bias.clone().requires_grad_());
  }
  expect_reference("a replaced parameter");
  // An SGD step after a backward through the replicas: gradients reach the module's parameters from every device.
  module.train();
  reference.train();
  for (int step = 0; step < 2; ++step) {
    parallel.forward(input.to(source)).pow(2).sum().backward();
    chunk_by_chunk(reference, input, devices.size()).pow(2).sum().backward();
    REQUIRE(same_grads(module, reference));
    sgd_step(module, 0.1);
    sgd_step(reference, 0.1);
    REQUIRE(same_state(module, reference));
  }
  module.eval();
  reference.eval();
  expect_reference("optimizer steps and eval()");
}

TEST_CASE(
    "ScriptDataParallel on distinct devices: chunk_sizes with zeros, a small batch, output_device", "[distinct]") {
  const auto devices = sims({0, 1, 2, 3});
  auto [module, reference] = net_on(devices[0], 3);
  const auto output_device = GENERATE(c10::Device(c10::kCPU), c10::Device(c10::DeviceType::PrivateUse1, 3));
  CAPTURE(output_device.str());
  SECTION("chunk_sizes with zeros") {
    const std::vector<int64_t> sizes = {2, 0, 4, 0};
    torch_dp::ScriptDataParallel parallel(
        module, torch_dp::DataParallelOptions(devices).chunk_sizes(sizes).output_device(output_device));
    for (int step = 0; step < 2; ++step) {
      const auto input = torch::randn({6, 4}, f64);
      auto output = parallel.forward(input.to(devices[0]));
      auto expected = chunk_by_chunk(reference, input, devices.size(), sizes);
      check_training_step(output, expected, output_device, module, reference);
      sgd_step(module, 0.1);
      sgd_step(reference, 0.1);
    }
  }
  SECTION("a batch smaller than the device count") {
    torch_dp::ScriptDataParallel parallel(module, torch_dp::DataParallelOptions(devices).output_device(output_device));
    for (const int64_t rows : {1, 2, 3, 6}) {
      CAPTURE(rows);
      // BatchNorm in training mode needs 2 rows per replica: 6 rows give 2, 2, 2; the others run in eval mode.
      module.train(rows == 6);
      reference.train(rows == 6);
      const auto input = torch::randn({rows, 4}, f64);
      auto output = parallel.forward(input);  // from the CPU
      auto expected = chunk_by_chunk(reference, input, devices.size());
      check_training_step(output, expected, output_device, module, reference);
    }
  }
}

TEST_CASE(
    "ScriptDataParallel on distinct devices: a module saved and loaded onto its device with torch::jit::load",
    "[distinct]") {
  torch::manual_seed(4);
  std::stringstream file;
  tdp_test::make_scripted_net().save(file);
  const auto devices = sims({1, 3, 0});
  file.seekg(0);
  auto module = torch::jit::load(file, devices[0]);
  file.seekg(0);
  auto reference = torch::jit::load(file, c10::Device(c10::kCPU));
  for (const auto& p : module.parameters()) {
    REQUIRE(on(p, devices[0]));
  }
  torch_dp::ScriptDataParallel parallel(module, torch_dp::DataParallelOptions(devices));
  for (const bool training : {true, false}) {
    CAPTURE(training);
    parallel.train(training);
    reference.train(training);
    const auto input = torch::randn({8, 4}, f64);  // 3, 3, 2
    torch::NoGradGuard no_grad;
    CHECK(close_cpu(parallel.forward(input.to(devices[0])), chunk_by_chunk(reference, input, devices.size())));
    CHECK(same_state(module, reference));
  }
}

TEST_CASE(
    "ScriptDataParallel on distinct devices: devices that do not fit are refused, nothing changed", "[distinct]") {
  auto [module, reference] = net_on(sim(0), 5);
  SECTION("a device index past the device count") {
    const std::string message = "device sim:4 does not exist: this machine has 4 sim device(s), indices 0 to 3";
    CHECK_THROWS_WITH(
        torch_dp::ScriptDataParallel(module, torch_dp::DataParallelOptions(sims({0, 4}))), Contains(message));
    CHECK_THROWS_WITH(
        torch_dp::ScriptDataParallel(module, torch_dp::DataParallelOptions(sims({0, 1})).output_device(sim(4))),
        Contains("output_" + message));
    CHECK(same_state(module, reference));
  }
  SECTION("the module on another device than the first") {
    const auto elsewhere = GENERATE(c10::Device(c10::DeviceType::PrivateUse1, 1), c10::Device(c10::kCPU));
    CAPTURE(elsewhere.str());
    module.to(elsewhere);
    const auto devices = sims({0, 1, 2});
    torch_dp::ScriptDataParallel parallel(module, torch_dp::DataParallelOptions(devices));
    const auto input = torch::randn({6, 4}, f64);
    const auto before = snapshot(module);
    CHECK_THROWS_WITH(
        parallel.forward(input.to(devices[0])),
        Contains(
            "module must have its parameters and buffers on device sim:0 (device_ids[0]) but found one of them on "
            "device: " +
            elsewhere.str()));
    CHECK(same_snapshot(snapshot(module), before));  // BatchNorm's running statistics included
    // Moved to the first device, the same ScriptDataParallel works.
    module.to(devices[0]);
    auto output = parallel.forward(input.to(devices[0]));
    CHECK(close_cpu(output, chunk_by_chunk(reference, input, devices.size())));
    CHECK(same_state(module, reference));
  }
}
