"""Generate the Python gRPC code for protos/parley/** into parley/<service>/v1/.

The generated code is committed; tests/test_contracts.py regenerates it into a
temporary folder and fails if anything differs. Run after editing a .proto:

    python scripts/gen_protos.py
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
THIRD_PARTY = PROTOS / "third_party"


def proto_files() -> list[Path]:
    return sorted((PROTOS / "parley").rglob("*.proto"))


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{THIRD_PARTY}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTOS)) for p in proto_files()),
    ]
    # protoc resolves the relative file names against the -I roots.
    import os

    cwd = os.getcwd()
    os.chdir(PROTOS)
    try:
        code = protoc.main(args)
    finally:
        os.chdir(cwd)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    for package_dir in {p.parent for p in out_dir.rglob("*_pb2.py")}:
        for level in (package_dir, package_dir.parent):
            init = level / "__init__.py"
            if level != out_dir / "parley" and not init.exists():
                init.write_text("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
