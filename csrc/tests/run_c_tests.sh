#!/bin/sh
# Build the C kernels with the test program under AddressSanitizer + UBSan and run it, twice: with the
# intrinsic fast paths (the AVX512-BF16 merge at that level) and with RELORA_NO_INTRINSICS (the plain C
# paths only). Each build compiles the leveled kernels once per instruction-set level (csrc/kernels/levels.txt,
# through csrc/kernels/build_levels.sh), as setup.py does,
# and the test program runs every level this CPU supports (csrc/kernels/cpu.h).
# On x86-64, if aarch64-linux-gnu-gcc and qemu-aarch64 are on PATH, also cross-builds the kernels for
# aarch64 and runs the same tests under qemu (else prints one line saying they were skipped).
# usage: csrc/tests/run_c_tests.sh   (exit status: 0 if all pass)
set -e
here=$(cd "$(dirname "$0")" && pwd)
kernels="$here/../kernels"
work="${TMPDIR:-/tmp}/relora_test_kernels.$$"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
cc=${CC:-gcc}
common="-std=c11 -O1 -g -fopenmp -fsanitize=address,undefined -fno-sanitize-recover=all -Wall -Wextra -Wno-psabi -I$kernels"
rc=0
for extra in "" "-DRELORA_NO_INTRINSICS"; do
    echo "== build: every level of csrc/kernels/levels.txt for $(uname -m) ${extra:-(with intrinsics)}"
    # shellcheck disable=SC2086
    objs=$(sh "$kernels/build_levels.sh" "$cc" "$(uname -m)" "$work" $common $extra)
    $cc $common $extra "$here/test_kernels.c" "$kernels/common.c" "$kernels/cpu.c" $objs -lm -o "$work/test"
    set +e
    ASAN_OPTIONS=detect_leaks=1 "$work/test"
    r=$?
    set -e
    [ $r -ne 0 ] && rc=$r
done

# aarch64, cross-compiled and run under qemu user-mode emulation, when both tools are on PATH (optional:
# nothing else needs them). Only the `default` level exists there (NEON is baseline, cpu.h); it has no
# intrinsic paths, so one build covers what RELORA_NO_INTRINSICS would. LeakSanitizer cannot run under
# qemu (detect_leaks=0); ASan and UBSan do. QEMU_LD_PREFIX: the aarch64 sysroot (Debian's by default).
case "$(uname -m)" in aarch64|arm64) arm_native=1 ;; *) arm_native=0 ;; esac
armcc=aarch64-linux-gnu-gcc
if [ $arm_native -eq 1 ]; then
    : # the native run above was the aarch64 one
elif command -v $armcc >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1; then
    echo "== build: aarch64 (cross, $armcc; run under qemu-aarch64), level default"
    mkdir -p "$work/aarch64"
    # shellcheck disable=SC2086
    objs=$(sh "$kernels/build_levels.sh" "$armcc" aarch64 "$work/aarch64" $common)
    $armcc $common "$here/test_kernels.c" "$kernels/common.c" "$kernels/cpu.c" $objs -lm -o "$work/test_aarch64"
    set +e
    QEMU_LD_PREFIX="${QEMU_LD_PREFIX:-/usr/aarch64-linux-gnu}" ASAN_OPTIONS=detect_leaks=0 \
        qemu-aarch64 "$work/test_aarch64"
    r=$?
    set -e
    [ $r -ne 0 ] && rc=$r
else
    echo "== aarch64 kernel tests skipped: $armcc and qemu-aarch64 are not both on PATH"
fi
exit $rc
