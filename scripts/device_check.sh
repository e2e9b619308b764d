#!/usr/bin/env bash
# Run the GPU tests (and the CPU suite, against the device's transformers) on a CUDA machine
# without network: carried wheels in .whl/, the package laid out under /tmp/pkg.
set -uo pipefail
REPO=$(pwd)
source "$REPO/scripts/device_env.sh"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
python3 -P -m pytest "$REPO/tests" -m gpu -q -p no:cacheprovider 2>&1 | tee "${OUT:-/tmp}/gpu_tests.log"
python3 -P -m pytest "$REPO/tests" -q -p no:cacheprovider --deselect "$REPO/tests/test_bundled_model.py" 2>&1 | tail -15 | tee "${OUT:-/tmp}/cpu_tests.log"
