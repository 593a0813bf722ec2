# Source on the offline CUDA machine, from the checkout's root, with the kit
# that make_kit.sh wrote:  source benchmarks/offline_gpu/install.sh [KIT]
# Installs the kit's wheels once into /tmp/site (it survives between calls on
# a machine kept warm), builds pypcre against the machine's libpcre2-8, then
# installs this checkout (its plugins are entry points, so it must be
# installed, not only on PYTHONPATH) and exports PYTHONPATH. qbench then
# runs as `python3 -m qbench` (an install with --target writes no script).
KIT=${1:-.whl-gpu}
S=/tmp/site
export PYTHONUNBUFFERED=1
if [ ! -f $S/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $S "$KIT"/base/*.whl || return 1
  python3 -m pip install -q --no-index --no-deps --target /tmp/bt "$KIT"/build/setuptools*.whl "$KIT"/build/wheel*.whl || return 1
  mkdir -p /tmp/pcinc && cp "$KIT"/build/pcre2.h /tmp/pcinc/
  lib=$(ldconfig -p | awk '/libpcre2-8.so.0 .*x86-64/{print $NF; exit}')
  [ -n "$lib" ] || { echo "no libpcre2-8.so.0 on this machine: gptqmodel's pypcre cannot be built"; return 1; }
  PYTHONPATH=/tmp/bt PYPCRE_INCLUDE_DIR=/tmp/pcinc PYPCRE_LIBRARY_PATH=$lib \
    python3 -m pip wheel -q --no-index --no-deps --no-build-isolation -w /tmp/pcw "$KIT"/build/pypcre-*.tar.gz || return 1
  python3 -m pip install -q --no-index --no-deps --target $S /tmp/pcw/*.whl || return 1
  touch $S/.done
fi
rm -rf /tmp/qb
PYTHONPATH=/tmp/bt python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/qb . || return 1
export PYTHONPATH=/tmp/qb:$S
python3 -c "import torch, transformers, torchao, bitsandbytes, gptqmodel, qbench; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'torchao', torchao.__version__, 'gptqmodel', gptqmodel.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
