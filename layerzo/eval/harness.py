"""lm-evaluation-harness on a base model and on base + layer patch, in one process.

:func:`evaluate` loads the base once, runs ``lm_eval.simple_evaluate`` on it,
copies the patch's tensors into the SAME in-memory model (after checking the
base fingerprint) and runs the harness again; no merged copy is ever written.

layerzo's own tasks run offline from ``recipes/lm_eval`` (see
:mod:`layerzo.eval.tasks`): same prompts, same rows and row order as
``layerzo tune``'s test scores. Three accuracies are reported for the
multiple-choice ones:

* ``acc``: argmax of the SUMMED log-likelihood of each candidate (lm-eval);
* ``acc_norm``: argmax of log-likelihood / candidate length in characters (lm-eval);
* ``acc_per_token``: argmax of the MEAN per-token log-likelihood - layerzo's
  scoring (:mod:`layerzo.data.scoring`), recomputed from the harness' own
  log-likelihoods, so it equals tune's test accuracy on the same rows.

When every candidate is one token (SST-2's " great"/" terrible" for
SmolLM2) ``acc`` and ``acc_per_token`` coincide by construction.

The generative ones (SQuAD, DROP) run lm-eval's ``generate_until`` (greedy,
until the task's stop string, at most ``max_new_tokens``) and report ``f1``
and ``em``: layerzo's SQuAD F1 / exact match, max over the gold answers
(:mod:`layerzo.data.metrics`), i.e. tune's test f1 / em. The harness then
generates the answers :class:`layerzo.data.generation.Generator` generates
(both greedy from the same prompt tokens; tests/test_eval_harness.py compares
every text), because :func:`make_lm` configures HFLM to read those tokens:

* ``max_length`` (default 512, tune's) is HFLM's ``max_length``, so lm-eval
  left-truncates a prompt to ``max_length - max_gen_toks`` tokens exactly as
  ``encode_prompts`` cuts it to ``max_length - max_new_tokens`` (and truncates
  multiple-choice rows at ``max_length`` as :func:`layerzo.data.scoring.encode_batch`).
  The harness' own tasks run in a second ``simple_evaluate`` at the model's
  context length, lm-eval's default (:func:`harness_parts`);
* ``add_bos_token`` is left unset: HFLM's ``tok_batch_encode`` then calls
  ``tokenizer(prompts)`` with the tokenizer's default special tokens, the ids
  ``tokenizer.encode(prompt)`` gives - no BOS for SmolLM2, one BOS for
  tokenizers that add it (Llama-2 style), in both. The one exception is a
  prompt whose text already starts with the BOS string (a chat-rendered
  prompt): lm-eval then adds no special tokens for the whole batch, while a
  BOS-adding tokenizer's ``encode`` adds a second BOS;
* stop: lm-eval stops at ``until`` and at the tokenizer's EOS text, and
  ``model.generate`` also at ``generation_config.eos_token_id``; the
  Generator stops at the tokenizer's EOS id and at tokens containing a stop
  string. The texts agree whenever the two EOS sets agree (they do for
  SmolLM2 and the test models: both are id 2).

lm_eval is imported lazily: importing it costs seconds, and building the
harness' full task index (needed only for non-layerzo task names) ~25 s.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from layerzo.version import __version__
from layerzo.errors import EvalError
from layerzo.data.generation import DEFAULT_MAX_NEW_TOKENS
from layerzo.eval.report import PER_TOKEN_METRIC, EvalReport, Metric, TaskResult
from layerzo.eval.tasks import TaskSelection, check_data_dir, check_harness_tasks, parse_tasks, write_task_dir

DEFAULT_NUM_TEST = 1000  # layerzo.data.tasks.load_task's default test size
BOOTSTRAP_ITERS = 1000  # only for non-mean metrics (e.g. f1 of harness tasks); acc stderr is analytic
DEFAULT_MAX_LENGTH = 512  # layerzo.tune.config.TuneConfig.max_length's default (a test keeps them equal)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how; validated on construction.

    ``limit``: evaluate the first ``limit`` documents of each task. For
    layerzo tasks this is ``load_task(num_test=limit, seed=seed).test``, i.e.
    exactly the rows ``layerzo tune --num-test limit --seed seed`` tests on.
    ``max_length``: the harness' context length in tokens (tune's
    ``--max-length``); ``max_new_tokens``: the longest generation of the
    generative tasks (tune's ``--max-new-tokens``).
    """

    tasks: tuple[str, ...]
    data_dir: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 16
    seed: int = 0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_length: int = DEFAULT_MAX_LENGTH

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            object.__setattr__(self, "tasks", (self.tasks,))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.limit is not None and (type(self.limit) is not int or self.limit < 1):
            raise EvalError(f"--limit must be a positive integer, got {self.limit!r}")
        if self.num_fewshot is not None and (type(self.num_fewshot) is not int or self.num_fewshot < 0):
            raise EvalError(f"--num-fewshot must be an integer >= 0, got {self.num_fewshot!r}")
        if type(self.batch_size) is not int or self.batch_size < 1:
            raise EvalError(f"--batch-size must be a positive integer, got {self.batch_size!r}")
        if type(self.seed) is not int or not 0 <= self.seed < 2**32:  # the harness seeds numpy: 32 bits
            raise EvalError(f"--seed must be an integer from 0 to 2**32 - 1 (the harness seeds numpy), got {self.seed!r}")
        for name, low in (("max_new_tokens", 1), ("max_length", 2)):
            value = getattr(self, name)
            if type(value) is not int or value < low:
                raise EvalError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")

    @property
    def num_test(self) -> int:
        """How many validation rows layerzo tasks sample (then evaluated in full)."""
        return self.limit if self.limit is not None else DEFAULT_NUM_TEST

    @property
    def selection(self) -> TaskSelection:
        return parse_tasks(self.tasks)


