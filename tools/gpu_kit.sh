#!/usr/bin/env bash
# The GPU figures of issues 5 and 7 on the lent device machine, in as few calls as its limits allow.
#
# That machine has python3 3.12 with torch, transformers, accelerate, OpenCV, SciPy, scikit-image,
# matplotlib and psutil, but not diffusers, PyAV, dlib or dlib's landmark model, and it cannot download.
# Its peft is of unknown version, and peft ≤ 0.17 cannot be imported beside its transformers 5.17 (nor,
# then, diffusers): our pinned peft travels too and shadows it.
# A call carries at most 64 MiB: the landmark model (60 MiB even with xz) and the wheels (44 MiB) need
# two calls, the second within the 30 s the machine stays warm.
#
#   here, once:     bash tools/gpu_kit.sh fetch         # fills .kit/ and .whl/ (both git-ignored)
#   device call 1:  carry [".kit"]   bash tools/gpu_kit.sh predictor
#   device call 2:  carry [".whl"]   IPFACEDIFF_COMMIT=<sha> bash tools/gpu_kit.sh bench sd21_40 --frames 40 --sync-report
#   device call 3+: carry [".whl"]   IPFACEDIFF_COMMIT=<sha> bash tools/gpu_kit.sh bench sd21_300 --frames 300   (while warm)
#   then, while warm: `bench nocl --frames 40 --no-channels-last` (CUDA's GroupNorm may copy out of channels_last
#   in eager mode: measure before keeping it the default), `adapters --branches adapters`, `compiled --frames 40 --compile`
# Each `bench NAME ARGS` runs `ipfacediff bench --config sd21 --device cuda ARGS` and leaves NAME.json
# and NAME.log under $OUT. PYVER (default 3.12) and PYTHON (default python3) are for trying it elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/ipfacediff-site}                       # wheels install here, the landmark model beside them
WHEELS="diffusers==0.42.1 av==18.1.0 dlib-bin==20.0.1.post1 peft==0.21.2"
MODEL=shape_predictor_68_face_landmarks.dat

case "${1:-}" in
fetch)
    pyver=${PYVER:-3.12}
    mkdir -p .whl .kit
    rm -f .whl/*.whl
    for w in $WHEELS; do
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .whl "$w"
    done
    src=$("$PYTHON" -c "from ipfacediff.faces import dlib_model_path; print(dlib_model_path())")
    if [ ! -s ".kit/$MODEL.xz" ]; then                    # ~4 min on 2 cores
        xz -T0 -9 -c "$src" > ".kit/$MODEL.xz.part"
        mv ".kit/$MODEL.xz.part" ".kit/$MODEL.xz"
    fi
    du -sh .whl .kit
    ;;
predictor)                                              # device call 1
    [ -s ".kit/$MODEL.xz" ] || { echo "gpu_kit: .kit/$MODEL.xz is missing: run 'bash tools/gpu_kit.sh fetch' here and carry .kit" >&2; exit 2; }
    mkdir -p "$SITE/models/face_recognition_models/models"   # a namespace package: faces.dlib_model_path finds it
    "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        ".kit/$MODEL.xz" "$SITE/models/face_recognition_models/models/$MODEL"   # no xz binary needed there
    ls -la "$SITE/models/face_recognition_models/models"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
    "$PYTHON" -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
    ;;
bench)                                                   # device call 2 and later
    name=${2:?usage: gpu_kit.sh bench NAME [bench options]}; shift 2
    [ -s "$SITE/models/face_recognition_models/models/$MODEL" ] || {
        echo "gpu_kit: the landmark model is not on this machine (a fresh one?): run call 1 ('predictor', carrying .kit) first" >&2; exit 2; }
    if [ ! -d "$SITE/diffusers" ]; then
        ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_kit: no wheels under .whl: carry .whl" >&2; exit 2; }
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    fi
    export PYTHONPATH="$SITE:$SITE/models:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    out=${OUT:-.}
    "$PYTHON" - <<'PY' | tee "$out/$name.versions"   # a package it lacks is printed as missing, not a reason to stop
import importlib.metadata as m, sys
def version(p):
    try: return m.version(p)
    except m.PackageNotFoundError: return 'missing'
print('python', sys.version.split()[0], *(f'{p} {version(p)}' for p in
      ('torch', 'diffusers', 'transformers', 'peft', 'accelerate', 'huggingface_hub', 'av', 'numpy')))
PY
    "$PYTHON" -c 'import sys; from ipfacediff.cli import main; sys.exit(main())' \
        bench --config sd21 --device "${DEVICE:-cuda}" --quiet --json "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log"
    ;;
*)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
