#include <torch_dp/parallel_apply.h>

#include "message.h"

#include <ATen/ThreadLocalState.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>
#include <c10/util/ScopeExit.h>
#include <c10/util/Type.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <typeinfo>
#include <vector>

// Note [Reproducible replicas]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Random ops (dropout, randn_like, bernoulli, ...) draw from their device's default generator: one for the
// CPU, one per accelerator device. Replicas on threads that share a device draw from that one generator in
// whatever order the threads reach it, so two runs with the same seed give different results (dropout masks
// swapped between replicas, or drawn at other offsets). A generator per replica would make the order
// irrelevant, but ATen has no per-thread default generator: an op called without an explicit generator (every
// nn layer) takes the device's global one, and seeding or swapping that for a replica holds only while no other
// thread draws from it, which is running the replicas one at a time anyway.
// So `reproducible` fixes the order instead: the replicas of each device run one after another, in index
// order, on one thread. Each device's generator is then used exactly as when the chunks are run one after
// another through the unwrapped module after the same seed, which is what the tests compare against (the C++
// module also restores the CPU generator after building replicas, whose clone() draws initial values).
// Distinct devices have distinct generators and still run at once, one thread per device (the first device's
// replicas on the calling thread); kSerial runs every device's on the calling thread, and kAuto measures
// nothing, the order being fixed either way. All CPU devices count as one, whatever their index: they share
// one generator. The price is the overlap of host work between replicas sharing a device, which only heavy
// models on one GPU gain from (Note [Issuing replicas]).
// Not covered: a replica drawing on a device other than its own (a CUDA replica calling torch.randn on the
// CPU) shares that generator with the other devices' threads; ops given an explicit generator are the
// caller's to order; and bitwise equal runs on a GPU also need deterministic kernels
// (torch.use_deterministic_algorithms), a separate matter. Python's synchronized batch norm needs its replicas
// running at once; there the replicas of each device take turns between the rendezvous instead (Note
// [Reproducible synchronized batch norm] in sync_group.py).

