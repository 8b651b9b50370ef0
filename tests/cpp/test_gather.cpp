// Tests for include/torch_dp/gather.h: shapes, values, errors, scalars, identity, memory format, autograd.

#include "helpers.h"

#include <torch_dp/gather.h>
#include <torch_dp/scatter.h>

#include <torch/torch.h>

#include <string>
#include <vector>

using tdp_test::Contains;
using tdp_test::cpus;
using tdp_test::kCpu;

namespace {

struct CollectWarnings : public c10::WarningHandler {
  void process(const c10::Warning& warning) override { messages.push_back(warning.msg()); }
  std::vector<std::string> messages;
};

}  // namespace

TEST_CASE("gather concatenates like at::cat along dim 0, 1 and -1", "[gather]") {
  SECTION("dim 0") {
    const std::vector<at::Tensor> parts = {at::randn({2, 3}), at::randn({4, 3}), at::randn({1, 3})};
    const auto out = torch_dp::gather(parts, kCpu, 0);
    CHECK(out.sizes() == at::IntArrayRef({7, 3}));
    CHECK(at::equal(out, at::cat(parts, 0)));
    CHECK(out.device().is_cpu());
  }
  SECTION("dim 1") {
    const std::vector<at::Tensor> parts = {at::randn({3, 2}), at::randn({3, 4})};
    const auto out = torch_dp::gather(parts, kCpu, 1);
    CHECK(out.sizes() == at::IntArrayRef({3, 6}));
    CHECK(at::equal(out, at::cat(parts, 1)));
  }
  SECTION("dim -1") {
    const std::vector<at::Tensor> parts = {at::randn({2, 3, 1}), at::randn({2, 3, 5}), at::randn({2, 3, 2})};
    const auto out = torch_dp::gather(parts, kCpu, -1);
    CHECK(out.sizes() == at::IntArrayRef({2, 3, 8}));
    CHECK(at::equal(out, at::cat(parts, 2)));
  }
  SECTION("empty parts") {
    const std::vector<at::Tensor> parts = {at::randn({0, 3}), at::randn({2, 3})};
    const auto out = torch_dp::gather(parts, kCpu, 0);
    CHECK(at::equal(out, parts[1]));
  }
  SECTION("the default dim is 0") {
    const std::vector<at::Tensor> parts = {at::randn({1, 2}), at::randn({3, 2})};
    CHECK(at::equal(torch_dp::gather(parts, kCpu), at::cat(parts, 0)));
  }
}

TEST_CASE("gather errors name the problem", "[gather][errors]") {
  const std::vector<at::Tensor> none;
  REQUIRE_THROWS_AS(torch_dp::gather(none, kCpu), c10::Error);
  REQUIRE_THROWS_WITH(torch_dp::gather(none, kCpu), Contains("expected at least one tensor"));

  const std::vector<at::Tensor> ndim = {at::randn({2, 3}), at::randn({3})};
  REQUIRE_THROWS_AS(torch_dp::gather(ndim, kCpu), c10::Error);
  REQUIRE_THROWS_WITH(torch_dp::gather(ndim, kCpu), Contains("same number of dimensions"));

  const std::vector<at::Tensor> shapes = {at::randn({2, 3}), at::randn({2, 4})};
  REQUIRE_THROWS_AS(torch_dp::gather(shapes, kCpu, 0), c10::Error);
  REQUIRE_THROWS_WITH(torch_dp::gather(shapes, kCpu, 0), Contains("tensor at index 1 has invalid shape"));
  // Along dim 1 the same tensors are fine.
  CHECK(torch_dp::gather(shapes, kCpu, 1).sizes() == at::IntArrayRef({2, 7}));

  const std::vector<at::Tensor> dtypes = {at::randn({2, 3}), at::randn({2, 3}, at::kDouble)};
  REQUIRE_THROWS_AS(torch_dp::gather(dtypes, kCpu), c10::Error);
  REQUIRE_THROWS_WITH(torch_dp::gather(dtypes, kCpu), Contains("same dtype"));

  const std::vector<at::Tensor> undefined = {at::randn({2}), at::Tensor()};
  REQUIRE_THROWS_WITH(torch_dp::gather(undefined, kCpu), Contains("tensor at index 1 is undefined"));

  const std::vector<at::Tensor> bad_dim = {at::randn({2, 3}), at::randn({2, 3})};
  REQUIRE_THROWS_AS(torch_dp::gather(bad_dim, kCpu, 2), c10::Error);
}

