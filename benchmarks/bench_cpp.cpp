// bench_cpp: times, side by side in one run,
//   torch_dp   torch_dp::DataParallel with the default Issuing::kAuto (the table says which way it settled on)
//   threads    the same issuing replicas from its persistent worker threads (Issuing::kThreads)
//   serial     the same issuing them one after another on the calling thread (Issuing::kSerial)
//   libtorch   torch::nn::parallel::data_parallel (only with a CUDA build of torch and CUDA devices: its
//              Scatter/Gather are CUDA-only, and its header does not even compile against a CPU-only torch)
//   plain      the unwrapped module on the whole batch
//   ideal      the same chunks DataParallel would make, run one after another through the plain module (on the
//              current stream), outputs concatenated: what replicas sharing one device cannot beat
// for an MLP (8 x Linear(1024, 1024), batch 256) and a small ResNet-style conv net, in inference (no_grad) and
// training (forward + backward), over the device lists given with --devices. Per method: warm-up, then the
// median of N iterations, the methods interleaved iteration by iteration; CUDA work is synchronised
// (torch::cuda::synchronize) before each clock read.
//
//   bench_cpp [--devices LIST]... [--iters N] [--warmup N] [--quick] [--json PATH] [--models mlp,resnet]
//   LIST: comma-separated devices: "cpu", a CUDA index ("0"), or any device string ("cuda:1").
//   Defaults: --devices 0,0 --devices 0,0,0,0 with CUDA, --devices cpu,cpu without; --iters 20 --warmup 5.
//   --quick: 3 iterations after 1 warm-up, and a 16x16 conv-net input at batch 16 (a CPU smoke run).

#include <torch/torch.h>
#include <torch_dp/torch_dp.h>

#if __has_include(<ATen/cuda/CUDAConfig.h>)
#include <torch/nn/parallel/data_parallel.h>
#define TORCH_DP_BENCH_LIBTORCH_DP 1
#else
#define TORCH_DP_BENCH_LIBTORCH_DP 0
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

using torch::Tensor;

// ---- models ---------------------------------------------------------------------------------------------

struct MLPImpl : torch::nn::Cloneable<MLPImpl> {
  MLPImpl() { reset(); }
  void reset() override {
    layers.clear();
    for (int i = 0; i < 8; ++i) {
      layers.push_back(register_module("fc" + std::to_string(i), torch::nn::Linear(1024, 1024)));
    }
  }
  Tensor forward(const Tensor& input) {
    auto x = input;
    for (size_t i = 0; i < layers.size(); ++i) {
      x = layers[i]->forward(x);
      if (i + 1 < layers.size()) {
        x = torch::relu(x);
      }
    }
    return x;
  }
  std::vector<torch::nn::Linear> layers;
};
TORCH_MODULE(MLP);

struct BasicBlockImpl : torch::nn::Cloneable<BasicBlockImpl> {
  BasicBlockImpl(int64_t in, int64_t out, int64_t stride) : in(in), out(out), stride(stride) { reset(); }
  void reset() override {
    using torch::nn::Conv2dOptions;
    conv1 =
        register_module("conv1", torch::nn::Conv2d(Conv2dOptions(in, out, 3).stride(stride).padding(1).bias(false)));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(out));
    conv2 = register_module("conv2", torch::nn::Conv2d(Conv2dOptions(out, out, 3).padding(1).bias(false)));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(out));
    if (stride != 1 || in != out) {
      down_conv = register_module("down_conv", torch::nn::Conv2d(Conv2dOptions(in, out, 1).stride(stride).bias(false)));
      down_bn = register_module("down_bn", torch::nn::BatchNorm2d(out));
    }
  }
  Tensor forward(const Tensor& x) {
    auto h = torch::relu(bn1(conv1(x)));
    h = bn2(conv2(h));
    auto skip = down_conv ? down_bn(down_conv(x)) : x;
    return torch::relu(h + skip);
  }
  int64_t in, out, stride;
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, down_conv{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, down_bn{nullptr};
};
TORCH_MODULE(BasicBlock);

