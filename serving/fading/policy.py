"""The keep decision: does example ``i`` keep feature ``f`` at coverage ``c``?

Deterministic and consistent per unit (e.g. per user)::

    z(unit, f)   = mix(mix(unit) ^ key(model, f, salt))                 # 64 random bits
    u, v         = (z >> 32) / 2**32, (z & 0xffffffff) / 2**32          # two uniforms in [0, 1)
    control      = v < control_fraction                                 # holdout, never faded
    keep         = control or u < coverage

``mix`` is the splitmix64 finaliser; ``key`` is a 64-bit BLAKE2b digest of the model,
feature and salt, so two features (or two salts) fade independent sets of units; the
control draw ``v`` comes from the other half of the bits, independent of the keep draw
``u``. The decision is taken with integer compares of those bits (no floats on the
request path). Because ``keep`` compares one fixed draw against the coverage, lowering
the coverage only ever removes units and raising it back restores exactly the same ones:
a unit's treatment never flips back and forth within a schedule.

``coverage`` applies to the treatment population (everything outside the control cohort),
so the served fraction of all traffic is ``control + (1 - control) * coverage``. Once a
schedule is done (coverage 0 past its soak) the control cohort is released too: the
feature is then gone for everyone and dropping its tables changes no score.

Where a request carries no unit ids, every example uses the request id as its unit
(one treatment per request).

A faded feature of an example becomes an empty bag: the model's "missing" value, and no
lookup is sent for it. :func:`apply_fading` does that to a :class:`~recserve.batch.Batch`.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from recserve.batch import Bags, Batch

# Cohort of one example for one feature (int8 codes in FadeDecision.cohorts).
CONTROL = 0  # in the holdout: keeps the feature whatever the coverage
KEPT = 1  # treatment population, kept at this coverage
FADED = 2  # treatment population, faded: sent as an empty bag
COHORT_NAMES = ("control", "kept", "faded")

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


_S30, _S27, _S31, _S32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise over a uint64 array (wraps around by design; numpy
    does not warn on array overflow). Returns a new array."""
    z = z + _GOLDEN
    z ^= z >> _S30
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def key64(*parts: str) -> np.uint64:
    """A stable 64-bit key of some strings (BLAKE2b; the same on every machine and run)."""
    h = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(h, "little"))


def mix_units(units: np.ndarray) -> np.ndarray:
    """The first mixing round of the draws, shared by every feature: uint64 [B]."""
    return _mix(np.asarray(units).astype(np.uint64, copy=False))


