"""The server's resident memory at rest and after bursts of concurrent identifies.

The C allocator keeps memory that threads freed in per-thread arenas, so a server's resident memory
grows with the requests it served at once and stays there. This script starts `animalid serve`
with `--model` and a gallery of `--gallery` stored random vectors (as bench/concurrent_identify.py
does) and reads the server's VmRSS after a warm-up and after `--requests` identifies at each of
`--clients` levels in turn. `--env NAME=VALUE` sets the server's environment, e.g.
`MALLOC_ARENA_MAX=2` (glibc's cap on its arenas).

    PYTHONPATH=. python bench/resident_after_load.py --model tests/data/dog-resnet18
    PYTHONPATH=. python bench/resident_after_load.py --model tests/data/dog-resnet18 --env MALLOC_ARENA_MAX=2
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrent_identify import DEMO_MODEL, PHOTO, run_level  # noqa: E402
from identify_latency import SPECIES, free_port, populate, start_server  # noqa: E402

from service.db import migrate  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEMO_MODEL, help="artifact folder")
    parser.add_argument("--gallery", type=int, default=10_000, help="stored vectors")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 8], help="levels, in turn")
    parser.add_argument("--requests", type=int, default=400, help="identifies per level")
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE", help="server environment")
    return parser.parse_args()


def resident_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def main() -> None:
    args = parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    photo = PHOTO.read_bytes()
    print(
        f"resident_after_load.py {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.machine()}; "
        f"model {args.model}; gallery {args.gallery:,} vectors; server environment {env or 'as is'}"
    )
    with tempfile.TemporaryDirectory(prefix="animalid-bench-") as tmp:
        root = Path(tmp)
        (root / "models").mkdir()
        shutil.copytree(args.model, root / "models" / SPECIES)
        url = f"sqlite:///{root / 'bench.db'}"
        migrate.upgrade(url)
        populate(url, root / "models" / SPECIES, args.gallery, 10)
        port = free_port()
        server, _ = start_server(url, root, 1, port, {"ANIMALID_DEVICE": "cpu", **env})
        try:
            run_level(port, photo, 1, 20)
            print(f"  at rest after a warm-up: {resident_mb(server.pid):,} MB")
            for clients in args.clients:
                run_level(port, photo, clients, args.requests)
                time.sleep(1)
                print(
                    f"  after {args.requests} identifies at {clients} clients: {resident_mb(server.pid):,} MB"
                )
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
