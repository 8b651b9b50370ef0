#pragma once
// Shared helpers for the Catch2 tests: v2/v3 matcher names, tensor comparisons and a deadlock watchdog.

// Torch first: c10/util/logging_is_not_google_glog.h defines a glog-style CHECK(cond) macro, which would
// silently replace Catch2's CHECK (a failing check would then log-and-abort or, worse, not be counted). Every
// torch header is included here, once, and CHECK is handed back to Catch2. Include this header first.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Logging.h>
#include <torch/torch.h>
#undef CHECK

#include "catch.h"

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace tdp_test {

// src/message.h says why: never print c10 objects (Device, Tensor) through a stream of ours, and Catch2 prints the
// operands of a failed (or, with -s, any) check. Compare devices with is_cpu() / str() and tensors with at::equal
// or close64, so that only bools, ints, strings, shapes and dtypes are ever printed.

// Catch2 v3 renamed the substring matcher (Contains -> ContainsSubstring).
#if __has_include(<catch2/catch_test_macros.hpp>)
inline auto Contains(const std::string& s) {
  return Catch::Matchers::ContainsSubstring(s);
}
#else
inline auto Contains(const std::string& s) {
  return Catch::Matchers::Contains(s);
}
#endif
inline auto StartsWith(const std::string& s) {
  return Catch::Matchers::StartsWith(s);
}

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

/// Registers a test case with Catch2 only where a CUDA device is available (see TDP_CUDA_TEST_CASE).
inline bool register_if_cuda(void (*test)(), const char* name, const char* tags, const char* file, std::size_t line) {
  if (!torch::cuda::is_available()) {
    return false;
  }
  // What TEST_CASE expands to, in Catch2 v2 and v3 alike (a temporary registrar, as Catch2's own template cases).
  Catch::AutoReg(
      Catch::makeTestInvoker(test), Catch::SourceLineInfo(file, line), Catch::StringRef(),
      Catch::NameAndTags(name, tags));
  return true;
}

}  // namespace tdp_test

// TDP_CUDA_TEST_CASE(name, tags) { ... }: a TEST_CASE that needs a CUDA device. Without one it is not registered,
// so it is neither run nor counted as passed (Catch2 v2 has no SKIP; a TEST_CASE returning early would pass). On
// a GPU machine it runs like any other and is selected by its tags ("[cuda]", scripts/gpu_check.sh).
#define TDP_CUDA_TEST_CASE_CONCAT2(a, b) a##b
#define TDP_CUDA_TEST_CASE_CONCAT(a, b) TDP_CUDA_TEST_CASE_CONCAT2(a, b)
#define TDP_CUDA_TEST_CASE_IMPL(test, registered, name, tags)                                                   \
  static void test();                                                                                           \
  namespace {                                                                                                   \
  [[maybe_unused]] const bool registered = ::tdp_test::register_if_cuda(&test, name, tags, __FILE__, __LINE__); \
  }                                                                                                             \
  static void test()
#define TDP_CUDA_TEST_CASE(name, tags)                                                                                \
  TDP_CUDA_TEST_CASE_IMPL(                                                                                            \
      TDP_CUDA_TEST_CASE_CONCAT(tdp_cuda_test_, __LINE__), TDP_CUDA_TEST_CASE_CONCAT(tdp_cuda_registered_, __LINE__), \
      name, tags)
