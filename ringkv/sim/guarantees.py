"""The README's Guarantees figures, generated from the simulator (``make guarantees``).

Every figure in the README's Guarantees table and power-loss paragraph comes
from a ``ringkv sim`` command shown beside it: the eventual tier's rows, and
the transactional tier's (the register workload under each nemesis, and the
negative controls, whose every run must be caught). This module runs those commands
in-process, through the same argument parser as the command line, and rewrites
the two blocks of the README between ``<!-- guarantees:begin NAME -->`` and
``<!-- guarantees:end NAME -->``. The prose outside the blocks is written by
hand; the wording inside them lives here.

Each block also carries a hidden pin per command: the history hash and the
counts of its first seed. One seed takes about a second, so the test suite
replays the first seeds and reports the README stale when the code no longer
produces what it says (``stale_pins``).
"""

from __future__ import annotations

import re
import shlex
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ringkv.sim.run import SimResult, SimSettings, run_counts, series_counts, simulate

FAULT_MIX = "--nemesis partition,crash,pause,clog"
# Every command behind a figure, by the name the rendering below uses.
COMMANDS: dict[str, str] = {
    "qq_faults": f"ringkv sim --seed 1 --seeds 10 --ops 2000 {FAULT_MIX}",
    "qq": "ringkv sim --seed 1 --seeds 10 --ops 2000",
    "all_one_faults": f"ringkv sim --seed 1 --seeds 10 --ops 2000 --write ALL --read ONE {FAULT_MIX}",
    "one_q_faults": f"ringkv sim --seed 1 --seeds 10 --ops 2000 --write ONE --read QUORUM {FAULT_MIX}",
    "one_one": "ringkv sim --seed 1 --seeds 10 --ops 2000 --write ONE --read ONE",
    "one_one_faults": f"ringkv sim --seed 1 --seeds 10 --ops 2000 --write ONE --read ONE {FAULT_MIX}",
    "skew": "ringkv sim --seed 1 --seeds 10 --ops 2000 --nemesis skew",
    # Nodes join, leave, die for good and lose their disks while clients write,
    # delete and read; tombstones may be purged within the run (after gc_grace
    # and a repair).
    "topology": ("ringkv sim --seed 1 --seeds 10 --ops 2000 --nemesis join,decommission,"
                 "removenode,wipe --deletes 0.1 --gc-grace 20"),
    "power": "ringkv sim --seed 1 --seeds 10 --ops 2000 --nemesis power",
    "power_mixed": ("ringkv sim --seed 900 --seeds 10 --ops 1000 --duration 30 --nodes 4 "
                    "--nemesis crash,power,partition"),
    "power_mixed_batch": ("ringkv sim --seed 900 --seeds 10 --ops 1000 --duration 30 --nodes 4 "
                          "--nemesis crash,power,partition --commit-sync batch"),
}
# The transactional tier: single-key registers (read, write, compare-and-set) and
# snapshot reads on a keyspace with RF 3, five nodes; then the negative controls.
REGISTER = ("ringkv sim --seed 1 --seeds 10 --workload register --ops 1000 --clients 8 "
            "--keys 5 --duration 30 --boot provisioned")
TXN_ROWS: dict[str, tuple[str, str]] = {  # name -> (what the row says, the command's tail)
    "txn_partition": ("partitions of every shape", "--nemesis partition"),
    "txn_crash": ("kill -9 and restart", "--nemesis crash"),
    "txn_pause": ("SIGSTOP and SIGCONT", "--nemesis pause"),
    "txn_leader": ("the range's leader killed or cut off; clogged links", "--nemesis leader,clog"),
    "txn_skew": ("clocks skewed within the bound: a minority 100-200 ms off, drifting and "
                 "stepping", "--nemesis skew --max-skew 0.2"),
    "txn_mix": ("all of partitions, kill -9, SIGSTOP and skew within the bound",
                "--nemesis partition,crash,pause,skew --max-skew 0.2"),
}
TXN_CONTROLS: dict[str, tuple[str, str]] = {
    "ctl_commit_wait": ("`skip-commit-wait`: leaders answer without commit wait",
                        "--fault skip-commit-wait"),
    "ctl_fencing": ("`no-fencing`: a minority of clocks 1-2 s off (beyond the bound), and "
                    "nodes carry on with their own clock", "--nemesis skew,leader --max-skew 2.0 "
                    "--fault no-fencing"),
    "ctl_safe_time": ("`snapshot-ignores-safe-time`: replicas serve snapshot reads without "
                      "waiting for their safe time", "--nemesis partition "
                      "--fault snapshot-ignores-safe-time"),
}
COMMANDS.update({name: f"{REGISTER} {tail}"
                 for name, (_, tail) in {**TXN_ROWS, **TXN_CONTROLS}.items()})
