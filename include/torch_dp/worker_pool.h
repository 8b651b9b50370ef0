#pragma once
// worker_pool: the persistent worker threads replicas run on (WorkerPool), and the rules for issuing them: on
// threads at once, one after another, or as the pool measured (Issuing).

#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>

#include <chrono>
#include <cstddef>
#include <exception>
#include <functional>
#include <memory>
#include <vector>

namespace torch_dp {

/// How run_replicas runs the replicas of one call (Note [Issuing replicas] in worker_pool.cpp).
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
/// worker_pool.cpp). Threads start on first use and live as long as the pool.
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

/// kAuto over several distinct devices is kThreads; over replicas sharing one device it stays kAuto (the pool
/// settles it by measurement). Other values are returned as they are.
Issuing resolve_issuing(Issuing issuing, at::ArrayRef<c10::Device> devices);

/// How work that follows a forward on its replicas' devices (a ParallelCriterion's loss) is issued on the forward's
/// pool: as the forward's `issuing` says; kAuto is kThreads across distinct devices, and for replicas sharing one
/// device what the pool settled on for the forward (kThreads while it is still measuring, so that the follow-up
/// work is not timed as a forward). The one rule for both languages' criteria.
Issuing issuing_after_forward(Issuing issuing, const WorkerPool& pool, at::ArrayRef<c10::Device> devices);

/// "auto", "threads" or "serial".
const char* issuing_name(Issuing issuing);

}  // namespace torch_dp
