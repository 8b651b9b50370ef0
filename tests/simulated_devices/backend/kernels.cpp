// The simulated accelerator's ATen kernels: tensors and their memory, copies, views, and every other op through
// an asynchronous CPU fallback (Note [Asynchronous fallback]); the custom ops its Python module calls.

#include "runtime.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/op_registration/op_registration.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace torch_dp::sim {
namespace {

c10::Device sim_device(c10::DeviceIndex index) {
  return c10::Device(kDeviceType, index);
}

c10::DeviceIndex index_of(const std::optional<c10::Device>& device) {
  if (!device.has_value() || !device->has_index()) {
    return current_device();
  }
  TORCH_CHECK(device->type() == kDeviceType, "simulated device: expected a sim device, got ", device->str());
  check_index(device->index());
  return device->index();
}

// ---- tensors and their memory ------------------------------------------------------------------------------

at::Tensor empty_memory_format(
    c10::IntArrayRef size, std::optional<c10::ScalarType> dtype, std::optional<c10::Layout> layout,
    std::optional<c10::Device> device, std::optional<bool> /*pin_memory*/,
    std::optional<c10::MemoryFormat> memory_format) {
  TORCH_CHECK(layout.value_or(c10::kStrided) == c10::kStrided, "simulated device: only strided tensors");
  const c10::DeviceGuard guard(sim_device(index_of(device)));
  return at::detail::empty_generic(
      size, device_allocator(), c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
      dtype.value_or(c10::get_default_dtype_as_scalartype()), memory_format);
}

at::Tensor empty_strided(
    c10::IntArrayRef size, c10::IntArrayRef stride, std::optional<c10::ScalarType> dtype,
    std::optional<c10::Layout> layout, std::optional<c10::Device> device, std::optional<bool> /*pin_memory*/) {
  TORCH_CHECK(layout.value_or(c10::kStrided) == c10::kStrided, "simulated device: only strided tensors");
  const c10::DeviceGuard guard(sim_device(index_of(device)));
  return at::detail::empty_strided_generic(
      size, stride, device_allocator(), c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
      dtype.value_or(c10::get_default_dtype_as_scalartype()));
}

// Grows the tensor's storage (on its device's current stream) when its sizes and strides need more bytes.
void ensure_storage(const at::Tensor& self) {
  auto* impl = self.unsafeGetTensorImpl();
  const size_t needed =
      at::detail::computeStorageNbytes(self.sizes(), self.strides(), self.dtype().itemsize(), impl->storage_offset());
  if (self.numel() > 0 && needed > self.storage().nbytes()) {
    at::detail::getPrivateUse1Hooks().resizePrivateUse1Bytes(self.storage(), needed);
  }
}

const at::Tensor& resize_(
    const at::Tensor& self, c10::IntArrayRef size, std::optional<c10::MemoryFormat> memory_format) {
  const c10::DeviceGuard guard(self.device());
  auto* impl = self.unsafeGetTensorImpl();
  if (impl->sizes() != size) {
    impl->set_sizes_contiguous(size);
  }
  if (memory_format.has_value()) {
    TORCH_CHECK(
        *memory_format != c10::MemoryFormat::Preserve,
        "simulated device: resize_ does not take memory_format=preserve");
    impl->empty_tensor_restride(*memory_format);
  }
  ensure_storage(self);
  return self;
}

at::Tensor& set_storage(
    at::Tensor& self, c10::Storage source, int64_t offset, c10::IntArrayRef size, c10::IntArrayRef stride) {
  TORCH_CHECK(
      source.device() == self.device(), "simulated device: set_ of a tensor on ", self.device().str(),
      " to a storage on ", source.device().str());
  auto* impl = self.unsafeGetTensorImpl();
  impl->set_storage_keep_dtype(std::move(source));
  if (stride.data() == nullptr) {
    impl->set_sizes_contiguous(size);
    impl->set_storage_offset(offset);
  } else {
    impl->set_sizes_and_strides(size, stride, offset);
  }
  const c10::DeviceGuard guard(self.device());
  ensure_storage(self);
  return self;
}

at::Tensor& set_source_storage_offset(
    at::Tensor& self, c10::Storage source, int64_t offset, c10::IntArrayRef size, c10::IntArrayRef stride) {
  return set_storage(self, std::move(source), offset, size, stride);
}

at::Tensor& set_source_storage(at::Tensor& self, c10::Storage source) {
  const int64_t count = static_cast<int64_t>(source.nbytes() / self.dtype().itemsize());
  return set_storage(self, std::move(source), 0, {count}, {});
}

at::Tensor& set_source_tensor(at::Tensor& self, const at::Tensor& source) {
  if (self.is_same(source)) {
    return self;
  }
  return set_storage(self, source.storage(), source.storage_offset(), source.sizes(), source.strides());
}

at::Tensor& set_empty(at::Tensor& self) {
  const c10::DeviceGuard guard(self.device());
  c10::Storage empty(c10::Storage::use_byte_size_t(), 0, device_allocator(), /*resizable=*/true);
  return set_storage(self, std::move(empty), 0, {0}, {});
}

void record_stream_kernel(at::Tensor& self, c10::Stream stream) {
  record_stream(self.storage().data_ptr(), stream);
}

// Whether `self` may take `from`'s data in place (Variable::set_data, Python's `.data =`): as between the CPU and
// CUDA, a dense tensor of this device and a dense CPU tensor may, so that C++'s Module::to(device) and clone(device)
// (which call set_data) move a module between the CPU and a device. PyTorch's own rule (TensorImpl's
// has_compatible_shallow_copy_type) lists the built-in backends only and leaves PrivateUse1 to its backend.
bool has_compatible_shallow_copy_type(const at::Tensor& self, const at::Tensor& from) {
  const auto dense = [](const at::Tensor& tensor) {
    return tensor.layout() == c10::kStrided && (tensor.is_cpu() || tensor.device().type() == kDeviceType);
  };
  return (dense(self) && dense(from)) || self.unsafeGetTensorImpl()->has_compatible_shallow_copy_type(from.key_set());
}

// ---- CPU aliases ---------------------------------------------------------------------------------------------

// Note [CPU aliases]
// ~~~~~~~~~~~~~~~~~~
// A device tensor's memory is CPU memory, so the CPU kernels can compute on it in place: each device tensor an op
// takes is handed to the CPU kernel as a CPU tensor over the same bytes (same sizes, strides and offset) that
// owns nothing. Tensors that share a storage on the device share one alias storage, so that the CPU kernels'
// overlap checks see what the device tensors share. Everything an op writes (its outputs, its in-place and out=
// arguments, and what a kernel mutates without saying so, such as batch norm's running statistics) lands in
// device memory. An alias owns nothing on purpose: work queued on a stream does not keep memory alive, as on a
// GPU, so that freeing memory a stream still uses is caught (Note [Quarantine] in runtime.cpp).
class CpuAliases {
 public:
  at::Tensor of(const at::Tensor& tensor) {
    if (!tensor.defined()) {
      return tensor;
    }
    auto* storage_impl = tensor.storage().unsafeGetStorageImpl();
    auto it = storages_.find(storage_impl);
    if (it == storages_.end()) {
      c10::Storage alias(
          c10::Storage::use_byte_size_t(), tensor.storage().nbytes(),
          c10::DataPtr(tensor.storage().data_ptr().get(), c10::Device(c10::kCPU)), /*allocator=*/nullptr,
          /*resizable=*/false);
      it = storages_.emplace(storage_impl, std::move(alias)).first;
    }
    auto result = at::detail::make_tensor<c10::TensorImpl>(
        c10::Storage(it->second), c10::DispatchKeySet(c10::DispatchKey::CPU), tensor.dtype());
    result.unsafeGetTensorImpl()->set_sizes_and_strides(tensor.sizes(), tensor.strides(), tensor.storage_offset());
    return result;
  }

