// Tests for include/torch_dp/comm.h: broadcast_coalesced, reduce_add_coalesced, CoalescedCopies and the
// broadcast autograd node.

#include "helpers.h"

#include <torch_dp/comm.h>

#include <vector>

using tdp_test::Contains;
using tdp_test::cpus;
using tdp_test::kCpu;
using tdp_test::same_impl;

TEST_CASE("broadcast_coalesced returns the input tensors themselves on their own device", "[comm]") {
  const std::vector<at::Tensor> tensors = {at::randn({2, 3}), at::randn({4}, at::kDouble), at::arange(5)};
  const auto result = torch_dp::broadcast_coalesced(tensors, cpus(2));
  REQUIRE(result.size() == 2);
  for (const auto& per_device : result) {
    REQUIRE(per_device.size() == tensors.size());
    for (size_t k = 0; k < tensors.size(); ++k) {
      CHECK(same_impl(per_device[k], tensors[k]));
    }
  }
  // Nothing to broadcast: one empty list per device.
  const auto empty = torch_dp::broadcast_coalesced(std::vector<at::Tensor>{}, cpus(3));
  REQUIRE(empty.size() == 3);
  for (const auto& per_device : empty) {
    CHECK(per_device.empty());
  }
}

TEST_CASE("broadcast_coalesced on the source device keeps gradients flowing into the inputs", "[comm][autograd]") {
  auto p = at::randn({3}, at::kDouble).requires_grad_(true);
  const std::vector<at::Tensor> tensors = {p};
  const auto result = torch_dp::broadcast_coalesced(tensors, cpus(2));
  (result[0][0] * 2.0 + result[1][0] * 3.0).sum().backward();
  CHECK(at::equal(p.grad(), at::full({3}, 5.0, at::kDouble)));
}

TEST_CASE("reduce_add_coalesced sums tensors of mixed dtypes and shapes", "[comm]") {
  // Three "devices" (all CPU) with five tensors of three dtypes.
  auto make = [] {
    return std::vector<at::Tensor>{
        at::randn({2, 3}), at::randn({4}, at::kDouble), at::randint(-50, 50, {3, 1}, at::kLong), at::randn({5}),
        at::randn({2, 2}, at::kDouble)};
  };
  const std::vector<std::vector<at::Tensor>> inputs = {make(), make(), make()};
  const auto result = torch_dp::reduce_add_coalesced(inputs, kCpu);
  REQUIRE(result.size() == 5);
  for (size_t k = 0; k < result.size(); ++k) {
    INFO("tensor " << k);
    const auto& first = inputs[0][k];
    CHECK(result[k].sizes() == first.sizes());
    CHECK(result[k].scalar_type() == first.scalar_type());
    CHECK(result[k].device().is_cpu());
    if (first.scalar_type() == at::kLong) {
      CHECK(at::equal(result[k], inputs[0][k] + inputs[1][k] + inputs[2][k]));
    } else {
      const auto expected = inputs[0][k].to(at::kDouble) + inputs[1][k].to(at::kDouble) + inputs[2][k].to(at::kDouble);
      const double tol = first.scalar_type() == at::kFloat ? 1e-5 : 1e-12;
      CHECK(at::allclose(result[k].to(at::kDouble), expected, tol, tol));
    }
  }
}

TEST_CASE("reduce_add_coalesced treats a missing gradient as zeros", "[comm]") {
  const auto a = at::randn({3, 2}, at::kDouble);
  const auto b = at::randn({3, 2}, at::kDouble);
  const auto c = at::randn({4}, at::kDouble);
  const std::vector<std::vector<at::Tensor>> inputs = {{a, at::Tensor()}, {b, c}, {at::Tensor(), at::Tensor()}};
  const auto result = torch_dp::reduce_add_coalesced(inputs, kCpu);
  REQUIRE(result.size() == 2);
  CHECK(tdp_test::close64(result[0], a + b));
  CHECK(tdp_test::close64(result[1], c));

  // A tensor no device produced stays undefined.
  const std::vector<std::vector<at::Tensor>> unused = {{a, at::Tensor()}, {b, at::Tensor()}};
  const auto partial = torch_dp::reduce_add_coalesced(unused, kCpu);
  CHECK(tdp_test::close64(partial[0], a + b));
  CHECK_FALSE(partial[1].defined());
}

