"""README's Guarantees figures still match what the code measures.

``make guarantees`` runs every command behind the figures and pins, in the
README, each command's first seed: its history hash and counts. Replaying
those first seeds (about a second each) is a cheap check that the figures
are not stale; the figures themselves are sums over all seeds, too slow to
recompute here.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from ringkv.sim import guarantees
from ringkv.sim.checkers import Verdict
from ringkv.sim.guarantees import COMMANDS, STALE_HINT, Pin, first_seed_pin, parse_pins, stale_pins
from ringkv.sim.run import SimResult

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def current_pins() -> dict[str, Pin]:
    """Each command's first seed, replayed two at a time: a simulation depends on its
    seed and settings alone, so the pins are those ``make guarantees`` gets one by
    one, in about half the time on two cores."""
    commands = list(COMMANDS.values())
    workers = max(1, min(2, os.cpu_count() or 1))
    # spawn: a fresh interpreter, not a fork of this one and whatever threads it holds.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(commands, pool.map(first_seed_pin, commands)))


def test_readme_pins_match_the_first_seed_of_every_command(current_pins: dict[str, Pin]) -> None:
    problems = stale_pins(README.read_text(encoding="utf-8"), current_pins)
    assert not problems, STALE_HINT + "\n" + "\n".join(problems)


def test_a_planted_hash_mismatch_is_reported_stale(current_pins: dict[str, Pin]) -> None:
    """The check above can fail: alter one pinned hash and it names that command."""
    readme = README.read_text(encoding="utf-8")
    command = COMMANDS["one_q_faults"]
    pin = parse_pins(readme)[command]
    altered = readme.replace(pin.render(), pin.render().replace(
        f"hash {pin.history_hash}", "hash 0123456789abcdef"))
    assert altered != readme
    problems = stale_pins(altered, current_pins)
    assert len(problems) == 1 and f"`{command}`" in problems[0]
    assert "0123456789abcdef" in problems[0] and pin.history_hash in problems[0]


def test_a_command_without_a_pin_is_reported_stale(current_pins: dict[str, Pin]) -> None:
    readme = README.read_text(encoding="utf-8")
    command = COMMANDS["power_mixed_batch"]
    without = readme.replace(parse_pins(readme)[command].render(), "")
    assert stale_pins(without, current_pins) == [f"no pin for `{command}`"]


def test_every_figure_block_and_footnote_is_in_the_readme() -> None:
    """Both generated blocks exist, and every command is shown beside its figures."""
    readme = README.read_text(encoding="utf-8")
    for block in guarantees.BLOCKS:
        assert readme.count(f"<!-- guarantees:begin {block} -->") == 1
        assert readme.count(f"<!-- guarantees:end {block} -->") == 1
    for command in COMMANDS.values():
        assert f"`{command}`" in readme, command


def test_commands_parse_with_the_command_lines_own_parser() -> None:
    settings, seeds = guarantees.parse_command(COMMANDS["power_mixed"])
    assert (settings.seed, seeds, settings.nodes, settings.ops, settings.duration_s) == (
        900, 10, 4, 1000, 30.0)
    assert settings.nemesis == ("crash", "power", "partition")
    with pytest.raises(ValueError, match="not a ringkv sim command"):
        guarantees.parse_command("ringkv bench --seed 1")


def test_replace_block_keeps_the_prose_around_it() -> None:
    text = "before\n<!-- guarantees:begin x -->\nold\n<!-- guarantees:end x -->\nafter\n"
    assert guarantees.replace_block(text, "x", "new") == (
        "before\n<!-- guarantees:begin x -->\nnew\n<!-- guarantees:end x -->\nafter\n")
    with pytest.raises(ValueError, match="no <!-- guarantees:begin y -->"):
        guarantees.replace_block(text, "y", "new")


def test_a_negative_control_that_is_not_caught_stops_the_figures(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The controls' row says each planted bug is caught in every run: a run of a
    control that passes every checker is refused, like a healthy run that fails."""
    names = ("lost writes", "stale reads", "reads of values", "replicas", "writes discarded",
             "resurrected values", "linearizable", "commit wait", "snapshot reads", "bounded staleness", "safe time")
    passing = [Verdict(name, True, "0 items") for name in names]

    def every_run_passes(command: str, progress: object) -> list[SimResult]:
        settings, _ = guarantees.parse_command(command)
        return [SimResult(settings, [], [], 0, passing, "0" * 16, "", {}, 0.0)]

    monkeypatch.setattr(guarantees, "run_series", every_run_passes)
    with pytest.raises(RuntimeError, match="not caught") as raised:
        guarantees.generate(README.read_text(encoding="utf-8"), progress=lambda line: None)
    for name in guarantees.TXN_CONTROLS:
        assert COMMANDS[name].split("--fault ")[1] in str(raised.value)
    assert str(raised.value).count("(not caught)") == len(guarantees.TXN_CONTROLS)