  // The device tensor a CPU result aliases, if it is a view of one of the aliased storages.
  std::optional<c10::Storage> device_storage_of(const at::Tensor& cpu) const {
    for (const auto& [device_storage, alias] : storages_) {
      if (cpu.storage().is_alias_of(alias)) {
        return c10::Storage(c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(device_storage));
      }
    }
    return std::nullopt;
  }

 private:
  std::unordered_map<c10::StorageImpl*, c10::Storage> storages_;
};

at::Tensor cpu_alias(const at::Tensor& tensor) {
  CpuAliases aliases;
  return aliases.of(tensor);
}

// A device tensor over `storage` with the sizes, strides and offset of `like` (a view an op returned).
at::Tensor device_view(const c10::Storage& storage, const at::Tensor& like, c10::DeviceIndex device) {
  auto result = at::detail::make_tensor<c10::TensorImpl>(
      c10::Storage(storage), c10::DispatchKeySet(c10::DispatchKey::PrivateUse1), like.dtype());
  result.unsafeGetTensorImpl()->set_sizes_and_strides(like.sizes(), like.strides(), like.storage_offset());
  TORCH_INTERNAL_ASSERT(result.device() == sim_device(device));
  return result;
}

// ---- walking an op's arguments -----------------------------------------------------------------------------

// `value` with `f` applied to every tensor in it (a tensor, a list of tensors, a list of optional tensors).
template <typename F>
c10::IValue map_tensors(const c10::IValue& value, F&& f) {
  if (value.isTensor()) {
    return f(value.toTensor());
  }
  if (value.isTensorList()) {
    c10::List<at::Tensor> result;
    for (const at::Tensor& tensor : value.toTensorList()) {
      result.push_back(f(tensor));
    }
    return result;
  }
  if (value.isOptionalTensorList()) {
    c10::List<std::optional<at::Tensor>> result;
    for (const std::optional<at::Tensor>& tensor : value.toOptionalTensorList()) {
      result.push_back(tensor.has_value() ? std::optional<at::Tensor>(f(*tensor)) : std::nullopt);
    }
    return result;
  }
  return value;
}

template <typename F>
void for_each_tensor(const c10::IValue& value, F&& f) {
  map_tensors(value, [&](const at::Tensor& tensor) {
    if (tensor.defined()) {
      f(tensor);
    }
    return tensor;
  });
}

bool is_generator(const c10::Argument& argument) {
  const auto& type = argument.type();
  if (type->kind() == c10::TypeKind::OptionalType) {
    return type->castRaw<c10::OptionalType>()->getElementType()->kind() == c10::TypeKind::GeneratorType;
  }
  return type->kind() == c10::TypeKind::GeneratorType;
}

bool returns_tensors_only(const c10::FunctionSchema& schema) {
  for (const auto& result : schema.returns()) {
    const auto& type = result.type();
    const bool tensor = type->kind() == c10::TypeKind::TensorType;
    const bool list = type->kind() == c10::TypeKind::ListType &&
                      type->castRaw<c10::ListType>()->getElementType()->kind() == c10::TypeKind::TensorType;
    if (!tensor && !list) {
      return false;
    }
  }
  return true;
}

// The one device an op runs on: every device tensor it takes must be on it. A CPU tensor is accepted only as a
// 0-dim scalar (as CUDA accepts it), which the op reads as it was when issued.
c10::DeviceIndex op_device(const c10::OperatorHandle& op, const std::vector<c10::IValue>& arguments) {
  const auto& schema = op.schema();
  std::optional<c10::DeviceIndex> device;
  std::string first;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto& name = schema.arguments()[i].name();
    for_each_tensor(arguments[i], [&](const at::Tensor& tensor) {
      if (tensor.device().type() == kDeviceType) {
        if (!device.has_value()) {
          device = tensor.device().index();
          first = name;
        }
        TORCH_CHECK(
            tensor.device().index() == *device, "simulated device: ", schema.name(),
            " expects every tensor on one device, but '", first, "' is on sim:", std::to_string(*device), " and '",
            name, "' is on sim:", std::to_string(tensor.device().index()));
      } else if (tensor.device().is_cpu()) {
        TORCH_CHECK(
            tensor.dim() == 0, "simulated device: ", schema.name(), " got '", name, "' on the CPU with shape ",
            tensor.sizes(), "; a device op takes CPU tensors only as 0-dim scalars: move it to the device first");
      } else {
        TORCH_CHECK(false, "simulated device: ", schema.name(), " got '", name, "' on ", tensor.device().str());
      }
    });
  }
  TORCH_CHECK(
      device.has_value(), "simulated device: ", schema.name(),
      " was dispatched to the simulated device without a tensor "
      "on it; create its tensors on the device first");
  return *device;
}