TEST_CASE("reduce_add_coalesced errors name the problem", "[comm][errors]") {
  const std::vector<std::vector<at::Tensor>> none;
  REQUIRE_THROWS_AS(torch_dp::reduce_add_coalesced(none, kCpu), c10::Error);
  REQUIRE_THROWS_WITH(torch_dp::reduce_add_coalesced(none, kCpu), Contains("at least one device"));

  const std::vector<std::vector<at::Tensor>> counts = {{at::randn({2}), at::randn({2})}, {at::randn({2})}};
  REQUIRE_THROWS_AS(torch_dp::reduce_add_coalesced(counts, kCpu), c10::Error);
  REQUIRE_THROWS_WITH(torch_dp::reduce_add_coalesced(counts, kCpu), Contains("expected 2 tensors from every device"));

  const std::vector<std::vector<at::Tensor>> shapes = {{at::randn({2})}, {at::randn({3})}};
  REQUIRE_THROWS_WITH(torch_dp::reduce_add_coalesced(shapes, kCpu), Contains("tensor 0 has shape"));

  const std::vector<std::vector<at::Tensor>> dtypes = {{at::randn({2})}, {at::randn({2}, at::kDouble)}};
  REQUIRE_THROWS_AS(torch_dp::reduce_add_coalesced(dtypes, kCpu), c10::Error);
}

TEST_CASE("reduce_add_coalesced is differentiable, twice", "[comm][autograd]") {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  std::vector<std::vector<at::Tensor>> inputs(3);
  for (auto& per_device : inputs) {
    per_device = {at::randn({2, 3}, options).requires_grad_(true), at::randn({4}, options).requires_grad_(true)};
  }
  const std::vector<at::Tensor> w = {at::randn({2, 3}, options), at::randn({4}, options)};

  SECTION("first order: every input gets the weight of its sum") {
    const auto result = torch_dp::reduce_add_coalesced(inputs, c10::Device(c10::kCPU));
    REQUIRE(result[0].requires_grad());
    ((result[0] * w[0]).sum() + (result[1] * w[1]).sum()).backward();
    for (size_t i = 0; i < inputs.size(); ++i) {
      for (size_t k = 0; k < 2; ++k) {
        INFO("device " << i << ", tensor " << k);
        REQUIRE(inputs[i][k].grad().defined());
        CHECK(tdp_test::close64(inputs[i][k].grad(), w[k]));
      }
    }
  }
  SECTION("second order") {
    // loss = sum_k w_k * S_k^2 with S_k = sum_i x_ik: d loss / d x_0k = 2 w_k S_k, and d/dx_1k of sum(that) = 2 w_k.
    const auto result = torch_dp::reduce_add_coalesced(inputs, c10::Device(c10::kCPU));
    const auto loss = (w[0] * result[0] * result[0]).sum() + (w[1] * result[1] * result[1]).sum();
    const auto g = torch::autograd::grad({loss}, {inputs[0][0], inputs[0][1]}, {}, true, true);
    const auto s0 = (inputs[0][0] + inputs[1][0] + inputs[2][0]).detach();
    CHECK(tdp_test::close64(g[0], 2.0 * w[0] * s0));
    const auto g2 = torch::autograd::grad({g[0].sum() + g[1].sum()}, {inputs[1][0], inputs[1][1]});
    CHECK(tdp_test::close64(g2[0], 2.0 * w[0]));
    CHECK(tdp_test::close64(g2[1], 2.0 * w[1]));
  }
}

