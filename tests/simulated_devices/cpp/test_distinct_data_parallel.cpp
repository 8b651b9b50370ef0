// torch_dp's C++ API (torch_dp::DataParallel, torch_dp::data_parallel) on 2, 3 and 4 distinct devices of the
// simulated accelerator (tests/simulated_devices/README.md): the paths a user with several GPUs runs, which CPU
// device lists never take (copies held on devices 1..n, scatter and gather across devices, gradients reduce-added
// onto the module's device, a worker and a current stream per device). Every result is compared in float64 with
// an independent reference: an unwrapped copy of the module, made on the CPU before the module was moved to its
// device, run chunk by chunk (torch.nn.DataParallel's semantics by hand). ScriptDataParallel:
// test_distinct_script_data_parallel.cpp.

#include "helpers.h"

#include "distinct.h"

#include "backend/runtime.h"

#include <torch_dp/torch_dp.h>

#include <c10/core/StreamGuard.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

using tdp_test::clone_of;
using tdp_test::close64;
using tdp_test::close_cpu;
using tdp_test::Contains;
using tdp_test::ConvBn;
using tdp_test::f64;
using tdp_test::make_net;
using tdp_test::match_by_name;
using tdp_test::names;
using tdp_test::Net;
using tdp_test::on;
using tdp_test::sim;
using tdp_test::sims;
using torch::Tensor;

