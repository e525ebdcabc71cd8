"""Data-parallel ZO: the gather/apply logic in one process, then real 2-rank torchrun jobs (gloo, CPU)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model
from layerzo.zo.distributed import (
    DataParallel,
    bytes_per_step,
    check_tuned_placement,
    emulate_step,
    parse_device_map,
    placement,
    step_from_losses,
    weights_digest,
)
from layerzo.errors import ConfigError
from layerzo.model.layers import find_layer_layout, layer_parameter_names
from layerzo.zo.engine import TunedParams, ZOConfig, ZOState, direction_seeds, replay_trajectory, zo_step

WORKER = Path(__file__).with_name("dist_worker.py")


TORCHRUN_TIMEOUT_S = 180


# ----------------------------------------------------------------------------- helpers
def _tiny_params(layer: int = 1):
    model = make_tiny_model("llama", num_layers=3, seed=3)
    layout = find_layer_layout(model)
    return model, TunedParams.from_model(model, layer_parameter_names(model, layout, layer))


def _synthetic_loss(model, seed: int):
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(seed))
    return lambda: float(model(input_ids=ids).logits.float().pow(2).mean())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # One thread everywhere: same kernels and reduction order in the ranks and the reference process.
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}", "--master_addr=127.0.0.1", *args]


def _worker(mode: str, model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [str(WORKER), "--mode", mode, "--model", str(model_dir), "--data-dir", str(data_dir), "--out", str(out),
            *extra]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture()
def one_process_group(tmp_path):
    """A real gloo process group with a single rank, in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield DataParallel(rank=0, world_size=1, distributed=True)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- in-process logic
def test_one_rank_group_step_equals_engine_step(one_process_group):
    """Through a real all_gather (1 rank, q=2 per rank) the step equals zo_step with q=2, bit for bit."""
    dp = one_process_group
    config = ZOConfig(lr=0.05, eps=1e-3, q=2, weight_decay=0.1, momentum=0.5)
    model_a, pa = _tiny_params()
    model_b, pb = _tiny_params()
    sa, sb = ZOState(), ZOState()
    base = pa.state()
    with torch.no_grad():
        for step_seed in (11, 12, 13):
            ra = dp.zo_step(pa, _synthetic_loss(model_a, step_seed), step_seed, config, sa)
            rb = zo_step(pb, _synthetic_loss(model_b, step_seed), step_seed, config, sb)
            assert ra == rb
    assert any(not torch.equal(base[n], t) for n, t in zip(pa.names, pa.tensors)), "weights never moved"
    _assert_same_tensors(pa.state(), pb.state())
    assert sa.step == sb.step == 3


def test_one_rank_group_collectives(one_process_group, tiny_llama):
    dp = one_process_group
    assert dp.all_gather_floats([1.5, math.nan, math.inf])[0] == 1.5
    assert math.isnan(dp.all_gather_floats([math.nan])[0])
    digest = hashlib.sha256(b"abc").hexdigest()
    assert dp.all_gather_sha256(digest) == [digest]
    dp.check_same("config", "x")  # one rank always agrees
    dp.barrier()


def test_emulated_full_batch_ranks_equal_q_directions():
    """W virtual ranks on the same batch, q per rank == one process with q·W (same seeds, same order)."""
    config = ZOConfig(lr=0.05, q=1, weight_decay=0.1)
    model_a, pa = _tiny_params()
    model_b, pb = _tiny_params()
    sa, sb = ZOState(), ZOState()
    with torch.no_grad():
        for step_seed in (5, 6):
            fa = _synthetic_loss(model_a, step_seed)
            ra = emulate_step(pa, [fa, fa, fa], step_seed, config, sa)
            rb = zo_step(pb, _synthetic_loss(model_b, step_seed), step_seed, ZOConfig(lr=0.05, q=3, weight_decay=0.1), sb)
            assert ra.seeds == rb.seeds == direction_seeds(step_seed, 3)
            assert ra.grads == rb.grads
    _assert_same_tensors(pa.state(), pb.state())


