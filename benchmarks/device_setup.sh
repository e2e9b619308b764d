# Sourced by the benchmarks/gpu_*.sh scripts on a CUDA machine without internet: makes $OUT (default
# /tmp/omnikv_out), installs the wheels carried in .whl/ (and .whl/serve/, when there) into /tmp/site,
# then the runtime itself (editable), and prints the GPUs.
OUT=${OUT:-/tmp/omnikv_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    $(ls .whl/serve/*.whl 2>/dev/null) && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/omnikv_install.log 2>&1 \
  || { echo "install failed"; tail -20 /tmp/omnikv_install.log; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
