"""``fedbe-edge run``: build the agent from command-line settings and run it until stopped.

The settings come from the flags, and from ``--config FILE`` (see :mod:`edge_client.run_config`;
``fedbe-coordinator enroll`` writes one) under them. Reads and validates the local data and the
device profile first (so a bad file fails before any network traffic), connects, and sets up the
model when the coordinator's status arrives.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbe.console import read_secret, stop_on_signals
from fedbe.errors import ConfigError, FedbeError

if TYPE_CHECKING:
    from edge_client.data import LocalData

log = logging.getLogger(__name__)


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--config",
        type=Path,
        help="YAML file of settings, keys named like these flags (broker, client_id, tls_cert, ...; "
        "`fedbe-coordinator enroll` writes one: edge.yaml); relative paths are from its folder, and a flag "
        "given here wins over its value",
    )
    # broker, client id and data are required, from the flags or the --config file (checked in cmd_run)
    run.add_argument("--broker", help="broker URL: mqtt://HOST:PORT or mqtts://HOST:PORT (required)")
    run.add_argument("--client-id", help="this device's id (letters, digits, _ . -) (required)")
    run.add_argument(
        "--data",
        type=Path,
        help="local data: JSONL or CSV of {text,label} or {prompt,response} (required)",
    )
    run.add_argument(
        "--profile", help="device profile: a shipped name (fedbe-edge --help lists them) or a YAML file"
    )
    run.add_argument("--model", default="smollm2-135m", help="local copy of the federation's base model")
    run.add_argument("--federation", default="default", help="federation name (topic namespace)")
    run.add_argument(
        "--emulate",
        action="store_true",
        help="simulate the profile's device: apply its emulate section (memory cap, slowdown)",
    )
    run.add_argument(
        "--label-dp-epsilon",
        type=float,
        help="add Laplace noise of scale 1/epsilon to the announced label histogram "
        "(fresh operating-system randomness on every start, independent of --seed)",
    )
    run.add_argument(
        "--eval-fraction",
        type=float,
        default=0.2,
        help="share of local data held out for federated evaluation (default 0.2)",
    )
    run.add_argument(
        "--eval-examples",
        type=int,
        default=64,
        help="at most this many held-out examples per federated evaluation (default 64)",
    )
    run.add_argument("--tls-ca", type=Path, help="CA certificate: connect with TLS and verify the broker")
    run.add_argument("--require-tls", action="store_true", help="refuse to connect without TLS")
    run.add_argument(
        "--tls-cert",
        type=Path,
        help="this device's certificate, for a broker that requires one (with --tls-key)",
    )
    run.add_argument("--tls-key", type=Path, help="the private key of --tls-cert")
    run.add_argument("--username", help="broker user name")
    run.add_argument("--password-file", type=Path, help="file holding the broker password")
    run.add_argument("--seed", type=int, default=0, help="seed for the local split")
    run.add_argument("--max-tasks", type=int, help=argparse.SUPPRESS)  # tests: exit after N tasks


def read_password(path: Path | None) -> str | None:
    """The first line of ``path`` (None without a path), or :class:`ConfigError` saying why not."""
    return None if path is None else read_secret(path, "the broker password file")


def broker_config(args: argparse.Namespace, client_id: str) -> Any:
    """The :class:`fedbe.transport.BrokerConfig` of these settings, checked (before torch is imported)."""
    for flag, path in (("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                       ("--password-file", args.password_file)):  # fmt: skip
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    from fedbe.transport import BrokerConfig  # noqa: PLC0415 - imports torch (via fedbe.protocol)

    def text(path: Path | None) -> str | None:
        return None if path is None else str(path)

    config = BrokerConfig(
        url=args.broker, client_id=client_id, username=args.username, password=read_password(args.password_file),
        tls_ca=text(args.tls_ca), require_tls=args.require_tls, tls_cert=text(args.tls_cert),
        tls_key=text(args.tls_key),
    )  # fmt: skip
    config.endpoint()  # a bad URL or a certificate without TLS fails here, before the data is read
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from edge_client.run_config import check_required  # noqa: PLC0415
    from fedbe.protocol.topics import check_name as check_id  # noqa: PLC0415

    check_required(args)
    settings = broker_config(args, check_id(args.client_id))
    # Heavy imports here, so that `fedbe-edge --help` stays instant.
    import numpy as np  # noqa: PLC0415
    from transformers import PreTrainedModel  # noqa: PLC0415

    from edge_client import data as local_data  # noqa: PLC0415
    from edge_client.agent import AnnouncedCapacity, EdgeAgent, TaskRunner, build_client_model, make_evaluator  # noqa: PLC0415
    from edge_client.device_report import build_report  # noqa: PLC0415
    from fedbe import protocol, sources  # noqa: PLC0415
    from fedbe.device_profile import DEFAULT_PROFILE, DeviceProfile, load_profile  # noqa: PLC0415
    from fedbe.evaluation import classification_accuracy  # noqa: PLC0415
    from fedbe.fingerprint import base_fingerprint  # noqa: PLC0415
    from fedbe.protocol import Topics, check_name  # noqa: PLC0415
    from fedbe.transport import Connection  # noqa: PLC0415

    client_id = check_name(args.client_id)
    profile: DeviceProfile = load_profile(args.profile) if args.profile else DEFAULT_PROFILE
    dataset = local_data.load_local_data(args.data)
    train, held_out = local_data.split_local(list(dataset.examples), args.eval_fraction, args.seed)
    held_out = held_out[: max(args.eval_examples, 0)]  # evaluation runs on-device: keep it bounded
    histogram = announced_histogram(dataset, args.label_dp_epsilon)
    labels = sorted(histogram)
    log.info("%s: %d training and %d held-out %s examples from %s", client_id, len(train), len(held_out),
             dataset.kind, args.data)  # fmt: skip
    topics = Topics(args.federation)
    will = (topics.client(client_id, protocol.ClientTopic.STATUS),
            protocol.encode(protocol.StatusMessage(client_id, "offline", 0, "connection lost")), True)  # fmt: skip
    # after a reconnect: "online" again (a broker restart fires the will of every client)
    birth = (topics.client(client_id, protocol.ClientTopic.STATUS),
             protocol.encode(protocol.StatusMessage(client_id, "online", 0, "reconnected")), True)  # fmt: skip
    conn = Connection(settings, will=will, birth=birth)
    stop = stop_on_signals(log, "finishing up")

    def setup(status: protocol.CoordinatorStatusMessage) -> tuple[TaskRunner, protocol.AnnounceMessage]:
        tokenizer = sources.load_tokenizer(args.model)
        # build_report measures on its own expanded, quantized copy and drops it before the base is
        # loaded for training, so the device never holds both
        report = build_report(
            profile, args.model, n_blocks=len(status.new_layer_indices), emulating=args.emulate,
            progress=lambda m: log.info("profile: %s", m),
        )  # fmt: skip
        base = sources.load_model(args.model)
        client = build_client_model(base, base_fingerprint(base), status, report.precision)
        slowdown = report.compute_slowdown

        def fits(layers: tuple[int, ...]) -> bool:
            # by position: the federation may place its blocks differently from the profile's expansion
            need = report.memory.required_bytes_at(min(layers), len(layers), client.registry.num_layers)
            return need <= report.memory_budget_bytes

        def batches(batch_size: int, max_tokens: int, seed: int) -> list[Any]:
            order = list(train)
            np.random.default_rng(seed).shuffle(order)  # type: ignore[arg-type]
            return local_data.make_local_batches(tokenizer, order, batch_size, max_tokens)

        def accuracy(model: PreTrainedModel, max_tokens: int) -> float:
            if not labels or not held_out:
                return 0.0
            return classification_accuracy(model, tokenizer, held_out, labels, max_tokens)  # type: ignore[arg-type]

        evaluator = make_evaluator(
            lambda max_tokens: local_data.make_local_batches(tokenizer, held_out or train[:1], 8, max_tokens),
            accuracy, len(held_out),
        )  # fmt: skip
        runner = TaskRunner(client, client_id, batches, evaluator, AnnouncedCapacity(report.to_announce_fields(), fits),
                            slowdown=slowdown,
                            label_prior=label_prior_for(tokenizer, train if labels else []))  # fmt: skip
        announce = protocol.AnnounceMessage(
            client_id=client_id, profile_name=profile.name, num_examples=len(train), label_histogram=histogram,
            base_fingerprint=client.fingerprint, **report.to_announce_fields(),  # type: ignore[arg-type]
        )  # fmt: skip
        return runner, announce

    started = time.monotonic()
    conn.start()
    code = EdgeAgent(conn, topics, client_id, setup, stop).run(max_tasks=args.max_tasks)
    log.info("%s stopped after %.0f s", client_id, time.monotonic() - started)
    return code


def announced_histogram(dataset: LocalData, label_dp_epsilon: float | None) -> dict[str, float]:
    """The label histogram this client announces: {} for unlabelled data, the true counts without
    ``label_dp_epsilon``, else Laplace-noised counts (:func:`edge_client.data.noisy_histogram`, whose
    noise no seed reproduces)."""
    from edge_client import data as local_data  # noqa: PLC0415

    if dataset.kind != local_data.CLASSIFICATION:
        if label_dp_epsilon is not None:
            raise ConfigError("--label-dp-epsilon applies to labelled data only")
        return {}
    histogram = local_data.label_histogram(dataset.examples)  # type: ignore[arg-type]
    if label_dp_epsilon is None:
        return histogram
    return local_data.noisy_histogram(histogram, label_dp_epsilon)


def label_prior_for(tokenizer: Any, train: Sequence[Any]) -> Callable[[tuple[str, ...]], Any]:
    """The federation's labels (a task's ``balance_labels``) -> this client's :class:`LabelPrior`:
    the labels' first tokens as they follow the prompt, with this client's own training counts (the
    true ones, never sent; a label it lacks counts 0). None, with a warning once, where the data is
    not labelled or two labels share a first token (the client then trains plain cross-entropy)."""
    from edge_client import data as local_data  # noqa: PLC0415
    from edge_client.trainer import LabelPrior  # noqa: PLC0415

    counts = local_data.label_histogram(train) if train else {}
    built: dict[tuple[str, ...], Any] = {}

    def prior(labels: tuple[str, ...]) -> Any:
        if labels not in built:
            built[labels] = None
            if not counts:
                log.warning("the task asks for a label-balanced loss but this client's data has no labels; "
                            "training plain cross-entropy")  # fmt: skip
            else:
                try:
                    built[labels] = LabelPrior.for_labels(tokenizer, labels, counts)
                except FedbeError as exc:
                    log.warning("label-balanced loss not used, training plain cross-entropy: %s", exc)
        return built[labels]

    return prior
