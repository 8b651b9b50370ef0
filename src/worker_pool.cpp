#include <torch_dp/worker_pool.h>

#include <c10/util/Exception.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include <unistd.h>

// Note [Worker pool]
// ~~~~~~~~~~~~~~~~~~
// PyTorch's parallel_apply starts one Python thread per replica on every forward and joins them; starting and
// joining threads costs more than a small model's whole forward. A WorkerPool keeps its threads: worker i
// waits on its own queue, so a run() hands task i to worker i - 1 (one lock and one notify) and runs task 0
// on the calling thread, which would otherwise sit idle. Each run() waits on its own latch, so several threads
// can share a pool; a run() from inside one of the pool's own tasks (a nested DataParallel) runs inline, since
// waiting for a busy worker from that worker would deadlock.
//
// After fork() only the forking thread exists in the child, and the pool's mutexes may be held by threads that
// are gone. run() notices the new process id and starts a fresh set of workers; the parent's bookkeeping is
// deliberately leaked in the child, as nothing there can be safely joined or unlocked.
//
// Note [Issuing replicas]
// ~~~~~~~~~~~~~~~~~~~~~~~
// Replicas on distinct devices must be issued at once, from threads, or one device idles while the next is
// fed. Replicas sharing one device also share its current stream, so their device work runs one after another
// however it is issued, and the two ways differ only on the host:
//  - serial (every replica on the calling thread) pays no hand-off to a worker and no contention, and wins
//    where host work per replica is light, such as a small Linear on [0, 0] (launches from two threads into one
//    stream contend for the same driver and allocator locks);
//  - threads win where host work per replica is heavy and runs without the GIL (cuDNN convolutions spend tens
//    of microseconds of CPU each), such as ResNet-50 on [0, 0, 0, 0].
// BENCHMARKS.md has both ways' times for these and other models.
// Neither is right for every model, and which one is depends on the model, the batch and the machine, so
// Issuing::kAuto measures, on the host clock, after kWarmupCalls calls on threads that are not timed (lazy
// initialisation, allocator growth; a pool's workers then exist whichever way it settles):
//  - what it times is the period from one call's start to the next call's start, not the call alone: in
//    training that is the whole step (forward, backward, optimizer step, the next batch), and the way the
//    forward was issued also changes the rest (threads that leave the device's queue fuller or emptier, a
//    backward that waits for it). Timing the forward alone kept the slower way in 3 of 16 same-GPU rows;
//  - the ways run in blocks of kBlockCalls consecutive calls, threads, serial, serial, threads: a training step
//    that calls the forward twice (two views of a batch, a GAN's two passes) would otherwise give one way every
//    short period and the other every long one. A block's time is the sum of its calls' periods less the longest
//    (a pause for evaluation or a checkpoint in the middle of the trial);
//  - after the first two blocks a difference of more than kClearMargin settles at once; otherwise all four
//    blocks run (in that order, so that a drift over the trial favours neither way) and the lower total wins.
// The way is then kept for good. A block in which a call failed is measured again. Results are the same either
// way, only the speed differs. Replicas on distinct devices always use threads. kThreads and kSerial force a way;
// synchronized batch norm needs kThreads, its replicas waiting for each other in one forward. A DataParallel has
// its own pool; the pool shared by the functional forms settles once for every module they run, and calls from
// several threads at once blur its periods.

namespace torch_dp {
namespace {

struct Latch {
  explicit Latch(size_t count) : remaining(count) {}
  void count_down() {
    std::lock_guard<std::mutex> lock(mutex);
    if (--remaining == 0) {
      done.notify_all();
    }
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mutex);
    done.wait(lock, [&] { return remaining == 0; });
  }
  std::mutex mutex;
  std::condition_variable done;
  size_t remaining;
};

struct Job {
  const std::function<void(size_t)>* task = nullptr;
  size_t index = 0;
  std::exception_ptr* error = nullptr;
  Latch* latch = nullptr;
};

thread_local const void* current_pool = nullptr;

}  // namespace

