"""Regenerate the Python stubs for every .proto under proto/kvmesh/.

Usage: ``python proto/generate.py`` writes ``*_pb2.py``, ``*_pb2.pyi`` and
``*_pb2_grpc.py`` beside each ``.proto``; ``--check`` regenerates into a
temporary folder and exits 1 if any committed stub differs (the staleness
test runs it). Generated files are never edited by hand.

The output depends on the grpcio-tools version, which is pinned in
pyproject.toml's test extra for that reason.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # build-time dependency only

    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("kvmesh/**/*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")


def _stubs(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.glob("kvmesh/**/*") if p.name.endswith(SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        _generate(tmp_root)
        fresh = _stubs(tmp_root)
        if args.check:
            stale = [str(p) for p in fresh if not (PROTO_ROOT / p).exists() or not filecmp.cmp(tmp_root / p, PROTO_ROOT / p, shallow=False)]
            extra = sorted(set(map(str, _stubs(PROTO_ROOT))) - set(map(str, fresh)))
            if stale or extra:
                print("stale generated stubs: " + ", ".join(stale + extra) + "; run: python proto/generate.py", file=sys.stderr)
                return 1
            return 0
        for p in fresh:
            shutil.copyfile(tmp_root / p, PROTO_ROOT / p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
