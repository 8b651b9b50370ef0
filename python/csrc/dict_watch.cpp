#include "dict_watch.h"

#include <algorithm>
#include <unordered_map>

namespace torch_dp::python {

namespace py = pybind11;

// Note [Watching a module tree]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Replicas are kept between forwards, yet whatever the user changes on the module between forwards must reach
// them: a replaced submodule or parameter, a plain attribute, train()/eval(). All of that lives in a module's
// __dict__ and its _parameters, _buffers and _modules dicts. DictWatch remembers, for a list of dicts, every
// (key, value) pair by identity and says whether any dict changed since: a C++ walk over a few thousand
// pointers, where rebuilding replicas in Python (what PyTorch does every forward) costs milliseconds. It holds
// references to what it remembers, so an identity cannot be reused by a new object while it watches.
//
// Walking every entry still costs about 0.2 ms for a ResNet-50-sized tree, so a cheaper proof that nothing
// changed comes first:
//  - From Python 3.12: a dict watcher (PyDict_AddWatcher). CPython calls it on every change to a watched dict,
//    and it marks every DictWatch holding that dict dirty; a clean DictWatch is unchanged without looking at
//    any entry. Python 3.13.0 does not call watchers when an attribute is stored into an object's inline
//    values, which is where every nn.Module keeps its attributes (CPython issue 125608, fixed in 3.13.1): there,
//    and wherever no watcher can be registered (CPython has 8 slots), the entries are walked every time.
//  - Before 3.12: each dict's version tag (PEP 509), which CPython changes on every modification.
// A dirty DictWatch (or a moved tag) compares the entries; if they still match (a write of the same value),
// it is clean again.

namespace {

#if PY_VERSION_HEX >= 0x030C0000
// The watched dicts, each with the DictWatch objects holding it. Used with the GIL held only. Never destroyed:
// the watcher may be called while the interpreter shuts down, after static destructors ran.
auto& watched_dicts = *new std::unordered_map<PyObject*, std::vector<DictWatch*>>();
int dict_watcher_id = -1;  // -1: not tried yet, -2: not available

int on_watched_dict_event(PyDict_WatchEvent, PyObject* dict, PyObject*, PyObject*) {
  auto it = watched_dicts.find(dict);
  if (it != watched_dicts.end()) {
    for (auto* watch : it->second) {
      watch->set_dirty();
    }
  }
  return 0;
}

// The watcher's id, or -1 where watchers cannot be trusted or had no free slot.
int usable_dict_watcher() {
  if (dict_watcher_id == -1) {
    const bool broken = Py_Version >= 0x030D0000 && Py_Version < 0x030D0100;  // 3.13.0: CPython issue 125608
    dict_watcher_id = broken ? -2 : PyDict_AddWatcher(on_watched_dict_event);
    if (dict_watcher_id < 0) {
      PyErr_Clear();
      dict_watcher_id = -2;
    }
  }
  return dict_watcher_id >= 0 ? dict_watcher_id : -1;
}
#else
// CPython's version tag changes on every modification of a dict (PEP 509; deprecated in 3.12).
uint64_t version_of(PyObject* d) {
  return reinterpret_cast<PyDictObject*>(d)->ma_version_tag;
}
#endif

}  // namespace

DictWatch::DictWatch(const py::list& dicts) {
  for (auto item : dicts) {
    if (!PyDict_Check(item.ptr())) {
      throw py::type_error("DictWatch watches dicts only");
    }
    dicts_.push_back(py::reinterpret_borrow<py::dict>(item));
  }
  start_watching();
  retake();
}

DictWatch::~DictWatch() {
  stop_watching();
}

void DictWatch::retake() {
  snapshots_.clear();
  snapshots_.reserve(dicts_.size());
  for (const auto& d : dicts_) {
    std::vector<std::pair<py::object, py::object>> entries;
    entries.reserve(static_cast<size_t>(PyDict_Size(d.ptr())));
    Py_ssize_t pos = 0;
    PyObject* key = nullptr;
    PyObject* value = nullptr;
    while (PyDict_Next(d.ptr(), &pos, &key, &value)) {
      entries.emplace_back(py::reinterpret_borrow<py::object>(key), py::reinterpret_borrow<py::object>(value));
    }
    snapshots_.push_back(std::move(entries));
  }
  mark_clean();
}

bool DictWatch::unchanged() {
  if (clean()) {
    return true;
  }
  for (size_t i = 0; i < dicts_.size(); ++i) {
    if (!entries_unchanged(i)) {
      return false;
    }
  }
  mark_clean();
  return true;
}

bool DictWatch::entries_unchanged(size_t i) const {
  PyObject* d = dicts_[i].ptr();
  const auto& entries = snapshots_[i];
  if (static_cast<size_t>(PyDict_Size(d)) != entries.size()) {
    return false;
  }
  Py_ssize_t pos = 0;
  PyObject* key = nullptr;
  PyObject* value = nullptr;
  size_t n = 0;
  while (PyDict_Next(d, &pos, &key, &value)) {
    if (key != entries[n].first.ptr() || value != entries[n].second.ptr()) {
      return false;
    }
    ++n;
  }
  return true;
}

#if PY_VERSION_HEX >= 0x030C0000
void DictWatch::start_watching() {
  const int id = usable_dict_watcher();
  if (id < 0) {
    return;
  }
  fast_ = true;  // from here on, stop_watching() undoes what was done
  for (const auto& d : dicts_) {
    auto& holders = watched_dicts[d.ptr()];
    if (holders.empty() && PyDict_Watch(id, d.ptr()) != 0) {
      PyErr_Clear();
      watched_dicts.erase(d.ptr());
      stop_watching();
      return;
    }
    holders.push_back(this);
  }
}

void DictWatch::stop_watching() {
  if (!fast_) {
    return;
  }
  for (const auto& d : dicts_) {
    auto it = watched_dicts.find(d.ptr());
    if (it == watched_dicts.end()) {
      continue;
    }
    auto& holders = it->second;
    auto mine = std::find(holders.begin(), holders.end(), this);
    if (mine != holders.end()) {
      holders.erase(mine);  // once: a dict listed twice is held twice
    }
    if (holders.empty()) {
      watched_dicts.erase(it);
      if (PyDict_Unwatch(dict_watcher_id, d.ptr()) != 0) {
        PyErr_Clear();
      }
    }
  }
  fast_ = false;
}

bool DictWatch::clean() const {
  return fast_ && !dirty_;
}

void DictWatch::mark_clean() {
  dirty_ = false;
}
#else
void DictWatch::start_watching() {
  fast_ = true;
}

void DictWatch::stop_watching() {}

bool DictWatch::clean() const {
  for (size_t i = 0; i < dicts_.size(); ++i) {
    if (version_of(dicts_[i].ptr()) != versions_[i]) {
      return false;
    }
  }
  return true;
}

void DictWatch::mark_clean() {
  versions_.clear();
  for (const auto& d : dicts_) {
    versions_.push_back(version_of(d.ptr()));
  }
}
#endif

}  // namespace torch_dp::python
