#!/bin/sh
# Compile the leveled kernels once per instruction-set level of levels.txt (those of the target
# architecture), as setup.py does, and print the object files' paths.
# usage: csrc/kernels/build_levels.sh <compiler> <target arch, e.g. $(uname -m)> <output dir> [flags...]
set -e
here=$(cd "$(dirname "$0")" && pwd)
cc=$1; arch=$2; out=$3; shift 3
case "$arch" in amd64) arch=x86_64 ;; esac
# comments (from a '#' on) are dropped first, as setup.py drops them
sources=$(awk '{ sub(/#.*/, "") } $1 == "sources" { $1 = ""; print }' "$here/levels.txt")
awk -v arch="$arch" '{ sub(/#.*/, "") } $1 == "level" && ($3 == "any" || $3 == arch) { $1 = ""; $3 = ""; print }' \
    "$here/levels.txt" |
while read -r level flags; do
    for src in $sources; do
        o="$out/${src%.c}_$level.o"
        # shellcheck disable=SC2086  (the flags are words)
        $cc "$@" $flags -DRELORA_LEVEL="$level" -I"$here" -c "$here/$src" -o "$o"
        echo "$o"
    done
done