def test_non_finite_loss_on_one_rank_rejects_the_whole_step():
    config = ZOConfig(lr=0.05, q=1, max_bad_steps=2)
    _, params = _tiny_params()
    before, state = params.state(), ZOState()
    result = step_from_losses(params, [1.0, 0.5, math.nan, 0.7], 99, ZOConfig(lr=0.05, q=2, max_bad_steps=2), state)
    assert not result.applied and "non-finite" in result.reason
    _assert_same_tensors(before, params.state())
    assert state.bad_in_row == 1 and config.q == 1


def test_step_from_losses_checks_the_count():
    _, params = _tiny_params()
    with pytest.raises(ValueError, match="expected 4 losses"):
        step_from_losses(params, [1.0, 2.0], 1, ZOConfig(lr=0.1, q=2), ZOState())


def test_shard_and_device_and_payload():
    dp = DataParallel(rank=1, world_size=2, distributed=True, shard_batch=True)
    assert dp.shard(list(range(5))) == [1, 3]
    assert DataParallel(rank=1, world_size=2, distributed=True).shard([0, 1, 2]) == [0, 1, 2]
    with pytest.raises(ConfigError, match="cannot be sharded over 2 ranks"):
        dp.shard([0])
    assert dp.device("cuda") == "cuda:0" and DataParallel(local_rank=3, rank=0, world_size=4, distributed=True).device("cuda") == "cuda:3"
    assert DataParallel().device("cuda") == "cuda"
    assert bytes_per_step(8) == 128 and bytes_per_step(8, q=2) == 256
    with pytest.raises(ConfigError, match="rank must be in"):
        DataParallel(rank=2, world_size=2)


def test_init_without_torchrun_is_single_process(monkeypatch):
    from layerzo.zo.distributed import init_data_parallel

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dp = init_data_parallel(shard_batch=True)
    assert not dp.active and dp.is_main and dp.world_size == 1
    assert dp.shard([1, 2, 3]) == [1, 2, 3]  # sharding is a no-op for one process
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE must be an integer"):
        init_data_parallel()


def test_weights_digest_tracks_values():
    _, pa = _tiny_params()
    _, pb = _tiny_params()
    assert weights_digest(pa) == weights_digest(pb)
    with torch.no_grad():
        pb.tensors[0].view(-1)[0] += 1e-6
    assert weights_digest(pa) != weights_digest(pb)


# ----------------------------------------------------------------------------- device_map (big-model placement)
def test_parse_device_map(tmp_path):
    assert parse_device_map(None) is None and parse_device_map("auto") == "auto"
    assert parse_device_map('{"model.layers.1": "disk", "": "cpu"}') == {"model.layers.1": "disk", "": "cpu"}
    f = tmp_path / "map.json"
    f.write_text('{"": 0}')
    assert parse_device_map(str(f)) == {"": 0}
    with pytest.raises(ConfigError, match="must be one of auto"):
        parse_device_map("autoo")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_device_map("{model")
    with pytest.raises(ConfigError, match="non-empty object"):
        parse_device_map("{}")


def test_placement_under_torchrun():
    one_per_node = DataParallel(rank=1, world_size=2, local_rank=0, local_world_size=1, distributed=True)
    assert placement(one_per_node, "cpu", "auto") == ("cpu", "auto")
    two_per_node = DataParallel(rank=1, world_size=2, local_rank=1, local_world_size=2, distributed=True)
    assert placement(two_per_node, "cuda", None) == ("cuda:1", None)
    with pytest.raises(ConfigError, match="cannot be combined with 2 ranks per node"):
        placement(two_per_node, "cuda", "auto")
    assert placement(DataParallel(), "cuda", "auto") == ("cuda", "auto")


def _disk_map(offloaded_layer: int) -> dict:
    mapping = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapping.update({f"model.layers.{i}": "disk" if i == offloaded_layer else "cpu" for i in range(4)})
    return mapping


def _steps_on(loaded, layer: int, steps: int = 2) -> dict:
    assert check_tuned_placement(loaded.model, loaded.layout, [layer]) == "cpu"
    params = TunedParams.from_model(loaded.model, layer_parameter_names(loaded.model, loaded.layout, layer))
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = lambda: float(loaded.model(input_ids=ids).logits.float().pow(2).mean())  # noqa: E731
    config, state = ZOConfig(lr=0.05, q=2), ZOState()
    with torch.no_grad():
        for s in range(steps):
            assert zo_step(params, loss, s, config, state).applied
    return params.state()


