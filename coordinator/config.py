"""The coordinator's run configuration: one YAML file, validated once, turned into frozen dataclasses.

:func:`load_run_config` reads the file, :func:`parse_run_config` validates a mapping. Any problem
raises :class:`~fedbe.errors.ConfigError` naming the file, the dotted field path and the value, and
saying what to do; nothing past this module sees a dict. Relative paths (``state_dir``,
``broker.password_file``, ``broker.tls_ca``, ``broker.tls_cert``, ``broker.tls_key``, and ``model``
when it names a file or folder that exists there) are resolved against the config file's folder.
The table with every field's type, default and meaning is ``docs/coordinator-config.md``; an
annotated example is :func:`example_config_yaml` (shipped as ``coordinator/example-run.yaml``).

Fields (``name: type = default``):

* ``federation: str = "default"`` -- federation name, the topic level in ``fedbe/v1/<federation>/...``.
* ``model: str`` (required) -- base model source: ``smollm2-135m``, a HF folder, a ``.gguf`` file, ``tiny:<arch>``.
* ``state_dir: path`` (required) -- checkpoints, pending updates and ``metrics.jsonl`` of this run.
* ``blocks: int >= 1 | "auto" = "auto"`` -- new blocks; ``auto`` sizes from the announced clients.
* ``placement: "interleave" | "interleave-mid-top" | "middle" | "top" | [int, ...] = "interleave-mid-top"`` -- where
  new blocks go (``fedbe.expansion.plan_expansion``; or base-layer indices).
* ``rounds: int >= 1 = 20`` -- rounds to run. ``clients_per_round: int >= 1 = 4`` -- clients asked per round.
* ``min_clients: int in [1, clients_per_round] = 2`` -- fewest updates that make a round count.
* ``round_deadline_seconds: float > 0 = 600`` -- a round closes this long after its tasks go out.
* ``late_updates: "drop" | "fold" = "drop"`` -- an update after its round closed: ignore it, or fold it
  into the next aggregation weighted by ``staleness_decay ** rounds_late``.
* ``staleness_decay: float in (0, 1] = 0.5``. ``seed: int >= 0 = 0`` -- client sampling and allocation.
  ``eval_every: int >= 0 = 0`` -- federated evaluation every N rounds (0 = never).
* ``labels: [str] = []`` -- the federation's labels, if known: tasks carry exactly these, and a client
  announcing any other label is refused with a notice naming it, so one client can not add labels that
  every client's balanced loss then counts; empty = the labels of every accepted client.
* ``download_level: fp32|fp16|bf16|int8 = int8`` -- the precision block weights travel to clients in (a
  client's update is its change from the weights it received, so the global state stays fp32; int8
  sends a quarter of fp32's bytes); ``upload_level`` (same choices, int8) -- how clients send updates.
* ``training`` -- the :class:`fedbe.recipe.Recipe` every task carries; its fields, bounds and defaults
  are declared there, once (``steps``, ``lr``, ``lr_decay``, ``batch_size``, ``max_tokens``,
  ``weight_decay``, ``max_grad_norm``, ``distill_lambda`` (a number or a per-round list),
  ``distill_top_k``, ``distill_sample``, ``distill_rows``, ``label_balance``).
* ``allocation`` (see :mod:`coordinator.allocation`): ``strategy: fedbe|random|all = fedbe``;
  ``top_risk: [0,1] = 1.0`` and ``interleaved_risk: [0,1] = 0.25`` -- forgetting risk of a block at the
  very top of the stack vs one between base layers; ``max_unprotected_risk: [0,1] = 0.5`` -- a client
  without self-distillation never gets a block riskier than this; ``cost_weight: float >= 0 = 0.1`` and
  ``risk_weight: float >= 0 = 0.2`` -- weights of time cost and of risk in the ``fedbe`` score;
  ``max_block_divergence: [0,1] = 1.0`` -- a block whose trainers' pooled label histogram is farther
  (Jensen-Shannon) than this from that of all the round's selected clients is left untrained that
  round (1 = no limit); ``deadline_factor: float > 0 | null = null`` -- plan with this times the median
  selected client's time to train every new block instead of ``round_deadline_seconds`` (slow clients
  then get fewer, higher blocks; ``fedbe bench`` runs 0.6).
* ``aggregation`` (see :mod:`coordinator.aggregation`): ``server_optimizer: none|fedavgm|fedadam =
  none``, ``server_lr: float > 0`` (default 1.0, or 0.01 with fedadam), ``momentum: [0,1) = 0.9``
  (FedAvgM), ``beta1: [0,1) = 0.9``, ``beta2: [0,1) = 0.99``, ``tau: float > 0 = 1e-3`` (FedAdam),
  ``norm_bound_factor: float >= 1 = 10.0`` -- an update whose norm exceeds this times the median
  norm of the round's other updates is rejected; ``block_average: trainers|round = round`` --
  average each block over its trainers, or over every accepted update of the round with a missing
  block counting as zero (then a client that trains more blocks does not outweigh the others).
* ``auto_expansion``: ``trainers_per_block: float > 0 = 2.0`` (``blocks: auto`` uses
  round(sum of the clients' trainable blocks / trainers_per_block) blocks),
  ``max_blocks: int >= 1 | null = null``, ``plateau_rounds: int >= 0 = 0`` (add a block after this
  many rounds without improvement; 0 = never), ``plateau_min_delta:
  float >= 0 = 0.001`` (smallest accuracy gain that counts as improvement).
* ``broker``: ``url: str = "mqtt://127.0.0.1:1883"`` (mqtt:// or mqtts://), ``username: str | null``,
  ``password_file: path | null`` (must exist; first line is the password), ``tls_ca: path | null``,
  ``require_tls: bool = false``, ``max_message_bytes: int >= 65536 = 268435456``, ``tls_cert: path | null``
  and ``tls_key: path | null`` (both or neither: the coordinator's client certificate and key, for a
  broker made with ``broker-config --client-certs``).
* ``server_eval: null``, or ``dataset: "bbc-news"`` and ``examples: int >= 1 = 40`` -- the coordinator
  evaluates the global model itself on held-out examples; ``probe_questions: int >= 0 = 0`` and
  ``probe_texts: int >= 0 = 0`` (both 0, or both >= 1) -- also score the general-ability probes of
  :mod:`fedbe.general_ability` (WordNet definition choice, perplexity on quotations) and their retention;
  ``baseline: bool = false`` -- score the base model once before round 1 (a ``round: 0`` metrics line
  and ``state_dir/baseline.json``), the reference of the retention figures; ``precision:
  nf4|int8|bf16|fp16|fp32 = fp32`` -- the frozen base the coordinator evaluates on (new blocks fp32).
* ``privacy: null``, or client-level differential privacy of the updates (DP-FedAvg,
  :mod:`coordinator.privacy`): ``noise_multiplier: float >= 0`` and ``clip_norm: float > 0`` (both
  required), ``delta: (0, 1) = 1e-5``, ``epsilon_budget: float > 0 | null = null`` -- the run stops,
  as at its last round, before a round that would take epsilon past it. Needs ``late_updates: drop``.

The retention and aggregation defaults are the FedBE configuration ``fedbe bench`` chose on its
validation split; ``steps``, ``lr`` and ``lr_decay`` depend on the run's length and are not the bench's.

:func:`config_digest` hashes everything but ``state_dir`` and ``broker`` (where the run is stored and
how it reaches the broker do not change what it trains), so a resume can check it is the same run.
"""