TABLE_FOOTNOTES = ("qq_faults", "qq", "all_one_faults", "one_q_faults", "one_one",
                   "one_one_faults", "topology", "skew", *TXN_ROWS,
                   *TXN_CONTROLS)  # footnotes 1, 2, ... in order
POWER_COMMANDS = ("power", "power_mixed", "power_mixed_batch")
STALE_HINT = "README guarantees are stale: run `make guarantees`"
# The counts a pin holds, in the order it prints them.
PIN_COUNTS = ("ops", "acked", "lost", "reads", "stale", "discarded", "faults")
REGISTER_PIN_COUNTS = ("ops", "acked", "unknown", "commits", "snapshots", "nonlinear", "early",
                       "snapshot_wrong", "too_stale", "unsafe", "faults")
_PIN = re.compile(r"<!-- pin (?P<command>ringkv sim [^|]+?) \| seed (?P<seed>\d+) \| "
                  r"hash (?P<hash>[0-9a-f]+) \| (?P<counts>[a-z0-9_ ]+) -->")


def parse_command(command: str) -> tuple[SimSettings, int]:
    """The settings of the first seed, and how many seeds, of a ``ringkv sim`` line."""
    from ringkv.cli import build_parser, sim_settings  # the command line's own parser

    argv = shlex.split(command)
    if argv[:2] != ["ringkv", "sim"]:
        raise ValueError(f"not a ringkv sim command: {command!r}")
    args = build_parser().parse_args(argv[1:])
    return sim_settings(args), args.seeds


@dataclass(frozen=True)
class Pin:
    """What a command's first seed gave: its history hash and its counts."""

    command: str
    seed: int
    history_hash: str
    counts: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, command: str, result: SimResult) -> Pin:
        counts = run_counts(result)
        names = REGISTER_PIN_COUNTS if result.settings.workload == "register" else PIN_COUNTS
        return cls(command, result.settings.seed, result.history_hash,
                   tuple((name, counts[name]) for name in names))

    def render(self) -> str:
        counts = " ".join(f"{name} {value}" for name, value in self.counts)
        return f"<!-- pin {self.command} | seed {self.seed} | hash {self.history_hash} | {counts} -->"


def parse_pins(text: str) -> dict[str, Pin]:
    pins = {}
    for match in _PIN.finditer(text):
        words = match["counts"].split()
        counts = tuple((name, int(value)) for name, value in zip(words[::2], words[1::2]))
        pins[match["command"]] = Pin(match["command"], int(match["seed"]), match["hash"], counts)
    return pins


def first_seed_pin(command: str) -> Pin:
    settings, _ = parse_command(command)
    return Pin.of(command, simulate(settings))


def stale_pins(readme: str, current: Mapping[str, Pin]) -> list[str]:
    """How the README's pins differ from ``current`` (command -> the pin the code
    gives now); empty when the README is up to date."""
    pinned = parse_pins(readme)
    problems = []
    for command, now in current.items():
        was = pinned.get(command)
        if was is None:
            problems.append(f"no pin for `{command}`")
        elif was != now:
            problems.append(f"`{command}`, seed {now.seed}: the README pins hash "
                            f"{was.history_hash} ({_show(was)}); the code gives "
                            f"{now.history_hash} ({_show(now)})")
    problems.extend(f"a pin for a command no figure uses: `{command}`"
                    for command in pinned if command not in current)
    return problems


def _show(pin: Pin) -> str:
    return ", ".join(f"{name} {value}" for name, value in pin.counts)


# -- rendering ------------------------------------------------------------------


def _n(value: int) -> str:
    return f"{value:,}"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "n/a"


_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def _note(name: str) -> str:
    """A row's footnote mark: its command's place in ``TABLE_FOOTNOTES``."""
    return str(TABLE_FOOTNOTES.index(name) + 1).translate(_SUPERSCRIPT)