@pytest.mark.parametrize("device_map", ["auto", "offload-layer-1"])
def test_zo_under_device_map_matches_plain_load(tiny_llama_dir, device_map):
    """Frozen layer 1 offloaded to disk by accelerate (or 'auto' on CPU); tuning layer 2 gives the plain result."""
    from layerzo.model.loading import load_model

    spec = device_map if device_map == "auto" else json.dumps(_disk_map(1))
    mapped = load_model(str(tiny_llama_dir), device_map=parse_device_map(spec))
    if device_map != "auto":
        assert any(p.device.type == "meta" for p in mapped.model.model.layers[1].parameters()), "layer 1 not offloaded"
    plain = load_model(str(tiny_llama_dir))
    _assert_same_tensors(_steps_on(mapped, 2), _steps_on(plain, 2))


def test_offloaded_tuned_layer_is_refused(tiny_llama_dir):
    from layerzo.model.loading import load_model

    loaded = load_model(str(tiny_llama_dir), device_map=_disk_map(2))
    assert check_tuned_placement(loaded.model, loaded.layout, [1, 3]) == "cpu"
    with pytest.raises(ConfigError, match=r"tuned tensor model\.layers\.2\..* is offloaded by the device map"):
        check_tuned_placement(loaded.model, loaded.layout, [1, 2])


# ----------------------------------------------------------------------------- torchrun (2 ranks, gloo, CPU)
def _base_and_replayed(model_dir: Path, out: Path, names: list[str], config: ZOConfig) -> tuple[dict, dict]:
    from layerzo.model.loading import load_model

    state = dict(load_model(str(model_dir)).model.named_parameters())
    base = {n: state[n].detach().clone() for n in names}
    replayed = {n: t.clone() for n, t in base.items()}
    replay_trajectory(replayed, json.loads((out / "trajectory.json").read_text()), config)
    return base, replayed


def test_torchrun_two_ranks_match_single_process_q2(tiny_llama_dir, data_dir, tmp_path):
    """(a) both ranks end byte-identical; (b) == one process with q=2 on the same batches; the trajectory replays."""
    dist_out, ref_out = tmp_path / "dist", tmp_path / "ref"
    _run(torchrun(2, *_worker("dist", tiny_llama_dir, data_dir, dist_out)), tmp_path)
    _run([sys.executable, *_worker("zo", tiny_llama_dir, data_dir, ref_out, "--world", "2")], tmp_path)

    assert _sha(dist_out / "rank0.safetensors") == _sha(dist_out / "rank1.safetensors")
    dist_w, ref_w = load_file(dist_out / "rank0.safetensors"), load_file(ref_out / "rank0.safetensors")
    _assert_same_tensors(dist_w, ref_w)
    trajectory = json.loads((dist_out / "trajectory.json").read_text())
    assert trajectory == json.loads((ref_out / "trajectory.json").read_text())
    assert len(trajectory) == 3 and all(len(t["seeds"]) == 2 for t in trajectory)
    dist_results, ref_results = (json.loads((o / "results.json").read_text()) for o in (dist_out, ref_out))
    assert dist_results["accuracy"] == ref_results["accuracy"]  # sharded scoring + summed counts
    assert dist_results["mismatch"].startswith("ranks disagree on the rank id: rank 1 differs from rank 0")
    assert ref_results["mismatch"] == ""

    names = json.loads((dist_out / "results.json").read_text())["names"]
    base, replayed = _base_and_replayed(tiny_llama_dir, dist_out, names,
                                        ZOConfig(lr=1e-2, weight_decay=0.01, q=2))
    assert any(not torch.equal(base[n], dist_w[n]) for n in names), "training never moved the weights"
    _assert_same_tensors(replayed, dist_w)