# Why one module of ~580 lines: the field reference above and the loader that enforces it belong
# together (a test checks every field is documented here and in docs/coordinator-config.md).

from __future__ import annotations

import dataclasses
import difflib
import enum
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn, TypeVar

import yaml

from coordinator.aggregation import BLOCK_AVERAGES
from coordinator.privacy import PrivacyPolicy
from fedbe.compression import Level
from fedbe.device_profile import PRECISIONS
from fedbe.errors import CodecError, ConfigError, ExpansionError
from fedbe.expansion import PLACEMENTS, parse_placement
from fedbe.protocol import DEFAULT_MAX_MESSAGE_BYTES, check_labels, check_name
from fedbe.recipe import Recipe, RecipeError, in_interval, is_real
from fedbe.sources import SMOLLM2, TINY_PREFIX
from fedbe.transport import BrokerConfig

EXAMPLE_FILE = Path(__file__).with_name("example-run.yaml")
LATE_UPDATES = ("drop", "fold")
EVAL_DATASETS = ("bbc-news",)
_REQUIRED = object()
_REJECTED = "measured and rejected, see docs/research.md"
# fields an older configuration may still carry: the error says where each went instead of "unknown"
REMOVED_FIELDS = {
    "training.identity_pull": _REJECTED,
    "training.rehearsal_rows": _REJECTED,
    "training.balance_form": f"the label-balanced loss has one form ({_REJECTED})",
    "training.context_blocks": "clients always run every new block, the ones they do not train frozen",
    "allocation.min_steps_fraction": _REJECTED,
    "training.labels": "it is the top-level field labels",
    "training.task_weights_level": "it is the top-level field download_level",
    "update_level": "it is upload_level",
}
_T = TypeVar("_T")


