#!/bin/sh
# Build an image's virtual environment: what Dockerfile.server and Dockerfile.client run,
# and what tests/test_images.py runs too, so the test checks exactly what the images get.
#
#   deploy/build-venv.sh deps server|client DEST  # third-party dependencies only
#   deploy/build-venv.sh app  server|client DEST  # then the project's wheels, --no-deps
#
# `deps` needs only deploy/ and the pyproject.toml files, so an image's dependency layer
# does not change when only source does. `app` builds the wheels of presence-client
# (and presence-daemon for the server) from a clean copy of the source, installs them
# with --no-deps, deletes the wheels, runs `pip check`, then removes pip and setuptools
# from the venv. PYTHON picks the interpreter (default python3); pip's cache and
# configuration apply as usual.
set -eu

usage() {
    echo "usage: $0 deps|app server|client DEST" >&2
    exit 2
}
[ $# -eq 3 ] || usage
phase=$1 image=$2 dest=$3
root=$(cd "$(dirname "$0")/.." && pwd)
case $image in
    server) projects="client daemon" ;;
    client) projects="client" ;;
    *) usage ;;
esac

case $phase in
    deps)
        "${PYTHON:-python3}" -m venv "$dest"
        reqs=$(mktemp)
        "$dest/bin/python" "$root/deploy/requirements.py" "$image" >"$reqs"
        "$dest/bin/python" -m pip install --disable-pip-version-check -r "$reqs"
        rm -f "$reqs"
        ;;
    app)
        [ -x "$dest/bin/python" ] || { echo "$0: run '$0 deps $image $dest' first" >&2; exit 1; }
        work=$(mktemp -d)
        trap 'rm -rf "$work"' EXIT
        for project in $projects; do
            # A clean copy: no build/, *.egg-info or caches from a developer's tree.
            mkdir -p "$work/src/$project"
            (cd "$root/$project" && tar -cf - --exclude=__pycache__ --exclude='*.egg-info' \
                --exclude=build --exclude=dist .) | (cd "$work/src/$project" && tar -xf -)
            "$dest/bin/python" -m pip wheel --disable-pip-version-check --no-deps \
                --wheel-dir "$work/wheels" "$work/src/$project"
        done
        "$dest/bin/python" -m pip install --disable-pip-version-check --no-deps \
            "$work"/wheels/*.whl
        "$dest/bin/python" -m pip check
        # The venv runs the service; it installs nothing more (the base image has pip).
        "$dest/bin/python" -m pip uninstall --disable-pip-version-check -q -y pip setuptools
        ;;
    *) usage ;;
esac
