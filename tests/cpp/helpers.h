#pragma once
// Shared helpers for the Catch2 tests: v2/v3 matcher names, tensor comparisons, a deadlock watchdog, and the small
// modules and comparisons that the DataParallel tests (test_data_parallel*.cpp) share.

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
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
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

/// Defined, same shape, dtype and device, and values equal up to `tol` (relative and absolute). The default is
/// tight enough that only float64 rounding differences pass; a looser `tol` is for float32 or for the GPU.
inline bool close64(const at::Tensor& a, const at::Tensor& b, double tol = 1e-12) {
  return a.defined() && b.defined() && a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         a.device() == b.device() && at::allclose(a, b, tol, tol);
}

const c10::Device kCpu(c10::kCPU);

/// The folder examples/python/export_model.py wrote (model.pt, model.pt2, input.pt, expected.pt), from the
/// environment variable `variable` (scripts/test.sh sets TORCH_DP_EXPORTED_DIR; scripts/gpu_check.sh
/// TORCH_DP_EXPORTED_CUDA_DIR for `device` cuda). Fails the test, not a skip, when it is not set.
inline std::string exported_dir(const char* variable, const char* device) {
  const char* dir = std::getenv(variable);
  if (dir == nullptr || *dir == '\0') {
    FAIL(
        std::string(variable) + " is not set: these tests need the models export_model.py writes, compiled for " +
        device + ". Run `python examples/python/export_model.py <dir>" +
        (std::string(device) == "cpu" ? "" : " --device cuda") + "` and set " + variable +
        "=<dir> (scripts/test.sh does both).");
  }
  return dir;
}

/// A tensor written by Python's torch.save.
inline at::Tensor load_tensor(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  REQUIRE(file.good());
  std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toTensor();
}

inline std::vector<c10::Device> cpus(size_t n) {
  return std::vector<c10::Device>(n, kCpu);
}

/// What fn threw (its what()), or "(no error)": for CHECK_THAT on an error's text where a REQUIRE_THROWS_WITH would
/// print a c10::Error's backtrace too.
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& error) {
    return error.what();
  }
  return "(no error)";
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

// ---- the DataParallel tests' modules and comparisons ----------------------------------------------------------

const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

/// `x` and `y` hold tensors of the same names (as many, whatever their order), and `same(mine, theirs)` holds for
/// the two tensors of every name.
template <typename Same>
bool match_by_name(
    const torch::OrderedDict<std::string, at::Tensor>& x, const torch::OrderedDict<std::string, at::Tensor>& y,
    const Same& same) {
  if (x.size() != y.size()) {
    return false;
  }
  for (const auto& item : x) {
    const auto* other = y.find(item.key());
    if (other == nullptr || !same(item.value(), *other)) {
      return false;
    }
  }
  return true;
}

/// Every parameter of `a` has one of the same name in `b`, close64 up to `tol`.
inline bool same_parameters(torch::nn::Module& a, torch::nn::Module& b, double tol = 1e-12) {
  return match_by_name(a.named_parameters(), b.named_parameters(), [tol](const at::Tensor& x, const at::Tensor& y) {
    return close64(x, y, tol);
  });
}

/// The gradients of the parameters, in order: both undefined, or close64 up to `tol`.
inline bool same_grads(torch::nn::Module& a, torch::nn::Module& b, double tol = 1e-12) {
  auto pa = a.parameters();
  auto pb = b.parameters();
  if (pa.size() != pb.size()) {
    return false;
  }
  for (size_t k = 0; k < pa.size(); ++k) {
    if (!pa[k].grad().defined() && !pb[k].grad().defined()) {
      continue;
    }
    if (!close64(pa[k].grad(), pb[k].grad(), tol)) {
      return false;
    }
  }
  return true;
}

/// A deep copy of a module holder (the module must be Cloneable).
template <typename Holder>
Holder clone_of(const Holder& module) {
  return Holder(std::dynamic_pointer_cast<typename Holder::ContainedType>(module->clone()));
}

