"""Settings digests and merging: what each method run depends on, and finished runs made one.

Every record carries the digest of the settings its method depends on (:func:`settings_digest`), so a
run resumes only what the same settings made, and runs of one experiment made in separate folders
(seeds side by side, a method rerun later) merge into one (:func:`merge_runs`) only where they agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from fedbe.errors import ConfigError
from fedbe_sim.bench.report import write_results
from fedbe_sim.bench.settings import (
    ALL_METHODS,
    BLOCK_METHODS,
    LORA_METHODS,
    NEW_BLOCK_METHODS,
    BenchSettings,
    method_placement,
)
from fedbe_sim.bench.stats import by_method

# A baseline's digest must not change with FedBE's knobs: the settings only the block methods read (the
# LoRA methods and full FT train with lora_lr / full_ft_lr, lora_lr_decay and lora_distill_lambda, and
# have no allocation, blocks or server step), at the values they hold in every other method's digest
# (the defaults when the baselines' first records were made, so those records keep their digest).
PINNED_FOR_BASELINES: dict[str, Any] = {
    "lr": 2e-3, "lr_decay": 0.5, "distill_lambda": 3.0, "deadline_factor": 0.6,
    "max_block_divergence": 0.3, "label_balance": False, "block_average": "round", "server_lr": 1.0,
}  # fmt: skip

# The methods that read each setting only some methods read: another method's digest leaves it out
# (or pins it, PINNED_FOR_BASELINES), and a merged run takes it from its readers' runs (merge_runs).
READ_ONLY_BY: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(PINNED_FOR_BASELINES, NEW_BLOCK_METHODS),
    "lora_base": LORA_METHODS,
    **dict.fromkeys(("dp_noise_multiplier", "dp_clip_norm", "dp_delta"), NEW_BLOCK_METHODS),
}

# Adding a setting must not orphan the records made before it: each setting added later, at the value
# every earlier run had. At that value it stays out of the digest, so the earlier records keep theirs,
# and a results.json without it reads as that value (settings_from_dict).
DEFAULTS_BEFORE_ADDED: dict[str, Any] = {
    "final_probe_questions": 0,  # no final probe
    "lora_base": "plain",  # the LoRA methods' base as loaded
}


def settings_digest(settings: BenchSettings, method: str | None = None) -> str:
    """What a method run depends on (everything but the list of methods and seeds).

    The placement counts only where ``method`` uses it, and only when it is not interleave (every run
    before the setting existed), so LoRA records and earlier interleave records keep their digest.
    The block-only settings (:data:`PINNED_FOR_BASELINES`) count only for the block methods.
    """
    import hashlib  # noqa: PLC0415

    data = digested_settings(settings, method)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def digested_settings(settings: BenchSettings, method: str | None = None) -> dict[str, Any]:
    """The settings :func:`settings_digest` hashes for ``method`` (None: every setting any method reads)."""
    data = asdict(settings)
    del data["methods"], data["seeds"], data["placement"]
    placement = settings.placement if method is None else method_placement(settings, method)
    if placement not in (None, "interleave"):
        data["placement"] = placement
    for key, readers in READ_ONLY_BY.items():
        if method is not None and method not in readers:
            if key in PINNED_FOR_BASELINES:
                data[key] = PINNED_FOR_BASELINES[key]
            else:
                del data[key]
    for key, before in DEFAULTS_BEFORE_ADDED.items():
        if key in data and data[key] == before:
            del data[key]
    # DP off (every run before it existed): its settings change nothing, so they stay out of the digest
    if data.get("dp_noise_multiplier") is None:
        for key in ("dp_noise_multiplier", "dp_clip_norm", "dp_delta"):
            data.pop(key, None)
    return data


def settings_from_dict(data: dict[str, Any], where: str) -> BenchSettings:
    """The :class:`BenchSettings` a results.json was written with (lists back to tuples); a setting this
    fedbe does not know is refused (the file was written by another version)."""
    known = {f.name for f in fields(BenchSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown bench setting(s) {', '.join(unknown)}: written by another fedbe "
                          "version; merge runs of one version")  # fmt: skip
    try:
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        # a run from before a setting existed ran its old value
        for key, before in DEFAULTS_BEFORE_ADDED.items():
            values.setdefault(key, before)
        return BenchSettings(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: its settings are not valid bench settings ({e})") from None


def load_run(path: Path) -> tuple[BenchSettings, list[dict[str, Any]]]:
    """Settings and finished method runs of one ``fedbe bench`` run: its ``--out`` folder or its results.json."""
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            f"{path}: no results.json there; give a finished `fedbe bench --out` folder or its results.json "
            "(a stopped run's records.jsonl become a results.json when the same bench command is run again: "
            "it resumes and trains only what is missing)"
        )
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not readable as JSON ({e})") from None
    if not (isinstance(data, dict) and isinstance(data.get("settings"), dict)
            and isinstance(data.get("records"), list)):  # fmt: skip
        raise ConfigError(f"{file}: not a fedbe bench results.json (it needs 'settings' and 'records')")
    settings = settings_from_dict(data["settings"], str(file))
    records = data["records"]
    for i, rec in enumerate(records):
        if not (isinstance(rec, dict) and isinstance(rec.get("method"), str) and isinstance(rec.get("seed"), int)
                and isinstance(rec.get("rounds"), list)):  # fmt: skip
            raise ConfigError(f"{file}: record {i} is not a method run (method, seed, rounds)")
    return settings, records


def settings_differences(first: BenchSettings, other: BenchSettings, method: str) -> str:
    """``"key: first against other, ..."`` for each setting ``method``'s digest holds that differs."""
    a, b = digested_settings(first, method), digested_settings(other, method)
    differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)!r} against {b.get(k)!r}" for k in differ)


