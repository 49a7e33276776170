#!/usr/bin/env bash
# Create .venv-triton: a real Triton Inference Server (2.51, Python backend only, from PyPI's
# nvidia-pytriton wheel), the Python its Python-backend models run in, and tritonclient.
# Its own environment because its pins clash with the project's: Triton 2.51's Python backend needs
# numpy<2 and tritonclient[grpc] needs protobuf<7, while .venv has numpy 2 and protobuf 7.
# Idempotent: reruns only when this script or pyproject.toml changed. About 40 s and 400 MB.
#
# Start a server with: .venv-triton/bin/mrl-tritonserver --model-repository REPO [tritonserver flags]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MRL_TRITON_VENV:-.venv-triton}
stamp="$VENV/.mrl-triton-setup-$(cat pyproject.toml scripts/setup_triton.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
echo "setting up $VENV (Triton server, client and Python-backend packages; about a minute)" >&2
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# The server binary and its libraries, the clients, and what the Python-backend models import.
"$PY" -m pip install -q "nvidia-pytriton==0.7.0" "tritonclient[grpc,http]==2.73.0" tokenizers onnxruntime
# mrl.runtime for the `--encoder python` model, without the project's own pins (protobuf>=7 would
# break tritonclient here; the runtime does not import protobuf).
# (setuptools says "Editable installation" for every package-dir layout like ours: information only.)
PYTHONWARNINGS="ignore:Editable installation" "$PY" -m pip install -q --no-deps -e .

version=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
libdir=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
ldlib=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LDLIBRARY"))')
if [ ! -e "$libdir/libpython$version.so.1.0" ]; then
    echo "setup_triton.sh: the Python-backend stub needs a shared libpython$version ($ldlib in $libdir is not):" \
        "use a Python built with --enable-shared" >&2
    exit 1
fi
site=$("$PY" -c 'import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent.parent)')
dist="$site/pytriton/tritonserver"
server="$VENV/tritonserver"
rm -rf "$server"
mkdir -p "$server"
cp -r "$dist/bin" "$dist/backends" "$dist/caches" "$server/"
# The Python backend looks for its stub next to itself; the wheel ships one per Python version.
cp "$dist/python_backend_stubs/$version/triton_python_backend_stub" "$server/backends/python/"

cat > "$VENV/bin/mrl-tritonserver" <<EOF
#!/usr/bin/env bash
# tritonserver from nvidia-pytriton with its bundled libraries; Python-backend models run in $VENV.
export LD_LIBRARY_PATH="$libdir:$site/nvidia_pytriton.libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PATH="$(cd "$VENV/bin" && pwd):\$PATH"  # the stub embeds Python and finds this venv through PATH
exec "$(cd "$server" && pwd)/bin/tritonserver" --backend-directory "$(cd "$server/backends" && pwd)" "\$@"
EOF
chmod +x "$VENV/bin/mrl-tritonserver"
usage=$("$VENV/bin/mrl-tritonserver" --help 2>&1 || true)
[[ "$usage" == *"Usage: tritonserver"* ]] || {
    echo "setup_triton.sh: $VENV/bin/mrl-tritonserver does not start; run it by hand to see why" >&2
    exit 1
}
rm -f "$VENV"/.mrl-triton-setup-*
touch "$stamp"
