#pragma once
// parallel_apply: run one task per replica on persistent worker threads (run_replicas).

#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>

#include <chrono>
#include <cstddef>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace torch_dp {

/// How run_replicas runs the replicas of one call (Note [Issuing replicas] in parallel_apply.cpp).
enum class Issuing {
  /// Replicas on several devices: kThreads. Replicas sharing one device: whichever of kThreads and kSerial
  /// gave the shorter time from one call to the next (a whole training step) over this pool's first calls.
  kAuto,
  /// Replica 0 on the calling thread and replica i on persistent worker thread i - 1, all at once.
  kThreads,
  /// Every replica on the calling thread, one after another. Replicas that wait for each other (synchronized
  /// batch norm) need kThreads.
  kSerial,
};

/// A pool of persistent worker threads, one per replica slot beyond the first (Note [Worker pool] in
/// parallel_apply.cpp). Threads start on first use and live as long as the pool.
class WorkerPool {
 public:
  WorkerPool();
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  /// Runs task(i) for every i in [0, n): task(0) on the calling thread, task(i) on worker thread i - 1.
  /// Returns once every task has finished, with the exception each task threw (nullptr where none).
  /// Safe to call from several threads at once; a call from inside one of this pool's tasks runs inline.
  /// With `serial`, every task runs on the calling thread, one after another (no worker is involved).
  std::vector<std::exception_ptr> run(size_t n, const std::function<void(size_t)>& task, bool serial = false);

  /// Number of worker threads started so far.
  size_t num_threads() const;

  /// Issuing::kAuto on replicas sharing one device, as this pool settles it (Note [Issuing replicas]): the way a
  /// call starting at `now` uses (both, in blocks of calls, while measuring; then the faster one for good). The
  /// time between calls is what is measured, so `now` is the clock at the call's start (tests pass their own) ...
  Issuing begin_auto_call(std::chrono::steady_clock::time_point now = std::chrono::steady_clock::now());
  /// ... a call begun so failed (its block is measured again) ...
  void auto_call_failed();
  /// ... and the way settled on, kAuto while still measuring.
  Issuing settled_auto_issuing() const;

 private:
  struct State;
  void renew_after_fork();
  std::shared_ptr<State> state_;
};

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

/// kAuto over several distinct devices is kThreads; over replicas sharing one device it stays kAuto (the pool
/// settles it by measurement). Other values are returned as they are.
Issuing resolve_issuing(Issuing issuing, at::ArrayRef<c10::Device> devices);

/// "auto", "threads" or "serial".
const char* issuing_name(Issuing issuing);

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
