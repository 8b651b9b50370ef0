// Tests for torch_dp::ScriptDataParallel, on CPU replica lists: TorchScript modules (built here with
// torch::jit::Module::define, as torch::jit::load would give them) against the same module on the whole batch:
// forward over uneven, small and chunk_sizes batches, IValue inputs and outputs, training with several SGD steps
// (shared and copied tensors), BatchNorm's replica-0 rule, every change to the module seen by the next call.

#include "helpers.h"

#include "test_access.h"

#include <torch_dp/script_data_parallel.h>

#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>

#include <string>
#include <vector>

using tdp_test::close64;
using tdp_test::Contains;
using tdp_test::cpus;
using tdp_test::f64;
using tdp_test::make_scripted_net;
using tdp_test::scripted_module;
using tdp_test::sgd_step;
using torch::Tensor;

namespace {

std::vector<Tensor> tensors(const torch::jit::Module& module) {
  std::vector<Tensor> result;
  for (const auto& p : module.parameters()) {
    result.push_back(p);
  }
  for (const auto& b : module.buffers()) {
    result.push_back(b);
  }
  return result;
}

bool same_tensors(const torch::jit::Module& a, const torch::jit::Module& b, double tol = 1e-10) {
  const auto x = tensors(a);
  const auto y = tensors(b);
  bool same = x.size() == y.size();
  for (size_t i = 0; same && i < x.size(); ++i) {
    same = close64(x[i], y[i], tol);
  }
  return same;
}

}  // namespace

TEST_CASE("ScriptDataParallel: forward equals the module on the whole batch", "[script]") {
  const size_t n = GENERATE(1, 2, 3);
  const int64_t rows = GENERATE(7, 2);
  CAPTURE(n, rows);
  torch::manual_seed(5);
  auto module = make_scripted_net();
  module.eval();
  auto reference = module.deepcopy();
  torch_dp::ScriptDataParallel parallel(module, torch_dp::DataParallelOptions(cpus(n)));
  auto x = torch::randn({rows, 4}, f64);
  auto y = parallel.forward(x);
  CHECK(close64(y, reference.forward({x}).toTensor()));
}

TEST_CASE("ScriptDataParallel: chunk_sizes with an empty chunk", "[script]") {
  torch::manual_seed(6);
  auto module = make_scripted_net();
  module.eval();
  auto reference = module.deepcopy();
  torch_dp::DataParallelOptions options(cpus(3));
  options.chunk_sizes(std::vector<int64_t>{3, 0, 5});
  torch_dp::ScriptDataParallel parallel(module, options);
  auto x = torch::randn({8, 4}, f64);
  CHECK(close64(parallel.forward(x), reference.forward({x}).toTensor()));
}

TEST_CASE("ScriptDataParallel: IValue inputs, keyword arguments and a dict output", "[script]") {
  torch::manual_seed(7);
  auto module = scripted_module("Pairs");
  module.register_parameter("w", torch::randn({3}, f64), false);
  module.define(R"(
def forward(self, pair: Tuple[Tensor, Tensor], shift: float, extra: Optional[Tensor] = None) -> Dict[str, Tensor]:
    a, b = pair
    out = a * self.w + b + shift
    if extra is not None:
        out = out + extra
    return {"out": out, "rows": out.sum(1)}
)");
  auto reference = module.deepcopy();
  torch_dp::ScriptDataParallel parallel(module, torch_dp::DataParallelOptions(cpus(3)));
  auto a = torch::randn({5, 3}, f64);
  auto b = torch::randn({5, 3}, f64);
  auto extra = torch::randn({5, 3}, f64);
  auto pair = c10::ivalue::Tuple::create({a, b});
  auto output = parallel.forward({pair, 0.5}, {{"extra", extra}}).toGenericDict();
  auto expected = reference.forward({pair, 0.5}, {{"extra", extra}}).toGenericDict();
  CHECK(close64(output.at("out").toTensor(), expected.at("out").toTensor()));
  CHECK(close64(output.at("rows").toTensor(), expected.at("rows").toTensor()));
}

