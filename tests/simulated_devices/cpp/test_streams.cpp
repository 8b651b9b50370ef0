// The simulated accelerator's own rules (tests/simulated_devices/README.md), each shown by a test that fails when
// the rule is broken: a test that relies on a stream wait also shows what the same code reads without it.

#include "backend/runtime.h"
#include "catch.h"

#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <future>
#include <memory>
#include <stdexcept>
#include <string>

namespace sim = torch_dp::sim;

namespace {

c10::Device dev(c10::DeviceIndex index) {
  return c10::Device(sim::kDeviceType, index);
}

torch::TensorOptions on(c10::DeviceIndex index, torch::Dtype dtype = torch::kFloat64) {
  return torch::TensorOptions().device(dev(index)).dtype(dtype);
}

// Holds a stream at a point in its queue until opened: what is queued after it waits, as behind a long kernel.
// It opens by itself after a while, so that a host call that wrongly waits for the stream fails the test (see
// returns_without_waiting) instead of hanging it.
class Gate {
 public:
  explicit Gate(const c10::Stream& stream) : opened_(promise_.get_future().share()) {
    auto opened = opened_;
    sim::enqueue(stream, [opened] { opened.wait_for(std::chrono::seconds(30)); });
  }
  ~Gate() { open(); }
  void open() {
    if (!done_) {
      done_ = true;
      promise_.set_value();
    }
  }

 private:
  std::promise<void> promise_;
  std::shared_future<void> opened_;
  bool done_ = false;
};

// The value a device tensor's memory holds right now, read by the host without waiting for any stream.
double peek(const torch::Tensor& tensor) {
  return static_cast<const double*>(tensor.data_ptr())[0];
}

// Runs `issue` on another thread and reports whether it returned within the time limit: a host call that waited
// for a gated stream would not.
template <typename F>
bool returns_without_waiting(F issue) {
  auto done = std::async(std::launch::async, issue);
  return done.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
}

}  // namespace

TEST_CASE("simulated devices: the device count, and an index past it is refused", "[sim]") {
  REQUIRE(sim::device_count() >= 2);
  REQUIRE(torch::ones({2}, on(sim::device_count() - 1)).device().index() == sim::device_count() - 1);
  REQUIRE_THROWS_WITH(
      torch::ones({2}, on(sim::device_count())), Catch::Matchers::Contains("is out of range: there are"));
}

TEST_CASE("simulated devices: fresh memory is poisoned (NaN)", "[sim]") {
  auto fresh = torch::empty({16}, on(1));
  REQUIRE(fresh.isnan().all().item<bool>());
  auto integers = torch::empty({4}, on(1, torch::kInt64));
  REQUIRE((integers == -1).all().item<bool>());
}

TEST_CASE("simulated devices: ops run asynchronously to the host, in order on their stream", "[sim]") {
  auto x = torch::zeros({8}, on(1));
  sim::synchronize_device(1);
  torch::Tensor y;
  {
    Gate gate(sim::current_stream(1));
    // The host issues the ops and returns while the stream is held: it never waited for the device.
    REQUIRE(returns_without_waiting([&] {
      for (int i = 0; i < 50; ++i) {
        x.add_(1);
      }
      y = x * 2;
    }));
    REQUIRE(std::isnan(peek(y)));  // allocated, not yet computed
    REQUIRE(peek(x) == 0);         // not yet incremented
  }
  // In order: every add before the multiplication (ops run out of order would give another value).
  REQUIRE(torch::equal(y.cpu(), torch::full({8}, 100.0, torch::kFloat64)));
}

TEST_CASE("simulated devices: a stream held does not hold the device's other streams", "[sim]") {
  const auto side = sim::pool_stream(2);
  Gate gate(sim::current_stream(2));
  const c10::StreamGuard guard(side);
  auto x = torch::ones({4}, on(2)) * 3;  // on the side stream, past nothing held
  sim::synchronize_stream(side);
  REQUIRE(peek(x) == 3);
}

