"""Writes the list of wheels the image's final stage installs: every wheel in the
directory given, by path, with its sha256 (pip install --require-hashes -r LIST).

Run in the build stage after the wheels are built; it also checks that svcproxy's
wheel carries the compiled encoder loop (svcproxy/ipvs/_nlfast.c), which the image
must not silently go without.
"""

import hashlib
import sys
import zipfile
from pathlib import Path


def main(wheels: Path) -> None:
    (agent,) = wheels.glob("svcproxy-*.whl")
    names = zipfile.ZipFile(agent).namelist()
    if not any(n.startswith("svcproxy/ipvs/_nlfast") and n.endswith(".so") for n in names):
        sys.exit(f"{agent.name}: the compiled encoder loop was not built")
    lines = [f"{path} --hash=sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}\n"
             for path in sorted(wheels.glob("*.whl"))]
    (wheels / "install.txt").write_text("".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
