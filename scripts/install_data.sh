#!/usr/bin/env bash
# Installs Debian's dataset-fashion-mnist when its files are missing (apt-get as root, else sudo).
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if ls "$dir"/train-images-idx3-ubyte* >/dev/null 2>&1; then exit 0; fi
echo "Fashion-MNIST not found in $dir: installing Debian's dataset-fashion-mnist" >&2
if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
  echo "error: run as root: apt-get update && apt-get install -y dataset-fashion-mnist" >&2; exit 1; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist
