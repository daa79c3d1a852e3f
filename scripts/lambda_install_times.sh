#!/usr/bin/env bash
# The Lambda build venv's install, pip (the recipe before uv) against uv (make package's), one after the other.
# Usage: scripts/lambda_install_times.sh [requirements-lambda.txt]   (PY312: a Python 3.12; run from the project, after make setup)
set -euo pipefail
PY312=${PY312:-python3.12}
req=${1:-requirements-lambda.txt}
zappa=$(grep '^zappa==' requirements-dev.txt)
manylinux=""; for t in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do manylinux="$manylinux --platform ${t}_x86_64"; done
d=$(mktemp -d)
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
s=$(date +%s.%N)
$PY312 -m venv $d/pip && $d/pip/bin/python -m pip install --quiet --upgrade pip 2>/dev/null \
  && $d/pip/bin/python -m pip install --quiet $zappa 2>/dev/null \
  && $d/pip/bin/python -m pip install --quiet --upgrade --target $d/pip/lib/python3.12/site-packages $manylinux --python-version 3.12 --implementation cp --only-binary=:all: -r $req 2>/dev/null
e=$(date +%s.%N); echo "pip: $(python3 -c "print(round($e-$s,1))") s"
s=$(date +%s.%N)
$PY312 -m venv $d/uv && .venv/bin/uv pip install --quiet --python $d/uv/bin/python $zappa \
  && .venv/bin/uv pip install --quiet --python $d/uv/bin/python --target $d/uv/lib/python3.12/site-packages --python-platform x86_64-manylinux_2_28 --python-version 3.12 --only-binary :all: -r $req
e=$(date +%s.%N); echo "uv: $(python3 -c "print(round($e-$s,1))") s"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
diff <(ls $d/pip/lib/python3.12/site-packages | grep dist-info | sort) <(ls $d/uv/lib/python3.12/site-packages | grep dist-info | sort) && echo "same dist-info set"
rm -rf $d
