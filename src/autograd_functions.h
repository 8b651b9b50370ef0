#pragma once
// Private: the autograd Functions behind scatter and gather, which are each other's backward.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/Stream.h>

#include <cstdint>
#include <vector>

namespace torch_dp::detail {

/// scatter with known sizes and a wrapped dim; differentiable (backward: gather_function).
std::vector<at::Tensor> scatter_function(
    const at::Tensor& input, const std::vector<c10::Device>& devices, const std::vector<int64_t>& sizes, int64_t dim);

/// gather with validated inputs and a wrapped dim; differentiable (backward: scatter_function).
at::Tensor gather_function(const std::vector<at::Tensor>& inputs, c10::Device destination, int64_t dim);

/// Devices round-trip through an autograd context's saved_data as two int lists.
std::vector<int64_t> device_types(const std::vector<c10::Device>& devices);
std::vector<int64_t> device_indices(const std::vector<c10::Device>& devices);
std::vector<c10::Device> devices_from(c10::ArrayRef<int64_t> types, c10::ArrayRef<int64_t> indices);

/// The current stream of each accelerator device among `devices` (once per device; the CPU has none), for a node
/// that spans devices to run its backward on its forward's streams (Note [Streams of a backward across devices]
/// in scatter.cpp), and streams round-tripped through an autograd context's saved_data as an int list.
std::vector<c10::Stream> current_streams(at::ArrayRef<c10::Device> devices);
std::vector<int64_t> pack_streams(const std::vector<c10::Stream>& streams);
std::vector<c10::Stream> unpack_streams(c10::ArrayRef<int64_t> packed);

}  // namespace torch_dp::detail
