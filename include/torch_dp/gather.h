#pragma once
// gather: concatenate per-replica tensors on one device.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>

namespace torch_dp {

/// Concatenates `tensors` along `dim` into one tensor on `destination`.
///
/// The tensors must have the same dtype and number of dimensions and agree in every size but `dim`. As in
/// PyTorch, when every tensor is a scalar and `dim` is 0, each becomes a vector of one element (with a
/// warning), so per-replica losses gather into a vector of length n. One tensor already on `destination` is
/// returned as it is. Differentiable: the backward scatters the gradient back to each input's device.
at::Tensor gather(at::TensorList tensors, c10::Device destination, int64_t dim = 0);

}  // namespace torch_dp
