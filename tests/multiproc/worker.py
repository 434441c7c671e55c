"""The process side of the harness: started by torch.distributed.run, runs the named checks, writes results."""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path

from tests.multiproc.harness import REGISTRY, Context
from vegan_scale.process_exit import leave


def main(out_dir: Path, names: list[str]) -> None:
    for module in sorted(Path(__file__).parent.glob("checks_*.py")):
        importlib.import_module(f"tests.multiproc.{module.stem}")
    from vegan_scale.distributed.accelerator import build_accelerator

    accelerator = build_accelerator("no")
    ctx = Context(accelerator.process_index, accelerator.num_processes, accelerator, out_dir / "shared")
    ctx.shared_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name in names:
        try:
            results[name] = {"ok": True, "result": REGISTRY[name](ctx)}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        accelerator.wait_for_everyone()
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
    leave(0)  # not through the interpreter's teardown while gloo's threads may still release tensors
