"""Targets for a training loop's batches: pipelined over a stream, in DataLoader workers
(fork, spawn), in-process; and two training steps of torchvision's RetinaNet whose losses
equal torchvision's own ``compute_loss`` (needs torchvision; skips without it)."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
import torch
from test_service_harness import ServerThread, serve_process

from tritarget.clients import TargetClient
from tritarget.clients.loader import TargetCollate, boxes_of, with_targets
from tritarget.clients.wire import to_xyxy
from tritarget.kernels import SparseTargets, Targets, assign, presets

CANVAS = (128, 160)
PRESET = "retinanet_torchvision"


class _Detection(torch.utils.data.Dataset):
    """Images of the canvas size with a few random boxes each (one image without)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(index)
        count = 0 if index == 3 else 1 + index % 3
        corner = torch.rand(count, 2, generator=generator) * 90
        boxes = torch.cat([corner, corner + 16 + torch.rand(count, 2, generator=generator) * 30], dim=1)
        labels = torch.randint(0, 5, (count,), generator=generator)
        image = torch.rand(3, *CANVAS, generator=generator)
        return image, {"boxes": boxes, "labels": labels, "image_id": 1000 + index}


def _collate(samples):
    images, targets = zip(*samples)
    return torch.stack(images), list(targets)


def _expected(targets) -> Targets:
    boxes, counts, classes = boxes_of(targets)
    return assign(boxes, counts, CANVAS, presets.get(PRESET), gt_classes=classes, backend="cpu")


def _batches(count: int = 4):
    dataset = _Detection()
    return [_collate([dataset[2 * i], dataset[2 * i + 1]]) for i in range(count)]


def _counted(count: int, read: list[int]):
    """``count`` batches, each noted in ``read`` as it is read."""
    for i, batch in enumerate(_batches(count)):
        read.append(i)
        yield batch


def _same(got: Targets, expected: Targets) -> None:
    assert torch.equal(got.labels, expected.labels) and torch.equal(got.classes, expected.classes)
    positive = expected.labels == 1
    assert torch.equal(got.matched_gt[positive], expected.matched_gt[positive])
    torch.testing.assert_close(got.deltas, expected.deltas, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def server():
    with ServerThread(backend="cpu") as srv:
        yield srv


@pytest.mark.parametrize("densify", [True, False])
def test_with_targets_pipelines_over_one_stream_in_order(server, densify):
    pulled = []
    with TargetClient(server.address) as client:
        before = server.metrics.value("tritarget_requests_total", {"method": "AssignStream"})
        for i, (images, targets, assigned) in enumerate(with_targets(_counted(6, pulled), preset=PRESET, client=client,
                                                                     in_flight=2, densify=densify)):  # fmt: skip
            assert len(pulled) <= i + 1 + 2  # never more than in_flight batches read ahead
            assert images.shape == (2, 3, *CANVAS)
            assert isinstance(assigned, Targets if densify else SparseTargets)
            _same(assigned if densify else assigned.to_dense(), _expected(targets))
        assert i == 5
        assert server.metrics.value("tritarget_requests_total", {"method": "AssignStream"}) - before == 6


def test_a_config_instead_of_a_preset(server):
    config = presets.get(PRESET)
    with TargetClient(server.address) as client:
        for _images, targets, assigned in with_targets(_batches(2), config=config, client=client):
            _same(assigned, _expected(targets))
        _images, targets, assigned = TargetCollate(_collate, config=config, client=client)([_Detection()[0]])
        _same(assigned, _expected(targets))
    with pytest.raises(ValueError, match="exactly one of preset= or config="):
        TargetCollate(_collate, preset=PRESET, config=config)


def test_with_targets_in_process_and_stopping_early(server):
    for _images, targets, assigned in with_targets(_batches(2), preset=PRESET, backend="cpu"):
        _same(assigned, _expected(targets))
    with TargetClient(server.address) as client:
        stream = with_targets(_batches(4), preset=PRESET, client=client, in_flight=1)
        next(stream)
        stream.close()  # the trainer stops after one batch: the stream ends, nothing hangs
    with pytest.raises(ValueError, match="canvas"):
        next(with_targets([([torch.zeros(3, 8, 8)], [{"boxes": torch.zeros(0, 4)}])], preset=PRESET))


def test_nothing_reads_the_batches_once_the_stream_is_closed(server):
    """Once ``with_targets`` is closed (the trainer broke out of its loop), no read of the
    iterable is in progress or starts, so a persistent-worker DataLoader can start its next
    epoch on the same iterator."""
    events = []

    def batches():
        for batch in _batches(6):
            events.append("read")
            time.sleep(0.05)  # a slow loader: a read is in progress when the trainer stops
            events.append("done")
            yield batch

    with TargetClient(server.address) as client:
        stream = with_targets(batches(), preset=PRESET, client=client, in_flight=3)
        next(stream)
        stream.close()
        when_closed = list(events)
        time.sleep(0.3)
    assert events == when_closed and when_closed[-1] == "done"


def test_with_targets_loses_no_batch_when_its_server_shuts_down_mid_epoch():
    """The stream's server drains (it answers what it read, then ends the stream
    UNAVAILABLE): the unanswered batches go to the client's next endpoint, in order."""
    with ServerThread(backend="cpu") as first, ServerThread(backend="cpu") as second:
        with TargetClient([first.address, second.address], timeout=60) as client:
            got = []
            for _images, targets, assigned in with_targets(_batches(8), preset=PRESET, client=client, in_flight=3):
                _same(assigned, _expected(targets))
                got.append([t["image_id"] for t in targets])
                if len(got) == 2:
                    first.stop(grace=5)
        streams = second.metrics.value("tritarget_requests_total", {"method": "AssignStream"})
    assert got == [[1000 + 2 * i, 1001 + 2 * i] for i in range(8)] and streams >= 1


def _slowly(index: int):
    time.sleep(0.05)
    return _Detection()[index]


def test_with_targets_stops_early_every_epoch_of_a_persistent_worker_loader(server):
    """Breaking out after two batches, epoch after epoch, with workers kept between epochs:
    the next epoch resets the loader's iterator, which nothing else may be reading."""
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=1, persistent_workers=True,
                                         collate_fn=lambda indices: _collate([_slowly(i) for i in indices]),
                                         multiprocessing_context="fork")  # fmt: skip
    try:
        with TargetClient(server.address) as client:
            for epoch in range(4):
                seen = []
                for _images, targets, assigned in with_targets(loader, preset=PRESET, client=client, in_flight=3):
                    _same(assigned, _expected(targets))
                    seen.append([t["image_id"] for t in targets])
                    if epoch < 3 and len(seen) == 2:
                        break
                assert seen == [[1000, 1001], [1002, 1003]] if epoch < 3 else len(seen) == 4
    finally:  # its persistent worker would live on until a garbage collection, into later tests
        if loader._iterator is not None:
            loader._iterator._shutdown_workers()


def test_a_stream_draws_each_fresh_seed_where_torch_manual_seed_orders_it(server):
    """Without ``seed=``, a sampling preset draws each batch's seed from torch's global
    generator on the trainer's thread: the same batch sent again samples other anchors,
    and the same ``manual_seed`` gives the same anchors and leaves the trainer's own draws
    the same, run after run."""
    same_batch = _batches(1) * 4

    def run(client):
        torch.manual_seed(123)
        drawn, sampled = [], []
        for _images, _targets, assigned in with_targets(same_batch, preset="fasterrcnn_rpn_torchvision",
                                                        client=client, in_flight=2):  # fmt: skip
            drawn.append(torch.rand(()).item())  # the trainer's own use of the generator
            sampled.append(assigned.labels)
        return drawn, sampled

    with TargetClient(server.address) as client:
        first, *others = [run(client) for _ in range(3)]
    assert len({tuple(labels.flatten().tolist()) for labels in first[1]}) == len(same_batch)
    for drawn, sampled in others:
        assert drawn == first[0]
        assert all(torch.equal(a, b) for a, b in zip(sampled, first[1]))


def test_each_epochs_stream_samples_anew_after_one_manual_seed(server):
    """One ``torch.manual_seed`` at the start of training: the next epoch's stream samples
    other anchors for the same images (a stream whose seeds started from a fixed one
    sampled the same anchors every epoch: the repeated run's test could not see it)."""
    torch.manual_seed(123)
    with TargetClient(server.address) as client:
        epochs = [[assigned.labels for _, _, assigned in with_targets(_batches(1), preset="fasterrcnn_rpn_torchvision",
                                                                      client=client)]
                  for _ in range(2)]  # fmt: skip
    assert not torch.equal(epochs[0][0], epochs[1][0])