def unit_draws(units: np.ndarray, key: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """(keep draw u, control draw v) per unit for ``key``: float64 [B] each, in [0, 1).
    The reference form of what :func:`cohorts` decides with integer compares."""
    z = _mix(mix_units(units) ^ key)  # uint64 [B]
    return (z >> _S32).astype(np.float64) / 2.0**32, (z & _LOW32).astype(np.float64) / 2.0**32


def request_units(batch_size: int, request_id: str) -> np.ndarray:
    """The unit of every example of a request that sent no unit ids: uint64 [B]."""
    return np.full(batch_size, key64("request", request_id), dtype=np.uint64)


@dataclass(frozen=True, kw_only=True)
class FeatureFade:
    """What the request path needs to know about one feature being faded."""

    feature: str
    coverage: float  # in [0, 1]: kept fraction of the treatment population
    salt: str = ""
    control_fraction: float = 0.0  # in [0, 1): share of units held out at full coverage

    def __post_init__(self) -> None:
        if not 0.0 <= self.coverage <= 1.0:
            raise ValueError(f"coverage: must be in [0, 1], got {self.coverage!r}")
        if not 0.0 <= self.control_fraction < 1.0:
            raise ValueError(f"control_fraction: must be in [0, 1), got {self.control_fraction!r}")

    @functools.cache  # noqa: B019  (a handful of frozen fades; computed once, not per request)
    def key(self, model: str) -> np.uint64:
        """The draw key of this feature of ``model``."""
        return key64(model, self.feature, self.salt)


def _threshold(p: float) -> np.uint64:
    """bits < ceil(p * 2**32)  <=>  bits / 2**32 < p, exactly, for 32-bit integers."""
    return np.uint64(math.ceil(p * 2.0**32))


def cohorts(units: np.ndarray, model: str, fade: FeatureFade, *, mixed: np.ndarray | None = None) -> np.ndarray:
    """CONTROL / KEPT / FADED of every example for one feature: int8 [B].

    ``mixed``: ``mix_units(units)``, when the caller shares it across features."""
    everyone_faded = fade.coverage <= 0.0 and fade.control_fraction <= 0.0  # a done schedule
    out = np.full(units.shape[0], FADED if everyone_faded else KEPT, dtype=np.int8)
    if everyone_faded or (fade.coverage >= 1.0 and fade.control_fraction <= 0.0):
        return out  # no draw needed
    z = _mix((mix_units(units) if mixed is None else mixed) ^ fade.key(model))  # uint64 [B]
    if fade.coverage < 1.0:  # integer compares: the same decisions as unit_draws(...)
        out[(z >> _S32) >= _threshold(fade.coverage)] = FADED
    if fade.control_fraction > 0.0:
        out[(z & _LOW32) < _threshold(fade.control_fraction)] = CONTROL
    return out


def fade_bags(bags: Bags, keep: np.ndarray) -> Bags:
    """``bags`` with the examples where ``keep`` is False turned into empty bags."""
    per_id = np.repeat(keep, bags.lengths)  # bool [N]
    return Bags(
        bags.values[per_id],
        np.where(keep, bags.lengths, 0).astype(bags.lengths.dtype, copy=False),
        None if bags.weights is None else bags.weights[per_id],
    )


@dataclass(frozen=True)
class FadeDecision:
    """What fading did to one batch: the guardrails and metrics read it after scoring."""

    cohorts: dict[str, np.ndarray]  # feature -> int8 [B] (CONTROL, KEPT, FADED)
    lookups_skipped: dict[str, int]  # feature -> ids not looked up in this batch

    @property
    def any_faded(self) -> bool:
        return any(bool((c == FADED).any()) for c in self.cohorts.values())


def apply_fading(
    batch: Batch, model: str, fades: Mapping[str, FeatureFade], *, request_id: str = ""
) -> tuple[Batch, FadeDecision]:
    """The batch with faded features emptied per example, and what was decided.

    Features without an entry in ``fades`` and features the request did not send pass
    through untouched (the same ``Bags`` objects, so full coverage is bit-identical).
    """
    b = batch.batch_size
    units = batch.unit_ids if batch.unit_ids is not None else request_units(b, request_id)
    if units.shape[0] != b:
        raise ValueError(f"unit_ids: has {units.shape[0]} entries for a batch of {b} examples")
    sparse = dict(batch.sparse)
    decided: dict[str, np.ndarray] = {}
    skipped: dict[str, int] = {}
    draws = any(0.0 < f.coverage < 1.0 or f.control_fraction > 0.0 for f in fades.values())
    mixed = mix_units(units) if draws else None  # [B], shared by every feature
    for feature, fade in fades.items():
        c = cohorts(units, model, fade, mixed=mixed)  # int8 [B]
        decided[feature] = c
        bags = sparse.get(feature)
        if bags is None:
            skipped[feature] = 0
            continue
        if fade.coverage <= 0.0 and fade.control_fraction <= 0.0:  # everyone: no per-example work
            skipped[feature] = int(bags.values.size)
            if bags.values.size:
                sparse[feature] = Bags(
                    bags.values[:0], np.zeros_like(bags.lengths), None if bags.weights is None else bags.weights[:0]
                )
            continue
        faded = c == FADED  # bool [B]
        if not faded.any():
            skipped[feature] = 0
            continue
        skipped[feature] = int(bags.lengths[faded].sum())
        sparse[feature] = fade_bags(bags, ~faded)
    if not any(skipped.values()):
        return batch, FadeDecision(decided, skipped)
    return Batch(batch.dense, sparse, batch.unit_ids), FadeDecision(decided, skipped)