namespace torch_dp {

std::string device_label(c10::Device device) {
  if (device.is_cpu()) {
    return "cpu";
  }
  return device.has_index() ? std::to_string(device.index()) : device.str();
}

std::string replica_location(size_t replica, c10::Device device) {
  return "in replica " + std::to_string(replica) + " on device " + device_label(device);
}

namespace {

std::string describe(const std::exception_ptr& error, std::string& type) {
  try {
    std::rethrow_exception(error);
  } catch (const c10::Error& e) {
    type = c10::demangle(typeid(e).name());
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    type = c10::demangle(typeid(e).name());
    return e.what();
  } catch (...) {
    type = "unknown exception";
    return "(not a std::exception)";
  }
}

std::string replica_message(size_t replica, c10::Device device, const std::exception_ptr& original) {
  std::string type;
  const auto what = describe(original, type);
  return "Caught " + type + " " + replica_location(replica, device) + ".\nOriginal error: " + what;
}

}  // namespace

ReplicaError::ReplicaError(size_t replica, c10::Device device, std::exception_ptr original)
    : std::runtime_error(replica_message(replica, device, original)),
      replica_(replica),
      device_(device),
      original_(std::move(original)) {}

namespace {

// The replicas of each generator's device, in index order, the devices in order of first appearance (Note
// [Reproducible replicas]). All CPU devices share the CPU's one generator.
std::vector<std::vector<size_t>> replicas_per_generator(at::ArrayRef<c10::Device> devices) {
  std::vector<c10::Device> keys;
  std::vector<std::vector<size_t>> groups;
  for (size_t i = 0; i < devices.size(); ++i) {
    const auto key = devices[i].is_cpu() ? c10::Device(c10::kCPU) : devices[i];
    const auto g = static_cast<size_t>(std::find(keys.begin(), keys.end(), key) - keys.begin());
    if (g == keys.size()) {
      keys.push_back(key);
      groups.emplace_back();
    }
    groups[g].push_back(i);
  }
  return groups;
}

// Runs the replicas of each generator's device one after another in index order, one pool task per device (all
// on the calling thread with `serial`); returns each replica's exception.
std::vector<std::exception_ptr> run_per_generator(
    WorkerPool& pool, at::ArrayRef<c10::Device> devices, const std::function<void(size_t)>& run_replica, bool serial) {
  const auto groups = replicas_per_generator(devices);
  std::vector<std::exception_ptr> errors(devices.size());
  const std::function<void(size_t)> run_group = [&](size_t g) {
    for (const auto i : groups[g]) {
      try {
        run_replica(i);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    }
  };
  pool.run(groups.size(), run_group, serial);
  return errors;
}

}  // namespace

void run_replicas(
    WorkerPool& pool, at::ArrayRef<c10::Device> devices, const std::function<void(size_t)>& task, Issuing issuing,
    bool reproducible) {
  const size_t n = devices.size();
  // Threads do not inherit thread-local state: capture the caller's (grad mode, inference mode, autocast
  // state and dtype, dispatch keys, ...) and its current stream per device, and install them in each worker.
  // Replicas that run on the calling thread (replica 0, all of them when serial) start from the caller's state
  // too, and the caller gets its state back afterwards, so a forward that changes it
  // (torch.set_grad_enabled(False)) neither leaks into the caller nor into the next replica, just as with
  // PyTorch's throw-away threads. There the state is set only where a replica ran before (the first finds it as
  // captured) and restored once at the end: setting it costs more than a small replica's forward.
  const at::ThreadLocalState tls;
  const auto caller = std::this_thread::get_id();
  bool caller_ran = false;  // a replica ran on the calling thread; only that thread reads or writes it
  const auto restore_caller = c10::make_scope_exit([&] {
    if (caller_ran) {
      at::ThreadLocalState::setThreadLocalState(tls);
    }
  });
  std::vector<std::optional<c10::Stream>> streams(n);
  std::vector<c10::Stream> caller_streams;  // once per device
  for (size_t i = 0; i < n; ++i) {
    if (!devices[i].is_cpu()) {
      TORCH_DP_CHECK(devices[i].has_index(), "run_replicas: device ", devices[i].str(), " has no index");
      c10::impl::VirtualGuardImpl impl(devices[i].type());
      streams[i] = impl.getStream(devices[i]);
      if (std::find(caller_streams.begin(), caller_streams.end(), *streams[i]) == caller_streams.end()) {
        caller_streams.push_back(*streams[i]);
      }
    }
  }
  const std::function<void(size_t)> run_replica = [&](size_t i) {
    std::optional<at::ThreadLocalStateGuard> tls_guard;
    // A worker uses the caller's current stream on every device, not only on its replica's: a replica's work on
    // another device (SyncBatchNorm combining every replica's statistics, a loss reduced onto the output device)
    // must be ordered with the caller's work there, as on the calling thread.
    std::optional<c10::MultiStreamGuard> worker_streams;
    if (std::this_thread::get_id() != caller) {
      tls_guard.emplace(tls);
      if (caller_streams.size() > 1) {
        worker_streams.emplace(caller_streams);
      }
    } else if (caller_ran) {
      at::ThreadLocalState::setThreadLocalState(tls);  // undo what the replica before it changed
    } else {
      caller_ran = true;
    }
    c10::OptionalStreamGuard stream_guard;
    if (streams[i]) {
      stream_guard.reset_stream(*streams[i]);
    }
    task(i);
  };
  std::vector<std::exception_ptr> errors;
  if (reproducible) {
    errors = run_per_generator(pool, devices, run_replica, issuing == Issuing::kSerial);
  } else {
    issuing = resolve_issuing(issuing, devices);
    const bool measuring = issuing == Issuing::kAuto && n > 1;  // the pool settles kAuto (Note [Issuing replicas])
    if (measuring) {
      issuing = pool.begin_auto_call();
    }
    errors = pool.run(n, run_replica, issuing == Issuing::kSerial);
    if (measuring && std::any_of(errors.begin(), errors.end(), [](const std::exception_ptr& e) { return bool(e); })) {
      pool.auto_call_failed();
    }
  }
  for (size_t i = 0; i < n; ++i) {
    if (errors[i]) {
      throw ReplicaError(i, devices[i], errors[i]);
    }
  }
}

}  // namespace torch_dp