TEST_CASE("attach_broadcast_grad reduce-adds the copies' gradients onto the sources", "[comm][autograd]") {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  auto s0 = at::randn({2, 2}, options).requires_grad_(true);
  auto s1 = at::randn({3}, options).requires_grad_(true);
  const std::vector<at::Tensor> sources = {s0, s1};
  std::vector<std::vector<at::Tensor>> copies;
  for (int j = 0; j < 3; ++j) {
    copies.push_back({s0.detach().clone(), s1.detach().clone()});
  }
  const auto with_grad = torch_dp::detail::attach_broadcast_grad(sources, copies);
  REQUIRE(with_grad.size() == 3);
  std::vector<std::vector<at::Tensor>> weights;
  auto loss = at::zeros({}, options);
  for (size_t j = 0; j < 3; ++j) {
    REQUIRE(with_grad[j].size() == 2);
    weights.push_back({at::randn({2, 2}, options), at::randn({3}, options)});
    for (size_t k = 0; k < 2; ++k) {
      // An alias of the cached copy (same memory), with a grad_fn; the cached copy itself stays a leaf.
      CHECK(with_grad[j][k].const_data_ptr() == copies[j][k].const_data_ptr());
      CHECK(with_grad[j][k].requires_grad());
      CHECK_FALSE(copies[j][k].requires_grad());
      loss = loss + (with_grad[j][k] * weights[j][k]).sum();
    }
  }
  loss.backward();
  CHECK(tdp_test::close64(s0.grad(), weights[0][0] + weights[1][0] + weights[2][0]));
  CHECK(tdp_test::close64(s1.grad(), weights[0][1] + weights[1][1] + weights[2][1]));

  std::vector<std::vector<at::Tensor>> wrong = {{s0.detach().clone()}};
  REQUIRE_THROWS_WITH(
      torch_dp::detail::attach_broadcast_grad(sources, wrong), Contains("expected 2 copies per device"));
}

TEST_CASE("CoalescedCopies on the source device", "[comm][coalesced]") {
  auto f0 = at::randn({2, 3});
  auto f1 = at::randn({4});
  auto d0 = at::randn({5}, at::kDouble);
  auto l0 = at::arange(6, at::kLong).view({2, 3});
  const std::vector<at::Tensor> sources = {f0, d0, f1, l0};
  torch_dp::detail::CoalescedCopies copies(sources, kCpu);
  REQUIRE(copies.device().is_cpu());
  REQUIRE(copies.refresh(sources));
  const auto& c = copies.copies();
  REQUIRE(c.size() == sources.size());

  auto all_equal = [&] {
    bool ok = true;
    for (size_t k = 0; k < sources.size(); ++k) {
      ok = ok && c[k].sizes() == sources[k].sizes() && c[k].scalar_type() == sources[k].scalar_type() &&
           at::equal(c[k], sources[k]);
    }
    return ok;
  };

  SECTION("copies equal the sources, live in one flat buffer per dtype and do not alias the sources") {
    CHECK(all_equal());
    for (size_t k = 0; k < sources.size(); ++k) {
      CHECK_FALSE(c[k].storage().is_alias_of(sources[k].storage()));
    }
    CHECK(c[0].storage().is_alias_of(c[2].storage()));          // the two float copies share a buffer
    CHECK(c[0].storage().nbytes() == (6 + 4) * sizeof(float));  // and that buffer holds exactly them
    CHECK_FALSE(c[0].storage().is_alias_of(c[1].storage()));    // double has its own
    CHECK_FALSE(c[0].storage().is_alias_of(c[3].storage()));    // and so has int64
  }
  SECTION("an in-place change to a source is copied on the next refresh") {
    f1.mul_(-3.0).add_(1.0);
    d0.fill_(2.5);
    CHECK_FALSE(at::equal(c[2], f1));
    REQUIRE(copies.refresh(sources));
    CHECK(all_equal());
  }
  SECTION("a write into a copy is undone by the next refresh") {
    const auto before = c[2].clone();
    c[2].fill_(42.0);  // the copy shares its flat buffer's version counter
    c[3].zero_();
    REQUIRE(copies.refresh(sources));
    CHECK(at::equal(c[2], before));
    CHECK(all_equal());
  }
  SECTION("a source re-pointed at other memory of the same shape is copied again") {
    f0.set_data(at::full({2, 3}, 7.0));  // keeps f0's version counter, changes its data pointer
    REQUIRE(copies.refresh(sources));
    CHECK(at::equal(c[0], at::full({2, 3}, 7.0)));
    CHECK(all_equal());
  }
  SECTION("a write that moves no version counter or data pointer is copied on the next refresh") {
    // Through another tensor over the same memory, as `.data`, fused optimizers and raw pointers write.
    auto alias = at::from_blob(f1.data_ptr<float>(), {4}, at::kFloat);
    alias.fill_(-9.0);
    d0.variable_data().fill_(3.0);
    REQUIRE(copies.refresh(sources));
    CHECK(at::equal(c[2], at::full({4}, -9.0)));
    CHECK(all_equal());
  }
  SECTION("refresh returns false when a source changed shape, dtype or count") {
    auto other = sources;
    other[0] = at::zeros({3, 3});
    CHECK_FALSE(copies.refresh(other));
    other = sources;
    other[1] = d0.to(at::kFloat);
    CHECK_FALSE(copies.refresh(other));
    other = sources;
    other.pop_back();
    CHECK_FALSE(copies.refresh(other));
    // The same tensor object resized through set_data.
    f0.set_data(at::zeros({3, 3}));
    CHECK_FALSE(copies.refresh(sources));
  }
}