// ResNet-style: stem, three stages of two basic blocks (32, 64, 128 channels), global pooling, classifier.
struct ResNetImpl : torch::nn::Cloneable<ResNetImpl> {
  ResNetImpl() { reset(); }
  void reset() override {
    stem = register_module("stem", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 32, 3).padding(1).bias(false)));
    stem_bn = register_module("stem_bn", torch::nn::BatchNorm2d(32));
    blocks = register_module(
        "blocks", torch::nn::Sequential(
                      BasicBlock(32, 32, 1), BasicBlock(32, 32, 1), BasicBlock(32, 64, 2), BasicBlock(64, 64, 1),
                      BasicBlock(64, 128, 2), BasicBlock(128, 128, 1)));
    fc = register_module("fc", torch::nn::Linear(128, 10));
  }
  Tensor forward(const Tensor& x) {
    auto h = torch::relu(stem_bn(stem(x)));
    h = blocks->forward(h);
    return fc(h.mean({2, 3}));
  }
  torch::nn::Conv2d stem{nullptr};
  torch::nn::BatchNorm2d stem_bn{nullptr};
  torch::nn::Sequential blocks{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(ResNet);

// ---- options ------------------------------------------------------------------------------------------

struct Options {
  std::vector<std::vector<c10::Device>> device_lists;
  int iters = 20;
  int warmup = 5;
  bool quick = false;
  std::string json;
  std::vector<std::string> models{"mlp", "resnet"};
};

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, separator)) {
    if (!part.empty()) {
      parts.push_back(part);
    }
  }
  return parts;
}

c10::Device parse_device(const std::string& text) {
  if (!text.empty() && std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(std::stoi(text)));
  }
  return c10::Device(text);
}

[[noreturn]] void usage(const char* program, int status) {
  std::fprintf(
      status == 0 ? stdout : stderr,
      "usage: %s [--devices LIST]... [--iters N] [--warmup N] [--quick] [--json PATH] [--models mlp,resnet]\n"
      "  LIST: comma-separated devices: cpu, a CUDA index (0) or a device string (cuda:1)\n",
      program);
  std::exit(status);
}

Options parse(int argc, char** argv) {
  Options options;
  bool iters_given = false, warmup_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        usage(argv[0], 2);
      }
      return argv[++i];
    };
    if (arg == "--devices") {
      std::vector<c10::Device> devices;
      for (const auto& item : split(value(), ',')) {
        devices.push_back(parse_device(item));
      }
      if (devices.empty()) {
        usage(argv[0], 2);
      }
      options.device_lists.push_back(devices);
    } else if (arg == "--iters") {
      options.iters = std::stoi(value());
      iters_given = true;
    } else if (arg == "--warmup") {
      options.warmup = std::stoi(value());
      warmup_given = true;
    } else if (arg == "--quick") {
      options.quick = true;
    } else if (arg == "--json") {
      options.json = value();
    } else if (arg == "--models") {
      options.models = split(value(), ',');
    } else if (arg == "--help" || arg == "-h") {
      usage(argv[0], 0);
    } else {
      usage(argv[0], 2);
    }
  }
  if (options.quick) {
    options.iters = iters_given ? options.iters : 3;
    options.warmup = warmup_given ? options.warmup : 1;
  }
  if (options.device_lists.empty()) {
    if (torch::cuda::is_available()) {
      options.device_lists.push_back({c10::Device(c10::kCUDA, 0), c10::Device(c10::kCUDA, 0)});
      options.device_lists.push_back(std::vector<c10::Device>(4, c10::Device(c10::kCUDA, 0)));
    } else {
      options.device_lists.push_back({c10::Device(c10::kCPU), c10::Device(c10::kCPU)});
    }
  }
  return options;
}

std::string describe(const std::vector<c10::Device>& devices) {
  std::string text;
  for (const auto& device : devices) {
    if (!text.empty()) {
      text += ",";
    }
    text += device.str();  // str(): never stream c10 objects ourselves
  }
  return text;
}

// ---- timing -------------------------------------------------------------------------------------------

void synchronize(const std::vector<c10::Device>& devices) {
  std::set<c10::DeviceIndex> done;
  for (const auto& device : devices) {
    if (device.is_cuda() && done.insert(device.index()).second) {
      torch::cuda::synchronize(device.index());
    }
  }
}

double median(std::vector<double> values) {
  if (values.empty()) {
    return 0;
  }
  std::sort(values.begin(), values.end());
  const size_t mid = values.size() / 2;
  return values.size() % 2 ? values[mid] : 0.5 * (values[mid - 1] + values[mid]);
}

struct Method {
  std::string name;
  std::function<void()> step;
  std::vector<double> ms;
};

struct Row {
  std::string devices, model, mode;
  std::string issuing;               // what Issuing::kAuto settled on
  std::map<std::string, double> ms;  // method -> median ms
};

