#pragma once
// Shared helpers for the Catch2 tests: v2/v3 matcher names, tensor comparisons and a deadlock watchdog.

// Torch first: c10/util/logging_is_not_google_glog.h defines a glog-style CHECK(cond) macro, which would
// silently replace Catch2's CHECK (a failing check would then log-and-abort or, worse, not be counted). Every
// torch header is included here, once, and CHECK is handed back to Catch2. Include this header first.
#include <torch/torch.h>
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Logging.h>
#undef CHECK

#include "catch.h"

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace tdp_test {

// DESIGN.md rule 7: never print c10 objects (Device, Tensor) through a stream of ours, and Catch2 prints the
// operands of a failed (or, with -s, any) check. Compare devices with is_cpu() / str() and tensors with at::equal
// or close64, so that only bools, ints, strings, shapes and dtypes are ever printed.

// Catch2 v3 renamed the substring matcher (Contains -> ContainsSubstring).
#if __has_include(<catch2/catch_test_macros.hpp>)
inline auto Contains(const std::string& s) { return Catch::Matchers::ContainsSubstring(s); }
#else
inline auto Contains(const std::string& s) { return Catch::Matchers::Contains(s); }
#endif
inline auto StartsWith(const std::string& s) { return Catch::Matchers::StartsWith(s); }

/// float64 comparison tight enough that only rounding differences pass.
inline bool close64(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && at::allclose(a, b, 1e-12, 1e-12);
}

inline std::vector<c10::Device> cpus(size_t n) {
  return std::vector<c10::Device>(n, c10::Device(c10::kCPU));
}

inline bool same_impl(const at::Tensor& a, const at::Tensor& b) {
  return a.unsafeGetTensorImpl() == b.unsafeGetTensorImpl();
}

/// Runs `fn` on a helper thread and waits up to `seconds` for it. A deadlock would otherwise hang the whole test
/// binary; here it ends the process with a message (the helper thread cannot be reclaimed). This is a deadlock
/// detector with a generous bound, not a timing assertion.
inline void require_finishes(const std::function<void()>& fn, const char* what, int seconds = 120) {
  struct Shared {
    std::mutex mutex;
    std::condition_variable cv;
    bool done = false;
    std::exception_ptr error;
  };
  auto shared = std::make_shared<Shared>();
  std::thread([shared, fn] {
    std::exception_ptr error;
    try {
      fn();
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(shared->mutex);
    shared->error = error;
    shared->done = true;
    shared->cv.notify_all();
  }).detach();
  std::unique_lock<std::mutex> lock(shared->mutex);
  if (!shared->cv.wait_for(lock, std::chrono::seconds(seconds), [&] { return shared->done; })) {
    std::fprintf(stderr, "FATAL: %s did not finish within %d s (deadlock?)\n", what, seconds);
    std::fflush(stderr);
    std::_Exit(3);
  }
  if (shared->error) {
    std::rethrow_exception(shared->error);
  }
}

} // namespace tdp_test
