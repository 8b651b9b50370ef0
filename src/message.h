#pragma once
// Error and warning texts built without iostreams.
//
// TORCH_CHECK(cond, a, b, ...) formats its arguments with an std::ostringstream instantiated in the calling
// library. Built with g++ 13 against the CUDA wheels of torch (built with gcc-toolset-13), that library's copy of
// the stream code looked up a locale facet that the process's locale did not hold, and crashed (a segfault in
// ostream::_M_insert<long>, from Python, with torch 2.11+cu130 and g++ 13.3; c10::str(stream) crashed the same
// way there).
// torch_dp::detail::message appends to an std::string instead, and c10::str passes a single std::string through
// untouched, so TORCH_DP_CHECK and TORCH_DP_WARN never touch a stream.

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace torch_dp::detail {

inline void append(std::string& out, std::string_view text) {
  out.append(text);
}
inline void append(std::string& out, const char* text) {
  out.append(text);
}
inline void append(std::string& out, const std::string& text) {
  out.append(text);
}
inline void append(std::string& out, char c) {
  out.push_back(c);
}
inline void append(std::string& out, bool value) {
  out.append(value ? "true" : "false");
}
inline void append(std::string& out, const c10::Device& device) {
  out.append(device.str());
}
inline void append(std::string& out, c10::ScalarType type) {
  out.append(c10::toString(type));
}

template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append(std::string& out, T value) {
  out.append(std::to_string(value));
}

template <typename T>
void append(std::string& out, c10::ArrayRef<T> values) {
  out.push_back('[');
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) {
      out.append(", ");
    }
    append(out, values[i]);
  }
  out.push_back(']');
}

template <typename T>
void append(std::string& out, const std::vector<T>& values) {
  append(out, c10::ArrayRef<T>(values));
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  (append(out, args), ...);
  return out;
}

}  // namespace torch_dp::detail

#define TORCH_DP_CHECK(cond, ...) TORCH_CHECK(cond, ::torch_dp::detail::message(__VA_ARGS__))
#define TORCH_DP_WARN(...) TORCH_WARN(::torch_dp::detail::message(__VA_ARGS__))