// ---- the fallback --------------------------------------------------------------------------------------------

// Note [Asynchronous fallback]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Every op without a kernel of its own runs here as its CPU kernel would, but the way a GPU runs it: issued on
// the host, computed later on the current stream of the op's device.
//  1. The host checks that every tensor is on one device and finds the outputs' shapes by running the op on
//     meta tensors (which also raises shape and dtype errors on the host, where the user sees them). A returned
//     tensor that is an argument (in-place and out= ops) is that argument; one that shares an argument's meta
//     storage is a view of it, made on the host; any other is allocated (poisoned) on the device.
//  2. The stream runs the CPU kernel on CPU aliases of the device tensors (Note [CPU aliases]) and copies fresh
//     outputs into the memory allocated for them.
// Ops that return something other than tensors (a bool, a number) or whose outputs' shapes no meta kernel can
// tell (nonzero, an op with no meta kernel) run synchronously: queued on the stream like any other, and waited
// for. A random op gets a CPU generator seeded on the host from its device's generator (runtime.h op_generator).
// An error of queued work is raised by the next op or synchronization on that stream.

struct PreparedArguments {
  std::vector<c10::IValue> cpu;  // what the CPU kernel gets
  CpuAliases aliases;
};

PreparedArguments cpu_arguments(
    const c10::FunctionSchema& schema, const std::vector<c10::IValue>& arguments, c10::DeviceIndex device) {
  PreparedArguments prepared;
  prepared.cpu.reserve(arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto& argument = schema.arguments()[i];
    const auto& value = arguments[i];
    if (is_generator(argument)) {
      std::optional<at::Generator> generator;
      if (!value.isNone()) {
        generator = value.toGenerator();
      }
      prepared.cpu.emplace_back(op_generator(generator, device));
    } else if (value.isDevice() && value.toDevice().type() == kDeviceType) {
      prepared.cpu.emplace_back(c10::Device(c10::kCPU));
    } else {
      prepared.cpu.push_back(map_tensors(value, [&](const at::Tensor& tensor) {
        if (!tensor.defined()) {
          return tensor;
        }
        // A CPU scalar is read as it was when the op was issued; a device tensor is aliased.
        return tensor.device().is_cpu() ? tensor.clone() : prepared.aliases.of(tensor);
      }));
    }
  }
  return prepared;
}

