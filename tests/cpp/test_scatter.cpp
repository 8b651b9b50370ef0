// Tests for include/torch_dp/scatter.h: chunk sizes, explicit sizes, views, dims, errors, autograd.

#include "helpers.h"

#include <torch_dp/scatter.h>

#include <torch/torch.h>

#include <vector>

using tdp_test::Contains;
using tdp_test::cpus;
using V = std::vector<int64_t>;

TEST_CASE("chunk_sizes follows torch.chunk", "[scatter]") {
  struct Row {
    int64_t size;
    int64_t chunks;
    V expected;
  };
  const std::vector<Row> table = {
      {30, 4, {8, 8, 8, 6}},
      {10, 4, {3, 3, 3, 1}},
      {6, 4, {2, 2, 2}},  // fewer chunks than devices, as torch.chunk gives
      {30, 8, {4, 4, 4, 4, 4, 4, 4, 2}},
      {10, 8, {2, 2, 2, 2, 2}},
      {30, 2, {15, 15}},
      {30, 3, {10, 10, 10}},
      {0, 3, {0, 0, 0}},
      {1, 4, {1}},
      {7, 1, {7}},
  };
  REQUIRE(table.size() == 10);
  for (const auto& row : table) {
    INFO("size " << row.size << " over " << row.chunks << " chunks");
    CHECK(torch_dp::chunk_sizes(row.size, row.chunks) == row.expected);
    // Cross-check against torch.chunk itself.
    const auto reference = at::arange(row.size).chunk(row.chunks);
    V from_torch;
    for (const auto& c : reference) {
      from_torch.push_back(c.size(0));
    }
    CHECK(torch_dp::chunk_sizes(row.size, row.chunks) == from_torch);
  }
}

TEST_CASE("chunk_sizes rejects a non-positive number of chunks and a negative size", "[scatter][errors]") {
  REQUIRE_THROWS_AS(torch_dp::chunk_sizes(5, 0), c10::Error);
  REQUIRE_THROWS_WITH(torch_dp::chunk_sizes(5, 0), Contains("number of chunks must be positive"));
  REQUIRE_THROWS_WITH(torch_dp::chunk_sizes(-1, 2), Contains("size must be non-negative"));
}

TEST_CASE("scatter without sizes splits like torch.chunk and copies nothing on the input's device", "[scatter]") {
  const auto input = at::randn({30, 5});
  for (int64_t n : {1, 2, 3, 4, 8}) {
    INFO(n << " devices");
    const auto chunks = torch_dp::scatter(input, cpus(n));
    const auto expected = torch_dp::chunk_sizes(30, n);
    REQUIRE(chunks.size() == expected.size());
    int64_t offset = 0;
    for (size_t i = 0; i < chunks.size(); ++i) {
      CHECK(chunks[i].sizes() == at::IntArrayRef({expected[i], 5}));
      CHECK(at::equal(chunks[i], input.narrow(0, offset, expected[i])));
      offset += expected[i];
    }
  }
  // 6 rows over 4 devices: three chunks, only the first three devices are used.
  const auto six = torch_dp::scatter(at::randn({6, 2}), cpus(4));
  REQUIRE(six.size() == 3);
  for (const auto& c : six) {
    CHECK(c.size(0) == 2);
  }
}

TEST_CASE("scatter with explicit sizes", "[scatter]") {
  const auto input = at::randn({10, 3});
  SECTION("uneven sizes") {
    const auto chunks = torch_dp::scatter(input, cpus(3), V{2, 5, 3});
    REQUIRE(chunks.size() == 3);
    CHECK(at::equal(chunks[0], input.narrow(0, 0, 2)));
    CHECK(at::equal(chunks[1], input.narrow(0, 2, 5)));
    CHECK(at::equal(chunks[2], input.narrow(0, 7, 3)));
  }
  SECTION("empty chunks are allowed and kept, one per device") {
    const auto chunks = torch_dp::scatter(input, cpus(3), V{0, 10, 0});
    REQUIRE(chunks.size() == 3);
    CHECK(chunks[0].sizes() == at::IntArrayRef({0, 3}));
    CHECK(at::equal(chunks[1], input));
    CHECK(chunks[2].sizes() == at::IntArrayRef({0, 3}));
  }
  SECTION("along dim 1") {
    const auto chunks = torch_dp::scatter(input, cpus(2), V{1, 2}, 1);
    REQUIRE(chunks.size() == 2);
    CHECK(at::equal(chunks[0], input.narrow(1, 0, 1)));
    CHECK(at::equal(chunks[1], input.narrow(1, 1, 2)));
  }
}

TEST_CASE("scatter chunks on the input's own device are views of the input", "[scatter]") {
  const auto input = at::randn({12, 4});
  const auto chunks = torch_dp::scatter(input, cpus(3), V{5, 4, 3});
  const float* base = input.const_data_ptr<float>();
  int64_t offset = 0;
  for (const auto& c : chunks) {
    CHECK(c.storage().is_alias_of(input.storage()));
    CHECK(c.const_data_ptr<float>() == base + offset * input.stride(0));
    CHECK(c.stride(0) == input.stride(0));
    offset += c.size(0);
  }
  // A write through the input is visible in the chunks (views, not copies).
  input.fill_(3.0);
  for (const auto& c : chunks) {
    CHECK(at::equal(c, at::full_like(c, 3.0)));
  }
  // And an in-place op in a replica's forward (x.relu_(), x += 1) writes through to the input, as in PyTorch.
  chunks[1].add_(1.0);
  CHECK(at::equal(input.narrow(0, 5, 4), at::full({4, 4}, 4.0)));
  CHECK(at::equal(input.narrow(0, 0, 5), at::full({5, 4}, 3.0)));
}