namespace {

// The device lists the tests run on: 2, 3 and 4 devices, the module on a device other than 0, a gap.
std::vector<c10::Device> device_list(int which) {
  static const std::vector<std::vector<int>> lists = {{0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {2, 0, 1}, {3, 1}};
  return sims(lists.at(static_cast<size_t>(which)));
}

/// Every parameter and buffer of `a` equals the one of the same name in `b` (floating ones up to `tol`), whatever
/// their devices.
bool same_state(torch::nn::Module& a, torch::nn::Module& b, double tol = 1e-12) {
  const auto same = [tol](const at::Tensor& x, const at::Tensor& y) {
    const auto mine = x.cpu();
    const auto theirs = y.cpu();
    return mine.is_floating_point() ? close64(mine, theirs, tol) : mine.dtype() == theirs.dtype() && mine.equal(theirs);
  };
  return match_by_name(a.named_parameters(), b.named_parameters(), same) &&
         match_by_name(a.named_buffers(), b.named_buffers(), same);
}

/// The parameters' gradients, by name: both undefined, or close64 up to `tol`, whatever their devices.
bool grads_match(torch::nn::Module& a, torch::nn::Module& b, double tol = 1e-12) {
  return match_by_name(a.named_parameters(), b.named_parameters(), [tol](const at::Tensor& x, const at::Tensor& y) {
    const auto& g = x.grad();
    const auto& h = y.grad();
    return g.defined() == h.defined() && (!g.defined() || close_cpu(g, h, tol));
  });
}

/// Every parameter and buffer of the module is on `device`.
bool all_on(torch::nn::Module& module, c10::Device device) {
  for (const auto& t : module.parameters()) {
    if (!on(t, device)) {
      return false;
    }
  }
  for (const auto& t : module.buffers()) {
    if (!on(t, device)) {
      return false;
    }
  }
  return true;
}

/// The state of a module, copied to the CPU: parameters, buffers and gradients, to check that nothing changed.
struct Snapshot {
  explicit Snapshot(torch::nn::Module& module) {
    for (const auto& t : module.parameters()) {
      tensors.push_back(t.detach().cpu());
      grads.push_back(t.grad().defined() ? t.grad().cpu() : Tensor());
    }
    for (const auto& t : module.buffers()) {
      tensors.push_back(t.detach().cpu());
    }
  }
  bool operator==(const Snapshot& other) const {
    if (tensors.size() != other.tensors.size() || grads.size() != other.grads.size()) {
      return false;
    }
    for (size_t k = 0; k < tensors.size(); ++k) {
      if (!tensors[k].equal(other.tensors[k])) {
        return false;
      }
    }
    for (size_t k = 0; k < grads.size(); ++k) {
      if (grads[k].defined() != other.grads[k].defined() || (grads[k].defined() && !grads[k].equal(other.grads[k]))) {
        return false;
      }
    }
    return true;
  }
  std::vector<Tensor> tensors;
  std::vector<Tensor> grads;
};

/// The reference: `forward` run on the chunks of `input` that `replicas` replicas get (torch.chunk's split, or
/// `sizes`), one after another, the outputs concatenated. Buffers follow torch.nn.DataParallel's rule: only the
/// first chunk's updates (BatchNorm's running statistics) are kept in `module`.
Tensor chunk_by_chunk(
    torch::nn::Module& module, const std::function<Tensor(const Tensor&)>& forward, const Tensor& input,
    size_t replicas, const std::vector<int64_t>& sizes = {}) {
  auto chunks = sizes.empty() ? input.chunk(static_cast<int64_t>(replicas), 0) : input.split_with_sizes(sizes, 0);
  std::vector<Tensor> outputs;
  std::vector<Tensor> buffers_after_first;
  for (const auto& chunk : chunks) {
    if (chunk.size(0) == 0) {
      continue;  // a device given no rows runs no replica
    }
    outputs.push_back(forward(chunk));
    if (buffers_after_first.empty()) {
      for (const auto& b : module.buffers()) {
        buffers_after_first.push_back(b.detach().clone());
      }
    }
  }
  // Through variable_data(), which moves no version counter, as the batch-norm op's own update moves none: the
  // graph of the forward saved the running statistics.
  auto buffers = module.buffers();
  for (size_t k = 0; k < buffers.size(); ++k) {
    buffers[k].variable_data().copy_(buffers_after_first[k]);
  }
  return torch::cat(outputs, 0);
}

Tensor chunk_by_chunk(Net& net, const Tensor& input, size_t replicas, const std::vector<int64_t>& sizes = {}) {
  return chunk_by_chunk(*net, [&](const Tensor& x) { return net->forward(x); }, input, replicas, sizes);
}

/// A module on `device` and its reference: an unwrapped copy of it on the CPU, made before the module moved.
std::pair<Net, Net> net_on(c10::Device device, uint64_t seed) {
  torch::manual_seed(seed);
  auto net = make_net();
  auto reference = clone_of(net);
  net->to(device);
  return {net, reference};
}

// Records, per forward of any replica, the device it ran on and where its first layer's weight lives.
struct Seen {
  c10::DeviceIndex input_device;
  c10::DeviceIndex weight_device;
  const void* weight;
};
struct Sightings {
  std::mutex mutex;
  std::vector<Seen> seen;
  std::vector<Seen> take() {
    std::lock_guard<std::mutex> lock(mutex);
    auto result = std::move(seen);
    seen.clear();
    return result;
  }
};

// The MLP of helpers.h that records what each replica sees (the recorder is shared by the clones: a Cloneable's
// clone copy-constructs the module).
struct RecordingNetImpl : torch::nn::Cloneable<RecordingNetImpl> {
  explicit RecordingNetImpl(std::shared_ptr<Sightings> sightings) : sightings(std::move(sightings)) { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(10, 20));
    fc2 = register_module("fc2", torch::nn::Linear(20, 5));
  }
  Tensor forward(const Tensor& x) {
    {
      std::lock_guard<std::mutex> lock(sightings->mutex);
      sightings->seen.push_back({x.device().index(), fc1->weight.device().index(), fc1->weight.const_data_ptr()});
    }
    return fc2(torch::tanh(fc1(x)));
  }
  std::shared_ptr<Sightings> sightings;
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(RecordingNet);

/// Checks what the replicas of one forward saw: one replica per device of `devices`, each computing on its device
/// with the first layer's weight there; the first replica uses the module's own weight; the copies elsewhere are in
/// memory of their device. Returns the weights' addresses, by device.
std::vector<const void*> check_sightings(
    std::vector<Seen> seen, const std::vector<c10::Device>& devices, const Tensor& module_weight) {
  REQUIRE(seen.size() == devices.size());
  std::sort(seen.begin(), seen.end(), [&](const Seen& a, const Seen& b) {
    auto place = [&](c10::DeviceIndex index) {
      return std::find(devices.begin(), devices.end(), sim(index)) - devices.begin();
    };
    return place(a.input_device) < place(b.input_device);
  });
  std::vector<const void*> weights;
  for (size_t i = 0; i < devices.size(); ++i) {
    CAPTURE(i);
    const int index = devices[i].index();
    CHECK(static_cast<int>(seen[i].input_device) == index);
    CHECK(static_cast<int>(seen[i].weight_device) == index);
    const auto held_by = torch_dp::sim::device_of(seen[i].weight);
    REQUIRE(held_by.has_value());
    CHECK(static_cast<int>(*held_by) == index);
    if (i == 0) {
      CHECK(seen[i].weight == module_weight.const_data_ptr());
    } else {
      CHECK(seen[i].weight != module_weight.const_data_ptr());
    }
    weights.push_back(seen[i].weight);
  }
  return weights;
}

}  // namespace

// ---- DataParallel: training ------------------------------------------------------------------------------------

TEST_CASE(
    "DataParallel on distinct devices: outputs, input and parameter gradients, parameters after SGD steps",
    "[distinct]") {
  const auto devices = device_list(GENERATE(0, 1, 2, 3, 4));
  const int64_t batch = GENERATE(16, 15, 3);  // 15 over 4: 4, 4, 4, 3; 3 over 4: three replicas
  const auto issuing = GENERATE(torch_dp::Issuing::kThreads, torch_dp::Issuing::kSerial);
  CAPTURE(names(devices), batch, torch_dp::issuing_name(issuing));
  const auto source = devices[0];
  auto [net, reference] = net_on(source, 1);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(devices).issuing(issuing));
  torch::optim::SGD optimizer(dp->parameters(), torch::optim::SGDOptions(0.1).momentum(0.5));
  torch::optim::SGD reference_optimizer(reference->parameters(), torch::optim::SGDOptions(0.1).momentum(0.5));
  for (int step = 0; step < 3; ++step) {
    INFO("step " << step);
    const auto input = torch::randn({batch, 10}, f64);
    const auto target = torch::randn({batch, 5}, f64);
    auto x = input.to(source).requires_grad_();
    auto x_reference = input.clone().requires_grad_();
    optimizer.zero_grad();
    reference_optimizer.zero_grad();
    auto output = dp->forward(x);
    auto expected = chunk_by_chunk(reference, x_reference, devices.size());
    REQUIRE(on(output, source));
    REQUIRE(close_cpu(output, expected));
    (output - target.to(source)).pow(2).mean().backward();
    (expected - target).pow(2).mean().backward();
    REQUIRE(on(x.grad(), source));
    REQUIRE(close_cpu(x.grad(), x_reference.grad()));
    REQUIRE(on(net->fc1->weight.grad(), source));
    REQUIRE(grads_match(*net, *reference));
    optimizer.step();
    reference_optimizer.step();
  }
  CHECK(all_on(*net, source));
  CHECK(same_state(*net, *reference));
}