class Strategy(str, enum.Enum):
    FEDBE = "fedbe"
    RANDOM = "random"
    ALL = "all"


class ServerOptimizer(str, enum.Enum):
    NONE = "none"
    FEDAVGM = "fedavgm"
    FEDADAM = "fedadam"


STRATEGIES = tuple(s.value for s in Strategy)
SERVER_OPTIMIZERS = tuple(o.value for o in ServerOptimizer)


@dataclass(frozen=True)
class AllocationConfig:
    strategy: Strategy = Strategy.FEDBE
    top_risk: float = 1.0
    interleaved_risk: float = 0.25
    max_unprotected_risk: float = 0.5
    cost_weight: float = 0.1
    risk_weight: float = 0.2
    max_block_divergence: float = 1.0
    deadline_factor: float | None = None


@dataclass(frozen=True)
class AggregationConfig:
    server_optimizer: ServerOptimizer = ServerOptimizer.NONE
    server_lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    norm_bound_factor: float = 10.0
    block_average: str = "round"


@dataclass(frozen=True)
class AutoExpansionConfig:
    trainers_per_block: float = 2.0
    max_blocks: int | None = None
    plateau_rounds: int = 0
    plateau_min_delta: float = 0.001


@dataclass(frozen=True)
class BrokerSettings:
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password_file: Path | None = None
    tls_ca: Path | None = None
    require_tls: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def read_password(self) -> str | None:
        """The password: the first line of ``password_file`` (None without one)."""
        if self.password_file is None:
            return None
        try:
            text = self.password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"can not read broker password file {self.password_file}: {exc}") from exc
        return text.splitlines()[0] if text else ""

    def transport(self, client_id: str, password: str | None = None) -> BrokerConfig:
        """The :class:`~fedbe.transport.BrokerConfig` that connects ``client_id`` with these settings."""
        return BrokerConfig(
            url=self.url, client_id=client_id, username=self.username, password=password,
            tls_ca=_str(self.tls_ca), require_tls=self.require_tls, tls_cert=_str(self.tls_cert),
            tls_key=_str(self.tls_key), max_message_bytes=self.max_message_bytes,
        )  # fmt: skip


@dataclass(frozen=True)
class ServerEvalConfig:
    dataset: str = "bbc-news"
    examples: int = 40
    probe_questions: int = 0
    probe_texts: int = 0
    baseline: bool = False
    precision: str = "fp32"


@dataclass(frozen=True)
class RunConfig:
    model: str
    state_dir: Path
    federation: str = "default"
    blocks: int | Literal["auto"] = "auto"
    placement: str | tuple[int, ...] = "interleave-mid-top"
    rounds: int = 20
    clients_per_round: int = 4
    min_clients: int = 2
    round_deadline_seconds: float = 600.0
    late_updates: Literal["drop", "fold"] = "drop"
    staleness_decay: float = 0.5
    upload_level: Level = Level.INT8
    download_level: Level = Level.INT8
    labels: tuple[str, ...] = ()
    seed: int = 0
    eval_every: int = 0
    training: Recipe = Recipe()
    allocation: AllocationConfig = AllocationConfig()
    aggregation: AggregationConfig = AggregationConfig()
    auto_expansion: AutoExpansionConfig = AutoExpansionConfig()
    broker: BrokerSettings = BrokerSettings()
    server_eval: ServerEvalConfig | None = None
    privacy: PrivacyPolicy | None = None


