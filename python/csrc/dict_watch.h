#pragma once
// DictWatch: whether any of a list of dicts changed since a snapshot (Note [Watching a module tree] in
// dict_watch.cpp). torch_dp.replicate uses it to notice what the user changed on a module between forwards.

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace torch_dp::python {

/// Remembers every (key, value) pair of a list of dicts, by identity, and says whether any dict changed since.
/// Used with the GIL held only. Hidden like the pybind11 types it holds: only torch_dp._C uses it.
class [[gnu::visibility("hidden")]] DictWatch {
 public:
  /// Watches `dicts` (each must be a dict; a dict may be listed more than once) and takes a first snapshot.
  explicit DictWatch(const pybind11::list& dicts);
  ~DictWatch();
  DictWatch(const DictWatch&) = delete;
  DictWatch& operator=(const DictWatch&) = delete;

  /// Takes a new snapshot: from now on, unchanged() compares against the dicts as they are now.
  void retake();
  /// Whether every dict holds the same keys and values (by identity, in the same order) as at the snapshot.
  bool unchanged();

  size_t num_dicts() const { return dicts_.size(); }
  /// Whether a change is noticed without walking the entries (a watcher, or version tags).
  bool fast() const { return fast_; }

  /// Called by the dict watcher when one of the dicts changed.
  void set_dirty() { dirty_ = true; }

 private:
  bool entries_unchanged(size_t i) const;
  void start_watching();
  void stop_watching();
  bool clean() const;
  void mark_clean();

  std::vector<pybind11::dict> dicts_;
  std::vector<std::vector<std::pair<pybind11::object, pybind11::object>>> snapshots_;
#if PY_VERSION_HEX < 0x030C0000
  std::vector<uint64_t> versions_;  // each dict's version tag at the snapshot
#endif
  bool fast_ = false;
  bool dirty_ = true;
};

}  // namespace torch_dp::python