// Note [Streams of a backward across devices] in src/scatter.cpp: with every device's current stream a pool stream
// (not its default), and the last device slowed down, a backward that copied between devices on their default
// streams would read gradients not yet computed (the poison, NaN).
TEST_CASE("DataParallel on distinct devices: a forward and backward under other current streams", "[distinct]") {
  const auto devices = device_list(GENERATE(0, 2));
  CAPTURE(names(devices));
  const auto source = devices[0];
  auto [net, reference] = net_on(source, 3);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(devices).output_device(devices.back()));
  std::vector<c10::Stream> others;
  for (const auto& device : devices) {
    others.push_back(torch_dp::sim::pool_stream(device.index()));
  }
  // The last device slowed down until the end of the test, whether it passes or not.
  struct Slowdown {
    explicit Slowdown(c10::DeviceIndex index) : index(index) { torch_dp::sim::set_slowdown(index, 8.0); }
    ~Slowdown() { torch_dp::sim::set_slowdown(index, 1.0); }
    c10::DeviceIndex index;
  } slowdown(devices.back().index());
  {
    const c10::MultiStreamGuard streams(others);
    for (int step = 0; step < 2; ++step) {
      const auto input = torch::randn({40, 10}, f64);
      auto x = input.to(source).requires_grad_();
      auto x_reference = input.clone().requires_grad_();
      dp->zero_grad();
      reference->zero_grad();
      auto output = dp->forward(x);
      auto expected = chunk_by_chunk(reference, x_reference, devices.size());
      output.pow(2).sum().backward();
      expected.pow(2).sum().backward();
      REQUIRE(close_cpu(output, expected));
      REQUIRE(close_cpu(x.grad(), x_reference.grad()));
      REQUIRE(grads_match(*net, *reference));
    }
  }
}

