"""`status` names a relay by the application name that outbox_relay.pg gives its sessions."""

from __future__ import annotations

import pytest

from outbox_relay import pg, status


@pytest.mark.parametrize("relay_id", ["r-1", "web-7.example.com-4242-ab12", "x" * 80])
def test_status_reads_the_relay_id_from_the_owner_session_name(relay_id: str) -> None:
    """What outbox_relay.pg builds for the ownership session, status reads back (up to 63 bytes)."""
    name = pg.application_name("owner", relay_id)
    assert len(name) <= 63
    assert status.relay_name(name) == name.removeprefix(f"{pg.APPLICATION_NAME} owner ")
    assert relay_id.startswith(status.relay_name(name))


def test_status_follows_a_change_of_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """The name is defined once: renaming the sessions renames what status parses."""
    monkeypatch.setattr(pg, "APPLICATION_NAME", "renamed-relay")
    assert pg.application_name("owner", "r-1") == "renamed-relay owner r-1"
    assert status.relay_name("renamed-relay owner r-1") == "r-1"


def test_status_shows_an_unknown_session_name_as_it_is() -> None:
    assert status.relay_name("psql") == "psql"
