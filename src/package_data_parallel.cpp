#include <torch_dp/detail/split_arguments.h>
#include <torch_dp/gather.h>
#include <torch_dp/package_data_parallel.h>

#include "message.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <exception>
#include <filesystem>
#include <mutex>
#include <optional>
#include <utility>

namespace torch_dp {

// Note [Package replicas]
// ~~~~~~~~~~~~~~~~~~~~~~~
// An AOTInductor package is a compiled model: a shared library with its weights, behind
// torch::inductor::AOTIModelPackageLoader. It has no module to clone and nothing to refresh, so a replica is simply
// a loader of its own per device of the list, made once in the constructor (the loader extracts the package into a
// folder of its own and loads that copy of the library, so loaders never share state) and kept. A CUDA loader runs
// on the device it was made for (device_index), a CPU loader anywhere; several CPU entries make several CPU loaders,
// each run by its own worker thread. Everything else is the C++ module's machinery: the same split
// (detail::plan_split), the same persistent workers (run_replicas, so the caller's thread-local state and current
// stream reach them, and a failure is a ReplicaError naming the replica), the same gather.
//
// What can be checked before anything is loaded is checked first, in this order: the file exists; it is an
// AOTInductor package (its metadata reads); the devices asked for are of the type it was compiled for (its
// metadata's AOTI_DEVICE_KEY, "cpu" or "cuda" in torch 2.13). Only then are loaders made, so that a CUDA package
// asked to run on the CPU, or the reverse, is refused with both device types named instead of failing inside the
// runner.

namespace {

constexpr const char* kModelName = "model";
constexpr const char* kDeviceKey = "AOTI_DEVICE_KEY";

std::string first_line(const std::string& text) {
  const auto end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

std::string error_text(const std::exception& error) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&error)) {
    return c10_error->what_without_backtrace();
  }
  return error.what();
}

}  // namespace

namespace detail {

std::unordered_map<std::string, std::string> read_package_metadata(const std::string& path) {
  std::error_code code;
  TORCH_CHECK_VALUE(
      std::filesystem::exists(path, code),
      message(
          "PackageDataParallel: no file at '", path,
          "': expected an AOTInductor package (.pt2) written by torch._inductor.aoti_compile_and_package"));
  try {
    return torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, kModelName);
  } catch (const std::exception& error) {
    TORCH_CHECK_VALUE(
        false, message(
                   "PackageDataParallel: '", path,
                   "' is not an AOTInductor package (.pt2) with a model named 'model', as "
                   "torch._inductor.aoti_compile_and_package writes (a TorchScript file is loaded with "
                   "torch::jit::load and runs with ScriptDataParallel): ",
                   first_line(error_text(error))));
  }
}

std::optional<c10::DeviceType> package_device_type(const std::unordered_map<std::string, std::string>& metadata) {
  auto it = metadata.find(kDeviceKey);
  if (it == metadata.end() || it->second.empty()) {
    return std::nullopt;
  }
  return c10::Device(it->second).type();
}

void check_package_devices(
    const std::string& path, const std::unordered_map<std::string, std::string>& metadata,
    at::ArrayRef<c10::Device> devices) {
  auto type = package_device_type(metadata);
  if (!type) {
    return;  // a package without the key: the loader says what it cannot run
  }
  for (const auto& device : devices) {
    TORCH_CHECK_VALUE(
        device.type() == *type,
        message(
            "PackageDataParallel: '", path, "' was compiled for ", c10::DeviceTypeName(*type, true),
            ", but the devices asked for include ", device.str(), " (devices ", devices,
            "); an AOTInductor package runs only on the device type it was compiled for: use ",
            c10::DeviceTypeName(*type, true), " devices, or compile the package for ",
            c10::DeviceTypeName(device.type(), true), " (export the model with its weights and inputs on ",
            c10::DeviceTypeName(device.type(), true), ")"));
  }
}

}  // namespace detail

struct PackageDataParallel::State {
  std::string path;
  DataParallelOptions options;
  std::unordered_map<std::string, std::string> metadata;
  std::vector<std::string> call_spec;
  c10::DeviceType device_type = c10::kCPU;
  std::vector<c10::Device> devices;
  std::vector<size_t> running;  // the indices of the devices that run a replica (chunk size not 0)
  std::vector<c10::Device> replica_devices;
  std::vector<std::unique_ptr<torch::inductor::AOTIModelPackageLoader>> loaders;  // one per device
  size_t num_loads = 0;
  WorkerPool pool;
  std::mutex mutex;  // one forward at a time

  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> load(c10::Device device) {
    ++num_loads;
    const c10::DeviceIndex index = device.is_cpu() ? -1 : device.index();
    try {
      return std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, kModelName, false, 1, index);
    } catch (const std::exception& error) {
      TORCH_CHECK(
          false,
          detail::message(
              "PackageDataParallel: could not load the AOTInductor package '", path, "' on device ", device.str(),
              " (a package compiled by another torch version, or for another machine, does not load): ",
              error_text(error)));
    }
  }
};

