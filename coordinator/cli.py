"""``fedbe-coordinator``: the coordinator daemon of a fedbe federation.

Subcommands:
  run      run the federation described by a run config (YAML); resumes from its state directory
  export   write the expanded, trained model of a state directory as a Hugging Face checkpoint
           (or, with --format gguf, as one GGUF file for llama.cpp-style runtimes)
  example  print a commented example run config
  broker-config  write a TLS mosquitto configuration with one credential per client and ACLs
           (a password each, or with --client-certs a certificate each: mutual TLS)
  enroll   write one device's bundle (CA, its certificate and key or a new password, edge.yaml)
  revoke   cut a lost or compromised device off the broker (revoke its certificate, or drop its password)
  status   show the fleet (devices, the open round, recent rounds) from status.json or the HTTP endpoint
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from coordinator.status_cli import add_status_parser, cmd_status
from fedbe import progress_bar
from fedbe.console import dispatch, read_secret, setup_logging, stop_on_signals

log = logging.getLogger("coordinator")

DESCRIPTION = (
    "The coordinator of a fedbe federation: it expands the base model with new blocks, assigns each "
    "client a subset of them every round (from the clients' measured memory and compute and their label "
    "distributions), aggregates each block over the clients that trained it, and writes its state after "
    "every round so that a restarted coordinator resumes where it stopped."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedbe-coordinator", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run (or resume) a federation",
        description="Run the federation described by --config. Connects to the broker in the config, "
        "waits for clients, runs the rounds and writes state and metrics.jsonl to the config's state_dir. "
        "Run it again with the same config after a crash: it resumes after the last completed round. "
        "Ctrl-C (SIGINT) or SIGTERM stops it cleanly between messages.",
    )
    run.add_argument(
        "--config", required=True, type=Path, help="run config YAML (see `fedbe-coordinator example`)"
    )
    run.add_argument("--password-file", type=Path, help="broker password file (overrides the config)")
    export = sub.add_parser(
        "export",
        help="export the trained model as a Hugging Face checkpoint or a GGUF file",
        description="Write the expanded model with the latest aggregated new blocks from a state directory. "
        "--format hf (default): a folder that plain transformers loads (AutoModelForCausalLM.from_pretrained"
        "(OUT)). --format gguf: one file OUT.gguf that llama.cpp-style runtimes load (and transformers, with "
        "from_pretrained(FOLDER, gguf_file=NAME)): the expanded layer count, llama.cpp's tensor names, the "
        "base's tokenizer, matrices in f16 or q8_0. GGUF needs a Llama or Qwen2 base with a real tokenizer: "
        "smollm2-135m, a .gguf file, or a Hugging Face folder with a byte-level BPE tokenizer.json.",
    )
    export.add_argument("--state", required=True, type=Path, help="the run's state directory")
    export.add_argument(
        "--out", required=True, type=Path, help="output folder (hf) or file NAME.gguf (gguf); must be new"
    )
    export.add_argument("--model", help="base model source, if it moved since the run (default: the run's)")
    export.add_argument(
        "--format",
        choices=("hf", "gguf"),
        default="hf",
        help="hf: Hugging Face folder (default); gguf: one file",
    )
    export.add_argument(
        "--gguf-type",
        choices=("f16", "q8_0"),  # gguf_export.GGUF_TYPES (not imported here: it loads torch)
        help="with --format gguf: the matrices in f16 (default) or q8_0 (8-bit blocks, about half the "
        "size); norms stay f32",
    )
    sub.add_parser("example", help="print a commented example run config")
    bc = sub.add_parser(
        "broker-config",
        help="write a TLS mosquitto configuration with one credential per client and ACLs",
        description="Write a mosquitto configuration for one federation into --out: a self-signed CA and a "
        "server certificate (openssl), a TLS-only listener, a hashed password file with one credential per "
        "client plus the coordinator's (mosquitto_passwd), and ACLs: a client publishes only on its own "
        "topics and reads only its own tasks and notices and the coordinator's status; only the coordinator "
        "reads updates; a client id is its user name, so nobody takes over another client's session; the "
        "broker drops messages over --max-message-mb (the coordinator and the clients learn that limit "
        "when they connect and refuse to send more). Start the broker with `mosquitto -c OUT/mosquitto.conf`; "
        "give each device ca.crt and its own OUT/credentials/ID.password (fedbe-edge run --broker "
        "mqtts://HOST:PORT --tls-ca ca.crt --require-tls --username ID --password-file ID.password). "
        "With --client-certs, clients prove who they are by a certificate of the CA instead (mutual TLS): "
        "the broker takes no connection without one, its CN is the client's user name and id, and OUT/"
        "credentials holds ID.crt and ID.key for each client and the coordinator. Add devices later "
        "with `fedbe-coordinator enroll`; cut a lost one off with `fedbe-coordinator revoke`.",
    )
    bc.add_argument("--clients", required=True, type=Path, help="text file: one client id per line")
    bc.add_argument("--out", required=True, type=Path, help="output folder (must be new or empty)")
    bc.add_argument("--federation", default="default", help="federation name (topic namespace)")
    bc.add_argument("--host", default="127.0.0.1", help="address the listener binds (default 127.0.0.1)")
    bc.add_argument("--port", type=int, default=8883, help="TLS port (default 8883)")
    bc.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="another host name or IP for the certificate",
    )
    bc.add_argument("--days", type=int, default=825, help="certificate validity in days (default 825)")
    bc.add_argument(
        "--max-message-mb",
        type=int,
        default=128,  # broker_config.DEFAULT_MAX_MESSAGE_MB (not imported here: it loads torch)
        metavar="MIB",
        help="largest message the broker takes, in MiB, 1-255 (default 128): a task or update carries the "
        "new blocks' weights",
    )
    bc.add_argument(
        "--force", action="store_true", help="overwrite a non-empty --out (new CA, new passwords)"
    )
    bc.add_argument(
        "--client-certs",
        action="store_true",
        help="mutual TLS: clients connect with a certificate signed by the CA (CN = client id) instead of "
        "a password; the coordinator's is credentials/fedbe-coordinator.crt and .key (broker.tls_cert, "
        "broker.tls_key in its run config)",
    )
    add_enroll_parser(sub)
    add_revoke_parser(sub)
    add_status_parser(sub)
    return parser


def add_enroll_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    en = sub.add_parser(
        "enroll",
        help="write one device's bundle: CA, certificate and key (or a new password), edge.yaml",
        description="Write into --out (a new folder, mode 0700, files 0600) what device --device needs to join "
        "the federation of the broker in --broker-dir (the folder broker-config wrote): ca.crt; a certificate "
        "and key signed by that CA (a --client-certs broker) or a fresh password, whose hash is added to the "
        "broker's passwd (reload the broker afterwards: SIGHUP or `systemctl reload mosquitto`); and "
        "edge.yaml, the settings of `fedbe-edge run --config edge.yaml`. Copy the folder to the device as "
        "it is, or pass its files with systemd's LoadCredential= (deploy/fedbe-edge.service).",
    )
    en.add_argument("--broker-dir", required=True, type=Path, help="the folder broker-config wrote")
    en.add_argument("--device", required=True, help="the device's client id (letters, digits, _ . -)")
    en.add_argument("--broker-url", required=True, help="the broker as devices reach it: mqtts://HOST:PORT")
    en.add_argument("--out", required=True, type=Path, help="bundle folder to write (must be new or empty)")
    en.add_argument("--federation", help="federation name; must be the broker's (default: the broker's)")
    en.add_argument("--data", type=Path, help="the device's data file, as a path on the device (edge.yaml)")
    en.add_argument("--model", help="the base model on the device (edge.yaml; default: fedbe-edge's)")
    en.add_argument("--profile", help="the device profile (edge.yaml; default: fedbe-edge's)")
    en.add_argument("--days", type=int, default=825, help="certificate validity in days (default 825)")
    en.add_argument(
        "--force", action="store_true", help="replace an existing bundle in --out and the device's password"
    )


def add_revoke_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rv = sub.add_parser(
        "revoke",
        help="cut a lost or compromised device off the broker",
        description="Revoke device --device at the broker in --broker-dir (the folder broker-config wrote). "
        "A --client-certs broker: every valid certificate of the device is revoked in the CA's record "
        "(DIR/ca/) and put on DIR/crl.pem, the revocation list the broker checks; then RESTART the broker "
        "(systemctl restart mosquitto): mosquitto re-reads crl.pem on a reload (SIGHUP) and refuses the "
        "device's new connections, but keeps a connection the device already has open. A password broker: "
        "the device's line leaves DIR/passwd; then RELOAD the broker (systemctl reload mosquitto): that "
        "closes the device's connection and refuses it from then on. The device's files in DIR/credentials "
        "are deleted. The command prints what to do next. To let the device in again (e.g. when it is "
        "found, with a fresh key), enroll it again: fedbe-coordinator enroll --force.",
    )
    rv.add_argument("--broker-dir", required=True, type=Path, help="the folder broker-config wrote")
    rv.add_argument("--device", required=True, help="the client id of the device to cut off")


def cmd_run(args: argparse.Namespace) -> int:
    from coordinator.checkpoint import CheckpointStore  # noqa: PLC0415
    from coordinator.config import load_run_config  # noqa: PLC0415
    from coordinator.daemon import Coordinator  # noqa: PLC0415
    from fedbe.transport import Connection  # noqa: PLC0415

    # the daemon is a service: its server evaluation logs lines, never draws a bar between its log lines
    os.environ.setdefault(progress_bar.ENV, "log")
    cfg = load_run_config(args.config)
    b = cfg.broker
    password = read_secret(args.password_file, "--password-file") if args.password_file else b.read_password()
    store = CheckpointStore(cfg.state_dir)
    store.lock()
    stop = stop_on_signals(log, "stopping after the current message")
    # a broker made by broker-config names it by its user name or certificate instead (fedbe-coordinator)
    conn = Connection(b.transport(f"fedbe-coordinator-{cfg.federation}", password))
    conn.start()
    try:
        return Coordinator(cfg, conn, store, stop).run()
    finally:
        conn.close()


def cmd_export(args: argparse.Namespace) -> int:
    from coordinator.export import ExportError, export_gguf, export_model  # noqa: PLC0415

    if args.format == "gguf":
        out = export_gguf(args.state, args.out, args.model, gguf_type=args.gguf_type or "f16")
    elif args.gguf_type is not None:
        raise ExportError("--gguf-type applies to --format gguf only; add --format gguf or drop --gguf-type")
    else:
        out = export_model(args.state, args.out, args.model)
    print(f"wrote {out}")
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from coordinator.config import example_config_yaml  # noqa: PLC0415

    print(example_config_yaml())
    return 0


def cmd_broker_config(args: argparse.Namespace) -> int:
    from coordinator.broker_config import COORDINATOR_USER, MIB, generate, read_clients  # noqa: PLC0415

    files = generate(
        read_clients(args.clients), args.out, federation=args.federation, host=args.host, port=args.port,
        extra_hosts=args.san, days=args.days, max_message_bytes=args.max_message_mb * MIB, force=args.force,
        client_certs=args.client_certs,
    )  # fmt: skip
    print(f"wrote {files.conf} (TLS listener {files.host}:{files.port}, messages up to "
          f"{files.max_message_bytes} bytes), {files.acl}" + (f", {files.passwd}" if files.passwd else ""))  # fmt: skip
    print(f"CA certificate for every device: {files.ca_cert}")
    credentials = files.out_dir / "credentials"
    if files.client_certs:
        print(
            f"client certificates: {credentials}/ID.crt and ID.key (coordinator: {COORDINATOR_USER}.crt, .key)"
        )
    else:
        print(f"passwords: {credentials}/ID.password (coordinator: {COORDINATOR_USER}.password)")
    print(f"start the broker: mosquitto -c {files.conf}")
    print(f"add a device: fedbe-coordinator enroll --broker-dir {files.out_dir} --device ID "
          f"--broker-url {files.url} --out BUNDLE")  # fmt: skip
    print(f"cut a lost device off: fedbe-coordinator revoke --broker-dir {files.out_dir} --device ID")
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from coordinator.enrolment import enroll  # noqa: PLC0415

    bundle = enroll(
        args.broker_dir, args.device, args.broker_url, args.out, federation=args.federation, data=args.data,
        model=args.model, profile=args.profile, days=args.days, force=args.force,
    )  # fmt: skip
    how = "certificate device.crt and key device.key" if bundle.client_certs else "password in password"
    print(f"wrote the bundle of {bundle.device} to {bundle.out_dir}: ca.crt, {how}, edge.yaml "
          f"(federation {bundle.federation!r}, broker {bundle.broker_url})")  # fmt: skip
    if bundle.superseded:
        print(f"revoked {bundle.device}'s earlier certificate(s) (serial {', '.join(bundle.superseded)}): if the "
              "device is connected with one, restart the broker (systemctl restart mosquitto) to cut that "
              "connection; new connections with it are refused after a reload")  # fmt: skip
    if not bundle.client_certs:
        print(f"added {bundle.device} to {args.broker_dir.resolve() / 'passwd'}: reload the broker so that it "
              "reads it (systemctl reload mosquitto, or kill -HUP the mosquitto process)")  # fmt: skip
    print(
        f"on the device: fedbe-edge run --config {bundle.edge_config}" + ("" if args.data else " --data FILE")
    )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from coordinator.revocation import revoke  # noqa: PLC0415

    done = revoke(args.broker_dir, args.device)
    if done.client_certs:
        print(
            f"revoked the certificate(s) of {done.device} (serial {', '.join(done.serials)}); wrote {done.changed}"
        )
    else:
        print(f"removed {done.device} from {done.changed}")
    for path in done.removed:
        print(f"deleted {path}")
    print(f"next: {done.next_step}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    return dispatch("fedbe-coordinator", args, {
        "run": cmd_run, "export": cmd_export, "example": cmd_example, "broker-config": cmd_broker_config,
        "enroll": cmd_enroll, "revoke": cmd_revoke, "status": cmd_status,
    })  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
