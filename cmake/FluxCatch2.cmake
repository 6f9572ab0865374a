# Finds Catch2 (v3 or v2) and defines flux::catch2 (headers + a main) plus FLUX_CATCH2_MAJOR.
# Debian/Ubuntu ship Catch2 2.13 (<catch2/catch.hpp>, target Catch2::Catch2, no main);
# the H200 image and newer distributions ship v3 (<catch2/catch_test_macros.hpp>,
# Catch2::Catch2WithMain). tests/cpp/catch_compat.h hides the header and matcher differences.

find_package(Catch2 3 CONFIG QUIET)
if(Catch2_FOUND)
  set(FLUX_CATCH2_MAJOR 3)
else()
  find_package(Catch2 2.13 CONFIG QUIET)
  if(Catch2_FOUND)
    set(FLUX_CATCH2_MAJOR 2)
  endif()
endif()

if(NOT Catch2_FOUND)
  message(FATAL_ERROR
    "FLUX_BUILD_TESTS is ON but Catch2 (v2.13+ or v3) was not found. Install it with\n"
    "  sudo apt-get install catch2          (Debian/Ubuntu)\n"
    "or build Catch2 v3 and pass -DCMAKE_PREFIX_PATH=<its prefix>; or configure with "
    "-DFLUX_BUILD_TESTS=OFF.")
endif()

if(FLUX_CATCH2_MAJOR EQUAL 3)
  add_library(flux_catch2 INTERFACE)
  set(_flux_scope INTERFACE)
  target_link_libraries(flux_catch2 INTERFACE Catch2::Catch2WithMain)
else()
  # Catch2 v2 is header-only: its main is compiled once here (CATCH_CONFIG_MAIN), not per test.
  add_library(flux_catch2 STATIC "${PROJECT_SOURCE_DIR}/tests/cpp/catch_main_v2.cpp")
  set(_flux_scope PUBLIC)
  target_link_libraries(flux_catch2 PUBLIC Catch2::Catch2)
endif()
add_library(flux::catch2 ALIAS flux_catch2)
target_compile_definitions(flux_catch2 ${_flux_scope} FLUX_CATCH2_MAJOR=${FLUX_CATCH2_MAJOR})
target_include_directories(flux_catch2 ${_flux_scope} "${PROJECT_SOURCE_DIR}/tests/cpp")

# Catch.cmake (catch_discover_tests) sits next to the package config in both versions' installs.
if(EXISTS "${Catch2_DIR}/Catch.cmake")
  include("${Catch2_DIR}/Catch.cmake")
else()
  include(Catch)
endif()

message(STATUS "flux: Catch2 ${Catch2_VERSION} from ${Catch2_DIR}")
