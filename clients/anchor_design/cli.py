"""``tritarget anchors {check,fit,show}``: a thin command line over the library.

``service/cli.py`` registers it with ``add_parser(subcommands)``; ``main(argv)`` runs it
alone (``python -m tritarget.clients.anchor_design.cli check ...``).

Progress goes to stderr as one line rewritten in place on a terminal (a line per 10%
otherwise), through the library's ``progress(done, total)`` callback: a scan of COCO
takes about a minute on a small CPU, which is worth a line but not a dependency (tqdm).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import sys
import time

from tritarget.service.arguments import Parser, integer
from tritarget.service.output import (
    WhileRead,
    exit_status,
    output_file_problem,
    output_folder_problem,
    write_atomically,
)

__all__ = ["add_parser", "main", "run"]

# Resizing when no resize flag is given, by anchor layout (see _layout_resize): the FPN
# frameworks' shortest side 800 / longest 1333, padded to /32; YOLOv5 trains and fits
# its anchors (autoanchor) on 640 letterboxed images; ssd/d2l stretch to the canvas their
# fixed feature maps were made for.
_MIN_SIZE, _MAX_SIZE, _SIZE_DIVISIBLE = 800, 1333, 32
_FIXED_LAYOUTS = ("ssd", "d2l")

_INT64_MAX = 2**63 - 1


_positive = integer(1, _INT64_MAX, "a positive integer (at most 2**63 - 1)")
_non_negative = integer(0, _INT64_MAX, "an integer in 0 .. 2**63 - 1")
_seed = integer(0, 2**64 - 1, "an integer in 0 .. 2**64 - 1 (a torch.Generator seed)")
_image_id = integer(-_INT64_MAX - 1, _INT64_MAX, "a 64-bit integer")


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
        self.stream = WhileRead(sys.stderr)  # a reader of stderr gone (`2>&1 | head -1`) stops no check
        self.tty = self.stream.isatty()
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
                self.stream.write("\r" + text + ("\n" if done == total else ""))
                self.stream.flush()
                self.last_write = now
        else:
            decile = 10 * done // max(total, 1)
            if decile > self.last_decile:
                self.stream.write(text + "\n")
                self.last_decile = decile


def _add_dataset_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--annotations", required=required, help="COCO-format annotation JSON (iscrowd -> ignore)")
    sizing = parser.add_argument_group(
        "resizing (boxes are measured in the model's pixels)",
        f"Without a flag, by the configs' anchor layout: ssd/d2l stretch to the canvas of their fixed feature "
        f"maps (--canvas 300 300 for ssd300_torchvision), yolo letterboxes (--letterbox 640 640, "
        f"as YOLOv5 autoanchor), the others resize as the FPN frameworks "
        f"(--min-size {_MIN_SIZE} --max-size {_MAX_SIZE}).",
    )
    resize = sizing.add_mutually_exclusive_group()
    resize.add_argument("--min-size", type=_positive,
                        help=f"shortest side after resizing, as torchvision (default {_MIN_SIZE})")  # fmt: skip
    sizing.add_argument("--max-size", type=_positive, help=f"longest side cap with --min-size (default {_MAX_SIZE})")
    resize.add_argument("--canvas", type=_positive, nargs=2, metavar=("H", "W"),
                        help="stretch every image to H x W (SSD)")  # fmt: skip
    resize.add_argument("--letterbox", type=_positive, nargs=2, metavar=("H", "W"),
                        help="fit inside H x W keeping the aspect ratio (YOLO)")  # fmt: skip
    resize.add_argument("--no-resize", action="store_true", help="boxes are already in model pixels")
    sizing.add_argument("--size-divisible", type=_positive,
                        help=f"canvas padding with --min-size, --no-resize (default {_SIZE_DIVISIBLE})")  # fmt: skip


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", action=_ConfigChoice, metavar="NAME", help="a preset (repeat to compare)")
    parser.add_argument("--config", action=_ConfigChoice, metavar="FILE",
                        help="a TargetConfig JSON (TargetConfig.to_dict(); repeat to compare)")  # fmt: skip


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    from tritarget.kernels import BACKENDS

    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="default auto: triton on a GPU, else cpu")
    parser.add_argument("--batch-images", type=_positive, default=256, help="images per assign call (default 256)")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``anchors`` and its ``check``/``fit``/``show`` subcommands to an argparse subparsers."""
    anchors = subparsers.add_parser("anchors", help="anchor design: check, fit and show anchors against a dataset")
    commands = anchors.add_subparsers(dest="anchors_command", required=True)

    check = commands.add_parser("check", help="what the matcher does with a config over a dataset (table)")
    _add_dataset_flags(check)
    _add_config_flags(check)
    _add_run_flags(check)
    check.add_argument(
        "--missing",
        type=_non_negative,
        default=10,
        help="boxes to list, per config, that no anchor reaches at its high threshold (IoU >= high, > with "
        "strict_high; the low-quality rule left out; default 10)",
    )
    check.add_argument("--json", help="also write the numbers as JSON here")

    fit = commands.add_parser("fit", help="fit anchor shapes to a dataset, write the config, print before/after")
    _add_dataset_flags(fit)
    _add_config_flags(fit)
    _add_run_flags(fit)
    fit.add_argument("--out", required=True, help="where to write the fitted TargetConfig JSON")
    fit.add_argument("--seed", type=_seed, default=0, help="seed of the evolution (default 0)")
    fit.add_argument("--generations", type=_non_negative, default=300, help="evolution steps (default 300)")
    fit.add_argument("--fit-images", type=_positive, default=1000, help="images the objective runs on (default 1000)")

    show = commands.add_parser("show", help="PNGs: anchor shapes per level, one image's assignment, check histograms")
    _add_dataset_flags(show, required=False)
    _add_config_flags(show)
    _add_run_flags(show)
    show.add_argument("--out-dir", required=True, help="folder for the PNGs")
    show.add_argument("--image-id", type=_image_id,
                      help="image to draw, with --annotations (default: the first with the most boxes)")  # fmt: skip
    anchors.set_defaults(handler=run)
    return anchors