def test_torchrun_sharded_batch_and_rejected_step(tiny_llama_dir, data_dir, tmp_path):
    """Sharded batches + a NaN on rank 1 only: both ranks reject that step and match the emulation."""
    dist_out, ref_out = tmp_path / "dist", tmp_path / "ref"
    extra = ("--shard", "--nan-rank", "1", "--nan-step", "1", "--steps", "3")
    _run(torchrun(2, *_worker("dist", tiny_llama_dir, data_dir, dist_out, *extra)), tmp_path)
    _run([sys.executable, *_worker("emulate", tiny_llama_dir, data_dir, ref_out, "--world", "2", *extra)], tmp_path)

    assert _sha(dist_out / "rank0.safetensors") == _sha(dist_out / "rank1.safetensors")
    _assert_same_tensors(load_file(dist_out / "rank0.safetensors"), load_file(ref_out / "rank0.safetensors"))
    assert json.loads((dist_out / "results.json").read_text())["applied"] == [True, False, True]
    assert len(json.loads((dist_out / "trajectory.json").read_text())) == 2


def test_torchrun_layerzo_tune_matches_single_process_q2(tiny_llama_dir, data_dir, tmp_path):
    """The real ``layerzo tune`` under torchrun: rank 0's patch == a one-process ``--q 2`` patch, bit for bit."""
    from layerzo.patch.format import LayerPatch

    common = ["-m", "layerzo.cli.main", "tune", "--model", str(tiny_llama_dir), "--task", "sst2", "--data-dir",
              str(data_dir), "--layers", "2", "--steps", "3", "--batch-size", "4", "--num-train", "16", "--num-dev", "0",
              "--num-test", "0", "--max-length", "64", "--lr", "1e-2", "--weight-decay", "0.01", "--quiet"]
    _run(torchrun(2, *common, "--out", str(tmp_path / "dist")), tmp_path)
    _run([sys.executable, *common, "--q", "2", "--out", str(tmp_path / "ref")], tmp_path)

    dist_patch, ref_patch = LayerPatch.from_pretrained(tmp_path / "dist"), LayerPatch.from_pretrained(tmp_path / "ref")
    _assert_same_tensors(dist_patch.tensors, ref_patch.tensors)
    assert dist_patch.trajectory == ref_patch.trajectory and len(dist_patch.trajectory) == 3
    assert all(len(step.seeds) == 2 for step in dist_patch.trajectory)
    info = dist_patch.manifest.metrics["distributed"]
    assert info["world_size"] == 2 and info["directions_per_step"] == 2 and info["bytes_per_step"] == 32
    assert len(set(info["rank_weights_sha256"])) == 1 and len(info["rank_weights_sha256"]) == 2
    assert "distributed" not in ref_patch.manifest.metrics


def test_tune_cli_device_map_offloading_a_frozen_layer(tiny_llama_dir, data_dir, tmp_path):
    """``layerzo tune --device-map`` with frozen layer 1 on disk == the plain run; an offloaded tuned layer is refused."""
    from typer.testing import CliRunner

    from layerzo.cli.main import app
    from layerzo.patch.format import LayerPatch

    args = ["tune", "--model", str(tiny_llama_dir), "--task", "sst2", "--data-dir", str(data_dir), "--layers", "2",
            "--steps", "2", "--batch-size", "2", "--num-train", "4", "--num-dev", "0", "--num-test", "0",
            "--max-length", "32", "--lr", "1e-2", "--quiet"]
    runner = CliRunner()
    mapped = runner.invoke(app, [*args, "--device-map", json.dumps(_disk_map(1)), "--out", str(tmp_path / "mapped")])
    assert mapped.exit_code == 0, mapped.output
    plain = runner.invoke(app, [*args, "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    mapped_patch, plain_patch = (LayerPatch.from_pretrained(tmp_path / d) for d in ("mapped", "plain"))
    _assert_same_tensors(mapped_patch.tensors, plain_patch.tensors)
    assert mapped_patch.manifest.recipe["device_map"] == json.dumps(_disk_map(1))

    refused = runner.invoke(app, [*args, "--device-map", json.dumps(_disk_map(2)), "--out", str(tmp_path / "bad")])
    assert refused.exit_code == 1
    assert "model.layers.2." in refused.output and "offloaded by the device map" in refused.output
    assert not (tmp_path / "bad").exists()
