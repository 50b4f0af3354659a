"""The README's Guarantees figures, generated from the simulator (``make guarantees``).

Every figure in the README's Guarantees table and power-loss paragraph comes
from a ``ringkv sim`` command shown beside it: the eventual tier's rows, and
the transactional tier's (the register workload under each nemesis, and the
negative controls, whose every run must be caught), and the table of
transactions across ranges (bank and list-append, read-only transactions,
and their controls, each caught in at least one run and the row says how
many). This module runs those commands in-process, through the same argument
parser as the command line, and rewrites the README's blocks between
``<!-- guarantees:begin NAME -->`` and ``<!-- guarantees:end NAME -->``
(``--block NAME``: only those, running only their commands). The prose
outside the blocks is written by hand; the wording inside them lives here.

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

from ringkv.sim.run import (
    TXN_WORKLOADS,
    SimResult,
    SimSettings,
    run_counts,
    series_counts,
    simulate,
)

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
# Transactions across ranges (issue #13): three nodes, the keyspace in four ranges,
# two-phase commit over their Paxos groups, under every register nemesis and the
# two aimed at two-phase commit; then the negative controls (broken participants).
ACROSS = ("ringkv sim --seed 1 --seeds 10 --nodes 3 --ops 300 --clients 6 --keys 8 "
          "--duration 30 --boot provisioned --max-skew 0.2 --nemesis partition,crash,pause,"
          "skew,kill-coordinator,cut-prepared")
CONTROL_BASE = "ringkv sim --seed 1 --seeds 10 --nodes 3 --keys 4 --boot provisioned"
ACROSS_ROWS = ("across_bank", "across_list_append")
ACROSS_CONTROLS: dict[str, str] = {  # name -> what it plants, and where it is caught
    "across_ctl_elr_bank": "`early-lock-release` (a participant releases its locks when it "
                           "votes yes), seen by the bank checker",
    "across_ctl_elr_list": "`early-lock-release`, seen by the list-append checker",
    "across_ctl_spl_bank": "`skip-prepare-log` (a participant votes yes without logging its "
                           "prepare), seen by the bank checker",
}
ACROSS_COMMANDS: dict[str, str] = {
    "across_bank": f"{ACROSS} --workload bank",
    "across_list_append": f"{ACROSS} --workload list-append",
    "across_ctl_elr_bank": f"{CONTROL_BASE} --clients 6 --ops 150 --duration 12 "
                           "--workload bank --fault early-lock-release",
    "across_ctl_elr_list": f"{CONTROL_BASE} --clients 8 --ops 200 --duration 10 "
                           "--workload list-append --fault early-lock-release",
    "across_ctl_spl_bank": f"{CONTROL_BASE} --clients 6 --ops 150 --duration 12 "
                           "--workload bank --nemesis kill-coordinator,cut-prepared "
                           "--fault skip-prepare-log",
}
COMMANDS.update(ACROSS_COMMANDS)
ACROSS_FOOTNOTES = (*ACROSS_ROWS, *ACROSS_CONTROLS)  # numbered on from TABLE_FOOTNOTES
STALE_HINT = "README guarantees are stale: run `make guarantees`"
# The counts a pin holds, in the order it prints them.
PIN_COUNTS = ("ops", "acked", "lost", "reads", "stale", "discarded", "faults")
REGISTER_PIN_COUNTS = ("ops", "acked", "unknown", "commits", "snapshots", "nonlinear", "early",
                       "snapshot_wrong", "too_stale", "unsafe", "faults")
ACROSS_PIN_COUNTS = ("ops", "committed", "aborted", "unknown", "reads", "anomalies", "faults")
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
        names = (REGISTER_PIN_COUNTS if result.settings.workload == "register"
                 else ACROSS_PIN_COUNTS if result.settings.workload in TXN_WORKLOADS
                 else PIN_COUNTS)
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
    """A row's footnote mark: its command's place in ``TABLE_FOOTNOTES``, then
    ``ACROSS_FOOTNOTES``."""
    if name in ACROSS_FOOTNOTES:
        return str(len(TABLE_FOOTNOTES) + ACROSS_FOOTNOTES.index(name) + 1).translate(_SUPERSCRIPT)
    return str(TABLE_FOOTNOTES.index(name) + 1).translate(_SUPERSCRIPT)


def render_across(t: Mapping[str, Counter[str]]) -> str:
    """Transactions across ranges and read-only transactions (issue #13), with their
    footnotes (``t``: each command's totals)."""
    b, la = t["across_bank"], t["across_list_append"]
    faults = ("partitions, kill -9, SIGSTOP, clocks skewed within the bound, the coordinator "
              "group's leader killed between prepare and commit, a participant's leader cut "
              "off while prepared")
    rows = [
        "| transactions | promise | measured |",
        "|---|---|---|",
        f"| across ranges (two-phase commit over 4 ranges' Paxos groups): bank transfers, "
        f"{faults} | a transfer commits in every range it writes or in none; every read-only "
        "snapshot of all the accounts sums to the starting total; no balance is negative | "
        f"**{_n(b['anomalies'])} wrong snapshots** (sum or sign) in {_n(b['runs'])} runs; "
        f"{_n(b['committed'])} transfers committed, {_n(b['aborted'])} certainly not, "
        f"{_n(b['unknown'])} of unknown outcome; {_n(b['unhealthy'])} runs left a transaction "
        f"prepared after healing; {_n(b['faults'])} faults {_note('across_bank')} |",
        "| across ranges: list-append (Elle), the same faults | strict serializability: no "
        "G0, G1a, G1b, G1c, G-single or G2, real-time edges included | "
        f"**{_n(la['anomalies'])} anomalies** in {_n(la['runs'])} runs; "
        f"{_n(la['ops'])} transactions ({_n(la['committed'])} append transactions committed, "
        f"{_n(la['aborted'])} certainly not, {_n(la['unknown'])} of unknown outcome); "
        f"{_n(la['unhealthy'])} runs left a transaction prepared after healing; "
        f"{_n(la['faults'])} faults {_note('across_list_append')} |",
        "| read-only transactions (no writes): lock-free, at `TT.now().latest`, from replicas "
        "whose safe time passed it; the same runs | one consistent cut across ranges, "
        "strictly serializable with every other transaction | "
        f"**{_n(b['anomalies'])} of {_n(b['reads'])} bank snapshots wrong** "
        f"{_note('across_bank')}; {_n(la['reads'])} list-append read-only transactions "
        f"judged with the rest, **{_n(la['anomalies'])} anomalies** "
        f"{_note('across_list_append')} |",
    ]
    caught = [f"{what}: caught in {_n(t[name]['failed'])} of {_n(t[name]['runs'])} runs "
              f"({_n(t[name]['anomalies'])} wrong snapshots or anomalies) {_note(name)}"
              for name, what in ACROSS_CONTROLS.items()]
    rows.append("| across ranges, negative controls (planted bugs) | each is caught | "
                + "; ".join(caught) + " |")
    start = len(TABLE_FOOTNOTES) + 1
    notes = [f"{i}. `{ACROSS_COMMANDS[name]}`"
             for i, name in enumerate(ACROSS_FOOTNOTES, start=start)]
    return "\n".join([*rows, "", *notes])


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
    "across": (ACROSS_FOOTNOTES, render_across),
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


def generate(readme: str, progress: Callable[[str], None] = print,
             blocks: tuple[str, ...] = tuple(BLOCKS)) -> str:
    """Run the commands of ``blocks`` (every block by default) and return ``readme``
    with those blocks rewritten.

    Raises ``RuntimeError`` (naming the replay commands) if any run breaks a
    promise: such a figure would be a bug to fix, not a figure to publish.
    """
    unknown = [b for b in blocks if b not in BLOCKS]
    if unknown:
        raise ValueError(f"no figure block {', '.join(unknown)}; choose from {', '.join(BLOCKS)}")
    wanted = {name for block in blocks for name in BLOCKS[block][0]}
    totals: dict[str, Counter[str]] = {}
    pins: dict[str, Pin] = {}
    failed: list[str] = []
    for name, command in COMMANDS.items():
        if name not in wanted:
            continue
        progress(f"$ {command}")
        results = run_series(command, progress)
        totals[name] = series_counts(results)
        totals[name]["runs"] = len(results)
        pins[name] = Pin.of(command, results[0])
        if name in TXN_CONTROLS:  # a planted bug: every run must be caught
            failed.extend(f"{r.settings.command()} (not caught)" for r in results if r.ok)
        elif name in ACROSS_CONTROLS:
            # A race the bug opens: caught in most runs, never in none (the row says how many).
            if all(r.ok for r in results):
                failed.append(f"{command} (caught in no run)")
        else:
            failed.extend(r.settings.command() for r in results if not r.ok)
    if failed:
        raise RuntimeError("runs broke a promise, or a control was not caught; replay with:\n"
                           + "\n".join(failed))
    for block in blocks:
        names, render = BLOCKS[block]
        body = render(totals) + "\n" + "\n".join(pins[name].render() for name in names)
        readme = replace_block(readme, block, body)
    return readme


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # --block NAME (repeatable): rewrite only those blocks, running only their commands.
    blocks = tuple(args[i + 1] for i, a in enumerate(args[:-1]) if a == "--block")
    paths = [a for i, a in enumerate(args)
             if a != "--block" and (i == 0 or args[i - 1] != "--block")]
    path = Path(paths[0] if paths else "README.md")
    try:
        text = generate(path.read_text(encoding="utf-8"), blocks=blocks or tuple(BLOCKS))
    except (RuntimeError, ValueError) as exc:
        print(f"guarantees: {exc}", file=sys.stderr)
        return 1
    path.write_text(text, encoding="utf-8")
    print(f"rewrote the Guarantees figures in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
