// Trains a small conv net with BatchNorm on synthetic classification data with torch_dp::DataParallel,
// printing the loss per epoch and the accuracy in eval mode (which uses the running statistics that
// DataParallel kept from replica 0). Exits with status 1 if the last epoch's loss is not below the first's.
//
//   ./train_convnet [--replicas N] [--epochs N] [--cpu]

#include "common.h"

#include <torch/torch.h>
#include <torch_dp/torch_dp.h>

#include <cstdio>

struct ConvNetImpl : torch::nn::Cloneable<ConvNetImpl> {
  ConvNetImpl() { reset(); }
  void reset() override {
    conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 8, 3).padding(1)));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(8));
    conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 16, 3).padding(1)));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(16));
    fc = register_module("fc", torch::nn::Linear(16, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = torch::max_pool2d(torch::relu(bn1(conv1(x))), 2);
    h = torch::relu(bn2(conv2(h)));
    return fc(h.mean({2, 3}));
  }
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(ConvNet);

// 16x16 single-channel images of noise with a bright 6x6 square in one of four quadrants; the label is the
// quadrant.
std::pair<torch::Tensor, torch::Tensor> make_data(int64_t samples) {
  auto images = 0.5 * torch::randn({samples, 1, 16, 16});
  auto labels = torch::randint(0, 4, {samples}, torch::kLong);
  auto label = labels.accessor<int64_t, 1>();
  for (int64_t i = 0; i < samples; ++i) {
    const int64_t row = (label[i] / 2) * 8 + 1, col = (label[i] % 2) * 8 + 1;
    images[i][0].slice(0, row, row + 6).slice(1, col, col + 6).add_(1.0);
  }
  return {images, labels};
}

int main(int argc, char** argv) {
  const auto options = examples::parse(argc, argv);
  const auto devices = examples::devices(options);
  const auto device = devices.front();
  torch::manual_seed(0);

  const int64_t samples = 1024, batch = 64;
  auto [images, labels] = make_data(samples);
  images = images.to(device);
  labels = labels.to(device);

  ConvNet model;
  model->to(device);
  torch_dp::DataParallel parallel(model, torch_dp::DataParallelOptions(devices));
  torch::optim::SGD optimizer(parallel->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  std::printf(
      "train_convnet: %zu replicas on %s, %d epochs\n", devices.size(), examples::describe(devices).c_str(),
      options.epochs);

  double first = 0, last = 0;
  for (int epoch = 0; epoch < options.epochs; ++epoch) {
    parallel->train();
    auto order = torch::randperm(samples, torch::TensorOptions().device(device).dtype(torch::kLong));
    double total = 0;
    int64_t batches = 0;
    for (int64_t start = 0; start < samples; start += batch) {
      auto index = order.slice(0, start, start + batch);
      optimizer.zero_grad();
      auto loss =
          torch::cross_entropy_loss(parallel->forward(images.index_select(0, index)), labels.index_select(0, index));
      loss.backward();
      optimizer.step();
      total += loss.item<double>();
      ++batches;
    }
    last = total / static_cast<double>(batches);
    if (epoch == 0) {
      first = last;
    }
    parallel->eval();
    torch::NoGradGuard no_grad;
    const double accuracy = parallel->forward(images).argmax(1).eq(labels).to(torch::kDouble).mean().item<double>();
    std::printf("epoch %d  loss %.6f  accuracy (eval mode) %.3f\n", epoch + 1, last, accuracy);
  }
  if (!(last < first)) {
    std::fprintf(stderr, "train_convnet: the loss did not go down (%.6f -> %.6f)\n", first, last);
    return 1;
  }
  std::printf("train_convnet: loss %.6f -> %.6f\n", first, last);
  return 0;
}
