"""The sweep figure: a PNG per summary, written atomically, for one task or several."""

from __future__ import annotations

from layerzo.sweep.plot import plot_sweep
from layerzo.sweep.report import summarize
from layerzo.sweep.run import SweepConfig

PNG = b"\x89PNG\r\n\x1a\n"


def records(task: str, full: bool = True) -> list[dict]:
    out = [{"kind": "profile", "task": task, "pick": 2, "confidence": "high"}]
    for layer, acc in enumerate([0.55, 0.7, 0.65, 0.6]):
        out.append({"kind": "layer", "task": task, "layer": layer, "test_acc": acc, "dev_acc": acc + 0.05,
                    "final_dev_acc": acc, "best_step": 2, "final_loss": 0.5, "loss_curve": [0.8, 0.6 - 0.01 * layer],
                    "is_profiled_pick": layer == 2, "zero_shot_dev_acc": 0.5, "zero_shot_test_acc": 0.5})
    if full:
        out.append({"kind": "full", "task": task, "test_acc": 0.62, "dev_acc": 0.6, "loss_curve": [0.8, 0.55]})
    return out


def doc(tasks: tuple[str, ...], full: bool = True) -> dict:
    config = SweepConfig.from_dict({"tasks": tasks, "steps": 2, "batch_size": 4, "num_test": 200})
    recs = [r for t in tasks for r in records(t, full)]
    return summarize(recs, config, [0, 1, 2, 3], 4, model_name="tiny/llama")


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # the IHDR width, height


def test_plot_sweep_writes_a_png_and_no_temp_file(tmp_path):
    out = plot_sweep(doc(("sst2",)), tmp_path / "sweep.png")
    assert out == tmp_path / "sweep.png"
    width, height = png_size(out)
    assert width > 500 and height > 300
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]


def test_each_task_gets_its_own_panels(tmp_path):
    one = png_size(plot_sweep(doc(("sst2",)), tmp_path / "one.png"))
    two = png_size(plot_sweep(doc(("sst2", "rte")), tmp_path / "two.png"))
    assert two[0] == one[0] and two[1] > 1.8 * one[1]  # twice the height, same width


def test_a_sweep_without_the_whole_model_run_still_plots(tmp_path):
    summary = doc(("sst2",), full=False)
    assert summary["tasks"]["sst2"]["full"] is None
    png_size(plot_sweep(summary, tmp_path / "sweep.png"))