TEST_CASE(
    "DataParallel on distinct devices: BatchNorm keeps the first replica's running statistics, as upstream",
    "[distinct]") {
  const auto devices = device_list(GENERATE(0, 1, 2, 3));
  CAPTURE(names(devices));
  const auto source = devices[0];
  torch::manual_seed(2);
  ConvBn net;
  net->to(torch::kFloat64);
  auto reference = clone_of(net);
  net->to(source);
  auto reference_forward = [&](const Tensor& x) { return reference->forward(x); };
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(devices));
  torch::optim::SGD optimizer(dp->parameters(), 0.1);
  torch::optim::SGD reference_optimizer(reference->parameters(), 0.1);
  for (int step = 0; step < 3; ++step) {
    INFO("step " << step);
    // 10 rows: 5, 5 / 4, 4, 2 / 3, 3, 3, 1; each chunk normalised with its own statistics.
    const auto input = torch::randn({10, 3, 5, 5}, f64) * 2 + 1;
    optimizer.zero_grad();
    reference_optimizer.zero_grad();
    auto output = dp->forward(input.to(source));
    auto expected = chunk_by_chunk(*reference, reference_forward, input, devices.size());
    REQUIRE(close_cpu(output, expected));
    output.pow(2).sum().backward();
    expected.pow(2).sum().backward();
    REQUIRE(grads_match(*net, *reference));
    // The running statistics (and num_batches_tracked) are those the first chunk gave the module.
    REQUIRE(same_state(*net, *reference));
    CHECK(net->bn->num_batches_tracked.cpu().item<int64_t>() == step + 1);
    optimizer.step();
    reference_optimizer.step();
  }
  // In eval mode every replica normalises with the module's running statistics, and leaves them alone.
  dp->eval();
  reference->eval();
  const auto input = torch::randn({10, 3, 5, 5}, f64);
  const auto before = net->bn->running_mean.cpu();
  CHECK(close_cpu(dp->forward(input.to(source)), chunk_by_chunk(*reference, reference_forward, input, devices.size())));
  CHECK(net->bn->running_mean.cpu().equal(before));
}

// ---- DataParallel: how the batch is split, where the output goes -------------------------------------------------

TEST_CASE("DataParallel on distinct devices: each device computes its own rows", "[distinct]") {
  // Each replica writes its device's index on each of its rows: the gathered column shows who computed which rows.
  torch::nn::Functional where([](const Tensor& x) {
    return torch::full({x.size(0), 1}, static_cast<double>(x.device().index()), x.options());
  });
  auto rows_of = [](std::vector<double> values) { return torch::tensor(values, f64).unsqueeze(1); };
  SECTION("torch.chunk's split, a batch smaller than the device count") {
    torch_dp::DataParallel dp(where, torch_dp::DataParallelOptions(sims({2, 0, 3, 1})));
    CHECK(close_cpu(dp->forward(torch::randn({7, 2}, f64)), rows_of({2, 2, 0, 0, 3, 3, 1})));
    CHECK(close_cpu(dp->forward(torch::randn({3, 2}, f64)), rows_of({2, 0, 3})));
    CHECK(close_cpu(dp->forward(torch::randn({1, 2}, f64)), rows_of({2})));
  }
  SECTION("chunk_sizes with zeros: those devices run no replica") {
    torch_dp::DataParallel dp(
        where, torch_dp::DataParallelOptions(sims({0, 1, 2, 3})).chunk_sizes(std::vector<int64_t>{2, 0, 3, 0}));
    CHECK(close_cpu(dp->forward(torch::randn({5, 2}, f64)), rows_of({0, 0, 2, 2, 2})));
  }
}