// A meta tensor like `tensor`: same sizes, strides, storage offset, and a storage of the same size.
at::Tensor meta_like(const at::Tensor& tensor) {
  const auto itemsize = static_cast<int64_t>(tensor.dtype().itemsize());
  const int64_t elements = (static_cast<int64_t>(tensor.storage().nbytes()) + itemsize - 1) / itemsize;
  auto base = at::empty({elements}, tensor.options().device(c10::kMeta));
  return base.as_strided(tensor.sizes(), tensor.strides(), tensor.storage_offset());
}

struct MetaRun {
  std::vector<c10::IValue> results;
  std::unordered_map<const c10::TensorImpl*, at::Tensor> argument_of;     // meta argument -> device argument
  std::unordered_map<const c10::StorageImpl*, at::Tensor> storage_owner;  // meta storage -> device argument
  std::vector<std::pair<at::Tensor, at::Tensor>> written;                 // (meta, device) of mutable arguments
};

MetaRun run_meta(const c10::OperatorHandle& op, const std::vector<c10::IValue>& arguments) {
  const auto& schema = op.schema();
  MetaRun run;
  torch::jit::Stack stack;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto& argument = schema.arguments()[i];
    if (is_generator(argument)) {
      stack.emplace_back();  // meta kernels draw nothing
      continue;
    }
    const bool mutable_argument = argument.alias_info() != nullptr && argument.alias_info()->isWrite();
    stack.push_back(map_tensors(arguments[i], [&](const at::Tensor& tensor) {
      if (!tensor.defined() || tensor.device().is_cpu()) {
        return tensor;
      }
      auto meta = meta_like(tensor);
      run.argument_of[meta.unsafeGetTensorImpl()] = tensor;
      run.storage_owner[meta.storage().unsafeGetStorageImpl()] = tensor;
      if (mutable_argument) {
        run.written.emplace_back(meta, tensor);
      }
      return meta;
    }));
  }
  op.callBoxed(stack);
  run.results = std::move(stack);
  return run;
}

