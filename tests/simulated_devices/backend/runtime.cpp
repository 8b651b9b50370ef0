#include "runtime.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/GeneratorForPrivateuseone.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/DeviceType.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

// Note [Simulated devices]
// ~~~~~~~~~~~~~~~~~~~~~~~~
// torch_dp's paths between distinct devices (copies on devices 1..n, scatter and gather across devices, gradients
// reduce-added onto the source device, a worker and a current stream per device) must run in CI, which has no
// GPU. This backend gives PyTorch N devices of a new type whose memory is CPU memory, and makes them behave like
// GPUs in every way that can hide a bug in a data-parallel engine:
//  - Work is asynchronous. Every op on a device (compute and copies alike) is queued on the current stream of
//    that device and run, in order, by the stream's own thread; the host returns at once. Missing a stream wait
//    gives a race, as on a GPU, rather than the right answer by luck.
//  - Memory is poisoned: fresh blocks are filled with kPoisonByte (NaN in floating dtypes), so reading memory
//    nobody wrote, or reading it before the stream that writes it ran, gives NaN instead of plausible numbers.
//  - A freed block is quarantined until every stream that used it has passed the free (Note [Quarantine]).
//  - Ops check that every tensor is on one device (kernels.cpp), where the stock CPU fallback accepts `mm` of
//    tensors on two devices.
//  - Each device has its own random generator.
// Copies follow CUDA's ordering: host to device reads pageable memory at once and pinned memory when the copy
// runs, device to host blocks unless it writes pinned memory with non_blocking, and a device to device copy
// runs on the source device's current stream after a two-way barrier with the destination's current stream.

namespace torch_dp::sim {
namespace {

// ---- devices -----------------------------------------------------------------------------------------------

c10::DeviceIndex read_device_count() {
  const char* text = std::getenv("TORCH_DP_SIM_DEVICES");
  if (text == nullptr || *text == '\0') {
    return 4;
  }
  char* end = nullptr;
  const long count = std::strtol(text, &end, 10);
  TORCH_CHECK(
      *end == '\0' && count >= 1 && count <= kMaxDevices, "TORCH_DP_SIM_DEVICES must be a number of devices from 1 to ",
      static_cast<int>(kMaxDevices), ", but is '", text, "'");
  return static_cast<c10::DeviceIndex>(count);
}

thread_local c10::DeviceIndex tls_device = 0;

// ---- streams -----------------------------------------------------------------------------------------------

using Clock = std::chrono::steady_clock;

// How long the work a stream's thread runs spent waiting for other streams (events), which a slowdown leaves out.
thread_local Clock::duration tls_waited{};

class StreamWorker {
 public:
  StreamWorker(c10::DeviceIndex device, c10::StreamId id) : device_(device), id_(id) {}

  // Never destroyed (the runtime is leaked on purpose): work may still be queued when the process exits.
  void enqueue(std::function<void()> work, bool report_errors) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (report_errors) {
      rethrow_error(lock);
    }
    if (!started_) {
      std::thread([this] { loop(); }).detach();
      started_ = true;
    }
    tasks_.push_back(std::move(work));
    ++submitted_;
    wake_.notify_one();
  }

  void synchronize() {
    std::unique_lock<std::mutex> lock(mutex_);
    const auto target = submitted_;
    idle_.wait(lock, [&] { return completed_ >= target; });
    rethrow_error(lock);
  }

  bool query() {
    std::lock_guard<std::mutex> lock(mutex_);
    return completed_ >= submitted_;
  }

  std::atomic<double> slowdown{1.0};

 private:
  void rethrow_error(std::unique_lock<std::mutex>& lock) {
    if (error_) {
      auto error = std::exchange(error_, nullptr);
      lock.unlock();
      std::rethrow_exception(error);
    }
  }

