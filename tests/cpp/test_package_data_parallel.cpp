// torch_dp::PackageDataParallel against one AOTIModelPackageLoader on the whole batch, over CPU device lists, and
// its errors. The package is written by examples/python/export_model.py; scripts/test.sh writes it and names its
// folder in TORCH_DP_EXPORTED_DIR (scripts/gpu_check.sh: a CUDA package in TORCH_DP_EXPORTED_CUDA_DIR).
#include "helpers.h"

#include <torch_dp/package_data_parallel.h>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

using tdp_test::Contains;
using tdp_test::cpus;
using tdp_test::error_of;
using tdp_test::exported_dir;

namespace {

std::string cpu_package() {
  auto path = exported_dir("TORCH_DP_EXPORTED_DIR", "cpu") + "/model.pt2";
  REQUIRE(std::filesystem::exists(path));
  return path;
}

/// The package's model on the whole batch: one loader, no torch_dp.
at::Tensor unwrapped(const std::string& path, const at::Tensor& input, c10::DeviceIndex index = -1) {
  torch::inductor::AOTIModelPackageLoader loader(path, "model", false, 1, index);
  auto outputs = loader.run({input});
  REQUIRE(outputs.size() == 1);
  return outputs[0];
}

torch_dp::DataParallelOptions options_for(std::vector<c10::Device> devices) {
  return torch_dp::DataParallelOptions(std::move(devices));
}

bool same(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.device() == b.device() && at::allclose(a, b, 1e-5, 1e-6);
}

}  // namespace

TEST_CASE("PackageDataParallel: 1, 2 and 3 CPU replicas match one loader on the whole batch", "[package]") {
  const auto path = cpu_package();
  for (size_t replicas : {1, 2, 3}) {
    torch_dp::PackageDataParallel parallel(path, options_for(cpus(replicas)));
    CHECK(parallel.devices().size() == replicas);
    CHECK(parallel.package_device_type() == c10::kCPU);
    for (int64_t batch : {10, 7, 1}) {  // uneven over 2 and 3; 1 row: fewer rows than replicas
      auto input = torch::randn({batch, 8});
      auto expected = unwrapped(path, input);
      auto output = parallel.forward(input);
      INFO("replicas " << replicas << ", batch " << batch);
      CHECK(same(output, expected));
      auto flat = parallel.forward(std::vector<at::Tensor>{input});
      REQUIRE(flat.size() == 1);
      CHECK(same(flat[0], expected));
    }
  }
}

TEST_CASE("PackageDataParallel: rows reach the replica their chunk belongs to, in order", "[package]") {
  // Rows that differ only in their position: a gather in the wrong order or a chunk given to the wrong replica
  // would move them.
  const auto path = cpu_package();
  torch_dp::PackageDataParallel parallel(path, options_for(cpus(3)));
  auto input = torch::arange(0, 11 * 8, torch::kFloat32).reshape({11, 8}) / 10.0;
  CHECK(same(parallel.forward(input), unwrapped(path, input)));
}

TEST_CASE("PackageDataParallel: chunk_sizes with a 0 runs no replica there", "[package]") {
  const auto path = cpu_package();
  auto options = options_for(cpus(3));
  // Unlike DataParallel's, the first device may be given 0 rows too: no loader is the model itself.
  auto sizes = GENERATE(std::vector<int64_t>{4, 0, 6}, std::vector<int64_t>{0, 4, 6}, std::vector<int64_t>{0, 0, 10});
  options.chunk_sizes(sizes);
  torch_dp::PackageDataParallel parallel(path, options);
  auto input = torch::randn({10, 8});
  CHECK(same(parallel.forward(input), unwrapped(path, input)));
  // A batch that does not add up to the chunk sizes is refused.
  CHECK_THROWS(parallel.forward(torch::randn({9, 8})));
}

TEST_CASE("PackageDataParallel: the loaders are made once and kept between calls", "[package]") {
  const auto path = cpu_package();
  torch_dp::PackageDataParallel parallel(path, options_for(cpus(2)));
  CHECK(parallel.num_loads() == 2);
  auto input = torch::randn({6, 8});
  auto expected = unwrapped(path, input);
  for (int call = 0; call < 5; ++call) {
    CHECK(same(parallel.forward(input), expected));
  }
  CHECK(parallel.num_loads() == 2);
  auto copy = parallel;  // a handle: shares the loaders
  copy.forward(input);
  CHECK(parallel.num_loads() == 2);
}

TEST_CASE("PackageDataParallel: output_device, and the package's metadata and call spec", "[package]") {
  const auto path = cpu_package();
  torch_dp::PackageDataParallel parallel(path, options_for(cpus(2)));
  CHECK(parallel.output_device().is_cpu());
  CHECK(parallel.metadata().at("AOTI_DEVICE_KEY") == "cpu");
  CHECK(parallel.call_spec().size() == 2);
  // No devices: a CPU package runs on the CPU.
  torch_dp::PackageDataParallel single(path);
  REQUIRE(single.devices().size() == 1);
  CHECK(single.devices()[0].is_cpu());
}