// The device result for a meta result: the argument it is, a view of the argument it shares storage with, or a
// fresh device tensor (added to `fresh`, whose CPU aliases the stream fills).
at::Tensor device_result(
    const MetaRun& run, const at::Tensor& meta, c10::DeviceIndex device, std::vector<at::Tensor>& fresh) {
  if (!meta.defined()) {
    return meta;
  }
  if (auto it = run.argument_of.find(meta.unsafeGetTensorImpl()); it != run.argument_of.end()) {
    return it->second;
  }
  if (auto it = run.storage_owner.find(meta.storage().unsafeGetStorageImpl()); it != run.storage_owner.end()) {
    return device_view(it->second.storage(), meta, device);
  }
  auto result = at::empty_strided(meta.sizes(), meta.strides(), meta.options().device(sim_device(device)));
  fresh.push_back(result);
  return result;
}

void run_async(
    const c10::OperatorHandle& op, const std::vector<c10::IValue>& arguments, const MetaRun& run,
    c10::DeviceIndex device, torch::jit::Stack* stack) {
  // out= arguments the meta kernel resized are resized on the device first, so the CPU kernel writes in place.
  for (const auto& [meta, tensor] : run.written) {
    if (meta.sizes() != tensor.sizes()) {
      tensor.unsafeGetTensorImpl()->set_sizes_and_strides(meta.sizes(), meta.strides());
      ensure_storage(tensor);
    }
  }
  std::vector<at::Tensor> fresh;
  std::vector<c10::IValue> results;
  for (const auto& meta : run.results) {
    results.push_back(map_tensors(meta, [&](const at::Tensor& t) { return device_result(run, t, device, fresh); }));
  }
  auto prepared = cpu_arguments(op.schema(), arguments, device);
  // Which result slots the stream fills: the fresh tensors, by position in the flattened results.
  std::vector<std::pair<size_t, at::Tensor>> fills;  // (flat position, CPU alias of the fresh output)
  {
    size_t position = 0;
    for (const auto& value : results) {
      for_each_tensor(value, [&](const at::Tensor& tensor) {
        for (const auto& f : fresh) {
          if (f.is_same(tensor)) {
            fills.emplace_back(position, prepared.aliases.of(tensor));
          }
        }
        ++position;
      });
    }
  }
  enqueue(current_stream(device), [op, cpu = std::move(prepared.cpu), fills = std::move(fills)] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    torch::jit::Stack work(cpu);
    op.callBoxed(work);
    std::vector<at::Tensor> flat;
    for (const auto& value : work) {
      for_each_tensor(value, [&](const at::Tensor& tensor) { flat.push_back(tensor); });
    }
    for (const auto& [position, alias] : fills) {
      TORCH_CHECK(
          position < flat.size(), "simulated device: ", op.schema().name(),
          ": the CPU kernel returned fewer tensors than its meta kernel");
      const auto& result = flat[position];
      if (result.sizes() == alias.sizes()) {
        alias.copy_(result);
        continue;
      }
      // An output the CPU kernel leaves empty where the meta kernel gives it a shape (batch norm's saved
      // statistics in eval mode) keeps the poison: whatever reads it reads NaN.
      TORCH_CHECK(
          result.numel() == 0, "simulated device: ", op.schema().name(), ": output ", position, " has shape ",
          result.sizes(), " from the CPU kernel but ", alias.sizes(), " from the meta kernel");
    }
  });
  for (auto& value : results) {
    stack->push_back(std::move(value));
  }
}

void run_sync(
    const c10::OperatorHandle& op, const std::vector<c10::IValue>& arguments, c10::DeviceIndex device,
    torch::jit::Stack* stack) {
  auto prepared = cpu_arguments(op.schema(), arguments, device);
  torch::jit::Stack results;
  std::exception_ptr error;
  const auto stream = current_stream(device);
  enqueue(stream, [&] {
    try {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      results = prepared.cpu;
      op.callBoxed(results);
    } catch (...) {
      error = std::current_exception();
    }
  });
  synchronize_stream(stream);
  if (error) {
    std::rethrow_exception(error);
  }
  // Results that alias an argument become views of it on the device; new ones are copied to the device (the
  // host may write them: nothing else knows this memory yet).
  for (const auto& value : results) {
    stack->push_back(map_tensors(value, [&](const at::Tensor& cpu) -> at::Tensor {
      if (!cpu.defined()) {
        return cpu;
      }
      if (auto storage = prepared.aliases.device_storage_of(cpu)) {
        return device_view(*storage, cpu, device);
      }
      auto result = at::empty_strided(cpu.sizes(), cpu.strides(), cpu.options().device(sim_device(device)));
      cpu_alias(result).copy_(cpu);
      return result;
    }));
  }
}

