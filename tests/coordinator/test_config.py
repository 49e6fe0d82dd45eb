"""The run configuration: every field validated with file, dotted field and value in the message."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from coordinator.config import (
    EXAMPLE_FILE,
    AggregationConfig,
    AllocationConfig,
    AutoExpansionConfig,
    BrokerSettings,
    HttpSettings,
    RunConfig,
    ServerEvalConfig,
    ServerOptimizer,
    Strategy,
    config_digest,
    example_config_yaml,
    load_run_config,
    parse_run_config,
)
from coordinator.privacy import PrivacyPolicy
from fedbe.compression import Level
from fedbe.errors import ConfigError
from fedbe.recipe import Recipe

DOCS = Path(__file__).parents[2] / "docs" / "coordinator-config.md"
BASE = {"model": "tiny:llama", "state_dir": "state"}


def write(folder: Path, data: object) -> Path:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def with_field(dotted: str, value: object) -> dict[str, object]:
    data: dict[str, object] = {k: v for k, v in BASE.items() if k != dotted}
    if "." in dotted:
        section, name = dotted.split(".")
        data[section] = {name: value}
    elif value is not ...:
        data[dotted] = value
    return data


BAD_VALUES = [
    ("federation", "a/b"),
    ("federation", 7),
    ("model", 3),
    ("model", ""),
    ("state_dir", ["x"]),
    ("blocks", 0),
    ("blocks", -2),
    ("blocks", True),
    ("blocks", 2.5),
    ("blocks", "many"),
    ("placement", [1, 1]),
    ("placement", []),
    ("placement", [-1, 2]),
    ("placement", [1, True]),
    ("placement", "4,x"),
    ("placement", "sideways"),
    ("placement", {"a": 1}),
    ("rounds", 0),
    ("rounds", True),
    ("rounds", "3"),
    ("rounds", 2.0),
    ("clients_per_round", 0),
    ("min_clients", 0),
    ("min_clients", 5),
    ("round_deadline_seconds", 0),
    ("round_deadline_seconds", -1.5),
    ("round_deadline_seconds", "soon"),
    ("round_deadline_seconds", float("inf")),
    ("late_updates", "queue"),
    ("staleness_decay", 0),
    ("staleness_decay", 1.5),
    ("upload_level", "int4"),
    ("download_level", "int4"),
    ("seed", -1),
    ("eval_every", -1),
    ("training.steps", 0),
    ("training.lr", 0),
    ("training.lr", True),
    ("training.lr", 2.0),
    ("training.batch_size", 0),
    ("training.max_tokens", 4),
    ("training.distill_lambda", -0.1),
    ("training.distill_lambda", []),
    ("training.distill_lambda", [6, -1]),
    ("training.distill_lambda", [6, "x"]),
    ("training.distill_lambda", [True]),
    ("training.distill_sample", -1),
    ("training.distill_rows", -2),
    ("training.weight_decay", -1),
    ("training.max_grad_norm", -1),
    ("training.label_balance", "yes"),
    ("training.lr_decay", 0),
    ("training.lr_decay", 1.5),
    ("training.lr_decay", True),
    ("labels", "business"),
    ("labels", ["a", "a"]),
    ("labels", ["a", ""]),
    ("labels", ["a", 3]),
    ("labels", ["x"] * 2 + [f"l{i}" for i in range(1024)]),
    ("allocation.strategy", "greedy"),
    ("allocation.top_risk", 1.5),
    ("allocation.interleaved_risk", -0.1),
    ("allocation.max_unprotected_risk", 2),
    ("allocation.cost_weight", -0.5),
    ("allocation.risk_weight", -1),
    ("allocation.max_block_divergence", 1.5),
    ("allocation.deadline_factor", 0),
    ("allocation.deadline_factor", "fast"),
    ("aggregation.server_optimizer", "sgd"),
    ("aggregation.server_lr", 0),
    ("aggregation.momentum", 1.0),
    ("aggregation.beta1", -0.1),
    ("aggregation.beta2", 1),
    ("aggregation.tau", 0),
    ("aggregation.norm_bound_factor", 0.5),
    ("aggregation.block_average", "blocks"),
    ("auto_expansion.trainers_per_block", 0),
    ("auto_expansion.max_blocks", 0),
    ("auto_expansion.plateau_rounds", -1),
    ("auto_expansion.plateau_min_delta", -1),
    ("broker.url", "http://host:1883"),
    ("broker.url", "mqtt://host:99999"),
    ("broker.username", ""),
    ("broker.require_tls", "yes"),
    ("broker.max_message_bytes", 10),
    ("server_eval.dataset", "imdb"),
    ("server_eval.examples", 0),
    ("server_eval.probe_questions", -1),
    ("server_eval.probe_texts", 1.5),
    ("server_eval.baseline", "yes"),
    ("server_eval.precision", "fp8"),
]


@pytest.mark.parametrize(("dotted", "value"), BAD_VALUES, ids=[f"{d}={v!r}" for d, v in BAD_VALUES])
def test_bad_value_names_file_field_and_value(tmp_path: Path, dotted: str, value: object) -> None:
    path = write(tmp_path, with_field(dotted, value))
    with pytest.raises(ConfigError) as caught:
        load_run_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert dotted in message
    assert repr(value) in message
    assert message.rstrip().endswith(".")  # a sentence on what to do follows the problem


@pytest.mark.parametrize(
    "dotted",
    [
        "roundz",
        "training.epochs",
        "allocation.x",
        "aggregation.lr",
        "auto_expansion.y",
        "broker.port",
        "server_eval.z",
    ],
)
def test_unknown_field_at_any_level(tmp_path: Path, dotted: str) -> None:
    path = write(tmp_path, with_field(dotted, 3))
    with pytest.raises(ConfigError, match=re.escape(f"unknown field '{dotted}' (value 3)")) as caught:
        load_run_config(path)
    assert str(path) in str(caught.value)


def test_unknown_field_suggests_the_close_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Did you mean 'steps'"):
        load_run_config(write(tmp_path, with_field("training.stepz", 3)))


@pytest.mark.parametrize("missing", ["model", "state_dir"])
def test_required_fields(tmp_path: Path, missing: str) -> None:
    path = write(tmp_path, with_field(missing, ...))
    with pytest.raises(ConfigError, match=f"required field {missing} is missing") as caught:
        load_run_config(path)
    assert str(path) in str(caught.value)


def test_missing_field_points_at_a_misspelling(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Is 'modle' a misspelling"):
        load_run_config(write(tmp_path, {"modle": "tiny:llama", "state_dir": "s"}))


@pytest.mark.parametrize(
    ("data", "field", "snippet"),
    [
        ({**BASE, "training": 5}, "training", "section 'training' must be a mapping"),
        ({**BASE, "server_eval": [1]}, "server_eval", "section 'server_eval' must be a mapping"),
        ({**BASE, "blocks": 3, "placement": [1, 2]}, "blocks", "disagrees with placement [1, 2]"),
        ({**BASE, "blocks": "auto", "placement": [1, 2]}, "blocks", "can not be auto with a placement list"),
        (
            {**BASE, "placement": [1], "auto_expansion": {"plateau_rounds": 2}, "eval_every": 1},
            "plateau",
            "top",
        ),
        (
            {**BASE, "auto_expansion": {"plateau_rounds": 2}},
            "auto_expansion.plateau_rounds",
            "accuracy to watch",
        ),
        ({**BASE, "broker": {"require_tls": True}}, "broker.require_tls", "needs TLS"),
        (
            {**BASE, "broker": {"password_file": "missing.txt", "username": "u"}},
            "password_file",
            "missing.txt",
        ),
        ({**BASE, "broker": {"tls_ca": "nope.pem"}}, "broker.tls_ca", "names no existing file"),
        ([1, 2], "top level", "must be a mapping"),
    ],
)
def test_structural_and_cross_field_errors(tmp_path: Path, data: object, field: str, snippet: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_run_config(path)
    message = str(caught.value)
    assert str(path) in message and field in message and snippet in message


def test_password_file_needs_a_username(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("secret\n")
    with pytest.raises(ConfigError, match="broker.username is needed with a password_file"):
        load_run_config(write(tmp_path, {**BASE, "broker": {"password_file": "pw"}}))


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(ConfigError, match="state_dir is a file"):
        load_run_config(write(tmp_path, BASE))


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="can not read the run configuration"):
        load_run_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: not valid YAML")):
        load_run_config(bad)


def test_defaults(tmp_path: Path) -> None:
    cfg = load_run_config(write(tmp_path, BASE))
    assert cfg == RunConfig(model="tiny:llama", state_dir=tmp_path / "state")
    assert cfg.blocks == "auto" and cfg.upload_level is Level.INT8 and cfg.download_level is Level.INT8
    assert cfg.min_clients <= cfg.clients_per_round and cfg.server_eval is None
    # the FedBE configuration `fedbe bench` chose on its validation split (README, retention
    # mechanisms); lr, lr_decay and steps depend on the run's length and are not the bench's
    assert cfg.placement == "interleave-mid-top"
    t = cfg.training
    assert (t.distill_lambda, t.distill_top_k, t.distill_sample, t.distill_rows) == ((3.0,), 32, 128, 1)
    assert t.label_balance and cfg.labels == () and cfg.allocation.deadline_factor is None
    assert cfg.allocation.max_block_divergence == 1.0 and cfg.aggregation.block_average == "round"


@pytest.mark.parametrize("name", ["interleave", "interleave-mid-top", "middle", "top"])
def test_every_named_placement_is_accepted(tmp_path: Path, name: str) -> None:
    assert load_run_config(write(tmp_path, {**BASE, "placement": name})).placement == name
    assert load_run_config(write(tmp_path, {**BASE, "placement": f" {name} "})).placement == name


def test_every_field_is_read(tmp_path: Path) -> None:
    """A config that sets every field to a non-default value comes back with exactly those values."""
    (tmp_path / "pw.txt").write_text("s3cret\nignored\n")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    data = {
        "federation": "lab-1",
        "model": "smollm2-135m",
        "state_dir": "/abs/state",
        "blocks": 3,
        "placement": "top",
        "rounds": 7,
        "clients_per_round": 6,
        "min_clients": 3,
        "round_deadline_seconds": 90,
        "late_updates": "fold",
        "staleness_decay": 0.25,
        "upload_level": "bf16",
        "download_level": "fp16",
        "labels": ["tech", "business"],
        "seed": 11,
        "eval_every": 2,
        "training": {
            "steps": 3,
            "lr": 1e-3,
            "batch_size": 2,
            "max_tokens": 64,
            "distill_lambda": 0.5,
            "distill_sample": 16,
            "distill_rows": 2,
            "lr_decay": 0.5,
            "weight_decay": 0.01,
            "max_grad_norm": 2.0,
            "distill_top_k": 8,
            "label_balance": False,
        },
        "allocation": {
            "strategy": "random",
            "top_risk": 0.9,
            "interleaved_risk": 0.2,
            "max_unprotected_risk": 0.3,
            "cost_weight": 0.4,
            "risk_weight": 2,
            "max_block_divergence": 0.4,
            "deadline_factor": 0.6,
        },
        "aggregation": {
            "server_optimizer": "fedadam",
            "server_lr": 0.5,
            "momentum": 0.8,
            "beta1": 0.7,
            "beta2": 0.95,
            "tau": 0.01,
            "norm_bound_factor": 4,
            "block_average": "trainers",
        },
        "auto_expansion": {
            "trainers_per_block": 3,
            "max_blocks": 5,
            "plateau_rounds": 4,
            "plateau_min_delta": 0,
        },
        "broker": {
            "url": "mqtts://broker.lan:8883",
            "username": "coord",
            "password_file": "pw.txt",
            "tls_ca": "ca.pem",
            "require_tls": True,
            "max_message_bytes": 100000,
        },
        "server_eval": {
            "dataset": "bbc-news",
            "examples": 12,
            "probe_questions": 8,
            "probe_texts": 4,
            "baseline": True,
            "precision": "bf16",
        },
    }
    cfg = load_run_config(write(tmp_path, data))
    assert cfg == RunConfig(
        federation="lab-1",
        model="smollm2-135m",
        state_dir=Path("/abs/state"),
        blocks=3,
        placement="top",
        rounds=7,
        clients_per_round=6,
        min_clients=3,
        round_deadline_seconds=90.0,
        late_updates="fold",
        staleness_decay=0.25,
        upload_level=Level.BF16,
        download_level=Level.FP16,
        labels=("business", "tech"),
        seed=11,
        eval_every=2,
        training=Recipe(
            steps=3, lr=1e-3, lr_decay=0.5, batch_size=2, max_tokens=64, weight_decay=0.01, max_grad_norm=2.0,
            distill_lambda=0.5, distill_top_k=8, distill_sample=16, distill_rows=2, label_balance=False,
        ),  # fmt: skip
        allocation=AllocationConfig(Strategy.RANDOM, 0.9, 0.2, 0.3, 0.4, 2.0, 0.4, 0.6),
        aggregation=AggregationConfig(ServerOptimizer.FEDADAM, 0.5, 0.8, 0.7, 0.95, 0.01, 4.0, "trainers"),
        auto_expansion=AutoExpansionConfig(3.0, 5, 4, 0.0),
        broker=BrokerSettings(
            "mqtts://broker.lan:8883", "coord", tmp_path / "pw.txt", tmp_path / "ca.pem", True, 100000
        ),
        server_eval=ServerEvalConfig("bbc-news", 12, 8, 4, True, "bf16"),
    )
    assert cfg.broker.read_password() == "s3cret"


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "conf"
    (folder / "secrets").mkdir(parents=True)
    (folder / "secrets" / "pw").write_text("x")
    (folder / "ca.pem").write_text("ca")
    (folder / "base").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = {
        "model": "base",
        "state_dir": "runs/one",
        "broker": {"username": "u", "password_file": "secrets/pw", "tls_ca": "ca.pem"},
    }
    cfg = load_run_config(Path("..") / "conf" / write(folder, data).name)
    assert cfg.state_dir == folder / "runs" / "one"
    assert cfg.broker.password_file == folder / "secrets" / "pw"
    assert cfg.broker.tls_ca == folder / "ca.pem"
    assert cfg.model == str(folder / "base")  # an existing folder next to the config
    hub = load_run_config(write(folder, {"model": "HuggingFaceTB/SmolLM2-135M", "state_dir": "s"}))
    assert hub.model == "HuggingFaceTB/SmolLM2-135M"  # no such folder there: a source name, untouched


def test_server_lr_default_depends_on_the_optimizer(tmp_path: Path) -> None:
    adam = parse_run_config({**BASE, "aggregation": {"server_optimizer": "fedadam"}}, "a.yaml", tmp_path)
    assert adam.aggregation.server_lr == 0.01
    assert parse_run_config(BASE, "b.yaml", tmp_path).aggregation.server_lr == 1.0


def test_placement_forms(tmp_path: Path) -> None:
    cfg = load_run_config(write(tmp_path, {**BASE, "placement": "9,4,14"}))
    assert cfg.placement == (4, 9, 14) and cfg.blocks == 3
    cfg = load_run_config(write(tmp_path, {**BASE, "placement": [2, 0], "blocks": 2}))
    assert cfg.placement == (0, 2) and cfg.blocks == 2


def test_example_config_loads_and_lists_every_field(tmp_path: Path) -> None:
    assert example_config_yaml() == EXAMPLE_FILE.read_text(encoding="utf-8")
    cfg = load_run_config(EXAMPLE_FILE)
    assert cfg.state_dir == EXAMPLE_FILE.parent / "runs" / "example"
    listed = yaml.safe_load(example_config_yaml())
    found = set()
    for key, value in listed.items():
        found |= {f"{key}.{name}" for name in value} if isinstance(value, dict) else {key}
    expected = _dotted_fields(RunConfig)
    # server_eval and privacy are null in the example (their fields are shown in the comment)
    optional = ("server_eval", "privacy")
    assert found == {f for f in expected if f.split(".")[0] not in optional} | set(optional)
    # documented in the docstring and in the docs table, field by field
    docs = DOCS.read_text(encoding="utf-8")
    missing_docs = sorted(f for f in expected if f"`{f}`" not in docs)
    assert not missing_docs, f"docs/coordinator-config.md lacks {missing_docs}"
    import coordinator.config as module

    doc = module.__doc__ or ""
    undocumented = sorted(f for f in expected if f"``{f.split('.')[-1]}" not in doc)
    assert not undocumented, f"module docstring lacks {undocumented}"


def _dotted_fields(cls: type) -> set[str]:
    names = set()
    nested = {"training": Recipe, "allocation": AllocationConfig, "aggregation": AggregationConfig}
    nested |= {
        "auto_expansion": AutoExpansionConfig,
        "broker": BrokerSettings,
        "http": HttpSettings,
        "server_eval": ServerEvalConfig,
        "privacy": PrivacyPolicy,
    }
    for f in dataclasses.fields(cls):
        if f.name in nested:
            names |= {f"{f.name}.{g.name}" for g in dataclasses.fields(nested[f.name])}
        else:
            names.add(f.name)
    return names


def test_digest_is_stable_and_tracks_what_the_run_trains(tmp_path: Path) -> None:
    a = parse_run_config({**BASE, "training": {"lr": 1e-4}}, "a.yaml", tmp_path)
    b = parse_run_config({**BASE, "training": {"lr": 1e-4}}, "b.yaml", tmp_path)
    assert config_digest(a) == config_digest(b)
    assert re.fullmatch(r"[0-9a-f]{16}", config_digest(a))
    (tmp_path / "pw").write_text("x")
    moved = {**BASE, "training": {"lr": 1e-4}, "state_dir": "/elsewhere"}
    moved["broker"] = {"url": "mqtt://other:1883", "username": "u", "password_file": "pw"}
    assert config_digest(parse_run_config(moved, "c.yaml", tmp_path)) == config_digest(a)
    for change in ({"training": {"lr": 2e-4}}, {"training": {"lr": 1e-4, "steps": 11}}, {"rounds": 21}):
        other = parse_run_config({**BASE, "training": {"lr": 1e-4}, **change}, "d.yaml", tmp_path)
        assert config_digest(other) != config_digest(a), change


def test_probe_counts_come_together(tmp_path: Path) -> None:
    for one in ({"probe_questions": 5}, {"probe_texts": 5}):
        with pytest.raises(ConfigError, match="Set both"):
            parse_run_config({**BASE, "server_eval": one}, "p.yaml", tmp_path)
    cfg = parse_run_config({**BASE, "server_eval": {}}, "p.yaml", tmp_path)
    assert cfg.server_eval == ServerEvalConfig("bbc-news", 40, 0, 0, False, "fp32")  # old configs: unchanged


def test_a_distill_lambda_list_is_a_per_round_schedule_whose_last_value_holds(tmp_path: Path) -> None:
    cfg = load_run_config(write(tmp_path, with_field("training.distill_lambda", [6, 3])))
    assert cfg.training.distill_lambda == (6.0, 3.0)
    assert [cfg.training.distill_lambda_in_round(r) for r in (1, 2, 3, 9)] == [6.0, 3.0, 3.0, 3.0]
    assert [Recipe(distill_lambda=2.5).distill_lambda_in_round(r) for r in (1, 5)] == [2.5, 2.5]
    assert config_digest(cfg) != config_digest(
        load_run_config(write(tmp_path, with_field("training.distill_lambda", 6)))
    )


def test_a_removed_setting_says_so(tmp_path: Path) -> None:
    for name in ("training.balance_form", "training.identity_pull", "allocation.min_steps_fraction"):
        with pytest.raises(ConfigError, match=re.escape(f"{name} is no longer a setting")):
            load_run_config(write(tmp_path, with_field(name, 1)))
    with pytest.raises(ConfigError, match="it is the top-level field labels"):
        load_run_config(write(tmp_path, with_field("training.labels", ["a"])))


def test_the_round_lr_decays_from_the_configured_lr_and_is_constant_by_default() -> None:
    assert [Recipe(lr=2e-3, lr_decay=0.5).lr_in_round(r) for r in (1, 2, 3)] == [2e-3, 1e-3, 5e-4]
    assert {Recipe(lr=3e-4).lr_in_round(r) for r in (1, 5, 40)} == {3e-4}


PRIVACY = {"noise_multiplier": 1.0, "clip_norm": 0.1}


def test_the_privacy_section_is_read_with_its_defaults(tmp_path: Path) -> None:
    assert load_run_config(write(tmp_path, BASE)).privacy is None
    cfg = load_run_config(write(tmp_path, {**BASE, "privacy": PRIVACY}))
    assert cfg.privacy == PrivacyPolicy(noise_multiplier=1.0, clip_norm=0.1, delta=1e-5, epsilon_budget=None)
    given = {"noise_multiplier": 0.7, "clip_norm": 2, "delta": 1e-6, "epsilon_budget": 8}
    cfg = load_run_config(write(tmp_path, {**BASE, "privacy": given}))
    assert cfg.privacy == PrivacyPolicy(0.7, 2.0, 1e-6, 8.0)
    assert config_digest(cfg) != config_digest(load_run_config(write(tmp_path, BASE)))


BAD_PRIVACY = [
    ("noise_multiplier", -0.5),
    ("noise_multiplier", float("inf")),
    ("noise_multiplier", True),
    ("clip_norm", 0),
    ("clip_norm", "small"),
    ("delta", 0),
    ("delta", 1),
    ("epsilon_budget", 0),
    ("epsilon_budget", -3),
]


@pytest.mark.parametrize(("name", "value"), BAD_PRIVACY, ids=[f"{n}={v!r}" for n, v in BAD_PRIVACY])
def test_a_bad_privacy_value_names_file_field_and_value(tmp_path: Path, name: str, value: object) -> None:
    path = write(tmp_path, {**BASE, "privacy": {**PRIVACY, name: value}})
    with pytest.raises(ConfigError) as caught:
        load_run_config(path)
    message = str(caught.value)
    assert str(path) in message and f"privacy.{name}" in message and repr(value) in message


@pytest.mark.parametrize(
    ("privacy", "top", "field", "snippet"),
    [
        ({"noise_multiplier": 1.0}, {}, "privacy.clip_norm", "required field"),
        ({"clip_norm": 1.0}, {}, "privacy.noise_multiplier", "required field"),
        (PRIVACY, {"late_updates": "fold"}, "late_updates", "can not be combined with privacy"),
        ({**PRIVACY, "noise_multiplier": 0, "epsilon_budget": 8}, {}, "noise_multiplier", "no privacy"),
        ({**PRIVACY, "sigma": 1}, {}, "privacy.sigma", "unknown field"),
    ],
)
def test_privacy_refuses_what_breaks_its_guarantee(
    tmp_path: Path, privacy: dict[str, object], top: dict[str, object], field: str, snippet: str
) -> None:
    path = write(tmp_path, {**BASE, **top, "privacy": privacy})
    with pytest.raises(ConfigError) as caught:
        load_run_config(path)
    message = str(caught.value)
    assert str(path) in message and field in message and snippet in message
    # clipping without noise is allowed when nothing is asked of epsilon
    clip_only = load_run_config(write(tmp_path, {**BASE, "privacy": {**PRIVACY, "noise_multiplier": 0}}))
    assert clip_only.privacy is not None and clip_only.privacy.noise_multiplier == 0
