"""Targets for a training loop's batches, from the service or in-process.

Batches are what torchvision-style detection loaders yield: ``(images, targets)``, with
``images`` a padded ``Tensor[B, C, H, W]`` (or anything, given ``canvas=``) and
``targets`` a list of per-image dicts holding ``"boxes"`` (``Tensor[N, 4]`` xyxy pixels
of the padded canvas) and ``"labels"`` (``Tensor[N]``), optionally ``"image_id"``,
``"ignore_boxes"`` (``Tensor[M, 4]`` crowd regions, in the boxes' format) and
``"image_size"`` / ``"pad_size"`` (the image's valid and padded ``(height, width)``,
mmdet's ``img_shape`` / ``pad_shape``; every image or none). The
targets are for that canvas: a model that resizes and pads again (torchvision's
``model.transform``) must see the same one, so resize in the loader to the model's size.

* ``with_targets(loader, ...)`` wraps an iterable of batches in the trainer's process
  (one per DDP rank): with a ``client`` it keeps up to ``in_flight`` later batches'
  requests in flight on one stream while the trainer works on a batch, and yields
  ``(images, targets, assigned)`` in order; without one it computes in-process
  (``backend=``).
* ``TargetCollate(collate_fn, ...)`` computes the targets inside the ``DataLoader``
  workers instead (each worker calls the service for its own batches); it pickles,
  so it works with ``fork``, ``spawn`` and ``forkserver`` workers.

``assigned`` is ``Targets`` (``densify=True``, the default) or ``SparseTargets``;
``device=`` moves (or densifies) it there.
"""

from __future__ import annotations

import inspect
import queue
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tritarget.kernels import SparseTargets, TargetConfig, Targets, assign, assign_sparse, presets
from tritarget.kernels.api import BACKENDS
from tritarget.kernels.sampling import fresh_seed

from .client import TargetClient, TargetServiceError, check_densify, checked_timeout, naming_images
from .wire import BOX_FORMATS, as_tensor, build_request, checked_canvas, normalised, row_sizes, to_xyxy

__all__ = ["with_targets", "TargetCollate", "boxes_of"]


def boxes_of(
    targets: Sequence[Mapping[str, Any]], box_format: str = "xyxy", canvas: Sequence[int] | None = None
) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
    """(gt_boxes [N, 4] float32 xyxy pixels, gt_counts [B], gt_classes [N] or None) of
    per-image dicts whose boxes are in ``box_format``: the boxes the batch's targets were
    assigned against, as ``assign`` and the IoU box losses (``gt_boxes=``) take them. A
    normalised format's fractions are of each image's ``"image_size"`` where the dicts carry
    it, else of ``canvas`` (the padded batch's (height, width)). torchvision's
    ``tv_tensors.BoundingBoxes`` of another format are refused (read as ``box_format``,
    they made other targets). On the device the dicts' tensors are on."""
    boxes, counts, classes = _rows_of(targets, box_format)
    if box_format == "xyxy":
        return boxes, counts, classes
    sizes = None
    if normalised(box_format):
        image_sizes = _sizes(targets, "image_size")
        if image_sizes is None and canvas is None:
            raise ValueError(f"box_format {box_format!r}: normalised boxes are fractions of their images: give "
                             "canvas=(height, width), or an 'image_size' in every target dict")  # fmt: skip
        sizes = row_sizes("boxes", boxes.shape[0], "counts", counts, canvas, image_sizes).to(boxes.device)
    return to_xyxy(boxes, box_format, sizes).to(torch.float32), counts, classes


def _rows_of(
    targets: Sequence[Mapping[str, Any]], box_format: str
) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
    """``boxes_of``'s boxes as the dicts hold them (in ``box_format``: the client and the
    in-process solver convert them, with the batch's sizes)."""
    if not targets:
        raise ValueError("targets: the batch has no images")
    boxes, counts, labels = [], [], []
    for i, target in enumerate(targets):
        if "boxes" not in target:
            raise ValueError(f"targets[{i}]: no 'boxes' (a Tensor[N, 4] of xyxy pixels)")
        image_boxes = _box_rows(target["boxes"], f"targets[{i}]['boxes']", box_format)
        boxes.append(image_boxes)
        counts.append(image_boxes.shape[0])
        if "labels" in target:
            image_labels = as_tensor(target["labels"]).reshape(-1)
            if image_labels.numel() == 0:  # often torch.zeros(0), a float: it must not make the batch float
                image_labels = image_labels.long()
            elif image_labels.is_floating_point() or image_labels.is_complex() or image_labels.dtype == torch.bool:
                raise TypeError(f"targets[{i}]['labels']: expected integer class ids, got {image_labels.dtype}")
            if image_labels.numel() != image_boxes.shape[0]:  # joined, a short and a long image add up
                raise ValueError(
                    f"targets[{i}]['labels']: {image_labels.numel()} labels for {image_boxes.shape[0]} boxes"
                )
            labels.append(image_labels)
    if labels and len(labels) != len(targets):
        raise ValueError("targets: give 'labels' for every image or for none")
    classes = torch.cat(labels) if labels else None
    return torch.cat(boxes), counts, None if classes is None else classes.to(boxes[0].device)


def _box_rows(value: Any, where: str, box_format: str) -> torch.Tensor:
    """One image's boxes as ``Tensor[N, 4]`` float32, however an empty set is shaped."""
    tagged = getattr(getattr(value, "format", None), "name", None)  # tv_tensors.BoundingBoxes
    if tagged is not None and tagged.lower() not in BOX_FORMATS:  # XYWHR, CXCYWHR, XYXYXYXY
        raise ValueError(f"{where}: BoundingBoxes in format {tagged}: rotated boxes are not supported (axis-aligned "
                         "xyxy, xywh or cxcywh only)")  # fmt: skip
    if tagged is not None and tagged.lower() != box_format:
        raise ValueError(f"{where}: BoundingBoxes in format {tagged}, but box_format is {box_format!r}: "
                         f"pass box_format={tagged.lower()!r}")  # fmt: skip
    rows = as_tensor(value)
    if rows.dtype == torch.bool or rows.is_complex():  # integers are pixels; these are no coordinates
        raise TypeError(f"{where}: expected box coordinates (float or integer pixels), got {rows.dtype}")
    rows = rows.to(torch.float32)
    if rows.numel() == 0:
        return rows.reshape(0, 4)
    if rows.dim() != 2 or rows.shape[1] != 4:
        raise ValueError(f"{where}: expected shape [N, 4], got {list(rows.shape)}")
    return rows


# Per-image keys of a target dict beyond boxes and labels, and the request fields they make:
# each image's valid and padded size (mmdet's img_shape and pad_shape, for the border rules
# and each level's valid anchors). Crowd regions come as "ignore_boxes".
_SIZE_KEYS = {"image_size": "image_sizes", "pad_size": "pad_sizes"}


def _per_image(targets: Sequence[Mapping[str, Any]], box_format: str, device: torch.device) -> dict[str, Any]:
    """The request fields the batch's images carry: ``ignore_boxes`` + ``ignore_counts``
    (an image without the key, or with None, has none; on ``device``, the gt boxes'),
    ``image_sizes``, ``pad_sizes`` (every image or none)."""
    fields: dict[str, Any] = {}
    if any(target.get("ignore_boxes") is not None for target in targets):
        ignore = [_box_rows(_or_empty(target.get("ignore_boxes")), f"targets[{i}]['ignore_boxes']", box_format)
                  .to(device) for i, target in enumerate(targets)]  # fmt: skip
        fields["ignore_boxes"] = torch.cat(ignore)
        fields["ignore_counts"] = [rows.shape[0] for rows in ignore]
    for key, field in _SIZE_KEYS.items():
        sizes = _sizes(targets, key)
        if sizes is not None:
            fields[field] = sizes
    return fields


def _sizes(targets: Sequence[Mapping[str, Any]], key: str) -> torch.Tensor | None:
    """The images' ``key`` sizes [B, 2] (every image or none), or None."""
    carried = [key in target for target in targets]
    if not any(carried):
        return None
    if not all(carried):
        raise ValueError(f"targets[{carried.index(False)}]: no {key!r}, but other images have one: "
                         "give it for every image or for none")  # fmt: skip
    return torch.stack([_size(target[key], f"targets[{i}][{key!r}]") for i, target in enumerate(targets)])


def _or_empty(boxes: Any) -> Any:
    """An image's ignore boxes; it has none without the key or with None."""
    return () if boxes is None else boxes


def _size(value: Any, where: str) -> torch.Tensor:
    """An image's (height, width) in integer pixels."""
    size = torch.as_tensor(value, device="cpu").reshape(-1)
    if size.is_floating_point() or size.is_complex() or size.dtype == torch.bool:
        raise TypeError(f"{where}: expected integer pixels (height, width), got {size.dtype}")
    if size.numel() != 2:
        raise ValueError(f"{where}: expected (height, width), got {size.numel()} values")
    return size.to(torch.int64).cpu()


def _batch_request(images: Any, targets: Sequence[Mapping[str, Any]], canvas: Sequence[int] | None,
                   options: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The assign arguments of one batch: its boxes, counts, classes and canvas, and the
    per-image fields its target dicts carry (refused when also given as options)."""
    box_format = options.get("box_format", "xyxy")
    boxes, counts, classes = _rows_of(targets, box_format)
    request = {"gt_boxes": boxes, "gt_counts": counts, "gt_classes": classes,
               "canvas": _canvas(images, canvas, len(targets))}  # fmt: skip
    for field, value in _per_image(targets, box_format, boxes.device).items():
        if field in options:
            raise ValueError(f"{field}: given as an option and by the batch's target dicts: give one")
        request[field] = value
    return request


def _given_canvas(canvas: Any) -> tuple[int, int] | None:
    """``canvas=`` checked as the client checks it (a float side was truncated to another
    canvas); an integer array or tensor of the two sides is taken too, as the loader
    always took it."""
    if isinstance(canvas, (torch.Tensor, np.ndarray)):
        canvas = canvas.tolist()
    return None if canvas is None else checked_canvas(canvas)


def _canvas(images: Any, canvas: Sequence[int] | None, batch: int) -> tuple[int, int]:
    """The canvas of a batch whose targets are for ``batch`` images."""
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] != batch:
        raise ValueError(f"images: a Tensor[B, C, H, W] of {images.shape[0]} images, but targets for {batch}")
    if canvas is not None:
        return canvas
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return int(images.shape[-2]), int(images.shape[-1])
    raise ValueError("canvas: give canvas=(H, W), or batches whose images are one padded Tensor[B, C, H, W]")


def _image_ids(targets: Sequence[Mapping[str, Any]]) -> list[Any] | None:
    """The dataset's id of each image, for error messages only: a tensor id as its value,
    or its list of values (torchvision's detection references carry ``image_id`` as an
    int; some datasets as ``Tensor[1]``, a few as several numbers)."""
    if all("image_id" in t for t in targets):
        return [_id_value(t["image_id"]) for t in targets]
    return None


def _id_value(image_id: Any) -> Any:
    if isinstance(image_id, (torch.Tensor, np.ndarray)):  # numbers, or a numpy array of names
        values = image_id.reshape(-1).tolist()
        return values[0] if len(values) == 1 else values
    return image_id


def _placed(assigned: Targets | SparseTargets, densify: bool, device) -> Targets | SparseTargets:
    if isinstance(assigned, SparseTargets) and densify:
        return assigned.to_dense(device)
    return assigned if device is None else assigned.to(device)


# Request options that only shape what the service sends (the deltas' precision and the
# response's form on the wire, whether classes travel) or bound a call's time: in-process
# targets are float32 with classes, so the same call works with and without a client.
_WIRE_ONLY = ("delta_dtype", "return_classes", "format", "timeout")

# What ``options`` may hold: a request's options (what each batch brings aside) and a call's timeout.
_OPTIONS = frozenset(inspect.signature(build_request).parameters) - {
    "gt_boxes", "gt_counts", "canvas", "preset", "config", "gt_classes", "request_id", "seeds"
} | {"timeout"}  # fmt: skip
# The options whose values a batch does not change, checked when the loader is made.
_SCALAR_OPTIONS = ("box_format", "drop_invalid", "format", "delta_dtype", "return_classes", "return_max_iou", "seed")


def _check_options(backend: str, options: Mapping[str, Any]) -> None:
    """Refuse a misspelt option or backend when the loader is made (in a DataLoader's
    collate, the first batch would find it out in a worker, after they started)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}; got {backend!r}")
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}; the options are {', '.join(sorted(_OPTIONS))}")
    if "timeout" in options:  # a client's stream checks it at the first batch; in-process, nothing would
        checked_timeout("timeout", options["timeout"], "no deadline")
    scalars = {name: options[name] for name in _SCALAR_OPTIONS if name in options}
    if scalars:  # their values as a request checks them: the request of one image without boxes
        build_request(torch.zeros(0, 4), [0], (1, 1), preset="retinanet_torchvision", **scalars)


def _with_overrides(config: TargetConfig, options: Mapping[str, Any]) -> TargetConfig:
    """The config a request with these options is assigned with."""
    overrides = options.get("overrides")
    return config.replace(**overrides) if overrides else config


class _InProcess:
    """The in-process fallback: ``assign`` (or ``assign_sparse``) on the given backend,
    with the request options a client would send applied here (``overrides`` to the
    config, ``box_format`` to the boxes)."""

    def __init__(self, config: TargetConfig, backend: str, densify: bool, options: Mapping[str, Any],
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        options = {name: value for name, value in options.items() if name not in _WIRE_ONLY}
        # Solved on the host for the host backends; where the targets are wanted when that is
        # a GPU and the backend may use it (the boxes travel, a few KB; the targets would be
        # megabytes); else where the boxes are.
        device = None if device is None else torch.device(device)
        if backend in ("cpu", "reference"):
            self.device = torch.device("cpu")
        else:
            self.device = device if device is not None and device.type == "cuda" else None
        self.config = _with_overrides(config, options)
        options.pop("overrides", None)
        self.box_format = options.pop("box_format", "xyxy")
        ignore = options.get("ignore_boxes")
        if ignore is not None:  # as the client converts them: numpy, lists, integers; float32 before corners
            if not isinstance(ignore, torch.Tensor):
                ignore = torch.as_tensor(ignore, dtype=torch.float32, device="cpu")
            elif ignore.dtype != torch.bool and not ignore.is_complex():  # those: refused by name, as by the client
                ignore = ignore.to(torch.float32)  # (x + w in float64, then rounded, made a box the wire's refused)
            options["ignore_boxes"] = ignore  # in box_format: a normalised one is scaled per batch
        self.backend, self.densify, self.options = backend, densify, options

    def __call__(self, request: Mapping[str, Any], image_ids=None) -> Targets | SparseTargets:
        """Targets of a batch's ``_batch_request``."""
        solve = assign if self.densify else assign_sparse
        request = dict(request)
        for field in ("gt_boxes", "ignore_boxes", "gt_classes"):
            if self.device is not None and request.get(field) is not None:
                request[field] = request[field].to(self.device)
        options = dict(self.options)
        if options.get("ignore_boxes") is not None:  # the loader's own: where this batch's boxes are
            options["ignore_boxes"] = options["ignore_boxes"].to(request["gt_boxes"].device)
        image_sizes = request.get("image_sizes", options.get("image_sizes"))
        for given in (request, options):
            for field, counts_field in (("gt_boxes", "gt_counts"), ("ignore_boxes", "ignore_counts")):
                if given.get(field) is not None:
                    given[field] = self._pixels(given[field], field, counts_field,
                                                given.get(counts_field, options.get(counts_field)),
                                                request["canvas"], image_sizes)  # fmt: skip
        boxes, counts, canvas = request.pop("gt_boxes"), request.pop("gt_counts"), request.pop("canvas")
        try:
            return solve(boxes, counts, canvas, self.config, backend=self.backend, **options, **request)
        except ValueError as exc:
            if image_ids is None:
                raise
            raise ValueError(naming_images(str(exc), image_ids)) from exc

    def _pixels(self, boxes: torch.Tensor, name: str, counts_name: str, counts: Any, canvas: tuple[int, int],
                image_sizes: Any) -> torch.Tensor:  # fmt: skip
        """``boxes`` of ``box_format`` as xyxy pixels, as the client converts them."""
        sizes = None
        if normalised(self.box_format):
            if counts is None:
                raise ValueError(f"{counts_name}: required with {name} (one count per image)")
            sizes = row_sizes(name, boxes.shape[0], counts_name, counts, canvas, image_sizes)
        return to_xyxy(boxes, self.box_format, sizes)


def _naming_refused_batch(answers: Iterator, read: deque) -> Iterator:
    """A stream's ``answers``; where the client refuses to send a batch (a ValueError: a
    value the wire cannot carry, a class past int32), after answering the ones before it,
    the error names the dataset ids of that batch's images, the first unanswered in
    ``read``."""
    try:
        yield from answers
    except ValueError as exc:
        if not read or read[0][2] is None:
            raise
        raise ValueError(naming_images(str(exc), read[0][2])) from None


def _check_client(client: Any) -> None:
    if client is not None and not isinstance(client, TargetClient):
        raise TypeError(f"client: expected a TargetClient (the blocking client: a DataLoader's batches are read "
                        f"without an event loop), got {type(client).__name__}")  # fmt: skip


def _config(preset: str | None, config: TargetConfig | Mapping[str, Any] | None,
            client: TargetClient | None) -> TargetConfig | None:  # fmt: skip
    """The config (a dict as ``TargetConfig.from_dict`` reads it, as the client takes one),
    or None for a preset only the service knows (a client's server newer than this
    package): the service resolves it, and its requests get sampling seeds in case it samples."""
    if (preset is None) == (config is None):
        raise ValueError("give exactly one of preset= or config=")
    if preset is not None:
        return None if client is not None and preset not in presets.names() else presets.get(preset)
    if isinstance(config, Mapping):
        return TargetConfig.from_dict(dict(config))
    if not isinstance(config, TargetConfig):
        raise TypeError(f"config: expected a TargetConfig or its dict, got {type(config).__name__}")
    return config


def _named(preset: str | None, config: TargetConfig | None) -> dict[str, Any]:
    """How a request names its config: the preset's name (a few bytes, cached by the
    server) when there is one, else the whole config."""
    return {"preset": preset} if preset is not None else {"config": config}


def with_targets(
    batches: Iterable[tuple[Any, Sequence[Mapping[str, Any]]]],
    *,
    preset: str | None = None,
    config: TargetConfig | Mapping[str, Any] | None = None,
    canvas: Sequence[int] | None = None,
    client: TargetClient | None = None,
    backend: str = "auto",
    in_flight: int = 4,
    densify: bool = True,
    device: torch.device | str | None = None,
    **options: Any,
) -> Iterator[tuple[Any, Sequence[Mapping[str, Any]], Targets | SparseTargets]]:
    """``(images, targets, assigned)`` for every batch, in order (see the module docstring).

    ``options`` go to every request (``seed``, ``overrides``, ``delta_dtype``, ...; what
    differs per image comes in its target dict, see the module docstring) and mean
    the same in-process, where those that only shape the wire or bound a call
    (``delta_dtype``, ``return_classes``, ``format``, ``timeout``) have no effect. One
    difference: through a client the default SPARSE responses carry no matched box for
    anchors that are not positive, so detectron2 mode's argmax boxes of negative and
    ignored anchors come back -1 (``format="dense"`` carries them). With a
    ``client``, ``timeout`` bounds the epoch's whole stream, not each batch. Leave
    ``seed`` out to sample anew each batch (``torch.manual_seed`` repeats a run). With a
    ``client``, up to ``in_flight`` batches are read ahead of the one yielded (on the
    caller's thread, before yielding it) and computed while the trainer works, and none
    once this is closed; a server that dies
    mid-epoch is replaced by the client's next endpoint without losing a batch. Errors
    name the dataset's ``image_id``; a batch that fails, or a loader that raises, raises
    after the batches before it.
    """
    # Checked here, when called, not at the first batch (the body is a generator).
    if isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 1:
        raise ValueError(f"in_flight: must be an int >= 1, got {in_flight!r}")
    _check_client(client)
    _check_options(backend, options)
    check_densify(densify, options)
    canvas = _given_canvas(canvas)
    target_config = _config(preset, config, client)
    if client is None:
        solve = _InProcess(target_config, backend, densify, options, device)
        return _in_process(batches, solve, canvas, densify, device, options)
    return _pipelined(batches, client, _named(preset, target_config), target_config, canvas, in_flight, densify,
                      device, options)  # fmt: skip


def _in_process(batches, solve, canvas, densify, device, options):
    for batch in batches:
        images, targets = _pair(batch)
        assigned = solve(_batch_request(images, targets, canvas, options), _image_ids(targets))
        yield images, targets, _placed(assigned, densify, device)


def _pipelined(batches, client, named, config, canvas, in_flight, densify, device, options):
    """One stream, fed from this generator's own thread: before yielding a batch it reads
    ahead, so up to ``in_flight`` later batches are on their way while the trainer works
    on it. The iterable is read on the caller's thread only (a ``num_workers=0`` loader's
    transforms draw from torch's global generator: read from another thread, their draws
    and the trainer's interleaved differently every run), and never once this generator
    is closed; sampling seeds are drawn in reading order, so ``torch.manual_seed`` repeats
    a run. A batch that cannot be read, or makes no request, is raised after the batches
    before it."""
    options = dict(options)
    timeout = options.pop("timeout", None)  # bounds the stream, not a request
    seeds = None
    if "seed" not in options and (config is None or _with_overrides(config, options).match.sample_size > 0):
        seeds = torch.Generator().manual_seed(fresh_seed())
    sending: queue.SimpleQueue = queue.SimpleQueue()  # requests for gRPC's thread; None ends the stream
    read: deque = deque()  # (images, targets, image ids) of the batches sent, in order
    source = iter(batches)
    failure: list[Exception] = []  # what reading the batches raised, once they stopped

    def read_ahead() -> None:
        while not failure and len(read) < in_flight:
            try:
                images, targets = _pair(next(source))
                request = _batch_request(images, targets, canvas, options)
                image_ids = _image_ids(targets)
            except Exception as exc:  # StopIteration too: the end
                failure.append(exc)
                sending.put(None)
                return
            if seeds is not None:
                request["seed"] = fresh_seed(seeds)
            read.append((images, targets, image_ids))
            sending.put(request)

    def requests():
        while (request := sending.get()) is not None:
            yield request

    # Sparse lists travel and are densified on ``device`` (a few KB per image instead of
    # ~5 MB), unless the response must be dense: max IoU, or a DENSE response asked for.
    dense = densify and (options.get("return_max_iou") or options.get("format", "sparse") != "sparse")
    read_ahead()
    if not read:  # an empty epoch (a rank or sampler with no batch): no stream, no server asked
        if not isinstance(failure[0], StopIteration):
            raise failure[0]
        return
    answers = client.stream(requests(), timeout=timeout, return_exceptions=True, densify=dense, **named, **options)
    try:
        for assigned in _naming_refused_batch(answers, read):
            images, targets, image_ids = read.popleft()
            if isinstance(assigned, TargetServiceError):
                raise assigned if image_ids is None else assigned.naming_images(image_ids)
            read_ahead()
            yield images, targets, _placed(assigned, densify, device)
    finally:
        sending.put(None)  # gRPC's thread may wait for a request that will not come
        answers.close()
    if not isinstance(failure[0], StopIteration):
        raise failure[0]


def _pair(batch: Any) -> tuple[Any, Sequence[Mapping[str, Any]]]:
    """A batch's ``(images, targets)``, or an error saying what a batch must be."""
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) == 2:
        images, targets = batch
        if isinstance(targets, Sequence) and all(isinstance(target, Mapping) for target in targets):
            return images, targets
    raise TypeError(
        "a batch must be (images, targets) with targets a list of per-image dicts ({'boxes', 'labels'}), got "
        f"{type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, Sequence) else "")
    )


class TargetCollate:
    """A ``DataLoader`` ``collate_fn`` that computes targets in the worker: returns
    ``(images, targets, assigned)`` for ``collate_fn(samples) -> (images, targets)``.

    With ``client``, each worker asks the service (the client pickles as its options and
    opens its own channels); without, it computes in-process on ``backend``. Errors name
    the dataset's ``image_id`` when the targets carry one.
    """

    def __init__(
        self,
        collate_fn: Callable[[list[Any]], tuple[Any, Sequence[Mapping[str, Any]]]],
        *,
        preset: str | None = None,
        config: TargetConfig | Mapping[str, Any] | None = None,
        canvas: Sequence[int] | None = None,
        client: TargetClient | None = None,
        backend: str = "cpu",
        densify: bool = True,
        **options: Any,
    ) -> None:
        _check_client(client)
        _check_options(backend, options)
        check_densify(densify, options)
        self.collate_fn = collate_fn
        self.config = _config(preset, config, client)
        self.named = _named(preset, self.config)
        self.canvas = _given_canvas(canvas)
        self.client = client
        self.densify = densify
        self.options = options
        self._in_process = _InProcess(self.config, backend, densify, options) if client is None else None

    def __call__(self, samples: list[Any]) -> tuple[Any, Sequence[Mapping[str, Any]], Targets | SparseTargets]:
        images, targets = _pair(self.collate_fn(samples))
        request = _batch_request(images, targets, self.canvas, self.options)
        if self._in_process is not None:
            return images, targets, self._in_process(request, _image_ids(targets))
        assigned = self.client.assign(**request, densify=self.densify, image_ids=_image_ids(targets),
                                      **self.named, **self.options)  # fmt: skip
        return images, targets, assigned