// A small MLP, Cloneable, so that it can be replicated.
struct NetImpl : torch::nn::Cloneable<NetImpl> {
  NetImpl() { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(10, 20));
    fc2 = register_module("fc2", torch::nn::Linear(20, 5));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::tanh(fc1(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Net);

/// The MLP in float64.
inline Net make_net() {
  Net net;
  net->to(torch::kFloat64);
  return net;
}

/// An empty TorchScript module in training mode, to `define` a forward on.
inline torch::jit::Module scripted_module(const std::string& name) {
  torch::jit::Module module(name);
  module.register_attribute("training", c10::BoolType::get(), true);
  return module;
}

/// A TorchScript network with a submodule, a plain int attribute read by forward, and a BatchNorm in between:
/// forward(x) = scale * fc2(relu(batch_norm(fc1(x)))), on the CPU, in float64.
inline torch::jit::Module make_scripted_net() {
  auto fc = [](const std::string& name, int64_t in, int64_t out) {
    auto module = scripted_module(name);
    module.register_parameter("weight", (torch::randn({out, in}, f64) * 0.3).requires_grad_(), false);
    module.register_parameter("bias", (torch::randn({out}, f64) * 0.1).requires_grad_(), false);
    module.define(R"(
def forward(self, x):
    return torch.addmm(self.bias, x, self.weight.t())
)");
    return module;
  };
  auto bn = scripted_module("Bn");
  bn.register_parameter("weight", (torch::rand({6}, f64) + 0.5).requires_grad_(), false);
  bn.register_parameter("bias", (torch::randn({6}, f64) * 0.1).requires_grad_(), false);
  bn.register_buffer("running_mean", torch::zeros({6}, f64));
  bn.register_buffer("running_var", torch::ones({6}, f64));
  bn.define(R"(
def forward(self, x):
    return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, self.training, 0.1,
                            1e-5, False)
)");
  auto net = scripted_module("Net");
  net.register_module("fc1", fc("Fc1", 4, 6));
  net.register_module("bn", bn);
  net.register_module("fc2", fc("Fc2", 6, 3));
  net.register_attribute("scale", c10::IntType::get(), int64_t{1});
  net.define(R"(
def forward(self, x):
    return self.scale * self.fc2.forward(torch.relu(self.bn.forward(self.fc1.forward(x))))
)");
  return net;
}

/// A plain SGD step on a TorchScript module's parameters, whose gradients it then zeroes.
inline void sgd_step(const torch::jit::Module& module, double lr) {
  torch::NoGradGuard no_grad;
  for (auto p : module.parameters()) {
    p.sub_(p.grad() * lr);
    p.mutable_grad().zero_();
  }
}

// A conv net with BatchNorm, for the buffer and train/eval tests.
struct ConvBnImpl : torch::nn::Cloneable<ConvBnImpl> {
  ConvBnImpl() { reset(); }
  void reset() override {
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 4, 3).padding(1)));
    bn = register_module("bn", torch::nn::BatchNorm2d(4));
    fc = register_module("fc", torch::nn::Linear(4, 2));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = torch::relu(bn(conv(x)));
    return fc(h.mean({2, 3}));
  }
  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(ConvBn);

// Several tensor inputs and a non-tensor one, two tensor outputs.
struct TwoInTwoOutImpl : torch::nn::Cloneable<TwoInTwoOutImpl> {
  TwoInTwoOutImpl() { reset(); }
  void reset() override { w = register_parameter("w", torch::randn({3}, f64)); }
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& a, const torch::Tensor& b, double scale) {
    return {(a * w + b) * scale, (a * b).sum(1)};
  }
  torch::Tensor w;
};
TORCH_MODULE(TwoInTwoOut);

// IValues in and out: takes a tuple (a, b), returns (a * w, {"sum": a + b, "rows": a.sum(1)}).
struct IValueModuleImpl : torch::nn::Cloneable<IValueModuleImpl> {
  IValueModuleImpl() { reset(); }
  void reset() override { w = register_parameter("w", torch::randn({3}, f64)); }
  c10::IValue forward(const c10::IValue& input) {
    const auto& elements = input.toTupleRef().elements();
    auto a = elements[0].toTensor();
    auto b = elements[1].toTensor();
    c10::Dict<std::string, torch::Tensor> dict;
    dict.insert("sum", a + b);
    dict.insert("rows", a.sum(1));
    return c10::ivalue::Tuple::create({c10::IValue(a * w), c10::IValue(dict)});
  }
  torch::Tensor w;
};
TORCH_MODULE(IValueModule);

// Records, per call, the thread-local modes a replica ran under. The recorder is shared by the clones (a
// Cloneable clone copy-constructs the module, so the shared_ptr is copied).
struct Recorder {
  std::mutex mutex;
  std::vector<bool> grad_enabled;
  std::vector<bool> training;
  std::vector<bool> inference;
  void clear() {
    std::lock_guard<std::mutex> lock(mutex);
    grad_enabled.clear();
    training.clear();
    inference.clear();
  }
};

struct ProbeImpl : torch::nn::Cloneable<ProbeImpl> {
  explicit ProbeImpl(std::shared_ptr<Recorder> recorder) : recorder(std::move(recorder)) { reset(); }
  void reset() override { w = register_parameter("w", torch::full({1}, 2.0, f64)); }
  torch::Tensor forward(const torch::Tensor& x) {
    {
      std::lock_guard<std::mutex> lock(recorder->mutex);
      recorder->grad_enabled.push_back(torch::GradMode::is_enabled());
      recorder->training.push_back(is_training());
      recorder->inference.push_back(c10::InferenceMode::is_enabled());
    }
    return x * w;
  }
  std::shared_ptr<Recorder> recorder;
  torch::Tensor w;
};
TORCH_MODULE(Probe);

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
