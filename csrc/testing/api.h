// What the test-only module relora_ext._C_testing (csrc/testing/module.cpp) needs of relora_ext._C:
// the state of _C's own copy of the kernels (the level that runs) and of its merge_ (the CPU path).
// _C hands it over as a PyCapsule (the CPython way for one extension to call into another), so that
// _C itself has no Python entry points that only tests call.
#pragma once

#include <cstdint>

#define RELORA_TESTING_API_CAPSULE "relora_ext._C._testing_api"

extern "C" {
#include "kernels/common.h"
}

struct relora_testing_api {
  int (*cpu_level)(void);                    // kernels/cpu.h
  int (*cpu_best_level)(void);
  const char* (*cpu_level_name)(int level);
  int (*cpu_level_from_name)(const char* name);
  relora_status (*cpu_set_level)(int level);
  bool (*set_merge_path)(const char* name);  // ops/cpu/cycle_kernels.cpp
  const char* (*merge_path)(void);
  bool (*merge_takes_blas)(int64_t R);
};
