// Tests for include/torch_dp/parallel_apply.h: the persistent WorkerPool, ReplicaError and the thread-local
// state that parallel_apply carries into its workers.

#include "helpers.h"

#include <torch_dp/parallel_apply.h>

#include <ATen/autocast_mode.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <mutex>
#include <ostream>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using tdp_test::Contains;
using tdp_test::cpus;
using tdp_test::StartsWith;

namespace {

// Restores the CPU autocast state even when a check fails.
struct AutocastRestore {
  AutocastRestore()
      : enabled(at::autocast::is_autocast_enabled(at::kCPU)), dtype(at::autocast::get_autocast_dtype(at::kCPU)) {}
  ~AutocastRestore() {
    at::autocast::set_autocast_enabled(at::kCPU, enabled);
    at::autocast::set_autocast_dtype(at::kCPU, dtype);
  }
  bool enabled;
  at::ScalarType dtype;
};

}  // namespace

TEST_CASE("WorkerPool runs every index exactly once, task 0 on the caller", "[parallel_apply][pool]") {
  torch_dp::WorkerPool pool;
  CHECK(pool.num_threads() == 0);
  const size_t n = 5;
  std::vector<std::atomic<int>> counts(n);
  std::vector<std::thread::id> ids(n);
  const auto errors = pool.run(n, [&](size_t i) {
    counts[i]++;
    ids[i] = std::this_thread::get_id();
  });
  REQUIRE(errors.size() == n);
  for (size_t i = 0; i < n; ++i) {
    CHECK(counts[i] == 1);
    CHECK_FALSE(errors[i]);
  }
  CHECK(ids[0] == std::this_thread::get_id());
  std::set<std::thread::id> others(ids.begin() + 1, ids.end());
  CHECK(others.size() == n - 1);  // one thread per index
  CHECK(others.count(std::this_thread::get_id()) == 0);
  CHECK(pool.num_threads() == n - 1);

  // n = 1 and n = 0 run on the caller (or not at all) and start nothing new.
  std::thread::id single;
  pool.run(1, [&](size_t) { single = std::this_thread::get_id(); });
  CHECK(single == std::this_thread::get_id());
  CHECK(pool.run(0, [&](size_t) { FAIL("no task expected"); }).empty());
}

TEST_CASE("WorkerPool keeps its threads between runs", "[parallel_apply][pool]") {
  torch_dp::WorkerPool pool;
  std::mutex mutex;
  std::set<std::thread::id> seen;
  auto record = [&](size_t) {
    std::lock_guard<std::mutex> lock(mutex);
    seen.insert(std::this_thread::get_id());
  };
  pool.run(2, record);
  CHECK(pool.num_threads() == 1);
  pool.run(4, record);  // grows to n - 1
  CHECK(pool.num_threads() == 3);
  const auto after_growth = seen;
  CHECK(after_growth.size() == 4);  // caller + 3 workers
  std::atomic<long> total{0};
  for (int r = 0; r < 1000; ++r) {
    pool.run(static_cast<size_t>(2 + r % 3), [&](size_t i) {
      record(i);
      total += static_cast<long>(i) + 1;
    });
  }
  CHECK(pool.num_threads() == 3);
  CHECK(seen == after_growth);  // no new thread was ever used
  long expected = 0;
  for (int r = 0; r < 1000; ++r) {
    const long n = 2 + r % 3;
    expected += n * (n + 1) / 2;
  }
  CHECK(total == expected);
}

TEST_CASE("WorkerPool::run returns each task's exception", "[parallel_apply][pool][errors]") {
  torch_dp::WorkerPool pool;
  std::vector<std::atomic<int>> ran(4);
  const auto errors = pool.run(4, [&](size_t i) {
    ran[i]++;
    if (i == 0 || i == 2) {
      throw std::runtime_error("task " + std::to_string(i) + " failed");
    }
  });
  REQUIRE(errors.size() == 4);
  for (size_t i = 0; i < 4; ++i) {
    CHECK(ran[i] == 1);
  }
  CHECK_FALSE(errors[1]);
  CHECK_FALSE(errors[3]);
  REQUIRE(errors[0]);
  REQUIRE(errors[2]);
  REQUIRE_THROWS_WITH(std::rethrow_exception(errors[0]), "task 0 failed");
  REQUIRE_THROWS_WITH(std::rethrow_exception(errors[2]), "task 2 failed");
}

