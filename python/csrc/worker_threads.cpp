#include "worker_threads.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

#include <exception>
#include <functional>

namespace torch_dp::python {

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

void run_replicas(
    WorkerPool& pool, const std::vector<c10::Device>& devices, const py::function& fn, Issuing issuing,
    bool reproducible) {
  std::exception_ptr failure;
  {
    py::gil_scoped_release no_gil;
    const std::function<void(size_t)> task = [&fn](size_t i) {
      keep_thread_state();
      py::gil_scoped_acquire gil;
      fn(i);
    };
    try {
      torch_dp::run_replicas(pool, devices, task, issuing, reproducible);
    } catch (const ReplicaError& e) {
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
}

}  // namespace torch_dp::python
