"""Runs the configured attacks on the observations of an honest-but-curious server.

For every observation it runs each attack whose targets include it, hands the result to
the :class:`~fl_privsim.engine.scoring.Scorer` (the only place that sees ground truth), appends
the scores to ``metrics.jsonl`` and saves one image grid per observation. Inference attacks
(:mod:`adversaries.inference.federated`) get the server's knowledge attached by the scorer
side and are scored by :mod:`fl_privsim.engine.inference_scoring` (secret, score; AUC in the
summary). An attack that
refuses (its threat model is not met) or fails is recorded as such and never stops
training.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from adversaries.base import Attack, Observation
from adversaries.inference.federated import InferenceObservation, ServerKnowledge
from fl_privsim.core.errors import ThreatModelError
from fl_privsim.core.metrics import psnr
from fl_privsim.core.plots import GridRow
from fl_privsim.core.results import RunFolder
from fl_privsim.core.seeding import torch_generator
from fl_privsim.engine.analyses import AnalysisPlan
from fl_privsim.engine.analyses import summarize as summarize_analyses
from fl_privsim.engine.inference_scoring import summarize as summarize_inference
from fl_privsim.engine.scoring import Score, Scorer

log = logging.getLogger(__name__)

AGGREGATE = "agg"
#: Distinct refusal (and failure) reasons kept per attack for the summary.
MAX_REASONS = 3


@dataclass
class AttackPlan:
    """One configured attack and what it targets."""

    name: str
    attack: Attack
    rounds: set[int]
    clients: set[int]
    aggregate: bool = False

    def wants(self, obs: Observation) -> bool:
        """Whether this plan attacks ``obs``."""
        if obs.round not in self.rounds:
            return False
        return self.aggregate if obs.is_aggregate else obs.client_id in self.clients


@dataclass
class AttackRunner:
    """The :class:`strategies.honest_but_curious.Observer` that attacks and scores."""

    plans: Sequence[AttackPlan]
    scorer: Scorer
    folder: RunFolder
    device: torch.device
    seed: int
    save_images: bool = True
    on_attack_done: Callable[[], None] | None = None
    scores: dict[str, list[dict[str, float]]] = field(default_factory=lambda: defaultdict(list))
    outcomes: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    #: Per label and outcome (``"refused"``/``"failed"``): the distinct reasons, first seen first,
    #: at most :data:`MAX_REASONS` (the summary's ``refused_reasons``/``failed_reasons``).
    reasons: dict[str, dict[str, list[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    #: ``[[analyses]]`` (analyst-side, given the true batch): run after the attacks, same observations.
    analyses: Sequence[AnalysisPlan] = ()
    analysis_scores: dict[str, list[dict[str, float]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    analysis_outcomes: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    analysis_noise: dict[str, str] = field(default_factory=dict)

    def targets(self, server_round: int) -> tuple[set[int], bool]:
        """Union of the plans' targets in ``server_round``."""
        clients: set[int] = set()
        aggregate = False
        for plan in self.plans:
            if server_round in plan.rounds:
                clients |= plan.clients
                aggregate |= plan.aggregate
        for a in self.analyses:
            if server_round in a.rounds:
                clients |= a.clients
        return clients, aggregate

    def planned_runs(self, rounds: int, clients_per_round: Callable[[int], set[int]]) -> int:
        """How many (attack, observation) runs the plans will make (for a progress bar)."""
        total = 0
        for plan in self.plans:
            for r in plan.rounds:
                if r <= rounds:
                    total += len(plan.clients & clients_per_round(r)) + int(plan.aggregate)
        return total

    def missing(self, server_round: int, client: int | None, reason: str) -> None:
        """Record, for every attack targeting ``client`` in ``server_round``, that its update
        did not come back (the client failed, :mod:`strategies.faults`): outcome ``skipped``
        with the reason ``client N failed in round r: <reason>``; the attack is not run."""
        if client is None:
            return
        text = f"client {client} failed in round {server_round}: {' '.join(reason.split())}"
        for plan in self.plans:
            if server_round not in plan.rounds or client not in plan.clients:
                continue
            self.outcomes[plan.name]["skipped"] += 1
            self._note_reason(plan.name, "skipped", text)
            self.folder.log_metric(
                round=server_round,
                client=client,
                source=f"attack/{plan.name}",
                key="skipped",
                value=text,
            )
            if self.on_attack_done is not None:
                self.on_attack_done()

    def observe(self, server_round: int, observations: list[Observation]) -> None:
        """Attack, score and record every observation."""
        for obs in observations:
            key = AGGREGATE if obs.is_aggregate else obs.client_id
            rows: list[GridRow] = []
            scored: Score | None = None
            for plan in self.plans:
                if not plan.wants(obs):
                    continue
                label = f"{plan.name}@aggregate" if obs.is_aggregate else plan.name
                row, score = self._run_one(plan, obs, label, key)
                scored = score or scored
                if row is not None:  # inference attacks draw no images
                    rows.append(row)
                if self.on_attack_done is not None:
                    self.on_attack_done()
            for a in self.analyses:
                if a.wants(obs.round, obs.client_id):
                    self._analyse(a, obs, key)
            if self.save_images and rows and scored is not None:
                try:
                    self.folder.save_grid(
                        round=server_round,
                        client=key,
                        originals=scored.originals,
                        rows=rows,
                        title=self._grid_title(obs),
                        captions=self._label_captions(scored),
                    )
                except Exception:
                    log.exception(
                        "could not save the image grid of round %d, client %s", server_round, key
                    )

    @staticmethod
    def _grid_title(obs: Observation) -> str:
        who = (
            f"aggregate of {obs.num_clients} clients"
            if obs.is_aggregate
            else f"client {obs.client_id}"
        )
        return f"round {obs.round}, {who} ({obs.protocol})"

    def _label_captions(self, score: Score) -> list[str] | None:
        if score.labels is None:
            return None
        names = getattr(self.scorer.fed.data, "class_names", ())
        return [
            f"{names[int(y)]}" if int(y) < len(names) and names[int(y)] else f"label {int(y)}"
            for y in score.labels
        ]

    def _run_one(
        self, plan: AttackPlan, obs: Observation, label: str, key: int | str
    ) -> tuple[GridRow | None, Score | None]:
        """Run, score and record one attack on one observation; the grid row it draws (``None``
        for an inference attack) and its score (``None`` unless it reconstructed)."""
        members = list(obs.members)
        client_num = -1 if obs.is_aggregate else int(obs.client_id or 0)
        gen = torch_generator(self.seed, obs.round, client_num, "attack")
        source = f"attack/{label}"
        t0 = time.perf_counter()
        inference = plan.attack.produces == "inference"  # what the attack declares
        try:
            if (
                inference
            ):  # the server's own knowledge (aux pool, target's public part), never the secret
                knowledge = self.scorer.inference.knowledge(plan.attack.spec, obs.round, members)
                obs = InferenceObservation.of(obs, ServerKnowledge(**knowledge))
            result = plan.attack(obs, device=self.device, generator=gen)
        except ThreatModelError as exc:
            log.warning("%s refused round %d client %s: %s", plan.name, obs.round, key, exc)
            self.outcomes[label]["refused"] += 1
            self._note_reason(label, "refused", str(exc))
            self.folder.log_metric(
                round=obs.round, client=key, source=source, key="refused", value=str(exc)
            )
            return (None if inference else GridRow(plan.name, None, note=f"refused: {exc}")), None
        except Exception as exc:  # recorded, never fatal
            log.exception("%s failed on round %d client %s", plan.name, obs.round, key)
            self.outcomes[label]["failed"] += 1
            self._note_reason(label, "failed", f"{type(exc).__name__}: {exc}")
            self.folder.log_metric(
                round=obs.round, client=key, source=source, key="error", value=repr(exc)
            )
            return (None if inference else GridRow(plan.name, None, note=f"failed: {exc!r}")), None
        seconds = time.perf_counter() - t0
        score: Score | None = None
        if inference:
            score_values = self.scorer.inference.score(
                plan.attack.spec, float(getattr(result, "score", 0.5)), obs.round, members
            )
        else:
            score = self.scorer.score(result, obs.round, members)
            score_values = score.values
        values = {**score_values, "seconds": seconds}
        for k, v in result.metrics.items():
            values[f"attack_{k}"] = float(v)
        for k, v in values.items():
            self.folder.log_metric(round=obs.round, client=key, source=source, key=k, value=v)
        self.scores[label].append(values)
        self.outcomes[label]["ok"] += 1
        if score is None:
            return None, None
        if score.matched is None:
            return GridRow(plan.name, None, note="labels only (no images reconstructed)"), score
        return GridRow(plan.name, score.matched, captions=_psnr_captions(score)), score

    def _note_reason(self, label: str, outcome: str, reason: str) -> None:
        """Keep ``reason`` (on one line) among the distinct reasons of ``label``'s ``outcome``."""
        kept = self.reasons[label][outcome]
        reason = " ".join(reason.split())
        if reason not in kept and len(kept) < MAX_REASONS:
            kept.append(reason)

    def _analyse(self, plan: AnalysisPlan, obs: Observation, key: int | str) -> None:
        """Run one analysis on the client's true batch (from the scorer) and the global model."""
        source = f"analysis/{plan.name}"
        try:
            client = int(obs.client_id or 0)
            size = len(self.scorer.fed.train_parts[client])
            noise = plan.analysis.noise_model(obs.round, size)
            if noise is None:
                self.analysis_outcomes[plan.name]["skipped"] += 1
                self.folder.log_metric(
                    round=obs.round,
                    client=key,
                    source=source,
                    key="skipped",
                    value="no noise (no noise defense configured, or noise = none)",
                )
                return
            self.analysis_noise[plan.name] = f"{noise.kind} {noise.scale:.6g} ({noise.source})"
            images, y = self.scorer.ground_truth(obs.round, [client])
            x = self.scorer.fed.data.normalize(images).to(self.device)
            model = obs.fresh_model(self.device).train()  # the client's mode (local_update trains)
            # the attack stream's keys plus the analysis' position: its own stream, no new purpose id
            gen = torch_generator(
                self.seed, obs.round, client, "attack", 1 + list(self.analyses).index(plan)
            )
            values = plan.analysis(model, x, y.to(self.device), noise, obs.data_std, gen)
        except Exception as exc:  # recorded, never fatal
            log.exception("analysis %s failed on round %d client %s", plan.name, obs.round, key)
            self.analysis_outcomes[plan.name]["failed"] += 1
            self.folder.log_metric(
                round=obs.round, client=key, source=source, key="error", value=repr(exc)
            )
            return
        for k, v in values.items():
            self.folder.log_metric(round=obs.round, client=key, source=source, key=k, value=v)
        self.analysis_scores[plan.name].append(values)
        self.analysis_outcomes[plan.name]["ok"] += 1

    def analysis_summary(self) -> dict[str, dict[str, object]]:
        """Per analysis: the mean of each value over the analysed updates, and outcome counts."""
        return summarize_analyses(self.analysis_scores, self.analysis_outcomes, self.analysis_noise)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per attack: the mean of each score over the attacked updates, and outcome counts.
        Every configured attack has an entry, ``attacked = 0`` when no targeted update came
        back (e.g. the targeted clients refused to train, see ``client_errors``). An attack
        that refused or failed also has ``refused_reasons``/``failed_reasons``: its distinct
        one-line reasons, first seen first, at most :data:`MAX_REASONS`. An attack whose
        targeted client failed has ``skipped`` (count) and ``skipped_reasons`` (only then)."""
        out: dict[str, dict[str, Any]] = {}
        configured = {p.name for p in self.plans if p.clients} | {
            f"{p.name}@aggregate" for p in self.plans if p.aggregate
        }
        for label in sorted(set(self.scores) | set(self.outcomes) | configured):
            rows = self.scores.get(label, [])
            entry: dict[str, Any] = {}
            for k in (
                "psnr",
                "ssim",
                "mse",
                "avd",
                "asr",
                "leakage_rate",
                "label_accuracy",
                "coverage",
                "seconds",
            ):
                vals = [r[k] for r in rows if k in r]
                if vals:
                    entry[k] = float(np.mean(vals))
            entry["attacked"] = float(len(rows))
            for outcome in ("refused", "failed"):
                entry[outcome] = float(self.outcomes.get(label, {}).get(outcome, 0))
                kept = self.reasons.get(label, {}).get(outcome)
                if kept:
                    entry[f"{outcome}_reasons"] = list(kept)
            skipped = self.outcomes.get(label, {}).get("skipped", 0)
            if skipped:  # the targeted client failed (strategies.faults): not attacked
                entry["skipped"] = float(skipped)
                entry["skipped_reasons"] = list(self.reasons[label]["skipped"])
            if any(
                "secret" in r for r in rows
            ):  # inference attacks: AUC etc. over the observations
                entry.update(summarize_inference(rows, seed=self.seed))  # type: ignore[arg-type]
            out[label] = entry
        return out


def _psnr_captions(score: Score) -> list[str]:
    """PSNR of each matched reconstruction against its original ("no match" where none), and
    the label the attack predicted for it when it predicts labels ("12.3 dB, pred 7")."""
    if score.matched is None:
        return []
    values = psnr(score.originals, score.matched)
    has = (
        score.has_match
        if score.has_match is not None
        else torch.ones(len(values), dtype=torch.bool)
    )
    preds = score.matched_labels
    out = []
    for i, (v, h) in enumerate(zip(values, has, strict=True)):
        if not bool(h):
            out.append("no match")
            continue
        pred = f", pred {int(preds[i])}" if preds is not None and int(preds[i]) >= 0 else ""
        out.append(f"{float(v):.1f} dB{pred}")
    return out
