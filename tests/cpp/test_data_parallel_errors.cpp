// Tests for torch_dp::DataParallel, on CPU replica lists: what a forward raises. A failing replica is rethrown
// as ReplicaError naming the lowest failing one, and tensor arguments that give different chunk counts are refused
// before any replica runs (sizes with the same chunk count are split, as upstream). chunk_sizes that do not fit
// are checked with the rest of chunk_sizes, in test_data_parallel_chunks.cpp.

#include "helpers.h"

#include <torch_dp/torch_dp.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

using tdp_test::close64;
using tdp_test::Contains;
using tdp_test::cpus;
using tdp_test::f64;
using tdp_test::TwoInTwoOut;
using torch::Tensor;

namespace {

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

}  // namespace

TEST_CASE("DataParallel: a failing replica is rethrown as ReplicaError naming the lowest one", "[data_parallel]") {
  OddFails module;
  torch_dp::DataParallel dp(module, torch_dp::DataParallelOptions(cpus(4)));
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
    CHECK_THAT(what, Contains("in replica 1 on device cpu"));
    CHECK_THAT(what, Contains("Badness! odd chunk 1"));
    CHECK_THROWS_AS(std::rethrow_exception(e.original()), std::runtime_error);
  }
  CHECK(caught);
  // The next forward works, on every replica.
  auto good = torch::tensor({0.0, 2.0, 4.0, 6.0}, f64).reshape({4, 1});
  CHECK(close64(dp->forward(good), good));
  CHECK(close64(dp->forward(good * 2), good * 2));
  // Replica 0 failing is reported as replica 0.
  try {
    dp->forward(bad + 1);
    FAIL("expected a ReplicaError");
  } catch (const torch_dp::ReplicaError& e) {
    CHECK(e.replica() == 0);
  }
}

TEST_CASE("DataParallel: tensor arguments giving different chunk counts are an error", "[data_parallel][errors]") {
  // torch.chunk splits 8 rows into 4 chunks over 4 devices but 3 rows into 3; upstream drops the extra chunk.
  TwoInTwoOut module;
  auto before = module->w.clone();
  torch_dp::DataParallel dp(module, torch_dp::DataParallelOptions(cpus(4)));
  auto call = [&] {
    dp->forward_as<std::tuple<Tensor, Tensor>>(torch::randn({8, 3}, f64), torch::randn({3, 3}, f64), 1.0);
  };
  CHECK_THROWS_WITH(
      call(), Contains("DataParallel: the tensor arguments split into different numbers of "
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
  CHECK(close64(y, torch::cat(expected_y)));
  CHECK(close64(rows, torch::cat(expected_rows)));
}
