#pragma once
// Python callables on torch_dp's worker threads: each worker keeps one Python thread state for its life
// (Note [Worker thread states] in worker_threads.cpp), and the caller waits with the GIL released.

#include <torch_dp/parallel_apply.h>

#include <pybind11/pybind11.h>

#include <vector>

namespace torch_dp::python {

/// Gives the calling thread a Python thread state that lives as long as the process, once; afterwards taking
/// the GIL on this thread only takes the GIL. Call it without the GIL.
void keep_thread_state();

/// torch_dp::run_replicas over a Python callable: fn(i) runs replica i, taking the GIL inside its worker,
/// while the caller, who holds the GIL, releases it until every replica finished. fn is expected to catch its
/// own Python exceptions (torch_dp's Python layer does, to re-raise them the way PyTorch does); anything that
/// escapes is raised after all replicas ran: the first failure (lowest i), as the exception the replica threw
/// (not wrapped in a ReplicaError), translated to Python the way torch translates C++ exceptions.
void run_replicas(
    WorkerPool& pool, const std::vector<c10::Device>& devices, const pybind11::function& fn, Issuing issuing,
    bool reproducible);

}  // namespace torch_dp::python