// TORCH_DP_SIM_TRACE=1 prints each op the fallback runs and how (to stderr), for debugging the backend.
const bool trace = [] {
  const char* value = std::getenv("TORCH_DP_SIM_TRACE");
  return value != nullptr && *value != '\0' && std::string(value) != "0";
}();

void fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  auto arguments = torch::jit::pop(*stack, schema.arguments().size());
  const auto device = op_device(op, arguments);
  const c10::DeviceGuard guard(sim_device(device));
  if (returns_tensors_only(schema)) {
    std::optional<MetaRun> run;
    std::string why;
    try {
      run = run_meta(op, arguments);
    } catch (const std::exception& e) {
      run.reset();  // no meta kernel, or shapes that depend on values: run it synchronously (below)
      why = e.what();
    }
    if (run.has_value()) {
      if (trace) {
        std::cerr << "sim:" << static_cast<int>(device) << " async " << schema.operator_name().name << "."
                  << schema.overload_name() << std::endl;
      }
      run_async(op, arguments, *run, device, stack);
      return;
    }
    if (trace) {
      std::cerr << "sim:" << static_cast<int>(device) << " sync (meta: " << why.substr(0, why.find('\n')) << ") "
                << schema.operator_name().name << "." << schema.overload_name() << std::endl;
    }
  } else if (trace) {
    std::cerr << "sim:" << static_cast<int>(device) << " sync " << schema.operator_name().name << "."
              << schema.overload_name() << std::endl;
  }
  run_sync(op, arguments, device, stack);
}

// ---- copies ------------------------------------------------------------------------------------------------

// A copy's work on a stream's thread. Its CPU aliases were made on the calling thread, as inference tensors when
// that thread was in InferenceMode, which the stream's thread is not in: run below autograd, as the fallback runs
// ops (run_async), so that the copy is the raw one a device does, without the check of in-place updates to
// inference tensors ("Inplace update to inference tensor outside InferenceMode").
void raw_copy(at::Tensor& to, const at::Tensor& from) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  to.copy_(from);
}

at::Tensor copy_from(const at::Tensor& source, const at::Tensor& destination, bool non_blocking) {
  const bool from_device = source.device().type() == kDeviceType;
  const bool to_device = destination.device().type() == kDeviceType;
  TORCH_CHECK(
      (from_device || source.device().is_cpu()) && (to_device || destination.device().is_cpu()),
      "simulated device: cannot copy from ", source.device().str(), " to ", destination.device().str());
  TORCH_CHECK(
      source.sizes() == destination.sizes() || source.numel() == destination.numel() || source.numel() == 1,
      "simulated device: copy_ from shape ", source.sizes(), " to shape ", destination.sizes());
  if (destination.numel() == 0) {
    return destination;
  }
  if (from_device && to_device) {
    const auto source_stream = current_stream(source.device().index());
    auto work = [to = cpu_alias(destination), from = cpu_alias(source)]() mutable { raw_copy(to, from); };
    if (source.device() == destination.device()) {
      enqueue(source_stream, std::move(work));
      return destination;
    }
    // Between devices, as CUDA does: on the source's current stream, after the destination's current stream has
    // run what was queued on it (it may still use the destination's memory), and before anything the destination
    // stream runs next. Never blocks the host.
    const auto destination_stream = current_stream(destination.device().index());
    wait_stream(source_stream, destination_stream);
    enqueue(source_stream, std::move(work));
    wait_stream(destination_stream, source_stream);
    return destination;
  }
  if (to_device) {
    const auto stream = current_stream(destination.device().index());
    if (non_blocking && is_pinned(source.data_ptr())) {
      // Pinned memory is read when the copy runs; the source's block waits for this stream before reuse.
      record_stream(source.data_ptr(), stream);
      enqueue(stream, [to = cpu_alias(destination), from = cpu_alias(source)]() mutable { raw_copy(to, from); });
    } else {
      // Pageable memory is read now (a staging copy), as cudaMemcpyAsync does.
      enqueue(stream, [to = cpu_alias(destination), from = source.clone()]() mutable { raw_copy(to, from); });
      if (!non_blocking) {
        synchronize_stream(stream);
      }
    }
    return destination;
  }
  // Device to host: on the source's current stream; the host waits unless it writes pinned memory non_blocking.
  const auto stream = current_stream(source.device().index());
  const bool asynchronous = non_blocking && is_pinned(destination.data_ptr());
  if (asynchronous) {
    record_stream(destination.data_ptr(), stream);
  }
  enqueue(stream, [to = cpu_alias(destination), from = cpu_alias(source)]() mutable { raw_copy(to, from); });
  if (!asynchronous) {
    synchronize_stream(stream);
  }
  return destination;
}

