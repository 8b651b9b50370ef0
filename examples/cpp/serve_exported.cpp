// Serves a model exported from Python (examples/python/export_model.py) data-parallel over the devices named on the
// command line, and prints the largest difference from the same model run unwrapped on the whole batch:
//   an AOTInductor package (.pt2) with torch_dp::PackageDataParallel, against one AOTIModelPackageLoader;
//   a TorchScript file (.pt) with torch_dp::ScriptDataParallel, against the loaded module itself.
// Exits with status 1 if the difference is larger than float32 rounding.
//
//   python examples/python/export_model.py exported/
//   ./serve_exported exported/model.pt2 cpu cpu
//   ./serve_exported exported/model.pt cpu cpu cpu --batch 11
//   ./serve_exported exported_cuda/model.pt2 cuda:0 cuda:1    (a package compiled with --device cuda)

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/torch.h>
#include <torch_dp/package_data_parallel.h>
#include <torch_dp/script_data_parallel.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

namespace {

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

[[noreturn]] void usage(const char* program, int status) {
  std::cerr << "usage: " << program << " MODEL.pt2|MODEL.pt [DEVICE ...] [--batch N] [--features N]\n"
            << "  DEVICE      cpu, cuda:0, ... one replica each, repeats allowed (default: cpu cpu)\n"
            << "  --batch     rows in the batch (default 10)\n"
            << "  --features  columns of the input (default 8, export_model.py's model)\n";
  std::exit(status);
}

}  // namespace

int main(int argc, char** argv) {
  std::string path;
  std::vector<torch::Device> devices;
  int64_t batch = 10, features = 8;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      usage(argv[0], 0);
    } else if (arg == "--batch" || arg == "--features") {
      if (i + 1 >= argc) {
        usage(argv[0], 2);
      }
      (arg == "--batch" ? batch : features) = std::atoll(argv[++i]);
    } else if (path.empty()) {
      path = arg;
    } else {
      devices.emplace_back(arg);
    }
  }
  if (path.empty()) {
    usage(argv[0], 2);
  }
  if (devices.empty()) {
    devices.assign(2, torch::Device(torch::kCPU));
  }
  torch::manual_seed(0);
  torch::NoGradGuard no_grad;  // inference
  const auto input = torch::randn({batch, features}).to(devices.front());
  torch_dp::DataParallelOptions options(devices);

  try {
    torch::Tensor output, expected;
    if (ends_with(path, ".pt2")) {
      torch_dp::PackageDataParallel parallel(path, options);
      output = parallel.forward(input);
      const auto device = devices.front();
      torch::inductor::AOTIModelPackageLoader loader(path, "model", false, 1, device.is_cpu() ? -1 : device.index());
      expected = loader.run({input}).at(0);
    } else if (ends_with(path, ".pt")) {
      auto module = torch::jit::load(path, devices.front());
      module.eval();
      torch_dp::ScriptDataParallel parallel(module, options);
      output = parallel.forward(std::vector<c10::IValue>{input}).toTensor();
      expected = module.forward({input}).toTensor();
    } else {
      std::cerr << path << ": expected an AOTInductor package (.pt2) or a TorchScript file (.pt)\n";
      return 2;
    }
    const double difference = (output.cpu() - expected.cpu()).abs().max().item<double>();
    std::printf(
        "%s over %zu replicas: output %ld x %ld, max difference from the unwrapped model %.3g\n", path.c_str(),
        devices.size(), static_cast<long>(output.size(0)), static_cast<long>(output.size(1)), difference);
    return difference <= 1e-5 ? 0 : 1;
  } catch (const std::exception& error) {
    std::cerr << "serve_exported: " << error.what() << "\n";
    return 1;
  }
}
