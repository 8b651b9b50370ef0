#pragma once
// Shared by the examples: command-line options and the device list.

#include <torch/torch.h>

#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

namespace examples {

struct Options {
  int replicas = 0;  // 0: every CUDA device, or 4 CPU replicas without CUDA
  int epochs = 5;
  bool cpu = false;  // CPU replicas even where CUDA is available
};

inline Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> int {
      if (i + 1 >= argc) {
        std::cerr << arg << " needs a value\n";
        std::exit(2);
      }
      return std::atoi(argv[++i]);
    };
    if (arg == "--replicas") {
      options.replicas = value();
    } else if (arg == "--epochs") {
      options.epochs = value();
    } else if (arg == "--cpu") {
      options.cpu = true;
    } else {
      std::cerr << "usage: " << argv[0] << " [--replicas N] [--epochs N] [--cpu]\n"
                << "  --replicas N  replicas (default: every CUDA device, or 4 CPU replicas without CUDA);\n"
                << "                on CUDA, N replicas are placed on the devices round-robin\n";
      std::exit(arg == "--help" || arg == "-h" ? 0 : 2);
    }
  }
  return options;
}

/// The replicas' devices: every CUDA device (or --replicas of them, round-robin), else CPU replicas.
inline std::vector<torch::Device> devices(const Options& options) {
  std::vector<torch::Device> result;
  if (!options.cpu && torch::cuda::is_available()) {
    const int count = static_cast<int>(torch::cuda::device_count());
    const int replicas = options.replicas > 0 ? options.replicas : count;
    for (int i = 0; i < replicas; ++i) {
      result.emplace_back(torch::kCUDA, static_cast<torch::DeviceIndex>(i % count));
    }
  } else {
    result.assign(options.replicas > 0 ? options.replicas : 4, torch::Device(torch::kCPU));
  }
  return result;
}

inline std::string describe(const std::vector<torch::Device>& devices) {
  std::string text;
  for (const auto& device : devices) {
    if (!text.empty()) {
      text += ", ";
    }
    text += device.str();  // str(): never stream c10 objects ourselves
  }
  return "[" + text + "]";
}

}  // namespace examples