at::Tensor copy_from_and_resize(const at::Tensor& source, const at::Tensor& destination) {
  if (destination.sizes() != source.sizes()) {
    destination.resize_(source.sizes());
  }
  return copy_from(source, destination, false);
}

at::Scalar local_scalar_dense(const at::Tensor& self) {
  const c10::DeviceGuard guard(self.device());
  const auto stream = current_stream(self.device().index());
  at::Scalar value;
  enqueue(stream, [&value, alias = cpu_alias(self)] { value = at::_local_scalar_dense(alias); });
  synchronize_stream(stream);
  return value;
}

// ---- kernels of their own -----------------------------------------------------------------------------------

// CPU's native_dropout draws from the CPU's default generator, which has no generator argument to replace: the
// same op written with bernoulli_, which takes the device's.
std::tuple<at::Tensor, at::Tensor> native_dropout(const at::Tensor& input, double p, std::optional<bool> train) {
  if (input.numel() == 0) {
    return {input, at::empty_like(input, input.options().dtype(c10::kBool))};
  }
  if (train.has_value() && !*train) {
    return {input.clone(), at::ones_like(input, input.options().dtype(c10::kBool))};
  }
  auto mask = at::empty_like(input, input.options().dtype(c10::kBool)).bernoulli_(1 - p);
  const double scale = p == 1 ? 0.0 : 1.0 / (1.0 - p);
  return {input * mask * scale, mask};
}

