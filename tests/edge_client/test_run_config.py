"""``fedbe-edge run --config FILE``: keys mirror the flags, flags win, bad files are named precisely."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from edge_client.cli import build_parser
from edge_client.cli import main as edge_main
from edge_client.run_config import check_required, file_keys, load_run_file, parse_with_file, run_subparser
from fedbe.errors import ConfigError


def parse(argv: list[str], config: Path) -> argparse.Namespace:
    return parse_with_file(build_parser(), argv, config)


def test_every_run_flag_is_a_key_and_relative_paths_are_from_the_files_folder(tmp_path: Path) -> None:
    keys = set(file_keys(run_subparser(build_parser())))
    assert {"broker", "client_id", "federation", "data", "model", "profile", "tls_ca", "tls_cert", "tls_key",
            "require_tls", "username", "password_file", "seed", "eval_fraction"} <= keys  # fmt: skip
    assert not keys & {"config", "help", "max_tasks"}
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "my-profile.yaml").write_text("x: 1\n")
    config = tmp_path / "bundle" / "edge.yaml"
    config.write_text(
        "broker: mqtts://h:8883\nclient_id: dev1\ntls_ca: ca.crt\ntls_key: /abs/device.key\ndata: ../d.jsonl\n"
        "profile: my-profile.yaml\nmodel: smollm2-135m\nrequire_tls: true\neval_fraction: 1\nseed: 3\n"
    )
    args = parse(["run", "--config", str(config)], config)
    assert args.tls_ca == tmp_path / "bundle" / "ca.crt"
    assert args.tls_key == Path("/abs/device.key")
    assert args.data == tmp_path / "bundle" / "../d.jsonl"
    assert args.profile == str(tmp_path / "bundle" / "my-profile.yaml")
    assert args.model == "smollm2-135m"  # no such folder next to it: a name
    assert args.require_tls is True and args.eval_fraction == 1.0 and args.seed == 3
    assert args.federation == "default"  # not in the file: the flag's default


def test_flags_given_on_the_command_line_win_over_the_file(tmp_path: Path) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text("broker: mqtts://from-file:8883\nclient_id: dev1\nfederation: fed-file\nseed: 3\n")
    argv = ["run", "--config", str(config), "--broker", "mqtts://flag:8883", "--federation", "default",
            "--data", "here.jsonl"]  # fmt: skip
    args = parse(argv, config)
    assert args.broker == "mqtts://flag:8883"
    assert args.federation == "default"  # the flag, although it equals the flag's default
    assert args.data == Path("here.jsonl") and args.client_id == "dev1" and args.seed == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "broker: x\ntls_kye: k\n",
            r"unknown key 'tls_kye' \(did you mean 'tls_key'\?\); the keys are .*tls_cert",
        ),
        ("seed: '3'\n", "seed must be a whole number, got '3'"),
        ("seed: true\n", "seed must be a whole number, got True"),
        ("require_tls: 'yes'\n", "require_tls must be true or false"),
        ("tls_ca: 5\n", "tls_ca must be a path"),
        ("eval_fraction: .nan\n", "eval_fraction must be a number"),
        ("- broker\n", "must be a mapping of settings"),
        ("broker: [unclosed\n", "is not valid YAML"),
    ],
)
def test_a_bad_file_is_an_error_that_names_the_file_and_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_run_file(config, run_subparser(build_parser()))
    assert str(config) in str(caught.value)


def test_broker_client_id_and_data_are_required_from_flags_or_file(tmp_path: Path) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text("broker: mqtts://h:8883\n")
    args = parse(["run", "--config", str(config)], config)
    with pytest.raises(
        ConfigError, match="needs --client-id, --data: .* client_id, data in the --config file"
    ):
        check_required(args)
    args = parse(["run", "--config", str(config), "--client-id", "d", "--data", "x.jsonl"], config)
    check_required(args)


def test_the_command_line_reports_a_bad_or_missing_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text("brokr: mqtts://h:8883\n")
    assert edge_main(["run", "--config", str(config)]) == 1
    assert "fedbe-edge run: error: " in capsys.readouterr().err
    assert edge_main(["run", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "can not read the config file" in capsys.readouterr().err
    config.write_text("broker: mqtts://h:8883\nclient_id: dev1\n")  # valid, but no data anywhere
    assert edge_main(["run", "--config", str(config)]) == 1
    assert "needs --data" in capsys.readouterr().err
    config.write_text(
        f"broker: mqtts://h:8883\nclient_id: dev1\ndata: {tmp_path / 'd.jsonl'}\ntls_cert: c.crt\n"
    )
    (tmp_path / "d.jsonl").write_text("")
    assert (
        edge_main(["run", "--config", str(config)]) == 1
    )  # refused before the data is read or the broker called
    assert f"--tls-cert {tmp_path / 'c.crt'}: no such file" in capsys.readouterr().err