def merge_runs(runs: Sequence[tuple[str, BenchSettings, list[dict[str, Any]]]]
               ) -> tuple[BenchSettings, list[dict[str, Any]]]:  # fmt: skip
    """One run out of several ``(name, settings, records)`` runs of the same experiment, for example
    seeds run side by side in separate folders: every record must carry its run's settings digest, each
    method the same digest in every run (the settings that method depends on agree), and a
    (method, seed) pair may come from one run only. The merged settings are those of the first run
    that holds a block method (else the first run), each setting only some methods read
    (:data:`READ_ONLY_BY`) taken from the runs of those methods, with every method and seed.
    """
    if not runs:
        raise ConfigError("nothing to merge: give at least one run")
    digests: dict[str, tuple[str, str, BenchSettings]] = {}
    seen: dict[tuple[str, int], str] = {}
    merged: list[dict[str, Any]] = []
    for name, settings, records in runs:
        for rec in records:
            method, seed = rec["method"], rec["seed"]
            digest = settings_digest(settings, method)
            if rec.get("settings_digest", digest) != digest:
                raise ConfigError(f"{name}: the {method} run of seed {seed} was not made with the settings in "
                                  "its results.json (its settings digest differs); the file was edited or "
                                  "mixes runs, so it can not be merged")  # fmt: skip
            if method in digests and digests[method][0] != digest:
                raise ConfigError(
                    f"{method} ran under different settings in {digests[method][1]} and {name} ("
                    + settings_differences(digests[method][2], settings, method)
                    + "): their seeds are not one experiment; merge only runs of the same settings"
                )
            digests.setdefault(method, (digest, name, settings))
            if (method, seed) in seen:
                raise ConfigError(f"{method} seed {seed} is in both {seen[(method, seed)]} and {name}: "
                                  "keep one of them (give the other run without it)")  # fmt: skip
            seen[(method, seed)] = name
            merged.append(rec)
    methods = tuple(dict.fromkeys(rec["method"] for rec in merged))
    seeds = tuple(sorted({rec["seed"] for rec in merged}))
    lead = next((s for _, s, recs in runs if any(r["method"] in BLOCK_METHODS for r in recs)), runs[0][1])
    # a setting only some methods read comes from their runs: another method's run may carry any value
    # of it (one from before the setting existed, for example), which that method never depended on
    for key, readers in READ_ONLY_BY.items():
        values = {getattr(settings, key) for m, (_, _, settings) in digests.items() if m in readers}
        if len(values) == 1:
            lead = replace(lead, **{key: values.pop()})
    # the merged results.json holds one set of settings: every method must have run under them, or the
    # merged run could not be read back (nor merged again, nor resumed)
    for method, (digest, name, settings) in digests.items():
        if settings_digest(lead, method) != digest:
            raise ConfigError(
                f"{method} in {name} ran under other settings than the merged run's ("
                + settings_differences(settings, lead, method)
                + "), settings every method depends on; merge only runs that agree on them"
            )
    merged.sort(key=lambda r: (r["seed"], methods.index(r["method"])))
    return replace(lead, methods=methods, seeds=seeds), merged