TEST_CASE("parallel_apply rethrows the lowest failing replica after all finished", "[parallel_apply][errors]") {
  torch_dp::WorkerPool pool;
  const auto devices = cpus(4);
  std::vector<std::atomic<int>> ran(4);
  auto task = [&](size_t i) {
    if (i == 1) {
      throw std::runtime_error("first failure");
    }
    if (i == 2) {
      TORCH_CHECK(false, "second failure");
    }
    if (i == 3) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));  // finishes last; must still have run
    }
    ran[i]++;
  };
  bool caught = false;
  try {
    torch_dp::run_replicas(pool, devices, task);
  } catch (const torch_dp::ReplicaError& e) {
    caught = true;
    CHECK(e.replica() == 1);
    CHECK(e.device().is_cpu());
    const std::string what = e.what();
    CHECK_THAT(what, StartsWith("Caught "));
    CHECK_THAT(what, Contains("in replica 1 on device cpu"));
    CHECK_THAT(what, Contains("runtime_error"));
    CHECK_THAT(what, Contains("first failure"));
    REQUIRE(e.original());
    REQUIRE_THROWS_AS(std::rethrow_exception(e.original()), std::runtime_error);
  }
  CHECK(caught);
  CHECK(ran[0] == 1);
  CHECK(ran[3] == 1);

  SECTION("a c10::Error is described without its backtrace") {
    try {
      torch_dp::run_replicas(pool, cpus(3), [](size_t i) { TORCH_CHECK(i != 2, "bad input ", i); });
      FAIL("expected a ReplicaError");
    } catch (const torch_dp::ReplicaError& e) {
      CHECK(e.replica() == 2);
      const std::string what = e.what();
      CHECK_THAT(what, StartsWith("Caught c10::Error in replica 2 on device cpu."));
      CHECK_THAT(what, Contains("bad input 2"));
      REQUIRE_THROWS_AS(std::rethrow_exception(e.original()), c10::Error);
    }
  }
  SECTION("the pool keeps working after a failure") {
    std::vector<std::atomic<int>> again(4);
    REQUIRE_NOTHROW(torch_dp::run_replicas(pool, devices, [&](size_t i) { again[i]++; }));
    for (size_t i = 0; i < 4; ++i) {
      CHECK(again[i] == 1);
    }
    CHECK(pool.num_threads() == 3);
  }
}

TEST_CASE("Issuing::kAuto uses threads across devices and measures on one device", "[parallel_apply][issuing]") {
  using torch_dp::Issuing;
  const c10::Device cuda0(c10::kCUDA, 0), cuda1(c10::kCUDA, 1);
  CHECK(torch_dp::resolve_issuing(Issuing::kAuto, {cuda0, cuda0}) == Issuing::kAuto);
  CHECK(torch_dp::resolve_issuing(Issuing::kAuto, cpus(4)) == Issuing::kAuto);
  CHECK(torch_dp::resolve_issuing(Issuing::kAuto, {cuda0, cuda1}) == Issuing::kThreads);
  CHECK(torch_dp::resolve_issuing(Issuing::kAuto, {cuda0, cuda0, cuda1}) == Issuing::kThreads);
  CHECK(torch_dp::resolve_issuing(Issuing::kThreads, {cuda0, cuda0}) == Issuing::kThreads);
  CHECK(torch_dp::resolve_issuing(Issuing::kSerial, cpus(3)) == Issuing::kSerial);
  CHECK(std::string(torch_dp::issuing_name(Issuing::kSerial)) == "serial");
}

namespace torch_dp {
// Catch2 prints the ways of a failed comparison by name.
std::ostream& operator<<(std::ostream& os, Issuing issuing) {
  return os << issuing_name(issuing);
}
}  // namespace torch_dp

namespace {

// Drives a pool's Issuing::kAuto trial on a simulated clock: call i starts when call i - 1's period, as
// `period(way, i)` gives it, has passed. Returns the ways the calls used, up to the first settled one.
std::vector<torch_dp::Issuing> run_trial(
    torch_dp::WorkerPool& pool, const std::function<double(torch_dp::Issuing, size_t)>& period,
    const std::function<bool(size_t)>& fails = [](size_t) { return false; }) {
  auto now = std::chrono::steady_clock::time_point{};
  std::vector<torch_dp::Issuing> ways;
  while (pool.settled_auto_issuing() == torch_dp::Issuing::kAuto) {
    REQUIRE(ways.size() < 200);
    const auto way = pool.begin_auto_call(now);
    ways.push_back(way);
    if (fails(ways.size() - 1)) {
      pool.auto_call_failed();
    }
    now += std::chrono::duration_cast<std::chrono::steady_clock::duration>(
        std::chrono::duration<double>(period(way, ways.size() - 1)));
  }
  return ways;
}

std::vector<torch_dp::Issuing> blocks_of(
    std::initializer_list<std::pair<torch_dp::Issuing, size_t>> runs, torch_dp::Issuing last) {
  std::vector<torch_dp::Issuing> ways;
  for (const auto& [way, count] : runs) {
    ways.insert(ways.end(), count, way);
  }
  ways.push_back(last);
  return ways;
}

}  // namespace