  void loop() {
    for (;;) {
      std::function<void()> work;  // destroyed outside the lock: it may free memory, which enqueues work
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return !tasks_.empty(); });
        work = std::move(tasks_.front());
        tasks_.pop_front();
      }
      const auto start = Clock::now();
      tls_waited = Clock::duration::zero();
      std::exception_ptr error;
      try {
        work();
      } catch (...) {
        error = std::current_exception();
      }
      const double factor = slowdown.load();
      if (factor > 1.0) {
        // Only the work is stretched, not a wait for another stream (which would stretch that stream's delay
        // again, and a chain of waits between slowed streams without end).
        std::this_thread::sleep_for((Clock::now() - start - tls_waited) * (factor - 1.0));
      }
      work = nullptr;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (error && !error_) {
          error_ = error;  // reported by the next enqueue or synchronize, as a GPU reports a kernel's failure
        }
        ++completed_;
      }
      idle_.notify_all();
    }
  }

  const c10::DeviceIndex device_;
  const c10::StreamId id_;
  std::mutex mutex_;
  std::condition_variable wake_, idle_;
  std::deque<std::function<void()>> tasks_;
  uint64_t submitted_ = 0, completed_ = 0;
  std::exception_ptr error_;
  bool started_ = false;
};

// ---- memory ------------------------------------------------------------------------------------------------

struct Block {
  void* pointer = nullptr;
  size_t size = 0;
  c10::DeviceIndex device = -1;       // -1: pinned host memory
  std::optional<c10::Stream> stream;  // the stream it was allocated for (device memory)
  std::vector<c10::Stream> uses;      // further streams recorded on it
};

constexpr size_t kAlignment = 64;
constexpr size_t kRounding = 512;
// A freed block is handed out again only once this many blocks of its size wait behind it, so that a stream
// reading freed memory too late most likely finds the poison, not another tensor's values.
constexpr size_t kReuseDelay = 2;

struct Runtime {
  c10::DeviceIndex count = read_device_count();
  std::mutex streams_mutex;
  std::array<std::array<std::unique_ptr<StreamWorker>, kPoolStreams + 1>, kMaxDevices> workers;
  std::array<std::atomic<uint32_t>, kMaxDevices> next_pool_stream{};
  std::array<double, kMaxDevices> slowdown{};

  std::mutex memory_mutex;
  std::map<uintptr_t, Block*> live;                                       // by start address
  std::map<std::pair<c10::DeviceIndex, size_t>, std::deque<void*>> free;  // quarantine passed, poisoned
  std::array<size_t, kMaxDevices> allocated{};
  size_t quarantined = 0;

  std::once_flag generators_once;
  std::vector<at::Generator> generators;

  StreamWorker& worker(const c10::Stream& stream) {
    TORCH_CHECK(
        stream.device_type() == kDeviceType, "simulated device: not a stream of this backend: device ",
        stream.device().str());
    check_index(stream.device_index());
    TORCH_CHECK(
        stream.id() >= 0 && stream.id() <= kPoolStreams, "simulated device: unknown stream id ",
        std::to_string(stream.id()));
    std::lock_guard<std::mutex> lock(streams_mutex);
    auto& slot = workers[stream.device_index()][stream.id()];
    if (!slot) {
      slot = std::make_unique<StreamWorker>(stream.device_index(), stream.id());
      slot->slowdown = std::max(1.0, slowdown[stream.device_index()]);
    }
    return *slot;
  }
};

Runtime& runtime() {
  static auto* instance = new Runtime();  // leaked: stream threads may run while the process exits
  return *instance;
}

thread_local std::array<c10::StreamId, kMaxDevices> tls_streams{};

// ---- events ------------------------------------------------------------------------------------------------

struct EventState {
  std::mutex mutex;
  std::condition_variable done;
  uint64_t recorded = 0;   // records enqueued
  uint64_t completed = 0;  // records their streams reached
  Clock::time_point time;  // when the latest completed record was reached
};

std::shared_ptr<EventState>& state_of(void* event) {
  return *static_cast<std::shared_ptr<EventState>*>(event);
}

