"""``fedbe simulate``: a whole federation on this machine, as real processes talking MQTT.

One command starts a private mosquitto on a free loopback port, the coordinator
(``fedbe-coordinator run``) and N ``fedbe-edge run --emulate`` processes, each emulating a device
profile, shipped with fedbe or given as a YAML file (its memory budget drives the allocation, its
slowdown stretches each step), with its own Dirichlet(alpha) share of the BBC News training split.
It prints one line per event while the federation runs and, at the end, writes ``metrics.jsonl``,
``report.md`` and the plots of :mod:`fedbe_sim.report` into ``--out``.

Broker: Debian's mosquitto only. The in-process amqtt broker is not a fallback: it speaks MQTT
3.1.1 and fedbe's transport is MQTT v5 (persistent sessions with expiry, PUBACK reason codes), so
without mosquitto the command stops at once and says how to install it.

Processes: every child runs in its own session (process group), so a Ctrl-C at the terminal reaches
only this process, which then stops them in order: SIGTERM to each group, a grace period, SIGKILL
for what is left, and waits for all of them. The same clean-up runs on SIGTERM and on any error.
Progress comes from two sources that do not depend on log formats: an MQTT observer subscribed to
the clients' status and update topics and to the coordinator's status (who trains, who is done,
loss, bytes up), and the coordinator's ``metrics.jsonl`` (one record per closed round).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from fedbe.console import positive_float, positive_int
from fedbe.device_profile import resolve_profile
from fedbe.errors import ConfigError, FedbeError

DEFAULT_PROFILES = ("cpu-laptop", "jetson-orin-nano-8gb", "rtx-4090-24gb")
FEDERATION = "sim"
STOP_GRACE_SECONDS = 20.0
INSTALL_MOSQUITTO = (
    "fedbe simulate needs Debian's mosquitto MQTT v5 broker and did not find it: install it with "
    "`apt-get install mosquitto` (scripts/setup.sh does this). amqtt is not a fallback: it speaks "
    "only MQTT 3.1.1 and fedbe's transport uses MQTT v5."
)


SIMULATE_DESCRIPTION = (
    "Start a private mosquitto broker on a free loopback port, the coordinator and N real "
    "fedbe-edge processes, each emulating a device profile (memory budget and slowdown) and "
    "holding a Dirichlet(alpha) share of the BBC News training split. Prints progress (round, "
    "clients done, loss, accuracy, bytes) and writes metrics.jsonl, report.md and PNG plots "
    "(accuracy and general-ability retention, allocation heat maps, bytes per round) to --out. "
    "The coordinator scores the base model first (round 0: zero-shot accuracy, probes) and the "
    "global model after every round. Defaults: 3 clients on 3 different profiles, 3 rounds, "
    "SmolLM2-135M, and the coordinator's defaults for the rest (the FedBE configuration fedbe "
    "bench chose: see docs/coordinator-config.md); measured 3 minutes on 2 cores with AVX512-BF16, 8 on 2 AVX2 cores. "
    "Ctrl-C or SIGTERM stops every process it started. Needs Debian's mosquitto "
    "(apt-get install mosquitto; scripts/setup.sh does it): "
    "the in-process amqtt broker is not used because it speaks only MQTT 3.1.1 and fedbe uses "
    "MQTT v5."
)


class SimulationError(FedbeError):
    """The simulated federation could not run to the end."""


@dataclass(frozen=True)
class Settings:
    """Everything a simulation needs, validated; built by :func:`settings_from_args`."""

    out: Path
    clients: int
    rounds: int
    profiles: tuple[Path, ...]
    model: str
    dataset: str
    alpha: float
    seed: int
    blocks: int | str
    steps: int
    batch_size: int
    max_tokens: int
    lr: float
    eval_examples: int
    probe_questions: int
    probe_texts: int
    eval_precision: str
    deadline_seconds: float
    timeout_seconds: float
    distill_lambda: float | tuple[float, ...] = 3.0  # a tuple: per round, the last value holding after it
    distill_top_k: int = 32
    lr_decay: float = 1.0
    http_port: int | None = None  # the coordinator's HTTP endpoint on 127.0.0.1 (None: off)


@dataclass(frozen=True)
class ClientSpec:
    client_id: str
    profile: Path
    data: Path


# --- command line ------------------------------------------------------------------------------------


def add_simulate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], epilog: str) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a whole federation on this machine: broker, coordinator, N emulated edge devices",
        description=textwrap.fill(SIMULATE_DESCRIPTION, 100),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog,
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (created; must be empty or new)")
    p.add_argument("--clients", type=positive_int, default=3, help="edge processes (default 3)")
    p.add_argument("--rounds", type=positive_int, default=3, help="federated rounds (default 3)")
    p.add_argument(
        "--profiles",
        default=",".join(DEFAULT_PROFILES),
        help="comma-separated device profiles (names of shipped ones or YAML files), assigned to the clients "
        f"in turn (default {','.join(DEFAULT_PROFILES)})",
    )
    p.add_argument("--model", default="smollm2-135m", help="base model source (default smollm2-135m)")
    p.add_argument("--dataset", default="bbc-news", choices=["bbc-news"], help="training data (bbc-news)")
    p.add_argument(
        "--alpha", type=positive_float, default=0.5, help="Dirichlet concentration of the label split "
        "(smaller: more skewed clients; default 0.5)"
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the split, sampling and training (default 0)")
    p.add_argument("--blocks", default="6", help="new blocks: a number or auto (default 6)")
    p.add_argument("--steps", type=positive_int, default=8, help="optimizer steps per client and round (8)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="articles per step (default 4)")
    p.add_argument("--max-tokens", type=positive_int, default=96, help="tokens per article (default 96)")
    p.add_argument("--lr", type=positive_float, default=3e-4, help="client AdamW learning rate (3e-4)")
    p.add_argument(
        "--lr-decay", type=float, default=1.0,
        help="round r's client lr is lr x lr-decay^(r-1), in (0, 1] (1.0: constant; fedbe bench uses 0.5 "
        "at 4 local steps, not validated at simulate's 8)",
    )  # fmt: skip
    p.add_argument(
        "--distill-lambda", default=str(Settings.distill_lambda),
        help="weight of self-distillation towards the base on each client's own inputs "
        f"({Settings.distill_lambda}; 0 = plain cross-entropy: clients are then unprotected and get no "
        "block riskier than allocation.max_unprotected_risk; with the default placement no block sits "
        "at the very top, the riskiest place); a comma-separated list is a per-round schedule whose "
        "last value holds after it (6,3: 6 in round 1, 3 from round 2 on)",
    )  # fmt: skip
    p.add_argument(
        "--distill-top-k", type=int, default=32,
        help="clients cache the base's top-K next-token probabilities once per article (32; 0 = exact KL "
        "with an extra forward every step)",
    )  # fmt: skip
    p.add_argument(
        "--eval-examples",
        type=positive_int,
        default=40,
        help="BBC test articles the coordinator scores (40)",
    )
    p.add_argument(
        "--probe-questions",
        type=int,
        default=32,
        help="WordNet definition questions per evaluation (32; 0 = none)",
    )
    p.add_argument(
        "--probe-texts", type=int, default=16, help="quotations whose perplexity is measured (16; 0 = none)"
    )
    p.add_argument(
        "--eval-precision",
        default="bf16",
        choices=["nf4", "int8", "bf16", "fp16", "fp32"],
        help="frozen base the coordinator evaluates on (default bf16: 5-10x faster than fp32 on AVX512-BF16 CPUs; "
        "on CPUs without native bf16 its weights are multiplied in fp32, about as fast as fp32)",
    )
    p.add_argument(
        "--deadline",
        type=positive_float,
        default=1800.0,
        help="round deadline in seconds (default 1800). The allocation gives a client only blocks whose predicted "
        "time fits it, predicted from step times each client measures at start-up; on a shared machine those "
        "are inflated (here 22-28 s a step while every process was loading), so a short deadline leaves clients "
        "idle",
    )
    p.add_argument(
        "--timeout", type=positive_float, default=3600.0, help="give up after this many seconds (3600)"
    )
    p.add_argument(
        "--http-port", type=positive_int, default=None, metavar="PORT",
        help="serve the coordinator's dashboard (/), /status.json and /metrics on 127.0.0.1:PORT while the "
        "run goes on (default: off); `fedbe-coordinator status --url http://127.0.0.1:PORT` reads it too",
    )  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> Settings:
    try:  # absolute: the edge processes get the files by path
        profiles = tuple(
            resolve_profile(p.strip()).resolve() for p in str(args.profiles).split(",") if p.strip()
        )
    except ConfigError as exc:
        raise ConfigError(f"--profiles: {exc}") from None
    if not profiles:
        raise ConfigError("--profiles names no profile")
    blocks: int | str = str(args.blocks).strip().lower()
    if blocks != "auto":
        try:
            blocks = int(blocks)
        except ValueError:
            raise ConfigError(f"--blocks must be a whole number or auto, got {args.blocks!r}") from None
        if blocks < 1:
            raise ConfigError(f"--blocks must be at least 1, got {blocks}")
    if (
        args.probe_questions < 0
        or args.probe_texts < 0
        or (args.probe_questions == 0) != (args.probe_texts == 0)
    ):
        raise ConfigError("--probe-questions and --probe-texts must both be 0 or both be at least 1")
    from fedbe.recipe import parse_schedule  # noqa: PLC0415

    distill_lambda = parse_schedule(args.distill_lambda, "--distill-lambda")
    if args.distill_top_k < 0:
        raise ConfigError(f"--distill-top-k must be a whole number >= 0, got {args.distill_top_k}")
    if not (math.isfinite(args.lr_decay) and 0 < args.lr_decay <= 1):
        raise ConfigError(
            f"--lr-decay must be a number in (0, 1], got {args.lr_decay}; 1.0 keeps the lr constant"
        )
    if args.http_port is not None and args.http_port > 65535:
        raise ConfigError(f"--http-port must be a TCP port (1-65535), got {args.http_port}")
    out = Path(args.out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; choose a new one")
    return Settings(
        out=out, clients=args.clients, rounds=args.rounds, profiles=profiles, model=args.model,
        dataset=args.dataset, alpha=args.alpha, seed=args.seed, blocks=blocks, steps=args.steps,
        batch_size=args.batch_size, max_tokens=args.max_tokens, lr=args.lr, eval_examples=args.eval_examples,
        probe_questions=args.probe_questions, probe_texts=args.probe_texts, eval_precision=args.eval_precision,
        deadline_seconds=args.deadline,
        timeout_seconds=args.timeout,
        distill_lambda=distill_lambda,
        distill_top_k=args.distill_top_k,
        lr_decay=args.lr_decay,
        http_port=args.http_port,
    )  # fmt: skip


# --- the plan: pure functions of the settings ---------------------------------------------------------


def client_specs(settings: Settings, shards: Sequence[Path]) -> list[ClientSpec]:
    """Client ``i`` emulates profile ``i mod len(profiles)`` and holds shard ``i``."""
    specs = []
    for i, shard in enumerate(shards):
        profile = settings.profiles[i % len(settings.profiles)]
        specs.append(ClientSpec(f"c{i:02d}-{profile.stem}"[:64], profile, shard))
    return specs


def run_config(
    settings: Settings, broker_url: str, state_dir: Path, labels: Sequence[str] = ()
) -> dict[str, Any]:
    """The coordinator's run config: every client every round, server-side evaluation with a baseline;
    ``labels``, the dataset's, become the run's ``labels`` (a client announcing others is refused);
    with an ``http_port``, the HTTP endpoint on loopback (so no token is needed)."""
    server_eval: dict[str, Any] = {"dataset": settings.dataset, "examples": settings.eval_examples,
                                   "baseline": True, "precision": settings.eval_precision}  # fmt: skip
    if settings.probe_questions:
        server_eval |= {"probe_questions": settings.probe_questions, "probe_texts": settings.probe_texts}
    config: dict[str, Any] = {
        "federation": FEDERATION,
        "model": settings.model,
        "state_dir": str(state_dir),
        "blocks": settings.blocks,
        "rounds": settings.rounds,
        "clients_per_round": settings.clients,
        "min_clients": settings.clients,
        "round_deadline_seconds": settings.deadline_seconds,
        "upload_level": "int8",
        "labels": list(labels),
        "seed": settings.seed,
        "eval_every": 0,
        "training": {
            "steps": settings.steps,
            "lr": settings.lr,
            "lr_decay": settings.lr_decay,
            "batch_size": settings.batch_size,
            "max_tokens": settings.max_tokens,
            "distill_lambda": list(settings.distill_lambda)
            if isinstance(settings.distill_lambda, tuple)
            else settings.distill_lambda,
            "distill_top_k": settings.distill_top_k,
        },  # fmt: skip
        "broker": {"url": broker_url},
        "server_eval": server_eval,
    }
    if settings.http_port is not None:
        config["http"] = {"host": "127.0.0.1", "port": settings.http_port}
    return config


def edge_command(settings: Settings, spec: ClientSpec, broker_url: str) -> list[str]:
    return [
        sys.executable, "-m", "edge_client.cli", "run", "--broker", broker_url, "--client-id", spec.client_id,
        "--data", str(spec.data), "--profile", str(spec.profile), "--emulate", "--model", settings.model,
        "--federation", FEDERATION, "--seed", str(settings.seed),
    ]  # fmt: skip


def child_environment() -> dict[str, str]:
    """One torch/BLAS thread per process: N clients and the coordinator share the machine's cores."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