TEST_CASE(
    "WorkerPool settles Issuing::kAuto on the way whose calls come round sooner, in blocks of calls",
    "[parallel_apply][issuing]") {
  using torch_dp::Issuing;
  constexpr auto T = Issuing::kThreads;
  constexpr auto S = Issuing::kSerial;
  torch_dp::WorkerPool pool;
  CHECK(pool.settled_auto_issuing() == Issuing::kAuto);

  SECTION("a clear difference settles after a block of each way; the warm-up calls are not timed") {
    const bool serial_faster = GENERATE(true, false);
    CAPTURE(serial_faster);
    const auto faster = serial_faster ? S : T;
    // Warm-up periods (calls 0 and 1) far longer than anything after them: they must not count.
    const auto ways = run_trial(pool, [&](Issuing way, size_t i) {
      return i < 2 ? 100.0 : way == faster ? 1e-3 : 2e-3;
    });
    CHECK(ways == blocks_of({{T, 2}, {T, 12}, {S, 12}}, faster));
    CHECK(pool.settled_auto_issuing() == faster);
    CHECK(pool.begin_auto_call() == faster);  // settled for good
  }

  SECTION("a small difference runs four blocks, threads, serial, serial, threads, then keeps the lower total") {
    const bool serial_faster = GENERATE(true, false);
    CAPTURE(serial_faster);
    const auto faster = serial_faster ? S : T;
    // 10% apart, and every period 1% longer than the one before (a drift the block order must not turn into a
    // verdict: threads' blocks come first and last).
    const auto ways =
        run_trial(pool, [&](Issuing way, size_t i) { return (way == faster ? 1.0 : 1.1) * (1 + 0.01 * i); });
    CHECK(ways == blocks_of({{T, 2}, {T, 12}, {S, 12}, {S, 12}, {T, 12}}, faster));
    CHECK(pool.settled_auto_issuing() == faster);
  }

  SECTION("the whole period counts: a forward issued one way can make the rest of the step slower") {
    // Two forwards per step, as with two views of a batch: call periods alternate between the time to the
    // second forward (the same either way) and the rest of the step, which is 20% longer after threads. A trial
    // that alternated ways call by call would give threads every short period; blocks give each way both.
    const auto ways = run_trial(pool, [&](Issuing way, size_t i) { return i % 2 ? (way == T ? 1.2 : 1.0) : 0.1; });
    CHECK(pool.settled_auto_issuing() == S);
    CHECK(ways.size() == 2 + 4 * 12 + 1);  // 6.6 against 5.6 per block: within the margin, so four blocks
  }

  SECTION("the longest period of a block is left out: one pause does not decide") {
    // Serial is faster, but one of its calls is followed by a long pause (an evaluation, a checkpoint).
    const auto ways = run_trial(pool, [&](Issuing way, size_t i) { return i == 20 ? 60.0 : way == S ? 1.0 : 1.5; });
    CHECK(pool.settled_auto_issuing() == S);
    CHECK(ways.size() == 2 + 2 * 12 + 1);
  }

  SECTION("a block in which a call failed is run again, the same way") {
    const auto ways =
        run_trial(pool, [&](Issuing way, size_t) { return way == S ? 1.0 : 2.0; }, [](size_t i) { return i == 5; });
    CHECK(ways == blocks_of({{T, 2}, {T, 12}, {T, 12}, {S, 12}}, S));
  }
}

TEST_CASE(
    "parallel_apply with Issuing::kAuto settles after its trial calls and keeps its choice",
    "[parallel_apply][issuing]") {
  torch_dp::WorkerPool pool;
  const auto devices = cpus(3);
  std::mutex mutex;
  std::set<std::thread::id> ids;
  auto task = [&](size_t) {
    std::lock_guard<std::mutex> lock(mutex);
    ids.insert(std::this_thread::get_id());
  };
  // 2 warm-up calls, then blocks of 12 calls each way: settled within 51 calls.
  for (int call = 0; call < 51 && pool.settled_auto_issuing() == torch_dp::Issuing::kAuto; ++call) {
    torch_dp::run_replicas(pool, devices, task);
  }
  CHECK(pool.num_threads() == 2);  // the warm-up calls started the workers
  const auto settled = pool.settled_auto_issuing();
  REQUIRE(settled != torch_dp::Issuing::kAuto);
  for (int call = 0; call < 3; ++call) {
    ids.clear();
    torch_dp::run_replicas(pool, devices, task);
    CHECK(ids.size() == (settled == torch_dp::Issuing::kSerial ? 1u : 3u));
  }
  // Failed calls are not timed: a pool whose every call fails never settles, and keeps reporting the failures.
  torch_dp::WorkerPool failing;
  for (int call = 0; call < 60; ++call) {
    CHECK_THROWS_AS(
        torch_dp::run_replicas(failing, devices, [](size_t) { TORCH_CHECK(false, "no"); }), torch_dp::ReplicaError);
  }
  CHECK(failing.settled_auto_issuing() == torch_dp::Issuing::kAuto);
}