TEST_CASE("simulated devices: an event makes one stream wait for another", "[sim]") {
  const auto main_stream = sim::current_stream(1);
  const auto side = sim::pool_stream(1);
  for (const bool wait : {true, false}) {
    auto source = torch::empty({4}, on(1));
    torch::Tensor read;
    {
      Gate gate(main_stream);
      source.fill_(7);  // on the held main stream
      c10::Event written(sim::kDeviceType);
      written.record(main_stream);
      if (wait) {
        written.block(side);
      }
      const c10::StreamGuard guard(side);
      read = source * 1;  // on the side stream
      if (!wait) {
        sim::synchronize_stream(side);  // ran before the fill: it read the poison
      }
    }
    sim::synchronize_device(1);
    // With the wait the side stream reads the fill; without it, what was there before (NaN).
    REQUIRE(std::isnan(read.cpu()[0].item<double>()) == !wait);
  }
}

TEST_CASE("simulated devices: a copy between devices waits for both devices' current streams", "[sim]") {
  auto source = torch::full({4}, 2.0, on(0));
  auto destination = torch::empty({4}, on(1));
  sim::synchronize_device(0);
  sim::synchronize_device(1);
  torch::Tensor after;
  {
    // The destination's stream still has to write the destination: the copy must come after that write ...
    Gate gate(sim::current_stream(1));
    destination.fill_(5);
    REQUIRE(returns_without_waiting([&] { destination.copy_(source); }));  // never blocks the host
    // ... and what the destination's stream runs next sees the copy.
    after = destination + 1;
  }
  REQUIRE(torch::equal(destination.cpu(), torch::full({4}, 2.0, torch::kFloat64)));
  REQUIRE(torch::equal(after.cpu(), torch::full({4}, 3.0, torch::kFloat64)));

  // The other way round: the source's stream still has to write the source when the copy is issued.
  auto later = torch::empty({4}, on(0));
  torch::Tensor copied;
  {
    Gate gate(sim::current_stream(0));
    later.fill_(9);
    REQUIRE(returns_without_waiting([&] { copied = later.to(dev(1)) * 1; }));  // after the copy, on device 1
  }
  REQUIRE(torch::equal(copied.cpu(), torch::full({4}, 9.0, torch::kFloat64)));
}

TEST_CASE(
    "simulated devices: host to device reads pageable memory at once, pinned memory when the copy runs", "[sim]") {
  for (const bool pinned : {false, true}) {
    auto host = torch::full({4}, 1.0, torch::kFloat64);
    if (pinned) {
      host = host.pin_memory();
      REQUIRE(host.is_pinned());
    }
    torch::Tensor device;
    {
      Gate gate(sim::current_stream(3));
      REQUIRE(returns_without_waiting([&] { device = host.to(dev(3), /*non_blocking=*/true); }));
      host.fill_(4);  // before the copy ran
    }
    // Pageable memory was staged when the copy was issued (as cudaMemcpyAsync does); pinned memory is read by the
    // copy itself, so the later write is what arrives.
    REQUIRE(device.cpu()[0].item<double>() == (pinned ? 4 : 1));
  }
}

TEST_CASE("simulated devices: device to host waits for the stream, unless non_blocking into pinned memory", "[sim]") {
  auto device = torch::zeros({4}, on(2));
  torch::Tensor host;
  {
    Gate gate(sim::current_stream(2));
    device.add_(6);
    auto pinned = torch::empty({4}, torch::TensorOptions().dtype(torch::kFloat64).pinned_memory(true));
    REQUIRE(returns_without_waiting([&] { pinned.copy_(device, /*non_blocking=*/true); }));
    REQUIRE(std::isnan(pinned[0].item<double>()));  // not yet written: the copy is queued behind the gate
    host = pinned;
  }
  sim::synchronize_device(2);
  REQUIRE(host[0].item<double>() == 6);
  // A blocking copy waits: its result is there when it returns.
  device.add_(1);
  REQUIRE(device.cpu()[0].item<double>() == 7);
}

