// torch_dp._C: a thin pybind11 layer over the public C++ API, plus DictWatch, which only Python needs.

#include <torch_dp/comm.h>
#include <torch_dp/gather.h>
#include <torch_dp/parallel_apply.h>
#include <torch_dp/replicate.h>
#include <torch_dp/scatter.h>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

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
class DictWatch;

#if PY_VERSION_HEX >= 0x030C0000
// The watched dicts, each with the DictWatch objects holding it. Used with the GIL held only. Never destroyed:
// the watcher may be called while the interpreter shuts down, after static destructors ran.
auto& watched_dicts = *new std::unordered_map<PyObject*, std::vector<DictWatch*>>();
int dict_watcher_id = -1;  // -1: not tried yet, -2: not available

void mark_dirty(PyObject* dict);

int on_watched_dict_event(PyDict_WatchEvent, PyObject* dict, PyObject*, PyObject*) {
  mark_dirty(dict);
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
#endif

class DictWatch {
 public:
  explicit DictWatch(py::list dicts) {
    for (auto item : dicts) {
      if (!PyDict_Check(item.ptr())) {
        throw py::type_error("DictWatch watches dicts only");
      }
      dicts_.push_back(py::reinterpret_borrow<py::dict>(item));
    }
    start_watching();
    retake();
  }

  ~DictWatch() { stop_watching(); }
  DictWatch(const DictWatch&) = delete;
  DictWatch& operator=(const DictWatch&) = delete;

  void retake() {
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

  bool unchanged() {
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

  size_t num_dicts() const { return dicts_.size(); }
  /// Whether a change is noticed without walking the entries (a watcher, or version tags).
  bool fast() const { return fast_; }

  void set_dirty() { dirty_ = true; }

 private:
  bool entries_unchanged(size_t i) const {
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
  void start_watching() {
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
  void stop_watching() {
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
  bool clean() const { return fast_ && !dirty_; }
  void mark_clean() { dirty_ = false; }
#else
  // CPython's version tag changes on every modification of a dict (PEP 509; deprecated in 3.12).
  static uint64_t version_of(PyObject* d) {
    return reinterpret_cast<PyDictObject*>(d)->ma_version_tag;
  }
  void start_watching() { fast_ = true; }
  void stop_watching() {}
  bool clean() const {
    for (size_t i = 0; i < dicts_.size(); ++i) {
      if (version_of(dicts_[i].ptr()) != versions_[i]) {
        return false;
      }
    }
    return true;
  }
  void mark_clean() {
    versions_.clear();
    for (const auto& d : dicts_) {
      versions_.push_back(version_of(d.ptr()));
    }
  }
  std::vector<uint64_t> versions_;
#endif

  std::vector<py::dict> dicts_;
  std::vector<std::vector<std::pair<py::object, py::object>>> snapshots_;
  bool fast_ = false;
  bool dirty_ = true;
};

#if PY_VERSION_HEX >= 0x030C0000
void mark_dirty(PyObject* dict) {
  auto it = watched_dicts.find(dict);
  if (it != watched_dicts.end()) {
    for (auto* watch : it->second) {
      watch->set_dirty();
    }
  }
}
#endif

// Note [Worker thread states]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A native thread that calls into Python needs a PyThreadState. gil_scoped_acquire creates one when the thread
// has none and deletes it again on release, so a worker would build and tear down a thread state (and lose its
// threading.local data) on every forward. keep_thread_state() gives each worker thread one thread state for
// its whole life: PyGILState_Ensure creates and registers it, and the GIL is released again at once while the
// state stays registered, so later acquisitions only take the GIL. The state is not deleted when the thread
// ends (that would need the GIL from a thread joined by a GIL holder); it is a few hundred bytes per thread.
// Nor can the pool's owner delete the states after joining: from Python 3.12 on, PyThreadState_Delete of a
// state made by PyGILState_Ensure clears the *calling* thread's PyGILState binding, which would leave the
// owner's own thread without one. A pool's states therefore live until the process ends.
void keep_thread_state() {
  thread_local bool kept = false;
  if (kept) {
    return;
  }
  kept = true;
  if (PyGILState_GetThisThreadState() != nullptr) {
    return;  // a Python thread (the caller) already has one
  }
  PyGILState_Ensure();
  PyEval_SaveThread();
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torch_dp's C++ engine: scatter, gather, coalesced broadcast, persistent replicas and workers";

  m.def(
      "chunk_sizes",
      [](int64_t size, int64_t num_chunks) {
        HANDLE_TH_ERRORS
        return torch_dp::chunk_sizes(size, num_chunks);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("size"), py::arg("num_chunks"));

  m.def(
      "scatter",
      [](const at::Tensor& input, const std::vector<c10::Device>& devices,
         const std::optional<std::vector<int64_t>>& sizes, int64_t dim) {
        HANDLE_TH_ERRORS
        return torch_dp::scatter(input, devices, sizes, dim);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("input"), py::arg("devices"), py::arg("sizes") = py::none(), py::arg("dim") = 0);

  m.def(
      "gather",
      [](const std::vector<at::Tensor>& tensors, c10::Device destination, int64_t dim) {
        HANDLE_TH_ERRORS
        return torch_dp::gather(tensors, destination, dim);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("tensors"), py::arg("destination"), py::arg("dim") = 0);

  m.def(
      "broadcast_coalesced",
      [](const std::vector<at::Tensor>& tensors, const std::vector<c10::Device>& devices) {
        HANDLE_TH_ERRORS
        return torch_dp::broadcast_coalesced(tensors, devices);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("tensors"), py::arg("devices"));

  m.def(
      "reduce_add_coalesced",
      [](const std::vector<std::vector<at::Tensor>>& inputs, c10::Device destination) {
        HANDLE_TH_ERRORS
        return torch_dp::reduce_add_coalesced(inputs, destination);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("inputs"), py::arg("destination"));

  py::class_<torch_dp::Replicator>(m, "Replicator")
      .def(py::init<bool, bool>(), py::arg("trust_version_counters") = false, py::arg("copy_everything") = false)
      .def(
          "set_sources",
          [](torch_dp::Replicator& self, std::vector<at::Tensor> params, std::vector<at::Tensor> buffers) {
            HANDLE_TH_ERRORS
            self.set_sources(std::move(params), std::move(buffers));
            END_HANDLE_TH_ERRORS_PYBIND
          },
          py::arg("params"), py::arg("buffers"))
      .def(
          "check_device",
          [](const torch_dp::Replicator& self, c10::Device expected) {
            HANDLE_TH_ERRORS
            self.check_device(expected);
            END_HANDLE_TH_ERRORS_PYBIND
          },
          py::arg("expected"))
      .def(
          "replicate",
          // Returns, per slot, its tensors, or None where the slot's tensors are the objects returned last time.
          [](torch_dp::Replicator& self, const std::vector<c10::Device>& devices, size_t num_slots,
             bool differentiable) {
            HANDLE_TH_ERRORS
            auto slots = self.replicate(devices, num_slots, differentiable);
            std::vector<std::optional<std::vector<at::Tensor>>> result(slots.size());
            for (size_t j = 0; j < slots.size(); ++j) {
              if (self.changed()[j]) {
                result[j] = std::move(slots[j]);
              }
            }
            return result;
            END_HANDLE_TH_ERRORS_PYBIND
          },
          py::arg("devices"), py::arg("num_slots"), py::arg("differentiable"))
      .def_property_readonly("num_params", &torch_dp::Replicator::num_params)
      .def_property_readonly("num_buffers", &torch_dp::Replicator::num_buffers);

  py::enum_<torch_dp::Issuing>(m, "Issuing")
      .value("auto", torch_dp::Issuing::kAuto)
      .value("threads", torch_dp::Issuing::kThreads)
      .value("serial", torch_dp::Issuing::kSerial);
  m.def(
      "resolve_issuing",
      [](torch_dp::Issuing issuing, const std::vector<c10::Device>& devices) {
        return torch_dp::resolve_issuing(issuing, devices);
      },
      py::arg("issuing"), py::arg("devices"));

  py::class_<torch_dp::WorkerPool>(m, "WorkerPool")
      .def(py::init<>())
      .def_property_readonly("num_threads", &torch_dp::WorkerPool::num_threads)
      .def_property_readonly("settled_auto_issuing", &torch_dp::WorkerPool::settled_auto_issuing);

  m.def(
      "parallel_apply",
      // fn(i) runs replica i; it is expected to catch its own Python exceptions (torch_dp.parallel does, to
      // re-raise them the way PyTorch does). Anything that escapes is re-raised here after all replicas ran.
      [](torch_dp::WorkerPool& pool, const std::vector<c10::Device>& devices, const py::function& fn,
         torch_dp::Issuing issuing) {
        std::exception_ptr failure;
        {
          py::gil_scoped_release no_gil;
          const std::function<void(size_t)> task = [&fn](size_t i) {
            keep_thread_state();
            py::gil_scoped_acquire gil;
            fn(i);
          };
          try {
            torch_dp::parallel_apply(pool, devices, task, issuing);
          } catch (const torch_dp::ReplicaError& e) {
            failure = e.original();
          } catch (...) {
            failure = std::current_exception();
          }
        }
        if (failure) {
          HANDLE_TH_ERRORS
          std::rethrow_exception(failure);
          END_HANDLE_TH_ERRORS_PYBIND
        }
      },
      py::arg("pool"), py::arg("devices"), py::arg("fn"), py::arg("issuing") = torch_dp::Issuing::kThreads);

  py::class_<DictWatch>(m, "DictWatch")
      .def(py::init<py::list>(), py::arg("dicts"))
      .def("unchanged", &DictWatch::unchanged)
      .def("retake", &DictWatch::retake)
      .def_property_readonly("num_dicts", &DictWatch::num_dicts)
      .def_property_readonly("fast", &DictWatch::fast);
}
