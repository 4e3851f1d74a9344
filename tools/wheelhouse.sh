#!/usr/bin/env bash
# `make wheelhouse`: every wheel bridge_trl needs beyond a base GPU environment, for compute nodes with no network
# (README, "Offline GPU nodes"). Run on a machine with internet; copy dist/wheelhouse/ to the node; there:
#     pip install --no-index --find-links dist/wheelhouse "bridge_trl[deepspeed]"
#
# The base assumed (BASE, names only): a CUDA image that already has torch, accelerate, numpy, pyarrow (>= 24 for
# datasets 5.2), pandas, huggingface-hub, safetensors, tokenizers, pyyaml, tqdm, filelock, fsspec, xxhash,
# requests, sympy. transformers and peft are carried even though such images have them: TRL 1.16 takes another
# gradient-accumulation path below transformers 5.19 (DESIGN.md §9), and 5.24.0 is the newest that accepts
# huggingface-hub 1.33, which such images ship.
# Variables: PYTHON_VERSION (3.12), PLATFORM (manylinux_2_28_x86_64; older manylinux tags are tried too),
# OUT (dist/wheelhouse), PYTHON (the interpreter that builds DeepSpeed's and the project's wheels: needs torch).
set -euo pipefail
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
OUT=${OUT:-dist/wheelhouse}
PYTHON=${PYTHON:-python}
# Pinned to the versions CI tests with (pyproject.toml's ranges): one version of each, since a node installs
# them with --no-index and two versions of a name stop the install.
WHEELS=(
    "trl==1.16.0" "transformers==5.24.0" "peft==0.21.2" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"
    "math-verify==0.9.0" "latex2sympy2_extended==1.11.0" "antlr4-python3-runtime==4.13.2" "hjson==3.1.0"
    "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
    "typing-extensions==4.16.0"
)
mkdir -p "$OUT"
platforms=()
for p in "$PLATFORM" manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --implementation cp "${platforms[@]}" -d "$OUT" "${WHEELS[@]}"
# DeepSpeed: PyPI has its source only. A pure-Python wheel with no compiled op (DS_BUILD_OPS=0): an op a config asks
# for (e.g. FusedAdam) JIT-compiles on the node, which needs nvcc and ninja there. Its setup imports torch.
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" "deepspeed==0.19.8"
# The project itself.
"$PYTHON" -m pip wheel --quiet --no-deps -w "$OUT" .
count=$(find "$OUT" -name '*.whl' | wc -l)
echo "$count wheels, $(du -sh "$OUT" | cut -f1) in $OUT (for Python $PYTHON_VERSION, $PLATFORM)"
