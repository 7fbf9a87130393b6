#!/usr/bin/env bash
# `make test-compat`: the whole suite on the oldest and the newest supported torch.
#
# Each torch gets its own virtualenv, .venv-compat-<torch> (ignored by git), with the matching
# torchvision and timm, so the real-model tests in tests/models run instead of skipping. Every
# other package is pinned by constraints.txt, as in `make test`, except torch, torchvision and
# the two that torch pins itself (triton, sympy).
# The C++ kernels compile once per torch version (about a minute each, cached on disk).
#
#   COMPAT_TORCH="2.6.0:0.21.0 2.14.1:0.29.1"   torch:torchvision pairs (the default)
#   COMPAT_PYTEST="-x tests/nn"                  pytest arguments (default: the whole suite)
#   COMPAT_EXTRA="timm==1.0.31"                  more packages for the real-model tests
#
# The PyPI builds of torch for Linux are CUDA builds (~5 GB per venv); 2.14.1 and its
# torchvision lie on this machine's disk, 2.6.0 downloads (~3 GB). The suite runs on the CPU;
# the summary at the end gives each torch's result and time.
set -uo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PAIRS=${COMPAT_TORCH:-"2.6.0:0.21.0 2.14.1:0.29.1"}
EXTRA=${COMPAT_EXTRA:-timm==1.0.31}
read -r -a PYTEST_ARGS <<<"${COMPAT_PYTEST:--q -p no:cacheprovider}"

install() {  # install VENV TORCH TORCHVISION: (re)build the venv when its inputs changed
    local venv=$1 torch=$2 vision=$3 stamp=$1/.installed
    if [[ -f $stamp && $stamp -nt pyproject.toml && $stamp -nt constraints.txt && $stamp -nt $SELF ]]; then
        return 0
    fi
    test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv" || return 1
    # torch pins its own triton and sympy: leave those (and torch, torchvision) to it
    grep -v -E '^(torch|torchvision|triton|sympy)==' constraints.txt >"$venv/constraints.txt"
    # the dev tools, with the Triton that this torch build ships rather than the dev pin
    local dev
    dev=$("$venv/bin/python" -c 'import tomllib; print(*[r for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"] if not r.startswith("triton")])') || return 1
    # shellcheck disable=SC2086  # $dev: one requirement per word
    "$venv/bin/python" -m pip install --quiet --progress-bar off -c "$venv/constraints.txt" \
        "torch==$torch" "torchvision==$vision" $EXTRA -e . $dev || return 1
    touch "$stamp"
}

summary=()
status=0
for pair in $PAIRS; do
    torch=${pair%%:*}
    vision=${pair#*:}
    venv=.venv-compat-$torch
    echo "== torch $torch, torchvision $vision: $venv"
    if ! install "$venv" "$torch" "$vision"; then
        summary+=("torch $torch: INSTALL FAILED")
        status=1
        continue
    fi
    # The real-model tests skip when torchvision or timm does not import: here they must.
    if ! "$venv/bin/python" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"; then
        summary+=("torch $torch: torchvision or timm does not import")
        status=1
        continue
    fi
    start=$SECONDS
    "$venv/bin/python" -m pytest "${PYTEST_ARGS[@]}"
    rc=$?
    result=$([[ $rc == 0 ]] && echo passed || echo "FAILED (pytest exit $rc)")
    summary+=("torch $torch + torchvision $vision: $result in $((SECONDS - start)) s")
    [[ $rc == 0 ]] || status=1
done
echo "== test-compat summary"
printf '%s\n' "${summary[@]}"
exit $status