# --- processes --------------------------------------------------------------------------------------


class Children:
    """The processes this simulation started, each in its own session; :meth:`stop_all` ends them all."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self._files: list[IO[bytes]] = []

    def spawn(
        self, name: str, argv: list[str], log_path: Path, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        handle = log_path.open("wb")
        self._files.append(handle)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.procs[name], self.logs[name] = proc, log_path
        return proc

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def stop_all(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM to every child's process group, up to ``grace`` seconds, then SIGKILL; wait for all."""
        for proc in self.procs.values():
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        for proc in self.procs.values():
            _signal_group(proc.pid, signal.SIGKILL)  # also whatever a child left in its group
            proc.wait()
        for handle in self._files:
            handle.close()
        self._files.clear()

    def tail(self, name: str, lines: int = 25) -> str:
        try:
            text = self.logs[name].read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _signal_group(pgid: int, signum: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


@contextmanager
def signals_raise_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C (KeyboardInterrupt) inside the block, so clean-up always runs."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """A second Ctrl-C must not cut the clean-up short."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# --- the run ----------------------------------------------------------------------------------------


def run_simulation(args: argparse.Namespace) -> int:
    from fedbe.broker import find_mosquitto  # noqa: PLC0415

    settings = settings_from_args(args)
    if find_mosquitto() is None:
        raise SimulationError(INSTALL_MOSQUITTO)
    return Simulation(settings).run()


class Simulation:
    """Runs one simulated federation from :class:`Settings` (all I/O of ``fedbe simulate`` is here)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.out = settings.out
        self.children = Children()
        self.started = time.monotonic()

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f}s] {message}", flush=True)

    def run(self) -> int:
        from edge_client.data import write_bbc_client_shards  # noqa: PLC0415
        from fedbe.broker import MosquittoBroker  # noqa: PLC0415
        from fedbe.datasets import label_names, load_bbc_news  # noqa: PLC0415

        s, out = self.settings, self.out
        for noisy in ("fedbe.transport", "matplotlib", "edge_client.data"):  # it prints its own lines
            logging.getLogger(noisy).setLevel(logging.WARNING)
        for sub in ("data", "logs"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        corpus = load_bbc_news()  # read once: the clients' shards and the federation's labels
        shards = write_bbc_client_shards(out / "data", s.clients, s.alpha, s.seed, corpus)
        specs = client_specs(s, shards)
        state_dir = out / "state"
        broker = MosquittoBroker()
        observer: Any = None
        interrupted = False
        code = 1
        try:
            with signals_raise_interrupt():
                broker.start()
                self.say(
                    f"broker {broker.url}; {s.clients} clients ({', '.join(c.client_id for c in specs)}); "
                    f"{s.rounds} rounds of {s.steps} steps x {s.batch_size} articles on {s.model}; out {out}"
                )
                config = out / "run.yaml"
                config.write_text(_yaml(run_config(s, broker.url, state_dir, label_names(corpus))))
                env = child_environment()
                # The coordinator keeps the machine's threads: it evaluates while the clients wait.
                coord_env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
                self.children.spawn(
                    "coordinator", [sys.executable, "-m", "coordinator.cli", "run", "--config", str(config)],
                    out / "logs" / "coordinator.log", coord_env,
                )  # fmt: skip
                for spec in specs:
                    self.children.spawn(spec.client_id, edge_command(s, spec, broker.url),
                                        out / "logs" / f"{spec.client_id}.log", env)  # fmt: skip
                self.say(f"started the coordinator and {len(specs)} edge processes; logs in {out / 'logs'}")
                if s.http_port is not None:
                    self.say(f"dashboard: http://127.0.0.1:{s.http_port}/ (while the coordinator runs; "
                             f"fedbe-coordinator status --url http://127.0.0.1:{s.http_port})")  # fmt: skip
                from fedbe_sim.progress import Observer  # noqa: PLC0415

                observer = Observer(broker.url, FEDERATION, state_dir / "metrics.jsonl", s.rounds)
                observer.start()
                code = self.watch(observer)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            with signals_ignored():
                if interrupted:
                    self.say("interrupted: stopping every process this simulation started")
                if observer is not None:
                    observer.close()
                self.children.stop_all()
                broker.close()
        self.finish(state_dir, specs)
        if interrupted:
            raise KeyboardInterrupt
        return code

    def watch(self, observer: Any) -> int:
        """Print progress until the coordinator exits; fail when a process dies or time runs out."""
        coordinator = self.children.procs["coordinator"]
        edges = {n: p for n, p in self.children.procs.items() if n != "coordinator"}
        edge_gone: float | None = None
        while True:
            for line in observer.poll(0.5):
                self.say(line)
            code = coordinator.poll()
            if code is not None:
                for line in observer.poll(0.5):
                    self.say(line)
                if code != 0:
                    raise SimulationError(
                        f"the coordinator exited with code {code}; the end of {self.children.logs['coordinator']}:"
                        f"\n{self.children.tail('coordinator')}"
                    )
                self.say("the coordinator finished")
                return 0
            for name, proc in edges.items():
                if proc.poll() is None:
                    continue
                if proc.returncode != 0:
                    raise SimulationError(
                        f"edge {name} exited with code {proc.returncode}; the end of {self.children.logs[name]}:"
                        f"\n{self.children.tail(name)}"
                    )
                # An edge leaves with 0 when the coordinator says "finished": give it time to exit too.
                edge_gone = edge_gone or time.monotonic()
                if time.monotonic() - edge_gone > 30:
                    raise SimulationError(f"edge {name} stopped but the coordinator did not finish")
            if time.monotonic() - self.started > self.settings.timeout_seconds:
                raise SimulationError(
                    f"the federation did not finish within --timeout {self.settings.timeout_seconds:g} s"
                )

    def finish(self, state_dir: Path, specs: Sequence[ClientSpec]) -> None:
        """Copy the metrics and write the report and plots (also after an interruption, for what ran)."""
        from fedbe_sim import report  # noqa: PLC0415

        metrics = state_dir / "metrics.jsonl"
        if not metrics.is_file():
            self.say("no round finished: no metrics, report or plots written")
            return
        shutil.copyfile(metrics, self.out / "metrics.jsonl")
        records = report.read_metrics(self.out / "metrics.jsonl")
        rounds = report.summarize(records)
        wall = time.monotonic() - self.started
        meta = _meta(self.settings, specs, wall)
        images = report.write_plots(rounds, self.out)
        (self.out / "report.md").write_text(report.markdown(rounds, meta, [p.name for p in images]))
        self.say(report.final_line(rounds))
        self.say(f"wrote {self.out / 'report.md'}, {self.out / 'metrics.jsonl'} and "
                 f"{', '.join(p.name for p in images)} in {wall:.0f} s")  # fmt: skip


def _meta(settings: Settings, specs: Sequence[ClientSpec], wall: float) -> dict[str, str]:
    decay = f" x {settings.lr_decay:g} per round" if settings.lr_decay != 1 else ""
    return {
        "model": settings.model,
        "clients": ", ".join(f"{c.client_id} ({c.profile.stem})" for c in specs),
        "data": f"{settings.dataset}, Dirichlet(alpha={settings.alpha:g}) label split, seed {settings.seed}",
        "rounds": f"{settings.rounds} rounds x {settings.steps} steps x {settings.batch_size} articles x "
        f"{settings.max_tokens} tokens, lr {settings.lr:g}{decay}, int8 updates, new blocks: {settings.blocks}",
        "evaluation": f"{settings.eval_examples} BBC test articles on a {settings.eval_precision} base; probes: "
        f"{settings.probe_questions} WordNet definition questions, {settings.probe_texts} quotations (test half)",
        "wall time": f"{wall:.0f} s",
    }


def _yaml(data: dict[str, Any]) -> str:
    import yaml  # noqa: PLC0415

    return "# written by fedbe simulate\n" + yaml.safe_dump(data, sort_keys=False)
