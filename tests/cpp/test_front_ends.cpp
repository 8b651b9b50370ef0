// The contract every C++ front-end keeps, checked over all of them from one table: torch_dp::DataParallel over a
// torch::nn module, torch_dp::data_parallel (the functional form), torch_dp::ScriptDataParallel over a TorchScript
// module and torch_dp::PackageDataParallel over an AOTInductor package. All four serve examples/python/
// export_model.py's model with one set of weights (model.pt and model.pt2, written by scripts/test.sh), so one
// reference, the TorchScript module on the whole batch, checks them all. Where the front-ends differ by design
// (which options they take, whether the first chunk may be empty, whether they hold editable weights), the
// difference is a column of the table, not another test. Tagged [package] as every test that loads an AOTInductor
// package is: scripts/sanitize.sh runs those without LeakSanitizer (its exit-time scan crashes in such a process).
#include "helpers.h"

#include <torch_dp/data_parallel.h>
#include <torch_dp/package_data_parallel.h>
#include <torch_dp/script_data_parallel.h>

#include <torch/script.h>

#include <functional>
#include <string>
#include <thread>
#include <vector>

using tdp_test::Contains;
using tdp_test::cpus;
using tdp_test::error_of;
using tdp_test::exported_dir;

namespace {

using Call = std::function<at::Tensor(const at::Tensor&)>;

struct Made {
  Call call;
  std::function<void(double)> add_to_last_bias;  // edits the weights the front-end runs; empty: none it holds
};

struct FrontEnd {
  std::string name;
  std::function<Made(const torch_dp::DataParallelOptions&)> make;
  bool takes_options;             // chunk_sizes and issuing (the functional form takes devices, output, dim)
  bool first_chunk_may_be_empty;  // no replica is the module itself (Note [Empty chunks])
};

std::string script_path() {
  return exported_dir("TORCH_DP_EXPORTED_DIR", "cpu") + "/model.pt";
}

std::string package_path() {
  return exported_dir("TORCH_DP_EXPORTED_DIR", "cpu") + "/model.pt2";
}

/// export_model.py's Model (Linear(8, 16), ReLU, Linear(16, 4)) as a torch::nn module, with model.pt's weights.
torch::nn::Sequential eager_model() {
  torch::nn::Sequential model(torch::nn::Linear(8, 16), torch::nn::ReLU(), torch::nn::Linear(16, 4));
  auto script = torch::jit::load(script_path());
  std::vector<at::Tensor> weights;
  for (const auto& parameter : script.parameters()) {  // fc1.weight, fc1.bias, fc2.weight, fc2.bias
    weights.push_back(parameter);
  }
  auto parameters = model->parameters();  // 0.weight, 0.bias, 2.weight, 2.bias
  REQUIRE(parameters.size() == weights.size());
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < parameters.size(); ++i) {
    parameters[i].copy_(weights[i]);
  }
  return model;
}

/// Adds `value` to the last bias of an eager model, in place: the edit of the weights a user makes between calls.
std::function<void(double)> add_to_last_bias(torch::nn::Sequential model) {
  return [model](double value) {
    torch::NoGradGuard no_grad;
    model->parameters().back().add_(value);
  };
}

std::vector<FrontEnd> front_ends() {
  return {
      {"DataParallel",
       [](const torch_dp::DataParallelOptions& options) {
         auto model = eager_model();
         auto parallel = torch_dp::DataParallel(model, options);
         return Made{[parallel](const at::Tensor& x) mutable { return parallel->forward(x); }, add_to_last_bias(model)};
       },
       true, false},
      {"data_parallel",
       [](const torch_dp::DataParallelOptions& options) {
         auto model = eager_model();
         return Made{
             [model, options](const at::Tensor& x) {
               return torch_dp::data_parallel(model, x, options.devices(), options.output_device(), options.dim());
             },
             add_to_last_bias(model)};
       },
       false, false},
      {"ScriptDataParallel",
       [](const torch_dp::DataParallelOptions& options) {
         torch_dp::ScriptDataParallel parallel(torch::jit::load(script_path()), options);
         return Made{
             [parallel](const at::Tensor& x) mutable { return parallel.forward(x); },
             [parallel](double value) {
               torch::NoGradGuard no_grad;
               parallel.parameters().back().add_(value);
             }};
       },
       true, false},
      {"PackageDataParallel",
       [](const torch_dp::DataParallelOptions& options) {
         auto parallel = std::make_shared<torch_dp::PackageDataParallel>(package_path(), options);
         return Made{[parallel](const at::Tensor& x) { return parallel->forward(x); }, {}};
       },
       true, true},
  };
}

at::Tensor reference(const at::Tensor& input) {
  static auto module = torch::jit::load(script_path());
  torch::NoGradGuard no_grad;
  return module.forward({input}).toTensor();
}

bool close(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.device() == b.device() && at::allclose(a, b, 1e-5, 1e-6);
}

torch_dp::DataParallelOptions cpu_options(size_t replicas) {
  return torch_dp::DataParallelOptions(cpus(replicas));
}

}  // namespace

TEST_CASE(
    "Every front-end: the module on the whole batch, over 1 to 3 replicas and 1 to 10 rows", "[front_ends][package]") {
  for (const auto& front_end : front_ends()) {
    for (size_t replicas : {1, 2, 3}) {
      auto made = front_end.make(cpu_options(replicas));
      for (int64_t rows : {1, 2, 7, 10}) {
        INFO(front_end.name << ", " << replicas << " replicas, " << rows << " rows");
        auto input = torch::randn({rows, 8});
        torch::NoGradGuard no_grad;
        CHECK(close(made.call(input), reference(input)));
      }
    }
  }
}

TEST_CASE(
    "Every front-end that takes chunk sizes: the same output, and a batch that does not fit refused",
    "[front_ends][package]") {
  for (const auto& front_end : front_ends()) {
    if (!front_end.takes_options) {
      continue;
    }
    for (const auto& sizes : std::vector<std::vector<int64_t>>{{3, 7}, {4, 0, 6}, {10, 0, 0}, {1, 1, 8}}) {
      INFO(front_end.name << ", chunk sizes " << sizes.size() << " long, first " << sizes[0]);
      auto options = cpu_options(sizes.size());
      options.chunk_sizes(sizes);
      auto made = front_end.make(options);
      torch::NoGradGuard no_grad;
      auto input = torch::randn({10, 8});
      CHECK(close(made.call(input), reference(input)));
      CHECK_THROWS_WITH(made.call(torch::randn({9, 8})), Contains("chunk sizes add up to 10"));
    }
  }
}

TEST_CASE("An empty first chunk: refused where the first replica is the module itself", "[front_ends][package]") {
  for (const auto& front_end : front_ends()) {
    if (!front_end.takes_options) {
      continue;
    }
    INFO(front_end.name);
    auto options = cpu_options(3);
    options.chunk_sizes(std::vector<int64_t>{0, 4, 6});
    if (!front_end.first_chunk_may_be_empty) {
      CHECK_THAT(error_of([&] { front_end.make(options); }), Contains("the first chunk size must not be 0"));
      continue;
    }
    auto made = front_end.make(options);
    torch::NoGradGuard no_grad;
    auto input = torch::randn({10, 8});
    CHECK(close(made.call(input), reference(input)));
  }
}

TEST_CASE("Every issuing gives the same output", "[front_ends][package]") {
  for (const auto& front_end : front_ends()) {
    if (!front_end.takes_options) {
      continue;
    }
    for (auto issuing : {torch_dp::Issuing::kThreads, torch_dp::Issuing::kSerial, torch_dp::Issuing::kAuto}) {
      INFO(front_end.name << ", issuing " << static_cast<int>(issuing));
      auto options = cpu_options(3);
      options.issuing(issuing);
      auto made = front_end.make(options);
      torch::NoGradGuard no_grad;
      for (int call = 0; call < 3; ++call) {  // kAuto times both ways over its first calls
        auto input = torch::randn({11, 8});
        CHECK(close(made.call(input), reference(input)));
      }
    }
  }
}

TEST_CASE("Calls from four threads at once each get their own batch's output", "[front_ends][package]") {
  for (const auto& front_end : front_ends()) {
    INFO(front_end.name);
    auto made = front_end.make(cpu_options(2));
    std::vector<at::Tensor> inputs;
    std::vector<at::Tensor> outputs(4);
    for (int64_t i = 0; i < 4; ++i) {
      inputs.push_back(torch::randn({5 + i, 8}));
    }
    tdp_test::require_finishes(
        [&] {
          std::vector<std::thread> threads;
          for (size_t i = 0; i < inputs.size(); ++i) {
            threads.emplace_back([&, i] {
              torch::NoGradGuard no_grad;
              for (int call = 0; call < 5; ++call) {
                outputs[i] = made.call(inputs[i]);
              }
            });
          }
          for (auto& thread : threads) {
            thread.join();
          }
        },
        "four threads calling one front-end");
    for (size_t i = 0; i < inputs.size(); ++i) {
      CHECK(close(outputs[i], reference(inputs[i])));
    }
  }
}

TEST_CASE("Weights edited between calls are seen by every replica", "[front_ends][package]") {
  for (const auto& front_end : front_ends()) {
    auto made = front_end.make(cpu_options(3));
    if (!made.add_to_last_bias) {
      continue;  // a package's weights are compiled in
    }
    INFO(front_end.name);
    torch::NoGradGuard no_grad;
    auto input = torch::randn({9, 8});
    CHECK(close(made.call(input), reference(input)));
    made.add_to_last_bias(1.0);
    CHECK(close(made.call(input), reference(input) + 1.0));
  }
}

TEST_CASE("The same error for the same mistake, before anything runs", "[front_ends][package]") {
  struct Mistake {
    std::function<void(torch_dp::DataParallelOptions&)> make;
    std::string message;
  };
  const std::vector<Mistake> mistakes = {
      {[](auto& options) { options.chunk_sizes(std::vector<int64_t>{1, 2, 3}); },
       "expected one chunk size per device (2 devices), but got 3 chunk sizes"},
      {[](auto& options) { options.chunk_sizes(std::vector<int64_t>{5, -1}); },
       "chunk sizes must be non-negative, but chunk 1 has size -1"},
  };
  for (const auto& front_end : front_ends()) {
    if (!front_end.takes_options) {
      continue;
    }
    for (const auto& mistake : mistakes) {
      INFO(front_end.name << ": " << mistake.message);
      auto options = cpu_options(2);
      mistake.make(options);
      CHECK_THAT(error_of([&] { front_end.make(options); }), Contains(mistake.message));
    }
  }
}
