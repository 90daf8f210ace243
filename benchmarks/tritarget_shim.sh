# Sourced by the GPU scripts (run from the repository's root).
#
# `use_tritarget_uninstalled REPO DIR` makes DIR/tritarget a
# namespace package of links to REPO's kernels/, service/, clients/ and protos/
# and puts DIR first on PYTHONPATH, so that `import tritarget` works on a
# machine where nothing may be installed (a lent GPU image).
use_tritarget_uninstalled() {
    mkdir -p "$2/tritarget"
    for part in kernels service clients protos; do
        ln -sfn "$1/$part" "$2/tritarget/$part"
    done
    export PYTHONPATH="$2${PYTHONPATH:+:$PYTHONPATH}"
}

# `install_carried_wheels PYTHON DIR`: the wheels in .whl/ (gpu_check.sh's header says which
# and how to fetch them; the device tool carries the folder) installed with --target into
# DIR, put first on PYTHONPATH: the GPU image has no network, and its grpcio and protobuf
# predate what our generated code checks for. Sets wheel_note (what happened); fails when
# the wheels do not install (a development machine with another Python: its own packages
# stay in use).
install_carried_wheels() {
    local wheels=(.whl/*.whl)
    if ! [ -e "${wheels[0]}" ]; then
        wheel_note="no .whl folder: the image's own grpcio/protobuf"
        return 0
    fi
    mkdir -p "$2"
    if "$1" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$2" "${wheels[@]}" >"$2-pip.txt" 2>&1; then
        export PYTHONPATH="$2${PYTHONPATH:+:$PYTHONPATH}"
        wheel_note="installed ${#wheels[@]} wheels from .whl into $2"
    else
        wheel_note="could not install the wheels in .whl: $(tail -n 1 "$2-pip.txt")"
        return 1
    fi
}

# `python_on_path PYTHON DIR`: a `python` that runs PYTHON, first on PATH (protos/generate.sh
# calls `python`; an image may have only `python3`).
python_on_path() {
    mkdir -p "$2"
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$1" >"$2/python"
    chmod +x "$2/python"
    export PATH="$2:$PATH"
}
