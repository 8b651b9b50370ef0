#pragma once
// Hooks for torch_dp's own tests into state that the public API keeps private. Not installed.

#include <torch_dp/data_parallel.h>
#include <torch_dp/replicate.h>

namespace torch_dp {
class ScriptDataParallel;  // script_data_parallel.h, whose jit headers the other users of this file need not read
class ScriptReplicas;
}  // namespace torch_dp

namespace torch_dp::detail {

struct TestAccess {
  /// Makes every replica slot but the module's own copy the parameters as well, as a slot on another device
  /// does: the path of replicas on distinct devices, on a CPU-only machine.
  static void copy_everything(DataParallelImpl& parallel);
  /// The same for a Replicator: only the first slot on the sources' device shares them; every later slot gets
  /// copies of everything, as if it were on another device (coalesced copies, broadcast gradients).
  static void copy_everything(Replicator& replicator);
  /// The same for TorchScript replicas (script_data_parallel.cpp).
  static void copy_everything(ScriptDataParallel& parallel);
  static void copy_everything(ScriptReplicas& replicas);
};

}  // namespace torch_dp::detail