def split_run_argument(text: str | Path) -> tuple[Path, tuple[str, ...]]:
    """``RUN`` or ``RUN::METHODS`` (comma-separated) of ``fedbe bench-merge``: the run and the methods to
    take from it (empty: all)."""
    path, sep, names = str(text).partition("::")
    if not sep:
        return Path(path), ()
    methods = tuple(m.strip() for m in names.split(",") if m.strip())
    unknown = [m for m in methods if m not in ALL_METHODS]
    if not methods or unknown:
        what = f"; unknown: {', '.join(unknown)}" if unknown else ""
        raise ConfigError(f"{text}: after '::' give comma-separated bench methods to take from that run "
                          f"({', '.join(ALL_METHODS)}){what}")  # fmt: skip
    return Path(path), methods


def merge_bench(paths: Sequence[Path | str], out: Path, command: str = "fedbe bench-merge",
                say: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Load, check and merge finished bench runs (:func:`merge_runs`) and write them as one run to ``out``.
    A path written ``RUN::METHODS`` contributes only those methods (:func:`split_run_argument`)."""
    chosen = [split_run_argument(p) for p in paths]
    for p, _ in chosen:
        if (p if p.is_dir() else p.parent).resolve() == out.resolve():
            raise ConfigError(
                f"--out {out} is one of the runs to merge; write the merged run to a new folder"
            )
    runs = []
    for p, methods in chosen:
        settings, records = load_run(p)
        if methods:
            missing = [m for m in methods if not any(r["method"] == m for r in records)]
            if missing:
                raise ConfigError(f"{p} holds no finished {', '.join(missing)} run; it has "
                                  f"{', '.join(dict.fromkeys(r['method'] for r in records)) or 'none'}")  # fmt: skip
            records = [r for r in records if r["method"] in methods]
        runs.append((str(p), settings, records))
    settings, records = merge_runs(runs)
    if not records:
        raise ConfigError("the runs given hold no finished method runs; nothing to merge")
    base = next((r["round0"] for r in records if r.get("round0")), None)
    if base is None:
        raise ConfigError(
            "no record holds the base model's scores (round0); were these runs written by fedbe bench?"
        )
    out.mkdir(parents=True, exist_ok=True)
    with (out / "records.jsonl").open("w") as handle:
        for rec in records:
            handle.write(json.dumps(rec) + "\n")
    say(f"merged {len(records)} method run(s) from {len(runs)} run(s): methods {', '.join(settings.methods)}, "
        f"seeds {', '.join(map(str, settings.seeds))}")  # fmt: skip
    seeds_of = {m: sorted(r["seed"] for r in recs) for m, recs in by_method(records).items()}
    if len({tuple(v) for v in seeds_of.values()}) > 1:
        say("warning: the methods ran on different seeds ("
            + "; ".join(f"{m} {','.join(map(str, v))}" for m, v in seeds_of.items())
            + "): each row of the table averages its own seeds; the paired comparison uses the seeds "
            "in common")  # fmt: skip
    return write_results(records, base, settings, out, command, say)