def test_with_targets_names_dataset_images_in_errors_and_answers_what_came_before():
    """A bad batch raises after the batches before it, naming the dataset's image id, with
    a client as in-process; so does a loader that fails while being read."""
    bad = _collate([_Detection()[0]])
    bad[1][0]["boxes"] = torch.tensor([[5.0, 5.0, 5.0, 9.0]])
    bad[1][0]["image_id"] = 777

    def batches():
        yield from _batches(2)
        yield bad

    def failing():
        yield from _batches(2)
        raise OSError("disk gone")

    with ServerThread(backend="cpu") as srv, TargetClient(srv.address) as client:
        for source, error, message in ((batches, Exception, r"image 0 \(id 777\), box 0: degenerate"),
                                       (failing, OSError, "disk gone")):  # fmt: skip
            for kwargs in ({"client": client}, {"backend": "cpu"}):
                stream = with_targets(source(), preset=PRESET, in_flight=3, **kwargs)
                assert len([next(stream), next(stream)]) == 2
                with pytest.raises(error, match=message):
                    next(stream)


def test_a_bad_image_size_is_named_by_image_id_with_and_without_a_client():
    """An image size refused as "image_sizes[1]: ..." named no image the loader knew."""
    images, targets = _collate([_Detection()[0], _Detection()[1]])
    for index, target in enumerate(targets):
        target["image_size"] = (64, 64) if index == 0 else (4000, 64)
    targets[1]["image_id"] = 222
    with ServerThread(backend="cpu") as srv, TargetClient(srv.address) as client:
        for kwargs in ({"client": client}, {"backend": "cpu"}):
            with pytest.raises(Exception, match=r"image_sizes\[1\] \(id 222\): \(4000, 64\) must be positive"):
                next(with_targets([(images, targets)], preset=PRESET, **kwargs))


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"backend": "bogus"}, ValueError, "backend: must be one of reference, cpu, triton, auto; got 'bogus'"),
    ({"drop_invald": True}, TypeError, "unknown option 'drop_invald'; the options are box_format, "),
    ({"timeout": -1}, ValueError, "timeout: must be > 0 seconds (or None: no deadline), got -1"),
    ({"timeout": "30"}, ValueError, "timeout: must be > 0 seconds (or None: no deadline), got '30'"),
    # Values too, which the first batch found out in a worker.
    ({"box_format": "XYWH"}, ValueError, "box_format: must be one of xyxy, xywh, cxcywh, xyxyn, xywhn, cxcywhn; "),
    ({"delta_dtype": "fp16"}, ValueError, "delta_dtype: must be 'float32' or 'float16', got 'fp16'"),
    ({"format": "Dense"}, ValueError, "format: must be 'sparse' or 'dense', got 'Dense'"),
    ({"seed": "x"}, TypeError, "seed: the service takes one int per request"),
    ({"drop_invalid": "yes"}, TypeError, "drop_invalid"),
])  # fmt: skip
def test_a_misspelt_option_or_backend_is_refused_when_the_loader_is_made(kwargs, error, message):
    """Not at the first batch: in a DataLoader's collate, that is in a worker, after they started.
    A bad timeout, which only a client's stream uses, too: in-process it went unnoticed."""
    with pytest.raises(error, match=re.escape(message)):
        with_targets(_batches(1), preset=PRESET, **kwargs)
    with pytest.raises(error, match=re.escape(message)):
        TargetCollate(_collate, preset=PRESET, **kwargs)


def test_rotated_bounding_boxes_are_refused_as_unsupported():
    """The hint said "pass box_format='xywhr'", which then failed ("expected shape [N, 4]")."""
    tv_tensors = pytest.importorskip("torchvision.tv_tensors")
    rotated = tv_tensors.BoundingBoxes([[30.0, 30.0, 20.0, 10.0, 15.0]], format="XYWHR", canvas_size=CANVAS)
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]: BoundingBoxes in format XYWHR: rotated boxes are"):
        boxes_of([{"boxes": rotated}])


def test_a_bad_class_is_named_by_image_id_with_and_without_a_client():
    """It was "gt_classes[4]" in-process and "gt_classes: box 4" through the service: a
    place in the batch's joined labels, not an image the loader could name."""
    images, targets = _collate([_Detection()[0], _Detection()[1]])
    targets[1]["labels"] = targets[1]["labels"].clone()
    targets[1]["labels"][-1] = -1
    targets[1]["image_id"] = 222
    box = targets[1]["labels"].numel() - 1
    message = rf"gt_classes: image 1 \(id 222\), box {box}: class -1 is outside"
    with ServerThread(backend="cpu") as srv, TargetClient(srv.address) as client:
        for kwargs in ({"client": client}, {"backend": "cpu"}):
            with pytest.raises(Exception, match=message):
                next(with_targets([(images, targets)], preset=PRESET, **kwargs))
        # Past int32 the client refuses to send it: that named "gt_classes[k]", a place in the
        # joined labels, and "image_sizes[1, 0]", without the id; named by the stream
        # (with_targets) and by the call (TargetCollate), after the batches before it.
        targets[1]["labels"][-1] = 2**31
        _, wide = _collate([_Detection()[0], _Detection()[1]])
        wide = [{**t, "image_id": 111 + 111 * i, "image_size": (CANVAS[0], CANVAS[1] if i == 0 else 2**31)}
                for i, t in enumerate(wide)]  # fmt: skip
        for bad, message in ((targets, rf"gt_classes\[\d+\] \(image 1 \(id 222\), box {box}\): 2147483648 does not"),
                             (wide, r"image_sizes\[1, 1\] \(id 222\): 2147483648 does not")):  # fmt: skip
            good = _collate([_Detection()[0], _Detection()[1]])
            batches = with_targets([good, (images, bad)], preset=PRESET, client=client)
            assert next(batches)[2].labels.shape[0] == 2
            with pytest.raises(ValueError, match=message):
                next(batches)
            with pytest.raises(ValueError, match=message):
                TargetCollate(lambda samples: samples, preset=PRESET, client=client)((images, bad))


def test_a_batch_the_client_refuses_to_send_is_named_by_its_own_image_ids(server):
    """The refused batch's ids, not those of a batch read ahead of it."""
    images, targets = _collate([_Detection()[0], _Detection()[1]])
    targets[1]["labels"] = targets[1]["labels"].clone()
    targets[1]["labels"][-1] = 2**31
    targets[1]["image_id"] = 222
    with TargetClient(server.address) as client:
        batches = with_targets([_batches(1)[0], (images, targets), _batches(2)[1]], preset=PRESET, client=client,
                               in_flight=3)  # fmt: skip
        next(batches)
        with pytest.raises(ValueError, match=r"gt_classes\[\d+\] \(image 1 \(id 222\), box \d+\): 2147483648 does not"):
            next(batches)


def test_a_batch_the_client_refuses_to_send_without_image_ids_raises_the_clients_error(server):
    """Targets without ``image_id``: the client's error, naming the image by its place."""
    images, targets = _collate([_Detection()[0], _Detection()[1]])
    targets = [{k: v for k, v in t.items() if k != "image_id"} for t in targets]
    targets[1]["labels"] = targets[1]["labels"].clone()
    targets[1]["labels"][-1] = 2**31
    with TargetClient(server.address) as client:
        batches = with_targets([_batches(1)[0], (images, targets)], preset=PRESET, client=client)
        next(batches)
        with pytest.raises(ValueError, match=r"gt_classes\[\d+\] \(image 1, box \d+\): 2147483648 does not"):
            next(batches)


def test_request_options_mean_the_same_with_and_without_a_client(server):
    options = dict(preset=PRESET, overrides={"match.high": 0.6}, format="dense", timeout=30.0, return_max_iou=True,
                   box_format="xywh")  # fmt: skip
    as_xywh = [(images, [{**t, "boxes": torch.cat([t["boxes"][:, :2], t["boxes"][:, 2:] - t["boxes"][:, :2]], 1)}
                         for t in targets]) for images, targets in _batches(1)]  # fmt: skip
    with TargetClient(server.address) as client:
        (_, _, remote), *_ = with_targets(as_xywh, client=client, **options)
    (_, _, local), *_ = with_targets(as_xywh, backend="cpu", **options)
    boxes, counts, classes = boxes_of(as_xywh[0][1], "xywh")  # what both paths assign for
    expected = assign(boxes, counts, CANVAS, presets.get(PRESET).replace(**{"match.high": 0.6}), gt_classes=classes,
                      backend="cpu", return_max_iou=True)  # fmt: skip
    for got in (remote, local):
        _same(got, expected)
        assert torch.equal(got.max_iou, expected.max_iou)
    for kwargs in ({"client": client}, {"backend": "cpu"}):
        for option, message in (({"return_max_iou": True}, "no max IoU: return_max_iou needs densify"),
                                ({"format": "dense"}, "it needs format='sparse'")):  # fmt: skip
            with pytest.raises(ValueError, match=message):
                next(with_targets(_batches(1), preset=PRESET, densify=False, **option, **kwargs))
            with pytest.raises(ValueError, match=message):
                TargetCollate(_collate, preset=PRESET, densify=False, **option, **kwargs)


