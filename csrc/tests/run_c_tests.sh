#!/bin/sh
# Build the C kernels with the test program under AddressSanitizer + UBSan and run it, twice: for the
# build machine (-march=native: the AVX-512 fast paths where the CPU has them) and portable (no -march,
# and RELORA_NO_INTRINSICS: the plain C paths only).
# usage: csrc/tests/run_c_tests.sh   (exit status: 0 if both pass)
set -e
here=$(cd "$(dirname "$0")" && pwd)
kernels="$here/../kernels"
out="${TMPDIR:-/tmp}/relora_test_kernels.$$"
rc=0
for flags in "-march=native" "-DRELORA_NO_INTRINSICS"; do
    echo "== build: $flags"
    ${CC:-gcc} -std=c11 -O1 -g $flags -fopenmp -fsanitize=address,undefined -fno-sanitize-recover=all \
        -Wall -Wextra -Wno-psabi -I"$kernels" \
        "$here/test_kernels.c" "$kernels"/common.c "$kernels"/philox.c "$kernels"/merge.c \
        "$kernels"/reset.c "$kernels"/prune.c -lm -o "$out"
    set +e
    ASAN_OPTIONS=detect_leaks=1 "$out"
    r=$?
    set -e
    rm -f "$out"
    [ $r -ne 0 ] && rc=$r
done
exit $rc
