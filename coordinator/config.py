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
* ``http``: the endpoint serving ``/metrics`` (Prometheus), ``/status.json`` and the dashboard ``/``
  (:mod:`coordinator.http_endpoint`): ``host: str = "127.0.0.1"``, ``port: int in [1, 65535] | null =
  null`` (null = off), ``token_file: path | null`` (must exist; its first line, 16 characters or more, is
  the bearer token every request but the dashboard's files must carry). A host that is not loopback
  needs a ``token_file``.
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

The sections' dataclasses and their readers are :mod:`coordinator.config_sections`; the field-by-field
reader both use is :mod:`coordinator.config_fields`. :func:`round_policy` turns a configuration into
the :class:`~coordinator.round.RoundPolicy` that plans and closes its rounds.

:func:`config_digest` hashes everything but ``state_dir``, ``broker`` and ``http`` (where the run is
stored, how it reaches the broker and how it is watched do not change what it trains), so a resume
can check it is the same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from coordinator.aggregation import FedAdam, FedAvgM
from coordinator.allocation import AllocationPolicy
from coordinator.config_fields import REMOVED_FIELDS, REQUIRED, Fields
from coordinator.config_sections import (
    EVAL_DATASETS,
    SERVER_OPTIMIZERS,
    STRATEGIES,
    AggregationConfig,
    AllocationConfig,
    AutoExpansionConfig,
    BrokerSettings,
    HttpSettings,
    ServerEvalConfig,
    ServerOptimizer,
    Strategy,
    read_aggregation,
    read_allocation,
    read_auto_expansion,
    read_broker,
    read_http,
    read_privacy,
    read_server_eval,
    read_training,
)
from coordinator.privacy import PrivacyPolicy
from coordinator.round import RoundPolicy
from fedbe.compression import Level
from fedbe.errors import ConfigError, ExpansionError
from fedbe.expansion import PLACEMENTS, parse_placement
from fedbe.protocol import check_name
from fedbe.recipe import Recipe
from fedbe.sources import SMOLLM2, TINY_PREFIX

# the section types and choices live in coordinator.config_sections; importers name them from here
__all__ = [
    "EVAL_DATASETS", "EXAMPLE_FILE", "LATE_UPDATES", "REMOVED_FIELDS", "SERVER_OPTIMIZERS", "STRATEGIES",
    "AggregationConfig", "AllocationConfig", "AutoExpansionConfig", "BrokerSettings", "HttpSettings", "RunConfig",
    "ServerEvalConfig", "ServerOptimizer", "Strategy", "config_digest", "example_config_yaml",
    "load_run_config", "parse_run_config", "round_policy",
]  # fmt: skip

EXAMPLE_FILE = Path(__file__).with_name("example-run.yaml")
LATE_UPDATES = ("drop", "fold")


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
    http: HttpSettings = HttpSettings()
    server_eval: ServerEvalConfig | None = None
    privacy: PrivacyPolicy | None = None


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
    top = Fields(mapping, "", source_name, (base_dir or Path.cwd()).resolve())
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
        training=top.section("training", read_training),
        allocation=top.section("allocation", read_allocation),
        aggregation=top.section("aggregation", read_aggregation),
        auto_expansion=top.section("auto_expansion", read_auto_expansion),
        broker=top.section("broker", read_broker),
        http=top.section("http", read_http),
        server_eval=None
        if top.raw("server_eval", None) is None
        else top.section("server_eval", read_server_eval),
        privacy=None if top.raw("privacy", None) is None else top.section("privacy", read_privacy),
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


def _min_clients(top: Fields, clients_per_round: int) -> int:
    value = top.integer("min_clients", min(2, clients_per_round), 1)
    if value > clients_per_round:
        top.fail("min_clients", value, f"exceeds clients_per_round ({clients_per_round})", "Lower it.")
    return value


def _model(top: Fields) -> str:
    model = top.string("model", REQUIRED)
    if model.lower() == SMOLLM2 or model.startswith(TINY_PREFIX) or Path(model).expanduser().is_absolute():
        return model
    local = top.base_dir / Path(model).expanduser()
    return str(local) if local.exists() else model


def _state_dir(top: Fields) -> Path:
    path = top.file_path("state_dir", REQUIRED, must_exist=False)
    assert path is not None  # required: raw() raised if missing
    if path.exists() and not path.is_dir():
        top.fail("state_dir", str(path), "is a file, not a folder", "Name a folder (created if missing).")
    return path


def _placement(top: Fields) -> str | tuple[int, ...]:
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


def _blocks(top: Fields, placement: str | tuple[int, ...]) -> int | Literal["auto"]:
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


def config_digest(cfg: RunConfig) -> str:
    """A stable 16-hex-digit hash of what the run trains: every field except ``state_dir``, ``broker``
    and ``http``."""
    data = dataclasses.asdict(cfg)
    del data["state_dir"], data["broker"], data["http"]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def example_config_yaml() -> str:
    """The annotated example configuration (``coordinator/example-run.yaml``)."""
    return EXAMPLE_FILE.read_text(encoding="utf-8")


def round_policy(cfg: RunConfig) -> RoundPolicy:
    """The :class:`~coordinator.round.RoundPolicy` a run configuration describes."""
    a, g = cfg.allocation, cfg.aggregation
    server: FedAvgM | FedAdam | None = None
    if g.server_optimizer == "fedavgm":
        server = FedAvgM(lr=g.server_lr, momentum=g.momentum)
    elif g.server_optimizer == "fedadam":
        server = FedAdam(lr=g.server_lr, beta1=g.beta1, beta2=g.beta2, tau=g.tau)
    return RoundPolicy(
        recipe=cfg.training, clients_per_round=cfg.clients_per_round, deadline_seconds=cfg.round_deadline_seconds,
        deadline_factor=a.deadline_factor,
        allocation=AllocationPolicy(strategy=a.strategy.value, max_unprotected_risk=a.max_unprotected_risk,
                                    cost_weight=a.cost_weight, risk_weight=a.risk_weight,
                                    max_block_divergence=a.max_block_divergence),
        top_risk=a.top_risk, interleaved_risk=a.interleaved_risk, norm_bound_factor=g.norm_bound_factor,
        block_average=g.block_average, staleness_decay=cfg.staleness_decay, late_updates=cfg.late_updates,
        server_optimizer=server, privacy=cfg.privacy,
    )  # fmt: skip
