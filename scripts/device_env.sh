# Source on the device machine (no network): installs the carried wheels in .whl/ to /tmp/site and
# lays the package out under /tmp/pkg as setup.py's package_dir does; run python with -P.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r omnikv_runtime /tmp/pkg/ && \
  cp -r transfer policies configs /tmp/pkg/omnikv_runtime/
export PYTHONPATH=/tmp/site:/tmp/pkg
