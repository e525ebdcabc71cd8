"""``--layers auto``: a layer pick that checks itself by racing a few candidates on the same batches.

The outlier rule (``--layers dominant``) is one hypothesis; on other model
families the first outlier may sit on the BOS token from layer 0 on and mean
nothing. So :func:`auto_layer` ranks a few candidates —

* the outlier pick and one outlier alternative: the NEAR MISS when there is
  one (the first layer before the pick whose max/median ratio reaches the
  ratio threshold divided by :data:`NEAR_MISS_FACTOR`: the rule's pick under
  a looser threshold), else the runner-up (the next layer flagged as an
  outlier, else the one with the largest max/median ratio),
* the sensitivity pick and its runner-up (a cheap screen: :data:`SCREEN_DIRECTIONS`
  directions on one batch; see :mod:`layerzo.zo.sensitivity`),
* the last layer —

then races them with successive halving: every candidate takes the SAME
``first_steps`` ZO steps on the same training batches (the run's lr and eps),
is scored by the teacher-forced dev loss on a fixed dev subset (lower is
better; zero-shot is the same number for all of them), the better half goes
on for twice as many more steps, until one is kept. A candidate whose
perturbations never changed the training loss (every projected gradient
exactly 0: its weights reach nothing the loss sees) is out at once, whatever its
dev loss: on a short budget ZO noise can leave a live layer slightly worse than
an inert one that simply keeps the zero-shot loss. The candidates run from the
shallowest up and share the frozen layers' outputs (``SharedLowerOutputs``: every
candidate sees the same batches on the same base), so each training batch's and the dev
batch's lower stack runs once, up to the deepest candidate. The race is deterministic
(seeded), leaves the base weights bit-identical, and is recorded in the
manifest (``profile.race``).

The race checks a prior, the outlier pick; it overrides it only on evidence:
when the winner's dev-loss gain over zero-shot, paired over the scored dev
examples, is within :data:`DECIDE_SE` standard errors of 0 the race is
UNDECIDED and :func:`race_choice` keeps the outlier pick (unless that pick was
inert in the race). A few ZO steps can win a race by noise: on CB the winner
of 4 was layer 0, the worst CB layer of the sweep.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, ContextManager, Hashable, Iterator, Mapping, Sequence

import torch

from layerzo.core.stats import paired_gain
from layerzo.data.objectives import Objective
from layerzo.data.scoring import kept_logits
from layerzo.errors import ConfigError, DivergenceError
from layerzo.model.layers import get_layer, layer_parameter_names
from layerzo.model.precision import fp32_master_layers
from layerzo.model.prefix_cache import SharedLowerOutputs, cached_lower_layers
from layerzo.profile.rule import ProfileConfig
from layerzo.tune.batches import train_batches
from layerzo.zo.engine import TunedParams, ZOConfig, ZOState, zo_step
from layerzo.zo.sensitivity import SensitivityConfig, layer_sensitivity

# The sensitivity screen of --layers auto: K = 2 one-sided directions on the first few training examples,
# ~1/32 of `profile --sensitivity` (K = 8 central on 2 × 8). It only ranks the layers by how far a
# perturbation reaches (the final hidden state's change concentrates over a layer's millions of weights).
SCREEN_DIRECTIONS = 2
SCREEN_EXAMPLES = 4
LAYER_RACE_FRACTION = 0.05  # --layers auto: the race's ZO steps, as a share of the run's steps
# A threshold is a convention (1000 in Sun et al.), so a layer before the pick within 2x of it is the rule's
# pick under a looser one. It takes the outlier-alternative slot over the next flagged layer, which on the
# demo is the pick's own outlier persisting (same token and channel). Measured on the demo (sweeps in
# benchmarks/results): near miss layer 2 (ratio 817) ranks 3/30 on SQuAD (within 2 SE of the best) and 2/6
# on CB (1st on dev), 18/30 on SST-2; layer 12 (next flagged) ranks 6/30, 5/6 and 12/30.
NEAR_MISS_FACTOR = 2.0
DECIDE_SE = 2.0  # the race overrides the outlier pick only with a gain over zero-shot > 2 paired SE


@dataclass(frozen=True)
class RaceConfig:
    """The race's budget: ``first_steps`` per candidate in round 1 (doubling each round), ``dev_examples`` scored."""

    first_steps: int = 4
    # 16, not 32: scoring 32 was 38 % of the demo's lr search (cProfile: 25 of 65 s), and the score only
    # ranks candidates against each other on the SAME examples, so the paired differences stay clear.
    dev_examples: int = 16
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("first_steps", "dev_examples", "batch_size"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ConfigError(f"race {name} must be an integer ≥ 1, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Candidate:
    layer: int
    sources: tuple[str, ...]  # why it runs: "outlier pick", "outlier near miss: …", "sensitivity pick", ...


@dataclass(frozen=True)
class RaceRound:
    steps: int  # steps each survivor took in this round
    dev_loss: dict  # candidate (a layer, or a learning rate) -> dev loss after the round
    kept: tuple
    inert: tuple = ()  # candidates whose projected gradients were all exactly 0 so far


@dataclass(frozen=True)
class RaceResult:
    winner: int
    zero_shot_dev_loss: float
    candidates: tuple[Candidate, ...]
    rounds: tuple[RaceRound, ...]
    seconds: float
    steps: int  # ZO steps run in the whole race
    gain: float  # the winner's dev-loss gain over zero-shot, the mean over the scored dev examples
    gain_se: float  # its standard error (paired: the same examples before and after)

    @property
    def decided(self) -> bool:
        """The winner lowered the dev loss by more than :data:`DECIDE_SE` standard errors."""
        return self.gain > DECIDE_SE * self.gain_se

    @property
    def reason(self) -> str:
        last = self.rounds[-1].dev_loss
        runner = min((layer for layer in last if layer != self.winner), key=last.get, default=None)
        vs = f" vs layer {runner}'s {last[runner]:.4f}" if runner is not None else ""
        sources = next(c.sources for c in self.candidates if c.layer == self.winner)
        inert = sorted({layer for r in self.rounds for layer in r.inert} - {self.winner})
        out = f"; inert (no perturbation changed the loss): layer(s) {', '.join(map(str, inert))}" if inert else ""
        worse = "" if last[self.winner] < self.zero_shot_dev_loss else "; no candidate lowered the dev loss"
        undecided = "" if self.decided else f"; undecided: its gain is within {DECIDE_SE:g} SE of zero-shot"
        return (f"layer {self.winner} ({', '.join(sources)}) won a race of {len(self.candidates)} candidates on the same "
                f"training batches: dev loss {self.zero_shot_dev_loss:.4f} -> {last[self.winner]:.4f} (gain "
                f"{self.gain:.4f} ± {self.gain_se:.4f} SE, paired){vs} after {len(self.rounds)} round(s), "
                f"{self.steps} ZO steps in all{out}{worse}{undecided}")

    def to_dict(self) -> dict:
        return {"winner": self.winner, "zero_shot_dev_loss": self.zero_shot_dev_loss,
                "candidates": [asdict(c) for c in self.candidates],
                "rounds": [{"steps": r.steps, "dev_loss": {str(k): v for k, v in r.dev_loss.items()},
                            "kept": list(r.kept), "inert": list(r.inert)} for r in self.rounds],
                "steps": self.steps, **{k: v if math.isfinite(v) else None  # strict JSON: no inf (1 example, divergence)
                                        for k, v in (("gain", self.gain), ("gain_se", self.gain_se))},
                "decided": self.decided,
                "reason": self.reason}  # no seconds: the manifest stays byte-identical


def first_round_steps(steps: int, candidates: int, fraction: float) -> int:
    """Round-1 steps per candidate so a race is about ``fraction`` of the run's ``steps`` (at least 2).

    Successive halving with doubling rounds, stopped once one candidate is kept, runs each
    round about ``c`` first-round budgets (``c·s``, then ``c/2·2s``, …), ``ceil(log2 c)``
    rounds (at least 1) for ``c`` candidates.
    """
    rounds = max(1, math.ceil(math.log2(max(candidates, 1))))
    return max(2, round(fraction * steps / (candidates * rounds)))


def candidate_layers(outlier: dict, sensitivity_ranking: Sequence[int], num_layers: int) -> tuple[Candidate, ...]:
    """The candidates in a fixed order, each with every reason it was proposed (a pure function)."""
    pick = int(outlier["pick"]["layer"])
    alternative = near_miss(outlier)
    if alternative is None:
        flagged = [int(s["layer"]) for s in outlier["layers"] if s.get("outlier") and int(s["layer"]) != pick]
        by_ratio = sorted((s for s in outlier["layers"] if int(s["layer"]) != pick and s.get("ratio") is not None),
                          key=lambda s: (-s["ratio"], s["layer"]))
        runner = flagged[0] if flagged else (int(by_ratio[0]["layer"]) if by_ratio else None)
        alternative = (runner, "outlier runner-up")
    proposals = [(pick, "outlier pick"), alternative]
    proposals += [(layer, name) for layer, name in zip(sensitivity_ranking[:2], ("sensitivity pick",
                                                                                 "sensitivity runner-up"))]
    proposals.append((num_layers - 1, "last layer"))
    sources: dict[int, list[str]] = {}
    for layer, why in proposals:
        if layer is not None:
            sources.setdefault(int(layer), []).append(why)
    return tuple(Candidate(layer, tuple(why)) for layer, why in sources.items())


def near_miss(outlier: dict) -> tuple[int, str] | None:
    """The first layer before the pick that the outlier test misses only on the ratio, by less than
    :data:`NEAR_MISS_FACTOR` (``max|h| > max_threshold`` and ``ratio >= ratio_threshold / NEAR_MISS_FACTOR``),
    with its reason; None when there is none. Thresholds are the profile's own (its ``config``)."""
    rule = {**asdict(ProfileConfig()), **outlier.get("config", {})}
    pick = int(outlier["pick"]["layer"])
    for s in outlier["layers"]:
        if (int(s["layer"]) < pick and not s.get("outlier") and s.get("ratio") is not None
                and s.get("max_abs", math.inf) > rule["max_threshold"]
                and s["ratio"] >= rule["ratio_threshold"] / NEAR_MISS_FACTOR):
            return int(s["layer"]), f"outlier near miss: max/median {s['ratio']:.0f} < {rule['ratio_threshold']:g}"
    return None


def race(loaded, objective: Objective, train: Sequence, dev: Sequence, candidates: Sequence[Candidate],
         zo: ZOConfig, config: RaceConfig = RaceConfig()) -> RaceResult:
    """Successive halving over ``candidates`` (module docstring); θ of the model is bit-identical afterwards."""
    if not candidates:
        raise ConfigError("the layer race needs at least one candidate")
    start = time.perf_counter()
    dev_score = DevScore(loaded, objective, dev, train, config.dev_examples)
    # Every candidate sees the same batches and the base below it: the lower layers' outputs are shared,
    # so, run from the shallowest candidate up, each batch's lower stack runs once to the deepest layer.
    shared = SharedLowerOutputs()
    runners = {layer: Runner(lambda layer=layer: layer_params(loaded, layer), layer, loaded, objective, train, zo,
                             config, shared) for layer in sorted(c.layer for c in candidates)}
    rounds, total = successive_halving(runners, dev_score, config.first_steps)
    winner = rounds[-1].kept[0]
    # a winner that diverged was never scored: no gain
    gain, se = (paired_gain(dev_score.zero_shot_examples, dev_score.examples[winner]) if winner in dev_score.examples
                else (-math.inf, math.inf))
    return RaceResult(winner, dev_score.zero_shot, tuple(candidates), tuple(rounds),
                      round(time.perf_counter() - start, 3), total, gain, se)


def race_choice(result: RaceResult, outlier_pick: int) -> tuple[int, str]:
    """The layer ``--layers auto`` tunes and why: the race's winner when it decided, else the outlier pick —
    the prior the race checks — unless that pick was inert in the race (its weights reach nothing)."""
    inert = {layer for r in result.rounds for layer in r.inert}
    if result.decided or result.winner == outlier_pick or outlier_pick in inert:
        return result.winner, result.reason
    return outlier_pick, f"{result.reason}: kept the outlier pick, layer {outlier_pick}"


def successive_halving(runners: Mapping[Hashable, "Runner"], score: Callable[[Hashable], float],
                       first_steps: int) -> tuple[list[RaceRound], int]:
    """Race ``runners`` (in their order; ties go to the earlier) until one is kept; returns the rounds and the
    ZO steps run in all.

    Each round every survivor advances ``steps`` more ZO steps (doubling each
    round) and is scored by ``score(key)`` (lower is better; non-finite = last);
    the better half, rounded up, goes on. A runner whose projected gradients were
    all exactly 0 (inert) ranks last while any other is live.
    """
    alive, rounds, steps, total = list(runners), [], first_steps, 0
    while True:
        losses = {key: runners[key].advance(steps, lambda key=key: score(key)) for key in alive}
        total += steps * len(alive)
        inert = tuple(key for key in alive if runners[key].inert)
        ranked = sorted(alive, key=lambda key: (key in inert and len(inert) < len(alive), _finite(losses[key]),
                                                alive.index(key)))
        keep = ranked[:math.ceil(len(alive) / 2)]
        rounds.append(RaceRound(steps, losses, tuple(keep), inert))
        if len(keep) == 1:  # decided: a round for the winner alone would only re-score it
            return rounds, total
        alive, steps = [key for key in alive if key in keep], steps * 2


class DevScore:
    """A race's score: the teacher-forced loss of a fixed dev batch (the first ``examples`` dev examples,
    else training ones) under a candidate's weights, its lower layers run once.

    ``zero_shot`` is that loss under the base weights (the same for every candidate).
    Called with the layer a candidate tunes: the output of the frozen layers below it
    is kept per layer (and shared across layers, deepest so far) for the whole race.
    """

    def __init__(self, loaded, objective: Objective, dev: Sequence, train: Sequence, examples: int) -> None:
        self.loaded, self.scorer = loaded, objective.teacher_forced()
        self.dev_batch = self.scorer.encode(list(dev[:examples]) or list(train[:examples]))
        with torch.no_grad():
            logits = kept_logits(loaded.model, self.dev_batch)
        self.zero_shot = self.scorer.loss_of_logits(logits, self.dev_batch)
        self.zero_shot_examples = self.scorer.example_losses_of_logits(logits, self.dev_batch)
        self.examples: dict[int, list[float]] = {}  # layer -> per-example losses of its latest score
        self.stores: dict[int, dict] = {}
        self.shared = SharedLowerOutputs()

    def __call__(self, first: int) -> float:
        model, layout = self.loaded.model, self.loaded.layout
        with cached_lower_layers(model, layout, first, store=self.stores.setdefault(first, {}), batch=self.dev_batch,
                                 shared=self.shared), torch.no_grad():
            logits = kept_logits(model, self.dev_batch)
        self.examples[first] = self.scorer.example_losses_of_logits(logits, self.dev_batch)
        return self.scorer.loss_of_logits(logits, self.dev_batch)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf


@contextmanager
def layer_params(loaded, layer: int) -> Iterator[TunedParams]:
    """One decoder layer's tensors as tuned parameters (fp32 masters under a low-precision model), for a block."""
    model, layout = loaded.model, loaded.layout
    module = get_layer(model, layout, layer)
    dtype = next(model.parameters()).dtype
    with fp32_master_layers([module], dtype):
        yield TunedParams.from_model(model, layer_parameter_names(model, layout, layer))
    module.to(dtype)


class Runner:
    """One candidate's ZO run, advanced a round at a time; its tensors hold their starting values between rounds.

    ``params()`` gives the candidate's tuned tensors for the length of a round (a
    context manager, e.g. :func:`layer_params`, or ``nullcontext(tuned.params)``);
    layers below ``first_cached`` are frozen for it, and ``shared`` (the same for all
    runners of a race: they see the same batches on the same base) keeps their outputs.
    A run that diverges (the engine's stop after ``max_bad_steps`` rejected steps)
    scores +inf from then on.
    """

    def __init__(self, params: Callable[[], ContextManager[TunedParams]], first_cached: int, loaded, objective: Objective,
                 train: Sequence, zo: ZOConfig, config: RaceConfig, shared: SharedLowerOutputs | None = None) -> None:
        self.params, self.first_cached, self.loaded, self.shared = params, first_cached, loaded, shared
        self.objective, self.train, self.zo = objective, train, zo
        self.batches = train_batches(len(train), config.batch_size, config.seed)  # the same stream for everyone
        self.seeds, self.state, self.weights = random.Random(config.seed), ZOState(), None
        self.inert, self.diverged = True, False  # inert: until a perturbation changes the loss

    def advance(self, steps: int, score: Callable[[], float]) -> float:
        """``steps`` more ZO steps from where this candidate stopped; returns ``score()`` of its weights."""
        if self.diverged:
            return math.inf
        model, layout = self.loaded.model, self.loaded.layout
        with self.params() as params:
            base = params.state()
            if self.weights is not None:
                params.load(self.weights)
            try:
                for _ in range(steps):
                    batch = self.objective.encode([self.train[i] for i in next(self.batches)])
                    with self.objective.step_loss(model, layout, self.first_cached, batch, self.shared) as loss:
                        result = zo_step(params, loss, self.seeds.getrandbits(63), self.zo, self.state)
                    self.inert = self.inert and all(g == 0.0 for g in result.grads)
                with torch.no_grad():
                    value = score()
                self.weights = params.state()
            except DivergenceError:
                self.diverged, value = True, math.inf
            finally:
                params.load(base)
        return value


def sensitivity_ranking(loaded, objective: Objective, train: Sequence, *, batch_size: int, seed: int) -> list[int]:
    """Layers by the sensitivity rule from a cheap screen (:data:`SCREEN_DIRECTIONS` one-sided directions on the
    first :data:`SCREEN_EXAMPLES` examples of the run's first batch)."""
    scorer = objective.teacher_forced()
    stream = train_batches(len(train), batch_size, seed)
    batch = scorer.encode([train[i] for i in next(stream)[:SCREEN_EXAMPLES]])
    report = layer_sensitivity(loaded.model, loaded.layout, [batch], lambda b: scorer.loss(loaded.model, b),
                               SensitivityConfig(directions=SCREEN_DIRECTIONS, seed=seed, one_sided=True),
                               model_name=loaded.source.name)
    return report.ranking()
