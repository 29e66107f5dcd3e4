# Sourced by tools/gpu_bench.sh and tools/gpu_smoke.sh: the environment of a GPU machine without internet.
#
# Such a machine has torch, timm, sentencepiece, tensorboard and pyyaml but may lack deepspeed and webdataset:
# they come from wheels/ (made on a machine with PyPI by `tools/gpu_bench.sh --wheels`), installed into a
# throw-away folder on PYTHONPATH. The repo itself is used in place (PYTHONPATH), nothing is pip-installed.
# Sets PYTHON (default python3) and exports PYTHONPATH and PYTHONUNBUFFERED.
PYTHON=${PYTHON:-python3}
WHEEL_PYTHON=${WHEEL_PYTHON:-3.12}

gpu_env_make_wheels() {  # DIR: fetch what a GPU machine without internet lacks, for its Python (WHEEL_PYTHON)
    local wheels=$1
    mkdir -p "$wheels"
    # deepspeed is an sdist on PyPI; built here it is a pure-Python wheel (its CUDA ops JIT-build on first use)
    "$PYTHON" -m pip wheel -q --no-deps -w "$wheels" deepspeed==0.19.8
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON" --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$wheels" \
        webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
        annotated-types==0.8.0 typing-inspection==0.4.5
    ls -1 "$wheels"
}

gpu_env_activate() {  # WHEELS_DIR NAME: make deepspeed and webdataset importable; NAME prefixes the errors
    local wheels=$1 name=$2
    if ! "$PYTHON" -c "import deepspeed, webdataset" 2>/dev/null; then
        ls "$wheels"/*.whl >/dev/null 2>&1 || {
            echo "$name: deepspeed/webdataset are not installed and $wheels/ has no wheels; make them with" \
                 "'tools/gpu_bench.sh --wheels' on a machine with PyPI and copy $wheels/ here" >&2
            return 1
        }
        local site
        site=$(mktemp -d /tmp/flipds-site.XXXX)
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    "$PYTHON" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU: CPU')"
}
