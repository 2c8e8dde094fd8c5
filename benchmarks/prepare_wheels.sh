#!/usr/bin/env bash
# Prepare the packages a GPU machine without registry access lacks (../shared/GPU.md), in
# pieces small enough for a copy channel that takes ~64 MB per transfer:
#
#   bash benchmarks/prepare_wheels.sh         # on a connected x86-64 machine, repo root
#
# leaves under ./wheels (ignored by git):
#   x/   the xformers wheel (3 MB; note: the registry's 0.0.35 had no CUDA kernels for
#        torch 2.11 + CUDA 13 on the H100 of 2026-11-22, so it imports but cannot run);
#   d1/ d2/ d3/   nvidia-dali-cuda130 and its dependencies, installed into one site folder
#        (Python 3.12, manylinux x86-64), pruned (other Pythons' extension modules, nvcomp's
#        command-line tools and headers), xz-compressed and split in three parts:
#        dalisite.tar.xz.part-aa / -ab / -ac, ~57 MB each (was 262 MB of wheels).
# On the GPU machine, `benchmarks/run_gpu.sh` (stage `packages`) reassembles the parts
# found anywhere under ./wheels and unpacks them into /tmp/site. Send each folder with a
# different call while the machine stays up (a later call does not remove what an earlier
# one sent unless it names the same folder), then run the stage that needs them.
set -euo pipefail
cd "$(dirname "$0")/.."
DALI=${DALI:-nvidia-dali-cuda130==2.4.0}
XFORMERS=${XFORMERS:-xformers==0.0.35}
DEPS="astunparse==1.6.3 gast==0.7.0 optree nvtx makefun libcst~=1.8 \
nvidia-nvimgcodec-cu13<0.10.0,>=0.9.0 nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvjpeg"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $PLATFORMS -d "$@" 2>&1 | grep -v "is ignored" || true
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p wheels/x wheels/d1 wheels/d2 wheels/d3 "$work/whl" "$work/site"
download wheels/x "$XFORMERS"
# shellcheck disable=SC2086
download "$work/whl" "$DALI" $DEPS
ls "$work"/whl/*.whl | grep -q nvidia_dali || { echo "could not download $DALI"; exit 1; }
for w in "$work"/whl/*.whl; do (cd "$work/site" && unzip -q -o "$w"); done
# what a Python 3.12 process that decodes JPEG/PNG never loads
find "$work/site/nvidia/nvimgcodec" -name 'nvimgcodec_impl.cpython-*' \
  ! -name '*cpython-312-*' -delete
rm -rf "$work/site/nvidia/libnvcomp/bin" "$work/site/nvidia/libnvcomp/include"
rm -f "$work/site/nvidia/__init__.py"  # keep `nvidia` a namespace shared with torch's libs
echo "site folder: $(du -sh "$work/site" | cut -f1); compressing (a few minutes)..."
(cd "$work/site" && tar cf - . | xz -T0 -9 > "$work/dalisite.tar.xz")
rm -f wheels/d*/dalisite.tar.xz.part-*
(cd "$work" && split -n 3 -a 2 dalisite.tar.xz dalisite.tar.xz.part-)
mv "$work/dalisite.tar.xz.part-aa" wheels/d1/
mv "$work/dalisite.tar.xz.part-ab" wheels/d2/
mv "$work/dalisite.tar.xz.part-ac" wheels/d3/
ls -l wheels/x wheels/d1 wheels/d2 wheels/d3
