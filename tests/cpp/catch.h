#pragma once
// Catch2 v3 (catch2/catch_test_macros.hpp) or v2 (catch2/catch.hpp), whichever is installed.
#if __has_include(<catch2/catch_test_macros.hpp>)
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#else
#include <catch2/catch.hpp>
#endif
