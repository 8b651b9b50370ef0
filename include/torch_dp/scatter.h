#pragma once
// scatter: split a tensor along a dimension and place chunk i on devices[i].

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace torch_dp {

/// The chunk sizes `torch.chunk(tensor, num_chunks)` gives for `size` rows: chunks of ceil(size / num_chunks),
/// the last one smaller, so possibly fewer than `num_chunks` chunks (6 rows over 4 give 2, 2, 2). An empty
/// dimension gives `num_chunks` empty chunks, as torch.chunk does.
std::vector<int64_t> chunk_sizes(int64_t size, int64_t num_chunks);

/// Splits `input` along `dim` and copies chunk i to `devices[i]`.
///
/// Without `sizes` the split follows `torch.chunk` (see chunk_sizes), so the result can hold fewer chunks than
/// there are devices; the first ones are used. With `sizes` there must be one size per device and they must
/// add up to the length of `dim`. A chunk whose device is the input's own device is a view of the input, not
/// a copy. Differentiable: the backward gathers the chunks' gradients onto the input's device.
std::vector<at::Tensor> scatter(
    const at::Tensor& input, at::ArrayRef<c10::Device> devices,
    const std::optional<std::vector<int64_t>>& sizes = std::nullopt, int64_t dim = 0);

}  // namespace torch_dp