TEST_CASE("simulated devices: freed memory waits for the streams recorded on it, then is poisoned", "[sim]") {
  const auto main_stream = sim::current_stream(1);
  const auto side = sim::pool_stream(1);
  for (const bool recorded : {true, false}) {
    sim::synchronize_device(1);
    auto data = torch::full({64}, 3.0, on(1));
    torch::Tensor read;
    {
      // The side stream, held, will read `data`, which the host frees before that read runs.
      Gate gate(side);
      sim::wait_stream(side, main_stream);
      {
        const c10::StreamGuard guard(side);
        read = data * 1;
      }
      if (recorded) {
        data.record_stream(side);
      }
      data.reset();
      sim::synchronize_stream(main_stream);  // the free's turn on the stream the memory was allocated for
    }
    sim::synchronize_stream(side);
    // Recorded, the block waited for the side stream; not recorded, it was poisoned before the read ran.
    REQUIRE(std::isnan(read.cpu()[0].item<double>()) == !recorded);
  }
}

TEST_CASE("simulated devices: an error of queued work is raised by the next synchronization", "[sim]") {
  const auto stream = sim::current_stream(1);
  REQUIRE_NOTHROW(sim::enqueue(stream, [] { throw std::runtime_error("a kernel failed"); }));  // the host goes on
  REQUIRE_THROWS_WITH(sim::synchronize_stream(stream), Catch::Matchers::Contains("a kernel failed"));
  REQUIRE_NOTHROW(sim::synchronize_stream(stream));  // reported once
  // The same for an op whose failure only its kernel can see (an index past the end), once Python's meta
  // kernels let it run asynchronously; without them (this C++ program) it runs synchronously and raises at once.
  auto x = torch::arange(4, on(1));
  auto out_of_range = torch::tensor({0, 9}, on(1, torch::kInt64));
  REQUIRE_THROWS_WITH(
      [&] {
        x.index_select(0, out_of_range);
        sim::synchronize_device(1);
      }(),
      Catch::Matchers::Contains("out of range"));
  REQUIRE_NOTHROW(sim::synchronize_device(1));
}

TEST_CASE("simulated devices: ops refuse tensors on two devices, naming both", "[sim]") {
  auto a = torch::ones({2, 2}, on(0));
  auto b = torch::ones({2, 2}, on(1));
  REQUIRE_THROWS_WITH(torch::mm(a, b), Catch::Matchers::Contains("'self' is on sim:0 and 'mat2' is on sim:1"));
  REQUIRE_THROWS_WITH(torch::cat({a, b}), Catch::Matchers::Contains("on sim:0") && Catch::Matchers::Contains("sim:1"));
  REQUIRE_THROWS_WITH(torch::mm(a, torch::ones({2, 2})), Catch::Matchers::Contains("only as 0-dim scalars"));
  REQUIRE(torch::equal((a + torch::tensor(1.0)).cpu(), torch::full({2, 2}, 2.0)));  // a CPU scalar is fine
}

TEST_CASE("simulated devices: each device has its own random generator", "[sim]") {
  auto draw = [](c10::DeviceIndex index) { return torch::randn({6}, on(index)).cpu(); };
  auto seed_all = [](uint64_t seed) {
    for (c10::DeviceIndex i = 0; i < sim::device_count(); ++i) {
      auto generator = sim::default_generator(i);
      std::lock_guard<std::mutex> lock(generator.mutex());
      generator.set_current_seed(seed);
    }
  };
  seed_all(1);
  const auto first_on_1 = draw(1);
  seed_all(1);
  const auto first_on_0 = draw(0);
  // Drawing on device 0 did not move device 1's generator.
  REQUIRE(torch::equal(draw(1), first_on_1));
  REQUIRE(torch::equal(first_on_0, first_on_1));  // same seed, same sequence, as on CUDA
  REQUIRE(!torch::equal(draw(0), first_on_0));
  // A generator of another device is refused.
  auto generator = sim::new_generator(2);
  REQUIRE_THROWS_WITH(
      torch::randn({2}, generator, on(1)), Catch::Matchers::Contains("was given a generator of device sim:2"));
}