class _Fields:
    """One mapping of the file being read: typed getters that fail with file, dotted path and value."""

    def __init__(self, data: object, where: str, source: str, base_dir: Path) -> None:
        self.where, self.source, self.base_dir = where, source, base_dir
        if not isinstance(data, Mapping):
            what = f"section {where!r}" if where else "the top level"
            raise ConfigError(
                f"{source}: {what} must be a mapping of 'field: value' lines, got {data!r}. "
                "See coordinator/example-run.yaml for the layout."
            )
        self.data: Mapping[object, object] = data
        self.seen: set[str] = set()

    def path(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, value: object, problem: str, fix: str) -> NoReturn:
        fix = fix if fix.endswith((".", "?")) else f"{fix}."
        raise ConfigError(f"{self.source}: {self.path(name)} {problem}, got {value!r}. {fix}")

    def raw(self, name: str, default: object) -> object:
        self.seen.add(name)
        value = self.data.get(name, default)
        if value is _REQUIRED:
            close = difflib.get_close_matches(name, [str(k) for k in self.data], n=1)
            hint = f"Is {close[0]!r} a misspelling of it? " if close else ""
            raise ConfigError(
                f"{self.source}: required field {self.path(name)} is missing. "
                f"{hint}Add it (see coordinator/example-run.yaml)."
            )
        return value

    def integer(self, name: str, default: object, low: int) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, value, "must be a whole number", "Write it without quotes or a decimal point.")
        if value < low:
            self.fail(name, value, f"must be >= {low}", f"Choose a value >= {low}.")
        return value

    def optional_integer(self, name: str, default: int | None, low: int) -> int | None:
        return None if self.raw(name, default) is None else self.integer(name, default, low)

    def real(self, name: str, default: object, interval: str) -> float:
        """A number inside ``interval``, written like ``"(0, 1]"`` or ``"[0, inf)"``."""
        value = self.raw(name, default)
        if not is_real(value):
            self.fail(name, value, "must be a finite number", "Write a number such as 0.5 or 1e-4.")
        if not in_interval(value, interval):
            self.fail(name, value, f"must lie in {interval}", f"Choose a value in {interval}.")
        return float(value)

    def choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str) or value not in options:
            self.fail(name, value, f"must be one of {', '.join(options)}", "Pick one of those names.")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            self.fail(name, value, "must be true or false", "Write true or false without quotes.")
        return value

    def string(self, name: str, default: object) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str) or not value.strip():
            self.fail(name, value, "must be a non-empty string", "Quote it if YAML reads it otherwise.")
        return value.strip()

    def labels(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """Distinct label names a task can carry (:func:`fedbe.protocol.check_labels`), sorted."""
        value = self.raw(name, list(default))
        try:
            return tuple(sorted(check_labels(value, self.path(name))))
        except CodecError as exc:
            self.fail(name, value, f"is not a list of labels a task can carry ({exc})",
                      "Write a list of distinct label names such as [business, sports, tech], or [] to take "
                      "the labels the clients announce")  # fmt: skip

    def optional_string(self, name: str) -> str | None:
        return None if self.raw(name, None) is None else self.string(name, None)

    def file_path(self, name: str, default: object, *, must_exist: bool) -> Path | None:
        if self.raw(name, default) is None:
            return None
        path = Path(self.string(name, default)).expanduser()
        path = path if path.is_absolute() else self.base_dir / path
        if must_exist and not path.is_file():
            self.fail(name, str(path), "names no existing file", "Create the file or correct the path.")
        return path

    def section(self, name: str, build: Callable[[_Fields], _T]) -> _T:
        """Build a nested section from its own fields (absent or null: all defaults)."""
        value = self.raw(name, None)
        fields = _Fields({} if value is None else value, self.path(name), self.source, self.base_dir)
        result = build(fields)
        fields.finish()
        return result

    def finish(self) -> None:
        """Every field in the mapping must have been read: anything else is unknown (a typo, usually)."""
        for key in self.data:
            if key not in self.seen:
                name = str(key)
                if self.path(name) in REMOVED_FIELDS:
                    raise ConfigError(f"{self.source}: {self.path(name)} is no longer a setting: "
                                      f"{REMOVED_FIELDS[self.path(name)]}. Delete the line.")  # fmt: skip
                close = difflib.get_close_matches(name, sorted(self.seen), n=1)
                hint = f"Did you mean {close[0]!r}? " if close else ""
                raise ConfigError(
                    f"{self.source}: unknown field {self.path(name)!r} (value {self.data[key]!r}). "
                    f"{hint}Valid fields here: {', '.join(sorted(self.seen))}."
                )


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a run configuration file (YAML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"can not read the run configuration {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_run_config(data, str(path), base_dir=path.resolve().parent)


def parse_run_config(mapping: object, source_name: str, base_dir: Path | None = None) -> RunConfig:
    """Validate a parsed mapping; ``source_name`` names it in errors, ``base_dir`` anchors relative paths."""
    top = _Fields(mapping, "", source_name, (base_dir or Path.cwd()).resolve())
    federation = top.string("federation", "default")
    try:
        check_name(federation, "federation name")
    except ConfigError:
        fix = "Use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit (it is a topic level)."
        top.fail("federation", federation, "is not a valid name", fix)
    placement = _placement(top)
    blocks = _blocks(top, placement)
    clients_per_round = top.integer("clients_per_round", 4, 1)
    levels = tuple(lv.value for lv in Level)
    config = RunConfig(
        federation=federation,
        model=_model(top),
        blocks=blocks,
        placement=placement,
        rounds=top.integer("rounds", 20, 1),
        clients_per_round=clients_per_round,
        min_clients=_min_clients(top, clients_per_round),
        round_deadline_seconds=top.real("round_deadline_seconds", 600.0, "(0, inf)"),
        late_updates="fold" if top.choice("late_updates", "drop", LATE_UPDATES) == "fold" else "drop",
        staleness_decay=top.real("staleness_decay", 0.5, "(0, 1]"),
        upload_level=Level(top.choice("upload_level", Level.INT8.value, levels)),
        download_level=Level(top.choice("download_level", Level.INT8.value, levels)),
        labels=top.labels("labels", ()),
        seed=top.integer("seed", 0, 0),
        state_dir=_state_dir(top),
        eval_every=top.integer("eval_every", 0, 0),
        training=top.section("training", _training),
        allocation=top.section("allocation", _allocation),
        aggregation=top.section("aggregation", _aggregation),
        auto_expansion=top.section("auto_expansion", _auto_expansion),
        broker=top.section("broker", _broker),
        server_eval=None
        if top.raw("server_eval", None) is None
        else top.section("server_eval", _server_eval),
        privacy=None if top.raw("privacy", None) is None else top.section("privacy", _privacy),
    )
    top.finish()
    if config.privacy is not None and config.late_updates == "fold":
        top.fail("late_updates", "fold", "can not be combined with privacy (a folded late update counts its "
                 "client in a round it was not sampled for, which the privacy accounting does not cover)",
                 "Use late_updates: drop, or remove the privacy section")  # fmt: skip
    plateau, field = config.auto_expansion.plateau_rounds, "auto_expansion.plateau_rounds"
    if plateau and not isinstance(config.placement, str):
        why = f"adds blocks, so placement must be named ({', '.join(PLACEMENTS)}), not a list"
        top.fail(field, plateau, why, "Or set it to 0.")
    if plateau and config.server_eval is None and config.eval_every == 0:
        top.fail(
            field, plateau, "needs an accuracy to watch", "Enable server_eval or eval_every, or set it to 0."
        )
    return config


def _min_clients(top: _Fields, clients_per_round: int) -> int:
    value = top.integer("min_clients", min(2, clients_per_round), 1)
    if value > clients_per_round:
        top.fail("min_clients", value, f"exceeds clients_per_round ({clients_per_round})", "Lower it.")
    return value


def _model(top: _Fields) -> str:
    model = top.string("model", _REQUIRED)
    if model.lower() == SMOLLM2 or model.startswith(TINY_PREFIX) or Path(model).expanduser().is_absolute():
        return model
    local = top.base_dir / Path(model).expanduser()
    return str(local) if local.exists() else model


def _state_dir(top: _Fields) -> Path:
    path = top.file_path("state_dir", _REQUIRED, must_exist=False)
    assert path is not None  # required: raw() raised if missing
    if path.exists() and not path.is_dir():
        top.fail("state_dir", str(path), "is a file, not a folder", "Name a folder (created if missing).")
    return path


def _placement(top: _Fields) -> str | tuple[int, ...]:
    value = top.raw("placement", RunConfig.placement)
    fix = f"Use {', '.join(PLACEMENTS)}, or distinct base-layer indices such as [4, 9, 14]."
    if isinstance(value, str):
        try:
            parsed = parse_placement(value)
        except ExpansionError:
            top.fail("placement", value, "is not a placement", fix)
        if isinstance(parsed, str):
            return parsed
        value = parsed
    if not isinstance(value, list) or not value:
        top.fail("placement", value, "must be a placement name or a non-empty list of layer indices", fix)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in value):
        top.fail("placement", value, "must list whole numbers >= 0 (0-based base-layer indices)", fix)
    if len(set(value)) != len(value):
        top.fail("placement", value, "repeats a layer (each base layer takes at most one new block)", fix)
    return tuple(sorted(value))


def _blocks(top: _Fields, placement: str | tuple[int, ...]) -> int | Literal["auto"]:
    default = "auto" if isinstance(placement, str) else len(placement)
    value = top.raw("blocks", default)
    if value == "auto":
        if not isinstance(placement, str):
            top.fail(
                "blocks", value, "can not be auto with a placement list", f"Leave it out or write {default}."
            )
        return "auto"
    if isinstance(value, str):
        top.fail("blocks", value, "must be a whole number >= 1 or auto", "Write e.g. blocks: 6.")
    blocks = top.integer("blocks", default, 1)
    if not isinstance(placement, str) and blocks != len(placement):
        top.fail(
            "blocks", blocks, f"disagrees with placement {list(placement)}", "Give one position per block."
        )
    return blocks


def _training(f: _Fields) -> Recipe:
    """The ``training:`` section is the :class:`~fedbe.recipe.Recipe`: its fields, read generically."""
    absent = object()
    read = {fld.name: f.raw(fld.name, absent) for fld in dataclasses.fields(Recipe)}
    given = {name: value for name, value in read.items() if value is not absent}
    try:
        return Recipe.from_mapping(given, defaults=Recipe())
    except RecipeError as exc:
        f.fail(exc.name, given.get(exc.name), f"is not valid ({exc})",
               "See docs/coordinator-config.md, section training")  # fmt: skip


def _allocation(f: _Fields) -> AllocationConfig:
    d = AllocationConfig()
    return AllocationConfig(
        strategy=Strategy(f.choice("strategy", d.strategy.value, STRATEGIES)),
        top_risk=f.real("top_risk", d.top_risk, "[0, 1]"),
        interleaved_risk=f.real("interleaved_risk", d.interleaved_risk, "[0, 1]"),
        max_unprotected_risk=f.real("max_unprotected_risk", d.max_unprotected_risk, "[0, 1]"),
        cost_weight=f.real("cost_weight", d.cost_weight, "[0, inf)"),
        risk_weight=f.real("risk_weight", d.risk_weight, "[0, inf)"),
        max_block_divergence=f.real("max_block_divergence", d.max_block_divergence, "[0, 1]"),
        deadline_factor=None
        if f.raw("deadline_factor", None) is None
        else f.real("deadline_factor", None, "(0, inf)"),
    )


def _aggregation(f: _Fields) -> AggregationConfig:
    d = AggregationConfig()
    optimizer = ServerOptimizer(f.choice("server_optimizer", d.server_optimizer.value, SERVER_OPTIMIZERS))
    return AggregationConfig(
        server_optimizer=optimizer,
        server_lr=f.real(
            "server_lr", 0.01 if optimizer is ServerOptimizer.FEDADAM else d.server_lr, "(0, inf)"
        ),
        momentum=f.real("momentum", d.momentum, "[0, 1)"),
        beta1=f.real("beta1", d.beta1, "[0, 1)"),
        beta2=f.real("beta2", d.beta2, "[0, 1)"),
        tau=f.real("tau", d.tau, "(0, inf)"),
        norm_bound_factor=f.real("norm_bound_factor", d.norm_bound_factor, "[1, inf)"),
        block_average=f.choice("block_average", d.block_average, BLOCK_AVERAGES),
    )


def _auto_expansion(f: _Fields) -> AutoExpansionConfig:
    return AutoExpansionConfig(
        trainers_per_block=f.real("trainers_per_block", 2.0, "(0, inf)"),
        max_blocks=f.optional_integer("max_blocks", None, 1),
        plateau_rounds=f.integer("plateau_rounds", 0, 0),
        plateau_min_delta=f.real("plateau_min_delta", 0.001, "[0, inf)"),
    )


def _broker(f: _Fields) -> BrokerSettings:
    cfg = BrokerSettings(
        url=f.string("url", "mqtt://127.0.0.1:1883"),
        username=f.optional_string("username"),
        password_file=f.file_path("password_file", None, must_exist=True),
        tls_ca=f.file_path("tls_ca", None, must_exist=True),
        require_tls=f.boolean("require_tls", False),
        max_message_bytes=f.integer("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES, 65536),
        tls_cert=f.file_path("tls_cert", None, must_exist=True),
        tls_key=f.file_path("tls_key", None, must_exist=True),
    )
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        name = "tls_key" if cfg.tls_key is None else "tls_cert"
        f.fail(name, None, "is needed with the other of tls_cert and tls_key", "Set both or neither.")
    if cfg.password_file is not None and cfg.username is None:
        f.fail("username", None, "is needed with a password_file", "Add the broker user name.")
    if cfg.require_tls and cfg.tls_ca is None and not cfg.url.startswith("mqtts://"):
        f.fail("require_tls", True, f"needs TLS but url {cfg.url!r} is plain", "Use mqtts:// and set tls_ca.")
    try:
        cfg.transport("coordinator").endpoint()
    except ConfigError as exc:
        f.fail("url", cfg.url, "is not usable", str(exc))
    return cfg


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _server_eval(f: _Fields) -> ServerEvalConfig:
    cfg = ServerEvalConfig(
        dataset=f.choice("dataset", "bbc-news", EVAL_DATASETS),
        examples=f.integer("examples", 40, 1),
        probe_questions=f.integer("probe_questions", 0, 0),
        probe_texts=f.integer("probe_texts", 0, 0),
        baseline=f.boolean("baseline", False),
        precision=f.choice("precision", "fp32", PRECISIONS),
    )
    if (cfg.probe_questions == 0) != (cfg.probe_texts == 0):
        name = "probe_texts" if cfg.probe_texts == 0 else "probe_questions"
        f.fail(name, 0, "is 0 while the other probe count is not", "Set both (e.g. 60 and 48) or neither.")
    return cfg


def _privacy(f: _Fields) -> PrivacyPolicy:
    noise = f.real("noise_multiplier", _REQUIRED, "[0, inf)")
    clip = f.real("clip_norm", _REQUIRED, "(0, inf)")
    delta = f.real("delta", 1e-5, "(0, 1)")
    budget = None if f.raw("epsilon_budget", None) is None else f.real("epsilon_budget", None, "(0, inf)")
    if noise == 0 and budget is not None:
        f.fail("noise_multiplier", noise, "gives no privacy (epsilon is infinite), so no round fits an "
               "epsilon_budget", "Set it > 0 (e.g. 1.0), or epsilon_budget: null to clip only")  # fmt: skip
    return PrivacyPolicy(noise_multiplier=noise, clip_norm=clip, delta=delta, epsilon_budget=budget)


def config_digest(cfg: RunConfig) -> str:
    """A stable 16-hex-digit hash of what the run trains: every field except ``state_dir`` and ``broker``."""
    data = dataclasses.asdict(cfg)
    del data["state_dir"], data["broker"]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def example_config_yaml() -> str:
    """The annotated example configuration (``coordinator/example-run.yaml``)."""
    return EXAMPLE_FILE.read_text(encoding="utf-8")
