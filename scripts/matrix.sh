#!/usr/bin/env bash
# Runs bnfold's tests on every stack the README's table of supported versions lists.
#
#   scripts/matrix.sh [ROW ...]     rows: py3.10-tf2.15 py3.11-reference py3.12-tf2.21 py3.13-tf2.21
#
# Each row makes a fresh venv (under $MATRIX_VENVS, default .matrix/ in the checkout), installs
# bnfold from this checkout with the README's commands and runs the tests: the whole suite on the
# reference row, the golden, export, unfold, populate, load and CLI tests (ROW_TESTS) on the
# others. The next row installs while the current one tests, its output shown when it is done.
#
# py3.10-tf2.15 is a QKeras user's existing environment: it first installs TensorFlow 2.15 and
# QKeras 0.9.0 on their own (pinned by constraints/tf2.15.txt), then bnfold and its test tools
# with the README's one-line install into an existing environment (constrained to what is
# installed), and fails if pip changed any package that was there before. The other rows install
# with the README's test command (constraints/reference.txt). Every row then checks that it has
# the versions the README's table lists for it.
#
# Python interpreters: $PYTHON_3_10 etc., else pyenv's 3.10.x etc., else python3.10 etc. on PATH.
# Exits non-zero if any row fails; ends with one line per row.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENVS="${MATRIX_VENVS:-$ROOT/.matrix}"
ALL_ROWS=(py3.10-tf2.15 py3.11-reference py3.12-tf2.21 py3.13-tf2.21)
EXISTING_STACK=("tensorflow==2.15.1" "qkeras==0.9.0")
ROW_TESTS=(tests/test_golden.py tests/test_export.py tests/test_unfold.py tests/test_accumulator.py
    tests/test_loading.py tests/test_cli.py tests/test_export_cli.py tests/test_keras.py
    tests/test_repository.py)

log() { printf '[matrix %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

find_python() {
    local version="$1" variable="PYTHON_${1//./_}" candidate
    for candidate in "${!variable:-}" "${PYENV_ROOT:-$HOME/.pyenv}/versions/$version".*/bin/python \
        "$(command -v "python$version")"; do
        # A pyenv shim exists for every installed version but runs only the active ones.
        if [[ -x "$candidate" ]] && "$candidate" -c "" 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# Package versions as "name==version" lines, normalised and sorted, bnfold itself left out.
installed() {
    "$1" -m pip list --format=freeze --exclude-editable 2>/dev/null |
        tr '[:upper:]_' '[:lower:]-' | grep -v '^bnfold==' | sort
}

# Fails, naming each one, if a package of the "before" list has another version now or is gone.
unchanged_since() {
    local before="$1" python="$2" changed
    changed="$(comm -23 "$before" <(installed "$python"))"
    if [[ -n "$changed" ]]; then
        log "pip changed packages that were installed before bnfold (version before shown):"
        echo "$changed"
        return 1
    fi
    log "pip left all $(wc -l <"$before") packages installed before bnfold as they were"
}

# Makes the row's venv and installs into it; its last check is the README table's versions.
install_row() {
    local row="$1" version venv python interpreter
    version="${row#py}"
    version="${version%%-*}"
    venv="$VENVS/$row"
    python="$venv/bin/python"
    interpreter="$(find_python "$version")" || {
        log "$row: no Python $version found (set PYTHON_${version//./_})"
        return 1
    }
    log "$row: fresh venv from $interpreter"
    rm -rf "$venv" && "$interpreter" -m venv "$venv" || return 1
    cd "$ROOT" || return 1

    case "$row" in
        py3.10-tf2.15)
            log "$row: the user's stack: ${EXISTING_STACK[*]}"
            "$python" -m pip install -q -c constraints/tf2.15.txt "${EXISTING_STACK[@]}" || return 1
            installed "$python" >"$venv/before.txt"
            log "$row: README's install into an existing environment"
            (cd "$venv" && bin/python -m pip list --format=freeze >keep.txt &&
                bin/python -m pip install -q -c keep.txt "$ROOT") || return 1
            unchanged_since "$venv/before.txt" "$python" || return 1
            log "$row: the test tools, the same way"
            "$python" -m pip install -q -c "$venv/keep.txt" -e ".[test]" || return 1
            unchanged_since "$venv/before.txt" "$python" || return 1
            ;;
        *)
            log "$row: README's test command (install)"
            "$python" -m pip install -q -c constraints/reference.txt -e ".[test]" || return 1
            ;;
    esac
    "$python" scripts/supported_versions.py "$row"
}

test_row() {
    local row="$1" tests=()
    [[ "$row" == *-reference ]] || tests=("${ROW_TESTS[@]}")
    cd "$ROOT" || return 1
    log "$row: python -m pytest ${tests[*]}"
    "$VENVS/$row/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
}

main() {
    local rows=("$@") row next status=0 started installed_ok summary=()
    [[ ${#rows[@]} -gt 0 ]] || rows=("${ALL_ROWS[@]}")
    for row in "${rows[@]}"; do
        if [[ ! " ${ALL_ROWS[*]} " == *" $row "* ]]; then
            log "unknown row '$row'; rows: ${ALL_ROWS[*]}"
            return 2
        fi
    done
    unset PYTHONPATH PIP_CONSTRAINT
    export LC_ALL=C PIP_DISABLE_PIP_VERSION_CHECK=1
    # pip byte-compiles every module of TensorFlow at install; Python compiles what tests import.
    export PIP_NO_COMPILE=1
    mkdir -p "$VENVS"

    # Installs of row i+1 run in the background while row i tests; each writes its own log.
    (install_row "${rows[0]}") >"$VENVS/${rows[0]}.install.log" 2>&1 &
    local install_job=$!
    for ((i = 0; i < ${#rows[@]}; i++)); do
        row="${rows[$i]}"
        installed_ok=0
        wait "$install_job" || installed_ok=$?
        grep -v "is ignored: it is neither" "$VENVS/$row.install.log"
        started=$SECONDS
        next="${rows[$((i + 1))]:-}"
        if [[ -n "$next" ]]; then
            (install_row "$next") >"$VENVS/$next.install.log" 2>&1 &
            install_job=$!
        fi
        if [[ $installed_ok -eq 0 ]] && (test_row "$row"); then
            summary+=("passed  $row (tests $((SECONDS - started)) s)")
        else
            summary+=("FAILED  $row ($([[ $installed_ok -eq 0 ]] && echo tests || echo install))")
            status=1
        fi
    done
    log "summary after $SECONDS s:"
    printf '  %s\n' "${summary[@]}"
    return $status
}

main "$@"