def render_txn_rows(t: Mapping[str, Counter[str]]) -> list[str]:
    """The transactional tier's rows: each nemesis, then the negative controls."""
    rows = []
    for i, (name, (what, _)) in enumerate(TXN_ROWS.items()):
        c = t[name]
        promise = ("strict serializability: the register history (reads, writes, "
                   "compare-and-set) is linearizable; every commit's `s` has passed in true "
                   "time when it is acknowledged (commit wait); a snapshot read at `t` returns "
                   "the newest commit at or below `t`, is served at or below the replica's "
                   "safe time, and a bounded-staleness read is within its bound"
                   if i == 0 else "as above")
        rows.append(
            f"| SERIAL (transactional), {what} | {promise} | **{_n(c['nonlinear'])} of "
            f"{_n(c['runs'])} runs not linearizable, {_n(c['early'])} of {_n(c['commits'])} "
            f"commits acknowledged before `s`, {_n(c['snapshot_wrong'])} of "
            f"{_n(c['snapshots'])} snapshot reads wrong, {_n(c['too_stale'])} too stale, "
            f"{_n(c['unsafe'])} served above safe time**; {_n(c['ops'])} ops "
            f"({_n(c['acked'])} acknowledged writes and compare-and-sets, {_n(c['unknown'])} "
            f"of unknown outcome), {_n(c['faults'])} faults {_note(name)} |")
    caught = []
    for name, (what, _) in TXN_CONTROLS.items():
        c = t[name]
        found = [f"{_n(c['nonlinear'])} runs not linearizable" if c["nonlinear"] else "",
                 f"{_n(c['early'])} commits acknowledged before `s`" if c["early"] else "",
                 f"{_n(c['snapshot_wrong'])} snapshot reads wrong" if c["snapshot_wrong"] else "",
                 f"{_n(c['too_stale'])} too stale" if c["too_stale"] else "",
                 f"{_n(c['unsafe'])} served above safe time" if c["unsafe"] else ""]
        caught.append(f"{what}: caught in {_n(c['failed'])} of {_n(c['runs'])} runs "
                      f"({', '.join(f for f in found if f)}) {_note(name)}")
    rows.append("| SERIAL, negative controls (planted bugs) | each is caught | "
                + "; ".join(caught) + " |")
    return rows


def render_topology_row(c: Counter[str]) -> str:
    """The eventual tier while the ring changes under the workload."""
    return (
        "| QUORUM / QUORUM during join, decommission, removenode and wipe | as for QUORUM / "
        "QUORUM while nodes join (streaming their ranges), leave, are removed once dead, or "
        "lose their disk and are replaced (`--replace`); and no read returns a value after "
        "its deletion was acknowledged, with tombstones purged after gc_grace and a repair | "
        f"**{_n(c['lost'])} lost of {_n(c['acked'])} acknowledged writes and deletes, "
        f"{_n(c['stale'])} stale of {_n(c['reads'])} reads, {_n(c['resurrected'])} reads of a "
        f"deleted value** ({_n(c['deletes'])} deletes acknowledged), {_n(c['ops'])} ops, "
        f"{_n(c['faults'])} topology changes over {_n(c['runs'])} runs {_note('topology')} |")


def render_table(t: Mapping[str, Counter[str]]) -> str:
    """The Guarantees table and its footnotes (``t``: each command's totals)."""
    f, q, a, oq, o, of_, s = (t[name] for name in ("qq_faults", "qq", "all_one_faults",
                                                   "one_q_faults", "one_one", "one_one_faults",
                                                   "skew"))
    rows = [
        "| writes / reads | promise | measured |",
        "|---|---|---|",
        "| QUORUM / QUORUM | R + W > N: no acknowledged write is lost, and no read returns a "
        "value older than a write acknowledged before the read began | under faults: "
        f"**{_n(f['lost'])} lost of {_n(f['acked'])} acknowledged writes, {_n(f['stale'])} stale "
        f"of {_n(f['reads'])} reads**, {_n(f['ops'])} ops, {_n(f['faults'])} faults (partitions of "
        "every shape, kill -9 and restart, SIGSTOP, clogged links) ¹; without faults: "
        f"{_n(q['lost'])} lost of {_n(q['acked'])}, {_n(q['stale'])} stale of {_n(q['reads'])} ² |",
        "| ALL / ONE | R + W > N, as above; a write fails while any replica is down | "
        f"{_n(a['lost'])} lost of {_n(a['acked'])}, {_n(a['stale'])} stale of {_n(a['reads'])} "
        f"reads, {_n(a['faults'])} faults ³ |",
        "| ONE / QUORUM | no acknowledged write is lost (hints and read repair bring every "
        "replica up to date); reads may be stale, R + W = N | "
        f"{_n(oq['lost'])} lost of {_n(oq['acked'])}; {_n(oq['stale'])} of {_n(oq['reads'])} "
        f"reads stale ({_pct(oq['stale'], oq['reads'])}) under faults ⁴ |",
        "| ONE / ONE | no acknowledged write is lost; reads may be stale | "
        f"{_n(o['lost'])} lost of {_n(o['acked'])} without faults, {_n(of_['lost'])} of "
        f"{_n(of_['acked'])} under faults; stale reads {_pct(o['stale'], o['reads'])} without "
        f"faults ({_n(o['stale'])} of {_n(o['reads'])}) ⁵, {_pct(of_['stale'], of_['reads'])} "
        f"under faults ({_n(of_['stale'])} of {_n(of_['reads'])}) ⁶ |",
        render_topology_row(t["topology"]),
        "| QUORUM / QUORUM with skewed clocks | none for order: last write wins by timestamp, "
        "not by real time | clocks off by up to ±250 ms, drifting ±200 ppm and stepping: "
        f"**{_n(s['discarded'])} of {_n(s['acked'])} acknowledged writes "
        f"({_pct(s['discarded'], s['acked'])}) silently discarded** by an earlier write that "
        f"carried a later timestamp; {_n(s['lost'])} acknowledged writes missing from the final "
        f"state; {_n(s['stale'])} of {_n(s['reads'])} reads stale "
        f"({_pct(s['stale'], s['reads'])}) {_note('skew')} |",
        *render_txn_rows(t),
    ]
    notes = [f"{i}. `{COMMANDS[name]}`" for i, name in enumerate(TABLE_FOOTNOTES, start=1)]
    return "\n".join([*rows, "", *notes])


