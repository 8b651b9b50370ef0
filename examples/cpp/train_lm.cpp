// A language-model training step with the loss computed on the replicas: DataParallel::forward_scattered leaves
// each replica's logits (batch x sequence x vocabulary) on its device, and torch_dp::ParallelCriterion computes
// the cross-entropy there and reduces it to exactly the whole batch's mean (padding ignored, uneven chunks
// included), so the output device never holds the whole logits or their gradient.
// Exits with status 1 if the last epoch's loss is not below the first's.
//
//   ./train_lm [--replicas N] [--epochs N] [--cpu]

#include "common.h"

#include <torch/torch.h>
#include <torch_dp/torch_dp.h>

#include <cstdio>
#include <tuple>

struct TinyLMImpl : torch::nn::Cloneable<TinyLMImpl> {  // Cloneable: DataParallel clones it for the other replicas
  explicit TinyLMImpl(int64_t vocab) : vocab(vocab) { reset(); }
  void reset() override {
    embed = register_module("embed", torch::nn::Embedding(vocab, 64));
    mix = register_module("mix", torch::nn::Linear(64, 64));
    head = register_module("head", torch::nn::Linear(64, vocab));
  }
  torch::Tensor forward(const torch::Tensor& tokens) {  // (batch, sequence) -> (batch, sequence, vocabulary)
    return head(torch::gelu(mix(embed(tokens))));
  }
  int64_t vocab;
  torch::nn::Embedding embed{nullptr};
  torch::nn::Linear mix{nullptr}, head{nullptr};
};
TORCH_MODULE(TinyLM);

int main(int argc, char** argv) {
  const auto options = examples::parse(argc, argv);
  const auto devices = examples::devices(options);
  const auto device = devices.front();
  torch::manual_seed(0);
  const int64_t vocab = 50, batch = 13, seq = 24, pad = -100;  // 13 rows: uneven chunks on most device counts

  TinyLM model(vocab);
  model->to(device);
  torch_dp::DataParallel parallel(model, torch_dp::DataParallelOptions(devices));
  torch::optim::Adam optimizer(parallel->parameters(), torch::optim::AdamOptions(1e-2));
  // Each replica's logits and labels flattened to (tokens, vocabulary) and (tokens,) for the loss.
  torch_dp::ParallelCriterion criterion(
      torch::nn::CrossEntropyLoss(torch::nn::CrossEntropyLossOptions().ignore_index(pad)),
      torch_dp::ParallelCriterionOptions().prepare([](const torch::Tensor& logits, const torch::Tensor& labels) {
        return std::make_tuple(logits.flatten(0, 1), labels.flatten());
      }));
  std::printf(
      "train_lm: %zu replicas on %s, %d epochs\n", devices.size(), examples::describe(devices).c_str(), options.epochs);

  double first = 0, last = 0;
  for (int epoch = 0; epoch < options.epochs; ++epoch) {
    double total = 0;
    const int steps = 20;
    for (int step = 0; step < steps; ++step) {
      // The next token of sequences counting up modulo vocab from a random start; the tails are padding.
      auto start = torch::randint(0, vocab, {batch, 1}, torch::kLong);
      auto tokens = (start + torch::arange(seq + 1)).remainder(vocab);
      auto inputs = tokens.slice(1, 0, seq).to(device);
      auto labels = tokens.slice(1, 1).clone();
      auto lengths = torch::randint(seq / 2, seq + 1, {batch, 1}, torch::kLong);
      labels.masked_fill_(torch::arange(seq).ge(lengths), pad);
      optimizer.zero_grad();
      auto outputs = parallel->forward_scattered(inputs);  // the logits stay on their replicas' devices
      auto loss = criterion(outputs, labels.to(device));   // == CrossEntropyLoss over the whole batch
      loss.backward();
      optimizer.step();
      total += loss.item<double>();
    }
    last = total / steps;
    if (epoch == 0) {
      first = last;
    }
    std::printf("epoch %d  loss %.4f\n", epoch + 1, last);
  }
  if (!(last < first)) {
    std::fprintf(stderr, "train_lm: the loss did not go down (%.4f -> %.4f)\n", first, last);
    return 1;
  }
  std::printf("train_lm: loss %.4f -> %.4f\n", first, last);
  return 0;
}
