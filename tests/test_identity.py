"""Identity data generated from params."""

from __future__ import annotations

from skytune.core.data import identity


def test_generated_identity_is_deterministic_and_covers_the_probes() -> None:
    who = identity.Identity("Nimbus", "ACME Labs")
    rows = identity.generate(who, 40, seed=3)
    assert rows == identity.generate(who, 40, seed=3)
    assert len(rows) == 40
    questions = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in rows}
    for intent, probe in identity.PROBES.items():
        assert questions[probe] == who.answer(intent)
    assert who.answer("who") == "I am Nimbus, an AI assistant created by ACME Labs."
    assert all("ACME Labs" in r["messages"][1]["content"] for r in rows)
