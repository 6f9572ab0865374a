// One include for every test file, whichever Catch2 the build found (cmake/FluxCatch2.cmake sets
// FLUX_CATCH2_MAJOR; __has_include decides when a file is compiled outside CMake).
// v2 and v3 differ in headers and in the name of the substring matcher; tests use HasText().
#pragma once

#include <string>

#if !defined(FLUX_CATCH2_MAJOR)
#if __has_include(<catch2/catch_test_macros.hpp>)
#define FLUX_CATCH2_MAJOR 3
#else
#define FLUX_CATCH2_MAJOR 2
#endif
#endif

#if FLUX_CATCH2_MAJOR >= 3
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/generators/catch_generators_range.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

namespace flux_test {
inline Catch::Matchers::StringContainsMatcher HasText(const std::string& s) {
  return Catch::Matchers::ContainsSubstring(s);
}
}  // namespace flux_test
#else
#include <catch2/catch.hpp>

namespace flux_test {
inline Catch::Matchers::StdString::ContainsMatcher HasText(const std::string& s) {
  return Catch::Matchers::Contains(s);
}
}  // namespace flux_test
#endif