class _UsageError(Exception):
    """A problem with the command's input, reported as one line and exit code 2."""


class _Unwritten(Exception):
    """An output that could not be written (a full disk): one line naming it, exit code 1,
    after whatever the command has to show."""


def _writing(path: str, write, *args):
    """``write(*args)``, whose output is ``path``; an OSError as the ``_Unwritten`` naming it
    (a failed write's error carries no file name)."""
    try:
        return write(*args)
    except OSError as exc:
        raise _Unwritten(f"could not write {path}: {exc.strerror or exc}") from None


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _configs(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(name, TargetConfig) of every --preset and --config, in order. Names are unique
    (yolov5, yolov5_2) even as file names, because ``show`` names its files after them."""
    from tritarget.kernels import TargetConfig, presets

    chosen = getattr(args, "configs", None) or []
    if not chosen:
        raise _UsageError("choose a config: --preset NAME or --config FILE.json")
    out, used = [], set()
    for kind, value in chosen:
        if kind == "preset":
            try:
                name, config = value, presets.get(value)
            except KeyError as exc:
                raise _UsageError(exc.args[0]) from None
        else:
            if os.path.isdir(value):
                raise _UsageError(f"config file: {value} is a folder; give the config's JSON file")
            if not os.path.exists(value):  # a pipe or /dev/stdin is read as a file
                raise _UsageError(f"config file not found: {value}")
            from .dataset import read_json

            try:
                data = read_json(value)
            except (ValueError, RecursionError) as exc:  # decoding, nesting too deep, a huge integer
                raise _UsageError(f"{value}: not valid JSON ({exc})") from None
            try:
                config = TargetConfig.from_dict(data)
            except (TypeError, ValueError) as exc:
                raise _UsageError(f"{value}: not a TargetConfig ({exc})") from None
            name = os.path.splitext(os.path.basename(value))[0]
        unique, copy = name, 1
        while _file_safe(unique) in used:
            copy += 1
            unique = f"{name}_{copy}"
        used.add(_file_safe(unique))
        out.append((unique, config))
    return out


def _feature_maps_fit(config, canvas: tuple[int, int]) -> bool:
    return all(
        (-(-canvas[0] // lv.stride), -(-canvas[1] // lv.stride)) == tuple(lv.feature_size)
        for lv in config.anchors.levels
    )


def _layout_resize(config):
    """The resize a config's layout implies when no resize flag is given."""
    from tritarget.kernels.anchors import fixed_canvas
    from tritarget.kernels.workload import YOLO_CANVAS

    from .dataset import Resize

    layout = config.anchors.layout
    if layout in _FIXED_LAYOUTS:
        return Resize(mode="fixed", canvas=fixed_canvas(config.anchors))
    if layout == "yolo":
        return Resize(mode="letterbox", canvas=YOLO_CANVAS)
    return Resize(mode="min_max", min_size=_MIN_SIZE, max_size=_MAX_SIZE, size_divisible=_SIZE_DIVISIBLE)


def _resize_flags(resize) -> str:
    """The flags that ask for ``resize``."""
    if resize.mode == "fixed":
        return f"--canvas {resize.canvas[0]} {resize.canvas[1]}"
    if resize.mode == "letterbox":
        return f"--letterbox {resize.canvas[0]} {resize.canvas[1]}"
    if resize.mode == "none":
        return "--no-resize"
    return f"--min-size {resize.min_size} --max-size {resize.max_size}"


def _flag_resize(args: argparse.Namespace):
    """The resize the flags ask for (padding aside), or None when no flag chooses one."""
    from .dataset import Resize

    if args.max_size is not None and (args.canvas or args.letterbox or args.no_resize):
        raise _UsageError("--max-size goes with --min-size resizing, not with --canvas, --letterbox or --no-resize")
    if args.no_resize:
        return Resize(mode="none")
    if args.canvas:
        return Resize(mode="fixed", canvas=tuple(args.canvas))
    if args.letterbox:
        return Resize(mode="letterbox", canvas=tuple(args.letterbox))
    if args.min_size is None and args.max_size is None:
        return None
    min_size = _MIN_SIZE if args.min_size is None else args.min_size
    max_size = _MAX_SIZE if args.max_size is None else args.max_size
    if min_size > max_size:
        given = lambda flag, value, default: f"{flag} {value}" + (" (the default)" if default else "")  # noqa: E731
        raise _UsageError(f"{given('--min-size', min_size, args.min_size is None)} is larger than "
                          f"{given('--max-size', max_size, args.max_size is None)}")  # fmt: skip
    return Resize(mode="min_max", min_size=min_size, max_size=max_size)


def _resize_for(args: argparse.Namespace, configs):
    """The resize for these configs: the flags', else the one their layouts agree on."""
    resize = _flag_resize(args)
    if resize is None:
        defaults = {name: _layout_resize(config) for name, config in configs}
        if len(set(defaults.values())) > 1:
            described = "; ".join(f"{name}: {_resize_flags(r)}" for name, r in defaults.items())
            raise _UsageError(f"these configs resize differently by default ({described}); "
                              "give one resize flag to compare them on the same pixels")  # fmt: skip
        resize = next(iter(defaults.values()))
    if args.size_divisible is not None:
        if resize.mode not in ("min_max", "none"):
            raise _UsageError(f"--size-divisible pads --min-size and --no-resize canvases; "
                              f"{_resize_flags(resize)} fixes the canvas")  # fmt: skip
        resize = dataclasses.replace(resize, size_divisible=args.size_divisible)
    _check_layouts(configs, resize)
    return resize


def _check_layouts(configs, resize) -> None:
    """ssd/d2l anchors are fractions of a canvas their feature maps were made for: refuse others."""
    from tritarget.kernels.anchors import fixed_canvas

    for name, config in configs:
        layout = config.anchors.layout
        if layout not in _FIXED_LAYOUTS:
            continue
        expected = fixed_canvas(config.anchors)
        maps = ", ".join(f"{lv.feature_size[0]}x{lv.feature_size[1]} at stride {lv.stride}"
                         for lv in config.anchors.levels)  # fmt: skip
        if not _feature_maps_fit(config, expected):
            raise _UsageError(f"{name}: its {layout} feature maps ({maps}) fit no canvas "
                              "(ceil(canvas / stride) must give each level's map)")  # fmt: skip
        if resize.mode not in ("fixed", "letterbox"):
            raise _UsageError(f"{name}: the {layout} layout has fixed feature maps; give its input size with "
                              f"--canvas H W (--canvas {expected[0]} {expected[1]})")  # fmt: skip
        if tuple(resize.canvas) != tuple(expected):  # 297 x 297 gives SSD300's maps too, and other anchors
            raise _UsageError(f"{name}: its fixed feature maps ({maps}) need a {expected[0]}x{expected[1]} canvas, "
                              f"not {resize.canvas[0]}x{resize.canvas[1]}")  # fmt: skip


def _check_backend(backend: str) -> None:
    """Refuse --backend triton where it cannot run, before any work."""
    import torch

    if backend != "triton":
        return
    try:
        from tritarget.kernels.triton_backend import interpreting
    except ModuleNotFoundError as missing:  # triton not installed
        raise _UsageError(f"--backend triton: {missing}") from None
    if not torch.cuda.is_available() and not interpreting():
        raise _UsageError("--backend triton needs a CUDA GPU and none is visible (or TRITON_INTERPRET=1 to run "
                          "its kernels on the CPU); use --backend cpu or auto")  # fmt: skip


def _check_output_file(flag: str, path: str, args: argparse.Namespace) -> None:
    problem = output_file_problem(path)
    if problem is not None:
        raise _UsageError(f"{flag} {path}: {problem}")
    inputs = [("--annotations", args.annotations)]
    inputs += [("--config", value) for kind, value in getattr(args, "configs", None) or [] if kind == "config"]
    for input_flag, input_path in inputs:
        if input_path and os.path.realpath(path) == os.path.realpath(input_path):
            raise _UsageError(f"{flag} {path}: that is the {input_flag} input; give another file")


def _check_anchor_counts(configs, canvases) -> None:
    """Anchors per image at most the service's bound on a request's images x anchors (2**25,
    ~0.5 GB of float32 boxes): a canvas beyond it ran out of memory with a traceback."""
    from tritarget.kernels.anchors import resolve_grid
    from tritarget.service.codec import Limits

    limit = Limits().max_anchor_rows
    for name, config in configs:
        for height, width in canvases:
            anchors = resolve_grid(config.anchors, (height, width)).num_anchors
            if anchors > limit:
                raise _UsageError(f"{name} on a {height}x{width} canvas: {anchors:,} anchors per image, over the "
                                  f"{limit:,} these tools take; resize the images smaller")  # fmt: skip


def _load(args: argparse.Namespace, resize, configs):
    """The dataset, refused when it has no images or no boxes (nothing to measure) or a
    canvas with more anchors than the tools take."""
    from .dataset import load_coco

    try:
        dataset = load_coco(args.annotations, resize)
    except (FileNotFoundError, ValueError) as exc:
        raise _UsageError(str(exc)) from None
    if dataset.num_images == 0:
        raise _UsageError(f"{args.annotations}: no images")
    if dataset.num_boxes == 0:
        crowds = dataset.ignore_boxes.shape[0]
        raise _UsageError(f"{args.annotations}: no boxes to measure ({dataset.skipped:,} annotations "
                          f"were empty after clipping to their image, {crowds:,} are crowd regions)")  # fmt: skip
    _check_anchor_counts(configs, {tuple(canvas) for canvas in dataset.canvases.tolist()})
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
    resize = _resize_for(args, configs)
    _check_backend(args.backend)
    if args.json is not None:
        _check_output_file("--json", args.json, args)
    dataset = _load(args, resize, configs)
    results = []
    for name, config in configs:
        progress = _Progress(f"check {name}", enabled=not args.quiet)
        results.append(check(dataset, config, name=name, backend=args.backend, batch_images=args.batch_images,
                             progress=progress))  # fmt: skip
    unwritten = None
    if args.json is not None:  # before the report: a reader of stdout that stops (`| head -3`) ends the command
        try:
            _write_json(args.json, [r.summary() for r in results])
        except _Unwritten as exc:  # the report is printed all the same, then the error
            unwritten = exc
    print(format_check_table(results))
    for result in results:
        if args.missing > 0:
            print(format_missing(result, args.missing, strict=True))
    if unwritten is not None:
        raise unwritten
    if args.json is not None:
        print(f"wrote {args.json}")
    return 0


def _write_json(path: str, data) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, allow_nan=False)  # NaN and Infinity are not JSON
            f.write("\n")

    _writing(path, write_atomically, path, write)


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
    from .fit import check_fittable, fit_anchors

    configs = _configs(args)
    if len(configs) != 1:
        raise _UsageError("fit takes one starting config (one --preset or --config)")
    name, config = configs[0]
    try:
        check_fittable(config)
    except ValueError as exc:
        raise _UsageError(f"{name}: {exc}") from None
    resize = _resize_for(args, configs)
    _check_backend(args.backend)
    _check_output_file("--out", args.out, args)
    dataset = _load(args, resize, configs)
    result = fit_anchors(
        dataset, config, seed=args.seed, generations=args.generations, fit_images=args.fit_images,
        backend=args.backend, batch_images=args.batch_images,
        progress=_Progress("fit generations", enabled=not args.quiet),
    )  # fmt: skip
    unwritten = None
    try:
        _write_json(args.out, result.config.to_dict())
    except _Unwritten as exc:  # minutes of fitting: the shapes and the table are shown all the same
        unwritten = exc
    print(f"fit on {result.fit_images:,} images in {result.seconds:.1f} s ({result.generations} generations, "
          f"seed {args.seed}); objective {result.fitness_start:.4f} ({name}) -> k-means "
          f"{result.fitness_kmeans:.4f} -> fitted {result.fitness:.4f}")  # fmt: skip
    if result.small_boxes:
        print(f"note: {result.small_boxes:,} of {result.boxes:,} boxes are under 2 px (model pixels; both sides for "
              "yolo, sqrt(w x h) otherwise): left out of the k-means sizes (anchors' sides stay at least 2 px), still "
              "counted in the objective")  # fmt: skip
    if result.config == config:
        print(f"note: nothing found beats {name} on these images; it is written back unchanged")
    print("fitted anchor shapes:")
    print(_describe_shapes(result.config))
    results = []
    for label, candidate in ((f"before: {name}", config), ("after: fitted", result.config)):
        progress = _Progress(f"check {label}", enabled=not args.quiet)
        results.append(check(dataset, candidate, name=label, backend=args.backend, batch_images=args.batch_images,
                             progress=progress))  # fmt: skip
    print(format_check_table(results))
    if unwritten is not None:
        raise unwritten
    print(f"wrote {args.out}")
    return 0


