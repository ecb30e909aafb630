"""curoi.torch under DistributedDataParallel: 2 CPU processes (gloo) train a
small RoI head, each on half the images and their boxes (batch indices local
to the process), and must end with the gradients and parameters of one
process trained on all the data with the mean loss.

The reference is plain single-process autograd here, in the test process;
the two ranks are child Pythons that import this module, so the model and
the data are defined once.
"""

import datetime
import faulthandler
import os
import pathlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import curoi.torch as ct  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORLD = 2
IMAGES_PER_RANK, BOXES_PER_IMAGE = 2, 3
STEPS, LEARNING_RATE = 3, 0.1
TIMEOUT_S = 90


class RoIHead(torch.nn.Module):
    """conv -> roi_align or roi_pool -> linear: what a detector's box head
    does, small."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.linear = torch.nn.Linear(4 * 2 * 2, 2)

    def forward(self, images, boxes):
        features = self.conv(images)
        if self.op == "align":
            pooled = ct.roi_align(features, boxes, (2, 2), spatial_scale=0.5,
                                  sampling_ratio=2, aligned=True)
        else:
            pooled = ct.roi_pool(features, boxes, (2, 2), spatial_scale=0.5)
        return self.linear(pooled.flatten(1))


def model(op):
    torch.manual_seed(0)  # every rank and the reference start alike
    return RoIHead(op).double()


def data():
    """Images, boxes with global batch indices, and regression targets, for
    all ranks together; rank r owns images 2r, 2r+1 and their boxes."""
    generator = torch.Generator().manual_seed(1)
    n = WORLD * IMAGES_PER_RANK
    images = torch.rand(n, 3, 12, 12, generator=generator, dtype=torch.float64)
    rows = []
    for image in range(n):
        for _ in range(BOXES_PER_IMAGE):
            x1, y1 = (torch.rand(2, generator=generator, dtype=torch.float64) * 12).tolist()
            w, h = (torch.rand(2, generator=generator, dtype=torch.float64) * 10 + 2).tolist()
            rows.append([image, x1, y1, x1 + w, y1 + h])
    boxes = torch.tensor(rows, dtype=torch.float64)
    targets = torch.randn(len(rows), 2, generator=generator, dtype=torch.float64)
    return images, boxes, targets


def shard(rank, images, boxes, targets):
    """Rank ``rank``'s images and their boxes, batch indices made local."""
    first = rank * IMAGES_PER_RANK
    mine = (boxes[:, 0] >= first) & (boxes[:, 0] < first + IMAGES_PER_RANK)
    local = boxes[mine].clone()
    local[:, 0] -= first
    return images[first:first + IMAGES_PER_RANK], local, targets[mine]


def train(net, images, boxes, targets):
    """STEPS of SGD on the mean squared error; the first step's gradients
    and the final parameters."""
    optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE)
    first_grads = None
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(net(images, boxes), targets)
        loss.backward()
        if first_grads is None:
            first_grads = [p.grad.detach().clone() for p in net.parameters()]
        optimizer.step()
    return first_grads, [p.detach().clone() for p in net.parameters()]


def run_rank(rank, store, out):
    """One DDP process: both heads on this rank's share of the data.

    The ranks meet through a file store, so no rank hosts a server that the
    other still needs while it shuts down, and they wait for each other
    before tearing the group down. Once the results are saved and the group
    destroyed, the rank leaves with ``os._exit``: what gloo's threads do at
    interpreter teardown is not what this test checks, and a race there (an
    abort with no traceback, on a loaded machine) must not fail it. Anything that goes wrong before that still
    exits non-zero, with a traceback (faulthandler covers C++ aborts).
    """
    faulthandler.enable()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}",
                            rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        results = {}
        for op in ("align", "pool"):
            net = torch.nn.parallel.DistributedDataParallel(model(op))
            results[op] = train(net, *shard(rank, *data()))
        torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    store = folder / "store"
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests")]
                           + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, PYTHONPATH=path, CUROI_NUM_THREADS="1")
    children = [subprocess.Popen(
        [sys.executable, "-c",
         f"import test_torch_ddp as t; t.run_rank({rank}, {str(store)!r}, {str(folder / f'{rank}.pt')!r})"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(WORLD)]
    errors = []
    try:
        for rank, child in enumerate(children):
            _, stderr = child.communicate(timeout=TIMEOUT_S)
            if child.returncode != 0:
                errors.append(f"rank {rank} exited {child.returncode}:\n{stderr[-3000:]}")
    finally:
        for child in children:  # a hung rank fails the test instead of stalling it
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert not errors, "\n".join(errors)
    return [torch.load(folder / f"{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("op", ["align", "pool"])
def test_ddp_on_two_processes_equals_one_process_on_all_the_data(ranks, op):
    # One process, all the images, global batch indices, the mean loss over
    # all boxes: what DDP's averaged gradients amount to when every rank
    # holds as many boxes.
    torch.set_num_threads(1)
    want_grads, want_params = train(model(op), *data())
    for rank, results in enumerate(ranks):
        got_grads, got_params = results[op]
        for got, want in zip(got_grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14,
                                       msg=lambda m: f"rank {rank} gradient: {m}")
        for got, want in zip(got_params, want_params):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14,
                                       msg=lambda m: f"rank {rank} parameter: {m}")


def test_each_rank_alone_would_not_give_the_reference(ranks):
    # Guards the test itself: one rank's half of the data gives other
    # gradients, so the equality above shows that DDP averaged them.
    torch.set_num_threads(1)
    want_grads, _ = train(model("align"), *data())
    alone, _ = train(model("align"), *shard(0, *data()))
    assert not all(torch.allclose(a, b) for a, b in zip(alone, want_grads))
