# Sourced by the GPU scripts: `use_tritarget_uninstalled REPO DIR` makes DIR/tritarget a
# namespace package of links to REPO's kernels/, service/, clients/, protos/ and
# anchor_design/ and puts DIR first on PYTHONPATH, so that `import tritarget` works on a
# machine where nothing may be installed (a lent GPU image).
use_tritarget_uninstalled() {
    mkdir -p "$2/tritarget"
    for part in kernels service clients protos anchor_design; do
        ln -sfn "$1/$part" "$2/tritarget/$part"
    done
    export PYTHONPATH="$2${PYTHONPATH:+:$PYTHONPATH}"
}
