"""Weight patch vs trajectory-only patch of one demo run: bytes on disk, and the rebuild (bit-exact, seconds).

    python benchmarks/bench_patch_size.py --data-dir ../shared/data [--steps 20]

Tunes the demo's dominant layer on SST-2 with ``--keep last`` (so every step is in the trajectory),
saves the same patch both ways, rebuilds the weights from the demo base and compares them bit for bit.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import header, stamp, write_report


def human(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"


def folder_bytes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    from layerzo.model.loading import load_model
    from layerzo.patch.format import LayerPatch
    from layerzo.patch.replay import with_weights
    from layerzo.tune.config import TuneConfig
    from layerzo.tune.loop import tune

    torch.set_num_threads(1)
    config = TuneConfig.from_dict({"task": "sst2", "data_dir": args.data_dir, "steps": args.steps, "batch_size": 8,
                                   "lr": 3e-4, "eps": 1e-3, "num_train": 200, "num_dev": 0, "num_test": 0,
                                   "keep": "last"})
    with tempfile.TemporaryDirectory(prefix="bench-size-") as tmp:
        weights_dir, traj_dir = Path(tmp) / "weights", Path(tmp) / "trajectory"
        tune(config, weights_dir, progress=False, loaded=load_model(None))
        patch = LayerPatch.from_pretrained(weights_dir)
        patch.save_pretrained(traj_dir, weights=False)
        t0 = time.perf_counter()
        rebuilt = with_weights(LayerPatch.from_pretrained(traj_dir), None)
        seconds = time.perf_counter() - t0
        exact = all(torch.equal(rebuilt.tensors[k], patch.tensors[k]) for k in patch.tensors)
        sizes = {"weights": folder_bytes(weights_dir), "trajectory": folder_bytes(traj_dir)}
    total = {k: sum(v.values()) for k, v in sizes.items()}
    result = stamp({"steps": args.steps, "layers": list(patch.manifest.layers), "bytes": sizes, "total_bytes": total,
                    "ratio": total["weights"] / total["trajectory"], "rebuild_seconds": round(seconds, 2),
                    "rebuild_bit_exact": exact})
    md = header("Weight patch vs trajectory-only patch (demo, SST-2)", result) + "\n".join([
        "| patch | files | total |", "|---|---|---|",
        *(f"| {k} | {', '.join(f'{n} {human(b)}' for n, b in v.items())} | {human(total[k])} |"
          for k, v in sizes.items()),
        "", f"{args.steps} steps on layer {patch.manifest.layers[0]}; the trajectory-only patch is "
        f"{result['ratio']:.0f}x smaller and rebuilt the weights {'bit-exactly' if exact else 'NOT bit-exactly'} "
        f"in {seconds:.1f} s (load the base + replay).", ""])
    write_report("patch_size", result, md)
    print(md)


if __name__ == "__main__":
    main()