TEST_CASE(
    "CoalescedCopies with trust_version_counters copy a group again only when a counter moved", "[comm][coalesced]") {
  auto f0 = at::randn({2, 3});
  auto f1 = at::randn({4});
  auto d0 = at::randn({5}, at::kDouble);
  const std::vector<at::Tensor> sources = {f0, d0, f1};
  at::NoGradGuard no_grad;
  torch_dp::detail::CoalescedCopies copies(sources, kCpu, /*trust_version_counters=*/true);
  REQUIRE(copies.refresh(sources));
  const auto& c = copies.copies();

  // The assumption it makes, and what it misses: a write through another tensor over the same memory.
  auto alias = at::from_blob(f1.data_ptr<float>(), {4}, at::kFloat);
  const auto before = c[2].clone();
  alias.fill_(-9.0);
  REQUIRE(copies.refresh(sources));
  CHECK(at::equal(c[2], before));
  // A write that moves the version counter is copied, for the whole dtype group and no other.
  const auto double_copy = c[1].clone();
  d0.variable_data().fill_(1.5);  // missed too: the double group is not stale
  f1.add_(0.0);
  REQUIRE(copies.refresh(sources));
  CHECK(at::equal(c[2], at::full({4}, -9.0)));
  CHECK(at::equal(c[0], f0));
  CHECK(at::equal(c[1], double_copy));
  // A write into a copy is still undone (the copies share their flat buffer's version counter).
  c[0].fill_(5.0);
  REQUIRE(copies.refresh(sources));
  CHECK(at::equal(c[0], f0));
}

