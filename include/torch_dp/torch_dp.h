#pragma once
// torch_dp: data parallelism for PyTorch and LibTorch.

#include <torch_dp/comm.h>
#include <torch_dp/criterion.h>
#include <torch_dp/data_parallel.h>
#include <torch_dp/gather.h>
#include <torch_dp/parallel_apply.h>
#include <torch_dp/replicate.h>
#include <torch_dp/scatter.h>
