// Trains an MLP on synthetic regression data with torch_dp::DataParallel, printing the loss per epoch.
// Exits with status 1 if the last epoch's loss is not below the first's.
//
//   ./train_mlp [--replicas N] [--epochs N] [--cpu]

#include "common.h"

#include <torch/torch.h>
#include <torch_dp/torch_dp.h>

#include <cstdio>

struct MLPImpl : torch::nn::Cloneable<MLPImpl> {  // Cloneable: DataParallel clones it for the other replicas
  MLPImpl() { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(16, 64));
    fc2 = register_module("fc2", torch::nn::Linear(64, 64));
    fc3 = register_module("fc3", torch::nn::Linear(64, 1));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc3(torch::relu(fc2(torch::relu(fc1(x))))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, fc3{nullptr};
};
TORCH_MODULE(MLP);

int main(int argc, char** argv) {
  const auto options = examples::parse(argc, argv);
  const auto devices = examples::devices(options);
  const auto device = devices.front();
  torch::manual_seed(0);

  // Synthetic regression: y = sin(x . a) + 0.5 (x . b)^2 / 16 + noise.
  const int64_t samples = 4096, batch = 256;
  auto x = torch::randn({samples, 16});
  auto a = torch::randn({16, 1}) / 4;
  auto b = torch::randn({16, 1}) / 4;
  auto y = torch::sin(x.matmul(a)) + 0.5 * x.matmul(b).pow(2) / 16 + 0.01 * torch::randn({samples, 1});
  x = x.to(device);
  y = y.to(device);

  MLP model;
  model->to(device);
  torch_dp::DataParallel parallel(model, torch_dp::DataParallelOptions(devices));
  torch::optim::Adam optimizer(parallel->parameters(), torch::optim::AdamOptions(3e-3));
  std::printf(
      "train_mlp: %zu replicas on %s, %d epochs\n", devices.size(), examples::describe(devices).c_str(),
      options.epochs);

  double first = 0, last = 0;
  for (int epoch = 0; epoch < options.epochs; ++epoch) {
    auto order = torch::randperm(samples, torch::TensorOptions().device(device).dtype(torch::kLong));
    double total = 0;
    int64_t batches = 0;
    for (int64_t start = 0; start < samples; start += batch) {
      auto index = order.slice(0, start, start + batch);
      optimizer.zero_grad();
      auto loss = torch::mse_loss(parallel->forward(x.index_select(0, index)), y.index_select(0, index));
      loss.backward();
      optimizer.step();
      total += loss.item<double>();
      ++batches;
    }
    last = total / static_cast<double>(batches);
    if (epoch == 0) {
      first = last;
    }
    std::printf("epoch %d  loss %.6f\n", epoch + 1, last);
  }
  if (!(last < first)) {
    std::fprintf(stderr, "train_mlp: the loss did not go down (%.6f -> %.6f)\n", first, last);
    return 1;
  }
  std::printf("train_mlp: loss %.6f -> %.6f\n", first, last);
  return 0;
}
