#include <torch_dp/detail/parallel_engine.h>
#include <torch_dp/detail/split_arguments.h>
#include <torch_dp/gather.h>
#include <torch_dp/package_data_parallel.h>

#include "message.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <exception>
#include <filesystem>
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

namespace {

std::unique_ptr<torch::inductor::AOTIModelPackageLoader> load(const std::string& path, c10::Device device) {
  const c10::DeviceIndex index = device.is_cpu() ? -1 : device.index();
  try {
    return std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, kModelName, false, 1, index);
  } catch (const std::exception& error) {
    TORCH_CHECK(
        false, detail::message(
                   "PackageDataParallel: could not load the AOTInductor package '", path, "' on device ", device.str(),
                   " (a package compiled by another torch version, or for another machine, does not load): ",
                   error_text(error)));
  }
}

// The options as the engine takes them: a CPU package runs on the CPU when no devices are named, accelerator or
// not.
DataParallelOptions package_options(DataParallelOptions options, c10::DeviceType device_type) {
  if (options.devices().empty() && device_type == c10::kCPU) {
    options.devices({c10::Device(c10::kCPU)});
  }
  return options;
}

// What sets a package's engine apart: every device's loader is its own (no replica is the model itself), so the
// first may run nothing too; a package has no random ops to order; the devices must be of the package's type.
detail::FrontEnd package_front_end(
    const std::string& path, const std::unordered_map<std::string, std::string>& metadata,
    c10::DeviceType device_type) {
  detail::FrontEnd front_end("PackageDataParallel");
  front_end.first_may_be_empty = true;
  front_end.orders_random_ops = false;
  front_end.check_devices = [path, metadata, device_type](const std::vector<c10::Device>& devices) {
    TORCH_CHECK_VALUE(
        !devices.empty(),
        detail::message(
            "PackageDataParallel: '", path, "' was compiled for ", c10::DeviceTypeName(device_type, true),
            ", and no devices were given; this machine has no ", c10::DeviceTypeName(device_type, true),
            " device to default to"));
    detail::check_package_devices(path, metadata, devices);
  };
  return front_end;
}

}  // namespace

struct PackageDataParallel::State {
  State(std::string path_, std::unordered_map<std::string, std::string> metadata_, DataParallelOptions options)
      : path(std::move(path_)),
        metadata(std::move(metadata_)),
        device_type(detail::package_device_type(metadata).value_or(c10::kCPU)),
        engine(package_options(std::move(options), device_type), package_front_end(path, metadata, device_type)),
        running(detail::devices_that_run(engine.options().chunk_sizes(), engine.devices().size())) {}

  std::string path;
  std::unordered_map<std::string, std::string> metadata;
  c10::DeviceType device_type;
  detail::ParallelEngine engine;  // devices, lock, pool, split and run (Note [One C++ engine])
  std::vector<size_t> running;    // the indices of the devices that run a replica (chunk size not 0)
  std::vector<std::unique_ptr<torch::inductor::AOTIModelPackageLoader>> loaders;  // one per device
  std::vector<std::string> call_spec;
};

PackageDataParallel::PackageDataParallel(const std::string& path, DataParallelOptions options) {
  auto metadata = detail::read_package_metadata(path);
  state_ = std::make_shared<State>(path, std::move(metadata), std::move(options));
  auto& state = *state_;
  state.loaders.reserve(state.engine.devices().size());
  for (const auto& device : state.engine.devices()) {
    state.loaders.push_back(load(path, device));
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
  using Loader = torch::inductor::AOTIModelPackageLoader;
  auto results = state.engine.run<std::vector<at::Tensor>>(
      inputs,
      [&](detail::SplitPlan& plan) {
        std::vector<std::vector<at::Tensor>> chunks;  // chunks[k][i]: input k's chunk for replica i
        chunks.reserve(inputs.size());
        for (const auto& input : inputs) {
          chunks.push_back(detail::split_tensor(input, plan));
        }
        return chunks;
      },
      [&](size_t count) {
        std::vector<Loader*> loaders;  // replica i: the loader of the i-th device that runs one
        loaders.reserve(count);
        for (size_t i = 0; i < count; ++i) {
          loaders.push_back(state.loaders[state.running[i]].get());
        }
        return loaders;
      },
      [](Loader* loader, const std::vector<std::vector<at::Tensor>>& chunks, size_t i) {
        return loader->run(detail::replica_column(chunks, i));
      });
  const auto destination = output_device();
  const auto num_outputs = results.front().size();
  std::vector<at::Tensor> outputs;
  outputs.reserve(num_outputs);
  for (size_t j = 0; j < num_outputs; ++j) {
    std::vector<at::Tensor> per_replica;
    per_replica.reserve(results.size());
    for (auto& result : results) {
      per_replica.push_back(std::move(result[j]));
    }
    outputs.push_back(gather(per_replica, destination, state.engine.options().dim()));
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
  return state_->engine.options();
}

const std::vector<c10::Device>& PackageDataParallel::devices() const {
  return state_->engine.devices();
}

c10::Device PackageDataParallel::output_device() const {
  return state_->engine.output_device();
}

WorkerPool& PackageDataParallel::pool() {
  return state_->engine.pool();
}

size_t PackageDataParallel::num_loads() const {
  return state_->loaders.size();
}

}  // namespace torch_dp
