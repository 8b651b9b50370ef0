// Tests for include/torch_dp/replicate.h: the persistent Replicator on CPU device lists.

#include "helpers.h"

#include <torch_dp/replicate.h>

#include "test_access.h"

#include <cstring>
#include <vector>

using tdp_test::Contains;
using tdp_test::cpus;
using tdp_test::same_impl;

namespace {

struct Fixture {
  Fixture() {
    const auto options = at::TensorOptions().dtype(at::kDouble);
    w = at::randn({3, 2}, options).requires_grad_(true);
    b = at::randn({2}, options).requires_grad_(true);
    running_mean = at::randn({2}, options);
    steps = at::tensor({int64_t{5}});
    replicator.set_sources({w, b}, {running_mean, steps});
  }
  at::Tensor w, b, running_mean, steps;
  torch_dp::Replicator replicator;
  const std::vector<c10::Device> devices = cpus(3);
};

}  // namespace

TEST_CASE(
    "Replicator on CPU devices: slot 0 shares everything, later slots share params, copy buffers", "[replicate]") {
  Fixture f;
  CHECK(f.replicator.params().size() == 2);
  CHECK(f.replicator.buffers().size() == 2);
  const auto slots = f.replicator.replicate(f.devices, 3, /*differentiable=*/true);
  REQUIRE(slots.size() == 3);
  for (const auto& slot : slots) {
    REQUIRE(slot.size() == 4);  // params..., buffers...
  }
  // Slot 0: the source tensors themselves (PyTorch's replica 0).
  CHECK(same_impl(slots[0][0], f.w));
  CHECK(same_impl(slots[0][1], f.b));
  CHECK(same_impl(slots[0][2], f.running_mean));
  CHECK(same_impl(slots[0][3], f.steps));
  for (size_t j = 1; j < 3; ++j) {
    INFO("slot " << j);
    CHECK(same_impl(slots[j][0], f.w));
    CHECK(same_impl(slots[j][1], f.b));
    CHECK_FALSE(same_impl(slots[j][2], f.running_mean));
    CHECK_FALSE(same_impl(slots[j][3], f.steps));
    CHECK_FALSE(slots[j][2].storage().is_alias_of(f.running_mean.storage()));
    CHECK(at::equal(slots[j][2], f.running_mean));
    CHECK(at::equal(slots[j][3], f.steps));
    CHECK(slots[j][3].scalar_type() == at::kLong);
  }
  // Private copies: slots 1 and 2 do not share their buffers.
  CHECK_FALSE(slots[1][2].storage().is_alias_of(slots[2][2].storage()));
}

TEST_CASE("Replicator refreshes buffer copies when either side changed", "[replicate]") {
  Fixture f;
  auto slots = f.replicator.replicate(f.devices, 3, true);

  SECTION("an in-place change to a source buffer reaches slots 1 and 2") {
    f.running_mean.mul_(0.9).add_(1.0);
    f.steps.add_(1);
    slots = f.replicator.replicate(f.devices, 3, true);
    for (size_t j = 1; j < 3; ++j) {
      CHECK(at::equal(slots[j][2], f.running_mean));
      CHECK(slots[j][3].item<int64_t>() == 6);
    }
  }
  SECTION("an in-place change to slot 1's copy is undone, and does not touch the source or slot 2") {
    const auto original = f.running_mean.clone();
    slots[1][2].fill_(123.0);  // e.g. BatchNorm updating a non-zero replica's running stats
    CHECK(at::equal(f.running_mean, original));
    CHECK(at::equal(slots[2][2], original));
    slots = f.replicator.replicate(f.devices, 3, true);
    CHECK(at::equal(slots[1][2], original));
  }
  SECTION("an in-place change through slot 0 is the source's own change") {
    slots[0][2].fill_(-1.0);
    CHECK(at::equal(f.running_mean, at::full({2}, -1.0, at::kDouble)));
    slots = f.replicator.replicate(f.devices, 3, true);
    CHECK(at::equal(slots[1][2], f.running_mean));
    CHECK(at::equal(slots[2][2], f.running_mean));
  }
}

