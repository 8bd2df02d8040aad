"""`robustprune run | report | prune | evaluate | list | bench`."""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import signal
import sys
from pathlib import Path

from robustprune.errors import UserError, excerpt

MAX_CELLS = 10_000  # default of run --max-cells: a grid larger than this is most likely a typo


def _console():
    from rich.console import Console
    from rich.errors import NotRenderableError
    from rich.measure import Measurement

    class WholeLines(Console):
        """Files and pipes: 160 columns, widened for whatever needs more. A terminal crops each line
        at its edge; text meant for a file must stay whole, never cut mid-word."""

        def print(self, *objects, **kwargs):
            if kwargs.get("width") is not None:
                return super().print(*objects, **kwargs)
            options = self.options.update_width(1 << 20)
            need = 0
            for obj in objects:
                try:
                    need += Measurement.get(self, options, obj).maximum + 1
                except NotRenderableError:
                    need += len(str(obj)) + 1
            width = self.width
            self.width = max(width, need)
            try:
                return super().print(*objects, **kwargs)
            finally:
                self.width = width

        def on_broken_pipe(self) -> None:  # rich would exit 1 here; main() ends quietly instead
            self.quiet = True
            raise BrokenPipeError

    console = Console(highlight=False)
    if not console.is_terminal:  # logs and pipes
        console = WholeLines(highlight=False, width=160)
    return console


def cmd_run(args) -> int:
    from robustprune.data.base import OFFLINE_ENV
    from robustprune.study.cells import count_cells, expand
    from robustprune.study.runner import prepare
    from robustprune.study.schema import load_study
    from robustprune.study.store import Store

    if args.address and args.executor != "ray":
        raise UserError("--address is the Ray cluster of --executor ray; add --executor ray or remove --address")
    study = load_study(args.study, args.budget, args.seeds, args.set)
    # (the schema allows a name only as a label, so the default folder stays inside runs/)
    out_dir = Path(args.out) if args.out else Path("runs", Path(study.name).name)
    not_a_folder(out_dir, "--out")
    n_cells = count_cells(study)  # counted, not built: a grid of millions must not fill memory first
    if n_cells > args.max_cells:
        raise UserError(
            f"the study has {n_cells:,} cells, over the limit of {args.max_cells:,}; shrink its grid (seeds, "
            f"regimes, sparsities, ...) or, if you mean it, raise the limit with --max-cells {n_cells}"
        )
    cells = expand(study)
    if args.offline:
        os.environ[OFFLINE_ENV] = "1"  # (read by the data loaders, in worker processes too)
    ws = prepare(study, out_dir, args.data_dir, args.device, args.checkpoints)  # bad input: nothing written yet
    store = Store(out_dir / "results.sqlite")
    try:
        return _run(args, study, cells, store, out_dir, ws)
    finally:
        store.close()


def _run(args, study, cells, store, out_dir, ws) -> int:
    from robustprune.progress import RichProgress
    from robustprune.report.render import print_tables
    from robustprune.study.runner import run_study

    console = _console()
    n_done = len(store.done_hashes() & {c.hash for c in cells})
    console.print(
        f"[bold]{study.name}[/] (budget {args.budget}): {len(cells)} cells, {n_done} already stored, "
        f"{len(study.seeds)} seed(s) -> {out_dir}/results.sqlite"
    )
    recorded = []

    def record_run() -> None:
        # The run is recorded with its first stored cell (or at its end): a run stopped by bad
        # input before storing anything leaves the store exactly as it was.
        if not recorded:
            store.record_run(
                study.name,
                args.budget,
                shlex.join(["robustprune", *sys.argv[1:]]),
                study.model_dump(mode="json"),
                [c.hash for c in cells],
            )
            recorded.append(True)

    try:
        with RichProgress(console, len(cells), on_computed=record_run) as progress:
            counts = run_study(
                study,
                cells,
                store,
                out_dir,
                args.data_dir,
                args.device,
                progress,
                args.workers,
                args.checkpoints,
                args.executor,
                args.address,
                ws,
            )
    except KeyboardInterrupt:
        console.print(
            f"[yellow]interrupted[/]: finished cells are stored in {out_dir}/results.sqlite; "
            "run the same command again to resume"
        )
        return 130
    record_run()
    console.print(f"computed {counts['computed']} cells, {counts['skipped']} from the store, {counts['failed']} failed")
    print_tables(console, study, store.cells([c.hash for c in cells]))
    return 0


def not_a_folder(path: Path, option: str) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder; give a folder (it is created if missing)")


