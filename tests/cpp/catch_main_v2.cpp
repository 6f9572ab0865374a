// Catch2 v2 is header-only: exactly one translation unit defines main (v3 links Catch2WithMain).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