template <typename ModuleHolder>
std::vector<Row> bench_model(
    const std::string& model_name, ModuleHolder model, const Tensor& input, const std::vector<c10::Device>& devices,
    const Options& options) {
  std::vector<Row> rows;
  const auto device = devices.front();
  model->to(device);
  const auto x = input.to(device);
  torch_dp::DataParallel threads(model, torch_dp::DataParallelOptions(devices).issuing(torch_dp::Issuing::kThreads));
  torch_dp::DataParallel serial(model, torch_dp::DataParallelOptions(devices).issuing(torch_dp::Issuing::kSerial));
  torch_dp::DataParallel automatic(model, torch_dp::DataParallelOptions(devices));
  const bool all_cuda = std::all_of(devices.begin(), devices.end(), [](const c10::Device& d) { return d.is_cuda(); });

  for (const bool training : {false, true}) {
    const std::string mode = training ? "training" : "inference";
    model->train(training);
    // One step of a method: forward (under no_grad for inference), or forward + backward.
    auto run = [&](const std::function<Tensor()>& forward) {
      if (training) {
        model->zero_grad();
        forward().mean().backward();
      } else {
        torch::NoGradGuard no_grad;
        forward();
      }
    };
    std::vector<Method> methods;
    methods.push_back({"plain", [&] { run([&] { return model->forward(x); }); }, {}});
    methods.push_back(
        {"ideal",
         [&] {
           run([&] {
             std::vector<Tensor> outputs;
             for (const auto& chunk : x.chunk(static_cast<int64_t>(devices.size()), 0)) {
               outputs.push_back(model->forward(chunk));
             }
             return torch::cat(outputs, 0);
           });
         },
         {}});
    methods.push_back({"torch_dp", [&] { run([&] { return automatic->forward(x); }); }, {}});
    methods.push_back({"threads", [&] { run([&] { return threads->forward(x); }); }, {}});
    methods.push_back({"serial", [&] { run([&] { return serial->forward(x); }); }, {}});
#if TORCH_DP_BENCH_LIBTORCH_DP
    if (all_cuda) {
      methods.push_back(
          {"libtorch", [&] { run([&] { return torch::nn::parallel::data_parallel(model, x, devices); }); }, {}});
    }
#else
    (void)all_cuda;
#endif
    for (int i = 0; i < options.warmup; ++i) {
      for (auto& method : methods) {
        method.step();
      }
    }
    // Issuing::kAuto times both ways over its first calls (Note [Issuing replicas]); time it once settled.
    const auto automatic_method =
        std::find_if(methods.begin(), methods.end(), [](const Method& m) { return m.name == "torch_dp"; });
    for (int i = 0; i < 60 && automatic->pool().settled_auto_issuing() == torch_dp::Issuing::kAuto; ++i) {
      automatic_method->step();
    }
    synchronize(devices);
    for (int i = 0; i < options.iters; ++i) {
      for (auto& method : methods) {  // interleaved, so that drift hits every method alike
        const auto start = std::chrono::steady_clock::now();
        method.step();
        synchronize(devices);
        const auto stop = std::chrono::steady_clock::now();
        method.ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
      }
    }
    Row row{describe(devices), model_name, mode, {}, {}};
    for (const auto& method : methods) {
      row.ms[method.name] = median(method.ms);
    }
    const auto settled = torch_dp::resolve_issuing(torch_dp::Issuing::kAuto, devices) == torch_dp::Issuing::kAuto
                             ? automatic->pool().settled_auto_issuing()
                             : torch_dp::Issuing::kThreads;
    row.issuing = torch_dp::issuing_name(settled);
    rows.push_back(row);
    std::fprintf(stderr, "  done: %s %s %s\n", row.devices.c_str(), model_name.c_str(), mode.c_str());
  }
  return rows;
}

std::string cell(const std::map<std::string, double>& ms, const std::string& name) {
  auto it = ms.find(name);
  if (it == ms.end()) {
    return "-";
  }
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f", it->second);
  return text;
}