TEST_CASE("CoalescedCopies never overwrite copies handed out under grad mode", "[comm][coalesced][autograd]") {
  auto w = at::randn({3, 2}, at::kDouble);
  auto b = at::randn({2}, at::kDouble);
  const std::vector<at::Tensor> sources = {w, b};
  torch_dp::detail::CoalescedCopies copies(sources, kCpu);

  SECTION("with grad mode on, the next refresh writes into new memory") {
    REQUIRE(copies.refresh(sources));
    const auto handed_out = copies.copies();  // e.g. saved by a Linear in this forward's graph
    const auto saved_w = handed_out[0].clone();
    const auto saved_version = handed_out[0]._version();
    w.mul_(2.0);
    REQUIRE(copies.refresh(sources));
    CHECK(at::equal(copies.copies()[0], w));
    CHECK(at::equal(copies.copies()[1], b));
    CHECK_FALSE(copies.copies()[0].storage().is_alias_of(handed_out[0].storage()));
    CHECK(at::equal(handed_out[0], saved_w));
    CHECK(handed_out[0]._version() == saved_version);  // a backward through them still works
    CHECK(copies.copies()[0].storage().is_alias_of(copies.copies()[1].storage()));  // still one buffer
  }
  SECTION("in inference, refresh overwrites the same memory") {
    at::NoGradGuard no_grad;
    REQUIRE(copies.refresh(sources));
    const auto handed_out = copies.copies();
    w.mul_(2.0);
    REQUIRE(copies.refresh(sources));
    CHECK(copies.copies()[0].is_same(handed_out[0]));
    CHECK(at::equal(handed_out[0], w));
  }
}

TEST_CASE("CoalescedCopies copy sources that are inference tensors or non-contiguous", "[comm][coalesced]") {
  const auto base = at::randn({4, 6});
  auto strided = base.t();  // non-contiguous view
  at::Tensor inference;
  {
    c10::InferenceMode guard;
    inference = at::randn({3});
  }
  const std::vector<at::Tensor> sources = {strided, inference};
  torch_dp::detail::CoalescedCopies copies(sources, kCpu);
  REQUIRE(copies.refresh(sources));
  CHECK(at::equal(copies.copies()[0], strided));
  CHECK(at::equal(copies.copies()[1], inference));
  base.mul_(2.0);  // the view's version counter moves with its base
  REQUIRE(copies.refresh(sources));
  CHECK(at::equal(copies.copies()[0], strided));
}

TEST_CASE(
    "CoalescedCopies::bind makes caller-owned tensors share the copies and guards writes through them",
    "[comm][coalesced]") {
  auto a = at::randn({2, 3});
  auto b = at::randn({4});
  const std::vector<at::Tensor> sources = {a, b};
  torch_dp::detail::CoalescedCopies copies(sources, kCpu);
  REQUIRE(copies.refresh(sources));
  std::vector<at::Tensor> aliases = {at::zeros({2, 3}), at::zeros({4})};
  copies.bind(aliases);
  for (size_t k = 0; k < 2; ++k) {
    INFO("tensor " << k);
    CHECK(aliases[k].const_data_ptr() == copies.copies()[k].const_data_ptr());
    CHECK(at::equal(aliases[k], sources[k]));
  }

  SECTION("bound copies are overwritten in place, also under grad mode: the caller keeps its tensors") {
    REQUIRE(c10::GradMode::is_enabled());
    const auto memory = aliases[0].const_data_ptr();
    a.mul_(3.0);
    REQUIRE(copies.refresh(sources));
    CHECK(aliases[0].const_data_ptr() == memory);
    CHECK(copies.copies()[0].const_data_ptr() == memory);
    CHECK(at::equal(aliases[0], a));
  }
  SECTION("a write through an alias is undone by the next refresh") {
    // set_data keeps the alias's own version counter, so only the alias's version records this write.
    aliases[1].fill_(5.0);
    CHECK(at::equal(copies.copies()[1], at::full({4}, 5.0)));
    REQUIRE(copies.refresh(sources));
    CHECK(at::equal(aliases[1], b));
    CHECK(at::equal(aliases[0], a));
  }
  SECTION("a source change reaches the aliases") {
    a.mul_(2.0);
    REQUIRE(copies.refresh(sources));
    CHECK(at::equal(aliases[0], a));
  }
  SECTION("bind checks the count") {
    REQUIRE_THROWS_AS(copies.bind({at::zeros({2, 3})}), c10::Error);
    REQUIRE_THROWS_WITH(copies.bind({at::zeros({2, 3})}), Contains("expected 2 tensors, got 1"));
  }
}
