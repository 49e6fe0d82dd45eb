"""The sections of the run configuration (``allocation``, ``aggregation``, ``auto_expansion``,
``broker``, ``http``, ``server_eval``, ``privacy`` and ``training``): their frozen dataclasses and the readers
that validate each from its mapping.

Every field is documented in :mod:`coordinator.config` and ``docs/coordinator-config.md``;
:func:`coordinator.config.parse_run_config` calls the readers, one a section.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from coordinator.aggregation import BLOCK_AVERAGES
from coordinator.config_fields import REQUIRED, Fields
from coordinator.privacy import PrivacyPolicy
from fedbe.console import read_secret
from fedbe.device_profile import PRECISIONS
from fedbe.errors import ConfigError
from fedbe.protocol import DEFAULT_MAX_MESSAGE_BYTES
from fedbe.recipe import Recipe, RecipeError
from fedbe.transport import BrokerConfig

EVAL_DATASETS = ("bbc-news",)


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
        """The password: the first line of ``password_file``, stripped (None without one)."""
        return None if self.password_file is None else read_secret(self.password_file, "broker password file")

    def transport(self, client_id: str, password: str | None = None) -> BrokerConfig:
        """The :class:`~fedbe.transport.BrokerConfig` that connects ``client_id`` with these settings."""
        return BrokerConfig(
            url=self.url, client_id=client_id, username=self.username, password=password,
            tls_ca=_str(self.tls_ca), require_tls=self.require_tls, tls_cert=_str(self.tls_cert),
            tls_key=_str(self.tls_key), max_message_bytes=self.max_message_bytes,
        )  # fmt: skip


@dataclass(frozen=True)
class HttpSettings:
    """The coordinator's HTTP endpoint (``/metrics``, ``/status.json``, the dashboard ``/``);
    ``port`` None: off."""

    host: str = "127.0.0.1"
    port: int | None = None
    token_file: Path | None = None

    def read_token(self) -> str | None:
        """The bearer token: the first line of ``token_file``, stripped (None without one)."""
        if self.token_file is None:
            return None
        token = read_secret(self.token_file, "http.token_file")
        if len(token) < 16:
            raise ConfigError(f"http.token_file {self.token_file}: the token (its first line) is empty or shorter "
                              "than 16 characters; write a random one, e.g. `openssl rand -hex 32 > FILE`")  # fmt: skip
        return token


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerEvalConfig:
    dataset: str = "bbc-news"
    examples: int = 40
    probe_questions: int = 0
    probe_texts: int = 0
    baseline: bool = False
    precision: str = "fp32"


def read_training(f: Fields) -> Recipe:
    """The ``training:`` section is the :class:`~fedbe.recipe.Recipe`: its fields, read generically."""
    absent = object()
    read = {fld.name: f.raw(fld.name, absent) for fld in dataclasses.fields(Recipe)}
    given = {name: value for name, value in read.items() if value is not absent}
    try:
        return Recipe.from_mapping(given, defaults=Recipe())
    except RecipeError as exc:
        f.fail(exc.name, given.get(exc.name), f"is not valid ({exc})",
               "See docs/coordinator-config.md, section training")  # fmt: skip


def read_allocation(f: Fields) -> AllocationConfig:
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


def read_aggregation(f: Fields) -> AggregationConfig:
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


def read_auto_expansion(f: Fields) -> AutoExpansionConfig:
    return AutoExpansionConfig(
        trainers_per_block=f.real("trainers_per_block", 2.0, "(0, inf)"),
        max_blocks=f.optional_integer("max_blocks", None, 1),
        plateau_rounds=f.integer("plateau_rounds", 0, 0),
        plateau_min_delta=f.real("plateau_min_delta", 0.001, "[0, inf)"),
    )


def read_broker(f: Fields) -> BrokerSettings:
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


def read_http(f: Fields) -> HttpSettings:
    cfg = HttpSettings(
        host=f.string("host", "127.0.0.1"),
        port=f.optional_integer("port", None, 1),
        token_file=f.file_path("token_file", None, must_exist=True),
    )
    if cfg.port is not None and cfg.port > 65535:
        f.fail("port", cfg.port, "is not a TCP port", "Choose 1-65535, or null to turn the endpoint off.")
    if not is_loopback(cfg.host) and cfg.token_file is None:
        f.fail("host", cfg.host, "is not a loopback address, and without a token_file anyone who reaches it "
               "could read the fleet's state", "Set token_file (requests then need 'Authorization: Bearer "
               "TOKEN'), or bind 127.0.0.1 and scrape through a proxy")  # fmt: skip
    if cfg.token_file is not None:
        try:
            cfg.read_token()
        except ConfigError as exc:
            f.fail("token_file", str(cfg.token_file), "holds no usable token", str(exc))
    return cfg


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def read_server_eval(f: Fields) -> ServerEvalConfig:
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


def read_privacy(f: Fields) -> PrivacyPolicy:
    noise = f.real("noise_multiplier", REQUIRED, "[0, inf)")
    clip = f.real("clip_norm", REQUIRED, "(0, inf)")
    delta = f.real("delta", 1e-5, "(0, 1)")
    budget = None if f.raw("epsilon_budget", None) is None else f.real("epsilon_budget", None, "(0, inf)")
    if noise == 0 and budget is not None:
        f.fail("noise_multiplier", noise, "gives no privacy (epsilon is infinite), so no round fits an "
               "epsilon_budget", "Set it > 0 (e.g. 1.0), or epsilon_budget: null to clip only")  # fmt: skip
    return PrivacyPolicy(noise_multiplier=noise, clip_norm=clip, delta=delta, epsilon_budget=budget)
