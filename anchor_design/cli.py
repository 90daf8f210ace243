"""``tritarget anchors {check,fit,show}``: a thin command line over the library.

``service/cli.py`` registers it with ``add_parser(subcommands)``; ``main(argv)`` runs it
alone (``python -m tritarget.anchor_design.cli check ...``).

Progress goes to stderr as one line rewritten in place on a terminal (a line per 10%
otherwise), through the library's ``progress(done, total)`` callback: a scan of COCO
takes about a minute on a small CPU, which is worth a line but not a dependency (tqdm).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

__all__ = ["add_parser", "main", "run"]

_DEFAULT_SHAPES_CANVAS = (800, 1344)


class _ConfigChoice(argparse.Action):
    """--preset NAME and --config FILE append ("preset"|"config", value) to one ordered list."""

    def __call__(self, parser, namespace, value, option_string=None):
        kind = "preset" if option_string == "--preset" else "config"
        items = list(getattr(namespace, "configs", None) or [])
        items.append((kind, value))
        namespace.configs = items


class _Progress:
    """progress(done, total) on stderr: rewritten in place on a terminal, else every 10%."""

    def __init__(self, label: str, enabled: bool = True):
        self.label, self.enabled = label, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last_write, self.last_decile = 0.0, -1

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"{self.label}: {done:,}/{total:,} ({100 * done / max(total, 1):.0f}%), {rate:,.0f}/s"
        if self.tty:
            if now - self.last_write >= 0.2 or done == total:
                sys.stderr.write("\r" + text + ("\n" if done == total else ""))
                sys.stderr.flush()
                self.last_write = now
        else:
            decile = 10 * done // max(total, 1)
            if decile > self.last_decile:
                sys.stderr.write(text + "\n")
                self.last_decile = decile


def _add_dataset_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--annotations", required=required, help="COCO-format annotation JSON (iscrowd -> ignore)")
    resize = parser.add_mutually_exclusive_group()
    resize.add_argument("--min-size", type=int, default=800,
                        help="shortest side after resizing, torchvision/detectron2 style (default 800)")  # fmt: skip
    parser.add_argument("--max-size", type=int, default=1333, help="longest side cap with --min-size (default 1333)")
    resize.add_argument("--canvas", type=int, nargs=2, metavar=("H", "W"), help="stretch every image to H x W (SSD)")
    resize.add_argument("--letterbox", type=int, nargs=2, metavar=("H", "W"),
                        help="fit inside H x W keeping the aspect ratio (YOLO)")  # fmt: skip
    resize.add_argument("--no-resize", action="store_true", help="boxes are already in model pixels")
    parser.add_argument("--size-divisible", type=int, default=32, help="canvas padding multiple (default 32)")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", action=_ConfigChoice, metavar="NAME", help="a preset (repeat to compare)")
    parser.add_argument("--config", action=_ConfigChoice, metavar="FILE",
                        help="a TargetConfig JSON (TargetConfig.to_dict(); repeat to compare)")  # fmt: skip


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    from tritarget.kernels import BACKENDS

    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="default auto: triton on a GPU, else cpu")
    parser.add_argument("--batch-images", type=int, default=256, help="images per assign call (default 256)")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``anchors`` and its ``check``/``fit``/``show`` subcommands to an argparse subparsers."""
    anchors = subparsers.add_parser("anchors", help="anchor design: check, fit and show anchors against a dataset")
    commands = anchors.add_subparsers(dest="anchors_command", required=True)

    check = commands.add_parser("check", help="what the matcher does with a config over a dataset (table)")
    _add_dataset_flags(check)
    _add_config_flags(check)
    _add_run_flags(check)
    check.add_argument("--missing", type=int, default=10, help="boxes without a positive to list (default 10)")
    check.add_argument("--json", help="also write the numbers as JSON here")

    fit = commands.add_parser("fit", help="fit anchor shapes to a dataset, write the config, print before/after")
    _add_dataset_flags(fit)
    _add_config_flags(fit)
    _add_run_flags(fit)
    fit.add_argument("--out", required=True, help="where to write the fitted TargetConfig JSON")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--generations", type=int, default=300, help="evolution steps (default 300)")
    fit.add_argument("--fit-images", type=int, default=1000, help="images the objective runs on (default 1000)")

    show = commands.add_parser("show", help="PNGs: anchor shapes per level, one image's assignment, check histograms")
    _add_dataset_flags(show, required=False)
    _add_config_flags(show)
    _add_run_flags(show)
    show.add_argument("--out-dir", required=True, help="folder for the PNGs")
    show.add_argument("--image-id", type=int, help="image to draw (default: the first with the most boxes)")
    anchors.set_defaults(handler=run)
    return anchors