// ---- memory ------------------------------------------------------------------------------------------------

size_t rounded(size_t bytes) {
  return (bytes + kRounding - 1) / kRounding * kRounding;
}

void retire(Block* block) {
  std::memset(block->pointer, kPoisonByte, block->size);
  auto& rt = runtime();
  std::lock_guard<std::mutex> lock(rt.memory_mutex);
  rt.free[{block->device, block->size}].push_back(block->pointer);
  --rt.quarantined;
  delete block;
}

// Note [Quarantine]
// ~~~~~~~~~~~~~~~~~
// Freeing memory on the host while streams may still read or write it is what record_stream exists for: a
// block may be reused only once every stream that uses it has run everything queued on it before the free. Here
// the free queues one small task on each such stream (the one the block was allocated for, and those recorded on
// it); the last of them to run poisons the block and hands it back. A stream that was not recorded (a missing
// record_stream) can still be running work that uses the block: it then reads the poison (NaN) or, once the
// block is handed out again, another tensor's values, as on a GPU, instead of memory the process has returned.
void free_block(void* context) {
  auto* block = static_cast<Block*>(context);
  auto& rt = runtime();
  std::vector<c10::Stream> streams;
  {
    std::lock_guard<std::mutex> lock(rt.memory_mutex);
    rt.live.erase(reinterpret_cast<uintptr_t>(block->pointer));
    if (block->device >= 0) {
      rt.allocated[block->device] -= block->size;
    }
    ++rt.quarantined;
    if (block->stream) {
      streams.push_back(*block->stream);
    }
    for (const auto& stream : block->uses) {
      if (std::find(streams.begin(), streams.end(), stream) == streams.end()) {
        streams.push_back(stream);
      }
    }
  }
  if (streams.empty()) {
    retire(block);
    return;
  }
  auto pending = std::make_shared<std::atomic<size_t>>(streams.size());
  for (const auto& stream : streams) {
    rt.worker(stream).enqueue(
        [block, pending] {
          if (--*pending == 0) {
            retire(block);
          }
        },
        /*report_errors=*/false);
  }
}

c10::DataPtr allocate_block(size_t bytes, c10::DeviceIndex device) {
  const c10::Device data_device = device >= 0 ? c10::Device(kDeviceType, device) : c10::Device(c10::kCPU);
  if (bytes == 0) {
    return c10::DataPtr(nullptr, nullptr, &free_block, data_device);
  }
  auto& rt = runtime();
  auto* block = new Block();
  block->size = rounded(bytes);
  block->device = device;
  if (device >= 0) {
    block->stream = current_stream(device);
  }
  {
    std::lock_guard<std::mutex> lock(rt.memory_mutex);
    auto it = rt.free.find({device, block->size});
    if (it != rt.free.end() && it->second.size() > kReuseDelay) {
      block->pointer = it->second.front();
      it->second.pop_front();
    }
  }
  if (block->pointer == nullptr) {
    block->pointer = std::aligned_alloc(kAlignment, block->size);
    TORCH_CHECK(block->pointer != nullptr, "simulated device: out of memory allocating ", bytes, " bytes");
  }
  std::memset(block->pointer, kPoisonByte, block->size);
  {
    std::lock_guard<std::mutex> lock(rt.memory_mutex);
    rt.live[reinterpret_cast<uintptr_t>(block->pointer)] = block;
    if (device >= 0) {
      rt.allocated[device] += block->size;
    }
  }
  return c10::DataPtr(block->pointer, block, &free_block, data_device);
}

// The live block holding `pointer`, under memory_mutex.
Block* find_block(const void* pointer) {
  auto& live = runtime().live;
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  auto it = live.upper_bound(address);
  if (it == live.begin()) {
    return nullptr;
  }
  --it;
  return address < it->first + it->second->size ? it->second : nullptr;
}

