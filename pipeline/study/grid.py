"""A study's model grids: the `attamba:` and `baselines:` entries, read and checked before any model is built.

`attamba:` is a mapping of model fields (nested ones as "ssm.state_dim"), each a list of values (one value
means a one-item list), expanded as a product; or a list of such mappings, whose products are joined. A
mapping may carry `sizes: [...]`, a subset of the study's sizes. `baselines:` entries are a kind (full | swa
| iso_kv | iso_flop) or a mapping {kind: ..., <field>: [values], sizes: [...]}; an iso baseline may carry
`of: {<attamba field>: [values]}` to be sized only from the Attamba variants that match (by default: from
every Attamba variant of the same size). Each grid only lists the fields its kind reads
(ModelConfig.variant's identity fields), so no grid axis can be silently ignored.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass

from attamba.checks import at_least, fail, one_of
from attamba.config import SIZE_FIELDS, ModelConfig, variant_fields

BASELINES = ("full", "swa", "iso_kv", "iso_flop")
SIZES_KEY = "sizes"
SEQ_LENS_KEY = "seq_lens"   # a grid's own sequence lengths, a subset of the study's (like SIZES_KEY for sizes)
KIND_KEY = "kind"
OF_KEY = "of"
# Fields no grid may list, and where they are set instead.
NOT_IN_A_GRID = {**{name: "it is a size field: the study's `sizes` set it" for name in SIZE_FIELDS},
                 "seed": "the study's `seeds` set it", "attention": "a grid's kind sets it",
                 "iso": "the iso_kv / iso_flop baseline kinds set it",
                 "kv_dim": "iso baselines solve it from each Attamba variant's costs"}


def _example(kind: str) -> ModelConfig:
    attention = "iso_kv" if kind.startswith("iso_") else kind
    # random boundaries: the example lists boundary_seed, the one field that counts only with them
    return ModelConfig(attention=attention, boundaries="random", kv_dim=16 if attention == "iso_kv" else None)


def grid_fields(kind: str) -> tuple[str, ...]:
    """The model fields a grid of `kind` may list: those in that kind's variant identity."""
    return tuple(name for name, _, _ in variant_fields(_example(kind)) if name not in NOT_IN_A_GRID)


def _all_fields() -> tuple[str, ...]:
    names = {name for kind in ("attamba", *BASELINES) for name in grid_fields(kind)} | set(NOT_IN_A_GRID)
    return tuple(sorted(names))


@dataclass(frozen=True)
class Grid:
    where: str                                   # its place in the study file: "attamba[1]", "baselines[0]"
    kind: str                                    # attamba | full | swa | iso_kv | iso_flop
    axes: tuple[tuple[str, tuple], ...] = ()     # (field path, values), in file order
    sizes: tuple[str, ...] | None = None         # None: every size of the study
    of: tuple[tuple[str, tuple], ...] = ()       # iso baselines: the Attamba values they are sized from (): all
    seq_lens: tuple[int, ...] | None = None      # None: every sequence length of the study (its `seq_lens`)

    def sized_from(self, model: ModelConfig) -> bool:
        """Whether an iso baseline of this grid is sized from the Attamba `model`."""
        return all(_field(model, name) in values for name, values in self.of)

    def points(self) -> list[dict]:
        """One {field path: value} per member of the product of the axes."""
        names = [name for name, _ in self.axes]
        return [dict(zip(names, values)) for values in itertools.product(*(v for _, v in self.axes))]

    def runs_at(self, size: str, seq_len: int | None = None) -> bool:
        """Whether the grid runs at this setting: its `sizes` hold the size and its `seq_lens` the length."""
        return ((self.sizes is None or size in self.sizes)
                and (self.seq_lens is None or seq_len is None or seq_len in self.seq_lens))


def _values(where: str, value) -> tuple:
    if isinstance(value, (list, tuple)):
        if not value:
            fail(where, [], "a non-empty list of values", "remove the field to keep the run config's value")
        for j, v in enumerate(value):
            if isinstance(v, (list, tuple, dict)):
                fail(f"{where}[{j}]", v, "a single value", f"list the values of {where} in one flat list")
        return tuple(value)
    if isinstance(value, dict):
        fail(where, value, "a list of values (or one value)", f"e.g. {where.split('.', 1)[-1]}: [a, b]")
    return (value,)


