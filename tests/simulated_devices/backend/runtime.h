#pragma once
// The runtime of the simulated accelerator: devices, streams, events, memory and random generators. A test-only
// device type (PrivateUse1, named "sim") whose memory is CPU memory, so that every path torch_dp takes between
// distinct devices runs without a GPU (Note [Simulated devices] in runtime.cpp).

#include <ATen/core/Generator.h>
#include <c10/core/Allocator.h>
#include <c10/core/Device.h>
#include <c10/core/Stream.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>

namespace torch_dp::sim {

constexpr c10::DeviceType kDeviceType = c10::DeviceType::PrivateUse1;
constexpr const char* kBackendName = "sim";
constexpr c10::DeviceIndex kMaxDevices = 16;
/// Streams per device beyond the default stream (id 0), handed out round robin by the stream pool.
constexpr c10::StreamId kPoolStreams = 4;
/// Every byte of fresh or freed device memory: NaN in every floating dtype, -1 in every signed integer one.
constexpr unsigned char kPoisonByte = 0xFF;

// ---- devices -----------------------------------------------------------------------------------------------

/// The number of devices: TORCH_DP_SIM_DEVICES when the library was loaded (1 to kMaxDevices), default 4.
c10::DeviceIndex device_count();
/// This thread's current device (0 until set).
c10::DeviceIndex current_device();
void set_device(c10::DeviceIndex index);
/// A clear error for an index that is not a device of this backend.
void check_index(c10::DeviceIndex index);

// ---- streams -----------------------------------------------------------------------------------------------
// Every stream runs the work enqueued on it in order on a thread of its own, asynchronously to the host.

c10::Stream default_stream(c10::DeviceIndex index);
/// This thread's current stream for the device (its default stream until set).
c10::Stream current_stream(c10::DeviceIndex index);
/// Makes `stream` this thread's current stream for its device; returns the one it replaces.
c10::Stream exchange_stream(c10::Stream stream);
/// A stream from the device's pool (not the default stream), round robin.
c10::Stream pool_stream(c10::DeviceIndex index);
/// Runs `work` on the stream after everything enqueued on it before. Rethrows an error of earlier work first.
void enqueue(const c10::Stream& stream, std::function<void()> work);
/// Waits until everything enqueued on the stream so far has run; rethrows the first error of that work.
void synchronize_stream(const c10::Stream& stream);
bool query_stream(const c10::Stream& stream);
void synchronize_device(c10::DeviceIndex index);
/// Makes `waiter` run nothing enqueued after this call before `producer` has run what was enqueued on it so far.
void wait_stream(const c10::Stream& waiter, const c10::Stream& producer);
/// Stretches every piece of work on the device's streams by `factor` (>= 1): a slower device.
void set_slowdown(c10::DeviceIndex index, double factor);

// ---- events ------------------------------------------------------------------------------------------------
// An event handle (the void* of c10::Event) is an owning pointer to shared state, which queued work keeps alive.

void* create_event();
void destroy_event(void* event);
void record_event(void* event, const c10::Stream& stream);
/// Makes the stream wait for the event's latest record (nothing if it was never recorded).
void block_on_event(void* event, const c10::Stream& stream);
bool query_event(void* event);
void synchronize_event(void* event);
double elapsed_ms(void* start, void* end);

// ---- memory ------------------------------------------------------------------------------------------------

/// Device memory of the current device, poisoned when handed out, and when freed kept aside (quarantined)
/// until every stream that used it has passed the free (Note [Quarantine]).
c10::Allocator* device_allocator();
/// Host memory that copies may read or write asynchronously (pin_memory()), with the same quarantine.
c10::Allocator* pinned_allocator();
bool is_pinned(const void* pointer);
/// The device whose memory holds `pointer` (nullopt for memory of no device of this backend).
std::optional<c10::DeviceIndex> device_of(const void* pointer);
/// Marks the block that `data` belongs to as used by `stream`: freeing it then waits for that stream too.
void record_stream(const c10::DataPtr& data, const c10::Stream& stream);
void record_stream(const void* pointer, const c10::Stream& stream);
/// Bytes handed out and not freed, per device; blocks freed but still quarantined.
size_t allocated_bytes(c10::DeviceIndex index);
size_t quarantined_blocks();

// ---- random generators -------------------------------------------------------------------------------------

const at::Generator& default_generator(c10::DeviceIndex index);
at::Generator new_generator(c10::DeviceIndex index);
/// A CPU generator for one random op on `index`, seeded from `generator` (the device's default one if none):
/// each op draws its seed on the host, in the order the host issued the ops, whatever the streams' timing.
at::Generator op_generator(const std::optional<at::Generator>& generator, c10::DeviceIndex index);

}  // namespace torch_dp::sim