TEST_CASE("scatter accepts a negative dim", "[scatter]") {
  const auto input = at::randn({4, 6, 2});
  const auto last = torch_dp::scatter(input, cpus(2), std::nullopt, -1);
  REQUIRE(last.size() == 2);
  CHECK(at::equal(last[0], input.narrow(2, 0, 1)));
  CHECK(at::equal(last[1], input.narrow(2, 1, 1)));
  const auto middle = torch_dp::scatter(input, cpus(3), std::nullopt, -2);
  REQUIRE(middle.size() == 3);
  for (size_t i = 0; i < 3; ++i) {
    CHECK(at::equal(middle[i], input.narrow(1, 2 * static_cast<int64_t>(i), 2)));
  }
  REQUIRE_THROWS_AS(torch_dp::scatter(input, cpus(2), std::nullopt, -4), c10::Error);
  REQUIRE_THROWS_AS(torch_dp::scatter(input, cpus(2), std::nullopt, 3), c10::Error);
}

TEST_CASE("scatter errors name the problem", "[scatter][errors]") {
  const auto input = at::randn({10, 3});
  const std::vector<c10::Device> none;
  REQUIRE_THROWS_AS(torch_dp::scatter(input, none), c10::Error);
  REQUIRE_THROWS_WITH(torch_dp::scatter(input, none), Contains("expected at least one device"));

  const auto scalar = at::scalar_tensor(1.0);
  REQUIRE_THROWS_AS(torch_dp::scatter(scalar, cpus(2)), c10::Error);
  REQUIRE_THROWS_WITH(torch_dp::scatter(scalar, cpus(2)), Contains("0-dim"));

  REQUIRE_THROWS_AS(torch_dp::scatter(input, cpus(3), V{2, 3, 4}), c10::Error);
  REQUIRE_THROWS_WITH(
      torch_dp::scatter(input, cpus(3), V{2, 3, 4}), Contains("chunk sizes add up to 9 but the tensor has 10"));

  REQUIRE_THROWS_AS(torch_dp::scatter(input, cpus(3), V{5, 5}), c10::Error);
  REQUIRE_THROWS_WITH(torch_dp::scatter(input, cpus(3), V{5, 5}), Contains("got 2 chunk sizes for 3 devices"));

  REQUIRE_THROWS_WITH(torch_dp::scatter(input, cpus(2), V{-1, 11}), Contains("chunk sizes must be non-negative"));

  REQUIRE_THROWS_WITH(torch_dp::scatter(at::Tensor(), cpus(2)), Contains("undefined tensor"));
}

TEST_CASE("the gradient through scatter equals the gradient without it (float64)", "[scatter][autograd]") {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const auto data = at::randn({9, 4}, options);
  const std::vector<double> weights = {0.5, -2.0, 3.25};

  auto reference_grad = [&](int64_t dim, const V& sizes) {
    auto x = data.clone().requires_grad_(true);
    const auto parts = x.split_with_sizes(sizes, dim);
    auto loss = at::zeros({}, options);
    for (size_t i = 0; i < parts.size(); ++i) {
      loss = loss + weights[i] * (parts[i] * parts[i]).sin().sum();
    }
    loss.backward();
    return x.grad();
  };

  SECTION("default sizes along dim 0") {
    auto x = data.clone().requires_grad_(true);
    const auto chunks = torch_dp::scatter(x, cpus(3));
    REQUIRE(chunks.size() == 3);
    auto loss = at::zeros({}, options);
    for (size_t i = 0; i < chunks.size(); ++i) {
      CHECK(chunks[i].requires_grad());
      loss = loss + weights[i] * (chunks[i] * chunks[i]).sin().sum();
    }
    loss.backward();
    REQUIRE(x.grad().defined());
    CHECK(tdp_test::close64(x.grad(), reference_grad(0, V{3, 3, 3})));
  }
  SECTION("explicit sizes along dim -1") {
    auto x = data.clone().requires_grad_(true);
    const auto chunks = torch_dp::scatter(x, cpus(3), V{1, 0, 3}, -1);
    auto loss = at::zeros({}, options);
    for (size_t i = 0; i < chunks.size(); ++i) {
      loss = loss + weights[i] * (chunks[i] * chunks[i]).sin().sum();
    }
    loss.backward();
    CHECK(tdp_test::close64(x.grad(), reference_grad(1, V{1, 0, 3})));
  }
  SECTION("an unused chunk gets a zero gradient") {
    auto x = data.clone().requires_grad_(true);
    const auto chunks = torch_dp::scatter(x, cpus(3));
    auto loss = (chunks[0] * 2.0).sum() + (chunks[2] * 3.0).sum();
    loss.backward();
    auto expected = at::zeros_like(data);
    expected.narrow(0, 0, 3).fill_(2.0);
    expected.narrow(0, 6, 3).fill_(3.0);
    CHECK(at::equal(x.grad(), expected));
  }
}
