#pragma once
// What the tests on distinct simulated devices share: the devices, their names in messages, and comparisons of
// tensors on any devices. Include after helpers.h.

#include "helpers.h"

#include <string>
#include <vector>

namespace tdp_test {

/// Simulated device `index` (tests/simulated_devices/README.md).
inline c10::Device sim(c10::DeviceIndex index) {
  return c10::Device(c10::DeviceType::PrivateUse1, index);
}

inline std::vector<c10::Device> sims(const std::vector<int>& indices) {
  std::vector<c10::Device> devices;
  for (int i : indices) {
    devices.push_back(sim(static_cast<c10::DeviceIndex>(i)));
  }
  return devices;
}

/// "[sim:0, sim:1]", for CAPTURE.
inline std::string names(const std::vector<c10::Device>& devices) {
  std::string result;
  for (const auto& device : devices) {
    result += (result.empty() ? "" : ", ") + device.str();
  }
  return "[" + result + "]";
}

inline bool on(const at::Tensor& tensor, c10::Device device) {
  return tensor.defined() && tensor.device() == device;
}

/// close64 for tensors on any devices: both copied to the CPU first.
inline bool close_cpu(const at::Tensor& a, const at::Tensor& b, double tol = 1e-12) {
  return a.defined() && b.defined() && close64(a.cpu(), b.cpu(), tol);
}

}  // namespace tdp_test
