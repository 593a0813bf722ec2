#!/usr/bin/env bash
# Prepares, on a machine that reaches PyPI, what qbench's GPU rows need on a
# CUDA machine that reaches no package index but already has torch,
# transformers, accelerate and pytest (as the GPU machines qbench is measured
# on have): wheels for Python 3.12 / x86-64, small enough to carry.
#
#   bash benchmarks/offline_gpu/make_kit.sh [KIT]        # KIT defaults to .whl-gpu (gitignored)
#
# Then carry KIT and the checkout to the GPU machine and there run
#   source benchmarks/offline_gpu/install.sh [KIT]
# which installs into /tmp/site and exports PYTHONPATH.
#
# Layout: KIT/base (wheels), KIT/build (what pypcre is built from on the GPU
# machine: gptqmodel imports it, and PyPI has only its source), KIT/llama
# (llama-cpp-python's source without llama.cpp's models, docs and other
# backends: 5 MB of xz instead of 77 MB).
set -euo pipefail
KIT=$(mkdir -p "${1:-.whl-gpu}" && cd "${1:-.whl-gpu}" && pwd)
PY=${PYTHON:-python3}
mkdir -p "$KIT"/base "$KIT"/build "$KIT"/llama
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tags=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform any)
fetch() { "$PY" -m pip download -q --no-deps --only-binary=:all: "${tags[@]}" -d "$1" "${@:2}"; }

# qbench's own dependencies that such a machine lacks, torchao, and
# gptqmodel's runtime dependencies that are not there either.
# pydantic with its dependencies resolved (it pins pydantic-core exactly).
"$PY" -m pip download -q --only-binary=:all: "${tags[@]}" -d "$KIT"/base "pydantic>=2,<3"
fetch "$KIT"/base gguf "torchao==0.18.0" plotly datasets dill multiprocess diskcache
# Source only on PyPI, pure Python: built into wheels here.
# (--no-binary names them: with :all: pip would build their build tools from source too)
"$PY" -m pip download -q --no-deps --no-binary gptqmodel,gemlite,defuser,device-smi,logbar,tokenicer,pypcre,llama-cpp-python -d "$work"/sd "gptqmodel==7.7.0" "gemlite>=0.5,<0.6" \
  defuser device-smi logbar tokenicer pypcre "llama-cpp-python==0.3.36"
for s in "$work"/sd/*; do
  case $(basename "$s") in pypcre-*|llama_cpp_python-*) continue ;; esac
  "$PY" -m pip wheel -q --no-deps -w "$KIT"/base "$s"
done
# bitsandbytes: only the CUDA 13 and CPU libraries (43 MB -> 3.5 MB).
fetch "$work"/bnb "bitsandbytes==0.50.2"
mkdir "$work"/bnbx && (cd "$work"/bnbx && unzip -q "$work"/bnb/*.whl &&
  find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cuda130.so' ! -name '*_cpu.so' -delete &&
  zip -q -r "$KIT/base/$(basename "$work"/bnb/*.whl)" .)
# pypcre is a C extension: built on the GPU machine against its libpcre2-8,
# with pcre2.h from Debian's libpcre2-dev and a setuptools its pyproject accepts.
cp "$work"/sd/pypcre-*.tar.gz "$KIT"/build/
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$KIT"/build "setuptools>=84,<85" wheel
(cd "$work" && apt-get download libpcre2-dev >/dev/null 2>&1 && dpkg -x libpcre2-dev_*.deb pcre &&
  cp pcre/usr/include/pcre2.h "$KIT"/build/) ||
  { echo "make_kit.sh: could not fetch pcre2.h (apt-get download libpcre2-dev): copy it into $KIT/build by hand" >&2; exit 1; }
# llama-cpp-python's source, trimmed (built on the GPU machine with GGML_CUDA=on).
tar xzf "$work"/sd/llama_cpp_python-*.tar.gz -C "$work"
src=$(ls -d "$work"/llama_cpp_python-*/)
(cd "$src"/vendor/llama.cpp && rm -rf .git docs benches media tools/ui models/* &&
  rm -rf ggml/src/ggml-{virtgpu,cann,openvino,webgpu,et,metal,hexagon,sycl,vulkan,opencl,musa,zdnn,rpc,zendnn})
rm -rf "$src"/.git
tar cJf "$KIT"/llama/llama-src.tar.xz -C "$work" "$(basename "$src")"
du -sh "$KIT"/base "$KIT"/build "$KIT"/llama