struct DeviceAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t bytes) override { return allocate_block(bytes, current_device()); }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* destination, const void* source, std::size_t count) const override {
    // Storage-level copies (resizing a storage) come from the host: order them after the current stream.
    synchronize_stream(current_stream(current_device()));
    std::memcpy(destination, source, count);
  }
};

struct PinnedAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t bytes) override { return allocate_block(bytes, -1); }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* destination, const void* source, std::size_t count) const override {
    std::memcpy(destination, source, count);
  }
};

DeviceAllocator device_allocator_instance;
PinnedAllocator pinned_allocator_instance;

// ---- random generators -------------------------------------------------------------------------------------

// A device's generator: the state of a CPU generator (Mersenne twister), from which each random op draws the
// seed of its own CPU generator on the host (op_generator).
class GeneratorImpl final : public c10::GeneratorImpl {
 public:
  explicit GeneratorImpl(c10::DeviceIndex index)
      : c10::GeneratorImpl(c10::Device(kDeviceType, index), c10::DispatchKeySet(c10::DispatchKey::PrivateUse1)) {}
  void set_current_seed(uint64_t seed) override { cpu_.set_current_seed(seed); }
  void set_offset(uint64_t offset) override { cpu_.set_offset(offset); }
  uint64_t get_offset() const override { return cpu_.get_offset(); }
  uint64_t current_seed() const override { return cpu_.current_seed(); }
  uint64_t seed() override { return cpu_.seed(); }
  void set_state(const c10::TensorImpl& state) override { cpu_.set_state(state); }
  c10::intrusive_ptr<c10::TensorImpl> get_state() const override { return cpu_.get_state(); }
  uint64_t next_op_seed() { return cpu_.random64(); }
  static c10::DeviceType device_type() { return kDeviceType; }

 private:
  GeneratorImpl* clone_impl() const override {
    auto* copy = new GeneratorImpl(device().index());
    copy->cpu_.set_state(*cpu_.get_state());
    return copy;
  }
  at::CPUGeneratorImpl cpu_;
};

// ---- the device guard and hooks that register the backend with PyTorch -----------------------------------

struct GuardImpl final : public c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return kDeviceType; }
  c10::Device exchangeDevice(c10::Device device) const override {
    const auto previous = current_device();
    set_device(device.index());
    return c10::Device(kDeviceType, previous);
  }
  c10::Device getDevice() const override { return c10::Device(kDeviceType, current_device()); }
  void setDevice(c10::Device device) const override { set_device(device.index()); }
  void uncheckedSetDevice(c10::Device device) const noexcept override { tls_device = device.index(); }
  c10::Stream getStream(c10::Device device) const override { return current_stream(device.index()); }
  c10::Stream getDefaultStream(c10::Device device) const override { return default_stream(device.index()); }
  c10::Stream getStreamFromGlobalPool(c10::Device device, bool /*high_priority*/) const override {
    return pool_stream(device.index());
  }
  c10::Stream getNewStream(c10::Device device, int /*priority*/) const override { return pool_stream(device.index()); }
  c10::Stream exchangeStream(c10::Stream stream) const override { return exchange_stream(stream); }
  c10::DeviceIndex deviceCount() const noexcept override { return runtime().count; }
  void destroyEvent(void* event, const c10::DeviceIndex /*index*/) const noexcept override { destroy_event(event); }
  void record(void** event, const c10::Stream& stream, const c10::DeviceIndex index, const c10::EventFlag /*flag*/)
      const override {
    TORCH_CHECK(
        index == -1 || index == stream.device_index(), "simulated device: an event of device ", std::to_string(index),
        " recorded on a stream of device ", std::to_string(stream.device_index()));
    if (*event == nullptr) {
      *event = create_event();
    }
    record_event(*event, stream);
  }
  void block(void* event, const c10::Stream& stream) const override {
    if (event != nullptr) {
      block_on_event(event, stream);
    }
  }
  bool queryEvent(void* event) const override { return event == nullptr || query_event(event); }
  bool queryStream(const c10::Stream& stream) const override { return query_stream(stream); }
  void synchronizeStream(const c10::Stream& stream) const override { synchronize_stream(stream); }
  void synchronizeEvent(void* event) const override {
    if (event != nullptr) {
      synchronize_event(event);
    }
  }
  void synchronizeDevice(const c10::DeviceIndex index) const override { synchronize_device(index); }
  void recordDataPtrOnStream(const c10::DataPtr& data, const c10::Stream& stream) const override {
    record_stream(data, stream);
  }
  double elapsedTime(void* start, void* end, const c10::DeviceIndex /*index*/) const override {
    return elapsed_ms(start, end);
  }
};

struct Hooks final : public at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex /*index*/) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return runtime().count; }
  void setCurrentDevice(c10::DeviceIndex index) const override { set_device(index); }
  c10::DeviceIndex getCurrentDevice() const override { return current_device(); }
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex index) const override {
    const auto previous = current_device();
    set_device(index);
    return previous;
  }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex index) const override { return exchangeDevice(index); }
  const at::Generator& getDefaultGenerator(c10::DeviceIndex index) const override {
    return default_generator(index < 0 ? current_device() : index);
  }
  at::Generator getNewGenerator(c10::DeviceIndex index) const override {
    return new_generator(index < 0 ? current_device() : index);
  }
  at::Device getDeviceFromPtr(void* data) const override {
    const auto device = device_of(data);
    TORCH_CHECK(device.has_value(), "simulated device: pointer ", data, " is not memory of a simulated device");
    return c10::Device(kDeviceType, *device);
  }
  bool isPinnedPtr(const void* data) const override { return is_pinned(data); }
  c10::Allocator* getPinnedMemoryAllocator() const override { return pinned_allocator(); }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t bytes) const override {
    // A storage grown or shrunk on the host: the old bytes are copied on the stream, after the work before.
    c10::DeviceGuard guard(storage.device());
    const auto stream = current_stream(storage.device().index());
    auto fresh = device_allocator()->allocate(bytes);
    const size_t keep = std::min(bytes, storage.nbytes());
    if (keep > 0) {
      void* destination = fresh.get();
      const void* source = storage.data();
      enqueue(stream, [destination, source, keep] { std::memcpy(destination, source, keep); });
      record_stream(storage.data_ptr(), stream);
    }
    storage.unsafeGetStorageImpl()->set_data_ptr_noswap(std::move(fresh));
    storage.unsafeGetStorageImpl()->set_nbytes(bytes);
  }
};

// Registration when the library is loaded: the backend's name (which a C++ program needs before the autograd
// engine asks for an accelerator), its device guard, its hooks and its allocator.
struct Registration {
  Registration() {
    c10::register_privateuse1_backend(kBackendName);
    static const c10::impl::DeviceGuardImplRegistrar guard(kDeviceType, new GuardImpl());
    at::RegisterPrivateUse1HooksInterface(new Hooks());
    c10::SetAllocator(kDeviceType, device_allocator());
  }
};
Registration registration;

}  // namespace

// ---- devices -----------------------------------------------------------------------------------------------

c10::DeviceIndex device_count() {
  return runtime().count;
}

c10::DeviceIndex current_device() {
  return tls_device;
}

void check_index(c10::DeviceIndex index) {
  const auto count = runtime().count;
  TORCH_CHECK(
      index >= 0 && index < count, "simulated device: device index ", std::to_string(index),
      " is out of range: there are ", std::to_string(count), " devices (TORCH_DP_SIM_DEVICES), indices 0 to ",
      std::to_string(count - 1));
}

void set_device(c10::DeviceIndex index) {
  check_index(index);
  tls_device = index;
}

// ---- streams -----------------------------------------------------------------------------------------------

