/*
 * relora kernels: one source, several instruction-set levels.
 *
 * The leveled sources (csrc/kernels/levels.txt) are compiled once per level, each time with the level's
 * -m flags and -DRELORA_LEVEL=<name> (default, avx2, avx512, avx512_bf16). This header, included by
 * common.h when RELORA_LEVEL is defined, gives every function of kernel_list.h the symbol
 * <name>_<level> (GCC's and Clang's redefine_extname pragma), so that the copies link side by side;
 * table.c collects one level's copies in relora_kernels_<level>, and cpu.c (compiled once, for the
 * baseline) defines the plain names, which call the table of the level chosen at run time (cpu.h).
 */
#ifndef RELORA_LEVEL_H
#define RELORA_LEVEL_H

#define RELORA_CAT2(a, b) a##_##b
#define RELORA_CAT(a, b) RELORA_CAT2(a, b)
#define RELORA_AT_LEVEL(f) RELORA_CAT(f, RELORA_LEVEL)
#define RELORA_STR(x) #x
#define RELORA_PRAGMA(x) _Pragma(RELORA_STR(x))
#define RELORA_RENAME(ret, name, params, args, ret_kw) RELORA_PRAGMA(redefine_extname name RELORA_AT_LEVEL(name))

#include "kernel_list.h"
RELORA_LEVELED_KERNELS(RELORA_RENAME)

#endif