struct WorkerPool::State {
  struct Worker {
    std::thread thread;
    std::mutex mutex;
    std::condition_variable wake;
    std::deque<Job> jobs;
    bool stop = false;
  };

  ~State() {
    for (auto& worker : workers) {
      std::lock_guard<std::mutex> lock(worker->mutex);
      worker->stop = true;
      worker->wake.notify_one();
    }
    for (auto& worker : workers) {
      if (!worker->thread.joinable()) {
        continue;
      }
      if (worker->thread.get_id() == std::this_thread::get_id()) {
        worker->thread.detach();  // the pool died inside its own task; that thread exits after the task
      } else {
        worker->thread.join();
      }
    }
  }

  static void loop(State* state, Worker* worker) {
    current_pool = state;
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(worker->mutex);
        worker->wake.wait(lock, [&] { return worker->stop || !worker->jobs.empty(); });
        if (worker->jobs.empty()) {
          return;
        }
        job = worker->jobs.front();
        worker->jobs.pop_front();
      }
      try {
        (*job.task)(job.index);
      } catch (...) {
        *job.error = std::current_exception();
      }
      job.latch->count_down();
    }
  }

  std::mutex mutex;  // guards `workers` and `trial`
  std::vector<std::unique_ptr<Worker>> workers;
  const pid_t pid = getpid();

  // Issuing::kAuto's measurement (Note [Issuing replicas]).
  static constexpr size_t kWarmupCalls = 2;
  static constexpr size_t kBlockCalls = 12;     // consecutive calls issued one way and timed together
  static constexpr size_t kBlocks = 4;          // threads, serial, serial, threads
  static constexpr double kClearMargin = 0.25;  // after the first two blocks, a difference that settles at once
  struct Trial {
    using Clock = std::chrono::steady_clock;
    size_t warmup_calls = 0;
    size_t block = 0;        // the block under way, or the next one
    size_t block_calls = 0;  // calls begun in it; 0: not started
    bool block_failed = false;
    Clock::time_point last_start;  // of the block's latest call
    double block_seconds = 0;      // the block's periods so far ...
    double longest = 0;            // ... and the longest of them, left out of its total
    double seconds[2] = {0, 0};    // per way ([0]: threads, [1]: serial), the totals of its finished blocks
    Issuing settled = Issuing::kAuto;
  } trial;

  static Issuing way_of_block(size_t block) {
    return block % 4 == 0 || block % 4 == 3 ? Issuing::kThreads : Issuing::kSerial;
  }
};

Issuing WorkerPool::begin_auto_call(std::chrono::steady_clock::time_point now) {
  renew_after_fork();  // the parent's lock may be held by a thread the child does not have
  std::lock_guard<std::mutex> lock(state_->mutex);
  auto& trial = state_->trial;
  if (trial.settled != Issuing::kAuto) {
    return trial.settled;
  }
  if (trial.warmup_calls < State::kWarmupCalls) {
    ++trial.warmup_calls;
    return Issuing::kThreads;
  }
  if (trial.block_calls > 0) {
    // The period of the block's latest call ends where this call starts.
    const double period = std::chrono::duration<double>(now - trial.last_start).count();
    trial.block_seconds += period;
    trial.longest = std::max(trial.longest, period);
  }
  if (trial.block_calls == State::kBlockCalls) {
    if (!trial.block_failed) {
      const bool serial = State::way_of_block(trial.block) == Issuing::kSerial;
      trial.seconds[serial] += trial.block_seconds - trial.longest;
      ++trial.block;
      const double threads_s = trial.seconds[0], serial_s = trial.seconds[1];
      const bool clear =
          trial.block == 2 && std::max(threads_s, serial_s) > (1 + State::kClearMargin) * std::min(threads_s, serial_s);
      if (clear || trial.block == State::kBlocks) {
        trial.settled = serial_s < threads_s ? Issuing::kSerial : Issuing::kThreads;
        return trial.settled;
      }
    }
    trial.block_calls = 0;  // the next block; a failed one is run again, the same way
  }
  if (trial.block_calls == 0) {
    trial.block_failed = false;
    trial.block_seconds = trial.longest = 0;
  }
  ++trial.block_calls;
  trial.last_start = now;
  return State::way_of_block(trial.block);
}