c10::Stream default_stream(c10::DeviceIndex index) {
  check_index(index);
  return c10::Stream(c10::Stream::UNSAFE, c10::Device(kDeviceType, index), 0);
}

c10::Stream current_stream(c10::DeviceIndex index) {
  check_index(index);
  return c10::Stream(c10::Stream::UNSAFE, c10::Device(kDeviceType, index), tls_streams[index]);
}

c10::Stream exchange_stream(c10::Stream stream) {
  runtime().worker(stream);  // checks it
  const auto previous = current_stream(stream.device_index());
  tls_streams[stream.device_index()] = stream.id();
  return previous;
}

c10::Stream pool_stream(c10::DeviceIndex index) {
  check_index(index);
  const auto next = runtime().next_pool_stream[index]++;
  return c10::Stream(c10::Stream::UNSAFE, c10::Device(kDeviceType, index), 1 + next % kPoolStreams);
}

void enqueue(const c10::Stream& stream, std::function<void()> work) {
  runtime().worker(stream).enqueue(std::move(work), /*report_errors=*/true);
}

void synchronize_stream(const c10::Stream& stream) {
  runtime().worker(stream).synchronize();
}

bool query_stream(const c10::Stream& stream) {
  return runtime().worker(stream).query();
}

void synchronize_device(c10::DeviceIndex index) {
  check_index(index);
  for (c10::StreamId id = 0; id <= kPoolStreams; ++id) {
    synchronize_stream(c10::Stream(c10::Stream::UNSAFE, c10::Device(kDeviceType, index), id));
  }
}

void wait_stream(const c10::Stream& waiter, const c10::Stream& producer) {
  if (waiter == producer) {
    return;
  }
  void* event = create_event();
  record_event(event, producer);
  block_on_event(event, waiter);
  destroy_event(event);
}

void set_slowdown(c10::DeviceIndex index, double factor) {
  check_index(index);
  TORCH_CHECK(factor >= 1.0, "simulated device: a slowdown factor must be at least 1, but got ", factor);
  auto& rt = runtime();
  {
    std::lock_guard<std::mutex> lock(rt.streams_mutex);
    rt.slowdown[index] = factor;
  }
  for (c10::StreamId id = 0; id <= kPoolStreams; ++id) {
    rt.worker(c10::Stream(c10::Stream::UNSAFE, c10::Device(kDeviceType, index), id)).slowdown = factor;
  }
}

// ---- events ------------------------------------------------------------------------------------------------

void* create_event() {
  return new std::shared_ptr<EventState>(std::make_shared<EventState>());
}

void destroy_event(void* event) {
  delete static_cast<std::shared_ptr<EventState>*>(event);  // queued work keeps its own reference
}

void record_event(void* event, const c10::Stream& stream) {
  auto state = state_of(event);
  // The record counts only once it is queued: enqueue raises an earlier error of the stream without queuing, and
  // a count without its record would leave whatever waits for it waiting for good.
  std::lock_guard<std::mutex> lock(state->mutex);
  const uint64_t generation = state->recorded + 1;
  enqueue(stream, [state, generation] {
    {
      std::lock_guard<std::mutex> lock(state->mutex);
      state->completed = std::max(state->completed, generation);
      state->time = Clock::now();
    }
    state->done.notify_all();
  });
  state->recorded = generation;
}

void block_on_event(void* event, const c10::Stream& stream) {
  auto state = state_of(event);
  uint64_t generation = 0;
  {
    std::lock_guard<std::mutex> lock(state->mutex);
    generation = state->recorded;
  }
  if (generation == 0) {
    return;  // never recorded: nothing to wait for, as in CUDA
  }
  enqueue(stream, [state, generation] {
    const auto start = Clock::now();
    std::unique_lock<std::mutex> lock(state->mutex);
    state->done.wait(lock, [&] { return state->completed >= generation; });
    tls_waited += Clock::now() - start;
  });
}

bool query_event(void* event) {
  auto& state = state_of(event);
  std::lock_guard<std::mutex> lock(state->mutex);
  return state->completed >= state->recorded;
}