PackageDataParallel::PackageDataParallel(const std::string& path, DataParallelOptions options)
    : state_(std::make_shared<State>()) {
  auto& state = *state_;
  state.path = path;
  state.metadata = detail::read_package_metadata(path);
  state.device_type = detail::package_device_type(state.metadata).value_or(c10::kCPU);
  if (options.devices().empty() && state.device_type == c10::kCPU) {
    options.devices({c10::Device(c10::kCPU)});  // a CPU package runs on the CPU, accelerator or not
  }
  // Every device's loader is its own (no replica is the model itself), so the first may run nothing too.
  auto resolved = detail::resolve_devices(options, /*first_may_be_empty=*/true);
  TORCH_CHECK_VALUE(
      !resolved.devices.empty(),
      detail::message(
          "PackageDataParallel: '", path, "' was compiled for ", c10::DeviceTypeName(state.device_type, true),
          ", and no devices were given; this machine has no ", c10::DeviceTypeName(state.device_type, true),
          " device to default to"));
  detail::check_package_devices(path, state.metadata, resolved.devices);
  detail::check_devices_exist(resolved.devices, options.output_device());
  state.options = std::move(options);
  state.devices = std::move(resolved.devices);
  state.replica_devices = std::move(resolved.replica_devices);
  state.running = detail::devices_that_run(state.options.chunk_sizes(), state.devices.size());
  state.loaders.reserve(state.devices.size());
  for (const auto& device : state.devices) {
    state.loaders.push_back(state.load(device));
  }
  state.call_spec = state.loaders.front()->get_call_spec();
}

std::vector<at::Tensor> PackageDataParallel::forward(const std::vector<at::Tensor>& inputs) {
  auto& state = *state_;
  TORCH_CHECK_VALUE(!inputs.empty(), "PackageDataParallel: forward needs at least one input tensor to split");
  if (c10::GradMode::is_enabled()) {
    for (size_t k = 0; k < inputs.size(); ++k) {
      TORCH_CHECK(
          !inputs[k].defined() || !inputs[k].requires_grad(),
          detail::message(
              "PackageDataParallel: input ", k,
              " requires grad, but an AOTInductor package is inference only: it holds no autograd graph, so no "
              "gradient would reach it. Call forward under torch::NoGradGuard (Python: torch.no_grad()) or pass "
              "detached inputs"));
    }
  }
  at::NoGradGuard no_grad;
  std::unique_lock<std::mutex> guard(state.mutex);
  detail::SplitPlan plan;
  plan.devices = state.devices;
  plan.sizes = state.options.chunk_sizes();
  plan.dim = state.options.dim();
  detail::plan_split(plan, inputs);
  std::vector<std::vector<at::Tensor>> chunks;  // chunks[k][i]: input k's chunk for replica i
  chunks.reserve(inputs.size());
  for (const auto& input : inputs) {
    chunks.push_back(detail::split_tensor(input, plan));
  }
  const auto count = static_cast<size_t>(plan.count);
  std::vector<std::vector<at::Tensor>> results(count);
  std::vector<c10::Device> used(state.replica_devices.begin(), state.replica_devices.begin() + count);
  run_replicas(
      state.pool, used,
      [&](size_t i) { results[i] = state.loaders[state.running[i]]->run(detail::replica_column(chunks, i)); },
      state.options.issuing());
  guard.unlock();
  const auto destination = output_device();
  const auto num_outputs = results.front().size();
  std::vector<at::Tensor> outputs;
  outputs.reserve(num_outputs);
  for (size_t j = 0; j < num_outputs; ++j) {
    std::vector<at::Tensor> per_replica;
    per_replica.reserve(count);
    for (auto& result : results) {
      per_replica.push_back(std::move(result[j]));
    }
    outputs.push_back(gather(per_replica, destination, state.options.dim()));
  }
  return outputs;
}

at::Tensor PackageDataParallel::forward(const at::Tensor& input) {
  auto outputs = forward(std::vector<at::Tensor>{input});
  TORCH_CHECK(
      outputs.size() == 1, detail::message(
                               "PackageDataParallel: forward(Tensor) needs a package with one output, but '",
                               state_->path, "' has ", outputs.size(), "; call forward(std::vector<at::Tensor>)"));
  return outputs.front();
}

const std::string& PackageDataParallel::path() const {
  return state_->path;
}

const std::unordered_map<std::string, std::string>& PackageDataParallel::metadata() const {
  return state_->metadata;
}

const std::vector<std::string>& PackageDataParallel::call_spec() const {
  return state_->call_spec;
}

c10::DeviceType PackageDataParallel::package_device_type() const {
  return state_->device_type;
}

const DataParallelOptions& PackageDataParallel::options() const {
  return state_->options;
}

const std::vector<c10::Device>& PackageDataParallel::devices() const {
  return state_->devices;
}

c10::Device PackageDataParallel::output_device() const {
  return state_->options.output_device().value_or(state_->devices.front());
}

WorkerPool& PackageDataParallel::pool() {
  return state_->pool;
}

size_t PackageDataParallel::num_loads() const {
  return state_->num_loads;
}

}  // namespace torch_dp