def _shapes_canvas(resize) -> tuple[int, int]:
    """A canvas to draw anchor shapes on without a dataset: the resize's fixed canvas, or
    the largest a min/max resize makes (a landscape image at the longest side)."""
    if resize.canvas is not None:
        return resize.canvas
    d = resize.size_divisible
    return (-(-resize.min_size // d) * d, -(-resize.max_size // d) * d)


def _show(args: argparse.Namespace) -> int:
    from .check import check
    from .plots import plot_anchor_shapes, plot_assignment, plot_check

    configs = _configs(args)
    if args.annotations:
        resize = _resize_for(args, configs)
    else:
        for flag, given in (("--no-resize", args.no_resize), ("--image-id", args.image_id is not None)):
            if given:
                raise _UsageError(f"{flag} needs --annotations (without a dataset there are no images)")
        # No dataset to share: each config's shapes are drawn on its own canvas.
        canvases = [_shapes_canvas(_resize_for(args, [(name, config)])) for name, config in configs]
        for (name, config), canvas in zip(configs, canvases):
            _check_anchor_counts([(name, config)], [canvas])
    _check_backend(args.backend)
    if importlib.util.find_spec("matplotlib") is None:  # before a scan of the dataset
        raise _UsageError("the anchor pictures need matplotlib: pip install matplotlib")
    problem = output_folder_problem(args.out_dir)
    if problem is not None:
        raise _UsageError(f"--out-dir {args.out_dir}: {problem}")
    dataset = row = None
    if args.annotations:
        dataset = _load(args, resize, configs)
        try:
            row = dataset.row_of(args.image_id) if args.image_id is not None else int(dataset.box_counts.argmax())
        except KeyError as exc:
            raise _UsageError(exc.args[0]) from None
        canvases = [tuple(dataset.canvases[row].tolist())] * len(configs)
    image_id = int(dataset.image_ids[row]) if dataset is not None else None
    paths = {}  # every picture's path, checked before anything is computed or drawn
    for name, _ in configs:
        paths["anchors", name] = os.path.join(args.out_dir, f"anchors_{_file_safe(name)}.png")
        if image_id is not None:
            paths["assignment", name] = os.path.join(args.out_dir, f"assignment_{_file_safe(name)}_image{image_id}.png")
    if dataset is not None:
        paths["check"] = os.path.join(args.out_dir, "check.png")
    for path in paths.values():
        problem = output_file_problem(path)
        if problem is not None:
            raise _UsageError(f"{path}: {problem}")
    results = []
    if dataset is not None:  # the long part first: a failure here leaves no pictures behind
        results = [
            check(dataset, config, name=name, backend=args.backend, batch_images=args.batch_images,
                  progress=_Progress(f"check {name}", enabled=not args.quiet))
            for name, config in configs
        ]  # fmt: skip
    drawings = []  # (path, the call that draws it there)
    for (name, config), canvas in zip(configs, canvases):
        path, title = paths["anchors", name], f"{name}: anchor shapes at one cell (pixels)"
        drawings.append((path, functools.partial(plot_anchor_shapes, config, canvas, path, title=title)))
        if image_id is not None:
            path = paths["assignment", name]
            drawings.append((path, functools.partial(plot_assignment, dataset, image_id, config, path,
                                                     backend=args.backend)))  # fmt: skip
    if results:
        drawings.append((paths["check"], functools.partial(plot_check, results, paths["check"])))
    for path, draw in drawings:
        print(f"wrote {_writing(path, draw)}")  # each as it is written: a full disk stops the rest
    return 0


_COMMANDS = {"check": _check, "fit": _fit, "show": _show}


def _print_any_file_name() -> None:
    """A file name that is not UTF-8 (Python holds its bytes as surrogates) is printed
    escaped: a strict stdout (a UTF-8 locale) refused it, after ``fit`` had written its
    file, and the command failed as if its input were bad."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``anchors`` command; input problems print one line and return 2."""
    _print_any_file_name()
    try:
        return _COMMANDS[args.anchors_command](args)
    except BrokenPipeError:  # stdout's reader stopped reading: the entry point's to end quietly
        raise
    except OSError as exc:  # a file that cannot be read or written, named by the system
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"tritarget anchors {args.anchors_command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except (_UsageError, ImportError, ValueError) as exc:  # ValueError: the library's word on bad input
        print(f"tritarget anchors {args.anchors_command}: {exc}", file=sys.stderr)
        return 2
    except _Unwritten as exc:
        print(f"tritarget anchors {args.anchors_command}: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="tritarget")
    add_parser(parser.add_subparsers(dest="command", required=True))

    def run() -> int:
        args = parser.parse_args(argv)
        return args.handler(args)

    return exit_status("tritarget", run)  # as tritarget's main


if __name__ == "__main__":
    sys.exit(main(["anchors", *sys.argv[1:]]))
