"""Shared helpers of the benchmark scripts: machine/version info, timing, RSS sampling, report writing.

Every benchmark writes ``benchmarks/results/<stem>.json`` and ``<stem>.md``
through :func:`write_report`, which stamps the machine (CPU model, cores, RAM,
load average), the library versions, the UTC date and the exact command, so a
result file says how to reproduce itself.

Import from a benchmark script with ``from common import ...`` (scripts run as
``python benchmarks/bench_x.py``, so ``benchmarks/`` is on ``sys.path``).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

from layerzo.core.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- provenance
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, logical cores, RAM, OS, python, torch threads, 1-min load average (the machine may be shared)."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover - psutil is a dev dependency
        pass
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        pass
    if "torch" in sys.modules:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions(*extra: str) -> dict:
    """Versions of layerzo, torch, transformers and any ``extra`` importable packages."""
    out = {}
    for name in ("layerzo", "torch", "transformers", *extra):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            out[name] = None
    return out


def command_line() -> str:
    """The exact command that ran this script, relative to the repository root when possible."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        pass
    return " ".join(shlex.quote(a) for a in ["python", str(script), *sys.argv[1:]])


def stamp(result: dict) -> dict:
    """``result`` plus command, UTC date, machine and versions (keys already set are kept)."""
    return {"command": command_line(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "versions": versions(), **result}


def header(title: str, result: Mapping) -> str:
    """Markdown title + the provenance lines every report starts with."""
    m, v = result["machine"], result["versions"]
    ram = f", {m['ram_gb']} GB RAM" if "ram_gb" in m else ""
    load = f", load avg {m['load_avg_1m']}" if "load_avg_1m" in m else ""
    threads = f", {m['torch_threads']} torch thread(s)" if "torch_threads" in m else ""
    return (f"# {title}\n\n`{result['command']}`\n\n{result['date']} - {m['cpu']}, {m['cores']} cores{ram}{load}"
            f"{threads}; {m['platform']}, python {m['python']}; "
            + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".\n")


def write_report(stem: str, result: dict, markdown: str, results_dir: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (``result``, stamped if not yet) and ``<stem>.md`` atomically; returns both paths."""
    if "machine" not in result:
        result = stamp(result)
    j = atomic_write_text(results_dir / f"{stem}.json", json.dumps(result, indent=2, default=str) + "\n")
    m = atomic_write_text(results_dir / f"{stem}.md", markdown if markdown.endswith("\n") else markdown + "\n")
    return j, m


# ----------------------------------------------------------------------------- timing
def interleaved(variants: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                setup: Mapping[str, Callable[[], Callable[[], None]]] | None = None) -> dict[str, list[float]]:
    """Wall times of each variant, run ABCD ABCD ... (``repeats`` rounds after ``warmup`` untimed rounds).

    ``setup[name]()`` (optional) runs untimed before each call of that variant
    and returns a teardown run untimed after it. Interleaving makes load drift
    on a shared machine hit every variant alike; read the medians and ratios.
    """
    setup = setup or {}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rnd in range(warmup + repeats):
        for name, fn in variants.items():
            teardown = setup[name]() if name in setup else None
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if teardown is not None:
                teardown()
            if rnd >= warmup:
                times[name].append(dt)
    return times


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


# ----------------------------------------------------------------------------- memory
def trim_heap() -> None:
    """Give freed heap back to the OS (glibc) so an RSS baseline is honest."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def peak_rss_bytes() -> int:
    """This process's peak RSS so far (VmHWM; not ru_maxrss, which Linux carries over fork+exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def rss_sampler(interval_s: float = 0.001) -> Iterator[dict]:
    """Sample this process's RSS every ``interval_s`` in a thread; yields a dict filled with base/peak bytes."""
    import psutil

    proc = psutil.Process()
    stats = {"base": proc.memory_info().rss}
    stats["peak"] = stats["base"]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            stats["peak"] = max(stats["peak"], proc.memory_info().rss)
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield stats
    finally:
        done.set()
        thread.join()
        stats["peak"] = max(stats["peak"], proc.memory_info().rss)


def fmt_mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f}"


# ----------------------------------------------------------------------------- model copies for subprocesses
def save_plain_copy(loaded, out: Path) -> str:
    """Save a loaded (e.g. GGUF-dequantized) model as a safetensors checkpoint + tokenizer in ``out``.

    Child processes then load it in seconds instead of re-dequantizing the
    GGUF. Returns the directory, or the original location if saving fails.
    """
    from safetensors.torch import save_model

    try:
        save_model(loaded.model, str(out / "model.safetensors"))  # handles tied embeddings
        config = loaded.model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # GGUF weights were dequantized on load
        config.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
        return str(out)
    except (ValueError, OSError, AttributeError) as exc:
        print(f"cannot save a plain copy ({exc}); children reload {loaded.source.location}", file=sys.stderr)
        return loaded.source.location