TEST_CASE("Replicator::changed reports whether a slot got other tensor objects", "[replicate]") {
  Fixture f;
  at::NoGradGuard inference;  // copies handed out under grad mode are refreshed into new tensors (below)
  f.replicator.replicate(f.devices, 3, true);
  CHECK(f.replicator.changed() == std::vector<bool>{true, true, true});
  const auto again = f.replicator.replicate(f.devices, 3, true);
  CHECK(f.replicator.changed() == std::vector<bool>{false, false, false});

  // A refresh in place keeps the tensor objects, so nothing is reported as changed.
  f.running_mean.add_(1.0);
  const auto refreshed = f.replicator.replicate(f.devices, 3, true);
  CHECK(f.replicator.changed() == std::vector<bool>{false, false, false});
  CHECK(same_impl(refreshed[1][2], again[1][2]));
  CHECK(at::equal(refreshed[1][2], f.running_mean));

  // A buffer that changes shape needs new copies: slots 1+ change, slot 0 (the sources themselves) does not.
  f.running_mean.set_data(at::randn({5}, at::kDouble));
  const auto relaid = f.replicator.replicate(f.devices, 3, true);
  CHECK(f.replicator.changed() == std::vector<bool>{false, true, true});
  CHECK(relaid[1][2].sizes() == at::IntArrayRef({5}));
  CHECK(at::equal(relaid[1][2], f.running_mean));
  CHECK(at::equal(relaid[2][2], f.running_mean));
}

TEST_CASE("Replicator refreshes copies after writes that move no version counter", "[replicate]") {
  // torch's fused optimizers, `.data` edits, the batch-norm op's running statistics and raw pointers write
  // without moving a version counter; variable_data() is C++'s `.data`.
  Fixture f;
  at::NoGradGuard inference;
  f.replicator.replicate(f.devices, 3, true);
  f.running_mean.variable_data().add_(5.0);
  std::memset(f.steps.data_ptr(), 0, sizeof(int64_t));
  auto slots = f.replicator.replicate(f.devices, 3, true);
  for (size_t j = 1; j < 3; ++j) {
    INFO("slot " << j);
    CHECK(at::equal(slots[j][2], f.running_mean));
    CHECK(slots[j][3].item<int64_t>() == 0);
  }

  SECTION("trust_version_counters opts out, and misses them") {
    torch_dp::Replicator trusting(/*trust_version_counters=*/true);
    trusting.set_sources({f.w, f.b}, {f.running_mean, f.steps});
    const auto before = trusting.replicate(f.devices, 3, true)[1][2].clone();
    f.running_mean.variable_data().add_(5.0);
    CHECK(at::equal(trusting.replicate(f.devices, 3, true)[1][2], before));
    f.running_mean.add_(0.0);  // a write that moves the counter
    CHECK(at::equal(trusting.replicate(f.devices, 3, true)[1][2], f.running_mean));
  }
}

TEST_CASE("Replicator returns the requested number of slots", "[replicate]") {
  Fixture f;
  at::NoGradGuard inference;
  const auto two = f.replicator.replicate(f.devices, 2, true);
  REQUIRE(two.size() == 2);
  CHECK(f.replicator.changed().size() == 2);
  CHECK(same_impl(two[0][2], f.running_mean));
  CHECK(at::equal(two[1][2], f.running_mean));
  const auto one = f.replicator.replicate(f.devices, 1, true);
  REQUIRE(one.size() == 1);
  CHECK(same_impl(one[0][0], f.w));
  const auto three = f.replicator.replicate(f.devices, 3, true);
  REQUIRE(three.size() == 3);
  // Slot 1 keeps its copies across calls with fewer slots.
  CHECK(same_impl(three[1][2], two[1][2]));

  REQUIRE_THROWS_AS(f.replicator.replicate(f.devices, 4, true), c10::Error);
  REQUIRE_THROWS_WITH(f.replicator.replicate(f.devices, 4, true), Contains("asked for 4 replicas but only 3 devices"));
}

TEST_CASE("Replicator shares a buffer that requires grad like a parameter", "[replicate]") {
  auto p = at::randn({2}, at::kDouble).requires_grad_(true);
  auto grad_buffer = at::randn({2}, at::kDouble).requires_grad_(true);
  torch_dp::Replicator replicator;
  replicator.set_sources({p}, {grad_buffer});
  const auto slots = replicator.replicate(cpus(2), 2, true);
  CHECK(same_impl(slots[1][1], grad_buffer));
}

TEST_CASE("Replicator::set_sources drops cached copies", "[replicate]") {
  Fixture f;
  const auto first = f.replicator.replicate(f.devices, 3, true);
  auto other = at::randn({4}, at::kDouble);
  f.replicator.set_sources({f.w}, {other});
  CHECK(f.replicator.params().size() == 1);
  CHECK(f.replicator.buffers().size() == 1);
  const auto slots = f.replicator.replicate(f.devices, 3, true);
  REQUIRE(slots[1].size() == 2);
  CHECK(same_impl(slots[0][1], other));
  CHECK(at::equal(slots[1][1], other));
  CHECK(f.replicator.changed() == std::vector<bool>{true, true, true});

  REQUIRE_THROWS_WITH(f.replicator.set_sources({at::Tensor()}, {}), Contains("parameter 0 is undefined"));
  REQUIRE_THROWS_WITH(f.replicator.set_sources({}, {at::Tensor()}), Contains("buffer 0 is undefined"));
}

