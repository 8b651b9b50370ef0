// Tests for torch_dp::DataParallel, on CPU replica lists: how a batch is split over the replicas. Fewer replicas
// for a small batch, chunk_sizes (a size of 0 runs no replica), and a tensor holding one value per replica cut to
// the replicas that run. Tensor arguments giving different chunk counts: test_data_parallel_errors.cpp.

#include "helpers.h"

#include <torch_dp/torch_dp.h>

#include <cstdint>
#include <tuple>
#include <vector>

using tdp_test::clone_of;
using tdp_test::close64;
using tdp_test::Contains;
using tdp_test::cpus;
using tdp_test::f64;
using tdp_test::IValueModule;
using tdp_test::make_net;
using tdp_test::NetImpl;
using tdp_test::same_grads;
using tdp_test::same_parameters;
using tdp_test::TwoInTwoOut;
using torch::Tensor;

namespace {

// `steps` SGD steps of dp (wrapping `net`) and of `reference` (an unwrapped clone of net) side by side on batches of
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
    REQUIRE(close64(out, expected));
    out.pow(2).sum().backward();
    expected.pow(2).sum().backward();
    REQUIRE(same_grads(net, reference));
    optim.step();
    optim_ref.step();
  }
  CHECK(same_parameters(net, reference));
}

}  // namespace

TEST_CASE("DataParallel: a batch smaller than the device list uses fewer replicas", "[data_parallel]") {
  auto net = make_net();
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(4)));
  for (int64_t rows : {1, 2, 3, 5, 4}) {
    CAPTURE(rows);
    auto input = torch::randn({rows, 10}, f64);
    auto out = dp->forward(input);
    CHECK(close64(out, net->forward(input)));
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
  torch_dp::DataParallel counted(rows, torch_dp::DataParallelOptions(cpus(3)).chunk_sizes(sizes));
  CHECK(close64(
      counted->forward(torch::randn({7, 10}, f64)), torch::tensor({1., 4., 4., 4., 4., 2., 2.}, f64).unsqueeze(1)));

  torch::manual_seed(21);
  auto net = make_net();
  auto reference = clone_of(net);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(3)).chunk_sizes(sizes));
  check_trains_like(dp, *net, *reference, 7, 2);
  // Any other batch size is an error naming the sizes, before any replica runs.
  CHECK_THROWS_WITH(
      dp->forward(torch::randn({8, 10}, f64)),
      Contains("the chunk sizes add up to 7 but the tensor has 8 elements along dim 0"));
}