TEST_CASE("DataParallel on distinct devices: chunk_sizes with zeros, training", "[distinct]") {
  const auto sizes = GENERATE(0, 1) == 0 ? std::vector<int64_t>{1, 0, 4, 2} : std::vector<int64_t>{3, 4, 0, 0};
  CAPTURE(sizes);
  const auto devices = sims({0, 1, 2, 3});
  auto [net, reference] = net_on(devices[0], 3);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(devices).chunk_sizes(sizes));
  torch::optim::SGD optimizer(dp->parameters(), 0.1);
  torch::optim::SGD reference_optimizer(reference->parameters(), 0.1);
  for (int step = 0; step < 3; ++step) {
    INFO("step " << step);
    const auto input = torch::randn({7, 10}, f64);
    optimizer.zero_grad();
    reference_optimizer.zero_grad();
    auto output = dp->forward(input.to(devices[0]));
    auto expected = chunk_by_chunk(reference, input, devices.size(), sizes);
    REQUIRE(close_cpu(output, expected));
    output.pow(2).sum().backward();
    expected.pow(2).sum().backward();
    REQUIRE(grads_match(*net, *reference));
    optimizer.step();
    reference_optimizer.step();
  }
  CHECK(same_state(*net, *reference));
}

TEST_CASE("DataParallel on distinct devices: output_device on another device, and on the CPU", "[distinct]") {
  const auto devices = sims({0, 1, 2});
  const auto output_device = GENERATE(
      c10::Device(c10::DeviceType::PrivateUse1, 2), c10::Device(c10::kCPU),
      c10::Device(c10::DeviceType::PrivateUse1, 3));
  const bool input_on_cpu = GENERATE(false, true);
  CAPTURE(output_device.str(), input_on_cpu);
  auto [net, reference] = net_on(devices[0], 4);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(devices).output_device(output_device));
  for (int call = 0; call < 2; ++call) {
    INFO("call " << call);
    const auto input = torch::randn({8, 10}, f64);
    auto x = (input_on_cpu ? input.clone() : input.to(devices[0])).requires_grad_();
    auto x_reference = input.clone().requires_grad_();
    auto output = dp->forward(x);
    auto expected = chunk_by_chunk(reference, x_reference, devices.size());
    REQUIRE(on(output, output_device));
    REQUIRE(close_cpu(output, expected));
    const auto weights = torch::randn({8, 5}, f64);
    (output * weights.to(output_device)).sum().backward();
    (expected * weights).sum().backward();
    CHECK(on(x.grad(), x.device()));
    CHECK(close_cpu(x.grad(), x_reference.grad()));
    CHECK(on(net->fc2->bias.grad(), devices[0]));
    CHECK(grads_match(*net, *reference));
  }
}

// ---- DataParallel: changes between forwards --------------------------------------------------------------------