def cmd_report(args) -> int:
    from robustprune.report.render import report

    if args.out:
        from robustprune.report.document import write_report

        not_a_folder(Path(args.out), "--out")
        path = write_report(args.dirs, args.out)
        _console().print(f"report: {path}", highlight=False)
        return 0
    if args.claims:
        from robustprune.report.render import report_claims

        report_claims(args.dirs, args.format, _console())
        return 0
    if args.robustbench:
        from robustprune.report.render import load_results
        from robustprune.report.robustbench_export import export_robustbench

        not_a_folder(Path(args.robustbench), "--robustbench")
        for folder in args.dirs:
            study, cells = load_results(folder)
            target = Path(args.robustbench) / Path(folder).name if len(args.dirs) > 1 else Path(args.robustbench)
            paths = export_robustbench(study, cells, target)
            _console().print(f"RobustBench entries: {len(paths)} files in {target}", highlight=False)
        return 0
    report(args.dirs, args.format, _console(), figures=args.figures)
    return 0


def cmd_list(args) -> int:
    from rich.table import Table

    from robustprune.attacks import ATTACKS, SHIFTS
    from robustprune.attacks.corruptions import CORRUPTIONS
    from robustprune.data import DATASETS, REGIMES
    from robustprune.data.augment import BATCH_TRANSFORMS
    from robustprune.models import MODELS
    from robustprune.pruning import PRUNING_METHODS
    from robustprune.pruning.criteria import CRITERIA

    console = _console()
    for title, reg in [
        ("Datasets", DATASETS),
        ("Models", MODELS),
        ("Training regimes", REGIMES),
        ("Batch transforms (train.mix)", BATCH_TRANSFORMS),
        ("Pruning methods", PRUNING_METHODS),
        ("Pruning criteria", CRITERIA),
        ("Attacks", ATTACKS),
        ("Distribution shifts", SHIFTS),
    ]:
        t = Table(title=title, title_justify="left", show_header=False, box=None)
        for name, doc in reg.describe():
            t.add_row(f"[bold]{name}[/]", doc)
        console.print(t)
    console.print(f"[bold]Corruption types[/] (severities 1-5): {', '.join(CORRUPTIONS)}")
    return 0


def cmd_bench(args) -> int:
    from robustprune.bench import run_bench

    run_bench(_console(), args)
    return 0


def _workers(text: str):
    if text == "auto":
        return text
    try:
        return _at_least_one(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"'{excerpt(text, 40)}' is not a number of workers >= 1 or 'auto'") from None


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"'{excerpt(text, 40)}' is not a whole number >= 1")
    return n


