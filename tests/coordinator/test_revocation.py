"""The pure parts of revocation: reading the CA's index and dropping one user from a password file."""

from __future__ import annotations

from coordinator.certificate_authority import parse_index
from coordinator.revocation import valid_serials, without_user

INDEX = (
    "V\t270106230900Z\t\t63F5AA36\tunknown\t/CN=c1\n"
    "R\t270106230900Z\t261207231000Z\t11AA\tunknown\t/CN=c10\n"
    "V\t270106230900Z\t\t5332ADEB\tunknown\t/CN=c10\n"
    "R\t270106230900Z\t261207231000Z\t22BB\tunknown\t/CN=c2\n"
    "V\t270106230900Z\t\t33CC\tunknown\t/CN=c1\n"
)


def test_valid_serials_are_the_unrevoked_certificates_of_exactly_that_name() -> None:
    issued = parse_index(INDEX)
    assert [(i.serial, i.common_name, i.revoked) for i in issued][:2] == [
        ("63F5AA36", "c1", False),
        ("11AA", "c10", True),
    ]
    assert valid_serials(issued, "c1") == ["63F5AA36", "33CC"]  # enrolled twice: both go
    assert valid_serials(issued, "c10") == ["5332ADEB"]
    assert valid_serials(issued, "c2") == []  # revoked already
    assert valid_serials(issued, "c") == []


def test_without_user_drops_only_that_users_line() -> None:
    text = "fedbe-coordinator:$7$a\nc1:$7$b\nc10:$7$c\n"
    assert without_user(text, "c1") == ("fedbe-coordinator:$7$a\nc10:$7$c\n", True)
    assert without_user(text, "c") == (text, False)