TEST_CASE("Replicator::check_device gives PyTorch's DataParallel message", "[replicate][errors]") {
  Fixture f;
  CHECK_NOTHROW(f.replicator.check_device(c10::Device(c10::kCPU)));

  torch_dp::Replicator on_meta;
  on_meta.set_sources({at::empty({2}, at::device(at::kMeta))}, {at::empty({3}, at::device(at::kMeta))});
  REQUIRE_THROWS_AS(on_meta.check_device(c10::Device(c10::kCPU)), c10::Error);
  REQUIRE_THROWS_WITH(
      on_meta.check_device(c10::Device(c10::kCPU)),
      Contains("module must have its parameters and buffers on device cpu (device_ids[0]) but found one of them on "
               "device: meta"));

  // One stray buffer is enough.
  torch_dp::Replicator mixed;
  mixed.set_sources({at::randn({2})}, {at::empty({1}, at::device(at::kMeta))});
  REQUIRE_THROWS_WITH(mixed.check_device(c10::Device(c10::kCPU)), Contains("on device: meta"));
  CHECK_NOTHROW(on_meta.check_device(c10::Device(c10::kMeta)));
}

TEST_CASE("gradients from every slot reach the original parameters", "[replicate][autograd]") {
  Fixture f;
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const auto slots = f.replicator.replicate(f.devices, 3, true);
  std::vector<at::Tensor> xs;
  auto loss = at::zeros({}, options);
  for (size_t j = 0; j < 3; ++j) {
    xs.push_back(at::randn({4, 3}, options));
    // A linear layer with a buffer offset, as a replica's forward would use them.
    const auto y = at::matmul(xs[j], slots[j][0]) + slots[j][1] - slots[j][2];
    loss = loss + (y * y).sum();
  }
  loss.backward();

  // Reference: the same computation on the original tensors.
  auto w = f.w.detach().clone().requires_grad_(true);
  auto b = f.b.detach().clone().requires_grad_(true);
  auto ref = at::zeros({}, options);
  for (size_t j = 0; j < 3; ++j) {
    const auto y = at::matmul(xs[j], w) + b - f.running_mean;
    ref = ref + (y * y).sum();
  }
  ref.backward();
  REQUIRE(f.w.grad().defined());
  REQUIRE(f.b.grad().defined());
  CHECK(tdp_test::close64(f.w.grad(), w.grad()));
  CHECK(tdp_test::close64(f.b.grad(), b.grad()));
  // Buffers do not require grad, and their copies do not either.
  CHECK_FALSE(slots[1][2].requires_grad());
}

TEST_CASE(
    "Replicator on the copy path copies parameters too and routes their gradients back", "[replicate][autograd]") {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  auto w = at::randn({3, 2}, options).requires_grad_(true);
  auto running = at::randn({2}, options);
  torch_dp::Replicator replicator;
  torch_dp::detail::TestAccess::copy_everything(replicator);
  replicator.set_sources({w}, {running});
  const auto devices = cpus(3);

  auto slots = replicator.replicate(devices, 3, /*differentiable=*/true);
  REQUIRE(slots.size() == 3);
  CHECK(same_impl(slots[0][0], w));
  CHECK(same_impl(slots[0][1], running));
  for (size_t j = 1; j < 3; ++j) {
    INFO("slot " << j);
    CHECK_FALSE(slots[j][0].storage().is_alias_of(w.storage()));
    CHECK(at::equal(slots[j][0], w));
    CHECK(slots[j][0].requires_grad());
    CHECK(slots[j][0].grad_fn() != nullptr);  // the broadcast node
    CHECK_FALSE(slots[j][1].storage().is_alias_of(running.storage()));
    CHECK(at::equal(slots[j][1], running));
  }

  SECTION("gradients of the copies are reduce-added onto the parameter") {
    std::vector<at::Tensor> xs;
    auto loss = at::zeros({}, options);
    for (size_t j = 0; j < 3; ++j) {
      xs.push_back(at::randn({4, 3}, options));
      loss = loss + at::matmul(xs[j], slots[j][0]).pow(2).sum();
    }
    loss.backward();
    auto reference = w.detach().clone().requires_grad_(true);
    auto ref_loss = at::zeros({}, options);
    for (const auto& x : xs) {
      ref_loss = ref_loss + at::matmul(x, reference).pow(2).sum();
    }
    ref_loss.backward();
    REQUIRE(w.grad().defined());
    CHECK(tdp_test::close64(w.grad(), reference.grad()));
  }
  SECTION("an optimizer step on the parameter reaches the copies") {
    {
      at::NoGradGuard no_grad;
      w.sub_(at::ones_like(w) * 0.25);
    }
    slots = replicator.replicate(devices, 3, true);
    CHECK(at::equal(slots[1][0], w));
    CHECK(at::equal(slots[2][0], w));
  }
  SECTION("without differentiable or grad mode the copies carry no autograd history") {
    const auto plain = replicator.replicate(devices, 3, /*differentiable=*/false);
    CHECK_FALSE(plain[1][0].requires_grad());
    at::NoGradGuard no_grad;
    const auto no_grad_slots = replicator.replicate(devices, 3, true);
    CHECK_FALSE(no_grad_slots[2][0].requires_grad());
    replicator.replicate(devices, 3, true);
    CHECK(replicator.changed() == std::vector<bool>{false, false, false});
  }
  SECTION("two forwards before one backward: the first forward's copies are not overwritten") {
    std::vector<at::Tensor> xs;
    auto loss = at::zeros({}, options);
    for (int forward = 0; forward < 2; ++forward) {
      const auto tensors = replicator.replicate(devices, 3, true);
      for (size_t j = 0; j < 3; ++j) {
        xs.push_back(at::randn({4, 3}, options).requires_grad_(true));  // so that matmul saves the weight
        loss = loss + at::matmul(xs.back(), tensors[j][0]).pow(2).sum();
      }
    }
    loss.backward();  // would fail on a version counter if the second refresh had written in place
    auto reference = w.detach().clone().requires_grad_(true);
    auto ref_loss = at::zeros({}, options);
    for (const auto& x : xs) {
      ref_loss = ref_loss + at::matmul(x, reference).pow(2).sum();
    }
    ref_loss.backward();
    CHECK(tdp_test::close64(w.grad(), reference.grad()));
  }
}