def _grid(where: str, kind: str, data: dict, study_sizes: tuple[str, ...]) -> Grid:
    if not isinstance(data, dict):
        fail(where, data, "a mapping of model fields to lists of values", "e.g. {chunk_size: [4, 8]}")
    allowed = grid_fields(kind)
    axes, sizes, of, seq_lens = [], None, (), None
    for key, value in data.items():
        path = f"{where}.{key}"
        if key == KIND_KEY and where.startswith("baselines"):
            continue
        if key == OF_KEY and kind.startswith("iso_"):
            of = _of(path, value)
            continue
        if key == SIZES_KEY:
            sizes = _values(path, value)
            for j, size in enumerate(sizes):
                if size not in study_sizes:
                    fail(f"{path}[{j}]", size, f"one of the study's sizes ({', '.join(study_sizes)})",
                         "add it to the study's `sizes` or remove it here")
            continue
        if key == SEQ_LENS_KEY:
            seq_lens = _values(path, value)
            for j, T in enumerate(seq_lens):
                at_least(f"{path}[{j}]", T, 2, integer=True)
            continue
        if not isinstance(key, str) or key not in allowed:
            _refuse_field(where, kind, key, allowed)
        axes.append((key, _values(path, value)))
    return Grid(where, kind, tuple(axes), sizes, of, seq_lens)


def _of(where: str, value) -> tuple[tuple[str, tuple], ...]:
    if not isinstance(value, dict) or not value:
        fail(where, value, "a mapping of Attamba fields to lists of values",
             "e.g. of: {chunk_size: [8], leading_tokens: [8]}")
    allowed = grid_fields("attamba")
    for key in value:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{where}.{key}: unknown Attamba field {key!r}; {hint}`of` may list "
                             f"{', '.join(allowed)}")
    return tuple((key, _values(f"{where}.{key}", v)) for key, v in value.items())


def _field(model: ModelConfig, path: str):
    return getattr(model.ssm, path[len("ssm."):]) if path.startswith("ssm.") else getattr(model, path)


def _refuse_field(where: str, kind: str, key, allowed: tuple[str, ...]):
    path = f"{where}.{key}"
    if key in NOT_IN_A_GRID:
        raise ValueError(f"{path}: a grid cannot list {key}; {NOT_IN_A_GRID[key]}")
    if key in _all_fields():
        other = "attamba" if key in grid_fields("attamba") else "a baseline that reads it"
        raise ValueError(f"{path}: {_a(kind)} model does not read {key}, so it would not change the run; "
                         f"list it under {other}")
    extra = (SIZES_KEY, SEQ_LENS_KEY, KIND_KEY) if where.startswith("baselines") else (SIZES_KEY, SEQ_LENS_KEY)
    close = difflib.get_close_matches(str(key), (*allowed, *extra), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"{path}: unknown model field {key!r}; {hint}{_a(kind)} grid may list {', '.join(allowed)} "
                     f"and {SIZES_KEY}, {SEQ_LENS_KEY}")


def attamba_grids(value, study_sizes: tuple[str, ...]) -> list[Grid]:
    """The `attamba:` entry: one mapping, or a list of mappings (their products are joined)."""
    if isinstance(value, dict):
        return [_grid("attamba", "attamba", value, study_sizes)]
    if isinstance(value, (list, tuple)) and value:
        return [_grid(f"attamba[{i}]", "attamba", g, study_sizes) for i, g in enumerate(value)]
    fail("attamba", value, "a mapping of model fields to lists of values, or a non-empty list of such mappings",
         "e.g. attamba: {chunk_size: [4, 8], kv_proj: [false, true]}")


def baseline_grids(value, study_sizes: tuple[str, ...]) -> list[Grid]:
    """The `baselines:` entries: a kind, or a mapping with `kind` and model fields."""
    if not isinstance(value, (list, tuple)):
        fail("baselines", value, f"a list of baseline kinds ({', '.join(BASELINES)}) or mappings with a `kind`")
    grids = []
    for i, entry in enumerate(value):
        where = f"baselines[{i}]"
        plain = not isinstance(entry, dict)
        if plain:
            entry = {KIND_KEY: entry}   # a kind alone: that baseline with the run's model fields
        elif KIND_KEY not in entry:
            fail(where, entry, f"a mapping with a `{KIND_KEY}` ({', '.join(BASELINES)})",
                 "e.g. {kind: swa, window: [17, 33]}")
        kind = one_of(where if plain else f"{where}.{KIND_KEY}", entry[KIND_KEY], BASELINES, what="baseline")
        grids.append(_grid(where, kind, entry, study_sizes))
    return grids


def with_point(model: dict, point: dict) -> dict:
    """A model dict (as in a run config) with a grid point's fields set; "ssm.x" sets model["ssm"]["x"]."""
    model = {**model, "ssm": dict(model.get("ssm") or {})}
    for path, value in point.items():
        if path.startswith("ssm."):
            model["ssm"][path[len("ssm."):]] = value
        else:
            model[path] = value
    return model


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