# ------------------------------------------------------------------ harness plumbing


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        raise EvalError("lm-evaluation-harness is not installed", "pip install 'layerzo[eval]'") from None


def validate_tasks(config: EvalConfig) -> TaskSelection:
    """Fail fast (before any model is loaded) on missing data files or unreadable rows."""
    from layerzo.data.tasks import load_task

    selection = config.selection
    if selection.generative and config.max_length <= config.max_new_tokens:
        raise EvalError(f"--max-length ({config.max_length}) must exceed --max-new-tokens ({config.max_new_tokens}) "
                        f"to leave room for the prompts of {', '.join(selection.generative)}")
    if selection.offline and config.data_dir is not None:
        check_data_dir(selection.offline, config.data_dir)
    for task in selection.offline:  # reads and renders every row once (cached for the harness' hooks)
        load_task(task, config.data_dir, num_test=config.num_test, seed=config.seed)
    return selection


@contextlib.contextmanager
def task_manager(selection: TaskSelection, config: EvalConfig) -> Iterator[Any]:
    """A ``lm_eval.tasks.TaskManager`` that knows layerzo's tasks (from a temp folder, removed after).

    The harness' own registry is indexed only when a non-layerzo task is asked for.
    """
    lm_eval_version()
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="layerzo-lm-eval-") as tmp:
        include = None
        if selection.offline:
            include = str(write_task_dir(selection.offline, Path(tmp) / "tasks", data_dir=config.data_dir,
                                         seed=config.seed, num_test=config.num_test,
                                         max_new_tokens=config.max_new_tokens))
        manager = TaskManager(include_path=include, include_defaults=bool(selection.harness))
        check_harness_tasks(selection.harness, manager.all_tasks)
        yield manager


def make_lm(model, tokenizer, *, batch_size: int, max_length: int | None = None):
    """Wrap an in-memory model for the harness (it keeps a reference: later in-place edits are seen).

    ``max_length``: where lm-eval truncates (None: the model's context length,
    lm-eval's default); layerzo's tasks pass tune's ``max_length``.
    ``add_bos_token`` stays unset so prompts are tokenized as
    ``tokenizer.encode`` tokenizes them (module docstring).
    """
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def harness_parts(selection: TaskSelection, config: EvalConfig) -> list[tuple[TaskSelection, int | None]]:
    """The selection as one harness run per context length: layerzo's tasks at tune's ``max_length``,
    the harness' own at the model's context length (their usual setting; 512 would cut e.g. few-shot
    gsm8k prompts)."""
    parts: list[tuple[TaskSelection, int | None]] = []
    if selection.offline:
        parts.append((TaskSelection(selection.offline, ()), config.max_length))
    if selection.harness:
        parts.append((TaskSelection((), selection.harness), None))
    return parts


def run_parts(lms: Sequence[tuple[TaskSelection, Any]], tokenizer, manager,
              config: EvalConfig) -> dict[str, TaskResult]:
    """:func:`run_harness` for every (part, lm) of :func:`harness_parts`; the results of all tasks."""
    results: dict[str, TaskResult] = {}
    for part, lm in lms:
        results.update(run_harness(lm, tokenizer, part, manager, config).results)
    return results


def per_token_accuracy(samples: Sequence[dict], tokenizer) -> Metric:
    """layerzo's accuracy (argmax of mean per-token log-likelihood) from the harness' logged samples.

    Each sample holds ``arguments`` = [(context, continuation)] and
    ``filtered_resps`` = [(loglikelihood, is_greedy)] per candidate; the
    continuation's token count is taken exactly as the harness took it.
    """
    from layerzo.data.scoring import encode_pair

    hits = []
    for s in samples:
        scores = [float(resp[0]) / len(encode_pair(tokenizer, ctx, cont)[1])
                  for (ctx, cont), resp in zip(s["arguments"], s["filtered_resps"])]
        pred = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first max, like argmax
        hits.append(float(pred == int(s["target"])))
    if not hits:
        return Metric(float("nan"))
    stderr = statistics.stdev(hits) / math.sqrt(len(hits)) if len(hits) > 1 else None
    return Metric(sum(hits) / len(hits), stderr)