TEST_CASE(
    "Replicator::bind fills the caller's tensors in place and gives them the gradient path",
    "[replicate][bind][autograd]") {
  Fixture f;
  f.replicator.set_devices(f.devices);
  CHECK(f.replicator.uses_sources(0));
  CHECK_FALSE(f.replicator.uses_sources(1));
  REQUIRE_THROWS_WITH(f.replicator.uses_sources(3), Contains("slot 3 does not exist"));
  const auto options = at::TensorOptions().dtype(at::kDouble);
  // A clone's tensors: other values, requiring grad like a fresh parameter.
  std::vector<at::Tensor> own = {
      at::zeros({3, 2}, options).requires_grad_(true), at::zeros({2}, options).requires_grad_(true),
      at::zeros({2}, options), at::zeros({1}, at::kLong)};
  REQUIRE_THROWS_WITH(f.replicator.bind(1, {own[0]}), Contains("expected 4 tensors (2 parameters and 2 buffers)"));
  f.replicator.bind(1, own);

  auto slots = f.replicator.replicate(f.devices, 2, /*differentiable=*/true);
  for (size_t k = 0; k < own.size(); ++k) {
    INFO("tensor " << k);
    CHECK(same_impl(slots[1][k], own[k]));  // the caller's tensors, not others
  }
  // Parameters point at the sources' memory, buffers at private copies holding the sources' values.
  CHECK(own[0].const_data_ptr() == f.w.const_data_ptr());
  CHECK(own[1].const_data_ptr() == f.b.const_data_ptr());
  CHECK_FALSE(own[2].storage().is_alias_of(f.running_mean.storage()));
  CHECK(at::equal(own[2], f.running_mean));
  CHECK(at::equal(own[3], f.steps));

  SECTION("gradients through the bound tensors reach the sources") {
    const auto x = at::randn({4, 3}, options);
    (at::matmul(x, own[0]) + own[1]).pow(2).sum().backward();
    auto w = f.w.detach().clone().requires_grad_(true);
    auto b = f.b.detach().clone().requires_grad_(true);
    (at::matmul(x, w) + b).pow(2).sum().backward();
    REQUIRE(f.w.grad().defined());
    CHECK(tdp_test::close64(f.w.grad(), w.grad()));
    CHECK(tdp_test::close64(f.b.grad(), b.grad()));
    CHECK_FALSE(own[0].grad_fn() == nullptr);
  }
  SECTION("a source given other memory or another dtype is followed, a buffer edit is refreshed") {
    {
      at::NoGradGuard no_grad;
      f.w.set_data(at::randn({3, 2}, options));
      f.b.set_data(f.b.to(at::kFloat));
      f.running_mean.mul_(3);
    }
    f.replicator.replicate(f.devices, 2, true);
    CHECK(own[0].const_data_ptr() == f.w.const_data_ptr());
    CHECK(own[1].const_data_ptr() == f.b.const_data_ptr());
    CHECK(own[1].scalar_type() == at::kFloat);
    CHECK(at::equal(own[2], f.running_mean));
  }
  SECTION("a frozen source freezes its bound tensor") {
    f.b.requires_grad_(false);
    f.replicator.replicate(f.devices, 2, true);
    CHECK_FALSE(own[1].requires_grad());
    CHECK(own[0].requires_grad());
  }
}