TEST_CASE("simulated devices: batch norm, convolutions, dropout and LSTM match the CPU", "[sim]") {
  torch::manual_seed(0);
  auto x = torch::randn({6, 3, 5, 5}, torch::kFloat64);
  // Modules are built on the CPU and their tensors copied into device tensors (Module::to fails for this
  // backend inside PyTorch's set_data); the CPU modules are the reference.
  auto to_device = [](torch::nn::Module& cpu, c10::DeviceIndex index) {
    std::vector<torch::Tensor> copies;
    for (auto& p : cpu.parameters()) {
      copies.push_back(p.detach().to(dev(index)).requires_grad_());
    }
    return copies;
  };
  torch::nn::BatchNorm2d bn(3);
  bn->to(torch::kFloat64);
  auto bn_params = to_device(*bn, 1);
  auto running_mean = bn->running_mean.to(dev(1)), running_var = bn->running_var.to(dev(1));
  auto x1 = x.to(dev(1)).requires_grad_();
  auto y1 = torch::batch_norm(x1, bn_params[0], bn_params[1], running_mean, running_var, true, 0.1, 1e-5, false);
  auto xr = x.clone().requires_grad_();
  auto yr = bn(xr);
  REQUIRE(torch::allclose(y1.cpu(), yr));
  REQUIRE(torch::allclose(running_mean.cpu(), bn->running_mean));  // written back by the CPU kernel in place
  REQUIRE(torch::allclose(running_var.cpu(), bn->running_var));
  y1.square().sum().backward();
  yr.square().sum().backward();
  REQUIRE(torch::allclose(x1.grad().cpu(), xr.grad()));

  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(3, 4, 3).padding(1));
  conv->to(torch::kFloat64);
  auto conv_params = to_device(*conv, 2);
  auto x2 = x.to(dev(2)).requires_grad_();
  auto c2 = torch::conv2d(x2, conv_params[0], conv_params[1], 1, 1);
  auto xc = x.clone().requires_grad_();
  auto cr = conv(xc);
  REQUIRE(torch::allclose(c2.cpu(), cr));
  c2.sum().backward();
  cr.sum().backward();
  REQUIRE(torch::allclose(x2.grad().cpu(), xc.grad()));
  REQUIRE(torch::allclose(conv_params[0].grad().cpu(), conv->weight.grad()));

  auto kept = torch::dropout(torch::ones({1000}, on(3)), 0.25, true).cpu();
  const auto share = (kept > 0).to(torch::kFloat64).mean().item<double>();
  REQUIRE(share > 0.65);
  REQUIRE(share < 0.85);
  REQUIRE(torch::allclose(kept.masked_select(kept > 0), torch::full({1}, 1 / 0.75, torch::kFloat64)));

  torch::nn::LSTM lstm(torch::nn::LSTMOptions(4, 5).batch_first(true));
  lstm->to(torch::kFloat64);
  auto lstm_params = to_device(*lstm, 1);
  auto seq = torch::randn({3, 7, 4}, torch::kFloat64);
  auto h0 = torch::zeros({1, 3, 5}, on(1)), c0 = torch::zeros({1, 3, 5}, on(1));
  auto s1 = seq.to(dev(1)).requires_grad_();
  auto out1 = std::get<0>(torch::lstm(s1, {h0, c0}, lstm_params, true, 1, 0.0, true, false, true));
  auto sr = seq.clone().requires_grad_();
  auto outr = std::get<0>(lstm->forward(sr));
  REQUIRE(torch::allclose(out1.cpu(), outr));
  out1.square().sum().backward();
  outr.square().sum().backward();
  REQUIRE(torch::allclose(s1.grad().cpu(), sr.grad()));
  REQUIRE(torch::allclose(lstm_params[0].grad().cpu(), lstm->parameters()[0].grad()));
}

TEST_CASE("simulated devices: a slower device computes the same results", "[sim]") {
  REQUIRE_THROWS_WITH(sim::set_slowdown(1, 0.5), Catch::Matchers::Contains("at least 1"));
  sim::set_slowdown(3, 3.0);
  auto x = torch::arange(6, on(3)) * 2;
  REQUIRE(torch::equal(x.cpu(), torch::arange(6, torch::kFloat64) * 2));
  sim::set_slowdown(3, 1.0);
}