def _metrics(block: dict[str, Any]) -> dict[str, Metric]:
    """``{"acc,none": 0.8, "acc_stderr,none": 0.03, "alias": ...}`` -> ``{"acc": Metric(0.8, 0.03)}``."""
    out: dict[str, Metric] = {}
    for key, value in block.items():
        if "," not in key or isinstance(value, (str, bool)) or not isinstance(value, (int, float)):
            continue
        name, filt = key.split(",", 1)
        if name.endswith("_stderr"):
            continue
        stderr = block.get(f"{name}_stderr,{filt}")
        out[name if filt == "none" else key] = Metric(
            float(value), float(stderr) if isinstance(stderr, (int, float)) and not isinstance(stderr, bool) else None
        )
    return out


@dataclass(frozen=True)
class HarnessRun:
    """One ``simple_evaluate`` call: metrics per task (user's name) and the logged samples per harness task."""

    results: dict[str, TaskResult]
    samples: dict[str, list[dict]]


def run_harness(lm, tokenizer, selection: TaskSelection, manager, config: EvalConfig) -> HarnessRun:
    """Evaluate ``lm`` (from :func:`make_lm`) on every selected task."""
    from lm_eval import simple_evaluate

    try:
        out = simple_evaluate(
            model=lm,
            tasks=list(selection.harness_names),
            task_manager=manager,
            num_fewshot=config.num_fewshot,
            limit=config.limit,
            batch_size=config.batch_size,
            log_samples=True,  # needed for acc_per_token (and the generations, for a look at them)
            bootstrap_iters=BOOTSTRAP_ITERS,
            random_seed=config.seed,
            numpy_random_seed=config.seed,
            torch_random_seed=config.seed,
            fewshot_random_seed=config.seed,
        )
    except (KeyError, ValueError) as exc:  # the harness' own task/config errors
        raise EvalError(f"lm-eval could not run {', '.join(selection.harness_names)}: {exc}") from None
    if out is None:
        raise EvalError("lm-eval returned no results (not rank 0 of a distributed run?)")
    samples = out.get("samples", {})
    results = {}
    for harness_name in selection.harness_names:
        if harness_name not in out["results"]:
            raise EvalError(f"lm-eval returned no results for {harness_name} (a group? name its tasks instead)")
        metrics = _metrics(out["results"][harness_name])
        name = selection.display_name(harness_name)
        if name in selection.offline and name not in selection.generative:
            metrics[PER_TOKEN_METRIC] = per_token_accuracy(samples.get(harness_name, []), tokenizer)
        n = out.get("n-samples", {}).get(harness_name, {}).get("effective", len(samples.get(harness_name, [])))
        results[name] = TaskResult(name, harness_name, int(n), metrics)
    return HarnessRun(results, samples)


# ------------------------------------------------------------------ patch in place


def load_patch(patch: Any, *, token: str | None = None):
    """A ``LayerPatch`` from a folder / Hub repo id (a ``LayerPatch`` is returned as is)."""
    from layerzo.patch.format import LayerPatch

    return patch if isinstance(patch, LayerPatch) else LayerPatch.from_pretrained(patch, token=token)


def resolve_seed(seed: int | None, patch=None) -> int:
    """The eval seed: ``seed`` when given, else the seed in ``patch``'s recipe, else 0.

    With the recipe's seed, layerzo tasks evaluate the very rows tune tested
    the patch on. A recipe seed that is not an integer >= 0 counts as absent.
    """
    if seed is not None:
        return seed
    recipe_seed = patch.manifest.recipe.get("seed") if patch is not None else None
    return recipe_seed if type(recipe_seed) is int and recipe_seed >= 0 else 0


def describe_patch(patch) -> dict[str, Any]:
    from layerzo.core.hashing import combine_sha256

    m = patch.manifest
    return {
        "source": getattr(patch, "source", None),
        "revision": getattr(patch, "source_revision", None),
        "base_model": m.base_model,
        "base_revision": m.base_revision,
        "kind": m.kind,
        "layers": list(m.layers),
        "base_fingerprint_sha256": combine_sha256(f"{k}={v}" for k, v in sorted(m.base_fingerprint.items())),
        "base_fingerprint": dict(sorted(m.base_fingerprint.items())),
        "recipe": m.recipe,
        "metrics": m.metrics,
    }


# ------------------------------------------------------------------ one command