TEST_CASE(
    "DataParallel on distinct devices: the copies on devices 1..n are refreshed in place when the module changes",
    "[distinct]") {
  const auto devices = sims({0, 1, 2, 3});
  const auto source = devices[0];
  auto sightings = std::make_shared<Sightings>();
  torch::manual_seed(5);
  RecordingNet net(sightings);
  net->to(torch::kFloat64);
  auto reference = clone_of(net);
  net->to(source);
  auto reference_forward = [&](const Tensor& x) { return reference->forward(x); };
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(devices));
  const auto input = torch::randn({8, 10}, f64);
  auto check_forward = [&](const char* after) {
    INFO("after " << after);
    sightings->take();
    auto output = dp->forward(input.to(source));
    const auto seen = sightings->take();
    auto expected = chunk_by_chunk(*reference, reference_forward, input, devices.size());
    // Row block i is replica i's, on devices[i]: every device saw the change.
    for (int64_t i = 0; i < 4; ++i) {
      CAPTURE(i);
      CHECK(close_cpu(output.slice(0, 2 * i, 2 * i + 2), expected.slice(0, 2 * i, 2 * i + 2)));
    }
    return check_sightings(seen, devices, net->fc1->weight);
  };
  const auto first = check_forward("nothing");

  // An in-place edit under NoGradGuard, on the module and on the reference alike.
  {
    torch::NoGradGuard no_grad;
    for (auto* module :
         {static_cast<torch::nn::Module*>(net.get()), static_cast<torch::nn::Module*>(reference.get())}) {
      auto params = module->named_parameters();
      params["fc2.weight"].mul_(-2);
      params["fc1.bias"].add_(1);
    }
  }
  CHECK(check_forward("an in-place edit") == first);  // the same memory on every device: refreshed in place

  // An optimizer step (with momentum), after a backward through the replicas.
  torch::optim::SGD optimizer(dp->parameters(), torch::optim::SGDOptions(0.2).momentum(0.9));
  torch::optim::SGD reference_optimizer(reference->parameters(), torch::optim::SGDOptions(0.2).momentum(0.9));
  for (int step = 0; step < 2; ++step) {
    dp->forward(input.to(source)).pow(2).sum().backward();
    sightings->take();
    chunk_by_chunk(*reference, reference_forward, input, devices.size()).pow(2).sum().backward();
    optimizer.step();
    reference_optimizer.step();
    optimizer.zero_grad();
    reference_optimizer.zero_grad();
    CHECK(check_forward("an optimizer step") == first);
  }

  // A write that moves no version counter (through .data, as a fused optimizer writes).
  {
    torch::NoGradGuard no_grad;
    net->fc1->weight.variable_data().mul_(0.5);
    reference->fc1->weight.variable_data().mul_(0.5);
  }
  CHECK(check_forward("a write through .data") == first);
  CHECK(same_state(*net, *reference));
}

// ---- data_parallel, the functional form --------------------------------------------------------------------------

TEST_CASE("data_parallel on distinct devices: matches the module run chunk by chunk, call after call", "[distinct]") {
  const auto devices = device_list(GENERATE(0, 1, 2, 3));
  const bool to_cpu = GENERATE(false, true);
  CAPTURE(names(devices), to_cpu);
  const auto source = devices[0];
  const auto output_device = to_cpu ? std::optional<c10::Device>(c10::kCPU) : std::nullopt;
  auto sightings = std::make_shared<Sightings>();
  torch::manual_seed(6);
  RecordingNet net(sightings);
  net->to(torch::kFloat64);
  auto reference = clone_of(net);
  net->to(source);
  auto reference_forward = [&](const Tensor& x) { return reference->forward(x); };
  torch::optim::SGD optimizer(net->parameters(), 0.1);
  torch::optim::SGD reference_optimizer(reference->parameters(), 0.1);
  std::vector<const void*> first;
  for (int call = 0; call < 3; ++call) {
    INFO("call " << call);
    const auto input = torch::randn({10, 10}, f64);  // 5, 5 / 4, 4, 2 / 3, 3, 3, 1
    auto x = input.to(source).requires_grad_();
    auto x_reference = input.clone().requires_grad_();
    sightings->take();
    auto output = torch_dp::data_parallel(net, x, devices, output_device);
    auto weights = check_sightings(sightings->take(), devices, net->fc1->weight);
    // The replicas are kept for the module between calls: the same copies, refreshed.
    if (call == 0) {
      first = weights;
    } else {
      CHECK(weights == first);
    }
    auto expected = chunk_by_chunk(*reference, reference_forward, x_reference, devices.size());
    REQUIRE(on(output, output_device.value_or(source)));
    REQUIRE(close_cpu(output, expected));
    output.pow(2).sum().backward();
    expected.pow(2).sum().backward();
    REQUIRE(close_cpu(x.grad(), x_reference.grad()));
    REQUIRE(grads_match(*net, *reference));
    // A step between calls is seen by the next call, on every device.
    optimizer.step();
    reference_optimizer.step();
    optimizer.zero_grad();
    reference_optimizer.zero_grad();
  }
  CHECK(all_on(*net, source));
  CHECK(same_state(*net, *reference));
}

