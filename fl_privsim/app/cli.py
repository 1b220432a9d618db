"""Command line: ``fl-privsim run [CONFIG.toml] [--set KEY=VALUE ...] [--out DIR]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Any

from fl_privsim.app.summary_text import dp_lines as _dp_lines
from fl_privsim.app.summary_text import outcome_notes as _outcome_notes
from fl_privsim.core import config as config_mod
from fl_privsim.core.errors import UserError
from fl_privsim.core.progress import configure_logging

RUN_EPILOG = """\
A config is TOML; it only needs the keys it changes. --set overrides any key:
  fl-privsim run --set federation.rounds=3 --set model.name=lenet
  fl-privsim run experiments/cifar10_npz_mlp.toml --set attacks.1.params.iterations=200
[[attacks]] in a file replaces the default attack list (analytic, idlg, inverting_gradients).

Config keys:
{keys}
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-privsim",
        description=(
            "Simulated federated learning (Flower + Ray) with an honest-but-curious server that "
            "attacks client updates and measures how much data leaks."
        ),
        epilog="Run `fl-privsim run --help` for the config keys.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a federation and its attacks",
        description="Run one simulated federation; results go to a run folder.",
        epilog=RUN_EPILOG.format(keys=config_mod.describe()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "config", nargs="?", help="TOML config file (default: the built-in default job)"
    )
    config_mod.add_set_option(run, "override one config key (repeatable)")
    run.add_argument("--out", help="run folder to create (default: <output.dir>/<UTC time>_<name>)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    show = sub.add_parser("config", help="print the resolved config as TOML")
    show.add_argument("config", nargs="?", help="TOML config file")
    config_mod.add_set_option(show)
    sub.add_parser(
        "attacks",
        help="list the registered attacks (with their threat models) and the "
        "malicious server's modifications",
    )
    rep = sub.add_parser(
        "reproduce",
        help="rerun a paper's experiment and write its table beside the paper's numbers",
        description="Run one reproduction; results (summary.json, table.md) go to a run folder. "
        "Settings come from experiments/reproduce/NAME.toml, then --config, then --set.",
    )
    rep.add_argument("name", nargs="?", help="reproduction name (see --list)")
    rep.add_argument(
        "--list", action="store_true", help="list the reproductions and their settings"
    )
    rep.add_argument(
        "--config", help="TOML file of settings (default: experiments/reproduce/NAME.toml)"
    )
    config_mod.add_set_option(rep, "override one setting (repeatable)")
    rep.add_argument("--out", help="run folder to create (default: runs/<UTC time>_reproduce_NAME)")
    rep.add_argument(
        "--quick", action="store_true", help="a small smoke-test version of the settings"
    )
    rep.add_argument("--verbose", action="store_true", help="log progress")
    rep.add_argument(
        "--json",
        action="store_true",
        help="print the summary (summary.json plus run_dir) as JSON instead of the table; with "
        "--list, the reproductions and their settings as JSON",
    )
    from fl_privsim.app.measure import add_parser as add_measure_parser

    add_measure_parser(sub)
    from fl_privsim.app.game import add_parser as add_game_parser

    add_game_parser(sub)
    from fl_privsim.app.sweep import add_parser as add_sweep_parser

    add_sweep_parser(sub)
    from fl_privsim.app.report import add_parser as add_report_parser

    add_report_parser(sub)
    return parser


def format_table(summary: dict[str, Any]) -> str:
    """The end-of-run table: per attack the mean PSNR, SSIM, AVD, ASR, leakage rate (``leak``:
    share of an update's clients with a record reconstructed at the ASR threshold) and label
    accuracy; an attack that scored nothing shows why (``refused: …`` / ``failed: …``). Then
    the ε of client and central DP, with δ and whether it is a proven bound."""

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [
        (
            f"{'attack':<30} {'attacked':>8} {'PSNR dB':>8} {'SSIM':>6} {'AVD':>6} {'ASR':>5} "
            f"{'leak':>5} {'label acc':>9} {'refused':>7} {'failed':>6}"
        )
    ]
    span = 8 + 6 + 6 + 5 + 5 + 9 + 5  # the score columns, where an unscored attack says why
    for name, row in summary.get("attacks", {}).items():
        counts = f"{int(row.get('refused', 0)):>7} {int(row.get('failed', 0)):>6}"
        notes = _outcome_notes(row)
        if (
            int(row.get("attacked", 0)) == 0
        ):  # nothing scored: the reason instead of a row of dashes
            text = "; ".join(notes) or ("-" if "auc" in row else "no update attacked")
            cell = textwrap.wrap(text, span) or [""]
            lines.append(f"{name:<30} {0:>8} {cell[0]:<{span}} {counts}")
            lines.extend(f"{'':<39} {more}" for more in cell[1:])
            continue
        lines.append(
            f"{name:<30} {int(row.get('attacked', 0)):>8} {fmt(row.get('psnr'), '.2f'):>8} "
            f"{fmt(row.get('ssim'), '.3f'):>6} {fmt(row.get('avd'), '.3f'):>6} {fmt(row.get('asr'), '.2f'):>5} "
            f"{fmt(row.get('leakage_rate'), '.2f'):>5} {fmt(row.get('label_accuracy'), '.3f'):>9} {counts}"
        )
        lines.extend(
            f"{'':<4}{note}" for note in notes
        )  # some updates scored, others refused or failed
    for name, row in summary.get(
        "attacks", {}
    ).items():  # inference attacks: AUC over the scored updates
        if "auc" in row:
            ci = row.get("auc_ci") or [float("nan")] * 2
            lines.append(
                f"{name}: AUC {row['auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] over {row.get('trials', 0)} "
                f"updates ({row.get('positives', 0)} with secret 1), accuracy "
                f"{row.get('accuracy', float('nan')):.3f}, advantage {row.get('advantage', float('nan')):.3f}"
            )
    server = summary.get("server") or {}
    if server.get("role") == "malicious":
        crafted = (
            "; ".join(
                f"round {r}: " + ", ".join(f"{m} for clients {c}" for m, c in mods.items())
                for r, mods in (server.get("crafted") or {}).items()
            )
            or "no round"
        )
        lines.append(f"malicious server crafted the model in {crafted}")
    for kind, what in (("refused", "refused to train"), ("failed", "failed")):
        errs = (summary.get("client_errors") or {}).get(kind) or {}
        if errs.get("total"):
            rounds = ", ".join(f"round {r}: {n}" for r, n in errs.get("by_round", {}).items())
            lines.append(
                f"clients that {what}: {errs['total']} ({rounds}); reason: {errs['reasons'][0]}"
            )
    ray = summary.get("ray") or {}
    if ray.get("address", "local") != "local":
        where = ray.get("client_actor_nodes") or {}
        lines.append(
            f"Ray cluster: {ray.get('connect', ray['address'])} "
            f"({len(ray.get('nodes') or [])} node(s) alive; client actors on "
            f"{', '.join(n[:12] for n in where) or 'nodes not recorded'})"
        )
    failures = summary.get("failures") or {}
    if failures.get("total"):
        rounds = ", ".join(f"round {r}: {n}" for r, n in failures.get("by_round", {}).items() if n)
        injected = failures.get("injected")
        also = f"; injected: {injected['total']}" if injected else ""
        lines.append(
            f"failed client replies left out of the aggregate: {failures['total']} ({rounds}){also}"
        )
    lines.extend(_dp_lines(summary))
    acc = summary.get("final_accuracy")
    lines.append("")
    lines.append(
        f"model test accuracy after round {summary.get('rounds')}: {fmt(acc, '.4f')}"
        f" (round 0: {fmt(summary.get('initial_accuracy'), '.4f')})"
    )
    return "\n".join(lines)


def _cmd_run(args: argparse.Namespace) -> int:
    from fl_privsim.app.simulation import run

    cfg = config_mod.load(args.config, args.overrides)
    configure_logging(args.verbose)
    run_dir, summary = run(cfg, out=args.out, show_progress=not args.quiet, verbose=args.verbose)
    print(format_table(summary))
    print(f"run folder: {run_dir}")
    return 0


def _cmd_attacks() -> int:
    import adversaries  # noqa: F401
    from adversaries.base import ATTACKS
    from adversaries.malicious import MODIFICATIONS

    for name in ATTACKS.names():
        cls = ATTACKS.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name}: {doc}")
        if getattr(cls, "modification", None):
            print(f"    needs the malicious server's modification: {cls.modification}")
        for req in getattr(cls, "requires", ()):
            print(f"    requires: {req}")
    print(
        '\nmodifications of a malicious server ([server] role = "malicious", [[server.modifications]]):'
    )
    for name in MODIFICATIONS.names():
        cls = MODIFICATIONS.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name}: {doc}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from fl_privsim.app import reproduce

    if args.list and args.json:
        print(
            json.dumps(
                {
                    name: {"title": repro.title, "settings": dict(repro.defaults)}
                    for name, repro in sorted(reproduce.REPRODUCTIONS.items())
                },
                indent=2,
                default=str,
            )
        )
        return 0
    if args.list or not args.name:
        for name in sorted(reproduce.REPRODUCTIONS):
            repro = reproduce.REPRODUCTIONS[name]
            print(f"{name}: {repro.title}")
            print("    settings: " + ", ".join(f"{k}={v!r}" for k, v in repro.defaults.items()))
        if not args.list:
            print("error: name a reproduction to run (fl-privsim reproduce NAME)", file=sys.stderr)
            return 2
        return 0
    configure_logging(args.verbose)
    path, result = reproduce.run_reproduction(
        args.name, config=args.config, overrides=args.overrides, out=args.out, quick=args.quick
    )
    if args.json:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        print(json.dumps({**summary, "run_dir": str(path)}, indent=2, default=str))
        return 0
    print(result.table)
    print(f"run folder: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; user errors print one line and exit with code 2."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "reproduce":
            return _cmd_reproduce(args)
        if args.command == "measure":
            from fl_privsim.app.measure import cmd_measure

            return cmd_measure(args)
        if args.command == "game":
            from fl_privsim.app.game import cmd_game

            return cmd_game(args)
        if args.command == "sweep":
            from fl_privsim.app.sweep import cmd_sweep

            return cmd_sweep(args)
        if args.command == "report":
            from fl_privsim.app.report import cmd_report

            return cmd_report(args)
        if args.command == "config":
            print(config_mod.to_toml(config_mod.load(args.config, args.overrides)), end="")
            return 0
        return _cmd_attacks()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        detail = str(exc) if exc.args and str(exc).startswith("run folder") else ""
        print(f"interrupted: {detail}" if detail else "interrupted", file=sys.stderr)
        if detail:  # an interrupted run: its folder is written and Ray shut down; leave now, not
            # after the ServerApp's thread (or Ray's own SIGTERM handling, which aborts) ends
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130


if __name__ == "__main__":
    sys.exit(main())