class _UsageError(Exception):
    """A problem with the command's input, reported as one line and exit code 2."""


def _resize(args: argparse.Namespace):
    from .dataset import Resize

    if args.no_resize:
        return Resize(mode="none", size_divisible=args.size_divisible)
    if args.canvas:
        return Resize(mode="fixed", canvas=tuple(args.canvas))
    if args.letterbox:
        return Resize(mode="letterbox", canvas=tuple(args.letterbox))
    return Resize(mode="min_max", min_size=args.min_size, max_size=args.max_size, size_divisible=args.size_divisible)


def _configs(args: argparse.Namespace) -> list[tuple[str, object]]:
    from tritarget.kernels import TargetConfig, presets

    chosen = getattr(args, "configs", None) or []
    if not chosen:
        raise _UsageError("choose a config: --preset NAME or --config FILE.json")
    out = []
    for kind, value in chosen:
        if kind == "preset":
            try:
                out.append((value, presets.get(value)))
            except KeyError as exc:
                raise _UsageError(exc.args[0]) from None
            continue
        if not os.path.isfile(value):
            raise _UsageError(f"config file not found: {value}")
        try:
            with open(value, encoding="utf-8") as f:
                data = json.load(f)
            config = TargetConfig.from_dict(data)
        except json.JSONDecodeError as exc:
            raise _UsageError(f"{value}: not valid JSON ({exc})") from None
        except (TypeError, ValueError) as exc:
            raise _UsageError(f"{value}: not a TargetConfig ({exc})") from None
        out.append((os.path.splitext(os.path.basename(value))[0], config))
    return out


def _check_layouts(configs, resize) -> None:
    for name, config in configs:
        if config.anchors.layout in ("ssd", "d2l") and resize.mode not in ("fixed", "letterbox"):
            raise _UsageError(f"{name}: the {config.anchors.layout} layout has fixed feature maps; "
                              "give its input size with --canvas H W (e.g. --canvas 300 300)")  # fmt: skip


def _load(args: argparse.Namespace, configs):
    from .dataset import load_coco

    resize = _resize(args)
    _check_layouts(configs, resize)
    try:
        dataset = load_coco(args.annotations, resize)
    except (FileNotFoundError, ValueError) as exc:
        raise _UsageError(str(exc)) from None
    print(f"{args.annotations}: {dataset.num_images:,} images, {dataset.num_boxes:,} boxes, "
          f"{dataset.ignore_boxes.shape[0]:,} crowd regions, {dataset.skipped:,} empty boxes skipped; "
          f"{_describe_resize(resize)}")  # fmt: skip
    return dataset


def _describe_resize(resize) -> str:
    if resize.mode == "min_max":
        return (f"resized to shortest side {resize.min_size}, longest <= {resize.max_size}, "
                f"canvas padded to /{resize.size_divisible}")  # fmt: skip
    if resize.mode == "fixed":
        return f"stretched to {resize.canvas[0]}x{resize.canvas[1]}"
    if resize.mode == "letterbox":
        return f"letterboxed into {resize.canvas[0]}x{resize.canvas[1]}"
    return f"not resized, canvas padded to /{resize.size_divisible}"


def _check(args: argparse.Namespace) -> int:
    from .check import check, format_check_table, format_missing

    configs = _configs(args)
    dataset = _load(args, configs)
    results = []
    for name, config in configs:
        progress = _Progress(f"check {name}", enabled=not args.quiet)
        results.append(check(dataset, config, name=name, backend=args.backend, batch_images=args.batch_images,
                             progress=progress))  # fmt: skip
    print(format_check_table(results))
    for result in results:
        if args.missing > 0:
            print(format_missing(result, args.missing, strict=True))
    if args.json:
        _write_json(args.json, [r.summary() for r in results])
        print(f"wrote {args.json}")
    return 0


