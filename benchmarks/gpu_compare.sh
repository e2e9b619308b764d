#!/usr/bin/env bash
# The decode step before and after a change, on one card, in one device call: the earlier tree first,
# then this one, with the same command (the comparison: every cell within 3% or faster).
# The earlier tree is unpacked beforehand into .baseline/ (ignored by git; name it in the call's carry):
#   mkdir -p .baseline && git archive REV | tar -x -C .baseline && echo /.baseline/ >> .git/info/exclude
# Usage: LIMIT=270 bash benchmarks/gpu_compare.sh   (LIMIT: seconds each run may take; the JSON is
# written after every cell, so a run cut short still leaves the cells it finished)
set -u
source benchmarks/device_setup.sh
A=${DECODE_ARGS:---contexts 131072,32768 --batches 1,4 --budgets 2048 --hot-multiples 2 --steps 10 --hf=}
LIMIT=${LIMIT:-270}
for side in before after; do
  tree=$([ "$side" = before ] && echo .baseline || echo .)
  (cd "$tree" && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /dev/null 2>&1 \
    && timeout "$LIMIT" python3 benchmarks/decode.py $A --out "$OUT/decode_$side.json" > /dev/null \
    2> "$OUT/decode_$side.err")
  echo "== $side: rc=$?"
  grep -E "^\|" "$OUT/decode_$side.err" | tail -20
done
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /dev/null 2>&1  # this tree again