// Note [Which tensors set the batch] (python/torch_dp/scatter_gather.py): as upstream, a tensor that holds one value
// per replica (expanded, or one equal row per device, as Hugging Face's Trainer passes num_items_in_batch) is cut to
// the replicas the batch runs; rows of any other tensor are never dropped.
TEST_CASE("DataParallel: a tensor holding one value per replica is cut to the batch", "[data_parallel]") {
  torch::manual_seed(31);
  TwoInTwoOut module;
  auto reference = clone_of(module);
  SECTION("expanded, 1 row on 2 devices") {
    torch_dp::DataParallel dp(module, torch_dp::DataParallelOptions(cpus(2)));
    auto a = torch::randn({1, 3}, f64);
    auto b = torch::randn({1, 3}, f64).expand({2, 3});
    auto [y, rows] = dp->forward_as<std::tuple<Tensor, Tensor>>(a, b, 2.0);
    auto [y_ref, rows_ref] = reference->forward(a, b.narrow(0, 0, 1), 2.0);
    CHECK(close64(y, y_ref));
    CHECK(close64(rows, rows_ref));
  }
  SECTION("equal rows, one per device, 9 rows on 4 devices (3 chunks)") {
    torch_dp::DataParallel dp(module, torch_dp::DataParallelOptions(cpus(4)));
    auto a = torch::randn({9, 3}, f64);
    auto b = torch::randn({1, 3}, f64).expand({4, 3}).contiguous();
    auto [y, rows] = dp->forward_as<std::tuple<Tensor, Tensor>>(a, b, 1.0);
    auto [y_ref, rows_ref] = reference->forward(a, b.narrow(0, 0, 1), 1.0);
    CHECK(close64(y, y_ref));
    CHECK(close64(rows, rows_ref));
    y.sum().backward();
    y_ref.sum().backward();
    CHECK(close64(module->w.grad(), reference->w.grad()));
  }
  SECTION("inside an IValue") {
    IValueModule ivalue_module;
    auto ivalue_reference = clone_of(ivalue_module);
    torch_dp::DataParallel dp(ivalue_module, torch_dp::DataParallelOptions(cpus(3)));
    auto a = torch::randn({2, 3}, f64);
    auto b = torch::randn({1, 3}, f64).expand({3, 3});
    auto out = dp->forward_as<c10::IValue>(c10::IValue(c10::ivalue::Tuple::create({c10::IValue(a), c10::IValue(b)})));
    auto expected = ivalue_reference->forward(
        c10::IValue(c10::ivalue::Tuple::create({c10::IValue(a), c10::IValue(b.narrow(0, 0, 2))})));
    CHECK(close64(out.toTupleRef().elements()[0].toTensor(), expected.toTupleRef().elements()[0].toTensor()));
    CHECK(close64(
        out.toTupleRef().elements()[1].toGenericDict().at("sum").toTensor(),
        expected.toTupleRef().elements()[1].toGenericDict().at("sum").toTensor()));
  }
  SECTION("distinct rows are never dropped") {
    torch_dp::DataParallel dp(module, torch_dp::DataParallelOptions(cpus(2)));
    auto call = [&] {
      dp->forward_as<std::tuple<Tensor, Tensor>>(torch::randn({1, 3}, f64), torch::randn({2, 3}, f64), 1.0);
    };
    CHECK_THROWS_WITH(
        call(), Contains("tensor argument 0 of shape [1, 3] -> 1 chunks; tensor argument 1 of shape [2, 3] -> 2 "
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
  torch_dp::DataParallel counted(rows, torch_dp::DataParallelOptions(cpus(4)).chunk_sizes({{3, 0, 2, 0}}));
  CHECK(close64(counted->forward(torch::randn({5, 10}, f64)), torch::tensor({3., 3., 3., 2., 2.}, f64).unsqueeze(1)));

  torch::manual_seed(32);
  auto net = make_net();
  auto reference = clone_of(net);
  torch_dp::DataParallel dp(net, torch_dp::DataParallelOptions(cpus(3)).chunk_sizes({{4, 0, 3}}));
  check_trains_like(dp, *net, *reference, 7, 2);
  // A tensor holding one value per replica gives each replica that runs its device's row.
  TwoInTwoOut module;
  torch_dp::DataParallel two(module, torch_dp::DataParallelOptions(cpus(3)).chunk_sizes({{2, 0, 1}}));
  auto a = torch::randn({3, 3}, f64);
  auto b = torch::randn({1, 3}, f64).expand({3, 3});
  auto [y, sums] = two->forward_as<std::tuple<Tensor, Tensor>>(a, b, 1.0);
  auto [y_ref, sums_ref] = module->forward(a, b.narrow(0, 0, 1), 1.0);
  CHECK(close64(y, y_ref));

  CHECK_THROWS_WITH(
      torch_dp::DataParallel(make_net(), torch_dp::DataParallelOptions(cpus(2)).chunk_sizes({{0, 4}})),
      Contains("the first chunk size must not be 0, but got [0, 4]"));
  CHECK_THROWS_WITH(
      torch_dp::DataParallel(make_net(), torch_dp::DataParallelOptions(cpus(2)).chunk_sizes({{4, -1}})),
      Contains("chunk sizes must be non-negative, but chunk 1 has size -1"));
}