std::string ratio(const std::map<std::string, double>& ms, const std::string& a, const std::string& b) {
  auto x = ms.find(a), y = ms.find(b);
  if (x == ms.end() || y == ms.end() || y->second <= 0) {
    return "-";
  }
  char text[32];
  std::snprintf(text, sizeof(text), "%.2fx", x->second / y->second);
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  const auto options = parse(argc, argv);
  for (const auto& devices : options.device_lists) {
    for (const auto& device : devices) {
      if (device.is_cuda() && !torch::cuda::is_available()) {
        std::fprintf(stderr, "bench_cpp: %s was asked for, but this torch sees no CUDA device\n", device.str().c_str());
        return 2;
      }
    }
  }
  const int64_t mlp_batch = 256;
  const int64_t conv_batch = options.quick ? 16 : 128;
  const int64_t conv_size = options.quick ? 16 : 32;
  std::printf(
      "bench_cpp: torch %s, %s, intra-op threads %d, %d warm-up + %d timed iterations (median)%s\n", TORCH_VERSION,
      torch::cuda::is_available() ? "CUDA available" : "no CUDA", torch::get_num_threads(), options.warmup,
      options.iters, options.quick ? ", --quick" : "");
  std::printf(
      "models: mlp = 8 x Linear(1024,1024), batch %ld; resnet = ResNet-style (3 stages x 2 blocks, "
      "32-128 channels), batch %ld x 3x%ldx%ld\n",
      static_cast<long>(mlp_batch), static_cast<long>(conv_batch), static_cast<long>(conv_size),
      static_cast<long>(conv_size));
#if !TORCH_DP_BENCH_LIBTORCH_DP
  std::printf("libtorch (torch::nn::parallel::data_parallel): not measured, this torch is built without CUDA\n");
#endif
  std::vector<Row> rows;
  torch::manual_seed(0);
  for (const auto& devices : options.device_lists) {
    for (const auto& name : options.models) {
      if (name == "mlp") {
        auto more = bench_model("mlp", MLP(), torch::randn({mlp_batch, 1024}), devices, options);
        rows.insert(rows.end(), more.begin(), more.end());
      } else if (name == "resnet") {
        auto more =
            bench_model("resnet", ResNet(), torch::randn({conv_batch, 3, conv_size, conv_size}), devices, options);
        rows.insert(rows.end(), more.begin(), more.end());
      } else {
        std::fprintf(stderr, "unknown model %s (mlp, resnet)\n", name.c_str());
        return 2;
      }
    }
  }

  std::printf("\nmedian ms per iteration; ratios against ideal (same chunks one after another) and libtorch\n\n");
  std::printf("torch_dp = the default (Issuing::kAuto), settled on the way the 'auto uses' column says\n\n");
  std::printf(
      "| devices | model | mode | plain | ideal | torch_dp | threads | serial | libtorch | auto uses | "
      "torch_dp/ideal | torch_dp/libtorch | torch_dp/plain |\n");
  std::printf("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |\n");
  for (const auto& row : rows) {
    std::printf(
        "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", row.devices.c_str(), row.model.c_str(),
        row.mode.c_str(), cell(row.ms, "plain").c_str(), cell(row.ms, "ideal").c_str(),
        cell(row.ms, "torch_dp").c_str(), cell(row.ms, "threads").c_str(), cell(row.ms, "serial").c_str(),
        cell(row.ms, "libtorch").c_str(), row.issuing.c_str(), ratio(row.ms, "torch_dp", "ideal").c_str(),
        ratio(row.ms, "torch_dp", "libtorch").c_str(), ratio(row.ms, "torch_dp", "plain").c_str());
  }

  if (!options.json.empty()) {
    std::ofstream out(options.json);
    out << "{\"torch\": \"" << TORCH_VERSION << "\", \"cuda\": " << (torch::cuda::is_available() ? "true" : "false")
        << ", \"iters\": " << options.iters << ", \"warmup\": " << options.warmup
        << ", \"quick\": " << (options.quick ? "true" : "false") << ", \"results\": [";
    for (size_t r = 0; r < rows.size(); ++r) {
      const auto& row = rows[r];
      out << (r ? ", " : "") << "{\"devices\": \"" << row.devices << "\", \"model\": \"" << row.model
          << "\", \"mode\": \"" << row.mode << "\", \"auto_issuing\": \"" << row.issuing << "\", \"median_ms\": {";
      size_t k = 0;
      for (const auto& [name, ms] : row.ms) {
        out << (k++ ? ", " : "") << "\"" << name << "\": " << ms;
      }
      out << "}}";
    }
    out << "]}\n";
    if (!out) {
      std::fprintf(stderr, "could not write %s\n", options.json.c_str());
      return 1;
    }
    std::printf("\nwrote %s\n", options.json.c_str());
  }
  return 0;
}