TEST_CASE(
    "Issuing::kSerial runs every replica on the caller, in order, and still reports failures",
    "[parallel_apply][issuing][errors]") {
  torch_dp::WorkerPool pool;
  std::vector<size_t> order;
  std::vector<std::thread::id> ids;
  bool grad_mode_seen = true;
  {
    c10::AutoGradMode no_grad(false);
    torch_dp::run_replicas(
        pool, cpus(4),
        [&](size_t i) {
          order.push_back(i);  // no lock: the tasks must not run at once
          ids.push_back(std::this_thread::get_id());
          grad_mode_seen = grad_mode_seen && !c10::GradMode::is_enabled();
          c10::GradMode::set_enabled(true);  // must not leak into the next replica or the caller
        },
        torch_dp::Issuing::kSerial);
    CHECK_FALSE(c10::GradMode::is_enabled());
  }
  CHECK(order == std::vector<size_t>{0, 1, 2, 3});
  CHECK(std::set<std::thread::id>(ids.begin(), ids.end()) == std::set<std::thread::id>{std::this_thread::get_id()});
  CHECK(grad_mode_seen);
  CHECK(pool.num_threads() == 0);  // no worker was started

  std::vector<int> ran(3);
  try {
    torch_dp::run_replicas(
        pool, cpus(3),
        [&](size_t i) {
          ran[i]++;
          TORCH_CHECK(i == 0, "replica ", i, " failed");
        },
        torch_dp::Issuing::kSerial);
    FAIL("expected a ReplicaError");
  } catch (const torch_dp::ReplicaError& e) {
    CHECK(e.replica() == 1);
    CHECK_THAT(std::string(e.what()), Contains("in replica 1 on device cpu"));
    CHECK_THAT(std::string(e.what()), Contains("replica 1 failed"));
  }
  CHECK(ran == std::vector<int>{1, 1, 1});  // the replicas after the failure ran too, as with threads
}

TEST_CASE("device_label names devices as PyTorch does", "[parallel_apply]") {
  CHECK(torch_dp::device_label(c10::Device(c10::kCPU)) == "cpu");
  CHECK(torch_dp::device_label(c10::Device(c10::kCUDA, 1)) == "1");
}

TEST_CASE("parallel_apply carries grad mode and inference mode into the workers", "[parallel_apply][tls]") {
  torch_dp::WorkerPool pool;
  const auto devices = cpus(3);
  std::vector<int> grad(3, -1);
  std::vector<int> inference(3, -1);
  auto record = [&](size_t i) {
    grad[i] = c10::GradMode::is_enabled() ? 1 : 0;
    inference[i] = c10::InferenceMode::is_enabled() ? 1 : 0;
  };

  torch_dp::run_replicas(pool, devices, record);
  CHECK(grad == std::vector<int>{1, 1, 1});
  CHECK(inference == std::vector<int>{0, 0, 0});
  {
    at::NoGradGuard no_grad;
    torch_dp::run_replicas(pool, devices, record);
  }
  CHECK(grad == std::vector<int>{0, 0, 0});
  {
    c10::InferenceMode guard;
    torch_dp::run_replicas(pool, devices, record);
  }
  CHECK(inference == std::vector<int>{1, 1, 1});
  CHECK(grad == std::vector<int>{0, 0, 0});  // inference mode implies no grad
  // The workers' own state is restored after each task.
  torch_dp::run_replicas(pool, devices, record);
  CHECK(grad == std::vector<int>{1, 1, 1});
  CHECK(inference == std::vector<int>{0, 0, 0});

  SECTION("tensors made by workers follow the caller's modes") {
    const auto w = at::randn({2, 2}).requires_grad_(true);
    std::vector<at::Tensor> out(3);
    auto compute = [&](size_t i) { out[i] = w * 2.0; };
    {
      at::NoGradGuard no_grad;
      torch_dp::run_replicas(pool, devices, compute);
    }
    for (const auto& t : out) {
      CHECK_FALSE(t.requires_grad());
    }
    torch_dp::run_replicas(pool, devices, compute);
    for (const auto& t : out) {
      CHECK(t.requires_grad());
    }
    {
      c10::InferenceMode guard;
      torch_dp::run_replicas(pool, devices, [&](size_t i) { out[i] = at::ones({2}) * 2.0; });
    }
    for (const auto& t : out) {
      CHECK(t.is_inference());
    }
  }
}