void synchronize_event(void* event) {
  auto state = state_of(event);
  std::unique_lock<std::mutex> lock(state->mutex);
  const auto target = state->recorded;
  state->done.wait(lock, [&] { return state->completed >= target; });
}

double elapsed_ms(void* start, void* end) {
  TORCH_CHECK(start != nullptr && end != nullptr, "simulated device: both events must be recorded");
  synchronize_event(start);
  synchronize_event(end);
  auto& first = state_of(start);
  auto& second = state_of(end);
  std::scoped_lock lock(first->mutex, second->mutex);
  return std::chrono::duration<double, std::milli>(second->time - first->time).count();
}

// ---- memory ------------------------------------------------------------------------------------------------

c10::Allocator* device_allocator() {
  return &device_allocator_instance;
}

c10::Allocator* pinned_allocator() {
  return &pinned_allocator_instance;
}

bool is_pinned(const void* pointer) {
  auto& rt = runtime();
  std::lock_guard<std::mutex> lock(rt.memory_mutex);
  const auto* block = find_block(pointer);
  return block != nullptr && block->device < 0;
}

std::optional<c10::DeviceIndex> device_of(const void* pointer) {
  auto& rt = runtime();
  std::lock_guard<std::mutex> lock(rt.memory_mutex);
  const auto* block = find_block(pointer);
  if (block == nullptr || block->device < 0) {
    return std::nullopt;
  }
  return block->device;
}

void record_stream(const c10::DataPtr& data, const c10::Stream& stream) {
  if (data.get_deleter() == &free_block && data.get_context() != nullptr) {
    record_stream(data.get(), stream);
  }
}

void record_stream(const void* pointer, const c10::Stream& stream) {
  auto& rt = runtime();
  std::lock_guard<std::mutex> lock(rt.memory_mutex);
  auto* block = find_block(pointer);
  if (block == nullptr || (block->stream && *block->stream == stream)) {
    return;
  }
  if (std::find(block->uses.begin(), block->uses.end(), stream) == block->uses.end()) {
    block->uses.push_back(stream);
  }
}

size_t allocated_bytes(c10::DeviceIndex index) {
  check_index(index);
  auto& rt = runtime();
  std::lock_guard<std::mutex> lock(rt.memory_mutex);
  return rt.allocated[index];
}

size_t quarantined_blocks() {
  auto& rt = runtime();
  std::lock_guard<std::mutex> lock(rt.memory_mutex);
  return rt.quarantined;
}

// ---- random generators -------------------------------------------------------------------------------------

const at::Generator& default_generator(c10::DeviceIndex index) {
  check_index(index);
  auto& rt = runtime();
  std::call_once(rt.generators_once, [&] {
    for (c10::DeviceIndex i = 0; i < rt.count; ++i) {
      rt.generators.push_back(at::make_generator<GeneratorImpl>(i));
    }
  });
  return rt.generators[index];
}

at::Generator new_generator(c10::DeviceIndex index) {
  check_index(index);
  return at::make_generator<GeneratorImpl>(index);
}

at::Generator op_generator(const std::optional<at::Generator>& generator, c10::DeviceIndex index) {
  at::Generator source = generator.has_value() && generator->defined() ? *generator : default_generator(index);
  TORCH_CHECK(
      source.device() == c10::Device(kDeviceType, index),
      "simulated device: a random op on sim:", std::to_string(index), " was given a generator of device ",
      source.device().str(),
      "; expected a generator of that device (torch.Generator(device='sim:", std::to_string(index), "'))");
  auto* impl = source.get<GeneratorImpl>();
  uint64_t seed = 0;
  {
    std::lock_guard<std::mutex> lock(source.mutex());
    seed = impl->next_op_seed();
  }
  return at::make_generator<at::CPUGeneratorImpl>(seed);
}

}  // namespace torch_dp::sim
