// Tests for LibTorch programs as they are written: plain torch::nn::Module subclasses (refused with an error that
// shows the fix where a replica needs clone(), run where none does), torch_dp::data_parallel with every module
// form torch::nn::parallel::data_parallel takes (std::shared_ptr<M>, module holders), and DataParallel's typed
// accessor module_as<M>() with the idioms for code that expects the module's own interface.

#include "helpers.h"

#include <ATen/DeviceAccelerator.h>
#include <torch_dp/torch_dp.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

using tdp_test::close64;
using tdp_test::Contains;
using tdp_test::cpus;
using tdp_test::f64;
using tdp_test::make_net;
using tdp_test::Net;
using tdp_test::NetImpl;
using torch::Tensor;

namespace {

// How the LibTorch examples write a module: torch::nn::Module, submodules registered in the constructor.
struct PlainNet : torch::nn::Module {
  PlainNet() {
    fc = register_module("fc", torch::nn::Linear(6, 3));
    to(torch::kFloat64);
  }
  Tensor forward(const Tensor& x) { return torch::tanh(fc(x)); }
  torch::nn::Linear fc{nullptr};
};

// The same as a module holder (TORCH_MODULE), still plain.
struct PlainHolderNetImpl : torch::nn::Module {
  PlainHolderNetImpl() {
    fc = register_module("fc", torch::nn::Linear(6, 3));
    to(torch::kFloat64);
  }
  Tensor forward(const Tensor& x) { return fc(x); }
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(PlainHolderNet);

// Cloneable, used as std::shared_ptr<M> (no holder), as upstream's data_parallel allows.
struct PlainCloneableNet : torch::nn::Cloneable<PlainCloneableNet> {
  PlainCloneableNet() { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(6, 8));
    fc2 = register_module("fc2", torch::nn::Linear(8, 2));
    to(torch::kFloat64);
  }
  Tensor forward(Tensor x) { return fc2(torch::relu(fc1(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};

// Derives from a Cloneable module without its own clone(): clone() gives the base class, not this one.
struct DerivedNet : PlainCloneableNet {};

// A function written for the module's own interface.
double sum_of_weights(PlainCloneableNet& net) {
  return net.fc1->weight.sum().item<double>() + net.fc2->weight.sum().item<double>();
}

// A function written for "something with forward": works with the module and with its DataParallel alike.
template <typename Model>
Tensor predict(Model& model, const Tensor& x) {
  return model->forward(x);
}

std::string message_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& error) {
    return error.what_without_backtrace();
  }
  FAIL("expected a c10::Error");
  return {};
}

void require_fix_shown(const std::string& text, const std::string& name) {
  CHECK_THAT(text, Contains("cannot replicate"));
  CHECK_THAT(text, Contains("does not implement clone()"));
  CHECK_THAT(text, Contains("a copy made with clone()"));
  CHECK_THAT(text, Contains("struct " + name + " : torch::nn::Cloneable<" + name + ">"));
  CHECK_THAT(text, Contains("void reset() override"));
}

}  // namespace

TEST_CASE("plain module: refused when the DataParallel is built for several replicas", "[libtorch_users]") {
  auto plain = std::make_shared<PlainNet>();
  const auto text = message_of([&] { torch_dp::DataParallel(plain, torch_dp::DataParallelOptions(cpus(2))); });
  CHECK_THAT(text, Contains("DataParallel: cannot replicate (anonymous namespace)::PlainNet:"));
  CHECK_THAT(text, Contains("2 replicas, on cpu, cpu"));
  require_fix_shown(text, "PlainNet");

  // A module holder of a plain module, and the functional form, the same.
  require_fix_shown(
      message_of([] { torch_dp::DataParallel(PlainHolderNet(), torch_dp::DataParallelOptions(cpus(3))); }),
      "PlainHolderNetImpl");
  require_fix_shown(
      message_of([&] { torch_dp::data_parallel(plain, torch::randn({4, 6}, f64), cpus(2)); }), "PlainNet");
}

TEST_CASE("plain module: runs where no replica needs clone()", "[libtorch_users]") {
  auto plain = std::make_shared<PlainNet>();
  auto x = torch::randn({5, 6}, f64);
  const auto expected = plain->forward(x);

  SECTION("one device that holds the module") {
    torch_dp::DataParallel parallel(plain, torch_dp::DataParallelOptions(cpus(1)));
    CHECK(close64(parallel->forward(x), expected));
    CHECK(close64(torch_dp::data_parallel(plain, x, cpus(1)), expected));
  }
  SECTION("several devices, but chunk sizes that run one replica") {
    torch_dp::DataParallel parallel(
        plain, torch_dp::DataParallelOptions(cpus(2)).chunk_sizes(std::vector<int64_t>{5, 0}));
    CHECK(close64(parallel->forward(x), expected));
    auto loss = parallel->forward(x).sum();
    loss.backward();
    CHECK(plain->fc->weight.grad().defined());
  }
}

TEST_CASE("plain module: where its type is erased, the first forward raises the same error", "[libtorch_users]") {
  auto plain = std::make_shared<PlainNet>();
  auto x = torch::randn({4, 6}, f64);

  SECTION("an AnyModule") {
    torch_dp::DataParallel parallel(torch::nn::AnyModule(plain), torch_dp::DataParallelOptions(cpus(2)));
    for (int attempt = 0; attempt < 2; ++attempt) {  // a second forward fails the same way, nothing half-built
      const auto text = message_of([&] { parallel->forward(x); });
      CHECK_THAT(text, Contains("DataParallel: cannot replicate (anonymous namespace)::PlainNet:"));
      CHECK_THAT(text, Contains("a replica on device cpu"));
      require_fix_shown(text, "PlainNet");
    }
  }
  SECTION("inside an nn::Sequential, which clones its parts") {
    torch::nn::Sequential sequential;
    sequential->push_back(plain);
    torch_dp::DataParallel parallel(sequential, torch_dp::DataParallelOptions(cpus(2)));
    const auto text = message_of([&] { parallel->forward(x); });
    CHECK_THAT(text, Contains("cannot replicate torch::nn::SequentialImpl"));
    CHECK_THAT(text, Contains(", used inside torch::nn::SequentialImpl,"));
    require_fix_shown(text, "PlainNet");
  }
  SECTION("a subclass of a Cloneable module, whose clone() gives the base class") {
    torch_dp::DataParallel parallel(std::make_shared<DerivedNet>(), torch_dp::DataParallelOptions(cpus(2)));
    const auto text = message_of([&] { parallel->forward(x); });
    CHECK_THAT(text, Contains("DerivedNet::clone() did not return a (anonymous namespace)::DerivedNet"));
  }
}

TEST_CASE("plain module: a Sequential of Cloneable parts replicates", "[libtorch_users]") {
  torch::nn::Sequential sequential(
      torch::nn::Linear(6, 4), torch::nn::Functional(torch::tanh), torch::nn::Linear(4, 2));
  sequential->to(torch::kFloat64);
  auto x = torch::randn({6, 6}, f64);
  torch_dp::DataParallel parallel(sequential, torch_dp::DataParallelOptions(cpus(3)));
  CHECK(close64(parallel->forward(x), sequential->forward(x)));
}

TEST_CASE("data_parallel: takes what torch::nn::parallel::data_parallel takes", "[libtorch_users]") {
  auto x = torch::randn({7, 6}, f64);

  SECTION("std::shared_ptr<M>, with upstream's argument order and defaults") {
    auto net = std::make_shared<PlainCloneableNet>();
    const auto expected = net->forward(x);
    CHECK(close64(torch_dp::data_parallel(net, x, cpus(2)), expected));
    CHECK(close64(torch_dp::data_parallel(net, x, cpus(3), torch::Device(torch::kCPU)), expected));
    CHECK(close64(torch_dp::data_parallel(net, x, cpus(2), std::nullopt, 0), expected));
    // dim: a batch of sequences split along dim 1.
    auto sequences = torch::randn({2, 7, 6}, f64);
    CHECK(close64(torch_dp::data_parallel(net, sequences, cpus(3), std::nullopt, 1), net->forward(sequences)));
    if (!at::getAccelerator(false)) {
      // devices = nullopt: every accelerator device; without one, the module itself runs.
      CHECK(close64(torch_dp::data_parallel(net, x), expected));
    }
    // Gradients reach the module like the unwrapped one's.
    auto reference = std::dynamic_pointer_cast<PlainCloneableNet>(net->clone());
    torch_dp::data_parallel(net, x, cpus(2)).pow(2).sum().backward();
    reference->forward(x).pow(2).sum().backward();
    CHECK(tdp_test::same_grads(*net, *reference));
  }
  SECTION("module holders: a TORCH_MODULE, a torch::nn module, nn::Sequential") {
    auto net = make_net();
    auto x10 = torch::randn({5, 10}, f64);
    CHECK(close64(torch_dp::data_parallel(net, x10, cpus(2)), net->forward(x10)));
    torch::nn::Linear linear(6, 3);
    linear->to(torch::kFloat64);
    CHECK(close64(torch_dp::data_parallel(linear, x, cpus(3)), linear->forward(x)));
    torch::nn::Sequential sequential(torch::nn::Linear(6, 2));
    sequential->to(torch::kFloat64);
    CHECK(close64(torch_dp::data_parallel(sequential, x, cpus(2)), sequential->forward(x)));
  }
}

TEST_CASE("module_as: the wrapped module as its own type", "[libtorch_users]") {
  auto net = make_net();
  torch_dp::DataParallel parallel(net, torch_dp::DataParallelOptions(cpus(2)));

  std::shared_ptr<NetImpl> impl = parallel->module_as<NetImpl>();
  CHECK(impl.get() == net.get());
  Net holder = parallel->module_as<Net>();
  CHECK(holder.get() == net.get());
  CHECK(parallel->module_as<torch::nn::Module>().get() == net.get());

  const auto text = message_of([&] { parallel->module_as<torch::nn::LinearImpl>(); });
  CHECK_THAT(
      text, Contains("DataParallel::module_as<torch::nn::LinearImpl>: the wrapped module is a tdp_test::NetImpl"));
  CHECK_THAT(text, Contains("ask for module_as<tdp_test::NetImpl>()"));
  CHECK_THROWS_AS(parallel->module_as<torch::nn::Linear>(), c10::Error);
}

TEST_CASE("module_as: the idioms for code written for the module", "[libtorch_users]") {
  auto net = std::make_shared<PlainCloneableNet>();
  torch_dp::DataParallel parallel(net, torch_dp::DataParallelOptions(cpus(2)));
  auto x = torch::randn({6, 6}, f64);

  // A function taking the module's own type gets the module itself (not a copy) through module_as.
  CHECK(sum_of_weights(*parallel->module_as<PlainCloneableNet>()) == sum_of_weights(*net));
  // A template over "a module with forward" takes the DataParallel as it is, and runs it in parallel.
  CHECK(close64(predict(parallel, x), predict(net, x)));
  // Code that stores modules type-erased takes it as an AnyModule, or as a part of an nn::Sequential.
  torch::nn::AnyModule any(parallel);
  CHECK(close64(any.forward(x), net->forward(x)));
  torch::nn::Sequential pipeline(parallel, torch::nn::Functional(torch::sigmoid));
  CHECK(close64(pipeline->forward(x), torch::sigmoid(net->forward(x))));
}