// The fused LSTM cell that nn.LSTM calls on accelerators (CUDA's kernel, which the CPU lacks), written with ops;
// its workspace holds the activated gates, which the backward below reads.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_lstm_cell(
    const at::Tensor& input_gates, const at::Tensor& hidden_gates, const at::Tensor& cx,
    const std::optional<at::Tensor>& input_bias, const std::optional<at::Tensor>& hidden_bias) {
  auto gates = input_gates + hidden_gates;
  if (input_bias.has_value() && input_bias->defined()) {
    gates = gates + *input_bias + *hidden_bias;
  }
  auto chunks = gates.chunk(4, 1);
  auto in = chunks[0].sigmoid(), forget = chunks[1].sigmoid(), cell = chunks[2].tanh(), out = chunks[3].sigmoid();
  auto cy = forget * cx + in * cell;
  auto hy = out * cy.tanh();
  return {hy, cy, at::cat({in, forget, cell, out}, 1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_lstm_cell_backward(
    const std::optional<at::Tensor>& grad_hy, const std::optional<at::Tensor>& grad_cy, const at::Tensor& cx,
    const at::Tensor& cy, const at::Tensor& workspace, bool has_bias) {
  auto gates = workspace.chunk(4, 1);
  const auto &in = gates[0], &forget = gates[1], &cell = gates[2], &out = gates[3];
  const auto tanh_cy = cy.tanh();
  const bool has_grad_hy = grad_hy.has_value() && grad_hy->defined();
  const bool has_grad_cy = grad_cy.has_value() && grad_cy->defined();
  auto d_hy = has_grad_hy ? *grad_hy : at::zeros_like(cy);
  auto d_cy = (has_grad_cy ? *grad_cy : at::zeros_like(cy)) + d_hy * out * (1 - tanh_cy * tanh_cy);
  auto d_in = d_cy * cell * in * (1 - in);
  auto d_forget = d_cy * cx * forget * (1 - forget);
  auto d_cell = d_cy * in * (1 - cell * cell);
  auto d_out = d_hy * tanh_cy * out * (1 - out);
  auto grad_gates = at::cat({d_in, d_forget, d_cell, d_out}, 1);
  return {grad_gates, d_cy * forget, has_bias ? grad_gates.sum(0) : at::Tensor()};
}

// ---- registration ------------------------------------------------------------------------------------------

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided);
  m.impl("as_strided", at::native::as_strided_tensorimpl);
  m.impl("view", at::native::view);
  m.impl("_reshape_alias", at::native::_reshape_alias);
  m.impl("resize_", resize_);
  m.impl("set_.source_Storage_storage_offset", set_source_storage_offset);
  m.impl("set_.source_Storage", set_source_storage);
  m.impl("set_.source_Tensor", set_source_tensor);
  m.impl("set_", set_empty);
  m.impl("record_stream", record_stream_kernel);
  m.impl("_has_compatible_shallow_copy_type", has_compatible_shallow_copy_type);
  m.impl("_copy_from", copy_from);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
  m.impl("_local_scalar_dense", local_scalar_dense);
  m.impl("native_dropout", native_dropout);
  m.impl("_thnn_fused_lstm_cell", fused_lstm_cell);
  m.impl("_thnn_fused_lstm_cell_backward_impl", fused_lstm_cell_backward);
  // Composite on other backends, where they call convolution_overrideable, which the CPU has no kernel for.
  m.impl("convolution", torch::CppFunction::makeFromBoxedFunction<&fallback>());
  m.impl("convolution_backward", torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

// Autocast on the device: the matrix products and convolutions in lower precision, as on CUDA; every other op
// as it is (PyTorch registers no fallthrough for this backend's autocast key).
TORCH_LIBRARY_IMPL(_, AutocastPrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(aten, AutocastPrivateUse1, m){
    KERNEL_PRIVATEUSEONE(mm, lower_precision_fp) KERNEL_PRIVATEUSEONE(addmm, lower_precision_fp)
        KERNEL_PRIVATEUSEONE(bmm, lower_precision_fp) KERNEL_PRIVATEUSEONE(matmul, lower_precision_fp)
            KERNEL_PRIVATEUSEONE(linear, lower_precision_fp) KERNEL_PRIVATEUSEONE(conv2d, lower_precision_fp)}

// ---- the custom ops the Python module calls ----------------------------------------------------------------

int64_t op_device_count() {
  return device_count();
}

int64_t op_current_device() {
  return current_device();
}

void op_set_device(int64_t index) {
  set_device(static_cast<c10::DeviceIndex>(index));
}

void op_synchronize(int64_t index) {
  synchronize_device(static_cast<c10::DeviceIndex>(index));
}

void op_manual_seed(int64_t index, int64_t seed) {
  auto generator = default_generator(static_cast<c10::DeviceIndex>(index));
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_current_seed(static_cast<uint64_t>(seed));
}

int64_t op_initial_seed(int64_t index) {
  return static_cast<int64_t>(default_generator(static_cast<c10::DeviceIndex>(index)).current_seed());
}

at::Tensor op_get_rng_state(int64_t index) {
  auto generator = default_generator(static_cast<c10::DeviceIndex>(index));
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get_state();
}

void op_set_rng_state(int64_t index, const at::Tensor& state) {
  auto generator = default_generator(static_cast<c10::DeviceIndex>(index));
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_state(state);
}

void op_set_slowdown(int64_t index, double factor) {
  set_slowdown(static_cast<c10::DeviceIndex>(index), factor);
}

int64_t op_allocated_bytes(int64_t index) {
  return static_cast<int64_t>(allocated_bytes(static_cast<c10::DeviceIndex>(index)));
}

int64_t op_quarantined_blocks() {
  return static_cast<int64_t>(quarantined_blocks());
}

TORCH_LIBRARY(torch_dp_sim, m) {
  m.def("device_count() -> int", op_device_count);
  m.def("current_device() -> int", op_current_device);
  m.def("set_device(int index) -> ()", op_set_device);
  m.def("synchronize(int index) -> ()", op_synchronize);
  m.def("manual_seed(int index, int seed) -> ()", op_manual_seed);
  m.def("initial_seed(int index) -> int", op_initial_seed);
  m.def("get_rng_state(int index) -> Tensor", op_get_rng_state);
  m.def("set_rng_state(int index, Tensor state) -> ()", op_set_rng_state);
  m.def("set_slowdown(int index, float factor) -> ()", op_set_slowdown);
  m.def("allocated_bytes(int index) -> int", op_allocated_bytes);
  m.def("quarantined_blocks() -> int", op_quarantined_blocks);
}

}  // namespace
}  // namespace torch_dp::sim