def _write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _describe_shapes(config) -> str:
    lines = []
    anchors = config.anchors
    for i, level in enumerate(anchors.levels):
        if anchors.layout == "yolo":
            shapes = ", ".join(f"{w:.1f}x{h:.1f}" for w, h in level.shapes)
            lines.append(f"  level {i} (stride {level.stride}): (w x h) {shapes}")
        else:
            values = level.scales if anchors.layout == "mmdet" else level.sizes
            word = "scales" if anchors.layout == "mmdet" else "sizes"
            ratios = ", ".join(f"{r:.3f}" for r in level.aspect_ratios)
            lines.append(f"  level {i} (stride {level.stride}): {word} {', '.join(f'{v:.2f}' for v in values)}; "
                         f"h/w ratios {ratios}")  # fmt: skip
    return "\n".join(lines)


def _fit(args: argparse.Namespace) -> int:
    from .check import check, format_check_table
    from .fit import fit_anchors

    configs = _configs(args)
    if len(configs) != 1:
        raise _UsageError("fit takes one starting config (one --preset or --config)")
    name, config = configs[0]
    dataset = _load(args, configs)
    try:
        result = fit_anchors(
            dataset, config, seed=args.seed, generations=args.generations, fit_images=args.fit_images,
            backend=args.backend, batch_images=args.batch_images,
            progress=_Progress("fit generations", enabled=not args.quiet),
        )  # fmt: skip
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    _write_json(args.out, result.config.to_dict())
    print(f"fit on {result.fit_images:,} images in {result.seconds:.1f} s ({result.generations} generations, "
          f"seed {args.seed}); objective {result.fitness_start:.4f} ({name}) -> k-means "
          f"{result.fitness_kmeans:.4f} -> fitted {result.fitness:.4f}")  # fmt: skip
    print("fitted anchor shapes:")
    print(_describe_shapes(result.config))
    results = []
    for label, candidate in ((f"before: {name}", config), ("after: fitted", result.config)):
        progress = _Progress(f"check {label}", enabled=not args.quiet)
        results.append(check(dataset, candidate, name=label, backend=args.backend, batch_images=args.batch_images,
                             progress=progress))  # fmt: skip
    print(format_check_table(results))
    print(f"wrote {args.out}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from .check import check
    from .plots import plot_anchor_shapes, plot_assignment, plot_check

    configs = _configs(args)
    written = []
    dataset = _load(args, configs) if args.annotations else None
    row = None
    if dataset is not None:
        if args.image_id is not None:
            try:
                row = dataset.row_of(args.image_id)
            except KeyError as exc:
                raise _UsageError(exc.args[0]) from None
        else:
            row = int(dataset.box_counts.argmax()) if dataset.num_images else None
    if dataset is not None and row is not None:
        canvas = tuple(dataset.canvases[row].tolist())
    elif args.canvas or args.letterbox:
        canvas = tuple(args.canvas or args.letterbox)
    else:
        canvas = _DEFAULT_SHAPES_CANVAS
    for name, config in configs:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        written.append(plot_anchor_shapes(config, canvas, os.path.join(args.out_dir, f"anchors_{safe}.png"),
                                          title=f"{name}: anchor shapes at one cell (pixels)"))  # fmt: skip
        if row is not None:
            image_id = int(dataset.image_ids[row])
            path = os.path.join(args.out_dir, f"assignment_{safe}_image{image_id}.png")
            written.append(plot_assignment(dataset, image_id, config, path, backend=args.backend))
    if dataset is not None:
        results = [
            check(dataset, config, name=name, backend=args.backend, batch_images=args.batch_images,
                  progress=_Progress(f"check {name}", enabled=not args.quiet))
            for name, config in configs
        ]  # fmt: skip
        written.append(plot_check(results, os.path.join(args.out_dir, "check.png")))
    for path in written:
        print(f"wrote {path}")
    return 0


_COMMANDS = {"check": _check, "fit": _fit, "show": _show}


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``anchors`` command; input problems print one line and return 2."""
    try:
        return _COMMANDS[args.anchors_command](args)
    except (_UsageError, ImportError) as exc:
        print(f"tritarget anchors {args.anchors_command}: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritarget")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main(["anchors", *sys.argv[1:]]))
