#pragma once
// Hooks for torch_dp's own tests into state that the public API keeps private. Not installed.

#include <torch_dp/data_parallel.h>

namespace torch_dp::detail {

struct TestAccess {
  /// Makes every replica slot but the module's own copy the parameters as well, as a slot on another device
  /// does: the path of replicas on distinct devices, on a CPU-only machine.
  static void copy_everything(DataParallelImpl& parallel);
};

} // namespace torch_dp::detail
