#include "backend/runtime.h"
#include "catch.h"

#include <torch/torch.h>

TEST_CASE("smoke", "[sim]") {
  auto x = torch::ones({3}, torch::Device(c10::DeviceType::PrivateUse1, 1));
  auto y = (x * 2).cpu();
  REQUIRE(y.sum().item<float>() == 6);
}