TEST_CASE("ScriptDataParallel: training matches the whole batch over several SGD steps", "[script]") {
  const bool copy_everything = GENERATE(false, true);
  const size_t n = GENERATE(2, 3);
  CAPTURE(copy_everything, n);
  torch::manual_seed(8);
  auto module = make_scripted_net();
  torch::manual_seed(8);
  auto reference = make_scripted_net();  // not deepcopy(), whose parameters do not require grad
  torch_dp::ScriptDataParallel parallel(module, torch_dp::DataParallelOptions(cpus(n)));
  if (copy_everything) {  // later replicas hold coalesced copies, as on distinct devices
    torch_dp::detail::TestAccess::copy_everything(parallel);
  }
  for (int step = 0; step < 3; ++step) {
    auto x = torch::randn({7, 4}, f64);
    auto target = torch::randn({7, 3}, f64);
    auto loss = (parallel.forward(x) - target).pow(2).sum();
    // BatchNorm in training mode normalises per replica, so the reference runs each replica's chunk.
    std::vector<Tensor> chunks;
    for (const auto& chunk : x.chunk(static_cast<int64_t>(n))) {
      chunks.push_back(reference.forward({chunk}).toTensor());
    }
    auto expected = (torch::cat(chunks) - target).pow(2).sum();
    CHECK(close64(loss, expected));
    loss.backward();
    expected.backward();
    sgd_step(module, 0.05);
    sgd_step(reference, 0.05);
    // The reference ran every chunk through one module, so its running statistics moved n times; the
    // parameters are what must agree.
    const auto a = module.parameters();
    const auto b = reference.parameters();
    auto it = b.begin();
    for (const auto& p : a) {
      CHECK(close64(p, *it, 1e-10));
      ++it;
    }
  }
}

TEST_CASE("ScriptDataParallel: BatchNorm statistics are the first replica's", "[script]") {
  torch::manual_seed(9);
  auto module = make_scripted_net();
  auto reference = module.deepcopy();
  torch_dp::ScriptDataParallel parallel(module, torch_dp::DataParallelOptions(cpus(3)));
  auto x = torch::randn({9, 4}, f64);
  parallel.forward(x);
  reference.forward({x.narrow(0, 0, 3)});
  CHECK(same_tensors(module, reference));
  // In eval mode the statistics are used and left alone.
  parallel.eval();
  auto y = parallel.forward(x);
  reference.eval();
  CHECK(close64(y, reference.forward({x}).toTensor()));
  CHECK(same_tensors(module, reference));
}

TEST_CASE("ScriptDataParallel: every change to the module is seen by the next call", "[script]") {
  const bool copy_everything = GENERATE(false, true);
  CAPTURE(copy_everything);
  torch::manual_seed(10);
  auto module = make_scripted_net();
  module.eval();
  torch_dp::ScriptDataParallel parallel(module, torch_dp::DataParallelOptions(cpus(3)));
  if (copy_everything) {
    torch_dp::detail::TestAccess::copy_everything(parallel);
  }
  auto x = torch::randn({6, 4}, f64);
  auto expect_module = [&](const char* what) {
    INFO(what);
    torch::NoGradGuard no_grad;
    CHECK(close64(parallel.forward(x), module.deepcopy().forward({x}).toTensor()));
  };
  expect_module("before any change");
  {
    torch::NoGradGuard no_grad;
    module.attr("fc1").toModule().attr("weight").toTensor().mul_(-2.0);  // in place, as fused optimizers write
  }
  expect_module("an in-place edit");
  module.setattr("scale", int64_t{3});
  expect_module("a plain attribute");
  module.attr("fc2").toModule().setattr("bias", torch::randn({3}, f64).requires_grad_());
  expect_module("a replaced parameter");
  module.attr("bn").toModule().attr("running_mean").toTensor().fill_(0.7);
  expect_module("a buffer edited in place");
  // In training mode BatchNorm normalises each replica's chunk by its own statistics.
  module.train();
  auto reference = module.deepcopy();
  torch::NoGradGuard no_grad;
  auto y = parallel.forward(x);
  std::vector<Tensor> chunks;
  for (const auto& chunk : x.chunk(3)) {
    chunks.push_back(reference.forward({chunk}).toTensor());
  }
  CHECK(close64(y, torch::cat(chunks)));
}