def test_max_iou_comes_through_a_client_with_the_default_sparse_format(server):
    """``return_max_iou`` alone (no ``format="dense"``): the stream asks for the dense
    response that carries it, and the max IoU is the in-process one."""
    (_, targets, local), *_ = with_targets(_batches(1), preset=PRESET, backend="cpu", return_max_iou=True)
    with TargetClient(server.address) as client:
        (_, _, remote), *_ = with_targets(_batches(1), preset=PRESET, client=client, return_max_iou=True)
    assert torch.equal(remote.max_iou, local.max_iou)
    _same(remote, _expected(targets))


def test_a_seed_option_samples_the_same_anchors_with_and_without_a_client(server):
    """``seed=`` fixes a sampling preset's draw for every batch, through the service as
    in-process (no fresh seed per batch replaces it)."""
    same_batch = _batches(1) * 2
    options = dict(preset="fasterrcnn_rpn_torchvision", seed=7)
    local = [assigned.labels for *_, assigned in with_targets(same_batch, backend="cpu", **options)]
    with TargetClient(server.address) as client:
        remote = [assigned.labels for *_, assigned in with_targets(same_batch, client=client, **options)]
    assert all(torch.equal(labels, local[0]) for labels in local + remote)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_an_ignore_box_option_is_rounded_as_the_wire_rounds_it(server, dtype):
    """x + w in the option's own type (in-process), then rounded to float32, made a box a
    fraction of a float32 step wide one step wide, which the client, rounding first, found
    degenerate; and a float16 box 2^-10 wide at x = 100 degenerate, which the client kept
    (review 48). Both now round first: the first dropped, the second kept."""
    step = 2.0**-17  # float32's spacing at 100
    x, width = (100 + 0.49 * step, 0.02 * step) if dtype == torch.float64 else (100.0, 2.0**-10)
    ignore = torch.tensor([[x, 10.0, width, 20.0]], dtype=torch.float64).to(dtype)  # xywh
    options = dict(preset=PRESET, box_format="xywh", ignore_boxes=ignore, ignore_counts=[1, 0], drop_invalid=True)
    with TargetClient(server.address) as client:
        (_, _, remote), *_ = with_targets(_batches(1), client=client, **options)
    (_, _, local), *_ = with_targets(_batches(1), backend="cpu", **options)
    assert [d.tolist() for d in remote.dropped_ignore] == [d.tolist() for d in local.dropped_ignore]
    assert remote.dropped_ignore[0].tolist() == ([0] if dtype == torch.float64 else [])
    _same(local, remote)


def test_detectron2_argmax_boxes_travel_only_in_dense_responses(server):
    """As documented: SPARSE carries no matched box for an anchor that is not positive."""
    options = dict(preset="retinanet_detectron2")
    (_, targets, local), *_ = with_targets(_batches(1), backend="cpu", **options)
    kept = (local.labels != 1) & (local.matched_gt >= 0)  # detectron2 keeps their argmax box
    assert int(kept.sum()) > 0
    with TargetClient(server.address) as client:
        (_, _, sparse), *_ = with_targets(_batches(1), client=client, **options)
        (_, _, dense), *_ = with_targets(_batches(1), client=client, format="dense", **options)
    assert torch.equal(sparse.labels, local.labels)
    assert torch.equal(sparse.matched_gt, torch.where(local.labels == 1, local.matched_gt, -1))
    assert torch.equal(dense.labels, local.labels) and torch.equal(dense.matched_gt, local.matched_gt)


def test_box_format_applies_to_ignore_boxes_in_process_too(server):
    """The client converts ignore boxes from ``box_format``; in-process they went as xyxy
    (64 anchors ignored against 319 through the service)."""
    xywh = torch.tensor([[10.0, 10.0, 50.0, 40.0]])
    batches = [(torch.zeros(1, 3, *CANVAS), [{"boxes": xywh, "labels": torch.tensor([1])}])]
    options = dict(preset="retinanet_mmdet", overrides={"match.ignore_iof_thr": 0.5}, box_format="xywh",
                   ignore_boxes=torch.tensor([[40.0, 40.0, 50.0, 50.0]]), ignore_counts=[1])  # fmt: skip
    with TargetClient(server.address) as client:
        (_, _, remote), *_ = with_targets(batches, client=client, **options)
    (_, _, local), *_ = with_targets(batches, backend="cpu", **options)
    expected = assign(to_xyxy(xywh, "xywh"), [1], CANVAS, presets.get("retinanet_mmdet").replace(
        **{"match.ignore_iof_thr": 0.5}), gt_classes=torch.tensor([1]), ignore_boxes=torch.tensor(
        [[40.0, 40.0, 90.0, 90.0]]), ignore_counts=[1], backend="cpu")  # fmt: skip
    assert int((expected.labels == -1).sum()) > 0
    for got in (remote, local):
        assert torch.equal(got.labels, expected.labels)


def test_normalised_boxes_are_fractions_of_each_images_size_in_process_too(server):
    """``box_format="cxcywhn"`` (YOLO labels): each image's boxes, and the loader's own
    crowd regions, scaled by its ``image_size`` in-process as the client scales them."""
    images = torch.zeros(2, 3, *CANVAS)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]), "labels": torch.tensor([1]), "image_size": (64, 80)},
               {"boxes": torch.tensor([[0.3, 0.6, 0.25, 0.5], [0.7, 0.2, 0.3, 0.3]]), "labels": torch.tensor([2, 3]),
                "image_size": (128, 160)}]  # fmt: skip
    crowd = torch.tensor([[0.75, 0.75, 0.5, 0.5]])
    options = dict(preset="retinanet_mmdet", overrides={"match.ignore_iof_thr": 0.5}, box_format="cxcywhn",
                   ignore_boxes=crowd, ignore_counts=[1, 0])  # fmt: skip
    with TargetClient(server.address) as client:
        (_, _, remote), *_ = with_targets([(images, targets)], client=client, **options)
    (_, _, local), *_ = with_targets([(images, targets)], backend="cpu", **options)
    sizes = torch.tensor([[64, 80], [128, 160], [128, 160]])
    pixels = to_xyxy(torch.cat([t["boxes"] for t in targets]), "cxcywhn", sizes)
    assert pixels[0].tolist() == [20.0, 16.0, 60.0, 48.0]  # in the first image's 80 x 64
    config = presets.get("retinanet_mmdet").replace(**{"match.ignore_iof_thr": 0.5})
    expected = assign(pixels, [1, 2], CANVAS, config, gt_classes=torch.tensor([1, 2, 3]), image_sizes=sizes[:2],
                      ignore_boxes=torch.tensor([[40.0, 32.0, 80.0, 64.0]]), ignore_counts=[1, 0],
                      backend="cpu")  # fmt: skip
    assert int((expected.labels[0] == -1).sum()) > 0
    for got in (remote, local):
        _same(got, expected)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_target_collate_in_data_loader_workers(server, method):
    client = TargetClient(server.address)
    collate = TargetCollate(_collate, preset=PRESET, client=client)
    loader = torch.utils.data.DataLoader(_Detection(), batch_size=2, num_workers=2, collate_fn=collate,
                                         multiprocessing_context=method, persistent_workers=True)  # fmt: skip
    for _epoch in range(2):
        for _images, targets, assigned in loader:
            _same(assigned, _expected(targets))


def test_target_collate_names_dataset_images_in_errors(server):
    bad = [(torch.zeros(3, *CANVAS), {"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]]), "labels": torch.tensor([1]),
                                      "image_id": 777})]  # fmt: skip
    with TargetClient(server.address) as client:
        with pytest.raises(Exception, match=r"image 0 \(id 777\), box 0: degenerate"):
            TargetCollate(_collate, preset=PRESET, client=client)(bad)
    with pytest.raises(ValueError, match=r"image 0 \(id 777\), box 0: degenerate"):  # in-process too
        TargetCollate(_collate, preset=PRESET)(bad)
    # Ids as datasets carry them: one number in a tensor or array, or several numbers.
    for image_id, shown in ((torch.tensor([777]), "777"), (np.array(777), "777"), (torch.tensor([7, 77]), "[7, 77]"),
                            (np.array([[7], [77]]), "[7, 77]"), ("a.jpg", "a.jpg"),
                            (np.array("b.jpg"), "b.jpg")):  # fmt: skip
        bad[0][1]["image_id"] = image_id
        with pytest.raises(ValueError, match=rf"image 0 \(id {re.escape(shown)}\), box 0: degenerate"):
            TargetCollate(_collate, preset=PRESET)(bad)


def test_the_same_options_work_with_and_without_a_client(server):
    """Options that only shape the wire (delta_dtype, return_classes) must not break the
    in-process path: switching a training script off the service keeps it running."""
    options = dict(preset=PRESET, delta_dtype="float16", return_classes=True)
    with TargetClient(server.address) as client:
        (_, _, remote), *_ = with_targets(_batches(1), client=client, **options)
    (_, targets, local), *_ = with_targets(_batches(1), backend="cpu", **options)
    assert torch.equal(remote.labels, local.labels) and local.deltas.dtype == torch.float32
    _same(local, _expected(targets))


def test_boxes_of_names_the_image_with_malformed_boxes_or_labels():
    empty_float_labels = [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([3])},
                          {"boxes": torch.zeros(0), "labels": torch.zeros(0)}]  # fmt: skip
    boxes, counts, classes = boxes_of(empty_float_labels)
    assert counts == [1, 0] and classes.tolist() == [3] and not classes.is_floating_point()
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]: expected shape \[N, 4\], got \[2, 2\]"):
        boxes_of([{"boxes": torch.zeros(0, 4)}, {"boxes": torch.ones(2, 2)}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]: expected shape \[N, 4\], got \[1, 5\]"):
        boxes_of([{"boxes": torch.ones(1, 5)}])
    with pytest.raises(TypeError, match=r"targets\[0\]\['labels'\]: expected integer class ids, got torch.float32"):
        boxes_of([{"boxes": torch.ones(1, 4), "labels": torch.tensor([1.0])}])
    with pytest.raises(ValueError, match=r"targets: give 'labels' for every image or for none"):
        boxes_of([{"boxes": torch.ones(1, 4), "labels": torch.tensor([1])}, {"boxes": torch.ones(1, 4)}])
    # One label short here and one over there add up to the boxes of the batch: each
    # image's labels must match its own boxes, or classes land on another image's boxes.
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]: 1 labels for 2 boxes"):
        boxes_of([{"boxes": torch.ones(2, 4), "labels": torch.tensor([1])},
                  {"boxes": torch.ones(1, 4), "labels": torch.tensor([2, 3])}])  # fmt: skip


def test_boxes_of_gives_the_xyxy_pixels_the_targets_were_assigned_against():
    """The IoU box losses take ``gt_boxes`` as xyxy pixels: boxes_of gave them back in the
    loader's box_format (a GIoU loss of 0.79 from xywh boxes where xyxy gave 0.55, no error;
    BoundingBoxes lost the format tag that the loss refuses them by)."""
    from tritarget.kernels import assign_sparse, generate_anchors
    from tritarget.kernels.losses import retinanet_loss

    xyxy = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 8.0, 96.0, 64.0]])
    height, width = CANVAS
    formats = {
        "xyxy": xyxy,
        "xywh": to_xywh(xyxy),
        "cxcywh": torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1),
        "xywhn": to_xywh(xyxy) / torch.tensor([width, height, width, height]),
    }
    config = presets.get(PRESET)
    sparse = assign_sparse(xyxy, [2, 0], CANVAS, config, gt_classes=torch.tensor([1, 2]))
    inputs = dict(anchors=generate_anchors(config.anchors, CANVAS), gt_counts=[2, 0], encode=config.encode)
    outputs = {"cls_logits": torch.zeros(2, sparse.num_anchors, 91),
               "bbox_regression": torch.full((2, sparse.num_anchors, 4), 0.1)}  # fmt: skip
    expected = retinanet_loss(outputs, sparse, box_loss="giou", gt_boxes=xyxy, **inputs)["bbox_regression"]
    for box_format, rows in formats.items():
        targets = [{"boxes": rows, "labels": torch.tensor([1, 2])}, {"boxes": torch.zeros(0, 4)}]
        targets[1]["labels"] = torch.zeros(0, dtype=torch.int64)
        boxes, counts, classes = boxes_of(targets, box_format, canvas=CANVAS)
        torch.testing.assert_close(boxes, xyxy, rtol=0, atol=1e-4)
        assert counts == [2, 0] and classes.tolist() == [1, 2], box_format
        got = retinanet_loss(outputs, sparse, box_loss="giou", gt_boxes=boxes, **inputs)["bbox_regression"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    sized = [{"boxes": formats["xywhn"], "image_size": CANVAS}, {"boxes": torch.zeros(0, 4), "image_size": (8, 8)}]
    torch.testing.assert_close(boxes_of(sized, "xywhn")[0], xyxy, rtol=0, atol=1e-4)  # each image's own size
    with pytest.raises(ValueError, match="normalised boxes are fractions of their images: give canvas="):
        boxes_of([{"boxes": formats["xywhn"]}], "xywhn")


def to_xywh(xyxy: torch.Tensor) -> torch.Tensor:
    return torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)


def test_boxes_of_names_an_empty_batch_missing_boxes_boolean_labels_and_boxes_of_another_rank():
    """Each refused with what the batch lacks, not torch's "expected a non-empty list of
    Tensors", a KeyError, a mask read as class ids or [N, 1, 4] read as N boxes."""
    with pytest.raises(ValueError, match="targets: the batch has no images"):
        boxes_of([])
    with pytest.raises(ValueError, match=r"targets\[1\]: no 'boxes' \(a Tensor\[N, 4\] of xyxy pixels\)"):
        boxes_of([{"boxes": torch.ones(1, 4)}, {"labels": torch.tensor([1])}])
    with pytest.raises(TypeError, match=r"targets\[0\]\['labels'\]: expected integer class ids, got torch.bool"):
        boxes_of([{"boxes": torch.ones(1, 4), "labels": torch.tensor([True])}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]: expected shape \[N, 4\], got \[2, 1, 4\]"):
        boxes_of([{"boxes": torch.ones(2, 1, 4)}])


def test_images_and_targets_of_a_batch_must_be_as_many(server):
    images, targets = _batches(1)[0]
    mismatched = [(torch.cat([images, images[:1]]), targets)]
    message = r"images: a Tensor\[B, C, H, W\] of 3 images, but targets for 2"
    with TargetClient(server.address) as client:
        for kwargs in ({"client": client}, {"backend": "cpu"}):
            with pytest.raises(ValueError, match=message):
                next(with_targets(mismatched, preset=PRESET, **kwargs))
            with pytest.raises(ValueError, match=message):
                TargetCollate(lambda samples: samples[0], preset=PRESET, **kwargs)(mismatched)


def test_a_given_canvas_is_the_one_the_targets_are_for_whatever_the_images_size(server):
    """``canvas=`` (the model's padded size) wins over the batch's own H x W, with a client,
    in-process and in a collate."""
    images, targets = _batches(1)[0]
    canvas = (160, 192)  # the model pads further than the loader did
    boxes, counts, classes = boxes_of(targets)
    expected = assign(boxes, counts, canvas, presets.get(PRESET), gt_classes=classes, backend="cpu")
    with TargetClient(server.address) as client:
        for kwargs in ({"backend": "cpu"}, {"client": client}):
            ((*_, got),) = with_targets([(images, targets)], preset=PRESET, canvas=canvas, **kwargs)
            _same(got, expected)
            collate = TargetCollate(lambda samples: samples[0], preset=PRESET, canvas=canvas, **kwargs)
            _same(collate([(images, targets)])[2], expected)


def test_a_batch_where_only_some_images_carry_an_image_id_gets_its_targets(server):
    """Ids only name images in errors: an image without one (others having theirs) must not
    stop the batch."""
    images, targets = _batches(1)[0]
    targets = [{k: v for k, v in targets[0].items() if k != "image_id"}, targets[1]]
    with TargetClient(server.address) as client:
        for kwargs in ({"backend": "cpu"}, {"client": client}):
            ((*_, got),) = with_targets([(images, targets)], preset=PRESET, **kwargs)
            _same(got, _expected(targets))
            _same(TargetCollate(lambda samples: samples[0], preset=PRESET, **kwargs)([(images, targets)])[2],
                  _expected(targets))  # fmt: skip


def test_a_batch_must_be_a_pair_of_images_and_per_image_dicts():
    """A loader yielding (images, targets, metadata), or targets that are tensors, is told
    what a batch must be (not "too many values to unpack" or a tensor's own error)."""
    images, targets = _batches(1)[0]
    for batch, shown in (((images, targets, {"epoch": 0}), "tuple of 3"),
                         ((images, [t["boxes"] for t in targets]), "tuple of 2")):  # fmt: skip
        message = rf"a batch must be \(images, targets\) with targets a list of per-image dicts .* got {shown}"
        with pytest.raises(TypeError, match=message):
            next(with_targets([batch], preset=PRESET))
        with pytest.raises(TypeError, match=message):
            TargetCollate(lambda samples: samples[0], preset=PRESET)([batch])


def test_with_targets_refuses_bad_arguments_when_called_not_at_the_first_batch():
    with pytest.raises(ValueError, match="in_flight: must be an int >= 1, got 0"):
        with_targets([], preset="retinanet_torchvision", canvas=(64, 64), in_flight=0)
    with pytest.raises(ValueError, match="in_flight: must be an int >= 1, got 2.5"):  # a float never blocked
        with_targets([], preset="retinanet_torchvision", canvas=(64, 64), in_flight=2.5)
    with pytest.raises(ValueError, match="in_flight: must be an int >= 1, got True"):  # a flag, not a count
        with_targets([], preset="retinanet_torchvision", canvas=(64, 64), in_flight=True)
    with pytest.raises(ValueError, match="give exactly one of preset= or config="):
        with_targets([], canvas=(64, 64))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_two_retinanet_training_steps_with_targets_from_the_service(server, method):
    """torchvision's RetinaNet trains on targets that came from the service through
    DataLoader workers; each step's losses equal the model's own ``compute_loss``."""
    pytest.importorskip("torchvision")
    from torchvision.models.detection import retinanet_resnet50_fpn

    from tritarget.kernels.losses import retinanet_loss

    torch.manual_seed(0)
    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5, min_size=CANVAS[0],
                                   max_size=CANVAS[1])  # fmt: skip
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    client = TargetClient(server.address)
    loader = torch.utils.data.DataLoader(
        _Detection(), batch_size=2, num_workers=2, multiprocessing_context=method,
        collate_fn=TargetCollate(_collate, preset=PRESET, client=client, densify=False),
    )  # fmt: skip
    steps = 0
    for images, targets, sparse in loader:
        image_list, model_targets = model.transform(list(images), targets)
        assert image_list.tensors.shape[-2:] == CANVAS  # the model sees the canvas the targets were made for
        features = list(model.backbone(image_list.tensors).values())
        head_outputs = model.head(features)
        anchors = model.anchor_generator(image_list, features)
        theirs = model.compute_loss(model_targets, head_outputs, anchors)
        ours = retinanet_loss(head_outputs, sparse)
        for name in ("classification", "bbox_regression"):
            assert math.isclose(ours[name].item(), theirs[name].item(), rel_tol=1e-5), (name, ours, theirs)
        optimizer.zero_grad()
        sum(ours.values()).backward()
        optimizer.step()
        steps += 1
        if steps == 2:
            break
    assert steps == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("where", ["device", "targets"])
def test_in_process_targets_are_solved_on_the_gpu_they_go_to(backend, where):
    """The boxes went to the host whatever their device: backend="triton" always failed
    ("needs CUDA tensors") and "auto" never chose the GPU. Targets wanted on a GPU (or
    boxes already there) are solved there now."""
    batches = _batches(2)
    if where == "targets":
        on_gpu = lambda target: {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in target.items()}  # noqa: E731
        batches = [(images, [on_gpu(t) for t in targets]) for images, targets in batches]
    device = "cuda" if where == "device" else None
    for (_images, _targets, assigned), (_, host_targets) in zip(
        with_targets(batches, preset=PRESET, backend=backend, device=device), _batches(2)
    ):
        assert assigned.labels.is_cuda
        expected = _expected(host_targets)
        assert torch.equal(assigned.labels.cpu(), expected.labels)
        assert torch.equal(assigned.matched_gt.cpu(), expected.matched_gt)
    # The loader's own ignore regions, given on the host, go where the boxes are solved
    # ("ignore_boxes: on cpu, but gt_boxes are on cuda:0" before).
    options = {"preset": "retinanet_mmdet", "overrides": {"match.ignore_iof_thr": 0.5},
               "ignore_boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0], [20.0, 30.0, 40.0, 40.0]]),
               "ignore_counts": [1, 1]}  # fmt: skip
    ((*_, on_host),) = with_targets(_batches(1), backend="cpu", **options)
    ((*_, assigned),) = with_targets(batches[:1], backend=backend, device=device, **options)
    assert (on_host.labels == -1).any() and torch.equal(assigned.labels.cpu(), on_host.labels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_host_backend_takes_boxes_from_the_gpu():
    """backend="cpu" with targets already on the GPU: solved on the host, as before the
    boxes kept their device."""
    on_gpu = lambda target: {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in target.items()}  # noqa: E731
    batches = [(images, [on_gpu(t) for t in targets]) for images, targets in _batches(1)]
    ((_, _, assigned),) = with_targets(batches, preset=PRESET, backend="cpu")
    assert not assigned.labels.is_cuda
    assert torch.equal(assigned.labels, _expected(_batches(1)[0][1]).labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
@pytest.mark.parametrize("densify", [True, False])
def test_targets_come_pinned_from_a_pinning_data_loader(densify):
    """``DataLoader(pin_memory=True)`` pins objects through their ``pin_memory()``: without
    one the targets came back unpinned, their copies to the GPU not asynchronous."""
    collate = TargetCollate(_collate, preset=PRESET, densify=densify)
    loader = torch.utils.data.DataLoader(_Detection(), batch_size=2, collate_fn=collate, pin_memory=True)
    _images, targets, assigned = next(iter(loader))
    assert isinstance(assigned, Targets if densify else SparseTargets)
    tensors = [t for t in vars(assigned).values() if isinstance(t, torch.Tensor)]
    assert tensors and all(t.is_pinned() for t in tensors)
    if densify:
        _same(assigned, _expected(targets))


class _RandomFlips(_Detection):
    """Items whose transform draws from torch's global generator, as torchvision's
    RandomHorizontalFlip does."""

    def __getitem__(self, index: int):
        image, target = super().__getitem__(index)
        if torch.rand(()) < 0.5:
            boxes = target["boxes"]
            target = {**target, "boxes": torch.stack([CANVAS[1] - boxes[:, 2], boxes[:, 1], CANVAS[1] - boxes[:, 0],
                                                      boxes[:, 3]], dim=1)}  # fmt: skip
        return image, target


def test_a_run_with_a_loader_that_draws_at_random_repeats_with_a_client(server):
    """gRPC's thread read the loader: with num_workers=0 its random transforms and the
    trainer's own draws took turns on torch's generator in a different order each run, so
    torch.manual_seed no longer repeated a run (it does in-process)."""

    def run(client) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(_RandomFlips(), batch_size=2, shuffle=True, collate_fn=_collate)
        boxes, draws = [], []
        for _, targets, _ in with_targets(loader, preset=PRESET, client=client, in_flight=3):
            boxes.append(torch.cat([t["boxes"] for t in targets]))
            draws.append(torch.randn(1000))  # the trainer's own randomness (dropout, sampling)
            time.sleep(0.01)
        return boxes, draws

    with TargetClient(server.address) as client:
        runs = [run(client) for _ in range(3)]
    for boxes, draws in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(boxes, runs[0][0]))
        assert all(torch.equal(a, b) for a, b in zip(draws, runs[0][1]))


@pytest.mark.parametrize("in_flight", [1, 2, 4, None])
def test_in_flight_batches_are_read_ahead_of_the_one_the_trainer_holds(server, in_flight):
    """``in_flight`` batches are read ahead of the one the trainer holds, which keeps no
    slot (when it did, in_flight=1 read nothing ahead). The default is 4 (None: left out)."""
    read = []
    given = {} if in_flight is None else {"in_flight": in_flight}
    with TargetClient(server.address) as client:
        for held, _ in enumerate(with_targets(_counted(8, read), preset=PRESET, client=client, **given)):
            assert len(read) == min(8, held + 1 + (in_flight or 4))


def test_bad_batches_and_clients_are_named(server):
    from tritarget.clients import AsyncTargetClient

    detectron2_batch = [{"image": torch.zeros(3, 8, 8), "instances": None}] * 2
    for kwargs in ({"backend": "cpu"}, {"client": TargetClient(server.address)}):
        with pytest.raises(TypeError, match=r"a batch must be \(images, targets\) .* got list of 2"):
            list(with_targets([detectron2_batch], preset=PRESET, canvas=CANVAS, **kwargs))
        with pytest.raises(TypeError, match=r"a batch must be \(images, targets\) .* got dict"):
            list(with_targets([{"inputs": [], "data_samples": []}], preset=PRESET, canvas=CANVAS, **kwargs))
    async_client = AsyncTargetClient(server.address)
    with pytest.raises(TypeError, match="client: expected a TargetClient .* got AsyncTargetClient"):
        with_targets(_batches(1), preset=PRESET, client=async_client)
    with pytest.raises(TypeError, match="client: expected a TargetClient .* got AsyncTargetClient"):
        TargetCollate(_collate, preset=PRESET, client=async_client)


def test_a_config_dict_works_as_with_the_client_and_a_bad_config_is_named(server):
    """``client.assign(config=dict)`` works; through the loader it failed with
    "'dict' object has no attribute 'match'"."""
    config = presets.get(PRESET)
    with TargetClient(server.address) as client:
        for kwargs in ({"client": client}, {"backend": "cpu"}):
            ((_, targets, assigned),) = with_targets(_batches(1), config=config.to_dict(), **kwargs)
            assert torch.equal(assigned.labels, _expected(targets).labels)
            with pytest.raises(TypeError, match="config: expected a TargetConfig or its dict, got str"):
                with_targets(_batches(1), config="retinanet", **kwargs)


def test_a_preset_only_the_server_knows_is_its_to_resolve(monkeypatch):
    """A newer server's preset worked with ``client.assign`` (the wire leaves it to the
    server) but the loader refused it naming this package's presets. The server runs in a
    process of its own: it knows the preset, this one does not."""
    from tritarget.kernels import presets as presets_module

    server, port = serve_process("--backend", "cpu", "--warmup-canvas", "64", "64")
    try:
        mine = {name: make for name, make in presets_module._PRESETS.items() if name != PRESET}
        monkeypatch.setattr(presets_module, "_PRESETS", mine)
        with TargetClient(f"127.0.0.1:{port}") as client:
            ((_, targets, assigned),) = with_targets(_batches(1), preset=PRESET, client=client)
            collated = TargetCollate(_collate, preset=PRESET, client=client)([_Detection()[0], _Detection()[1]])
        with pytest.raises(KeyError, match="unknown preset"):  # in-process: nobody else to resolve it
            with_targets(_batches(1), preset=PRESET, backend="cpu")
    finally:
        server.kill()
    monkeypatch.undo()
    assert torch.equal(assigned.labels, _expected(targets).labels)
    assert torch.equal(collated[2].labels, _expected(targets).labels)


def test_an_empty_epoch_asks_no_server():
    """A rank or sampler without a batch: through a service that was down it raised
    UNAVAILABLE after the client's timeout instead of yielding nothing."""
    with TargetClient("127.0.0.1:1", timeout=3) as client:
        started = time.monotonic()
        assert list(with_targets([], preset=PRESET, client=client)) == []
    assert time.monotonic() - started < 1


def test_ignore_boxes_may_be_numpy_or_lists_with_or_without_a_client(server):
    """The client took numpy and list ignore boxes; in-process (and TargetCollate, which
    built its in-process fallback even with a client) failed on them."""
    import numpy as np

    options = {"preset": "retinanet_mmdet", "overrides": {"match.ignore_iof_thr": 0.5}, "box_format": "xywh",
               "ignore_counts": [1, 1]}  # fmt: skip
    ignore = [[10.0, 10.0, 60.0, 50.0], [20.0, 30.0, 40.0, 40.0]]
    batch = _batches(1)
    expected = [a for _, _, a in with_targets(batch, ignore_boxes=torch.tensor(ignore), backend="cpu", **options)]
    assert (expected[0].labels == -1).any()
    with TargetClient(server.address) as client:
        for given in (np.array(ignore), ignore):
            for kwargs in ({"backend": "cpu"}, {"client": client}):
                got = [a for _, _, a in with_targets(batch, ignore_boxes=given, **options, **kwargs)]
                assert torch.equal(got[0].labels, expected[0].labels)
            collate = TargetCollate(lambda samples: samples[0], client=client, ignore_boxes=given, **options)
            assert torch.equal(collate(batch)[2].labels, expected[0].labels)


def test_integer_ignore_boxes_are_taken_with_or_without_a_client(server):
    """Whole-pixel crowd regions as a list, a numpy array or a tensor of ints: the client
    sends them as float32, and so does the in-process path."""
    options = {"preset": "retinanet_mmdet", "overrides": {"match.ignore_iof_thr": 0.5}, "box_format": "xywh",
               "ignore_counts": [1, 1]}  # fmt: skip
    ignore = [[35, 31, 51, 41], [21, 33, 41, 43]]
    ((*_, expected),) = with_targets(_batches(1), ignore_boxes=torch.tensor(ignore, dtype=torch.float32),
                                     backend="cpu", **options)  # fmt: skip
    assert (expected.labels == -1).any()
    with TargetClient(server.address) as client:
        for given in (ignore, np.array(ignore, dtype=np.int32), torch.tensor(ignore)):
            for kwargs in ({"backend": "cpu"}, {"client": client}):
                ((*_, got),) = with_targets(_batches(1), ignore_boxes=given, **options, **kwargs)
                assert torch.equal(got.labels, expected.labels)


def test_normalised_ignore_boxes_without_counts_are_refused_with_or_without_a_client(server):
    """A normalised box_format scales each image's crowd regions by that image's size, so
    ``ignore_counts`` must say whose they are; in-process as through the client."""
    options = dict(preset="retinanet_mmdet", box_format="cxcywhn", ignore_boxes=torch.tensor([[0.5, 0.5, 0.2, 0.2]]))
    with TargetClient(server.address) as client:
        for kwargs in ({"backend": "cpu"}, {"client": client}):
            with pytest.raises(ValueError, match=r"ignore_counts: required with ignore_boxes \(one count per image\)"):
                list(with_targets(_batches(1), **options, **kwargs))


def test_numpy_views_with_negative_strides_are_sent():
    """torch cannot share such a view: "expected a Tensor[N, 4] of coordinates, got ndarray"."""
    import numpy as np

    from tritarget.clients.wire import build_request

    boxes = np.array([[10.0, 10.0, 60.0, 50.0], [20.0, 30.0, 40.0, 40.0]], dtype=np.float32)
    request = build_request(boxes[::-1], [2], CANVAS, preset=PRESET, gt_classes=np.array([1, 2])[::-1])
    expected = build_request(boxes[::-1].copy(), [2], CANVAS, preset=PRESET, gt_classes=np.array([2, 1]))
    assert request.SerializeToString() == expected.SerializeToString()


def test_numpy_views_with_negative_strides_in_target_dicts_are_taken():
    """The client took them; the loader refused them with torch's error, naming no field."""
    import numpy as np

    boxes = np.array([[10.0, 10.0, 60.0, 50.0], [20.0, 30.0, 40.0, 40.0]], dtype=np.float32)
    reversed_views = [{"boxes": boxes[::-1], "labels": np.array([1, 2])[::-1]}]
    copies = [{"boxes": boxes[::-1].copy(), "labels": np.array([2, 1])}]
    for got, expected in zip(boxes_of(reversed_views), boxes_of(copies), strict=True):
        assert got == expected if isinstance(got, list) else torch.equal(got, expected)


def test_the_canvas_is_checked_as_the_client_checks_it_with_or_without_one():
    """A float side was truncated to another canvas in process (the client refused it), and
    a single number failed with "'int' object is not subscriptable"."""
    import numpy as np

    for canvas, error, message in (((64.9, 64.9), TypeError, r"canvas: expected two ints \(height, width\)"),
                                   (64, TypeError, r"canvas: expected \(height, width\), got 64"),
                                   (torch.tensor([64.5, 64.0]), TypeError, r"canvas: expected two ints")):  # fmt: skip
        with pytest.raises(error, match=message):
            with_targets([], preset=PRESET, canvas=canvas)
        with pytest.raises(error, match=message):
            TargetCollate(lambda samples: samples[0], preset=PRESET, canvas=canvas)
    images, targets = _batches(1)[0]
    height, width = images.shape[-2:]
    expected = next(with_targets([(images, targets)], preset=PRESET, canvas=(height, width)))[2]
    for canvas in (np.array([height, width]), torch.tensor([height, width]), (np.int64(height), width)):  # taken
        got = next(with_targets([(images, targets)], preset=PRESET, canvas=canvas))[2]
        assert torch.equal(got.labels, expected.labels)


def test_torchvision_boxes_of_another_format_than_box_format_are_refused(server):
    """tv_tensors.BoundingBoxes carry their format; XYWH boxes read as xyxy made other
    targets, silently, with a client and in-process alike."""
    tv_tensors = pytest.importorskip("torchvision.tv_tensors")
    images, targets = _batches(1)[0]
    as_xywh = [torch.cat([t["boxes"][:, :2], t["boxes"][:, 2:] - t["boxes"][:, :2]], dim=1) for t in targets]
    xywh = [{**t, "boxes": tv_tensors.BoundingBoxes(boxes, format="XYWH", canvas_size=CANVAS)}
            for t, boxes in zip(targets, as_xywh)]  # fmt: skip
    with TargetClient(server.address) as client:
        for kwargs in ({"backend": "cpu"}, {"client": client}):
            with pytest.raises(ValueError, match=r"BoundingBoxes in format XYWH, but box_format is 'xyxy': pass box_"):
                list(with_targets([(images, xywh)], preset=PRESET, **kwargs))
            got = [a for _, _, a in with_targets([(images, xywh)], preset=PRESET, box_format="xywh", **kwargs)]
            _same(got[0], _expected(targets))


# The pad size limits each level's valid anchors; the image size feeds the border rule,
# which ignores every anchor past the pad size too.
@pytest.mark.parametrize(("border", "telling"), [(-1, "pad_sizes"), (0, "image_sizes")])
def test_crowd_regions_and_image_sizes_come_per_image_from_the_target_dicts(server, border, telling):
    """mmdet's crowd boxes (its ignored instances), img_shape and pad_shape differ per image:
    as fixed options they fit no loader, so a target dict's "ignore_boxes" (an image without
    the key has none), "image_size" and "pad_size" go into its batch's request."""
    options = dict(preset="retinanet_mmdet", overrides={"match.ignore_iof_thr": 0.5, "match.allowed_border": border})
    config = presets.get("retinanet_mmdet").replace(**options["overrides"])
    extras = [
        [{"ignore_boxes": torch.tensor([[60.0, 60.0, 128.0, 120.0]]), "image_size": (100, 150), "pad_size": (104, 160)},
         {"image_size": (128, 128), "pad_size": (128, 128)}],
        [{"ignore_boxes": None, "image_size": torch.tensor([128, 160]), "pad_size": [128, 160]},
         {"ignore_boxes": [[0.0, 0.0, 64.0, 64.0], [70.0, 70.0, 128.0, 128.0]], "image_size": (90, 120),
          "pad_size": (96, 128)}],
    ]  # fmt: skip
    batches = _batches(2)
    carried = [
        (images, [{**t, **e} for t, e in zip(targets, more)]) for (images, targets), more in zip(batches, extras)
    ]

    def assigned(targets, more, dropped=None):
        boxes, counts, classes = boxes_of(targets)
        given = [() if e.get("ignore_boxes") is None else e["ignore_boxes"] for e in more]  # None: none
        ignore = [torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) for boxes in given]
        fields = {"ignore_boxes": torch.cat(ignore), "ignore_counts": [len(rows) for rows in ignore],
                  "image_sizes": [list(map(int, e["image_size"])) for e in more],
                  "pad_sizes": [list(map(int, e["pad_size"])) for e in more]}  # fmt: skip
        for name in dropped or ():
            fields.pop(name)
        return assign(boxes, counts, CANVAS, config, gt_classes=classes, backend="cpu", **fields)

    expected = [assigned(targets, more) for (_, targets), more in zip(batches, extras)]
    for dropped in (("ignore_boxes", "ignore_counts"), (telling,)):  # these fields change the targets
        without = [assigned(targets, more, dropped) for (_, targets), more in zip(batches, extras)]
        assert any(not torch.equal(a.labels, e.labels) for a, e in zip(without, expected)), dropped
    with TargetClient(server.address) as client:
        for kwargs in ({"backend": "cpu"}, {"client": client}):
            got = [a for _, _, a in with_targets(carried, **options, **kwargs)]
            collate = TargetCollate(lambda samples: samples[0], **options, **kwargs)
            collated = [collate([batch])[2] for batch in carried]
            for a, b, e in zip(got, collated, expected):
                _same(a, e)
                _same(b, e)


def test_per_image_fields_that_cannot_be_read_are_named(server):
    images, targets = _batches(1)[0]
    cases = [
        ([{"image_size": (100, 150)}, {}], ValueError,
         r"targets\[1\]: no 'image_size', but other images have one: give it for every image or for none"),
        ([{"pad_size": (100.0, 150.0)}, {"pad_size": (128, 160)}], TypeError,
         r"targets\[0\]\['pad_size'\]: expected integer pixels \(height, width\), got torch.float32"),
        ([{"image_size": (3, 100, 150)}, {"image_size": (128, 160)}], ValueError,
         r"targets\[0\]\['image_size'\]: expected \(height, width\), got 3 values"),
        ([{"image_size": (128, 160)}, {"image_size": 128}], ValueError,
         r"targets\[1\]\['image_size'\]: expected \(height, width\), got 1 values"),
        ([{}, {"ignore_boxes": torch.ones(2, 5)}], ValueError,
         r"targets\[1\]\['ignore_boxes'\]: expected shape \[N, 4\], got \[2, 5\]"),
    ]  # fmt: skip
    with TargetClient(server.address) as client:
        for kwargs in ({"backend": "cpu"}, {"client": client}):
            for extras, error, message in cases:
                batch = (images, [{**t, **e} for t, e in zip(targets, extras)])
                with pytest.raises(error, match=message):
                    list(with_targets([batch], preset=PRESET, **kwargs))
                with pytest.raises(error, match=message):
                    TargetCollate(lambda samples: samples[0], preset=PRESET, **kwargs)([batch])
            both = (images, [{**t, "ignore_boxes": torch.zeros(0, 4)} for t in targets])
            with pytest.raises(ValueError, match="ignore_boxes: given as an option and by the batch's target dicts"):
                list(with_targets([both], preset=PRESET, ignore_boxes=torch.zeros(0, 4), ignore_counts=[0, 0],
                                  **kwargs))  # fmt: skip


def _one_image(image_id=7):
    target = {"boxes": torch.tensor([[1.0, 1.0, 20.0, 20.0]]), "labels": torch.tensor([1]), "image_id": image_id}
    return torch.zeros(1, 3, 64, 64), [target]


@pytest.mark.parametrize("densify", [True, False])
def test_in_process_targets_go_to_the_device_asked_for(densify):
    # device= moves the targets (dense or sparse) wherever asked; "meta" shows it without a GPU.
    ((_, _, assigned),) = with_targets([_one_image()], preset=PRESET, backend="cpu", densify=densify, device="meta")
    assert isinstance(assigned, Targets if densify else SparseTargets)
    tensors = [value for value in vars(assigned).values() if isinstance(value, torch.Tensor)]
    assert tensors and all(value.device.type == "meta" for value in tensors)


def test_an_empty_set_of_boxes_of_any_shape_counts_zero_boxes():
    # torch.zeros(1, 0) has len 1 but no box: the image counts 0 boxes (its count must match the rows sent).
    boxes, counts, _ = boxes_of([{"boxes": torch.zeros(1, 0)}, {"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]])}])
    assert counts == [0, 1] and boxes.tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_boxes_of_gives_float32_boxes_and_one_flat_row_of_classes():
    """Whole-pixel boxes come back float32, as ``assign`` and the box losses take them, and
    labels as a column [N, 1] or one 0-d id are each image's flat class ids."""
    targets = [{"boxes": torch.tensor([[1, 2, 30, 40], [5, 6, 50, 60]]), "labels": torch.tensor([[1], [2]])},
               {"boxes": [[1, 2, 3, 4]], "labels": torch.tensor(3)}]  # fmt: skip
    boxes, counts, classes = boxes_of(targets)
    assert boxes.dtype == torch.float32 and boxes.tolist() == [[1, 2, 30, 40], [5, 6, 50, 60], [1, 2, 3, 4]]
    assert counts == [2, 1] and classes.tolist() == [1, 2, 3]
    with pytest.raises(TypeError, match=r"targets\[0\]\['labels'\]: expected integer class ids, got torch.complex64"):
        boxes_of([{"boxes": torch.ones(1, 4), "labels": torch.tensor([1 + 0j])}])


@pytest.mark.parametrize("key", ["boxes", "ignore_boxes"])
@pytest.mark.parametrize("rows", [torch.tensor([[False, False, True, True]]), torch.tensor([[0, 0, 1 + 5j, 1]])],
                         ids=["bool", "complex"])  # fmt: skip
def test_box_rows_of_flags_or_complex_numbers_are_refused(key, rows):
    """A mask is no box (read as 0.0 / 1.0 it made one), nor is a complex row (its
    imaginary part dropped with a warning); integer pixels are boxes."""
    images, targets = _one_image()
    targets[0][key] = rows
    message = rf"targets\[0\]\['{key}'\]: expected box coordinates \(float or integer pixels\), got {rows.dtype}"
    with pytest.raises(TypeError, match=message):
        next(with_targets([(images, targets)], preset=PRESET, backend="cpu"))
    targets[0][key] = torch.tensor([[0, 0, 20, 30]])
    next(with_targets([(images, targets)], preset=PRESET, backend="cpu"))


@pytest.mark.parametrize("size", [(True, True), torch.tensor([64 + 0j, 64 + 0j])], ids=["bool", "complex"])
def test_an_image_size_of_flags_or_complex_numbers_is_refused(size):
    """(True, True) would read as a 1 x 1 image, a complex size as its real part."""
    images, targets = _one_image()
    targets[0]["image_size"] = size
    dtype = "bool" if isinstance(size, tuple) else "complex64"
    message = rf"targets\[0\]\['image_size'\]: expected integer pixels \(height, width\), got torch.{dtype}"
    with pytest.raises(TypeError, match=message):
        next(with_targets([(images, targets)], preset=PRESET, backend="cpu"))
    with pytest.raises(TypeError, match=message):
        TargetCollate(lambda samples: samples[0], preset=PRESET)([(images, targets)])


def test_images_that_are_not_a_batched_tensor_are_taken_with_a_canvas_and_need_one_without():
    """Images are anything given ``canvas=``: one unbatched Tensor[C, H, W] is not counted as
    C images, nor read as a canvas of its own."""
    images, targets = _one_image()
    expected = next(with_targets([(images, targets)], preset=PRESET, backend="cpu"))[2]
    unbatched = images[0]  # [3, 64, 64], for one image
    ((*_, got),) = with_targets([(unbatched, targets)], preset=PRESET, backend="cpu", canvas=(64, 64))
    assert torch.equal(got.labels, expected.labels)
    with pytest.raises(ValueError, match=r"canvas: give canvas=\(H, W\), or batches whose images are one padded"):
        next(with_targets([(unbatched, targets)], preset=PRESET, backend="cpu"))


def test_the_auto_backend_solves_on_the_host_for_a_device_that_is_not_a_gpu():
    """Only a CUDA ``device`` is where ``auto`` solves; any other gets the host's targets."""
    ((_, targets, assigned),) = with_targets([_one_image()], preset=PRESET, backend="auto", device="meta")
    assert assigned.labels.device.type == "meta"
    ((_, _, on_host),) = with_targets([_one_image()], preset=PRESET, backend="auto")
    assert torch.equal(on_host.labels, _expected_on(targets, (64, 64)).labels)


def _expected_on(targets, canvas) -> Targets:
    boxes, counts, classes = boxes_of(targets)
    return assign(boxes, counts, canvas, presets.get(PRESET), gt_classes=classes, backend="cpu")


@pytest.mark.parametrize(("name", "value"), [("gt_classes", torch.tensor([1])), ("request_id", "r1"),
                                             ("seeds", torch.Generator())])  # fmt: skip
def test_what_each_batch_brings_is_not_an_option(name, value):
    """Classes come from the target dicts, request ids and seed generators from the loader."""
    message = rf"unknown option '{name}'; the options are box_format, "
    with pytest.raises(TypeError, match=message):
        with_targets(_batches(1), preset=PRESET, **{name: value})
    with pytest.raises(TypeError, match=message):
        TargetCollate(_collate, preset=PRESET, **{name: value})


@pytest.mark.parametrize("name", ["return_classes", "return_max_iou"])
def test_a_flag_that_is_not_a_bool_is_refused_when_the_loader_is_made(name):
    """A "yes" from a config file, found out in a DataLoader worker at the first batch before."""
    for make in (lambda: with_targets(_batches(1), preset=PRESET, **{name: "yes"}),
                 lambda: TargetCollate(_collate, preset=PRESET, **{name: "yes"})):  # fmt: skip
        with pytest.raises(TypeError, match=rf"{name}: expected True or False, got 'yes'"):
            make()


def test_boolean_ignore_boxes_are_refused_with_or_without_a_client(server):
    """A mask is not coordinates: read as 0.0 / 1.0 it made a crowd region in-process."""
    mask = torch.tensor([[False, False, True, True]])
    with TargetClient(server.address) as client:
        for kwargs in ({"backend": "cpu"}, {"client": client}):
            with pytest.raises(TypeError, match=r"ignore_boxes: expected .*, got torch.bool"):
                list(with_targets([_one_image()], preset=PRESET, ignore_boxes=mask, ignore_counts=[1], **kwargs))


def test_normalised_boxes_are_fractions_of_the_image_sizes_option_in_process_too(server):
    """``image_sizes=`` as an option (not in the target dicts): each image's boxes are
    fractions of its own size, in-process as the client scales them."""
    images = torch.zeros(2, 3, *CANVAS)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[0.3, 0.6, 0.25, 0.5]]), "labels": torch.tensor([2])}]  # fmt: skip
    sizes = torch.tensor([[64, 80], [100, 120]])
    options = dict(preset=PRESET, box_format="cxcywhn", image_sizes=sizes)
    with TargetClient(server.address) as client:
        ((*_, remote),) = with_targets([(images, targets)], client=client, **options)
    ((*_, local),) = with_targets([(images, targets)], backend="cpu", **options)
    pixels = to_xyxy(torch.cat([t["boxes"] for t in targets]), "cxcywhn", sizes)
    assert pixels[0].tolist() == [20.0, 16.0, 60.0, 48.0]  # in the first image's 80 x 64
    expected = assign(pixels, [1, 1], CANVAS, presets.get(PRESET), gt_classes=torch.tensor([1, 2]), image_sizes=sizes,
                      backend="cpu")  # fmt: skip
    for got in (remote, local):
        _same(got, expected)


def test_a_loader_that_fails_before_its_first_batch_raises_with_or_without_a_client(server):
    """An epoch whose loader raises at once is not an empty epoch: its error comes out."""

    def failing():
        raise OSError("disk gone")
        yield  # a generator

    with TargetClient(server.address) as client:
        for kwargs in ({"backend": "cpu"}, {"client": client}):
            with pytest.raises(OSError, match="disk gone"):
                list(with_targets(failing(), preset=PRESET, **kwargs))


class _FailsOnce:
    """A loader whose third read raises, its later reads would go on; counting its reads."""

    def __init__(self) -> None:
        self.reads, self.batches = 0, _batches(6)

    def __iter__(self):
        return self

    def __next__(self):
        self.reads += 1
        if self.reads == 3:
            raise OSError("disk gone")
        if self.reads > len(self.batches):
            raise StopIteration
        return self.batches[self.reads - 1]


def test_a_loader_is_not_read_after_it_raised(server):
    """The batches before the error come out, then the error; nothing past it is read (and
    dropped)."""
    with TargetClient(server.address) as client:
        for kwargs in ({"backend": "cpu"}, {"client": client}):
            loader = _FailsOnce()
            stream = with_targets(loader, preset=PRESET, **kwargs)
            assert len([next(stream), next(stream)]) == 2
            with pytest.raises(OSError, match="disk gone"):
                next(stream)
            assert loader.reads == 3


def test_targets_that_are_not_a_sequence_are_refused():
    """An iterator of dicts (read once, by the check) is not a batch's list of targets."""
    images, targets = _batches(1)[0]
    message = r"a batch must be \(images, targets\) with targets a list of per-image dicts .* got tuple of 2"
    for given in (iter(targets), (target for target in targets)):
        with pytest.raises(TypeError, match=message):
            next(with_targets([(images, given)], preset=PRESET, backend="cpu"))


def test_target_collate_gives_sparse_targets_when_asked(server):
    """``densify=False``: SparseTargets from the service and in-process alike."""
    batch = _batches(1)[0]
    with TargetClient(server.address) as client:
        for kwargs in ({"backend": "cpu"}, {"client": client}):
            _, targets, assigned = TargetCollate(lambda samples: samples[0], preset=PRESET, densify=False,
                                                 **kwargs)([batch])  # fmt: skip
            assert isinstance(assigned, SparseTargets)
            _same(assigned.to_dense(), _expected(targets))