// ---- errors before anything runs --------------------------------------------------------------------------------

TEST_CASE("DataParallel on distinct devices: a device index past the device count is refused", "[distinct]") {
  REQUIRE(torch_dp::sim::device_count() == 4);
  auto [net, reference] = net_on(sim(0), 7);
  torch::nn::BatchNorm1d bn(4);
  bn->to(sim(0), torch::kFloat64);
  const std::string message = "device sim:4 does not exist: this machine has 4 sim device(s), indices 0 to 3";
  SECTION("in the device list") {
    const Snapshot before(*net);
    CHECK_THROWS_WITH(torch_dp::DataParallel(net, torch_dp::DataParallelOptions(sims({0, 4}))), Contains(message));
    CHECK_THROWS_WITH(
        torch_dp::data_parallel(net, torch::randn({4, 10}, f64.device(sim(0))), sims({0, 1, 4})), Contains(message));
    CHECK(Snapshot(*net) == before);
    const Snapshot bn_before(*bn);
    CHECK_THROWS_WITH(
        torch_dp::data_parallel(bn, torch::randn({4, 4}, f64.device(sim(0))), sims({0, 4})), Contains(message));
    CHECK(Snapshot(*bn) == bn_before);
  }
  SECTION("as the output device") {
    const Snapshot before(*net);
    CHECK_THROWS_WITH(
        torch_dp::DataParallel(net, torch_dp::DataParallelOptions(sims({0, 1})).output_device(sim(4))),
        Contains("output_" + message));
    CHECK_THROWS_WITH(
        torch_dp::data_parallel(net, torch::randn({4, 10}, f64.device(sim(0))), sims({0, 1}), sim(4)),
        Contains("output_" + message));
    CHECK(Snapshot(*net) == before);
    // Refused before the forward, which would have updated the running statistics.
    const Snapshot bn_before(*bn);
    CHECK_THROWS_WITH(
        torch_dp::data_parallel(bn, torch::randn({4, 4}, f64.device(sim(0))), sims({0, 1}), sim(4)),
        Contains("output_" + message));
    CHECK(Snapshot(*bn) == bn_before);
  }
}

TEST_CASE(
    "DataParallel on distinct devices: a module whose tensors are not on the first device is refused, unchanged",
    "[distinct]") {
  torch::manual_seed(8);
  torch::nn::Sequential net(torch::nn::Linear(4, 6), torch::nn::BatchNorm1d(6), torch::nn::Linear(6, 2));
  net->to(torch::kFloat64);
  const auto devices = sims({0, 1, 2});
  const auto where = GENERATE(1, 3, -1);  // a device in the list but not the first; one not in it; the CPU
  const auto elsewhere = where < 0 ? c10::Device(c10::kCPU) : sim(static_cast<c10::DeviceIndex>(where));
  CAPTURE(elsewhere.str());
  const bool whole = GENERATE(true, false);  // the whole module there, or only its last layer
  CAPTURE(whole);
  if (whole) {
    net->to(elsewhere);
  } else {
    net->to(devices[0]);
    net[2]->to(elsewhere);
  }
  const std::string message =
      "module must have its parameters and buffers on device sim:0 (device_ids[0]) but found "
      "one of them on device: " +
      elsewhere.str();
  const auto input = torch::randn({6, 4}, f64.device(devices[0]));
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(devices));
  const Snapshot before(*net);
  CHECK_THROWS_WITH(dp->forward(input), Contains(message));
  CHECK_THROWS_WITH(torch_dp::data_parallel(net, input, devices), Contains(message));
  CHECK(Snapshot(*net) == before);  // BatchNorm's running statistics included
  // Once the module is on the first device, the same DataParallel works.
  net->to(devices[0]);
  auto reference = clone_of(net);
  reference->to(c10::kCPU);
  auto output = dp->forward(input);
  CHECK(close_cpu(
      output, chunk_by_chunk(*reference, [&](const Tensor& x) { return reference->forward(x); }, input.cpu(), 3)));
}
