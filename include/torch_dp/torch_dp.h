#pragma once
// torch_dp: data parallelism for PyTorch and LibTorch. Models loaded from files have headers of their own, which
// pull in torch's TorchScript or AOTInductor headers: <torch_dp/script_data_parallel.h> (TorchScript modules) and
// <torch_dp/package_data_parallel.h> (AOTInductor packages).

#include <torch_dp/comm.h>
#include <torch_dp/criterion.h>
#include <torch_dp/data_parallel.h>
#include <torch_dp/data_parallel_options.h>
#include <torch_dp/gather.h>
#include <torch_dp/parallel_apply.h>
#include <torch_dp/replicate.h>
#include <torch_dp/scatter.h>
#include <torch_dp/scattered_outputs.h>
#include <torch_dp/worker_pool.h>
