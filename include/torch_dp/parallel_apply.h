#pragma once
// parallel_apply: run one task per replica, each on its device and under the caller's thread-local state and
// streams, on a WorkerPool issued by its rules (run_replicas), and the ReplicaError that names a failing replica.

#include <torch_dp/worker_pool.h>

#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>

#include <cstddef>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>

namespace torch_dp {

/// A replica's failure, rethrown by run_replicas after every replica finished.
class ReplicaError : public std::runtime_error {
 public:
  ReplicaError(size_t replica, c10::Device device, std::exception_ptr original);
  size_t replica() const { return replica_; }
  c10::Device device() const { return device_; }
  /// The exception the replica threw.
  std::exception_ptr original() const { return original_; }

 private:
  size_t replica_;
  c10::Device device_;
  std::exception_ptr original_;
};

/// Runs task(i) for each replica i, each under the caller's thread-local state (grad mode, inference mode,
/// autocast and its dtype, ...), with devices[i] as the current device and the caller's current stream for
/// devices[i] as the current stream, issued as `issuing` says. After every task finished, the first failure
/// (lowest i) is rethrown as a ReplicaError.
///
/// With `reproducible`, replicas sharing a device (and so that device's default random generator) run one after
/// another in index order on one thread, so random ops draw from the generator in the same order on every run:
/// one thread per distinct device, the first device's on the calling thread (every device's on the calling
/// thread with kSerial), and kAuto measures nothing (Note [Reproducible replicas] in parallel_apply.cpp).
void run_replicas(
    WorkerPool& pool, at::ArrayRef<c10::Device> devices, const std::function<void(size_t)>& task,
    Issuing issuing = Issuing::kAuto, bool reproducible = false);

/// How a device is named in error messages: "cpu" for the CPU, the index for accelerators (as PyTorch does).
std::string device_label(c10::Device device);

/// Where a replica failed, as PyTorch words it: "in replica 2 on device 1". ReplicaError's text is "Caught <type>
/// <where>." plus the original message; the Python package passes it to torch's ExceptionWrapper, which re-raises
/// the original exception type with the same text.
std::string replica_location(size_t replica, c10::Device device);

}  // namespace torch_dp