TEST_CASE("parallel_apply carries the CPU autocast state into the workers", "[parallel_apply][tls]") {
  AutocastRestore restore;
  torch_dp::WorkerPool pool;
  const auto devices = cpus(3);
  std::vector<int> enabled(3, -1);
  std::vector<at::ScalarType> dtype(3, at::kFloat);
  std::vector<at::ScalarType> mm_dtype(3, at::kFloat);
  const auto a = at::randn({4, 4});
  auto record = [&](size_t i) {
    enabled[i] = at::autocast::is_autocast_enabled(at::kCPU) ? 1 : 0;
    dtype[i] = at::autocast::get_autocast_dtype(at::kCPU);
    mm_dtype[i] = at::mm(a, a).scalar_type();
  };

  at::autocast::set_autocast_enabled(at::kCPU, true);
  at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
  torch_dp::run_replicas(pool, devices, record);
  at::autocast::set_autocast_enabled(at::kCPU, false);
  at::autocast::set_autocast_dtype(at::kCPU, restore.dtype);
  for (size_t i = 0; i < 3; ++i) {
    INFO("replica " << i);
    CHECK(enabled[i] == 1);
    CHECK(dtype[i] == at::kBFloat16);
    CHECK(mm_dtype[i] == at::kBFloat16);  // autocast actually applies in the worker
  }

  // With autocast off in the caller, it is off in the workers again.
  torch_dp::run_replicas(pool, devices, record);
  for (size_t i = 0; i < 3; ++i) {
    CHECK(enabled[i] == 0);
    CHECK(mm_dtype[i] == at::kFloat);
  }
}

TEST_CASE("a nested run from inside a task does not deadlock", "[parallel_apply][pool]") {
  torch_dp::WorkerPool pool;
  const size_t n = 3;
  std::vector<std::atomic<int>> inner(n * n);
  tdp_test::require_finishes(
      [&] {
        const auto errors = pool.run(n, [&](size_t i) {
          const auto nested = pool.run(n, [&](size_t j) { inner[i * n + j]++; });
          for (const auto& e : nested) {
            if (e) {
              std::rethrow_exception(e);
            }
          }
        });
        for (const auto& e : errors) {
          if (e) {
            std::rethrow_exception(e);
          }
        }
      },
      "nested WorkerPool::run");
  for (size_t k = 0; k < n * n; ++k) {
    CHECK(inner[k] == 1);
  }

  // The same through parallel_apply (a nested DataParallel).
  std::atomic<int> count{0};
  tdp_test::require_finishes(
      [&] {
        torch_dp::run_replicas(
            pool, cpus(2), [&](size_t) { torch_dp::run_replicas(pool, cpus(4), [&](size_t) { count++; }); });
      },
      "nested parallel_apply");
  CHECK(count == 8);
}

TEST_CASE("two threads can run on one pool at once", "[parallel_apply][pool]") {
  torch_dp::WorkerPool pool;
  const int rounds = 300;
  const size_t n = 4;
  std::vector<std::atomic<int>> counts_a(n), counts_b(n);
  std::atomic<int> bad{0};
  auto client = [&](std::vector<std::atomic<int>>& counts) {
    for (int r = 0; r < rounds; ++r) {
      std::vector<int> local(n, 0);
      const auto errors = pool.run(n, [&](size_t i) {
        local[i]++;
        counts[i]++;
      });
      // Each call returns only after its own tasks ran, exactly once each.
      for (size_t i = 0; i < n; ++i) {
        if (local[i] != 1 || errors[i]) {
          bad++;
        }
      }
    }
  };
  tdp_test::require_finishes(
      [&] {
        std::thread a([&] { client(counts_a); });
        std::thread b([&] { client(counts_b); });
        a.join();
        b.join();
      },
      "two concurrent WorkerPool::run callers");
  CHECK(bad == 0);
  for (size_t i = 0; i < n; ++i) {
    CHECK(counts_a[i] == rounds);
    CHECK(counts_b[i] == rounds);
  }
  CHECK(pool.num_threads() == n - 1);
}
