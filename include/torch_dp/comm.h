#pragma once
// comm: coalesced broadcast of tensors to devices and coalesced reduce-add of gradients back.

#include <torch_dp/detail/coalesced_copies.h>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <vector>

namespace torch_dp {

/// Copies `tensors` (all on one device) to each of `devices`: result[i][k] is tensors[k] on devices[i].
/// On the tensors' own device the result holds the input tensors themselves. Other devices receive one flat
/// buffer per dtype, so a broadcast costs one copy per device and dtype, not one per tensor. With grad mode on,
/// copies of tensors that require grad are differentiable: their gradients are reduce-added onto the source.
std::vector<std::vector<at::Tensor>> broadcast_coalesced(at::TensorList tensors, at::ArrayRef<c10::Device> devices);

/// Sums inputs[i][k] over i onto `destination`: result[k] = sum_i inputs[i][k]. Tensors of one dtype are
/// flattened into one buffer per device first, so the cross-device traffic is one copy per device and dtype.
/// Built from differentiable operations, so it supports double backward.
std::vector<at::Tensor> reduce_add_coalesced(
    const std::vector<std::vector<at::Tensor>>& inputs, c10::Device destination);

namespace detail {

/// Gives `copies` (copies[j][k] a copy of sources[k] on some device) an autograd history: the result holds
/// aliases of the copies whose gradients are reduce-added onto the sources' device (all sources on one device).
std::vector<std::vector<at::Tensor>> attach_broadcast_grad(
    at::TensorList sources, const std::vector<std::vector<at::Tensor>>& copies);

/// The one gradient path of copies (Note [Broadcast grad] in comm.cpp): for each slot j and each k in
/// indices[j], tensors[j][k] (a copy or alias of sources[k], which requires grad) gets a gradient edge to
/// sources[k] through one node shared by all of them, which sums their gradients onto the sources' device. In a
/// slot with bound[j] the tensor itself gets the history (a tensor the caller owns and reads, such as a C++
/// replica's parameter); otherwise tensors[j][k] is replaced by a fresh alias that carries it.
void attach_broadcast_grad(
    std::vector<std::vector<at::Tensor>>& tensors, at::TensorList sources,
    const std::vector<std::vector<size_t>>& indices, const std::vector<bool>& bound);

}  // namespace detail
}  // namespace torch_dp