class Parser(argparse.ArgumentParser):
    """Option mistakes get one sentence and exit code 2, like every other bad input."""

    def error(self, message):
        # (argparse quotes the bad value whole: a 5000-digit --seeds would fill the screen)
        self.exit(2, f"{self.prog}: error: {excerpt(message, 300)}; see '{self.prog} -h'\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="robustprune", description="Prune networks and measure their robustness.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a study file (resumes where it stopped)")
    r.add_argument("study", help="study file (YAML), e.g. studies/mnist_pruning_robustness.yaml")
    r.add_argument("--out", help="output folder (default runs/<study name>)")
    r.add_argument("--data-dir", help="data folder (default $ROBUSTPRUNE_DATA or the user cache folder)")
    r.add_argument("--seeds", type=int, help="run seeds 0..N-1 instead of the study's seeds")
    r.add_argument("--budget", default="full", help="named budget from the study file (default full)")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set train.epochs=3 (repeatable)",
    )
    r.add_argument(
        "--checkpoints",
        metavar="DIR",
        help="folder of trained models and derived data sets (default OUT/checkpoints); they are named "
        "by the hash of what they depend on, so studies with the same dense training can share one",
    )
    r.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local worker processes (default), or Ray tasks: one per job, on a local Ray instance or "
        "the cluster at --address (pip install 'robustprune[ray]')",
    )
    r.add_argument(
        "--max-cells",
        type=_at_least_one,
        default=MAX_CELLS,
        metavar="N",
        help=f"refuse a study of more than N cells (default {MAX_CELLS:,}), which is most likely a typo in its grid",
    )
    r.add_argument("--address", help="Ray cluster address for --executor ray, e.g. 10.0.0.1:6379 or auto")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument(
        "--offline",
        action="store_true",
        help="never download: a missing data file is an error (also ROBUSTPRUNE_OFFLINE=1)",
    )
    r.add_argument(
        "--workers",
        default="auto",
        type=_workers,
        help="parallel worker processes (default auto: one per CPU core up to 8, 1 on a GPU)",
    )
    r.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="print the tables of stored results")
    rep.add_argument("dirs", nargs="+", help="study output folder(s) holding results.sqlite")
    rep.add_argument(
        "--format",
        choices=["markdown", "csv", "table"],
        default="table",
        help="table (terminal), markdown, or csv (long format: one row per cell and metric)",
    )
    rep.add_argument(
        "--figures",
        metavar="FOLDER",
        help="also write the figures as PNG files into FOLDER (one subfolder per study folder when several are given)",
    )
    rep.add_argument(
        "--out",
        metavar="FOLDER",
        help="write a self-contained report instead: FOLDER/report.md with every table and figure, "
        "the tables as CSV and LaTeX, the figures as PNG and every stored number as CSV",
    )
    rep.add_argument(
        "--claims",
        action="store_true",
        help="only the paper's claims listed in the study file: paper vs measured difference (paired over seeds, "
        "95 %% interval, Holm-corrected) and a verdict per claim; --format markdown or csv for files",
    )
    rep.add_argument(
        "--robustbench",
        metavar="FOLDER",
        help="write every stored AutoAttack result as a RobustBench model-info JSON file into FOLDER "
        "(one per cell and eps) instead of printing tables",
    )
    rep.set_defaults(func=cmd_report)
    from robustprune.cli_model import add_parsers

    add_parsers(sub, _at_least_one, _console)
    ls = sub.add_parser("list", help="registered datasets, models, regimes, pruning methods, attacks")
    ls.set_defaults(func=cmd_list)
    b = sub.add_parser("bench", help="training throughput vs the matrix-multiply peak; attack and corruption speed")
    b.add_argument(
        "--section",
        choices=["all", "training", "evaluation", "cifar", "attacks", "resnet20"],
        default="all",
        help="training (matmul peak, training, FGSM), evaluation (PGD-20 vs torchattacks on MNIST, "
        "corruption suite), cifar (pruning speed of ResNet-56, training throughput of the CIFAR "
        "models), all (default: those three), attacks (PGD-20 and AutoAttack vs the torchattacks "
        "reference on a clean and an adversarially trained MNIST CNN, several minutes), or "
        "resnet20 (the fast trainer on real CIFAR-10, about 20 minutes)",
    )
    b.add_argument("--seconds", type=float, default=5.0, help="time spent on each training measurement")
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--device", default="auto")
    b.add_argument("--data-dir", help="data folder holding mnist/ (default $ROBUSTPRUNE_DATA or the user cache folder)")
    b.add_argument("--json", metavar="PATH", help="also write every measured figure to this JSON file")
    # smaller sizes for quick checks (tests); their figures are not comparable with the full-size ones
    b.add_argument("--train-images", type=int, metavar="N", help="train on the first N MNIST images (default all)")
    b.add_argument("--epochs", type=int, metavar="N", help="resnet20 section: train N epochs (default the recipe's 40)")
    b.add_argument(
        "--eval-images",
        type=int,
        default=10000,
        metavar="N",
        help="attack the first N MNIST test images (default 10000)",
    )
    b.add_argument(
        "--autoattack-images",
        type=int,
        default=500,
        metavar="N",
        help="attacks section: run both AutoAttacks on the first N test images (default 500)",
    )
    b.add_argument(
        "--corruption-images", type=int, default=10000, metavar="N", help="corrupt N CIFAR-sized images (default 10000)"
    )
    b.set_defaults(func=cmd_bench)
    return p


def _stop(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not break the clean-up of the first
    raise KeyboardInterrupt


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what could not be written stays
    silent (the sentence already said why)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured in tests)
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed one line of usage and the problem
        return 2 if e.code else 0
    try:  # SIGTERM (schedulers, kill) stops a command the way Ctrl-C does
        previous = signal.signal(signal.SIGTERM, _stop)
    except ValueError:  # not the main thread: the caller handles signals
        previous = None
    try:
        code = args.func(args)
        sys.stdout.flush()  # a full disk under a redirected stdout shows here, not at exit
        return code
    except UserError as e:
        print(f"robustprune: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (`robustprune report DIR | head`): nothing is wrong
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:  # (run prints its own line and returns 130; this is every other moment)
        print("robustprune: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        # every file robustprune writes says which one; a bare stream error is the output itself
        where = e.filename or "the output (standard output)"
        print(
            f"robustprune: error: cannot write {where} ({e.strerror}); free some space there or send the output "
            "elsewhere",
            file=sys.stderr,
        )
        _quiet_stdout()
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