def render_power(t: Mapping[str, Counter[str]]) -> str:
    """The power-loss measurements (``t``: each command's totals)."""
    p, m, b = (t[name] for name in POWER_COMMANDS)
    return (
        f"Measured: with power losses alone, {_n(p['lost'])} lost of {_n(p['acked'])} "
        f"acknowledged writes and {_n(p['stale'])} of {_n(p['reads'])} reads stale over "
        f"{_n(p['faults'])} power losses (`{COMMANDS['power']}`); mixed with kill -9 and "
        f"partitions on 4 nodes, {_n(m['lost'])} lost of {_n(m['acked'])} and {_n(m['stale'])} "
        f"of {_n(m['reads'])} reads stale (`{COMMANDS['power_mixed']}`); the same with "
        f"`--commit-sync batch`, {_n(b['lost'])} lost of {_n(b['acked'])} and {_n(b['stale'])} "
        f"of {_n(b['reads'])} reads stale (`{COMMANDS['power_mixed_batch']}`)."
    )


BLOCKS: dict[str, tuple[tuple[str, ...], Callable[[Mapping[str, Counter[str]]], str]]] = {
    "table": (TABLE_FOOTNOTES, render_table),
    "power": (POWER_COMMANDS, render_power),
}


def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- guarantees:begin {name} -->", f"<!-- guarantees:end {name} -->"
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"README has no {begin} ... {end} block")
    return text[: start + len(begin)] + "\n" + body + "\n" + text[stop:]


# -- generating -----------------------------------------------------------------


def run_series(command: str, progress: Callable[[str], None]) -> list[SimResult]:
    settings, seeds = parse_command(command)
    results = []
    for seed in range(settings.seed, settings.seed + seeds):
        results.append(simulate(replace(settings, seed=seed)))
        progress(f"  seed {seed}: hash {results[-1].history_hash}, "
                 f"{results[-1].wall_s:.1f} s{'' if results[-1].ok else ', FAILED'}")
    return results


def generate(readme: str, progress: Callable[[str], None] = print) -> str:
    """Run every command and return ``readme`` with both blocks rewritten.

    Raises ``RuntimeError`` (naming the replay commands) if any run breaks a
    promise: such a figure would be a bug to fix, not a figure to publish.
    """
    totals: dict[str, Counter[str]] = {}
    pins: dict[str, Pin] = {}
    failed: list[str] = []
    for name, command in COMMANDS.items():
        progress(f"$ {command}")
        results = run_series(command, progress)
        totals[name] = series_counts(results)
        totals[name]["runs"] = len(results)
        pins[name] = Pin.of(command, results[0])
        if name in TXN_CONTROLS:  # a planted bug: every run must be caught
            failed.extend(f"{r.settings.command()} (not caught)" for r in results if r.ok)
        else:
            failed.extend(r.settings.command() for r in results if not r.ok)
    if failed:
        raise RuntimeError("runs broke a promise, or a control was not caught; replay with:\n"
                           + "\n".join(failed))
    for block, (names, render) in BLOCKS.items():
        body = render(totals) + "\n" + "\n".join(pins[name].render() for name in names)
        readme = replace_block(readme, block, body)
    return readme


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "README.md")
    try:
        text = generate(path.read_text(encoding="utf-8"))
    except (RuntimeError, ValueError) as exc:
        print(f"guarantees: {exc}", file=sys.stderr)
        return 1
    path.write_text(text, encoding="utf-8")
    print(f"rewrote the Guarantees figures in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