TEST_CASE("ScriptDataParallel: a failing replica is named", "[script]") {
  auto module = scripted_module("Picky");
  module.define(R"(
def forward(self, x):
    assert bool(x[0, 0] < 100.0), "row out of range"
    return x * 2.0
)");
  torch_dp::ScriptDataParallel parallel(module, torch_dp::DataParallelOptions(cpus(3)));
  auto x = torch::zeros({6, 2}, f64);
  x[4][0] = 1000.0;
  CHECK_THROWS_WITH(parallel.forward(x), Contains("in replica 2 on device cpu") && Contains("row out of range"));
  CHECK(close64(parallel.forward(torch::ones({6, 2}, f64)), torch::full({6, 2}, 2.0, f64)));
}

TEST_CASE("ScriptDataParallel: a module without forward is refused", "[script]") {
  auto module = scripted_module("NoForward");
  CHECK_THROWS_WITH(
      torch_dp::ScriptDataParallel(module, torch_dp::DataParallelOptions(cpus(2))), Contains("has no forward method"));
}

TEST_CASE("ScriptDataParallel: a TorchScript file written by Python trains like the loaded module", "[script]") {
  // examples/python/export_model.py writes model.pt (torch.jit.script(model).save) and the batch it was checked on;
  // scripts/test.sh names the folder in TORCH_DP_EXPORTED_DIR.
  const auto dir = tdp_test::exported_dir("TORCH_DP_EXPORTED_DIR", "cpu");
  auto module = torch::jit::load(dir + "/model.pt");
  auto reference = torch::jit::load(dir + "/model.pt");
  const auto input = tdp_test::load_tensor(dir + "/input.pt");
  const auto expected = tdp_test::load_tensor(dir + "/expected.pt");
  torch_dp::ScriptDataParallel parallel(module, torch_dp::DataParallelOptions(cpus(3)));
  {
    torch::NoGradGuard no_grad;
    CHECK(at::allclose(parallel.forward(input), expected, 1e-5, 1e-6));
  }
  module.train();
  reference.train();
  for (int step = 0; step < 3; ++step) {
    auto x = torch::randn({11, input.size(1)});
    auto target = torch::randn({11, expected.size(1)});
    auto loss = (parallel.forward(x) - target).pow(2).mean();
    auto expected_loss = (reference.forward({x}).toTensor() - target).pow(2).mean();
    CHECK(at::allclose(loss, expected_loss, 1e-5, 1e-6));
    loss.backward();
    expected_loss.backward();
    for (auto* m : {&module, &reference}) {
      torch::NoGradGuard no_grad;
      for (auto p : m->parameters()) {
        p.sub_(p.grad() * 0.1);
        p.mutable_grad().zero_();
      }
    }
    const auto a = module.parameters();
    const auto b = reference.parameters();
    auto it = b.begin();
    for (const auto& p : a) {
      CHECK(at::allclose(p, *it, 1e-5, 1e-6));
      ++it;
    }
  }
}

TDP_CUDA_TEST_CASE(
    "ScriptDataParallel: on CUDA, shared and copied replicas train like the whole batch", "[script][cuda]") {
  // [0, 0]: replicas share the module's parameters; [0, 1] where a second GPU exists (else [0, 0] with copies
  // forced): coalesced copies and broadcast gradients.
  const bool copies = GENERATE(false, true);
  CAPTURE(copies);
  const c10::Device cuda0(c10::kCUDA, 0);
  const bool two_gpus = torch::cuda::device_count() > 1;
  const std::vector<c10::Device> devices{cuda0, copies && two_gpus ? c10::Device(c10::kCUDA, 1) : cuda0};
  torch::manual_seed(11);
  auto module = make_scripted_net();
  module.eval();  // BatchNorm normalises with its running statistics: the whole batch is the reference
  module.to(cuda0);
  torch::manual_seed(11);
  auto reference = make_scripted_net();
  reference.eval();
  reference.to(cuda0);
  torch_dp::ScriptDataParallel parallel(module, torch_dp::DataParallelOptions(devices));
  if (copies && !two_gpus) {
    torch_dp::detail::TestAccess::copy_everything(parallel);
  }
  for (int step = 0; step < 3; ++step) {
    auto x = torch::randn({10, 4}, f64.device(cuda0));
    auto loss = parallel.forward(x).pow(2).sum();
    auto expected = reference.forward({x}).toTensor().pow(2).sum();
    CHECK(close64(loss, expected, 1e-10));
    loss.backward();
    expected.backward();
    sgd_step(module, 0.05);
    sgd_step(reference, 0.05);
    CHECK(same_tensors(module, reference));
  }
}