void WorkerPool::auto_call_failed() {
  renew_after_fork();
  std::lock_guard<std::mutex> lock(state_->mutex);
  if (state_->trial.block_calls > 0) {
    state_->trial.block_failed = true;
  }
}

Issuing WorkerPool::settled_auto_issuing() const {
  if (state_->pid != getpid()) {
    return Issuing::kAuto;  // a forked child measures anew
  }
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->trial.settled;
}

WorkerPool::WorkerPool() : state_(std::make_shared<State>()) {}

WorkerPool::~WorkerPool() {
  if (state_ && state_->pid != getpid()) {
    new std::shared_ptr<State>(std::move(state_));  // forked child: see Note [Worker pool]
  }
}

void WorkerPool::renew_after_fork() {
  if (state_->pid != getpid()) {
    new std::shared_ptr<State>(std::move(state_));  // forked child: see Note [Worker pool]
    state_ = std::make_shared<State>();
  }
}

size_t WorkerPool::num_threads() const {
  if (state_->pid != getpid()) {
    return 0;
  }
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->workers.size();
}

std::vector<std::exception_ptr> WorkerPool::run(size_t n, const std::function<void(size_t)>& task, bool serial) {
  std::vector<std::exception_ptr> errors(n);
  renew_after_fork();
  auto run_inline = [&](size_t i) {
    try {
      task(i);
    } catch (...) {
      errors[i] = std::current_exception();
    }
  };
  if (serial || n <= 1 || current_pool == state_.get()) {
    for (size_t i = 0; i < n; ++i) {
      run_inline(i);
    }
    return errors;
  }
  State* state = state_.get();
  std::vector<State::Worker*> workers;
  {
    std::lock_guard<std::mutex> lock(state->mutex);
    while (state->workers.size() < n - 1) {
      auto worker = std::make_unique<State::Worker>();
      worker->thread = std::thread(&State::loop, state, worker.get());
      state->workers.push_back(std::move(worker));
    }
    for (size_t i = 0; i + 1 < n; ++i) {
      workers.push_back(state->workers[i].get());
    }
  }
  Latch latch(n - 1);
  for (size_t i = 1; i < n; ++i) {
    auto* worker = workers[i - 1];
    {
      std::lock_guard<std::mutex> lock(worker->mutex);
      worker->jobs.push_back(Job{&task, i, &errors[i], &latch});
    }
    worker->wake.notify_one();
  }
  run_inline(0);
  latch.wait();
  return errors;
}

Issuing resolve_issuing(Issuing issuing, at::ArrayRef<c10::Device> devices) {
  if (issuing != Issuing::kAuto) {
    return issuing;
  }
  for (const auto& device : devices) {
    if (device != devices.front()) {
      return Issuing::kThreads;
    }
  }
  return Issuing::kAuto;  // replicas sharing one device: settled by the pool (Note [Issuing replicas])
}

Issuing issuing_after_forward(Issuing issuing, const WorkerPool& pool, at::ArrayRef<c10::Device> devices) {
  const auto resolved = resolve_issuing(issuing, devices);
  if (resolved != Issuing::kAuto) {
    return resolved;
  }
  const auto settled = pool.settled_auto_issuing();
  return settled == Issuing::kAuto ? Issuing::kThreads : settled;
}

const char* issuing_name(Issuing issuing) {
  switch (issuing) {
    case Issuing::kAuto:
      return "auto";
    case Issuing::kThreads:
      return "threads";
    case Issuing::kSerial:
      return "serial";
  }
  return "unknown";
}

}  // namespace torch_dp
