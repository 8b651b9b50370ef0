#include <torch_dp/scattered_outputs.h>

namespace torch_dp {
namespace detail {

at::Tensor first_tensor(const c10::IValue& output) {
  if (output.isTensor()) {
    return output.toTensor();
  }
  if (output.isTuple()) {
    for (const auto& element : output.toTupleRef().elements()) {
      auto found = first_tensor(element);
      if (found.defined()) {
        return found;
      }
    }
  } else if (output.isList()) {
    for (const auto& element : output.toListRef()) {
      auto found = first_tensor(element);
      if (found.defined()) {
        return found;
      }
    }
  } else if (output.isGenericDict()) {
    for (const auto& entry : output.toGenericDict()) {
      auto found = first_tensor(entry.value());
      if (found.defined()) {
        return found;
      }
    }
  }
  return at::Tensor();
}

int64_t rows_along(const at::Tensor& tensor, int64_t dim) {
  if (!tensor.defined() || tensor.dim() == 0 || dim < -tensor.dim() || dim >= tensor.dim()) {
    return -1;
  }
  return tensor.size(dim);
}

}  // namespace detail

}  // namespace torch_dp
