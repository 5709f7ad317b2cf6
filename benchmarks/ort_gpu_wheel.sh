#!/usr/bin/env bash
# onnxruntime-gpu on a GPU machine that can only receive ~64 MB per call (the device tool here).
#   pack [VERSION]   here: download the wheel, repack it as tar.xz (255 -> 203 MB) and split it
#                    into .ortp1 .. .ortpN (60 MB each; git-ignored folders, carry one per call)
#   stash            there, in each call: move the carried part to /tmp/ortparts
#   install [DIR]    there, in the last call: join, check sha256, unpack into DIR (/tmp/site)
# The wheel's files are unpacked as they are: a wheel is a zip of its site-packages tree.
set -euo pipefail
cmd=${1:?pack, stash or install}
case "$cmd" in
pack)
  version=${2:-1.31.1}
  work=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$work" "onnxruntime-gpu==$version"
  mkdir "$work/x" && (cd "$work/x" && unzip -q "$work"/onnxruntime_gpu-*.whl)
  tar -C "$work/x" -cf - . | xz -T0 -9 > "$work/ort.tar.xz"
  rm -rf .ortp[0-9]*
  (cd "$work" && split -b 60M -d -a 1 ort.tar.xz part.)
  n=0
  for p in "$work"/part.*; do
    n=$((n + 1)); mkdir ".ortp$n"; mv "$p" ".ortp$n/"
    grep -qx "/.ortp$n/" .git/info/exclude 2>/dev/null || echo "/.ortp$n/" >> .git/info/exclude
  done
  sha256sum "$work/ort.tar.xz" | cut -d' ' -f1 > .ortp1/ort.tar.xz.sha256
  echo "$n parts, sha256 $(cat .ortp1/ort.tar.xz.sha256)"
  rm -rf "$work"
  ;;
stash)
  mkdir -p /tmp/ortparts
  for d in .ortp[0-9]*; do [ -d "$d" ] && cp "$d"/* /tmp/ortparts/; done
  ls -la /tmp/ortparts
  ;;
install)
  dest=${2:-/tmp/site}
  cd /tmp/ortparts
  cat part.* > ort.tar.xz
  echo "$(cat ort.tar.xz.sha256)  ort.tar.xz" | sha256sum -c -
  mkdir -p "$dest" && xz -dc ort.tar.xz | tar -C "$dest" -xf -
  echo "onnxruntime-gpu unpacked into $dest"
  ;;
*) echo "unknown command $cmd" >&2; exit 2 ;;
esac
