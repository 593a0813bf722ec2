# Source after install.sh: builds llama-cpp-python from the kit's source with
# GGML_CUDA=on for this GPU (the machine's nvcc; about 3 minutes on 16 cores)
# into /tmp/llsite and puts it on PYTHONPATH. LLAMA_LDFLAGS adds linker flags
# (e.g. -Wl,-Bsymbolic).
KIT=${1:-.whl-gpu}
rm -rf /tmp/llsrc /tmp/llw /tmp/llsite && mkdir -p /tmp/llsrc && tar xJf "$KIT"/llama/llama-src.tar.xz -C /tmp/llsrc || return 1
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native -DLLAVA_BUILD=OFF \
-DCMAKE_SHARED_LINKER_FLAGS=${LLAMA_LDFLAGS:-}" python3 -m pip wheel -q --no-index --no-deps --no-build-isolation \
  -w /tmp/llw /tmp/llsrc/llama_cpp_python-* || return 1
python3 -m pip install -q --no-index --no-deps --target /tmp/llsite /tmp/llw/*.whl || return 1
export PYTHONPATH=/tmp/llsite:$PYTHONPATH