TEST_CASE("PackageDataParallel: inference only; an input that requires grad is refused under grad mode", "[package]") {
  const auto path = cpu_package();
  torch_dp::PackageDataParallel parallel(path, options_for(cpus(2)));
  auto input = torch::randn({4, 8}).requires_grad_();
  CHECK_THROWS_WITH(parallel.forward(input), Contains("inference only"));
  {
    torch::NoGradGuard no_grad;
    auto output = parallel.forward(input);
    CHECK_FALSE(output.requires_grad());
    CHECK(same(output, unwrapped(path, input.detach())));
  }
  // Inputs that do not require grad run under grad mode too; the output never requires grad.
  CHECK_FALSE(parallel.forward(torch::randn({4, 8})).requires_grad());
}

TEST_CASE("PackageDataParallel: a failing replica is a ReplicaError naming it", "[package]") {
  const auto path = cpu_package();
  torch_dp::PackageDataParallel parallel(path, options_for(cpus(2)));
  try {
    parallel.forward(torch::randn({4, 8}, torch::kFloat64));  // the package was compiled for float32
    FAIL("expected a ReplicaError");
  } catch (const torch_dp::ReplicaError& error) {
    CHECK(error.replica() == 0);
    CHECK_THAT(std::string(error.what()), Contains("in replica 0 on device cpu"));
    CHECK_THAT(std::string(error.what()), Contains("Float"));
  }
}

TEST_CASE("PackageDataParallel: a missing file, a file that is not a package", "[package]") {
  const auto dir = std::filesystem::temp_directory_path() / "torch_dp_package_test";
  std::filesystem::create_directories(dir);
  const auto missing = (dir / "missing.pt2").string();
  std::filesystem::remove(missing);
  auto text = error_of([&] { torch_dp::PackageDataParallel(missing, options_for(cpus(2))); });
  CHECK_THAT(text, Contains("no file at '" + missing + "'"));
  CHECK_THAT(text, Contains("expected an AOTInductor package"));

  const auto garbage = (dir / "garbage.pt2").string();
  std::ofstream(garbage) << "not a zip archive";
  text = error_of([&] { torch_dp::PackageDataParallel(garbage, options_for(cpus(2))); });
  CHECK_THAT(text, Contains("'" + garbage + "' is not an AOTInductor package"));

  // A TorchScript file is a zip archive too, without a compiled model in it.
  const auto script = exported_dir("TORCH_DP_EXPORTED_DIR", "cpu") + "/model.pt";
  text = error_of([&] { torch_dp::PackageDataParallel(script, options_for(cpus(2))); });
  CHECK_THAT(text, Contains("is not an AOTInductor package"));
  CHECK_THAT(text, Contains("ScriptDataParallel"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("PackageDataParallel: CUDA devices for a CPU package are refused before anything is loaded", "[package]") {
  // Runs on a CPU-only machine too: the check reads the package's metadata and compares device types, so no CUDA
  // call is made.
  const auto path = cpu_package();
  auto text = error_of([&] {
    torch_dp::PackageDataParallel(path, options_for({c10::Device(c10::kCUDA, 0), c10::Device(c10::kCUDA, 1)}));
  });
  CHECK_THAT(text, Contains("was compiled for cpu"));
  CHECK_THAT(text, Contains("cuda:0"));
  // A list that mixes device types names the first one that does not fit.
  text = error_of(
      [&] { torch_dp::PackageDataParallel(path, options_for({c10::Device(c10::kCPU), c10::Device(c10::kCUDA, 0)})); });
  CHECK_THAT(text, Contains("was compiled for cpu, but the devices asked for include cuda:0"));
}

TDP_CUDA_TEST_CASE(
    "PackageDataParallel: a CUDA package over two replicas on GPU 0 and over every GPU", "[package][cuda]") {
  const auto path = exported_dir("TORCH_DP_EXPORTED_CUDA_DIR", "cuda") + "/model.pt2";
  const auto count = static_cast<c10::DeviceIndex>(torch::cuda::device_count());
  std::vector<c10::Device> devices{c10::Device(c10::kCUDA, 0), c10::Device(c10::kCUDA, 0)};  // two loaders on GPU 0
  for (c10::DeviceIndex i = 1; i < count; ++i) {
    devices.emplace_back(c10::kCUDA, i);
  }
  torch_dp::PackageDataParallel parallel(path, options_for(devices));
  CHECK(parallel.package_device_type() == c10::kCUDA);
  CHECK(parallel.num_loads() == devices.size());
  for (int64_t batch : {10, 7, 1}) {
    auto input = torch::randn({batch, 8}, torch::kCUDA);
    auto expected = unwrapped(path, input, 0);
    for (int call = 0; call < 3; ++call) {
      CHECK(same(parallel.forward(input), expected));
    }
  }
  // Gathered on the CPU when asked.
  auto options = options_for(devices);
  options.output_device(c10::Device(c10::kCPU));
  torch_dp::PackageDataParallel to_cpu(path, options);
  auto input = torch::randn({5, 8}, torch::kCUDA);
  CHECK(same(to_cpu.forward(input), unwrapped(path, input, 0).cpu()));
  CHECK(parallel.num_loads() == devices.size());
}

TDP_CUDA_TEST_CASE(
    "PackageDataParallel: a CUDA package on CPU devices is refused, naming both types", "[package][cuda]") {
  const auto path = exported_dir("TORCH_DP_EXPORTED_CUDA_DIR", "cuda") + "/model.pt2";
  auto text = error_of([&] { torch_dp::PackageDataParallel(path, options_for(cpus(2))); });
  CHECK_THAT(text, Contains("was compiled for cuda, but the devices asked for include cpu"));
}