TEST_CASE("gather turns scalars gathered on dim 0 into a vector, with a warning", "[gather]") {
  const std::vector<at::Tensor> scalars = {at::scalar_tensor(1.5), at::scalar_tensor(-2.0), at::scalar_tensor(4.25)};
  CollectWarnings warnings;
  at::Tensor out;
  {
    c10::WarningUtils::WarningHandlerGuard guard(&warnings);
    out = torch_dp::gather(scalars, kCpu, 0);
  }
  CHECK(out.dim() == 1);
  CHECK(out.size(0) == 3);
  CHECK(at::equal(out, at::stack(scalars)));
  REQUIRE(warnings.messages.size() == 1);
  CHECK_THAT(warnings.messages[0], Contains("all input tensors were scalars"));

  // Scalars cannot be concatenated along any other dim.
  REQUIRE_THROWS_WITH(torch_dp::gather(scalars, kCpu, 1), Contains("0-dim"));

  // The scalar rule is differentiable: per-replica losses gather into a vector that backpropagates.
  auto a = at::scalar_tensor(2.0, at::kDouble).requires_grad_(true);
  auto b = at::scalar_tensor(3.0, at::kDouble).requires_grad_(true);
  {
    c10::WarningUtils::WarningHandlerGuard guard(&warnings);
    const std::vector<at::Tensor> losses = {a * a, b * b};
    torch_dp::gather(losses, kCpu, 0).sum().backward();
  }
  CHECK(a.grad().item<double>() == 4.0);
  CHECK(b.grad().item<double>() == 6.0);
}

TEST_CASE("gather returns a single tensor on the destination as it is", "[gather]") {
  const auto t = at::randn({4, 2});
  const std::vector<at::Tensor> one = {t};
  const auto out = torch_dp::gather(one, kCpu, 0);
  CHECK(tdp_test::same_impl(out, t));
  CHECK(tdp_test::same_impl(torch_dp::gather(one, kCpu, -1), t));
}

TEST_CASE("gather keeps channels_last when every input is channels_last", "[gather]") {
  const auto cl = c10::MemoryFormat::ChannelsLast;
  const std::vector<at::Tensor> parts = {
      at::randn({2, 3, 4, 5}).contiguous(cl), at::randn({1, 3, 4, 5}).contiguous(cl),
      at::randn({3, 3, 4, 5}).contiguous(cl)};
  const auto out = torch_dp::gather(parts, kCpu, 0);
  CHECK(out.sizes() == at::IntArrayRef({6, 3, 4, 5}));
  CHECK(out.is_contiguous(cl));
  CHECK(at::equal(out, at::cat(parts, 0)));
}

TEST_CASE("the gradient through gather equals the gradient without it (float64)", "[gather][autograd]") {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const std::vector<at::Tensor> data = {
      at::randn({2, 3}, options), at::randn({5, 3}, options), at::randn({1, 3}, options)};
  const auto weight = at::randn({8, 3}, options);

  auto run = [&](bool use_gather) {
    std::vector<at::Tensor> leaves;
    std::vector<at::Tensor> parts;
    for (const auto& d : data) {
      leaves.push_back(d.clone().requires_grad_(true));
      parts.push_back(leaves.back().tanh());
    }
    const auto out = use_gather ? torch_dp::gather(parts, kCpu, 0) : at::cat(parts, 0);
    (out * out * weight).sum().backward();
    std::vector<at::Tensor> grads;
    for (const auto& l : leaves) {
      grads.push_back(l.grad());
    }
    return grads;
  };
  const auto ours = run(true);
  const auto reference = run(false);
  for (size_t i = 0; i < data.size(); ++i) {
    INFO("input " << i);
    REQUIRE(ours[i].defined());
    CHECK(tdp_test::close64(ours[i], reference[i]));
  }
}

TEST_CASE("double backward through scatter and gather", "[gather][scatter][autograd]") {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const auto data = at::randn({7, 3}, options);
  const auto w = at::randn({7, 3}, options);
  const auto v = at::randn({7, 3}, options);

  // loss = sum(w * x^4): grad = 4 w x^3, and d/dx sum(v * grad) = 12 v w x^2.
  auto x = data.clone().requires_grad_(true);
  const auto chunks = torch_dp::scatter(x, cpus(3));
  std::vector<at::Tensor> squared;
  for (const auto& c : chunks) {
    squared.push_back(c * c);
  }
  const auto y = torch_dp::gather(squared, kCpu, 0);
  const auto loss = (w * y * y).sum();
  const auto grad = torch::autograd::grad({loss}, {x}, {}, /*retain_graph=*/true, /*create_graph=*/true)[0];
  CHECK(tdp_test::close64(grad, 4.0 * w * data.pow(3)));
  REQUIRE(grad.requires_grad());
  const auto second = torch::autograd::grad({(v * grad).sum()}, {x})[0];
  CHECK(tdp_test::close64(second, 12.0 * v * w * data * data));
}
