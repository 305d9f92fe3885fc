#!/bin/sh
# Build the C kernels with the test program under AddressSanitizer + UBSan and run it.
# usage: csrc/tests/run_c_tests.sh   (exit status is the test program's)
set -e
here=$(cd "$(dirname "$0")" && pwd)
kernels="$here/../kernels"
out="${TMPDIR:-/tmp}/relora_test_kernels.$$"
${CC:-gcc} -std=c11 -O1 -g -fopenmp -fsanitize=address,undefined -fno-sanitize-recover=all \
    -Wall -Wextra -I"$kernels" \
    "$here/test_kernels.c" "$kernels"/common.c "$kernels"/philox.c "$kernels"/merge.c \
    "$kernels"/reset.c "$kernels"/prune.c -lm -o "$out"
set +e
ASAN_OPTIONS=detect_leaks=1 "$out"
rc=$?
rm -f "$out"
exit $rc