def evaluate(
    config: EvalConfig,
    *,
    model: str | None = None,
    patch: Any = None,
    dtype: str = "float32",
    device: str = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    token: str | None = None,
    force: bool = False,
    loaded=None,
    progress: Progress | None = None,
) -> EvalReport:
    """Evaluate the base (``model`` spec, or an already ``loaded`` LoadedModel) and base + ``patch``.

    ``patch``: a patch folder / Hub repo id, or a loaded ``LayerPatch``;
    ``force`` applies it even if the base fingerprint differs (noted in the report).

    Order matters for the user: every cheap check (task names, data files,
    patch files, base fingerprint) runs before the first slow harness run.
    """
    say = progress or (lambda _msg: None)
    selection = validate_tasks(config)
    layer_patch = load_patch(patch, token=token) if patch is not None else None
    if loaded is None:
        from layerzo.model.loading import check_model_source

        check_model_source(model, revision=revision, device=device, trust_remote_code=trust_remote_code)
    if layer_patch is not None and not layer_patch.weights_included:
        from layerzo.patch.replay import with_weights

        say("rebuilding the trajectory-only patch's weights from the base")
        layer_patch = with_weights(layer_patch, model if loaded is None else loaded.source.location, revision=revision)
    with task_manager(selection, config) as manager:
        if loaded is None:
            from layerzo.model.loading import load_model

            say("loading the base model")
            loaded = load_model(model, dtype=dtype, device=device, revision=revision,
                                trust_remote_code=trust_remote_code)
        base_name = loaded.source.name
        if layer_patch is not None:
            from layerzo.patch.merge import check_base

            check_base(loaded.model, layer_patch, force=force)
        lms = [(part, make_lm(loaded.model, loaded.tokenizer, batch_size=config.batch_size, max_length=length))
               for part, length in harness_parts(selection, config)]
        say(f"lm-eval on the base model: {', '.join(selection.harness_names)}")
        base = run_parts(lms, loaded.tokenizer, manager, config)
        patched, patch_notes = None, []
        if layer_patch is not None:
            from layerzo.patch.merge import apply_to_model

            # copy_ into the very parameters the harness holds: no second load, no merged copy on disk
            patch_notes = apply_to_model(loaded.model, layer_patch, force=force)
            say(f"lm-eval on base + patch (layers {list(layer_patch.manifest.layers)})")
            patched = run_parts(lms, loaded.tokenizer, manager, config)
    tasks = tuple(selection.display_name(n) for n in selection.harness_names)
    return EvalReport(
        tasks=tasks,
        base_model=base_name,
        base=base,
        patched=patched,
        settings=_settings(selection, config),
        lm_eval_version=lm_eval_version(),
        layerzo_version=__version__,
        patch=describe_patch(layer_patch) if layer_patch is not None else None,
        notes=_notes(selection, config, layer_patch) + tuple(patch_notes),
    )


def _settings(selection: TaskSelection, config: EvalConfig) -> dict[str, Any]:
    return {"limit": config.limit, "num_fewshot": config.num_fewshot or 0, "seed": config.seed,
            "batch_size": config.batch_size, "num_test": config.num_test if selection.offline else None,
            "max_length": config.max_length,
            "max_new_tokens": config.max_new_tokens if selection.generative else None,
            "data_dir": str(Path(config.data_dir).expanduser().resolve()) if config.data_dir else None}


def _notes(selection: TaskSelection, config: EvalConfig, patch) -> tuple[str, ...]:
    """Plain-language caveats for comparing these numbers with ``layerzo tune``'s."""
    notes = []
    if selection.offline:
        notes.append(
            f"layerzo tasks ({', '.join(selection.offline)}) evaluate load_task(num_test={config.num_test}, "
            f"seed={config.seed}).test: the rows `layerzo tune --num-test {config.num_test} --seed {config.seed}` "
            "reports its test scores on, truncated at the same --max-length "
            f"({config.max_length}); acc_per_token is tune's scoring rule (mean per-token log-likelihood)"
        )
    if selection.generative:
        notes.append(
            f"{', '.join(selection.generative)}: greedy answers of at most {config.max_new_tokens} tokens "
            "(--max-new-tokens), cut at the first newline, prompts left-truncated to "
            f"{config.max_length - config.max_new_tokens} tokens; f1 / em are layerzo tune's SQuAD F1 / exact "
            "match (max over the gold answers)"
        )
    recipe = patch.manifest.recipe if patch is not None else {}
    tuned = {k: recipe.get(k) for k in ("task", "seed", "num_test") if k in recipe}
    if tuned and selection.offline:
        differs = [k for k in ("seed", "num_test") if k in tuned and tuned[k] != getattr(config, k)]
        if differs:
            notes.append(f"the patch was tuned and tested with {', '.join(f'{k}={tuned[k]}' for k in differs)}; "
                         "pass the same --seed and --limit to evaluate the same rows")
    return tuple(notes)
